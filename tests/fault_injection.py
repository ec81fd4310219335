"""Faults injected into a rank of a real 2-rank run (tests/test_faults.py), named by data.custom_cls.

The trainer imports this file in every rank (data.custom_cls.path) and builds its datasets with
PairDataset below. Environment variables choose the fault:
- BTRM_TEST_HANG_FLAG=<file>: once that file exists, rank BTRM_TEST_HANG_RANK stops answering (it
  sleeps while fetching its next pair), as a hung peer would.
- BTRM_TEST_FULL_DISK=<text>: on rank BTRM_TEST_FULL_DISK_RANK, torch.save to a path containing
  <text> fails with ENOSPC, as on a full disk.
"""

import errno
import os
import signal
import time

import torch

from btrm import pair_dataset


class PairDataset(pair_dataset.PairDataset):
    def __getitem__(self, index):
        flag = os.environ.get("BTRM_TEST_HANG_FLAG")
        if flag and os.environ["RANK"] == os.environ["BTRM_TEST_HANG_RANK"] and os.path.exists(flag):
            # Once the other rank has failed, torchrun ends this one with SIGTERM. A rank blocked inside a
            # collective would not act on it and be killed 30 s later (torch's fixed grace after a failure):
            # dying at once spares the test that wait and changes nothing the other rank reports.
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            time.sleep(3600)
        return super().__getitem__(index)


def _fail_on_full_disk(save):
    def failing_save(obj, f, *args, **kwargs):
        if os.environ["BTRM_TEST_FULL_DISK"] in str(f):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(f))
        return save(obj, f, *args, **kwargs)

    return failing_save


if os.environ.get("BTRM_TEST_FULL_DISK") and os.environ["RANK"] == os.environ["BTRM_TEST_FULL_DISK_RANK"]:
    torch.save = _fail_on_full_disk(torch.save)

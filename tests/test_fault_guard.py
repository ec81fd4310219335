"""btrm.fault_guard on FaultGuard objects built by their constructor: the stop decision, divergence, heartbeats
left where the ranks are, and the one place that classifies failures. (2-rank fault runs: tests/test_faults.py.)"""

import dataclasses
import errno
import signal

import pytest
import torch

from btrm import faults
from btrm.checkpoint import TrainerState
from btrm.config import RunConfig
from btrm.fault_guard import FaultGuard, TrainingDiverged
from btrm.schema import compose_config


@pytest.fixture(scope="module")
def section():
    return RunConfig.from_config(compose_config([])).trainer


def test_a_stop_is_decided_only_when_some_rank_voted_and_the_run_is_not_at_its_end(section):
    guard = FaultGuard(section, heartbeats=None, rank=0)
    assert guard.stop_vote() == 0.0
    guard.count_votes(0.0)
    assert not guard.stop_decided(3, last_step=10)
    guard.count_votes(1.0)  # another rank received a signal: its vote arrived through the all-reduce
    assert guard.stop_decided(3, last_step=10) and not guard.stop_decided(10, last_step=10)
    line = guard.stopped(3, 10, "saved x/global_step_3").line
    assert line.startswith("stopped by a signal another rank received after step 3 of 10: saved x/global_step_3.")


def test_stop_signals_are_watched_only_inside_the_block(section):
    guard = FaultGuard(dataclasses.replace(section, stop_signals=("SIGUSR1",)), heartbeats=None, rank=0)
    before = signal.getsignal(signal.SIGUSR1)
    with guard.watching():
        signal.raise_signal(signal.SIGUSR1)
        assert guard.stop_vote() == 1.0
        guard.count_votes(1.0)
    assert signal.getsignal(signal.SIGUSR1) is before
    assert guard.stopped(4, 9, "saved").line.startswith("stopped by SIGUSR1 after step 4 of 9")


def test_the_stop_relayed_to_a_rank_during_the_save_is_not_named_as_what_stopped_the_run(section):
    """Rank 1 received the signal; the launcher relays it to every rank once they agreed, so rank 0 receives
    it during the save. Its line still says another rank's signal stopped the run."""
    guard = FaultGuard(dataclasses.replace(section, stop_signals=("SIGUSR1",)), heartbeats=None, rank=0)
    with guard.watching():
        guard.count_votes(guard.stop_vote() + 1.0)  # rank 1's vote
        signal.raise_signal(signal.SIGUSR1)  # the relay, while saving
        line = guard.stopped(5, 12, "saved x/global_step_5").line
    assert line.startswith("stopped by a signal another rank received after step 5 of 12: saved x/global_step_5.")


def test_divergence_stops_at_the_configured_streak(section, tmp_path):
    guard = FaultGuard(
        dataclasses.replace(section, max_consecutive_skipped_steps=3, default_local_dir=str(tmp_path)), None, 0
    )
    guard.check_divergence(TrainerState(step=7, skipped_steps=4, consecutive_skipped_steps=2))
    with pytest.raises(
        TrainingDiverged, match=r"^3 consecutive steps had non-finite gradients \(last: step 8, 5 skipped"
    ):
        guard.check_divergence(TrainerState(step=8, skipped_steps=5, consecutive_skipped_steps=3))


def test_heartbeats_record_where_the_rank_is_and_a_timeout_names_the_silent_rank(section):
    from torch.distributed import HashStore

    store = HashStore()
    guards = [FaultGuard(section, faults.Heartbeats(store, rank, 2), rank) for rank in range(2)]
    for guard in guards:
        guard.at(4, "gathering", beat="starting the step")
    guards[0].at(5, "running the forward and backward passes", beat="starting the step")
    assert guards[0].doing == "running the forward and backward passes"
    failure = guards[0].classify(RuntimeError("[gloo] Timed out waiting 5000ms for recv"), step=5)
    assert isinstance(failure, faults.CollectiveTimeout)
    assert "at step 5 while running the forward and backward passes" in str(failure)
    assert "rank 1 (last seen at step 4, starting the step)" in str(failure)
    assert f"collective_timeout_s={section.collective_timeout_s:g} s" in str(failure)
    assert isinstance(guards[1].classify(RuntimeError("Connection closed by peer"), step=5), faults.PeerLost)
    assert guards[0].classify(ValueError("not a collective"), step=5) is None


def test_a_failed_write_is_classified_by_the_guard_and_anything_else_is_not(section, tmp_path):
    guard = FaultGuard(section, None, 0)
    full = OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "model.pt"))
    failure = guard.classify_save(full, tmp_path / "global_step_6", tmp_path / "global_step_3")
    assert isinstance(failure, faults.CheckpointSaveError)
    assert "No space left on device (ENOSPC)" in str(failure) and f"still {tmp_path}/global_step_3" in str(failure)
    assert guard.classify_save(torch.cuda.OutOfMemoryError("x"), tmp_path, None) is None

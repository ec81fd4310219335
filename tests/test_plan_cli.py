"""btrm.plan_cli: --plan's options, config and model are checked in one line each, before torch is imported."""

import subprocess
import sys
import time

import pytest

from conftest import REPO, closed_loopback_port

HELP = "python -m btrm.plan --help lists the options"


def plan_cli(*argv: str, env_extra=None):
    """(exit status, stderr, imported torch?, seconds) of plan_cli.main in a fresh interpreter."""
    import os

    code = (
        "import sys\nfrom btrm import plan_cli\ntry:\n    code = plan_cli.main(sys.argv[1:])\n"
        "except SystemExit as stop:\n    code = stop.code\n"
        "print(code, 'torch' in sys.modules, 'transformers' in sys.modules)"
    )
    env = {**os.environ, "HF_ENDPOINT": f"http://127.0.0.1:{closed_loopback_port()}", **(env_extra or {})}
    env.pop("HF_HUB_OFFLINE", None)
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-c", code, *argv], cwd=REPO, env=env, capture_output=True, text=True, timeout=60
    )
    seconds = time.monotonic() - started
    code, torch_imported, transformers_imported = done.stdout.split()
    return int(code), done.stderr, torch_imported == "True" or transformers_imported == "True", seconds


@pytest.mark.parametrize(
    ("argv", "line"),
    [
        (["--gpus", "0"], "error: --gpus 0: expected at least 1"),
        (["--gpu-memory", "-5"], "error: --gpu-memory -5: expected a positive number of GiB"),
        (["--gpu-memory", "nan"], "error: --gpu-memory nan: expected a positive number of GiB"),
        (["--margin", "1"], "error: --margin 1: expected a fraction in [0, 1)"),
        (["--margin", "-0.1"], "error: --margin -0.1: expected a fraction in [0, 1)"),
        (["--tokens", "1"], "error: --tokens 1: a micro-batch holds at least one pair (2 tokens)"),
        (["--gpus", "two"], f"error: argument --gpus: invalid int value: 'two'; {HELP}"),
        (["--device", "tpu"], f"error: argument --device: invalid choice: 'tpu' (choose from 'cuda', 'cpu'); {HELP}"),
        (["--gpu"], f"error: ambiguous option: --gpu could match --gpus, --gpu-memory; {HELP}"),
        (["--bogus"], f"error: unrecognized arguments: --bogus; {HELP}"),
        (["data.max_lenght=5"], "error: data.max_lenght=5: unknown key data.max_lenght"),
    ],
)
def test_an_option_is_one_line_before_torch_is_imported(argv, line):
    code, stderr, heavy, seconds = plan_cli(*argv)
    assert code == 2 and stderr.startswith(line) and len(stderr.splitlines()) == 1, stderr
    assert not heavy and seconds < 2  # the fresh interpreter included


def test_an_unreachable_hub_id_is_one_line_in_seconds_before_torch():
    code, stderr, heavy, seconds = plan_cli("model.partial_pretrain=bt-rm-tests/no-such-model")
    assert code == 2 and len(stderr.splitlines()) == 1
    assert stderr.startswith(
        "error: model.partial_pretrain=bt-rm-tests/no-such-model is a Hugging Face hub id, but the hub cannot be reached"
    )
    assert not heavy and seconds < 5  # the probe waits 3 s at most


def test_a_missing_local_model_and_a_batch_the_gpus_do_not_divide_are_refused_before_torch(tmp_path):
    code, stderr, heavy, _ = plan_cli(f"model.partial_pretrain={tmp_path / 'none'}")
    assert code == 2 and "this path does not exist" in stderr and not heavy
    code, stderr, heavy, _ = plan_cli("--gpus", "3", "data.train_batch_size=256", f"model.partial_pretrain={tmp_path}")
    assert code == 2 and "data.train_batch_size" in stderr and len(stderr.splitlines()) == 1 and not heavy


def test_run_bt_rm_plan_refuses_a_bad_option_in_one_line(tmp_path):
    import os

    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "HF_ENDPOINT": f"http://127.0.0.1:{closed_loopback_port()}"}
    for option in (["--gpus", "0"], ["--gpu-memory", "-5"]):
        started = time.monotonic()
        done = subprocess.run(
            ["bash", str(REPO / "run_bt_rm.sh"), "--plan", *option], env=env, capture_output=True, text=True
        )
        assert done.returncode == 2 and time.monotonic() - started < 2
        assert done.stderr.startswith(f"error: {' '.join(option)}: expected") and len(done.stderr.splitlines()) == 1

"""btrm.knobs and run_bt_rm.sh's environment knobs: a value torchrun or bash would reject is one line, before torchrun."""

import os
import re
import subprocess
import time

import pytest

from btrm import knobs
from conftest import REPO, closed_loopback_port

RULE = "bash run_bt_rm.sh --help lists each knob's range"


def run_script(tmp_path, env_extra, *args):
    """run_bt_rm.sh with these knobs; errors.log goes under tmp_path; the hub probe fails at once."""
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "N_GPUS_PER_NODE", "PYTHON")}
    env.update(HF_ENDPOINT=f"http://127.0.0.1:{closed_loopback_port()}", CUDA_VISIBLE_DEVICES="", **env_extra)
    started = time.monotonic()
    result = subprocess.run(
        ["bash", str(REPO / "run_bt_rm.sh"), *args, f"trainer.save_path={tmp_path}", "trainer.experiment_name=run"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    return result, time.monotonic() - started


# (knobs, the one line expected); each is refused before torchrun, whatever torchrun or bash would make of it
BAD_KNOBS = [
    ({"MAX_RESTARTS": "-1"}, "MAX_RESTARTS=-1: expected an integer >= 0"),
    ({"MAX_RESTARTS": "abc"}, "MAX_RESTARTS=abc: expected an integer >= 0"),
    ({"SHUTDOWN_TIMEOUT": "abc"}, "SHUTDOWN_TIMEOUT=abc: expected an integer >= 0 (seconds)"),
    ({"SHUTDOWN_TIMEOUT": "1.5"}, "SHUTDOWN_TIMEOUT=1.5: expected an integer >= 0 (seconds)"),
    ({"N_GPUS_PER_NODE": "0"}, "N_GPUS_PER_NODE=0: expected auto, or an integer >= 1"),
    ({"N_GPUS_PER_NODE": "two"}, "N_GPUS_PER_NODE=two: expected auto, or an integer >= 1"),
    ({"NNODES": "0"}, "NNODES=0: expected an integer >= 1"),
    ({"NNODES": "1:2"}, "NNODES=1:2: expected an integer >= 1"),
    ({"WORLD_SIZE": "x"}, "NNODES=x: expected an integer >= 1"),  # cluster launchers' variable, read as NNODES
    ({"NNODES": "2", "NODE_RANK": "2"}, "NODE_RANK=2: expected an integer from 0 to NNODES - 1"),
    ({"NODE_RANK": "-1"}, "NODE_RANK=-1: expected an integer from 0 to NNODES - 1"),
    ({"MASTER_PORT": "70000"}, "MASTER_PORT=70000: expected an integer from 1 to 65535"),
    ({"MASTER_PORT": "08"}, "MASTER_PORT=08: expected an integer from 1 to 65535"),  # bash: octal
    ({"MASTER_ADDR": "host name"}, "MASTER_ADDR=host name: expected a host name or IP address (no spaces)"),
    ({"OMP_NUM_THREADS": "0"}, "OMP_NUM_THREADS=0: expected an integer >= 1"),
    ({"MAX_RESTARTS": "99999999999999999999"}, "MAX_RESTARTS=99999999999999999999: expected an integer >= 0"),
]


@pytest.mark.parametrize(("env", "message"), BAD_KNOBS, ids=[m.split(":")[0] for _, m in BAD_KNOBS])
def test_a_bad_knob_is_one_line_before_torchrun(tmp_path, env, message):
    result, seconds = run_script(tmp_path, env)
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr == f"error: {message}; set {message.split('=')[0]} to such a value ({RULE})\n"
    assert result.stdout == "" and seconds < 5
    logged = (tmp_path / "run" / "errors.log").read_text().splitlines()
    assert len(logged) == 1 and logged[0].endswith(result.stderr.strip())


def test_plan_mode_checks_the_knobs_too(tmp_path):
    result, seconds = run_script(tmp_path, {"N_GPUS_PER_NODE": "x1"}, "--plan", "--gpus", "2")
    assert result.returncode == 2 and seconds < 5
    assert result.stderr.startswith("error: N_GPUS_PER_NODE=x1: expected auto, or an integer >= 1;")
    assert len(result.stderr.splitlines()) == 1


def test_a_knob_is_never_run_as_bash_arithmetic(tmp_path):
    """bash evaluates `a[$(command)]` in arithmetic: the check must come before any (( MAX_RESTARTS > 0 ))."""
    marker = tmp_path / "ran"
    result, _ = run_script(tmp_path, {"MAX_RESTARTS": f"a[$(touch {marker})]"})
    assert result.returncode == 2 and not marker.exists()
    assert result.stderr.startswith("error: MAX_RESTARTS=a[$(touch ")


def test_a_missing_interpreter_is_one_line(tmp_path):
    result, _ = run_script(tmp_path, {"PYTHON": str(tmp_path / "no-python")})
    assert result.returncode == 2
    assert result.stderr == (
        f"error: PYTHON={tmp_path / 'no-python'}: no such interpreter; expected auto, or a Python interpreter "
        "with requirements.txt installed (bash setup.sh creates .venv)\n"
    )


GOOD_VALUES = {
    "N_GPUS_PER_NODE": "auto",
    "NNODES": "2",
    "NODE_RANK": "1",
    "MASTER_ADDR": "10.0.0.1",
    "MASTER_PORT": "65535",
    "PYTHON": "auto",
    "OMP_NUM_THREADS": "1",
    "MAX_RESTARTS": "0",
    "SHUTDOWN_TIMEOUT": "0",
}


def test_good_values_pass_and_every_declared_knob_has_a_rule():
    values = GOOD_VALUES
    assert knobs.check_values(values) is None
    assert knobs.check_values({**values, "N_GPUS_PER_NODE": "8"}) is None
    declared = {k.name for k in knobs.declared_knobs()}
    keys = knobs.config_keys()
    # the script's KNOB_OVERRIDES read independently: each config knob and its key
    assert keys["TRAIN_BATCH_SIZE"] == "data.train_batch_size" and keys["MICRO_BATCH_SIZE"] == (
        "data.micro_batch_size_per_gpu"
    )
    assert declared == set(keys) | set(knobs.LAUNCH_RULES), declared ^ (set(keys) | set(knobs.LAUNCH_RULES))


def test_an_unruled_knob_is_said(tmp_path):
    script = tmp_path / "run_bt_rm.sh"
    script.write_text((REPO / "run_bt_rm.sh").read_text().replace("LR=${LR", "NEW_KNOB=${NEW_KNOB:-1}  # new\nLR=${LR"))
    assert "NEW_KNOB: run_bt_rm.sh declares this knob but btrm.knobs has no rule" in knobs.check_values(
        GOOD_VALUES, script
    )


def test_help_states_each_knobs_allowed_values():
    started = time.monotonic()
    text = subprocess.run(
        ["bash", str(REPO / "run_bt_rm.sh"), "--help"], capture_output=True, text=True, check=True
    ).stdout
    assert time.monotonic() - started < 5
    lines = text.splitlines()
    for knob in knobs.declared_knobs():
        at = next(i for i, line in enumerate(lines) if line.startswith(f"  {knob.name} "))
        assert lines[at + 1].strip().startswith("allowed: "), knob.name
    allowed = {
        k.name: lines[i + 1].split("allowed: ", 1)[1]
        for k in knobs.declared_knobs()
        for i, line in enumerate(lines)
        if line.startswith(f"  {k.name} ")
    }
    assert allowed["MAX_RESTARTS"] == "an integer >= 0"
    assert allowed["MASTER_PORT"] == "an integer from 1 to 65535"
    assert allowed["N_GPUS_PER_NODE"] == "auto, or an integer >= 1"
    assert allowed["TRAIN_BATCH_SIZE"] == "an integer >= 1 (as data.train_batch_size)"
    assert re.search(r"\(as optim\.lr\)$", allowed["LR"])


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"EXPERIMENT_NAME": "a,b"}, "EXPERIMENT_NAME=a,b: Hydra reads trainer.experiment_name=a,b as a sweep"),
        ({"TRAIN_FILE": "a=b.parquet"}, "TRAIN_FILE=a=b.parquet: Hydra cannot read data.train_files=a=b.parquet ("),
    ],
)
def test_a_config_knob_hydra_would_misread_names_the_knob(tmp_path, env, message):
    result, seconds = run_script(tmp_path, env)
    assert result.returncode == 2 and seconds < 5 and len(result.stderr.splitlines()) == 1
    assert result.stderr.startswith(f"error: {message}") and "quote the value for Hydra" in result.stderr


def test_the_quoting_the_error_suggests_gives_the_value_back():
    """Hydra's own parser (not the code under test) reads the suggested quoted value as the original string."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    for value in ("a,b", "a=b", "it's", "x[1]"):
        problem = knobs.hydra_reading("trainer.experiment_name", value)
        suggested = re.search(r'e\.g\. "(.*)"', problem).group(1)
        parsed = OverridesParser.create().parse_overrides([f"trainer.experiment_name={suggested}"])[0]
        assert parsed.value() == value and not parsed.is_sweep_override()
    assert knobs.hydra_reading("data.train_files", "[a.parquet,b.parquet]") is None  # a list is a list

"""btrm.launcher and run_bt_rm.sh: each mistake is one line, printed once, before or after the ranks start.

Each mistake of issue 13 goes through the launcher's entry point in this process (no rank
starts: `launch` is replaced by a failure). Three real launches check what the console shows: a
mistake the launcher finds, one the ranks find, and one a plain torchrun launch (no launcher) finds.
"""

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from btrm import handover, launcher
from btrm.schema import PreflightError
from conftest import REPO, closed_loopback_port, free_port, trainer_env

LAUNCHER = ["--nnodes=1", "--nproc_per_node=2", "bt_trainer.py"]


def error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("error: ")]


@pytest.fixture()
def data_files(tmp_path):
    """Two small valid data files (JSON lines, messages format)."""
    import json

    def pair(i):
        prompt = [{"role": "user", "content": f"question {i}"}]
        return {
            "chosen": json.dumps(prompt + [{"role": "assistant", "content": "good"}]),
            "rejected": json.dumps(prompt + [{"role": "assistant", "content": "bad"}]),
        }

    for name in ("train.jsonl", "test.jsonl"):
        (tmp_path / name).write_text("".join(json.dumps(pair(i)) + "\n" for i in range(4)))
    return tmp_path / "train.jsonl", tmp_path / "test.jsonl"


# ---- each mistake of the issue through the launcher's entry point: one line, exit status 2, no rank started


@pytest.fixture()
def launch_error(tmp_path, data_files, monkeypatch, capsys):
    """launcher.main() with valid data, a valid stand-in model directory, and ranks that must not start."""
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    monkeypatch.chdir(REPO)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{closed_loopback_port()}")
    monkeypatch.setattr(launcher, "launch", lambda argv: pytest.fail("the ranks were started"))
    knobs = [
        f"model.partial_pretrain={model}",
        f"data.train_files={data_files[0]}",
        f"data.val_files={data_files[1]}",
        f"trainer.save_path={tmp_path / 'ckpt'}",
        "trainer.experiment_name=run",
        "data.train_batch_size=8",
    ]

    def run(*overrides: str) -> str:
        capsys.readouterr()
        started = time.monotonic()
        assert launcher.main(LAUNCHER + knobs + list(overrides)) == launcher.EXIT_REPORTED
        assert time.monotonic() - started < 5
        output = capsys.readouterr()
        assert output.out == "" and len(output.err.splitlines()) == 1, output
        return output.err.strip()

    return run


def test_each_mistake_of_the_issue_gives_one_line(launch_error, tmp_path, data_files):
    assert launch_error("model.partial_pretrain=/no/such/dir") == (
        "error: model.partial_pretrain=/no/such/dir: this path does not exist; "
        "pass an existing model directory (with config.json) or a hub id such as Qwen/Qwen3-32B"
    )
    assert "model.partial_pretrain=demo/tiny-qwen4: this path does not exist" in launch_error(
        "model.partial_pretrain=demo/tiny-qwen4"
    )
    missing = tmp_path / "no-such.parquet"
    assert launch_error(f"data.train_files={missing}").startswith(
        f"error: data.train_files: {missing}: no such file; pass existing files"
    )
    assert launch_error(f"data.train_files={tmp_path}").startswith(
        f"error: data.train_files: {tmp_path} is a directory; pass the data files themselves"
    )
    assert launch_error("optim.lrr=1e-6").startswith("error: optim.lrr=1e-6: unknown key optim.lrr")
    assert launch_error("+optim.lrr=1e-6").startswith("error: +optim.lrr=1e-6: unknown key optim.lrr")
    assert (
        launch_error("data.micro_batch_size_per_gpu=0")
        == "error: data.micro_batch_size_per_gpu=0: expected an integer >= 1, or null"
    )
    assert launch_error("data.max_length=0") == "error: data.max_length=0: expected an integer >= 2"
    assert (
        launch_error("data.max_tokens_per_micro_batch=0")
        == "error: data.max_tokens_per_micro_batch=0: expected an integer >= 2, or null or auto"
    )
    assert launch_error("trainer.total_epochs=0") == "error: trainer.total_epochs=0: expected an integer >= 1"
    assert "is a Hugging Face hub id, but the hub cannot be reached" in launch_error(
        "model.partial_pretrain=bt-rm-tests/no-such-model"
    )
    logged = (tmp_path / "ckpt" / "run" / "errors.log").read_text().splitlines()
    assert len(logged) == 11 and all(re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d error: ", line) for line in logged)


def test_the_launcher_checks_a_config_without_importing_torch():
    """The check before any rank starts stays light (well under a second): torch, verl and transformers are the ranks' imports."""
    code = (
        "import sys; from btrm import launcher, schema; "
        "schema.check_config(schema.compose_config(['loss.type=margin', 'loss.margin_by_strength={1:1,2:2,3:3}']), world_size=2); "
        "print(sorted({name.split('.')[0] for name in sys.modules} & {'torch', 'verl', 'transformers'}))"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_debug_switch_shows_the_traceback(launch_error, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("BT_DEBUG", "1")
    capsys.readouterr()
    assert launcher.main(LAUNCHER + [f"trainer.save_path={tmp_path}", "data.max_length=0"]) == launcher.EXIT_REPORTED
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and err.rstrip().endswith(
        "error: data.max_length=0: expected an integer >= 2"
    )


# ---- run_bt_rm.sh


@pytest.fixture()
def script_copy(tmp_path):
    """run_bt_rm.sh in a directory whose .venv/bin/python records its arguments."""
    (tmp_path / "run_bt_rm.sh").write_text((REPO / "run_bt_rm.sh").read_text())
    recorder = tmp_path / ".venv" / "bin" / "python"
    recorder.parent.mkdir(parents=True)
    recorder.write_text(f"#!/bin/sh\nprintf '%s\\n' \"$@\" > {tmp_path}/argv\n")
    recorder.chmod(0o755)
    return tmp_path


def test_script_uses_the_venv_and_defaults_to_the_visible_gpus(script_copy):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHON", "N_GPUS_PER_NODE", "WORLD_SIZE", "RANK")}
    result = subprocess.run(
        ["bash", str(script_copy / "run_bt_rm.sh")],
        env={**env, "CUDA_VISIBLE_DEVICES": ""},
        capture_output=True,
        text=True,
        check=True,
    )
    argv = (script_copy / "argv").read_text().splitlines()
    assert argv[:2] == ["-m", "btrm.launcher"] and "--nproc_per_node=2" in argv
    assert result.stderr.splitlines() == [
        "run_bt_rm.sh: no GPU visible: training on 2 CPU processes (gloo); set N_GPUS_PER_NODE to change"
    ]
    result = subprocess.run(
        ["bash", str(script_copy / "run_bt_rm.sh")],
        env={**env, "CUDA_VISIBLE_DEVICES": "0,1,3"},
        capture_output=True,
        text=True,
        check=True,
    )
    assert "--nproc_per_node=3" in (script_copy / "argv").read_text().splitlines() and result.stderr == ""


def test_script_plan_mode_runs_the_planner_with_the_knobs_and_the_gpus(script_copy):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHON", "N_GPUS_PER_NODE", "WORLD_SIZE", "RANK")}
    subprocess.run(
        ["bash", str(script_copy / "run_bt_rm.sh"), "--plan", "--gpu-memory", "141", "model.lora_rank=8"],
        env={**env, "CUDA_VISIBLE_DEVICES": "0,1", "NNODES": "2", "MODEL_PATH": "some/model"},
        check=True,
    )
    argv = (script_copy / "argv").read_text().splitlines()
    assert argv[:3] == ["-m", "btrm.plan_cli", "--gpus=4"]  # 2 nodes x 2 visible GPUs
    assert "model.partial_pretrain=some/model" in argv and argv[-3:] == ["--gpu-memory", "141", "model.lora_rank=8"]
    subprocess.run(["bash", str(script_copy / "run_bt_rm.sh"), "--plan"], env={**env, "CUDA_VISIBLE_DEVICES": ""})
    argv = (script_copy / "argv").read_text().splitlines()
    assert argv[:2] == ["-m", "btrm.plan_cli"] and not any(
        a.startswith("--gpus") for a in argv
    )  # the planner's default


@pytest.fixture
def gpu_launch(monkeypatch):
    """The launcher's GPU branch on this CPU machine: device files, CUDA and the planner stood in for."""
    from btrm import plan
    from btrm.batching import TokenBudget

    monkeypatch.setattr(launcher, "gpu_device_files_exist", lambda: True)
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)
    monkeypatch.delenv(handover.PLANNED_BUDGET_ENV, raising=False)
    calls = []

    def auto_token_budget(config, world_size):
        calls.append(("auto", world_size))
        if config.model.lora_rank == 0 and config.data.max_length > 100_000:
            raise PreflightError("data.max_tokens_per_micro_batch=auto: the memory plan fits no tokens")
        return TokenBudget(12288, "auto: the memory plan's")

    monkeypatch.setattr(plan, "auto_token_budget", auto_token_budget)
    monkeypatch.setattr(plan, "largest_fitting_budget", lambda config, gpus, device: 12288)
    return calls


def test_gpu_launch_plans_an_auto_budget_once_and_hands_it_to_the_ranks(gpu_launch, capsys):
    from btrm.schema import compose_config

    launcher.check_gpu_memory(compose_config([]), world_size=8)
    assert gpu_launch == [("auto", 8)]
    assert handover.planned_budget_from_environment() == (12288, "auto: the memory plan's")
    assert "auto -> 12,288" in capsys.readouterr().out
    with pytest.raises(PreflightError, match="fits no tokens"):
        launcher.check_gpu_memory(compose_config(["data.max_length=200000"]), world_size=8)


def test_gpu_launch_warns_of_an_explicit_budget_over_what_fits(gpu_launch, capsys):
    from btrm.schema import compose_config

    launcher.check_gpu_memory(compose_config(["data.max_tokens_per_micro_batch=8192"]), world_size=8)
    assert capsys.readouterr().out == "" and gpu_launch == []
    launcher.check_gpu_memory(compose_config(["data.max_tokens_per_micro_batch=65536"]), world_size=8)
    assert "fits 12,288 tokens per micro-batch on these GPUs, less than data.max_tokens_per_micro_batch=65,536" in (
        capsys.readouterr().out
    )
    assert handover.planned_budget_from_environment() is None  # nothing to hand over: the user's budget stands


def test_cpu_launch_plans_nothing(gpu_launch):
    from btrm.schema import compose_config

    launcher.check_gpu_memory(compose_config(["trainer.device=cpu"]), world_size=2)
    assert gpu_launch == [] and handover.planned_budget_from_environment() is None


def test_script_help_lists_every_knob_with_its_default():
    help_text = subprocess.run(
        ["bash", str(REPO / "run_bt_rm.sh"), "--help"], capture_output=True, text=True, check=True
    ).stdout
    assert "set -euo" not in help_text
    knobs = re.findall(r"^([A-Z_]+)=\$\{[A-Z_]+:-(.*?)\}\s+#", (REPO / "run_bt_rm.sh").read_text(), flags=re.M)
    assert len(knobs) >= 15
    for knob, default in knobs:
        line = next((line for line in help_text.splitlines() if line.startswith(f"  {knob} ")), None)
        assert line is not None, knob
        assert (default if "$" not in default else default.split(":-")[1].rstrip("}")) in line, line


# ---- real launches: the console shows the one line once, not once per rank


def launch(tmp_path, model_dir, data_dir, *overrides, env_extra=None, command=None):
    env = {**trainer_env(tmp_path, model_dir, data_dir, 2, "mistake"), **(env_extra or {})}
    started = time.monotonic()
    result = subprocess.run(
        command or ["bash", str(REPO / "run_bt_rm.sh"), "trainer.device=cpu", *overrides],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=240,
    )
    return result, time.monotonic() - started


def test_launch_with_a_missing_model_stops_before_any_rank(tmp_path, demo_data_dir):
    result, seconds = launch(tmp_path, Path("/no/such/dir"), demo_data_dir)
    assert result.returncode == launcher.EXIT_REPORTED and seconds < 10
    assert result.stdout == "" and error_lines(result.stderr) == [
        "error: model.partial_pretrain=/no/such/dir: this path does not exist; "
        "pass an existing model directory (with config.json) or a hub id such as Qwen/Qwen3-32B"
    ]
    assert len(result.stderr.splitlines()) == 1


def test_error_found_by_the_ranks_is_one_line_in_console_and_logs(tmp_path, tiny_model_dir, demo_data_dir):
    """Over-long pairs with data.truncation=error: found while tokenizing, on every rank, before any model is built."""
    result, seconds = launch(tmp_path, tiny_model_dir, demo_data_dir, "data.max_length=16", "data.truncation=error")
    output = result.stdout + result.stderr
    assert result.returncode == launcher.EXIT_REPORTED, output[-3000:]
    lines = error_lines(result.stderr)
    assert len(lines) == 1 and "data.max_length is 16" in lines[0], output[-3000:]
    assert "Traceback" not in output and "ChildFailedError" not in output and "elastic" not in output
    root = tmp_path / "ckpt" / "mistake"
    assert (root / "errors.log").read_text().count(lines[0]) == 1
    assert any(lines[0] in log.read_text() for log in root.glob("hydra/*/bt_trainer.log"))
    assert not list(root.glob("global_step_*"))


def test_plain_torchrun_launch_refuses_a_plus_key_once(tmp_path, tiny_model_dir, demo_data_dir):
    """Without the launcher, each rank checks the composed config; rank 0 alone says so."""
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        f"--master_port={free_port()}",
        str(REPO / "bt_trainer.py"),
        f"model.partial_pretrain={tiny_model_dir}",
        f"data.train_files={demo_data_dir / 'train.parquet'}",
        f"data.val_files={demo_data_dir / 'test.parquet'}",
        f"trainer.save_path={tmp_path / 'ckpt'}",
        "trainer.device=cpu",
        "+optim.lrr=1e-6",
    ]
    result, _ = launch(tmp_path, tiny_model_dir, demo_data_dir, command=command)
    assert result.returncode != 0
    assert error_lines(result.stdout + result.stderr) == [
        "error: optim.lrr=1e-06: unknown key optim.lrr, trainer.yaml has no such knob; did you mean optim.lr? "
        "(trainer.yaml is the whole config: `+` cannot add keys; see its comments for every knob)"
    ]


def test_a_python_without_the_requirements_is_one_line(monkeypatch, capsys):
    def compose_without_hydra(overrides):
        raise ModuleNotFoundError("No module named 'hydra'", name="hydra")

    monkeypatch.setattr(launcher, "compose_config", compose_without_hydra)
    assert launcher.main(LAUNCHER) == launcher.EXIT_REPORTED
    assert capsys.readouterr().err == (
        f"error: {sys.executable} cannot import hydra (a requirement of this project); run `bash setup.sh` "
        "to create .venv (run_bt_rm.sh then uses it), or set PYTHON to an interpreter with requirements.txt installed\n"
    )


def test_launcher_reports_a_rank_failure_once(tmp_path, monkeypatch, capsys):
    """Rank 0 has printed its line: nothing more. Only another rank reported: its line, from its error file. A crash: torchrun's report."""
    import json

    import torch.distributed.run as torchrun
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

    def failure(rank, exitcode, message=None):
        error_file = tmp_path / f"error_{rank}.json"
        if message:
            error_file.write_text(json.dumps({"message": message, "timestamp": 0}))
        return ProcessFailure(local_rank=rank, pid=1000 + rank, exitcode=exitcode, error_file=str(error_file))

    def failing_with(failures):
        def run(args):
            raise ChildFailedError("bt_trainer.py", failures)

        return run

    line = "error: data.max_length is 16"
    monkeypatch.setattr(torchrun, "run", failing_with({0: failure(0, 2, line), 1: failure(1, -15, line)}))
    assert launcher.launch(LAUNCHER) == launcher.EXIT_REPORTED and capsys.readouterr().err == ""
    monkeypatch.setattr(torchrun, "run", failing_with({1: failure(1, 2, line), 0: failure(0, -15)}))
    assert launcher.launch(LAUNCHER) == launcher.EXIT_REPORTED and capsys.readouterr().err == line + "\n"
    monkeypatch.setattr(torchrun, "run", failing_with({0: failure(0, 1), 1: failure(1, 2, line)}))
    with pytest.raises(ChildFailedError):
        launcher.launch(LAUNCHER)


# ---- torchrun parsers of other torch versions (torch 2.11's has no --shutdown-timeout)


def torchrun_parser_without(*options: str):
    """torch's torchrun parser less `options`, as an older torch builds it: the option is refused on the command
    line, and its namespace attribute keeps the default (torch 2.13's run() still reads it)."""
    import torch.distributed.run as torchrun

    real = torchrun.get_args_parser

    def get_args_parser():
        parser = real()
        for option in options:
            action = parser._option_string_actions[option]
            parser._remove_action(action)
            for name in action.option_strings:
                del parser._option_string_actions[name]
            for group in parser._action_groups:
                if action in group._group_actions:
                    group._group_actions.remove(action)
            parser.set_defaults(**{action.dest: action.default})
        return parser

    return get_args_parser


def test_launch_with_a_torchrun_that_lacks_shutdown_timeout_starts_the_ranks(tmp_path, monkeypatch, capsys):
    import torch.distributed.run as torchrun

    monkeypatch.setattr(torchrun, "get_args_parser", torchrun_parser_without("--shutdown-timeout"))
    with pytest.raises(SystemExit):  # the stand-in refuses the option, as torch 2.11's torchrun does
        torchrun.parse_args(["--shutdown-timeout=900", "x.py"])
    capsys.readouterr()
    script = tmp_path / "worker.py"
    script.write_text("import os, sys\nopen(os.path.join(sys.argv[1], 'rank' + os.environ['RANK']), 'w').close()\n")
    argv = ["--nnodes=1", "--nproc_per_node=2", f"--master_port={free_port()}", "--shutdown-timeout=900"]
    assert launcher.launch([*argv, str(script), str(tmp_path)]) == 0
    assert sorted(p.name for p in tmp_path.glob("rank*")) == ["rank0", "rank1"]
    notes = [line for line in capsys.readouterr().err.splitlines() if line.startswith("note: ")]
    assert len(notes) == 1 and "no --shutdown-timeout" in notes[0], notes
    assert "grace period, 30 s, to save, not 900 s" in notes[0]  # torch 2.11's PContext.close(timeout=30)


def test_torchrun_arguments_are_kept_where_torchrun_has_them(capsys):
    from torch.distributed.run import get_args_parser

    argv = ["--nnodes=1", "--shutdown-timeout=900", "--signals-to-handle=SIGTERM", "bt_trainer.py", "a=1"]
    assert launcher.fitted_to_torchrun(get_args_parser(), argv) == argv
    older = torchrun_parser_without("--shutdown-timeout", "--signals-to-handle")()
    spaced = ["--nnodes=1", "--shutdown-timeout", "900", "--signals-to-handle=SIGTERM", "bt_trainer.py", "a=1"]
    assert launcher.fitted_to_torchrun(older, spaced) == ["--nnodes=1", "bt_trainer.py", "a=1"]
    assert len(capsys.readouterr().err.splitlines()) == 2
    # the script's own arguments are never touched, even when they look like torchrun's
    script_args = ["--nnodes=1", "bt_trainer.py", "--shutdown-timeout=5"]
    assert launcher.fitted_to_torchrun(older, script_args) == script_args

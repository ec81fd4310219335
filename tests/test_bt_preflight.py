"""schema.py: the strict config, the data and model checks, one line per error, the launcher.

Each mistake of issue 13 goes through the launcher's entry point in this process (no rank
starts: `launch` is replaced by a failure). Three real launches check what the console shows: a
mistake the launcher finds, one the ranks find, and one a plain torchrun launch (no launcher) finds.
"""

import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from btrm import launcher, preflight, rows, schema
from btrm.schema import PreflightError, check_config, compose_config
from conftest import REPO, free_port, trainer_env

LAUNCHER = ["--nnodes=1", "--nproc_per_node=2", "bt_trainer.py"]


def error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("error: ")]


# ---- the rule table is trainer.yaml's


def test_every_knob_in_trainer_yaml_has_a_rule_and_every_rule_a_knob():
    assert sorted(schema.trainer_yaml_knobs()) == sorted(schema.KNOB_RULES)


def test_trainer_yaml_defaults_pass_their_rules():
    values = check_config(compose_config([]), world_size=8)
    assert values["optim.lr"] == 5e-7 and values["trainer.default_local_dir"] == "checkpoints/qwen3-32b-helpsteer2"


def test_mirrored_enums_equal_their_sources():
    import bt_loss

    assert schema.LOSS_TYPES == bt_loss.LOSS_TYPES
    assert schema.KNOB_RULES["data.format"].expected == "one of " + " | ".join(rows.PAIR_FORMATS)


# ---- strict config: values


@pytest.mark.parametrize("override, message", [
    ("data.micro_batch_size_per_gpu=0", "data.micro_batch_size_per_gpu=0: expected an integer >= 1"),
    ("data.max_length=0", "data.max_length=0: expected an integer >= 2"),
    ("data.max_tokens_per_micro_batch=0", "data.max_tokens_per_micro_batch=0: expected an integer >= 2, or null"),
    ("trainer.total_epochs=0", "trainer.total_epochs=0: expected an integer >= 1"),
    ("optim.lr=0", "optim.lr=0: expected a number > 0"),
    ("optim.lr=fast", "optim.lr=fast: expected a number > 0"),
    ("optim.warmup_steps_ratio=1.5", "optim.warmup_steps_ratio=1.5: expected a number >= 0 and <= 1"),
    ("optim.betas=[0.9]", "optim.betas=[0.9]: expected [beta1, beta2], two numbers >= 0 and < 1"),
    ("data.truncation=middle", "data.truncation=middle: expected one of left | right | error"),
    ("optim.lr_scheduler=linear", "optim.lr_scheduler=linear: expected one of cosine | wsd | constant"),
    ("loss.type=hinge", "loss.type=hinge: expected one of bt | scaled_bt | margin"),
    ("model.mixed_precision=fp8", "model.mixed_precision=fp8: expected one of auto | bf16 | fp32"),
    ("trainer.device=tpu", "trainer.device=tpu: expected one of auto | cuda | cpu"),
    ("trainer.resume_mode=always", "trainer.resume_mode=always: expected one of auto | resume_path | disable"),
    ("trainer.logger=console", "trainer.logger=console: expected a list of console | file | tensorboard"),
    ("trainer.logger=[console,tensorbord]", "trainer.logger=[console,tensorbord]: expected a list of console"),
    ("data.max_samples=0", "data.max_samples=0: expected an integer >= 1, or -1"),
    ("trainer.test_freq=0", "trainer.test_freq=0: expected an integer >= 1, or -1"),
    ("model.lora_rank=-1", "model.lora_rank=-1: expected an integer >= 0"),
    ("model.lora_alpha=0", "model.lora_alpha=0: expected a number > 0"),
    ("model.target_modules=[q_proj,score]", "model.target_modules=[q_proj,score]: expected all-linear, or a non-empty [list] of module names (not the score head)"),
    ("model.lora_base_dtype=fp16", "model.lora_base_dtype=fp16: expected one of fp32 | bf16"),
    ("data.drop_identical_pairs=maybe", "data.drop_identical_pairs=maybe: expected true or false"),
])
def test_each_knob_is_checked_naming_key_value_and_allowed_values(override, message):
    with pytest.raises(PreflightError) as refused:
        check_config(compose_config([override]))
    assert str(refused.value).startswith(message)


def test_free_form_mappings_take_their_own_keys():
    config = compose_config(["+data.apply_chat_template_kwargs.enable_thinking=false", "optim.override_optimizer_config={eps:1e-6}",
                             "loss.type=margin", "loss.margin_by_strength={1:0.5,2:1,3:2}"])
    values = check_config(config)
    assert values["data.apply_chat_template_kwargs"] == {"enable_thinking": False}
    assert values["optim.override_optimizer_config"] == {"eps": 1e-6}


def test_batch_sizes_must_divide_over_the_ranks():
    with pytest.raises(PreflightError, match=r"data.train_batch_size=256 is not divisible by the 3 ranks"):
        check_config(compose_config([]), world_size=3)
    with pytest.raises(PreflightError, match=r"data.micro_batch_size_per_gpu=3 does not divide the 128 pairs per rank"):
        check_config(compose_config(["data.micro_batch_size_per_gpu=3", "data.max_tokens_per_micro_batch=null"]), world_size=2)
    check_config(compose_config(["data.micro_batch_size_per_gpu=3"]), world_size=2)  # token budget: no fixed micro-batch


def test_lora_runs_on_fsdp2_only():
    with pytest.raises(PreflightError, match=r"^model.lora_rank=8 with model.strategy=fsdp: LoRA runs on FSDP2 only; use model.strategy=fsdp2"):
        check_config(compose_config(["model.lora_rank=8", "model.strategy=fsdp"]))
    assert check_config(compose_config(["model.lora_rank=8", "model.target_modules=[q_proj,v_proj]"]))["model.lora_rank"] == 8


def test_resume_path_mode_needs_a_path():
    with pytest.raises(PreflightError, match="trainer.resume_mode=resume_path needs trainer.resume_from_path"):
        check_config(compose_config(["trainer.resume_mode=resume_path"]))


# ---- strict config: keys


@pytest.mark.parametrize("override", ["optim.lrr=1e-6", "+optim.lrr=1e-6", "++optim.lrr=1e-6"])
def test_unknown_keys_are_refused_also_when_added_with_plus(override):
    with pytest.raises(PreflightError) as refused:
        compose_config([override])
    assert str(refused.value).startswith(f"{override}: unknown key optim.lrr, trainer.yaml has no such knob; did you mean optim.lr?")


def test_unknown_keys_that_reach_a_rank_are_refused_there_too():
    """bt_trainer.run() sees the composed config only (a plain torchrun launch): `+` keys are found by comparing key sets."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(REPO), version_base=None):
        config = compose(config_name="trainer", overrides=["+optim.lrr=1e-6", "+extra.section=1"])
    with pytest.raises(PreflightError, match=r"^optim.lrr=1e-06: unknown key optim.lrr, trainer.yaml has no such knob; did you mean optim.lr\?"):
        check_config(config)
    with initialize_config_dir(config_dir=str(REPO), version_base=None):
        config = compose(config_name="trainer", overrides=["~data.chosen_key"])
    with pytest.raises(PreflightError, match="data.chosen_key is missing from the config"):
        check_config(config)


def test_deleting_a_knob_is_refused():
    with pytest.raises(PreflightError, match=r"^~data.chosen_key: trainer.yaml's knobs cannot be deleted"):
        compose_config(["~data.chosen_key"])


# ---- data and model


@pytest.fixture()
def data_files(tmp_path):
    """Two small valid data files (JSON lines, messages format)."""
    import json

    def pair(i):
        prompt = [{"role": "user", "content": f"question {i}"}]
        return {"chosen": json.dumps(prompt + [{"role": "assistant", "content": "good"}]),
                "rejected": json.dumps(prompt + [{"role": "assistant", "content": "bad"}])}

    for name in ("train.jsonl", "test.jsonl"):
        (tmp_path / name).write_text("".join(json.dumps(pair(i)) + "\n" for i in range(4)))
    return tmp_path / "train.jsonl", tmp_path / "test.jsonl"


def closed_loopback_port() -> int:
    """A loopback port nothing listens on: connecting is refused at once."""
    return free_port()


def test_model_path_checks(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    with pytest.raises(PreflightError, match=r"^model.partial_pretrain=/no/such/dir: this path does not exist;"):
        preflight.check_model("/no/such/dir")
    # a mistyped relative path whose first part is a local directory is a path, not a hub id
    with pytest.raises(PreflightError, match=rf"^model.partial_pretrain=demo/tiny-qwen4: this path does not exist \(relative paths are read from {REPO}\)"):
        preflight.check_model("demo/tiny-qwen4")
    with pytest.raises(PreflightError, match="this path does not exist"):
        preflight.check_model("./models/qwen")
    (tmp_path / "empty").mkdir()
    with pytest.raises(PreflightError, match="the directory has no config.json"):
        preflight.check_model(str(tmp_path / "empty"))
    (tmp_path / "empty" / "config.json").write_text("{}")
    assert preflight.check_model(str(tmp_path / "empty")).startswith("local directory")


def test_unreachable_hub_is_one_line_within_seconds(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    port = closed_loopback_port()
    environ = {"HF_ENDPOINT": f"http://127.0.0.1:{port}"}
    started = time.monotonic()
    with pytest.raises(PreflightError) as refused:
        preflight.check_model("bt-rm-tests/no-such-model", environ)
    assert time.monotonic() - started < preflight.HUB_PROBE_TIMEOUT_S + 1
    assert str(refused.value).startswith(f"model.partial_pretrain=bt-rm-tests/no-such-model is a Hugging Face hub id, but the hub "
                                         f"cannot be reached (127.0.0.1:{port}: Connection refused); download it where the hub is "
                                         "reachable and pass its local directory (MODEL_PATH=/path/to/model)")
    # behind a proxy the client connects to the proxy: that is what is probed
    with pytest.raises(PreflightError, match=r"the proxy in HTTPS_PROXY: Connection refused"):
        preflight.check_model("bt-rm-tests/no-such-model", {"HTTPS_PROXY": f"http://127.0.0.1:{port}"})


def test_hub_probe_gives_up_after_its_timeout_even_when_name_lookup_hangs(monkeypatch):
    import threading

    release = threading.Event()

    def never_answers(*args, **kwargs):  # a name lookup that hangs until the test ends
        release.wait(30)
        raise OSError("released")

    monkeypatch.setattr(socket, "create_connection", never_answers)
    monkeypatch.setattr(preflight, "HUB_PROBE_TIMEOUT_S", 0.5)
    started = time.monotonic()
    try:
        with pytest.raises(PreflightError, match=r"the hub cannot be reached \(huggingface.co:443: no answer within 0.5 s\)"):
            preflight.check_model("bt-rm-tests/no-such-model", {})
    finally:
        release.set()
    assert time.monotonic() - started < 2


def test_reachable_hub_and_offline_cache(monkeypatch):
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        endpoint = f"http://127.0.0.1:{listener.getsockname()[1]}"
        assert preflight.check_model("bt-rm-tests/no-such-model", {"HF_ENDPOINT": endpoint}) == "hub id bt-rm-tests/no-such-model"
    with pytest.raises(PreflightError, match=r"not in the local Hugging Face cache, and HF_HUB_OFFLINE=1 forbids downloading it"):
        preflight.check_model("bt-rm-tests/no-such-model", {"HF_HUB_OFFLINE": "1"})
    monkeypatch.setattr(preflight, "cached_model_config", lambda repo_id: "/cache/config.json")
    assert "from the local cache" in preflight.check_model("bt-rm-tests/cached-model", {"HF_HUB_OFFLINE": "1"})
    with pytest.raises(PreflightError, match="it is in the local cache: rerun with HF_HUB_OFFLINE=1 to use that copy"):
        preflight.check_model("bt-rm-tests/cached-model", {"HF_ENDPOINT": f"http://127.0.0.1:{closed_loopback_port()}"})


# ---- each mistake of the issue through the launcher's entry point: one line, exit status 2, no rank started


@pytest.fixture()
def launch_error(tmp_path, data_files, monkeypatch, capsys):
    """main() of bt_preflight with valid data, a valid stand-in model directory, and ranks that must not start."""
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    monkeypatch.chdir(REPO)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{closed_loopback_port()}")
    monkeypatch.setattr(launcher, "launch", lambda argv: pytest.fail("the ranks were started"))
    knobs = [f"model.partial_pretrain={model}", f"data.train_files={data_files[0]}", f"data.val_files={data_files[1]}",
             f"trainer.save_path={tmp_path / 'ckpt'}", "trainer.experiment_name=run", "data.train_batch_size=8"]

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
        "pass an existing model directory (with config.json) or a hub id such as Qwen/Qwen3-32B")
    assert "model.partial_pretrain=demo/tiny-qwen4: this path does not exist" in launch_error("model.partial_pretrain=demo/tiny-qwen4")
    missing = tmp_path / "no-such.parquet"
    assert launch_error(f"data.train_files={missing}").startswith(f"error: data.train_files: {missing}: no such file; pass existing files")
    assert launch_error(f"data.train_files={tmp_path}").startswith(f"error: data.train_files: {tmp_path} is a directory; pass the data files themselves")
    assert launch_error("optim.lrr=1e-6").startswith("error: optim.lrr=1e-6: unknown key optim.lrr")
    assert launch_error("+optim.lrr=1e-6").startswith("error: +optim.lrr=1e-6: unknown key optim.lrr")
    assert launch_error("data.micro_batch_size_per_gpu=0") == "error: data.micro_batch_size_per_gpu=0: expected an integer >= 1"
    assert launch_error("data.max_length=0") == "error: data.max_length=0: expected an integer >= 2"
    assert launch_error("data.max_tokens_per_micro_batch=0") == "error: data.max_tokens_per_micro_batch=0: expected an integer >= 2, or null"
    assert launch_error("trainer.total_epochs=0") == "error: trainer.total_epochs=0: expected an integer >= 1"
    assert "is a Hugging Face hub id, but the hub cannot be reached" in launch_error("model.partial_pretrain=bt-rm-tests/no-such-model")
    logged = (tmp_path / "ckpt" / "run" / "errors.log").read_text().splitlines()
    assert len(logged) == 11 and all(re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d error: ", line) for line in logged)


def test_debug_switch_shows_the_traceback(launch_error, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("BT_DEBUG", "1")
    capsys.readouterr()
    assert launcher.main(LAUNCHER + [f"trainer.save_path={tmp_path}", "data.max_length=0"]) == launcher.EXIT_REPORTED
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and err.rstrip().endswith("error: data.max_length=0: expected an integer >= 2")


def test_error_line_says_where_a_foreign_error_came_from():
    assert launcher.error_line(PreflightError("x=1: expected\n  more")) == "error: x=1: expected more"
    try:
        import json

        json.loads("{")
    except ValueError as error:
        line = launcher.error_line(error)
    assert line.startswith("error: Expecting property name") and "(JSONDecodeError in decoder.py:" in line and "BT_DEBUG=1" in line


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
    result = subprocess.run(["bash", str(script_copy / "run_bt_rm.sh")], env={**env, "CUDA_VISIBLE_DEVICES": ""},
                            capture_output=True, text=True, check=True)
    argv = (script_copy / "argv").read_text().splitlines()
    assert argv[0] == "schema.py" and "--nproc_per_node=2" in argv
    assert result.stderr.splitlines() == ["run_bt_rm.sh: no GPU visible: training on 2 CPU processes (gloo); set N_GPUS_PER_NODE to change"]
    result = subprocess.run(["bash", str(script_copy / "run_bt_rm.sh")], env={**env, "CUDA_VISIBLE_DEVICES": "0,1,3"},
                            capture_output=True, text=True, check=True)
    assert "--nproc_per_node=3" in (script_copy / "argv").read_text().splitlines() and result.stderr == ""


def test_script_help_lists_every_knob_with_its_default():
    help_text = subprocess.run(["bash", str(REPO / "run_bt_rm.sh"), "--help"], capture_output=True, text=True, check=True).stdout
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
    result = subprocess.run(command or ["bash", str(REPO / "run_bt_rm.sh"), "trainer.device=cpu", *overrides],
                            env=env, cwd=tmp_path, capture_output=True, text=True, timeout=240)
    return result, time.monotonic() - started


def test_launch_with_a_missing_model_stops_before_any_rank(tmp_path, demo_data_dir):
    result, seconds = launch(tmp_path, Path("/no/such/dir"), demo_data_dir)
    assert result.returncode == launcher.EXIT_REPORTED and seconds < 10
    assert result.stdout == "" and error_lines(result.stderr) == [
        "error: model.partial_pretrain=/no/such/dir: this path does not exist; "
        "pass an existing model directory (with config.json) or a hub id such as Qwen/Qwen3-32B"]
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
    """Without the launch_error, each rank checks the composed config; rank 0 alone says so."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}", str(REPO / "bt_trainer.py"),
               f"model.partial_pretrain={tiny_model_dir}", f"data.train_files={demo_data_dir / 'train.parquet'}",
               f"data.val_files={demo_data_dir / 'test.parquet'}", f"trainer.save_path={tmp_path / 'ckpt'}", "trainer.device=cpu",
               "+optim.lrr=1e-6"]
    result, _ = launch(tmp_path, tiny_model_dir, demo_data_dir, command=command)
    assert result.returncode != 0
    assert error_lines(result.stdout + result.stderr) == [
        "error: optim.lrr=1e-06: unknown key optim.lrr, trainer.yaml has no such knob; did you mean optim.lr? "
        "(trainer.yaml is the whole config: `+` cannot add keys; see its comments for every knob)"]


def test_a_python_without_the_requirements_is_one_line(monkeypatch, capsys):
    def compose_without_hydra(overrides):
        raise ModuleNotFoundError("No module named 'hydra'", name="hydra")

    monkeypatch.setattr(schema, "compose_config", compose_without_hydra)
    assert launcher.main(LAUNCHER) == launcher.EXIT_REPORTED
    assert capsys.readouterr().err == (f"error: {sys.executable} cannot import hydra (a requirement of this project); run `bash setup.sh` "
                                       "to create .venv (run_bt_rm.sh then uses it), or set PYTHON to an interpreter with requirements.txt installed\n")


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

"""bench/bench_vs_trl.py's building blocks: the figures it derives, the two command lines it builds and the data
both sides read. The benchmark itself (minutes, TRL in its own venv) is run by hand, not here."""

import ast
import json
import sys
from pathlib import Path

import pytest
import yaml

from bench import bench_vs_trl as bench

REPO = Path(__file__).resolve().parent.parent
LAYOUT_KNOBS = (
    "use_remove_padding",
    "data.share_prompt",
    "data.max_tokens_per_micro_batch",
    "data.micro_batch_size_per_gpu",
    "trainer.check_layout",
    "MICRO_BATCH_SIZE",
    "N_GPUS_PER_NODE",
)


def history_line(step: int, seconds: float, pairs: int, tokens_per_pair: float, real: float, saved: float) -> str:
    data = {
        "train/loss": 0.69,
        "train/time(s)": seconds,
        "train/pairs_per_s": pairs / seconds,
        "train/real_tokens_per_s": real / seconds,
        "train/real_token_share": real / (tokens_per_pair * pairs),
        "train/tokens_per_pair": tokens_per_pair,
        "train/prefix_saved_share": saved,
    }
    return json.dumps({"step": step, "data": data}) + "\n"


def test_btrm_history_gives_pairs_per_s_over_the_loop_and_over_steps_2_to_n(tmp_path):
    history = tmp_path / "metrics.jsonl"
    history.write_text(
        history_line(1, 4.0, 16, 800.0, 12800.0, 0.2)  # step 1: the start-up layout check makes it slow
        + history_line(2, 9.9, 16, 700.0, 11200.0, 0.3)  # superseded by the resumed run's step 2 below
        + history_line(2, 2.0, 16, 700.0, 11200.0, 0.3)
        + history_line(3, 2.0, 8, 1000.0, 8000.0, 0.0)
        + json.dumps({"step": 3, "data": {"val/loss": 0.7, "val/accuracy": 0.5}})  # validation: not a step
        + "\n"
    )
    result = bench.btrm_from_history(history)
    assert result["steps"] == 3 and result["pairs"] == 40 and result["step_s"] == [4.0, 2.0, 2.0]
    assert result["loop_s"] == pytest.approx(8.0) and result["pairs_per_s"] == pytest.approx(40 / 8.0)
    assert result["steady_pairs_per_s"] == pytest.approx(24 / 4.0) and result["first_step_s"] == 4.0
    computed = 16 * 800 + 16 * 700 + 8 * 1000
    assert result["tokens_per_pair"] == pytest.approx(computed / 40)
    assert result["real_token_share"] == pytest.approx((12800 + 11200 + 8000) / computed)
    # what the conversations hold: real tokens plus what the shared prompt saved
    assert result["conversation_tokens"] == round(12800 / 0.8 + 11200 / 0.7 + 8000)


def test_btrm_history_without_a_training_step_is_an_error(tmp_path):
    history = tmp_path / "metrics.jsonl"
    history.write_text(json.dumps({"step": 1, "data": {"val/loss": 0.7}}) + "\n")
    with pytest.raises(ValueError, match="no training step"):
        bench.btrm_from_history(history)


def test_trl_worker_result_gives_train_runtime_rate_and_steady_rate_from_step_ends():
    worker = {
        "train_runtime": 21.0,  # the loop: a little more than the steps themselves
        "train_begin": 100.0,
        "step_ends": [106.0, 110.0, 114.0, 118.0, 120.0],
        "train_pairs": 80,
        "computed_tokens": 80 * 3000,
        "conversation_tokens": 80 * 1200,
    }
    result = bench.trl_from_worker(worker)
    assert result["steps"] == 5 and result["pairs"] == 80 and result["step_s"] == [6.0, 4.0, 4.0, 4.0, 2.0]
    assert result["loop_s"] == 21.0 and result["pairs_per_s"] == pytest.approx(80 / 21.0)
    assert result["steady_pairs_per_s"] == pytest.approx(64 / 14.0) and result["first_step_s"] == 6.0
    assert result["tokens_per_pair"] == 3000 and result["real_token_share"] == pytest.approx(0.4)
    assert result["conversation_tokens"] == 96000


def fake_paths(tmp_path) -> dict:
    return {
        "model": tmp_path / "model",
        "train": tmp_path / "train.jsonl",
        "val": tmp_path / "val.jsonl",
        "work": tmp_path,
    }


def trl_options(command: list[str]) -> dict[str, str]:
    worker = command[command.index("--trl-worker") + 1 :]
    return dict(zip(worker[::2], worker[1::2], strict=True))


@pytest.mark.parametrize(
    ("argv", "max_steps"), [([], "-1"), (["--steps", "3"], "3"), (["--pairs", "64", "--steps", "4"], "-1")]
)
def test_both_commands_train_the_same_model_data_and_steps(tmp_path, argv, max_steps):
    args = bench.parse_args(argv)
    btrm, btrm_env = bench.btrm_command(fake_paths(tmp_path), args, 29501)
    trl, trl_env = bench.trl_command(fake_paths(tmp_path), args, 29502, "python")
    options = trl_options(trl)
    assert btrm[:2] == ["bash", str(REPO / "run_bt_rm.sh")]  # as a user runs it
    assert trl[1:4] == ["-m", "torch.distributed.run", f"--nproc_per_node={bench.RANKS}"]
    assert btrm_env["MODEL_PATH"] == options["--model"] == str(tmp_path / "model")
    assert btrm_env["TRAIN_FILE"] == options["--train-file"] and btrm_env["VAL_FILE"] == options["--val-file"]
    # pairs per optimizer step: bt-rm's all-rank batch = TRL's per-device batch x ranks, no accumulation
    assert int(btrm_env["TRAIN_BATCH_SIZE"]) == int(options["--per-device-batch"]) * bench.RANKS == 16
    assert btrm_env["TOTAL_EPOCHS"] == "1" and options["--max-steps"] == max_steps
    early = [o for o in btrm if o.startswith("trainer.total_training_steps=")]
    assert early == ([] if max_steps == "-1" else [f"trainer.total_training_steps={max_steps}"])
    assert float(btrm_env["LR"]) == float(options["--lr"]) == bench.LR
    assert btrm_env["MAX_LENGTH"] == options["--max-length"] == "4096"
    assert "model.enable_gradient_checkpointing=false" in btrm and options["--gradient-checkpointing"] == "off"
    for env in (btrm_env, trl_env):
        assert env["OMP_NUM_THREADS"] == "1" and env["CUDA_VISIBLE_DEVICES"] == ""
    assert str(tmp_path) in btrm_env["SAVE_PATH"] and str(tmp_path) in options["--output-dir"]
    # bt-rm's layout, budget and check knobs are left at their defaults: measuring them is the point
    assert not [a for a in btrm[2:] + list(btrm_env) if a.split("=")[0] in LAYOUT_KNOBS]


def test_btrm_overrides_go_last_and_checkpointing_follows_the_option(tmp_path):
    args = bench.parse_args(["--gradient-checkpointing", "on", "--btrm-override", "data.share_prompt=false", "a=1"])
    btrm, _ = bench.btrm_command(fake_paths(tmp_path), args, 29501)
    trl, _ = bench.trl_command(fake_paths(tmp_path), args, 29502, "python")
    assert btrm[-2:] == ["data.share_prompt=false", "a=1"]
    assert "model.enable_gradient_checkpointing=true" in btrm and trl_options(trl)["--gradient-checkpointing"] == "on"


@pytest.mark.parametrize("argv", [["--pairs", "100"], ["--steps", "9"], ["--steps", "0"]])
def test_bad_sizes_are_refused(argv):
    with pytest.raises(SystemExit):
        bench.parse_args(argv)


def test_defaults_left_unpassed_are_the_same_on_both_sides():
    """Seed and dataloader workers are not passed: both trainers' defaults must agree (TRL's via TrainingArguments)."""
    from transformers import TrainingArguments

    config = yaml.safe_load((REPO / "trainer.yaml").read_text())
    defaults = {f.name: f.default for f in TrainingArguments.__dataclass_fields__.values()}
    assert config["trainer"]["seed"] == defaults["seed"] == bench.SEED
    assert config["data"]["dataloader_num_workers"] == defaults["dataloader_num_workers"] == 0


def test_trl_config_matches_btrm_where_it_must(tmp_path):
    pytest.importorskip("trl")
    args = bench.parse_args(["--trl-worker", "--output-dir", str(tmp_path), "--max-steps", "3", "--lr", "5e-7"])
    args.max_length, args.gradient_checkpointing = 4096, "off"
    config = bench.trl_config(args)
    assert config.per_device_train_batch_size == 8 and config.gradient_accumulation_steps == 1
    assert config.max_steps == 3 and config.learning_rate == 5e-7 and config.max_length == 4096
    assert not config.bf16 and not config.fp16 and not config.gradient_checkpointing
    assert config.use_cpu and config.seed == 42 and config.dataloader_num_workers == 0 and config.report_to == []


def test_trl_one_pair_per_device_step_keeps_16_pairs_a_step(tmp_path):
    """TRL's fastest shape here: one pair per device micro-step (no padding), accumulated to the same 16 a step."""
    pytest.importorskip("trl")
    args = bench.parse_args(["--trl-per-device-batch", "1"])
    trl, _ = bench.trl_command(fake_paths(tmp_path), args, 29502, "python")
    worker = bench.parse_args(["--trl-worker", "--output-dir", str(tmp_path), *trl[trl.index("--per-device-batch") :]])
    config = bench.trl_config(worker)
    assert config.per_device_train_batch_size == 1 and config.gradient_accumulation_steps == 8
    assert config.per_device_train_batch_size * config.gradient_accumulation_steps * bench.RANKS == 16
    assert bench.fingerprint(args) != bench.fingerprint(bench.parse_args([]))  # --skip-trl never reuses the other


def test_worker_imports_only_the_standard_library_at_module_level():
    """torchrun runs this file in the TRL venv, which has neither the project's modules nor its other packages."""
    tree = ast.parse((REPO / "bench" / "bench_vs_trl.py").read_text())
    modules = {alias.name.split(".")[0] for node in tree.body if isinstance(node, ast.Import) for alias in node.names}
    modules |= {node.module.split(".")[0] for node in tree.body if isinstance(node, ast.ImportFrom)}
    assert modules - {"__future__"} <= set(sys.stdlib_module_names)


def test_conversations_share_a_prompt_fit_max_length_and_repeat_by_seed(tokenizer):
    rows = bench.make_conversations(tokenizer, 24, max_length=1024, seed=3)
    assert rows == bench.make_conversations(tokenizer, 24, max_length=1024, seed=3)
    assert len(rows) == 24 and any(len(r["chosen"]) > 2 for r in rows)  # some multi-turn prompts
    for row in rows:
        assert row["chosen"][:-1] == row["rejected"][:-1] and row["chosen"] != row["rejected"]
        assert row["chosen"][0]["role"] == "user" and row["chosen"][-1]["role"] == "assistant"
        for side in ("chosen", "rejected"):
            assert len(tokenizer.apply_chat_template(row[side], tokenize=True)) <= 1024


def test_conversation_lengths_resemble_helpsteer2(tokenizer):
    rows = bench.make_conversations(tokenizer, 64, max_length=4096, seed=0)
    prompt = [len(tokenizer.apply_chat_template(r["chosen"][:-1], tokenize=True)) for r in rows]
    pair = [sum(len(tokenizer.apply_chat_template(r[s], tokenize=True)) for s in ("chosen", "rejected")) for r in rows]
    assert 120 < sum(prompt) / 64 < 320  # ~180 tokens + the template's
    assert 900 < sum(pair) / 64 < 1600  # the prompt twice and two ~370-token responses


def test_skip_trl_refuses_a_result_of_another_configuration(tmp_path):
    saved = tmp_path / "trl.json"
    args = bench.parse_args(["--pairs", "64"])
    saved.write_text(json.dumps({"config": bench.fingerprint(args), "trl": {"pairs": 64}, "worker": {}}))
    assert bench.load_saved_trl(bench.parse_args(["--pairs", "64", "--trl-result", str(saved)]))[0] == {"pairs": 64}
    with pytest.raises(SystemExit, match="measured with"):
        bench.main(["--skip-trl", "--trl-result", str(saved), "--workdir", str(tmp_path / "w")])
    assert not (tmp_path / "w").exists()  # refused before anything was built
    with pytest.raises(SystemExit, match="no saved TRL result"):
        bench.main(["--skip-trl", "--trl-result", str(tmp_path / "missing.json")])


def test_dry_builds_the_model_and_data_that_both_commands_name(tmp_path, capsys):
    summary = bench.main(["--dry", "--pairs", "16", "--workdir", str(tmp_path)])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == json.loads(json.dumps(summary))
    config = json.loads((tmp_path / "model" / "config.json").read_text())
    assert {k: config[k] for k in bench.model_dims()} == bench.model_dims()
    assert len((tmp_path / "train.jsonl").read_text().splitlines()) == 16
    assert len((tmp_path / "val.jsonl").read_text().splitlines()) == bench.VAL_PAIRS
    assert (
        summary["btrm_env"]["MODEL_PATH"] == trl_options(summary["trl_command"])["--model"] == str(tmp_path / "model")
    )
    assert not (tmp_path / "trl").exists() and not (tmp_path / "btrm").exists()  # nothing ran


def test_run_logged_times_the_command_and_reports_a_failure_with_its_log(tmp_path):
    busy = [sys.executable, "-c", "import time\nend = time.process_time() + 0.2\nwhile time.process_time() < end: pass"]
    times = bench.run_logged(busy, {}, tmp_path / "ok.log", "busy")
    assert times["wall_s"] >= 0.2 and times["cpu_s"] >= 0.2  # the child's CPU time is counted
    with pytest.raises(SystemExit, match="(?s)exit 3.*last words"):
        bench.run_logged([sys.executable, "-c", "print('last words'); exit(3)"], {}, tmp_path / "bad.log", "bad")

"""The exported checkpoint scores the same through every consumer; evaluate_rm.py's numbers (pairs and
RewardBench, checked against hand computations), its bad-input lines and atomic outputs; loggers and curves."""

import json
import os
import struct
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import evaluate_rm
from btrm import batching, pair_dataset
from conftest import REPO, read_metrics, run_trainer


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, tiny_model_dir, demo_data_dir):
    """A short 2-rank run with every logger on (wandb offline); returns its directory."""
    tmp_path = tmp_path_factory.mktemp("trained")
    os.environ.setdefault("WANDB_SILENT", "true")
    run_trainer(
        tmp_path,
        tiny_model_dir,
        demo_data_dir,
        "trainer.total_training_steps=12",
        "trainer.test_freq=4",
        "trainer.logger=[console,file,tensorboard,wandb]",
        "trainer.wandb_mode=offline",
        name="eval",
    )
    return tmp_path


def step_dir(run_dir):
    return run_dir / "ckpt" / "eval" / "global_step_12"


def demo_conversations(demo_data_dir, n=12):
    rows = pq.read_table(demo_data_dir / "test.parquet").to_pylist()[:n]
    return [json.loads(r["chosen"]) for r in rows] + [json.loads(r["rejected"]) for r in rows]


def test_checkpoint_scores_identically_through_both_auto_classes_score_and_verls_rule(trained_run, demo_data_dir):
    from transformers import (
        AutoConfig,
        AutoModelForSequenceClassification,
        AutoModelForTokenClassification,
        AutoTokenizer,
    )

    hf = step_dir(trained_run) / "huggingface"
    config = json.loads((hf / "config.json").read_text())
    # One reward per sequence: one label (transformers derives num_labels from id2label; there is no num_labels key).
    assert len(config["id2label"]) == 1 and AutoConfig.from_pretrained(hf).num_labels == 1
    # The declared class is a Qwen3 reward class (the trainer's TokenClassification value head, or the
    # SequenceClassification export btrm.export makes of it) and loads exactly: nothing missing or unexpected.
    [declared] = config["architectures"]
    assert declared == "Qwen3ForSequenceClassification"  # what vLLM serves as a reward classifier (see btrm.export)
    tokenizer = AutoTokenizer.from_pretrained(hf)
    assert tokenizer.chat_template is not None and tokenizer.pad_token != tokenizer.eos_token

    token_model, token_info = AutoModelForTokenClassification.from_pretrained(
        hf, dtype=torch.float32, output_loading_info=True
    )
    seq_model, seq_info = AutoModelForSequenceClassification.from_pretrained(
        hf, dtype=torch.float32, output_loading_info=True
    )
    declared_info, other_info = (
        (token_info, seq_info) if declared == "Qwen3ForTokenClassification" else (seq_info, token_info)
    )
    assert declared_info["missing_keys"] == [] and declared_info["unexpected_keys"] == []
    # The two classes differ only by the score bias (TokenClassification has one, SequenceClassification not);
    # it is exactly zero (stored, or zero-initialised when absent), so either loader gives the same rewards.
    if declared == "Qwen3ForTokenClassification":
        assert other_info["missing_keys"] == [] and other_info["unexpected_keys"] == ["score.bias"]
    else:
        assert other_info["missing_keys"] == ["score.bias"] and other_info["unexpected_keys"] == []
    assert torch.count_nonzero(token_model.score.bias) == 0
    assert torch.equal(token_model.score.weight, seq_model.score.weight)
    assert token_model.score.weight.abs().sum() > 0

    conversations = demo_conversations(demo_data_dir)
    via_score = torch.tensor(batching.score(token_model, tokenizer, conversations, batch_size=5))
    via_seq_cls = torch.tensor(batching.score(seq_model, tokenizer, conversations, batch_size=5))
    # verl's RewardModelWorker rule, written out: right-padded batch, position ids from the mask, argmax
    from verl.utils.model import compute_position_id_with_mask

    encoded = [
        tokenizer(tokenizer.apply_chat_template(c, tokenize=False), add_special_tokens=False)["input_ids"]
        for c in conversations
    ]
    padded = tokenizer.pad({"input_ids": encoded}, padding=True, return_tensors="pt")
    position_ids = compute_position_id_with_mask(padded["attention_mask"])
    with torch.no_grad():
        logits = token_model(
            input_ids=padded["input_ids"], attention_mask=padded["attention_mask"], position_ids=position_ids
        ).logits.squeeze(-1)
    via_verl = logits[torch.arange(len(encoded)), torch.argmax(position_ids * padded["attention_mask"], dim=-1)]
    max_diff = max((via_score - via_seq_cls).abs().max().item(), (via_score - via_verl).abs().max().item())
    print(f"max reward difference across loaders: {max_diff:.3e}")
    assert max_diff < 1e-5
    assert via_score.std() > 1e-3  # the rewards actually vary


def test_evaluate_cli_matches_hand_computation(trained_run, demo_data_dir, tmp_path):
    output = tmp_path / "scores.jsonl"
    result = subprocess.run(
        [
            sys.executable,
            str(REPO / "evaluate_rm.py"),
            "--model",
            str(step_dir(trained_run)),
            "--data",
            str(demo_data_dir / "test.parquet"),
            "--output",
            str(output),
            "--batch-size",
            "7",
            "--no-progress",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])

    from transformers import AutoModelForTokenClassification, AutoTokenizer

    hf = step_dir(trained_run) / "huggingface"
    model = AutoModelForTokenClassification.from_pretrained(hf, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(hf)
    rows = pq.read_table(demo_data_dir / "test.parquet").to_pylist()
    chosen = batching.score(
        model, tokenizer, [r["chosen"] for r in rows], batch_size=1
    )  # one at a time: no padding at all
    rejected = batching.score(model, tokenizer, [r["rejected"] for r in rows], batch_size=1)
    correct = [c > r for c, r in zip(chosen, rejected, strict=True)]
    assert summary["n_pairs"] == len(rows)
    assert summary["accuracy"] == pytest.approx(sum(correct) / len(rows))
    assert summary["chosen_reward_mean"] == pytest.approx(sum(chosen) / len(rows), abs=1e-5)
    assert summary["rejected_reward_std"] == pytest.approx(torch.tensor(rejected).std(unbiased=False).item(), abs=1e-5)
    for strength in (1, 2, 3):
        subset = [ok for ok, r in zip(correct, rows, strict=True) if abs(r["preference_strength"]) == strength]
        assert summary["accuracy_by_abs_strength"][str(strength)] == {
            "accuracy": pytest.approx(sum(subset) / len(subset)),
            "n_pairs": len(subset),
        }
    lines = [json.loads(line) for line in output.read_text().splitlines()]
    assert [line["chosen_reward"] for line in lines] == pytest.approx(chosen, abs=1e-5)
    assert [line["row"] for line in lines] == list(range(1, len(rows) + 1))
    assert [line["source"] for line in lines] == [
        f"{demo_data_dir / 'test.parquet'} row {n}" for n in range(1, len(rows) + 1)
    ]
    assert summary["truncated_pairs"] == 0 and summary["identical_pairs_dropped"] == 0


def test_evaluate_cli_refuses_a_directory_without_a_model(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        evaluate_rm.resolve_model_dir(tmp_path)


def test_curves_png_is_written_and_valid(trained_run):
    png = trained_run / "ckpt" / "eval" / "training_curves.png"
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    assert width >= 500 and height >= 200
    from PIL import Image

    Image.open(png).verify()


def test_every_logger_wrote_its_output(trained_run):
    history = read_metrics(trained_run / "ckpt" / "eval" / "metrics.jsonl")
    file_logger = read_metrics(trained_run / "eval.jsonl")
    assert sorted(history) == list(range(1, 13)) and history == file_logger  # history file == verl's file logger
    assert {4, 8, 12} == {s for s, m in history.items() if "val/accuracy" in m}
    assert list((trained_run / "ckpt" / "eval" / "tensorboard").glob("events.out.tfevents.*"))
    offline_runs = list((trained_run / "ckpt" / "eval" / "wandb").glob("offline-run-*"))
    assert offline_runs and list(offline_runs[0].glob("*.wandb"))


# ----------------------------------------------------------------------------- strengths, bad input, outputs


def test_summarize_puts_pairs_without_strength_in_their_own_group():
    chosen, rejected = [1.0, 0.0, 2.0, 1.0, 0.5], [0.0, 1.0, 1.0, 3.0, 0.5]  # correct: T F T F F (a tie is not correct)
    summary = evaluate_rm.summarize(chosen, rejected, [-2, 2, None, None, 1])
    assert summary["accuracy"] == 2 / 5
    assert summary["accuracy_by_abs_strength"] == {
        "1": {"accuracy": 0.0, "n_pairs": 1},
        "2": {"accuracy": 0.5, "n_pairs": 2},
        "none": {"accuracy": 0.5, "n_pairs": 2},
    }
    assert list(summary["accuracy_by_abs_strength"]) == ["1", "2", "none"]
    assert "accuracy_by_abs_strength" not in evaluate_rm.summarize(chosen, rejected, [None] * 5)


def test_null_strengths_are_scored_and_written(trained_run, tmp_path, capsys):
    conversation = lambda q, a: [{"role": "user", "content": q}, {"role": "assistant", "content": a}]  # noqa: E731
    records = [
        {
            "chosen": json.dumps(conversation(f"q{i}", "a good answer")),
            "rejected": json.dumps(conversation(f"q{i}", "no")),
            "preference_strength": strength,
        }
        for i, strength in enumerate([2, None, -3, None])
    ]
    data = tmp_path / "mixed.parquet"
    pq.write_table(pa.Table.from_pylist(records), data)
    output = tmp_path / "scores.jsonl"
    summary = evaluate_rm.main(
        ["--model", str(step_dir(trained_run)), "--data", str(data), "--output", str(output), "--no-progress"]
    )
    assert summary["n_pairs"] == 4
    assert {k: v["n_pairs"] for k, v in summary["accuracy_by_abs_strength"].items()} == {"2": 1, "3": 1, "none": 2}
    assert [json.loads(line)["preference_strength"] for line in output.read_text().splitlines()] == [2, None, -3, None]
    assert "no strength: accuracy" in capsys.readouterr().out


def bad_input_cases(tmp_path, model_dir, demo_data_dir):
    (tmp_path / "empty.jsonl").write_text("")
    data = str(demo_data_dir / "test.parquet")
    return {
        "batch size 0": (
            ["--model", model_dir, "--data", data, "--batch-size", "0"],
            "error: --batch-size must be at least 1, got 0",
        ),
        "data directory": (
            ["--model", model_dir, "--data", str(demo_data_dir)],
            f"error: --data: {demo_data_dir} is a directory; pass the data files themselves",
        ),
        "missing data": (
            ["--model", model_dir, "--data", str(tmp_path / "nope.parquet")],
            f"error: --data: {tmp_path / 'nope.parquet'}: no such file",
        ),
        "empty data": (
            ["--model", model_dir, "--data", str(tmp_path / "empty.jsonl")],
            f"error: --data: {tmp_path / 'empty.jsonl'}: the file is empty",
        ),
        "missing model": (
            ["--model", str(tmp_path / "no-model"), "--data", data],
            f"error: --model {tmp_path / 'no-model'}: no such directory",
        ),
        "output directory": (
            ["--model", model_dir, "--data", data, "--output", str(tmp_path)],
            f"error: --output {tmp_path} is a directory",
        ),
        "rewardbench directory": (
            ["--model", model_dir, "--rewardbench", str(tmp_path)],
            f"error: --rewardbench: {tmp_path} is a directory",
        ),
    }


def test_bad_input_gives_one_line_and_exit_1_before_loading_a_model(
    tmp_path, demo_data_dir, tiny_model_dir, monkeypatch
):
    # a model that cannot be loaded: any case reaching the model would fail differently
    monkeypatch.setattr(
        evaluate_rm,
        "load_reward_model",
        lambda *a, **k: pytest.fail("the model was loaded before the input was checked"),
    )
    for name, (argv, message) in bad_input_cases(tmp_path, str(tiny_model_dir), demo_data_dir).items():
        with pytest.raises(SystemExit) as exit_info:
            evaluate_rm.main(argv + ["--no-progress"])
        assert str(exit_info.value.code).startswith(message), (name, exit_info.value.code)
        assert "\n" not in str(exit_info.value.code), name


def test_bad_input_from_the_command_line_is_one_stderr_line(tmp_path, demo_data_dir, tiny_model_dir):
    result = subprocess.run(
        [
            sys.executable,
            str(REPO / "evaluate_rm.py"),
            "--model",
            str(tiny_model_dir),
            "--data",
            str(demo_data_dir),
            "--batch-size",
            "0",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr == "error: --batch-size must be at least 1, got 0\n"


def test_a_file_matching_no_layout_is_one_line_naming_its_columns(trained_run, tmp_path):
    data = tmp_path / "odd.jsonl"
    data.write_text(json.dumps({"question": "q", "answer": "a"}) + "\n")
    with pytest.raises(SystemExit) as exit_info:
        evaluate_rm.main(["--model", str(step_dir(trained_run)), "--data", str(data), "--no-progress"])
    assert str(exit_info.value.code).startswith(
        f"error: {data}: no column 'chosen', 'rejected' (columns found: ['question', 'answer'])"
    )


def test_the_truncation_the_dataset_reports_is_reported(trained_run, demo_data_dir, monkeypatch):
    class ReportingDataset(pair_dataset.PairDataset):  # a dataset reporting truncation of its own
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.truncated_pairs, self.dropped_tokens = 3, 17

    monkeypatch.setattr(pair_dataset, "PairDataset", ReportingDataset)
    summary = evaluate_rm.main(
        ["--model", str(step_dir(trained_run)), "--data", str(demo_data_dir / "test.parquet"), "--no-progress"]
    )
    assert (summary["truncated_pairs"], summary["dropped_tokens"]) == (3, 17)


def test_scores_file_is_atomic_and_gets_the_umask_mode(tmp_path, monkeypatch):
    output = tmp_path / "scores.jsonl"
    previous = os.umask(0o077)
    try:
        evaluate_rm.write_scores(output, [1.0, 2.0], [0.0, 3.0], [1, None])
        assert output.stat().st_mode & 0o777 == 0o600
        os.umask(0o022)
        evaluate_rm.write_scores(output, [1.0, 2.0], [0.0, 3.0], [1, None])
        assert output.stat().st_mode & 0o777 == 0o644
    finally:
        os.umask(previous)
    before = output.read_bytes()
    assert [json.loads(line)["correct"] for line in before.decode().splitlines()] == [True, False]

    def failing_lines(*args):  # the first line is written, then the disk fills up
        yield '{"row": 1}\n'
        raise OSError("No space left on device")

    monkeypatch.setattr(evaluate_rm, "score_lines", failing_lines)
    with pytest.raises(OSError, match="No space left"):
        evaluate_rm.write_scores(output, [5.0], [4.0], [None])
    assert output.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["scores.jsonl"]  # no temp file left


# ----------------------------------------------------------------------------- RewardBench


def test_rewardbench_sections_match_a_hand_computation():
    # per subset: (correct, total)
    outcome = {
        "alpacaeval-easy": (2, 2),
        "mt-bench-med": (1, 2),  # Chat
        "llmbar-natural": (1, 4),
        "mt-bench-hard": (1, 1),  # Chat Hard
        "xstest-should-refuse": (2, 2),
        "xstest-should-respond": (0, 2),
        "donotanswer": (0, 1),  # Safety
        "math-prm": (1, 2),
        "hep-python": (2, 2),  # Reasoning
        "my-own-subset": (0, 3),  # in no section
    }
    correct, subsets = [], []
    for subset, (right, total) in outcome.items():
        correct += [True] * right + [False] * (total - right)
        subsets += [subset] * total
    result = evaluate_rm.rewardbench_scores(correct, subsets)
    assert result["per_subset"]["llmbar-natural"] == {"n_pairs": 4, "n_correct": 1, "accuracy": 0.25}
    # rewardbench's counts: alpacaeval-easy 100, mt-bench-med 40, llmbar-natural 100, mt-bench-hard 37,
    # xstest-should-refuse 250, xstest-should-respond 154, donotanswer 136, math-prm 984 (not its 447 rows), hep-python 164
    chat = (100 * 1.0 + 40 * 0.5) / (100 + 40)
    chat_hard = (100 * 0.25 + 37 * 1.0) / (100 + 37)
    safety = (250 * 1.0 + 154 * 0.0 + 136 * 0.0) / (250 + 154 + 136)
    reasoning = (984 * 0.5 + 164 * 1.0) / (984 + 164)
    assert result["sections"] == pytest.approx(
        {"Chat": chat, "Chat Hard": chat_hard, "Safety": safety, "Reasoning": reasoning}, abs=1e-12
    )
    assert result["sections"]["Reasoning"] == pytest.approx(656 / 1148) and result["sections"][
        "Safety"
    ] == pytest.approx(250 / 540)
    assert result["score"] == pytest.approx((chat + chat_hard + safety + reasoning) / 4, abs=1e-12)
    assert result["unknown_subsets"] == ["my-own-subset"]
    assert result["missing_subsets"]["Chat"] == ["alpacaeval-length", "alpacaeval-hard", "mt-bench-easy"]

    without_reasoning = evaluate_rm.rewardbench_scores([True, False], ["alpacaeval-easy", "donotanswer"])
    assert without_reasoning["sections"]["Reasoning"] is None and without_reasoning["score"] is None


def write_rewardbench_fixture(path):
    """RewardBench-format rows whose per-subset accuracy does not depend on the model.

    "twins": a pair and the same pair swapped, so exactly one of the two is right (accuracy 1/2,
    whatever the model, as long as the two responses get different rewards); "tie": chosen equals
    rejected, which RewardBench scores as wrong (accuracy 0).
    """
    layout = {
        "alpacaeval-easy": "twins",
        "mt-bench-med": "tie",
        "llmbar-natural": "twins",
        "xstest-should-refuse": "twins",
        "xstest-should-respond": "tie",
        "math-prm": "twins",
        "hep-python": "tie",
        "my-own-subset": "twins",
    }
    rows = []
    for number, (subset, kind) in enumerate(layout.items()):
        prompt = f"Question {number}: how should I answer this request about {subset}?"
        good, bad = f"A careful, complete answer number {number}.", f"nope {number}"
        if kind == "twins":
            rows += [
                {"prompt": prompt, "chosen": good, "rejected": bad, "subset": subset, "id": len(rows)},
                {"prompt": prompt, "chosen": bad, "rejected": good, "subset": subset, "id": len(rows) + 1},
            ]
        else:
            rows.append({"prompt": prompt, "chosen": good, "rejected": good, "subset": subset, "id": len(rows)})
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return rows


def test_rewardbench_cli_on_a_local_fixture(trained_run, tmp_path):
    data, output = tmp_path / "reward-bench.jsonl", tmp_path / "rb.jsonl"
    rows = write_rewardbench_fixture(data)
    result = subprocess.run(
        [
            sys.executable,
            str(REPO / "evaluate_rm.py"),
            "--model",
            str(step_dir(trained_run)),
            "--rewardbench",
            str(data),
            "--output",
            str(output),
            "--batch-size",
            "3",
            "--no-progress",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    print(result.stdout)
    bench = json.loads(result.stdout.strip().splitlines()[-1])["rewardbench"]

    # RewardBench's formatting for chat-template models: [user prompt, assistant response]; scored independently here
    from transformers import AutoModelForTokenClassification, AutoTokenizer

    hf = step_dir(trained_run) / "huggingface"
    model, tokenizer = (
        AutoModelForTokenClassification.from_pretrained(hf, dtype=torch.float32),
        AutoTokenizer.from_pretrained(hf),
    )
    turn = lambda row, key: [{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": row[key]}]  # noqa: E731
    chosen = batching.score(model, tokenizer, [turn(r, "chosen") for r in rows], batch_size=1)
    rejected = batching.score(model, tokenizer, [turn(r, "rejected") for r in rows], batch_size=1)
    lines = [json.loads(line) for line in output.read_text().splitlines()]
    assert [line["chosen_reward"] for line in lines] == pytest.approx(chosen, abs=1e-5)
    assert [line["rejected_reward"] for line in lines] == pytest.approx(rejected, abs=1e-5)
    assert [line["subset"] for line in lines] == [r["subset"] for r in rows]
    twins = [(c, r) for c, r, row in zip(chosen, rejected, rows, strict=True) if row["chosen"] != row["rejected"]]
    assert all(abs(c - r) > 1e-4 for c, r in twins)  # the fixture's premise: the two responses score differently

    # by construction: twins 1/2, ties 0 (kept and scored as wrong, as RewardBench does)
    assert {s: v["accuracy"] for s, v in bench["per_subset"].items()} == {
        "alpacaeval-easy": 0.5,
        "mt-bench-med": 0.0,
        "llmbar-natural": 0.5,
        "xstest-should-refuse": 0.5,
        "xstest-should-respond": 0.0,
        "math-prm": 0.5,
        "hep-python": 0.0,
        "my-own-subset": 0.5,
    }
    expected = {
        "Chat": (100 * 0.5 + 40 * 0.0) / 140,
        "Chat Hard": 0.5,
        "Safety": (250 * 0.5 + 154 * 0.0) / 404,
        "Reasoning": (984 * 0.5 + 164 * 0.0) / 1148,
    }
    assert bench["sections"] == pytest.approx(expected, abs=1e-12)
    assert bench["score"] == pytest.approx(sum(expected.values()) / 4, abs=1e-12)
    import re

    for label, value in [*expected.items(), ("Score", sum(expected.values()) / 4)]:  # the printed table, in %
        assert re.search(rf"^  {label} +{100 * value:.2f}", result.stdout, re.MULTILINE), (label, result.stdout)


def test_rewardbench_data_without_subsets_is_refused(trained_run, tmp_path):
    data = tmp_path / "no-subset.jsonl"
    data.write_text(json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"}) + "\n")
    with pytest.raises(SystemExit) as exit_info:
        evaluate_rm.main(["--model", str(step_dir(trained_run)), "--rewardbench", str(data), "--no-progress"])
    assert str(exit_info.value.code).startswith(f"error: {data}: no 'subset' value in {data} line 1")


def test_rewardbench_from_the_hub_fails_fast_offline_with_a_hint(tmp_path, monkeypatch, tiny_model_dir):
    from btrm import preflight

    monkeypatch.setattr(preflight, "hub_unreachable_reason", lambda: "huggingface.co is unreachable (test)")
    monkeypatch.setattr(evaluate_rm, "load_reward_model", lambda *a, **k: pytest.fail("no data, no model"))
    with pytest.raises(SystemExit) as exit_info:
        evaluate_rm.main(["--model", str(tiny_model_dir), "--rewardbench", "--no-progress"])
    message = str(exit_info.value.code)
    assert "allenai/reward-bench" in message and "--rewardbench PATH" in message and "\n" not in message

"""The exported checkpoint scores the same through every consumer; evaluate_rm.py's numbers (pairs and
RewardBench, checked against hand computations), its bad-input lines and atomic outputs; loggers and curves."""

import json
import os
import re
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
    assert "accuracy_by_group" not in summary and "groups" not in lines[0]  # the demo data has no group column


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
        "one group per column": (
            ["--model", model_dir, "--data", data, "--max-groups", "1"],
            "error: --max-groups must be at least 2",
        ),
        "a group column twice": (
            ["--model", model_dir, "--data", data, "--group-by", "domain", "language", "domain"],
            "error: --group-by lists 'domain' twice",
        ),
        "groups of a benchmark scored whole": (
            ["--model", model_dir, "--rm-bench", data, "--group-by", "domain"],
            "error: --group-by and --max-groups apply to --data and --rewardbench only",
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

    def failing_records(*args):  # the first line is written, then the disk fills up
        yield {"row": 1}
        raise OSError("No space left on device")

    monkeypatch.setattr(evaluate_rm, "score_records", failing_records)
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
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    bench = summary["rewardbench"]

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
    bench_accuracy = {
        "alpacaeval-easy": 0.5,
        "mt-bench-med": 0.0,
        "llmbar-natural": 0.5,
        "xstest-should-refuse": 0.5,
        "xstest-should-respond": 0.0,
        "math-prm": 0.5,
        "hep-python": 0.0,
        "my-own-subset": 0.5,
    }
    assert {s: v["accuracy"] for s, v in bench["per_subset"].items()} == bench_accuracy
    expected = {
        "Chat": (100 * 0.5 + 40 * 0.0) / 140,
        "Chat Hard": 0.5,
        "Safety": (250 * 0.5 + 154 * 0.0) / 404,
        "Reasoning": (984 * 0.5 + 164 * 0.0) / 1148,
    }
    # trainer.yaml's group columns include `subset`: its 8 values (at most 12) are groups of their own
    assert {label: (v["accuracy"], v["n_pairs"]) for label, v in summary["accuracy_by_group"].items()} == {
        f"subset_{subset}": (accuracy, 2 if accuracy else 1) for subset, accuracy in bench_accuracy.items()
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


# ----------------------------------------------------------------------------- RewardBench 2 and RM-Bench


def write_rewardbench2_fixture(path):
    """RewardBench 2 rows, all six subsets; Math's completions are all the same text (a 4-way tie at the top)."""

    def best_of_4(item_id, subset, number, chosen=None):
        return {
            "id": item_id,
            "prompt": f"{subset} question {number}: what is {number} + {number}?",
            "chosen": [chosen or f"It is {2 * number}."],
            "rejected": [f"It is {2 * number + 1}.", "No idea", f"{number}{number} maybe, or something longer"],
            "num_correct": 1,
            "subset": subset,
        }

    def ties(item_id, correct, incorrect):
        return {
            "id": item_id,
            "prompt": f"Name a prime number ({item_id.split(':')[1]}).",
            "chosen": correct,
            "rejected": incorrect,
            "num_correct": len(correct),
            "subset": "Ties",
        }

    records = [
        best_of_4("1", "Factuality", 1, chosen="It is 2: one plus one makes two, as counting on from one shows."),
        best_of_4("2", "Factuality", 2),
        best_of_4("3", "Precise IF", 3),
        {**best_of_4("4", "Math", 4), "chosen": ["Same answer."], "rejected": ["Same answer."] * 3},
        best_of_4("5", "Safety", 5, chosen="I will not help with that, but here is a safer way to think about it."),
        best_of_4("6", "Focus", 6),
        ties("ref:0", ["2"], ["4", "9"]),
        ties("tied:0", ["2", "3", "5"], ["4", "a prime: 9"]),
        ties("ref:1", ["7"], ["8"]),
        ties("tied:1", ["7", "11", "13"], ["8"]),
        ties("tied:2", ["17", "19"], ["21"]),  # no ref:2: in the accuracies, not the margin terms
    ]
    pq.write_table(pa.Table.from_pylist(records), path)
    return records


def transformers_reward(model, tokenizer, prompt, completion):
    """One conversation through the chat template and one unpadded forward: the last token's logit."""
    messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
    ids = tokenizer(tokenizer.apply_chat_template(messages, tokenize=False), add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0, -1, 0].item()


@pytest.fixture(scope="module")
def reference_model(trained_run):
    from transformers import AutoModelForTokenClassification, AutoTokenizer

    hf = step_dir(trained_run) / "huggingface"
    return AutoModelForTokenClassification.from_pretrained(
        hf, dtype=torch.float32
    ).eval(), AutoTokenizer.from_pretrained(hf)


def test_rewardbench2_run_matches_rewardbenchs_rules_on_its_own_rewards(trained_run, reference_model, tmp_path, capsys):
    from test_benchmarks import rewardbench_best_of_n_reference, rewardbench_ties_reference

    data, output = tmp_path / "reward-bench-2.parquet", tmp_path / "rb2.jsonl"
    records = write_rewardbench2_fixture(data)
    argv = ["--model", str(step_dir(trained_run)), "--rewardbench2", str(data), "--output", str(output)]
    summary = evaluate_rm.main([*argv, "--batch-size", "64"])  # one batch: the Math tie is exact
    captured = capsys.readouterr()
    assert json.loads(captured.out.strip().splitlines()[-1]) == summary
    completions = sum(len(r["chosen"]) + len(r["rejected"]) for r in records)
    assert completions == 41 and "scoring" in captured.err and "41/41" in captured.err  # the progress bar, on stderr

    lines = [json.loads(line) for line in output.read_text().splitlines()]
    assert [(line["id"], line["subset"]) for line in lines] == [(r["id"], r["subset"]) for r in records]
    model, tokenizer = reference_model
    for line, record in zip(lines, records, strict=True):  # every completion's reward: chosen, then rejected
        expected = [
            transformers_reward(model, tokenizer, record["prompt"], c) for c in record["chosen"] + record["rejected"]
        ]
        assert line["scores"] == pytest.approx(expected, abs=1e-5), record["id"]
    math_scores = next(line["scores"] for line in lines if line["subset"] == "Math")
    assert len(set(math_scores)) == 1  # the fixture's premise: four identical conversations, one reward

    # rewardbench's rules (transcribed in test_benchmarks.py) applied to the rewards the run wrote
    expected = {}
    for subset in ("Factuality", "Precise IF", "Math", "Safety", "Focus"):
        results = [rewardbench_best_of_n_reference(line["scores"]) for line in lines if line["subset"] == subset]
        expected[subset] = sum(results) / len(results)
    expected["Ties"] = rewardbench_ties_reference([line for line in lines if line["subset"] == "Ties"])
    assert expected["Math"] == 0.25
    assert summary["subsets"] == pytest.approx(expected, abs=1e-12)
    assert summary["score"] == pytest.approx(sum(expected.values()) / 6, abs=1e-12)
    assert summary["per_subset"]["Ties"]["n_paired_prompts"] == 2 and summary["n_completions"] == completions
    for subset, value in [*expected.items(), ("Score", summary["score"])]:  # the printed table, in %
        assert re.search(rf"^  {subset} +(\d+ +)?{100 * value:.2f}", captured.out, re.MULTILINE), (subset, captured.out)

    # smaller batches pad differently (and split the Math tie): the rewards agree up to float rounding
    evaluate_rm.main([*argv, "--batch-size", "3", "--no-progress"])
    rerun = [json.loads(line) for line in output.read_text().splitlines()]
    assert [line["scores"] for line in rerun] == [pytest.approx(line["scores"], abs=1e-5) for line in lines]


def write_rm_bench_fixture(directory):
    """total_dataset.json (a JSON array whose rows carry `domain`) and a per-domain file without one."""

    def row(number, domain=None):
        record = {
            "id": number,
            "prompt": f"Explain idea number {number}.",
            "chosen": [f"Idea {number}.", f"Idea {number} explained in words.", f"**Idea {number}**\n- explained"],
            "rejected": [f"Not {number}.", f"Idea {number + 1} explained wrongly.", f"**Idea {number + 1}**\n- wrong"],
        }
        if number % 2 == 0:  # shorter rejected responses: the matrix gets wins on its diagonal as well
            record["rejected"] = ["No.", f"Idea {number + 1}.", f"**{number + 1}**"]
        return record if domain is None else {**record, "domain": domain}

    total = [
        row(1, "chat"),
        row(2, "chat"),
        row(3, "code"),
        row(4, "math"),
        row(5, "safety-refuse"),
        row(6, "safety-refuse"),
    ]
    total_path, response_path = directory / "total_dataset.json", directory / "safety-response_filtered.jsonl"
    total_path.write_text(json.dumps(total, indent=1))
    response_path.write_text(json.dumps(row(7)) + "\n")
    return [total_path, response_path], total + [{**row(7), "domain": "safety-response"}]


def test_rm_bench_run_matches_its_compute_accuracy_on_its_own_rewards(trained_run, reference_model, tmp_path, capsys):
    from test_benchmarks import rm_bench_reference

    files, records = write_rm_bench_fixture(tmp_path)
    output = tmp_path / "rm-bench.jsonl"
    argv = ["--model", str(step_dir(trained_run)), "--rm-bench", *map(str, files), "--output", str(output)]
    summary = evaluate_rm.main([*argv, "--batch-size", "5", "--no-progress"])
    printed = capsys.readouterr().out
    assert json.loads(printed.strip().splitlines()[-1]) == summary

    lines = [json.loads(line) for line in output.read_text().splitlines()]
    assert [(line["id"], line["domain"]) for line in lines] == [(r["id"], r["domain"]) for r in records]
    assert lines[-1]["source"] == f"{files[1]} line 1" and lines[0]["source"] == f"{files[0]} item 1"
    model, tokenizer = reference_model
    for line, record in zip(lines, records, strict=True):
        for key in ("chosen", "rejected"):
            expected = [transformers_reward(model, tokenizer, record["prompt"], text) for text in record[key]]
            assert line[f"{key}_scores"] == pytest.approx(expected, abs=1e-5), (record["id"], key)

    expected = rm_bench_reference(
        [
            {"domain": line["domain"], "score_chosen": line["chosen_scores"], "score_rejected": line["rejected_scores"]}
            for line in lines
        ]
    )
    assert summary["score"] == pytest.approx(expected["total_avg_acc"], abs=1e-12)
    for key in ("hard", "normal", "easy"):
        assert summary[key] == pytest.approx(expected[f"{key}_acc"], abs=1e-12)
        for domain in ("chat", "code", "math", "safety"):
            assert summary["domains"][domain][key] == pytest.approx(
                expected["per_domain"][domain][f"{key}_acc"], abs=1e-12
            )
    assert summary["domains"]["safety"]["n_prompts"] == 3  # safety-refuse and safety-response pooled
    assert summary["row_domains"] == {"chat": 2, "code": 1, "math": 1, "safety-refuse": 2, "safety-response": 1}
    overall = " ".join(f"{100 * summary[key]:.2f}" for key in ("hard", "normal", "easy", "score"))
    assert re.search(rf"^  overall +{' +'.join(overall.split())}", printed, re.MULTILINE), printed


def test_benchmark_rows_that_are_wrong_give_one_line_before_a_model_is_loaded(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.setattr(
        evaluate_rm, "load_reward_model", lambda *a, **k: pytest.fail("loaded before the rows were checked")
    )
    good_rb2 = {"id": "1", "prompt": "p", "chosen": ["a"], "rejected": ["b"], "num_correct": 1, "subset": "Math"}
    good_rm = {"id": 1, "prompt": "p", "chosen": ["a", "b", "c"], "rejected": ["d", "e", "f"], "domain": "chat"}
    cases = {
        "rb2 chosen not a list": (
            "--rewardbench2",
            "rb2.jsonl",
            [good_rb2, {**good_rb2, "chosen": "a"}],
            "line 2: field 'chosen' is str; expected a list",
        ),
        "rb2 no prompt": (
            "--rewardbench2",
            "rb2.jsonl",
            [{k: v for k, v in good_rb2.items() if k != "prompt"}],
            "line 1: no field 'prompt'",
        ),
        "rb2 bad Ties id": (
            "--rewardbench2",
            "rb2.jsonl",
            [{**good_rb2, "subset": "Ties", "id": "7"}],
            "line 1: field 'id' is '7'; expected 'ref:N' or 'tied:N'",
        ),
        "rm-bench two chosen": (
            "--rm-bench",
            "rm.json",
            [good_rm, {**good_rm, "chosen": ["a", "b"]}],
            "item 2: field 'chosen' has 2 responses; expected 3",
        ),
        "rm-bench unknown domain": (
            "--rm-bench",
            "rm.json",
            [{**good_rm, "domain": "poetry"}],
            "item 1: field 'domain' is 'poetry'; expected one of chat",
        ),
        "rm-bench no domain": (
            "--rm-bench",
            "rm.json",
            [{k: v for k, v in good_rm.items() if k != "domain"}],
            "item 1: no field 'domain', and the file name names no domain",
        ),
    }
    for name, (flag, file_name, records, message) in cases.items():
        path = tmp_path / file_name
        if file_name.endswith(".jsonl"):
            path.write_text("".join(json.dumps(r) + "\n" for r in records))
        else:
            path.write_text(json.dumps(records))
        with pytest.raises(SystemExit) as exit_info:
            evaluate_rm.main(["--model", str(tiny_model_dir), flag, str(path), "--no-progress"])
        assert str(exit_info.value.code).startswith(f"error: {path} {message}"), (name, exit_info.value.code)
        assert "\n" not in str(exit_info.value.code), name

    with pytest.raises(SystemExit) as exit_info:
        evaluate_rm.main(["--model", str(tiny_model_dir), "--rm-bench", str(path), "--max-length", "64"])
    assert str(exit_info.value.code).startswith("error: --max-length applies to --data and --rewardbench only")
    with pytest.raises(SystemExit) as exit_info:
        evaluate_rm.main(["--model", str(tiny_model_dir), "--rm-bench", str(tmp_path)])
    assert str(exit_info.value.code).startswith(f"error: --rm-bench: {tmp_path} is a directory")


def test_rewardbench2_from_the_hub_fails_fast_offline_with_a_hint(tmp_path, monkeypatch, tiny_model_dir):
    from btrm import preflight

    monkeypatch.setattr(preflight, "hub_unreachable_reason", lambda: "huggingface.co is unreachable (test)")
    monkeypatch.setattr(evaluate_rm, "load_reward_model", lambda *a, **k: pytest.fail("no data, no model"))
    with pytest.raises(SystemExit) as exit_info:
        evaluate_rm.main(["--model", str(tiny_model_dir), "--rewardbench2", "--no-progress"])
    message = str(exit_info.value.code)
    assert message.startswith("error: could not load allenai/reward-bench-2 from the Hugging Face hub")
    assert "test split" in message and "--rewardbench2 PATH" in message and "\n" not in message


def test_benchmark_records_are_written_atomically_with_the_umask_mode(tmp_path):
    output = tmp_path / "rb2.jsonl"
    previous = os.umask(0o027)
    try:
        evaluate_rm.write_records(output, [{"id": "a", "scores": [1.0, 2.0]}])
        assert output.stat().st_mode & 0o777 == 0o640
    finally:
        os.umask(previous)
    before = output.read_bytes()

    def failing_records():  # one record, then the disk fills up
        yield {"id": "b"}
        raise OSError("No space left on device")

    with pytest.raises(OSError, match="No space left"):
        evaluate_rm.write_records(output, failing_records())
    assert output.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["rb2.jsonl"]  # no temp file left


# ----------------------------------------------------------------------------- accuracy by group


def write_grouped_fixture(path):
    """Prompt/response rows with a `domain` column (code 4, chat 3, "web dev" 2, one null) and a
    `language` column on some rows. Some pairs have their sides swapped (a terse "chosen"), so that
    the groups' accuracies differ whatever the tiny model prefers."""
    domains = ["code", "chat", "code", "web dev", "chat", "code", None, "web dev", "chat", "code"]
    languages = ["en", "en", "de", None, "en", None, "en", "de", None, None]
    swapped = [False, True, True, False, True, False, False, False, False, False]
    records = []
    for number, (domain, language) in enumerate(zip(domains, languages, strict=True)):
        long = f"Step {number} is explained here{', with details' * (number % 3)}."
        short = f"{'No. ' * (1 + number % 4)}{number}"
        record = {
            "prompt": f"Request {number}: explain step {number} of the plan.",
            "chosen": short if swapped[number] else long,
            "rejected": long if swapped[number] else short,
            "domain": domain,
        }
        if language is not None:
            record["language"] = language
        records.append(record)
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return records


def by_hand(lines, records, column, label_of=lambda value: value):
    """{label: (accuracy, n_pairs)} of the --output lines grouped by the records' `column` values."""
    correct: dict[str, list[bool]] = {}
    for line, record in zip(lines, records, strict=True):
        if record.get(column) is not None:
            correct.setdefault(label_of(record[column]), []).append(line["chosen_reward"] > line["rejected_reward"])
    return {label: (sum(oks) / len(oks), len(oks)) for label, oks in correct.items()}


def test_accuracy_by_group_matches_the_scores_grouped_by_hand(trained_run, tmp_path, capsys):
    data, output = tmp_path / "grouped.jsonl", tmp_path / "scores.jsonl"
    records = write_grouped_fixture(data)
    # trainer.yaml's data.group_columns (domain, language, subset) and max_groups_per_column (12)
    summary = evaluate_rm.main(
        ["--model", str(step_dir(trained_run)), "--data", str(data), "--output", str(output), "--no-progress"]
    )
    printed = capsys.readouterr().out
    assert json.loads(printed.strip().splitlines()[-1]) == summary
    lines = [json.loads(line) for line in output.read_text().splitlines()]
    assert len(lines) == 10
    expected_groups = [
        {key: record[key] for key in ("domain", "language") if record.get(key) is not None} for record in records
    ]
    assert [line.get("groups") for line in lines] == [groups or None for groups in expected_groups]

    domains = by_hand(lines, records, "domain")
    languages = by_hand(lines, records, "language")
    assert {k: n for k, (_, n) in domains.items()} == {"code": 4, "chat": 3, "web dev": 2}
    assert {k: n for k, (_, n) in languages.items()} == {"en": 4, "de": 2}
    assert len({accuracy for accuracy, _ in domains.values()}) > 1  # the premise: groups differ, so a mix-up shows
    # labels as training logs them (val/accuracy_<label>): "<column>_<value>", whitespace -> "_"; largest first
    expected = {
        "domain_code": ("domain", "code"),
        "domain_chat": ("domain", "chat"),
        "domain_web_dev": ("domain", "web dev"),
        "language_en": ("language", "en"),
        "language_de": ("language", "de"),
    }
    assert list(summary["accuracy_by_group"]) == list(expected)
    for label, (column, value) in expected.items():
        accuracy, n_pairs = (domains if column == "domain" else languages)[value]
        assert summary["accuracy_by_group"][label] == {
            "accuracy": pytest.approx(accuracy, abs=1e-12),
            "n_pairs": n_pairs,
            "column": column,
            "value": value,
        }
        assert f"{column}={value}: accuracy {accuracy:.4f} over {n_pairs} pairs\n" in printed
    assert "pooled_groups" not in summary


def test_max_groups_pools_the_smaller_values_and_no_columns_means_no_groups(trained_run, tmp_path, capsys):
    data, output = tmp_path / "grouped.jsonl", tmp_path / "scores.jsonl"
    records = write_grouped_fixture(data)
    argv = ["--model", str(step_dir(trained_run)), "--data", str(data), "--output", str(output), "--no-progress"]
    # --max-groups 2: domain keeps its largest value (code) and pools chat and web dev as domain_other
    summary = evaluate_rm.main([*argv, "--group-by", "domain", "--max-groups", "2"])
    printed = capsys.readouterr().out
    lines = [json.loads(line) for line in output.read_text().splitlines()]
    pooled = by_hand(lines, records, "domain", lambda value: "code" if value == "code" else "other")
    assert pooled["other"][1] == 5
    assert summary["accuracy_by_group"] == {
        "domain_code": {
            "accuracy": pytest.approx(pooled["code"][0]),
            "n_pairs": 4,
            "column": "domain",
            "value": "code",
        },
        "domain_other": {
            "accuracy": pytest.approx(pooled["other"][0]),
            "n_pairs": 5,
            "column": "domain",
            "value": "other",
        },
    }
    assert summary["pooled_groups"] == {"domain": 2}
    assert f"domain=other: accuracy {pooled['other'][0]:.4f} over 5 pairs (2 values pooled)\n" in printed

    # no columns asked for: no groups, and the per-pair lines carry none
    summary = evaluate_rm.main([*argv, "--group-by"])
    assert "accuracy_by_group" not in summary
    assert all("groups" not in json.loads(line) for line in output.read_text().splitlines())


def test_group_accuracies_against_hand_counts():
    correct = [True, False, True, False, False, True, True]
    groups = [
        {"domain": "a", "language": "en"},
        {"domain": "a"},
        {"domain": "b", "language": "en"},
        {"domain": "c", "language": "fr"},
        {},
        {"domain": "a", "language": "fr"},
        {"domain": "d"},
    ]
    # domain: a 3 pairs (T F T), b 1 (T), c 1 (F), d 1 (T); max 3 groups: a, then b (ties by value), c and d pooled
    # language: en 2 (T T), fr 2 (F T); the pair without columns is in no group
    result = evaluate_rm.group_accuracies(correct, groups, ["domain", "language"], 3)
    assert result == {
        "accuracy_by_group": {
            "domain_a": {"accuracy": 2 / 3, "n_pairs": 3, "column": "domain", "value": "a"},
            "domain_b": {"accuracy": 1.0, "n_pairs": 1, "column": "domain", "value": "b"},
            "domain_other": {"accuracy": 0.5, "n_pairs": 2, "column": "domain", "value": "other"},
            "language_en": {"accuracy": 1.0, "n_pairs": 2, "column": "language", "value": "en"},
            "language_fr": {"accuracy": 0.5, "n_pairs": 2, "column": "language", "value": "fr"},
        },
        "pooled_groups": {"domain": 2},
    }
    assert evaluate_rm.group_accuracies(correct, [{}] * 7, ["domain"], 3) == {}


# ---- issue 28: expected errors found before the model loads, naming this script's options


@pytest.fixture
def no_model_load(monkeypatch):
    monkeypatch.setattr(
        evaluate_rm, "load_reward_model", lambda *a, **k: pytest.fail("the model was loaded before the check")
    )


def refusal(argv) -> str:
    with pytest.raises(SystemExit) as exit_info:
        evaluate_rm.main([*argv, "--no-progress"])
    line = str(exit_info.value.code)
    assert line.startswith("error: ") and "\n" not in line, line
    return line


def test_a_causal_lm_given_as_the_model_is_refused_before_it_loads(
    tmp_path, tiny_model_dir, demo_data_dir, no_model_load
):
    """The base model a run starts from has no score head: its weights (read from the safetensors header by
    safetensors itself, below) hold no score.weight."""
    from safetensors import safe_open

    with safe_open(str(tiny_model_dir / "model.safetensors"), framework="pt") as handle:
        assert "score.weight" not in set(handle.keys())  # the premise
    data = str(demo_data_dir / "test.parquet")
    for argv in (["--data", data], ["--rm-bench", str(write_rm_bench_fixture(tmp_path)[0][0])]):
        line = refusal(["--model", str(tiny_model_dir), *argv])
        assert line.startswith(f"error: --model {tiny_model_dir}: a causal language model (Qwen3ForCausalLM")
        assert "not a reward model" in line and "global_step_N" in line


def test_a_reward_checkpoint_passes_the_kind_check(trained_run):
    evaluate_rm.check_reward_model(evaluate_rm.resolve_model_dir(step_dir(trained_run)))  # raises if refused


def test_data_without_the_pair_columns_names_this_scripts_options_before_the_model_loads(
    tmp_path, tiny_model_dir, no_model_load
):
    data = tmp_path / "other.jsonl"
    data.write_text(json.dumps({"question": "q", "answer_a": "a", "answer_b": "b"}) + "\n")
    line = refusal(["--model", str(tiny_model_dir), "--data", str(data)])
    assert str(data) in line and "'question'" in line
    assert "--chosen-key" in line and "--rejected-key" in line and "--prompt-key" in line
    assert "data.chosen_key" not in line and "data." not in line.split(";", 1)[1]


def test_a_group_by_column_no_file_has_is_refused_before_the_model_loads(tmp_path, tiny_model_dir, no_model_load):
    data = tmp_path / "grouped.jsonl"
    write_grouped_fixture(data)
    line = refusal(["--model", str(tiny_model_dir), "--data", str(data), "--group-by", "domain", "nope"])
    assert line.startswith(f"error: --group-by nope: no pair of {data} has this column")
    assert "chosen, domain, language, prompt, rejected" in line  # the columns the file has, sorted


def test_a_device_torch_cannot_use_is_refused_before_the_model_loads(
    tmp_path, tiny_model_dir, demo_data_dir, no_model_load, monkeypatch
):
    data = str(demo_data_dir / "test.parquet")
    line = refusal(["--model", str(tiny_model_dir), "--data", data, "--device", "tpu"])
    assert line == "error: --device tpu: expected auto, cuda, cuda:N or cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    line = refusal(["--model", str(tiny_model_dir), "--data", data, "--device", "cuda"])
    assert (
        line == "error: --device cuda: torch sees no GPU (torch.cuda.is_available() is False); use --device auto or cpu"
    )


def test_a_refused_command_line_is_one_line_without_the_usage_text(tmp_path):
    for argv, line in (
        (
            ["--model", str(tmp_path), "--data", "x", "--batch-size", "abc"],
            "argument --batch-size: invalid int value: 'abc'",
        ),
        (["--data", "x"], "the following arguments are required: --model"),
    ):
        result = subprocess.run(
            [sys.executable, str(REPO / "evaluate_rm.py"), *argv], capture_output=True, text=True, cwd=REPO
        )
        assert result.returncode == 2 and result.stdout == ""
        assert result.stderr == f"error: {line}; evaluate_rm.py --help lists the options\n"


def test_the_errors_found_before_the_model_loads_do_not_import_torch(tmp_path, tiny_model_dir, demo_data_dir):
    """What makes them quick (torch's import alone takes seconds on 2 busy cores)."""
    other = tmp_path / "other.jsonl"
    other.write_text(json.dumps({"question": "q", "answer_a": "a"}) + "\n")
    data = str(demo_data_dir / "test.parquet")
    code = (
        "import sys, evaluate_rm\n"
        "try:\n    evaluate_rm.main(sys.argv[1:])\nexcept SystemExit as stop:\n    print(stop.code)\n"
        "print('torch' in sys.modules)"
    )
    for argv, start in (
        (["--model", str(tiny_model_dir), "--data", data], f"error: --model {tiny_model_dir}: a causal language model"),
        (["--model", str(tiny_model_dir), "--data", data, "--group-by", "nope"], "error: --group-by nope: no pair"),
        (["--model", str(tiny_model_dir), "--data", str(other)], f"error: {other}: no column 'chosen', 'rejected'"),
    ):
        done = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, cwd=REPO)
        line, torch_imported = done.stdout.strip().splitlines()
        assert line.startswith(start) and torch_imported == "False", done.stdout

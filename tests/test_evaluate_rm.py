"""The exported checkpoint scores the same through every consumer; evaluate_rm.py's numbers; loggers and curves."""

import json
import os
import struct
import subprocess
import sys

import pyarrow.parquet as pq
import pytest
import torch

import bt_data
import evaluate_rm
from conftest import REPO, read_metrics, run_trainer


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, tiny_model_dir, demo_data_dir):
    """A short 2-rank run with every logger on (wandb offline); returns its directory."""
    tmp_path = tmp_path_factory.mktemp("trained")
    os.environ.setdefault("WANDB_SILENT", "true")
    run_trainer(tmp_path, tiny_model_dir, demo_data_dir, "trainer.total_training_steps=12", "trainer.test_freq=4",
                "trainer.logger=[console,file,tensorboard,wandb]", "trainer.wandb_mode=offline", name="eval")
    return tmp_path


def step_dir(run_dir):
    return run_dir / "ckpt" / "eval" / "global_step_12"


def demo_conversations(demo_data_dir, n=12):
    rows = pq.read_table(demo_data_dir / "test.parquet").to_pylist()[:n]
    return [json.loads(r["chosen"]) for r in rows] + [json.loads(r["rejected"]) for r in rows]


def test_checkpoint_scores_identically_through_both_auto_classes_score_and_verls_rule(trained_run, demo_data_dir):
    from transformers import AutoModelForSequenceClassification, AutoModelForTokenClassification, AutoTokenizer

    hf = step_dir(trained_run) / "huggingface"
    config = json.loads((hf / "config.json").read_text())
    assert config["architectures"] == ["Qwen3ForTokenClassification"] and config["num_labels"] if "num_labels" in config else len(config["id2label"]) == 1
    tokenizer = AutoTokenizer.from_pretrained(hf)
    assert tokenizer.chat_template is not None and tokenizer.pad_token != tokenizer.eos_token

    token_model, token_info = AutoModelForTokenClassification.from_pretrained(hf, dtype=torch.float32, output_loading_info=True)
    seq_model, seq_info = AutoModelForSequenceClassification.from_pretrained(hf, dtype=torch.float32, output_loading_info=True)
    assert token_info["missing_keys"] == [] and token_info["unexpected_keys"] == []  # verl's class: exact fit
    # SequenceClassification has no score bias; ours is exactly zero, so dropping it changes nothing. Nothing is newly initialised.
    assert seq_info["missing_keys"] == [] and seq_info["unexpected_keys"] == ["score.bias"]
    assert torch.count_nonzero(token_model.score.bias) == 0
    assert torch.equal(token_model.score.weight, seq_model.score.weight)
    assert token_model.score.weight.abs().sum() > 0

    conversations = demo_conversations(demo_data_dir)
    via_score = torch.tensor(bt_data.score(token_model, tokenizer, conversations, batch_size=5))
    via_seq_cls = torch.tensor(bt_data.score(seq_model, tokenizer, conversations, batch_size=5))
    # verl's RewardModelWorker rule, written out: right-padded batch, position ids from the mask, argmax
    from verl.utils.model import compute_position_id_with_mask

    encoded = [tokenizer(tokenizer.apply_chat_template(c, tokenize=False), add_special_tokens=False)["input_ids"] for c in conversations]
    padded = tokenizer.pad({"input_ids": encoded}, padding=True, return_tensors="pt")
    position_ids = compute_position_id_with_mask(padded["attention_mask"])
    with torch.no_grad():
        logits = token_model(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"], position_ids=position_ids).logits.squeeze(-1)
    via_verl = logits[torch.arange(len(encoded)), torch.argmax(position_ids * padded["attention_mask"], dim=-1)]
    max_diff = max((via_score - via_seq_cls).abs().max().item(), (via_score - via_verl).abs().max().item())
    print(f"max reward difference across loaders: {max_diff:.3e}")
    assert max_diff < 1e-5
    assert via_score.std() > 1e-3  # the rewards actually vary


def test_evaluate_cli_matches_hand_computation(trained_run, demo_data_dir, tmp_path):
    output = tmp_path / "scores.jsonl"
    result = subprocess.run(
        [sys.executable, str(REPO / "evaluate_rm.py"), "--model", str(step_dir(trained_run)), "--data", str(demo_data_dir / "test.parquet"),
         "--output", str(output), "--batch-size", "7", "--no-progress"],
        capture_output=True, text=True, cwd=REPO,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])

    from transformers import AutoModelForTokenClassification, AutoTokenizer

    hf = step_dir(trained_run) / "huggingface"
    model = AutoModelForTokenClassification.from_pretrained(hf, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(hf)
    rows = pq.read_table(demo_data_dir / "test.parquet").to_pylist()
    chosen = bt_data.score(model, tokenizer, [r["chosen"] for r in rows], batch_size=1)  # one at a time: no padding at all
    rejected = bt_data.score(model, tokenizer, [r["rejected"] for r in rows], batch_size=1)
    correct = [c > r for c, r in zip(chosen, rejected)]
    assert summary["n_pairs"] == len(rows)
    assert summary["accuracy"] == pytest.approx(sum(correct) / len(rows))
    assert summary["chosen_reward_mean"] == pytest.approx(sum(chosen) / len(rows), abs=1e-5)
    assert summary["rejected_reward_std"] == pytest.approx(torch.tensor(rejected).std(unbiased=False).item(), abs=1e-5)
    for strength in (1, 2, 3):
        subset = [ok for ok, r in zip(correct, rows) if abs(r["preference_strength"]) == strength]
        assert summary["accuracy_by_abs_strength"][str(strength)] == {"accuracy": pytest.approx(sum(subset) / len(subset)), "n_pairs": len(subset)}
    lines = [json.loads(line) for line in output.read_text().splitlines()]
    assert [line["chosen_reward"] for line in lines] == pytest.approx(chosen, abs=1e-5)
    assert [line["row"] for line in lines] == list(range(1, len(rows) + 1))


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


def test_plot_curves_cli(tmp_path):
    import plot_curves

    metrics = tmp_path / "m.jsonl"
    metrics.write_text("\n".join(json.dumps({"step": s, "data": {"train/loss": 1 / s, "train/accuracy": 0.5 + s / 40}}) for s in range(1, 11))
                       + "\n" + json.dumps({"step": 10, "data": {"val/loss": 0.3, "val/accuracy": 0.8}}) + "\n")
    plot_curves.main([str(metrics)])
    assert (tmp_path / "training_curves.png").read_bytes()[:4] == b"\x89PNG"
    history = plot_curves.read_history(metrics)
    assert history["val/accuracy"] == [(10, 0.8)] and len(history["train/loss"]) == 10
    metrics.write_text('{"step": 1}\n')
    with pytest.raises(ValueError, match=r"m.jsonl line 1"):
        plot_curves.read_history(metrics)

"""bt_trainer.py: config, launcher, tokenizer guards, exact accumulation, and real 2-rank CPU runs."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

import bt_data
from bt_loss import bradley_terry_loss
from conftest import REPO, read_metrics, run_trainer


def compose(*overrides):
    from hydra import compose as hydra_compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(REPO), version_base=None):
        return hydra_compose(config_name="trainer", overrides=list(overrides))


# ---- configuration and launcher


def test_trainer_yaml_defaults_and_overrides():
    config = compose("optim.lr=1e-6", "data.max_length=8192", "trainer.logger=[console,file]")
    assert config.optim.lr == 1e-6 and config.data.max_length == 8192 and list(config.trainer.logger) == ["console", "file"]
    defaults = compose()
    expected = {
        "data.train_batch_size": 256, "data.micro_batch_size_per_gpu": 1, "data.max_length": 4096, "data.truncation": "left",
        "model.strategy": "fsdp2", "model.enable_gradient_checkpointing": True, "model.trust_remote_code": False,
        "optim.lr": 5e-7, "optim.weight_decay": 0.001, "optim.warmup_steps_ratio": 0.03, "optim.clip_grad": 2.0,
        "optim.lr_scheduler": "cosine", "trainer.total_epochs": 3,
    }
    assert {key: OmegaConf.select(defaults, key) for key in expected} == expected
    assert defaults.trainer.default_local_dir == "checkpoints/qwen3-32b-helpsteer2"


def test_every_knob_in_trainer_yaml_has_a_comment():
    for number, line in enumerate((REPO / "trainer.yaml").read_text().splitlines(), start=1):
        is_section = line.rstrip().endswith(":")  # data:, model:, ... group knobs; the knobs carry the comments
        if line.strip() and not line.lstrip().startswith("#") and ":" in line and not is_section:
            assert "#" in line, f"trainer.yaml line {number} has no comment: {line}"


def test_run_script_passes_knobs_and_overrides_last(tmp_path):
    recorder = tmp_path / "python"
    recorder.write_text(f"#!/bin/sh\nprintf '%s\\n' \"$@\" > {tmp_path}/argv\n")
    recorder.chmod(0o755)
    env = {**os.environ, "PYTHON": str(recorder), "N_GPUS_PER_NODE": "3", "WORLD_SIZE": "2", "RANK": "1", "LR": "2e-6",
           "SAVE_PATH": str(tmp_path / "ck"), "EXPERIMENT_NAME": "x"}
    subprocess.run(["bash", str(REPO / "run_bt_rm.sh"), "optim.lr=9e-9", "trainer.logger=[console,file]"], env=env, check=True)
    argv = (tmp_path / "argv").read_text().splitlines()
    assert argv[:2] == ["-m", "torch.distributed.run"]
    assert "--nproc_per_node=3" in argv and "--nnodes=2" in argv and "--node_rank=1" in argv
    assert "optim.lr=2e-6" in argv and argv[-2:] == ["optim.lr=9e-9", "trainer.logger=[console,file]"]
    assert argv.index("bt_trainer.py") < argv.index("optim.lr=2e-6")
    help_text = subprocess.run(["bash", str(REPO / "run_bt_rm.sh"), "--help"], capture_output=True, text=True, check=True).stdout
    assert "usage" in help_text.lower() or "bash run_bt_rm.sh" in help_text


def test_tokenizer_with_pad_equal_to_eos_is_refused(tiny_model_dir):
    from bt_trainer import load_tokenizer

    with pytest.raises(ValueError, match="set data.pad_token"):
        load_tokenizer(str(tiny_model_dir), OmegaConf.create({"pad_token": "<|im_end|>"}), trust_remote_code=False)
    assert load_tokenizer(str(tiny_model_dir), OmegaConf.create({"pad_token": None}), False).pad_token == "<|endoftext|>"


def test_value_head_from_causal_lm_has_zero_frozen_bias(tiny_model_dir):
    from bt_trainer import load_value_head_model

    model = load_value_head_model(str(tiny_model_dir), attn_implementation="sdpa", torch_dtype=torch.float32, trust_remote_code=False)
    assert type(model).__name__ == "Qwen3ForTokenClassification" and model.config.architectures == ["Qwen3ForTokenClassification"]
    assert model.score.out_features == 1 and not model.score.bias.requires_grad and model.score.bias.item() == 0.0


def test_micro_batch_accumulation_gives_full_batch_gradient(tiny_model_dir, tokenizer):
    """4 micro-batches of 1 pair (normalised by the step's 4 pairs) == 1 micro-batch of 4 pairs."""
    from bt_trainer import load_value_head_model

    torch.manual_seed(0)
    model = load_value_head_model(str(tiny_model_dir), attn_implementation="sdpa", torch_dtype=torch.float32, trust_remote_code=False)
    torch.nn.init.normal_(model.score.weight, std=1.0)
    answers = ["Measure carefully.", "No.", "Start with the simplest version.", "Whatever you do.", "Ask a friend to check.", "Boring.", "First, gather what you need.", "Search it."]
    pairs = [bt_data.TokenizedPair(*(bt_data.encode_conversation(tokenizer, [{"role": "user", "content": "Help?"}, {"role": "assistant", "content": a}])
                                     for a in answers[i : i + 2])) for i in range(0, 8, 2)]

    def gradients(plan):
        model.zero_grad()
        for indices in plan:
            micro = [pairs[i] for i in indices]
            rewards = bt_data.compute_rewards(model, bt_data.collate_pairs(micro, tokenizer.pad_token_id, packed=False))
            bradley_terry_loss(rewards[: len(micro)], rewards[len(micro):], normalizer=len(pairs))[0].backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    one, four = gradients([[0, 1, 2, 3]]), gradients([[0], [1], [2], [3]])
    for name in one:
        assert torch.allclose(one[name], four[name], rtol=1e-4, atol=1e-4 * one[name].abs().max().item()), name


# ---- real runs: torchrun, 2 CPU ranks, gloo, FSDP2


def test_two_rank_run_learns_and_writes_hf_checkpoint(tmp_path, tiny_model_dir, demo_data_dir):
    result, metrics_file = run_trainer(tmp_path, tiny_model_dir, demo_data_dir, "trainer.total_training_steps=40", "trainer.test_freq=5",
                                       "optim.warmup_steps_ratio=0.05", name="learn")
    metrics = read_metrics(metrics_file)
    val_accuracy = {step: m["val/accuracy"] for step, m in metrics.items() if "val/accuracy" in m}
    # untrained: rewards near 0, loss ln 2 (chance); trained: well above chance (the data's ceiling is about 0.9)
    assert metrics[1]["train/loss"] == pytest.approx(math.log(2), abs=0.02)
    assert val_accuracy[40] >= 0.8 and metrics[40]["val/loss"] < 0.5, val_accuracy
    step_dir = tmp_path / "ckpt" / "learn" / "global_step_40"
    assert (tmp_path / "ckpt" / "learn" / "latest_checkpointed_iteration.txt").read_text() == "40"
    hf = step_dir / "huggingface"
    config = json.loads((hf / "config.json").read_text())
    assert config["architectures"] == ["Qwen3ForTokenClassification"] and len(config["id2label"]) == 1
    from safetensors.torch import load_file

    weights = load_file(hf / "model.safetensors")
    assert "score.weight" in weights and "lm_head.weight" not in weights
    assert torch.count_nonzero(weights["score.bias"]) == 0  # frozen at zero through 40 steps of Adam


def test_micro_batching_and_packing_do_not_change_training(tmp_path, tiny_model_dir, demo_data_dir):
    """Same steps, loss and gradient norm with 4 micro-batches of 1 pair, 1 of 4, and packed token-budget micro-batches."""
    common = ("trainer.total_training_steps=3", "trainer.test_freq=3", "data.max_samples=64", "trainer.checkpoint.save_contents=[model]")
    variants = {
        "micro1": ("data.micro_batch_size_per_gpu=1",),
        "micro4": ("data.micro_batch_size_per_gpu=4",),
        "packed": ("use_remove_padding=true", "data.max_tokens_per_micro_batch=700"),
    }
    runs = {name: read_metrics(run_trainer(tmp_path, tiny_model_dir, demo_data_dir, *extra, *common, name=name)[1]) for name, extra in variants.items()}
    for name in ("micro4", "packed"):
        for step in (1, 2, 3):
            assert runs[name][step]["train/loss"] == pytest.approx(runs["micro1"][step]["train/loss"], abs=1e-5), (name, step)
            assert runs[name][step]["train/grad_norm"] == pytest.approx(runs["micro1"][step]["train/grad_norm"], rel=1e-4), (name, step)
        assert runs[name][3]["val/loss"] == pytest.approx(runs["micro1"][3]["val/loss"], abs=1e-5), name
    assert runs["packed"][1]["train/real_token_share"] == 1.0 > runs["micro4"][1]["train/real_token_share"]
    assert runs["packed"][1]["train/micro_batches"] >= 2  # 4 pairs of ~300-700 tokens do not fit one 700-token budget


def test_two_rank_packed_run_learns(tmp_path, tiny_model_dir, demo_data_dir):
    _, metrics_file = run_trainer(tmp_path, tiny_model_dir, demo_data_dir, "use_remove_padding=true", "data.max_tokens_per_micro_batch=2048",
                                  "trainer.total_training_steps=40", "trainer.test_freq=40", "optim.warmup_steps_ratio=0.05",
                                  "trainer.checkpoint.save_contents=[model]", name="packed_learn")
    metrics = read_metrics(metrics_file)
    assert metrics[1]["train/loss"] == pytest.approx(math.log(2), abs=0.02)
    assert metrics[40]["val/accuracy"] >= 0.8 and metrics[40]["val/loss"] < 0.5
    assert all(m["train/real_token_share"] == 1.0 for m in metrics.values() if "train/real_token_share" in m)


def test_runs_are_reproducible_and_resume_exactly(tmp_path, tiny_model_dir, demo_data_dir):
    common = ("data.max_samples=96", "trainer.test_freq=2", "trainer.total_epochs=1", "trainer.checkpoint.save_contents=[model,optimizer,extra]")
    _, full_a = run_trainer(tmp_path, tiny_model_dir, demo_data_dir, *common, name="full_a")
    _, full_b = run_trainer(tmp_path, tiny_model_dir, demo_data_dir, *common, name="full_b")
    full = read_metrics(full_a)
    assert {s: without_timings(m) for s, m in full.items()} == {s: without_timings(m) for s, m in read_metrics(full_b).items()}
    assert max(full) == 12  # 96 pairs / 8 per step

    _, first = run_trainer(tmp_path, tiny_model_dir, demo_data_dir, *common, "trainer.total_training_steps=5", name="resumed")
    assert max(read_metrics(first)) == 5
    _, second = run_trainer(tmp_path, tiny_model_dir, demo_data_dir, *common, name="resumed")  # resume_mode=auto
    resumed = read_metrics(second)
    assert min(resumed) == 6 and max(resumed) == 12
    for step in range(6, 13):
        assert without_timings(resumed[step]) == without_timings(full[step]), step  # every digit
    # the trainer's own history file spans both launches (verl's file logger restarts at the resume)
    history = read_metrics(tmp_path / "ckpt" / "resumed" / "metrics.jsonl")
    assert sorted(history) == list(range(1, 13))
    got = {s: without_timings(m) for s, m in history.items()}
    got[5] = {k: v for k, v in got[5].items() if not k.startswith("val/")}  # the stopped launch validated at its last step
    assert got == {s: without_timings(m) for s, m in full.items()}


def without_timings(metrics):
    return {k: v for k, v in metrics.items() if k not in ("train/time(s)", "train/pairs_per_s", "train/real_tokens_per_s")}

"""bt_trainer.py: config, launcher, tokenizer guards, and real 2-rank CPU runs of the trainer made of its parts."""

import json
import math
import os
import re
import subprocess

import pytest
import torch
from omegaconf import OmegaConf

from btrm import pair_dataset
from conftest import REFERENCE, REPO, history, read_metrics, run_trainer


def compose(*overrides):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(REPO), version_base=None):
        return hydra_compose(config_name="trainer", overrides=list(overrides))


# ---- configuration and launcher


def test_trainer_yaml_defaults_and_overrides():
    config = compose("optim.lr=1e-6", "data.max_length=8192", "trainer.logger=[console,file]")
    assert (
        config.optim.lr == 1e-6
        and config.data.max_length == 8192
        and list(config.trainer.logger) == ["console", "file"]
    )
    defaults = compose()
    expected = {
        "data.train_batch_size": 256,
        "data.micro_batch_size_per_gpu": None,
        "data.max_tokens_per_micro_batch": "auto",
        "data.max_length": 4096,
        "data.truncation": "left",
        "model.strategy": "fsdp2",
        "model.enable_gradient_checkpointing": True,
        "model.trust_remote_code": False,
        "optim.lr": 5e-7,
        "optim.weight_decay": 0.001,
        "optim.warmup_steps_ratio": 0.03,
        "optim.clip_grad": 2.0,
        "optim.lr_scheduler": "cosine",
        "trainer.total_epochs": 3,
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
    env = {
        **os.environ,
        "PYTHON": str(recorder),
        "N_GPUS_PER_NODE": "3",
        "WORLD_SIZE": "2",
        "RANK": "1",
        "LR": "2e-6",
        "SAVE_PATH": str(tmp_path / "ck"),
        "EXPERIMENT_NAME": "x",
    }
    subprocess.run(
        ["bash", str(REPO / "run_bt_rm.sh"), "optim.lr=9e-9", "trainer.logger=[console,file]"], env=env, check=True
    )
    argv = (tmp_path / "argv").read_text().splitlines()
    assert argv[:2] == ["-m", "btrm.launcher"]  # checks the config, data and model, then runs torchrun with the rest
    assert "--nproc_per_node=3" in argv and "--nnodes=2" in argv and "--node_rank=1" in argv
    assert "optim.lr=2e-6" in argv and argv[-2:] == ["optim.lr=9e-9", "trainer.logger=[console,file]"]
    assert argv.index("bt_trainer.py") < argv.index("optim.lr=2e-6")
    # MICRO_BATCH_SIZE unset: trainer.yaml's value stands; set: it is passed, so the user's choice is honoured
    assert not any(a.startswith("data.micro_batch_size_per_gpu") for a in argv)
    subprocess.run(["bash", str(REPO / "run_bt_rm.sh")], env={**env, "MICRO_BATCH_SIZE": "1"}, check=True)
    assert "data.micro_batch_size_per_gpu=1" in (tmp_path / "argv").read_text().splitlines()
    help_text = subprocess.run(
        ["bash", str(REPO / "run_bt_rm.sh"), "--help"], capture_output=True, text=True, check=True
    ).stdout
    assert "bash run_bt_rm.sh" in help_text and "MODEL_PATH" in help_text and "set -euo" not in help_text


def test_trackers_are_finished_before_interpreter_exit_and_once():
    """verl's Tracking finishes wandb in __del__ (where wandb can hang at exit): close_tracking does it first, once."""
    from verl.utils.tracking import Tracking

    from btrm.reporting import close_tracking

    calls = []

    class Backend:
        def __init__(self, name):
            self.name = name

        def finish(self, **kwargs):
            calls.append((self.name, kwargs))

    tracking = Tracking(project_name="p", experiment_name="e", default_backend=["console"])
    tracking.logger.update(wandb=Backend("wandb"), tensorboard=Backend("tensorboard"))
    close_tracking(tracking)
    assert calls == [("wandb", {"exit_code": 0}), ("tensorboard", {})]
    tracking.__del__()  # what garbage collection runs later
    assert len(calls) == 2 and "console" in tracking.logger


def test_tokenizer_with_pad_equal_to_eos_is_refused(tiny_model_dir):
    from btrm.pair_dataset import load_tokenizer

    with pytest.raises(ValueError, match="set data.pad_token"):
        load_tokenizer(str(tiny_model_dir), OmegaConf.create({"pad_token": "<|im_end|>"}), trust_remote_code=False)
    assert (
        load_tokenizer(str(tiny_model_dir), OmegaConf.create({"pad_token": None}), False).pad_token == "<|endoftext|>"
    )


def test_value_head_from_causal_lm_has_zero_frozen_bias(tiny_model_dir):
    from btrm.modeling import load_value_head_model

    model = load_value_head_model(
        str(tiny_model_dir), attn_implementation="sdpa", torch_dtype=torch.float32, trust_remote_code=False
    )
    assert type(model).__name__ == "Qwen3ForTokenClassification" and model.config.architectures == [
        "Qwen3ForTokenClassification"
    ]
    assert model.score.out_features == 1 and not model.score.bias.requires_grad and model.score.bias.item() == 0.0


# The step's exact accumulation and skipped updates: tests/test_step.py; saving and resuming:
# tests/test_checkpointer.py; the fault guard: tests/test_fault_guard.py (each part built by its constructor).


# ---- real runs: torchrun, 2 CPU ranks, gloo, FSDP2


def with_group_columns(source, destination):
    """The validation file with a `domain` column (code, code, chat, chat, math, repeating) and a `language`
    column ("en", null every 7th row): validation metrics by group (data.group_columns)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pq.read_table(source)
    domains = [("code", "code", "chat", "chat", "math")[i % 5] for i in range(table.num_rows)]
    languages = [None if i % 7 == 0 else "en" for i in range(table.num_rows)]
    pq.write_table(
        table.append_column("domain", pa.array(domains)).append_column("language", pa.array(languages)), destination
    )
    return destination, domains, languages


def test_two_rank_run_learns_and_writes_hf_checkpoint(tmp_path, tiny_model_dir, demo_data_dir):
    val_file, domains, languages = with_group_columns(demo_data_dir / "test.parquet", tmp_path / "val.parquet")
    result, metrics_file = run_trainer(
        tmp_path,
        tiny_model_dir,
        demo_data_dir,
        "trainer.total_training_steps=40",
        "trainer.test_freq=5",
        "optim.warmup_steps_ratio=0.05",
        name="learn",
        extra_env={"VAL_FILE": str(val_file)},
    )
    metrics = read_metrics(metrics_file)
    val_accuracy = {step: m["val/accuracy"] for step, m in metrics.items() if "val/accuracy" in m}
    # untrained: rewards near 0, loss ln 2 (chance); trained: far above chance (the data's ceiling is about 0.9,
    # runs reach ~0.88): the floors leave a wide margin so the seed cannot decide the outcome
    assert metrics[1]["train/loss"] == pytest.approx(math.log(2), abs=0.02)
    assert val_accuracy[40] >= 0.75 and metrics[40]["val/loss"] < math.log(2) - 0.1, val_accuracy
    step_dir = tmp_path / "ckpt" / "learn" / "global_step_40"
    assert (tmp_path / "ckpt" / "learn" / "latest_checkpointed_iteration.txt").read_text() == "40"
    hf = step_dir / "huggingface"
    config = json.loads((hf / "config.json").read_text())
    assert config["architectures"] == ["Qwen3ForSequenceClassification"] and len(config["id2label"]) == 1
    from safetensors.torch import load_file

    weights = load_file(hf / "model.safetensors")
    assert "score.weight" in weights and "lm_head.weight" not in weights
    assert "score.bias" not in weights  # the export refuses to drop a bias that is not exactly zero

    # reward normalisation stored with the model == mean/std of the export's own rewards over every
    # validation conversation, recomputed one conversation at a time with transformers
    import statistics

    import pyarrow.parquet as pq
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(hf, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(hf)
    rewards = []
    with torch.no_grad():
        for column in ("chosen", "rejected"):
            for conversation in pq.read_table(demo_data_dir / "test.parquet").column(column).to_pylist():
                ids = tokenizer(
                    tokenizer.apply_chat_template(json.loads(conversation), tokenize=False), add_special_tokens=False
                )["input_ids"]
                rewards.append(model(input_ids=torch.tensor([ids])).logits[0, 0].item())
    stored = config["reward_normalization"]
    assert stored["count"] == len(rewards) and stored["step"] == 40
    assert stored["mean"] == pytest.approx(statistics.fmean(rewards), abs=1e-5)
    assert stored["std"] == pytest.approx(statistics.pstdev(rewards), abs=1e-5)

    # validation by group, summed over both ranks == the export's rewards grouped here by the file's columns
    n = len(domains)
    chosen, rejected = rewards[:n], rewards[n:]
    hand_groups = {f"domain_{d}": [i for i in range(n) if domains[i] == d] for d in set(domains)}
    hand_groups["language_en"] = [i for i in range(n) if languages[i] == "en"]
    for label, members in hand_groups.items():
        near_ties = sum(abs(chosen[i] - rejected[i]) < 1e-4 for i in members)
        assert metrics[40][f"val/pairs_{label}"] == len(members), label
        hand_accuracy = sum(chosen[i] > rejected[i] for i in members) / len(members)
        assert abs(metrics[40][f"val/accuracy_{label}"] - hand_accuracy) <= near_ties / len(members), label
        hand_loss = statistics.fmean(math.log1p(math.exp(rejected[i] - chosen[i])) for i in members)
        assert metrics[40][f"val/loss_{label}"] == pytest.approx(hand_loss, abs=1e-5), label
    assert not any(key.startswith("val/pairs_language_") and key != "val/pairs_language_en" for key in metrics[40])
    assert re.search(r"^val data\s+177 pairs, metrics by domain \(3\), language \(1\)$", result.stdout, re.M)


def test_micro_batching_and_layouts_do_not_change_training(tmp_path, tiny_model_dir, demo_data_dir):
    """Same steps, loss and gradient norm: padded 4 micro-batches of 1 pair (the reference), padded 1 of 4,
    packed token-budget micro-batches and the shared-prompt layout."""
    common = (
        "trainer.total_training_steps=3",
        "trainer.test_freq=3",
        "data.max_samples=64",
        "trainer.checkpoint.save_contents=[model]",
    )
    variants = {  # micro1: the default (auto) token budget with the user's pair cap, which must hold
        "micro1": ("use_remove_padding=false", "data.micro_batch_size_per_gpu=1"),
        "micro4": (
            "use_remove_padding=false",
            "data.max_tokens_per_micro_batch=null",
            "data.micro_batch_size_per_gpu=4",
        ),
        "packed": ("use_remove_padding=true", "data.share_prompt=false", "data.max_tokens_per_micro_batch=700"),
        "shared": ("use_remove_padding=true", "data.share_prompt=true", "data.max_tokens_per_micro_batch=700"),
    }
    runs = {
        name: read_metrics(run_trainer(tmp_path, tiny_model_dir, demo_data_dir, *extra, *common, name=name)[1])
        for name, extra in variants.items()
    }
    for name in ("micro4", "packed", "shared"):
        for step in (1, 2, 3):
            assert runs[name][step]["train/loss"] == pytest.approx(runs["micro1"][step]["train/loss"], abs=1e-5), (
                name,
                step,
            )
            assert runs[name][step]["train/grad_norm"] == pytest.approx(
                runs["micro1"][step]["train/grad_norm"], rel=1e-4
            ), (name, step)
        assert runs[name][3]["val/loss"] == pytest.approx(runs["micro1"][3]["val/loss"], abs=1e-5), name
    assert runs["micro1"][1]["train/micro_batches"] == 4 and runs["micro4"][1]["train/micro_batches"] == 1
    # packed rows carry no padding at any step (with these equal losses, packing learns as the shared layout
    # does in test_two_rank_run_learns_and_writes_hf_checkpoint)
    assert all(runs["packed"][step]["train/real_token_share"] == 1.0 for step in (1, 2, 3))
    assert runs["packed"][1]["train/real_token_share"] > runs["micro4"][1]["train/real_token_share"]
    assert runs["packed"][1]["train/micro_batches"] >= 2  # 4 pairs of ~300-700 tokens do not fit one 700-token budget
    # the shared prompt is computed once: fewer computed tokens per pair than packing the two conversations
    assert runs["shared"][1]["train/tokens_per_pair"] < runs["packed"][1]["train/tokens_per_pair"]


def test_logged_step_metrics_are_over_all_ranks_pairs(reference_run, tiny_model_dir, demo_data_dir):
    """Step 1's train loss/accuracy/rewards == a hand computation over both ranks' 4 pairs each.

    The rewards come from transformers run one conversation at a time (no btrm.batching), on the
    model the trainer starts from (seeded score head), for the pairs DistributedSampler gives each rank.
    """
    from torch.utils.data import DistributedSampler
    from transformers import AutoTokenizer

    from btrm.modeling import load_value_head_model, seed_everything

    _, _, metrics = reference_run
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    config = compose("data.max_length=1024").data  # what the run reads: trainer.yaml with MAX_LENGTH=1024 (conftest)
    dataset = pair_dataset.PairDataset([str(demo_data_dir / "train.parquet")], tokenizer, config, max_samples=48)
    step_pairs = []
    for rank in range(2):
        sampler = DistributedSampler(dataset, num_replicas=2, rank=rank, shuffle=True, seed=42, drop_last=True)
        sampler.set_epoch(0)
        step_pairs += [dataset[i] for i in list(sampler)[:4]]
    seed_everything(42)
    model = load_value_head_model(
        str(tiny_model_dir), attn_implementation="sdpa", torch_dtype=torch.float32, trust_remote_code=False
    ).eval()
    with torch.no_grad():
        reward = lambda ids: model(input_ids=torch.tensor([ids])).logits[0, -1, 0].item()  # noqa: E731
        chosen = torch.tensor([reward(p.chosen) for p in step_pairs], dtype=torch.float64)
        rejected = torch.tensor([reward(p.rejected) for p in step_pairs], dtype=torch.float64)
    hand_loss = torch.log1p(torch.exp(-(chosen - rejected))).mean().item()
    logged = metrics[1]
    assert logged["train/loss"] == pytest.approx(hand_loss, abs=1e-6)
    assert logged["train/accuracy"] == (chosen > rejected).double().mean().item()
    assert logged["train/chosen_reward"] == pytest.approx(chosen.mean().item(), abs=1e-6)
    assert logged["train/rejected_reward"] == pytest.approx(rejected.mean().item(), abs=1e-6)
    # rank 0's pairs alone differ from the whole step: this test can tell the two apart
    rank0 = torch.log1p(torch.exp(-(chosen[:4] - rejected[:4]))).mean().item()
    assert abs(rank0 - hand_loss) > 1e-5


def test_per_strength_validation_metrics_cover_every_validation_pair(reference_run, demo_data_dir):
    """On 2 ranks each rank scores half the validation set: the val/*_sK counts add up to the whole set (48 pairs),
    split by |preference_strength| as the data file has it, and their pair-weighted accuracy is val/accuracy."""
    import collections

    import pyarrow.parquet as pq

    _, _, metrics = reference_run
    strengths = pq.read_table(demo_data_dir / "test.parquet").slice(0, 48).column("preference_strength").to_pylist()
    expected_counts = collections.Counter(abs(s) for s in strengths)
    for step in (3, 6, 9, 12):
        logged = metrics[step]
        counts = {k: logged[f"val/pairs_s{k}"] for k in (1, 2, 3) if f"val/pairs_s{k}" in logged}
        assert counts == dict(expected_counts), step
        weighted = sum(logged[f"val/accuracy_s{k}"] * n for k, n in counts.items()) / sum(counts.values())
        assert weighted == pytest.approx(logged["val/accuracy"], abs=1e-12), step


def test_startup_summary_reports_the_runs_numbers(reference_run, tiny_model_dir, demo_data_dir):
    """The start-up table's counts == the data and model counted here independently."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, result, _ = reference_run
    rows = dict(
        re.match(r"(\S+(?: \S+)?)\s{2,}(.*)", line).groups()
        for line in result.stdout.splitlines()
        if re.match(
            r"(device|model|parameters|train data|val data|tokens|truncated|schedule|batch|resume|output)\s{2,}", line
        )
    )
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    lengths = []
    for split in ("train", "test"):
        import pyarrow.parquet as pq

        table = pq.read_table(demo_data_dir / f"{split}.parquet").slice(0, 48)
        for column in ("chosen", "rejected"):
            lengths += [
                len(tokenizer.apply_chat_template(json.loads(c), tokenize=True))
                for c in table.column(column).to_pylist()
            ]
    causal_lm = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    backbone = sum(p.numel() for name, p in causal_lm.named_parameters() if not name.startswith("lm_head"))
    hidden = causal_lm.config.hidden_size
    total, trainable = backbone + hidden + 1, backbone + hidden  # + score weight and its frozen bias
    human = lambda n: f"{n / 1e3:.3g} k" if n < 1e6 else f"{n / 1e6:.3g} M"  # noqa: E731
    assert rows["device"] == "cpu (gloo), 2 ranks on 1 node"
    assert rows["model"].endswith("-> Qwen3ForTokenClassification")
    assert rows["parameters"] == f"{human(total)} ({human(trainable)} trainable)"
    assert rows["train data"] == "48 pairs" and rows["val data"] == "48 pairs"
    assert rows["tokens"].startswith(f"{sum(lengths) / len(lengths):,.0f} mean, {max(lengths):,} max per conversation")
    assert rows["truncated"].startswith("0 pairs, 0 tokens dropped")
    assert rows["schedule"] == "6 steps/epoch x 2 epochs = 12 steps"  # 48 pairs / 8 per step
    assert rows["batch"] == (  # conftest's MICRO_BATCH_SIZE=2 caps the auto budget's micro-batches
        "8 pairs/step over 2 ranks; micro-batches of <= 4,096 computed tokens (auto: the CPU default), "
        "at most 2 pairs (data.micro_batch_size_per_gpu)"
    )
    assert rows["resume"].startswith("fresh start")


def test_resume_from_an_epoch_boundary_equals_the_uninterrupted_run(
    tmp_path, reference_run, tiny_model_dir, demo_data_dir
):
    _, _, full = reference_run
    assert sorted(full) == list(range(1, 13))
    run_trainer(tmp_path, tiny_model_dir, demo_data_dir, *REFERENCE, "trainer.total_training_steps=6", name="boundary")
    second, _ = run_trainer(tmp_path, tiny_model_dir, demo_data_dir, *REFERENCE, name="boundary")
    assert "resumed from" in second.stdout and "global_step_6" in second.stdout
    assert history(tmp_path, "boundary") == full  # every digit, steps 1..12; epoch 2 is not skipped
    # a rerun of the finished run trains nothing and says where the final checkpoint is
    third, _ = run_trainer(tmp_path, tiny_model_dir, demo_data_dir, *REFERENCE, name="boundary")
    assert "run complete: step 12 of 12" in third.stdout and "global_step_12" in third.stdout
    assert "None" not in third.stdout.splitlines()[-1]
    assert history(tmp_path, "boundary") == full


def test_kill_during_save_and_retention_still_resumes_exactly(tmp_path, reference_run, tiny_model_dir, demo_data_dir):
    """Stop mid-epoch at step 4 with max_ckpt_to_keep=1, then leave what kills would leave: a cut-off
    save of step 6 (one shard, no completeness mark) and a cut-off removal of step 2. The rerun resumes
    from step 4, equal to the uninterrupted run, and retention ends with one complete checkpoint."""
    _, _, full = reference_run
    keep_one = (*REFERENCE[:-2], "trainer.save_freq=2", "trainer.max_ckpt_to_keep=1", REFERENCE[-1])
    run_trainer(tmp_path, tiny_model_dir, demo_data_dir, *keep_one, "trainer.total_training_steps=4", name="killed")
    root = tmp_path / "ckpt" / "killed"
    assert sorted(p.name for p in root.glob("global_step_*")) == ["global_step_4"]
    cut_save = root / "global_step_6"
    cut_save.mkdir()
    (cut_save / "model_world_size_2_rank_0.pt").write_bytes(
        (root / "global_step_4" / "model_world_size_2_rank_0.pt").read_bytes()[:100]
    )
    (root / ".removing-global_step_2").mkdir()
    (root / ".removing-global_step_2" / "optim_world_size_2_rank_1.pt").write_bytes(b"partial")
    second, _ = run_trainer(tmp_path, tiny_model_dir, demo_data_dir, *keep_one, name="killed")
    assert "resumed from" in second.stdout and "global_step_4" in second.stdout
    got = history(tmp_path, "killed")
    got[4] = {
        k: v for k, v in got[4].items() if not k.startswith("val/")
    }  # the stopped launch validated at its last step
    assert got == full
    assert sorted(p.name for p in root.iterdir() if "global_step" in p.name) == ["global_step_12"]
    assert (root / "global_step_12" / "bt_state.json").is_file()


def test_missing_data_state_stops_instead_of_replaying(tmp_path, reference_run, tiny_model_dir, demo_data_dir):
    import shutil

    reference_dir, _, _ = reference_run
    root = tmp_path / "ckpt" / "copied"
    shutil.copytree(reference_dir / "ckpt" / "reference", root)
    (root / "global_step_12" / "data.pt").unlink()
    result, _ = run_trainer(tmp_path, tiny_model_dir, demo_data_dir, *REFERENCE, name="copied", expect_success=False)
    assert result.returncode != 0
    assert f"{root}/global_step_12/data.pt: missing from the checkpoint" in result.stdout + result.stderr
    assert f"resume_from_path={root}/global_step_9" in result.stdout + result.stderr


def test_diverged_run_stops_without_saving_non_finite_state(tmp_path, tiny_model_dir, demo_data_dir):
    result, _ = run_trainer(
        tmp_path,
        tiny_model_dir,
        demo_data_dir,
        "data.max_samples=48",
        "trainer.total_epochs=2",
        "optim.lr=1e6",
        "trainer.save_freq=1",
        "trainer.max_consecutive_skipped_steps=2",
        "trainer.test_freq=-1",
        "trainer.checkpoint.save_contents=[model,optimizer,extra]",
        name="diverged",
        expect_success=False,
    )
    assert result.returncode != 0
    assert "2 consecutive steps had non-finite gradients" in result.stdout + result.stderr
    root = tmp_path / "ckpt" / "diverged"
    lines = (root / "metrics.jsonl").read_text().splitlines()
    records = [
        json.loads(line, parse_constant=lambda name: pytest.fail(f"bare {name} in the history")) for line in lines
    ]
    skipped = [r["data"]["train/skipped_steps"] for r in records]
    assert skipped[-2:] == [skipped[-3] + 1, skipped[-3] + 2] and records[-1]["data"]["train/grad_norm"] is None
    tracked = int((root / "latest_checkpointed_iteration.txt").read_text())
    assert tracked < len(records) - 1  # the steps whose updates were skipped were not saved
    assert not (root / f"global_step_{len(records)}").exists()
    for shard in (root / f"global_step_{tracked}").glob("model_world_size_*"):
        from btrm.checkpoint import weights_only_loading

        with weights_only_loading():
            state = torch.load(shard)
        assert all(torch.isfinite(t.to_local() if hasattr(t, "to_local") else t).all() for t in state.values())


# ---- paths users take: multi-node launch, memory knobs, tied embeddings


def test_multi_node_launch_equals_one_two_rank_launch(tmp_path, reference_run, tiny_model_dir, demo_data_dir):
    """The README's multi-node form: two run_bt_rm.sh launches (WORLD_SIZE=2, RANK=0/1), one rank each."""
    from conftest import free_port, trainer_env

    env = {
        **trainer_env(tmp_path, tiny_model_dir, demo_data_dir, 1, "nodes"),
        "WORLD_SIZE": "2",
        "MASTER_PORT": str(free_port()),
        "MASTER_ADDR": "127.0.0.1",
    }
    command = ["bash", str(REPO / "run_bt_rm.sh"), "trainer.device=cpu", *REFERENCE]
    nodes = [
        subprocess.Popen(
            command,
            env={**env, "RANK": str(rank)},
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in (0, 1)
    ]
    outputs = [node.communicate(timeout=300)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    assert history(tmp_path, "nodes") == reference_run[2]


def test_memory_knobs_do_not_change_training(tmp_path, reference_run, tiny_model_dir, demo_data_dir):
    """Gradient checkpointing off and FSDP2 CPU offload give the reference run's steps."""
    run_trainer(
        tmp_path,
        tiny_model_dir,
        demo_data_dir,
        *REFERENCE,
        "trainer.total_training_steps=3",
        "model.enable_gradient_checkpointing=false",
        "model.fsdp_config.cpu_offload=true",
        name="knobs",
    )
    got, full = history(tmp_path, "knobs"), reference_run[2]
    for step in (1, 2, 3):
        for key, value in full[step].items():
            assert got[step][key] == pytest.approx(value, rel=1e-5, abs=1e-6), (step, key)


def test_tied_embeddings_model_trains_and_exports(tmp_path, tiny_model_dir, demo_data_dir):
    """Tied-embedding models skip verl's meta-device init (every rank builds the full model)."""
    from transformers import AutoModelForTokenClassification

    from demo.make_tiny_model import build_tiny_model

    tied_dir = build_tiny_model(tmp_path / "tied-qwen3", seed=0, tie_word_embeddings=True)
    assert json.loads((tied_dir / "config.json").read_text())["tie_word_embeddings"] is True
    _, metrics_file = run_trainer(
        tmp_path,
        tied_dir,
        demo_data_dir,
        "data.max_samples=48",
        "trainer.total_training_steps=3",
        "trainer.test_freq=3",
        name="tied",
    )
    metrics = read_metrics(metrics_file)
    assert metrics[1]["train/loss"] == pytest.approx(math.log(2), abs=0.02) and math.isfinite(metrics[3]["val/loss"])
    exported = AutoModelForTokenClassification.from_pretrained(
        tmp_path / "ckpt" / "tied" / "global_step_3" / "huggingface"
    )
    assert exported.score.weight.abs().sum() > 0


# ---- LoRA: one 2-rank run (adapters on every block linear, bf16 frozen backbone) serves these tests

LORA = (
    "model.lora_rank=8",
    "model.lora_alpha=16",
    "data.train_batch_size=16",
    "trainer.total_training_steps=24",
    "trainer.test_freq=12",
    "trainer.save_freq=12",
    "optim.warmup_steps_ratio=0.05",
)


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tiny_model_dir, demo_data_dir):
    tmp_path = tmp_path_factory.mktemp("lora")
    result, _ = run_trainer(tmp_path, tiny_model_dir, demo_data_dir, *LORA, name="lora")
    return tmp_path, result, history(tmp_path, "lora")


def test_lora_run_learns_and_trains_only_adapters_and_head(lora_run, tiny_model_dir):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    tmp_path, result, metrics = lora_run
    assert metrics[1]["train/loss"] == pytest.approx(math.log(2), abs=0.02)
    assert metrics[24]["val/accuracy"] >= 0.75 and metrics[24]["val/loss"] < math.log(2) - 0.1
    step_dir = tmp_path / "ckpt" / "lora" / "global_step_24"
    original = {
        k: v
        for k, v in AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict().items()
        if not k.startswith("lm_head")
    }
    merged = load_file(step_dir / "huggingface" / "model.safetensors")
    adapter = load_file(step_dir / "lora_adapter" / "adapter_model.safetensors")
    config = json.loads((step_dir / "lora_adapter" / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["modules_to_save"] == ["score"] and len(config["target_modules"]) == 7
    scaling = config["lora_alpha"] / config["r"]
    lora_a = {
        k.replace(".lora_A.weight", ".weight").replace("base_model.model.", ""): v
        for k, v in adapter.items()
        if ".lora_A." in k
    }
    assert len(lora_a) == 7 * 2  # 7 linear layers in each of the tiny model's 2 blocks
    # base weights untouched: every merged weight is the original (kept in bf16) plus, where adapted, scaling * B @ A
    for key, weight in original.items():
        expected = weight.to(torch.bfloat16).float()
        if key in lora_a:
            lora_b = adapter["base_model.model." + key.replace(".weight", ".lora_B.weight")]
            expected = expected + scaling * (lora_b.float() @ lora_a[key].float())
            assert lora_b.abs().max() > 0, key  # B starts at zero: the adapter trained
        torch.testing.assert_close(merged[key], expected, rtol=0, atol=1e-6, msg=key)
    assert torch.equal(merged["score.weight"], adapter["base_model.model.score.weight"])
    assert set(merged) == set(original) | {"score.weight"}  # a plain value-head checkpoint: no peft keys, no bias
    # per adapted layer r * (in + out), plus the score weight: what the optimizer holds state for (over both
    # ranks' shards) and what the start-up line reports
    trainable = sum(
        8 * (a.shape[1] + adapter["base_model.model." + k.replace(".weight", ".lora_B.weight")].shape[0])
        for k, a in lora_a.items()
    )
    trainable += merged["score.weight"].numel()
    from btrm.checkpoint import weights_only_loading

    optimizer_numel = 0
    for rank in (0, 1):
        with weights_only_loading():
            state = torch.load(step_dir / f"optim_world_size_2_rank_{rank}.pt")["state"]
        optimizer_numel += sum(
            (s["exp_avg"].to_local() if hasattr(s["exp_avg"], "to_local") else s["exp_avg"]).numel()
            for s in state.values()
        )
        with weights_only_loading():
            groups = torch.load(step_dir / f"optim_world_size_2_rank_{rank}.pt")["param_groups"]
        assert (
            sum(len(group["params"]) for group in groups) == 2 * len(lora_a) + 1
        )  # A and B of each layer, the score weight
    assert optimizer_numel == trainable
    parameters_row = next(line for line in result.stdout.splitlines() if line.startswith("parameters"))
    assert f"({trainable / 1e3:.3g} k trainable)" in parameters_row


def test_lora_merged_export_scores_like_the_in_training_model(lora_run, demo_data_dir):
    """Mean rewards of the merged export over the validation pairs (transformers, one conversation at a
    time, no peft) == the trainer's own val/chosen_reward and val/rejected_reward at the last step."""
    import pyarrow.parquet as pq
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tmp_path, _, metrics = lora_run
    hf = tmp_path / "ckpt" / "lora" / "global_step_24" / "huggingface"
    model = AutoModelForSequenceClassification.from_pretrained(hf, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(hf)
    table = pq.read_table(demo_data_dir / "test.parquet")
    with torch.no_grad():
        for column in ("chosen", "rejected"):
            rewards = [
                model(input_ids=torch.tensor([tokenizer.apply_chat_template(json.loads(c), tokenize=True)]))
                .logits[0, 0]
                .item()
                for c in table.column(column).to_pylist()
            ]
            assert sum(rewards) / len(rewards) == pytest.approx(metrics[24][f"val/{column}_reward"], abs=1e-5), column


def test_lora_resume_equals_the_uninterrupted_run(tmp_path, lora_run, tiny_model_dir, demo_data_dir):
    """Resume from the step-12 checkpoint of the LoRA run: steps 13-24 equal the uninterrupted run's."""
    import shutil

    reference_dir, _, full = lora_run
    root = tmp_path / "ckpt" / "lora_resumed"
    root.mkdir(parents=True)
    shutil.copytree(reference_dir / "ckpt" / "lora" / "global_step_12", root / "global_step_12")
    (root / "latest_checkpointed_iteration.txt").write_text("12")
    kept = [
        line
        for line in (reference_dir / "ckpt" / "lora" / "metrics.jsonl").read_text().splitlines()
        if json.loads(line)["step"] <= 12
    ]
    (root / "metrics.jsonl").write_text("\n".join(kept) + "\n")
    result, _ = run_trainer(tmp_path, tiny_model_dir, demo_data_dir, *LORA, name="lora_resumed")
    assert "resumed from" in result.stdout and "global_step_12 (step 12)" in result.stdout
    assert history(tmp_path, "lora_resumed") == full
    # the same directory without LoRA: one line naming the checkpoint, not a key mismatch deep in verl
    full_fine_tune = [arg for arg in LORA if not arg.startswith("model.lora")]
    refused, _ = run_trainer(
        tmp_path, tiny_model_dir, demo_data_dir, *full_fine_tune, name="lora_resumed", expect_success=False
    )
    assert refused.returncode == 2
    assert (
        f"{root}/global_step_24: saved with LoRA {{'rank': 8" in refused.stderr
        and "this run has LoRA off (full fine-tune)" in refused.stderr
    )

"""btrm.export: verl's HF export becomes one checkpoint every reader loads cleanly and scores the same.

The checkpoint is built as the trainer's export is: the TokenClassification value head of
`modeling.load_value_head_model` (score bias zero and frozen, pad_token_id set, a random score head
of std 1), written with save_pretrained + the tokenizer (what verl's
FSDPCheckpointManager writes under global_step_N/huggingface/).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import warnings
from pathlib import Path

import pytest
import torch

from btrm import batching, export, modeling, pair_dataset

TOL = 1e-5

CONVERSATIONS = [
    [
        {"role": "user", "content": "How do I bake bread?"},
        {"role": "assistant", "content": "First, gather flour, water, salt and yeast."},
    ],
    [
        {"role": "user", "content": "How do I bake bread?"},
        {"role": "assistant", "content": "Just search for it yourself."},
    ],
    [
        {"role": "system", "content": "You are a concise assistant."},
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "Blue."},
        {"role": "user", "content": "Another one, and why?"},
        {
            "role": "assistant",
            "content": "Green: it is the colour of most leaves, because chlorophyll reflects green light.",
        },
    ],
    [
        {"role": "user", "content": "Übersetze: «bonjour» 🙂"},
        {"role": "assistant", "content": "Hallo! (wörtlich: guten Tag)"},
    ],
    [{"role": "user", "content": "Say nothing."}, {"role": "assistant", "content": "."}],
]


def make_value_head_export(
    base_dir: Path, out_dir: Path, *, seed: int = 0, max_shard_size: str | None = None, bias: float = 0.0
):
    """(in-memory TokenClassification model, export dir) as the trainer + verl's checkpoint manager write it."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    model = modeling.load_value_head_model(
        str(base_dir), attn_implementation="sdpa", torch_dtype=torch.float32, trust_remote_code=False
    )
    model.config.pad_token_id = tokenizer.pad_token_id  # as BTRewardTrainer._build_model_optimizer does
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        model.score.weight.copy_(torch.randn(model.score.weight.shape, generator=generator))  # std 1
        model.score.bias.fill_(bias)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(out_dir, **kwargs)
    tokenizer.save_pretrained(out_dir)
    return model.eval(), Path(out_dir)


@contextlib.contextmanager
def captured_loading_messages():
    """Every transformers log record (WARNING and up) and Python warning raised inside the block."""
    records: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    handler = Collect(level=logging.WARNING)
    logger = logging.getLogger("transformers")
    logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield records
        records.extend(str(w.message) for w in caught)
    finally:
        logger.removeHandler(handler)


def digest(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir()) if p.is_file()}


def verl_rule_rewards(model, tokenizer, conversations) -> list[float]:
    """verl 0.6.1's reading with verl's helpers: right padding, compute_position_id_with_mask, argmax(pos * mask)."""
    from verl.utils.model import compute_position_id_with_mask

    sequences = [pair_dataset.encode_conversation(tokenizer, c) for c in conversations]
    longest = max(map(len, sequences))
    input_ids = torch.full((len(sequences), longest), tokenizer.pad_token_id)
    attention_mask = torch.zeros((len(sequences), longest), dtype=torch.long)
    for row, ids in enumerate(sequences):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        attention_mask[row, : len(ids)] = 1
    position_ids = compute_position_id_with_mask(attention_mask)
    with torch.no_grad():
        logits = model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
        ).logits.squeeze(-1)
    return logits[torch.arange(len(sequences)), torch.argmax(position_ids * attention_mask, dim=-1)].tolist()


def rewardbench_runner_rewards(model, tokenizer_path: str, texts: list[str]) -> list[float]:
    """allenai/reward-bench rewardbench/rewardbench.py (classifier branch): its pipeline set-up and call, verbatim."""
    from transformers import AutoTokenizer, pipeline

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    tokenizer.padding_side = "left"
    reward_pipeline_kwargs = {
        "batch_size": 8,
        "truncation": False,
        "padding": True,
        "max_length": 512,
        "function_to_apply": "none",
        "return_token_type_ids": False,
    }
    reward_pipe = pipeline("text-classification", model=model, tokenizer=tokenizer)
    return [result["score"] for result in reward_pipe(texts, **reward_pipeline_kwargs)]


@pytest.fixture(scope="module")
def exported(tiny_model_dir, tmp_path_factory):
    """(reference model, tokenizer, exported dir, export result)."""
    from transformers import AutoTokenizer

    model, hf_dir = make_value_head_export(tiny_model_dir, tmp_path_factory.mktemp("export") / "huggingface")
    result = export.export_reward_model(hf_dir)
    return model, AutoTokenizer.from_pretrained(hf_dir), hf_dir, result


def assert_export_scores_like(hf_dir, model) -> None:
    """The export loads as *ForSequenceClassification with every weight found and scores CONVERSATIONS as `model`."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    loaded, info = AutoModelForSequenceClassification.from_pretrained(
        hf_dir, dtype=torch.float32, output_loading_info=True
    )
    assert not any(info.values())
    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    rewards = [torch.tensor(batching.score(m, tokenizer, CONVERSATIONS)) for m in (loaded, model)]
    assert (rewards[0] - rewards[1]).abs().max() < TOL


def test_export_declares_sequence_classification_and_drops_the_zero_bias(exported):
    from safetensors import safe_open

    _, tokenizer, hf_dir, result = exported
    config = json.loads((hf_dir / "config.json").read_text())
    assert result.architecture == "Qwen3ForSequenceClassification" and result.dropped == ["score.bias"]
    assert config["architectures"] == ["Qwen3ForSequenceClassification"]
    assert config["id2label"] == {"0": "LABEL_0"} and config["label2id"] == {"LABEL_0": 0}
    assert config["pad_token_id"] == tokenizer.pad_token_id != tokenizer.eos_token_id
    assert config["problem_type"] == "regression"
    with safe_open(str(hf_dir / "model.safetensors"), framework="pt") as handle:
        keys = set(handle.keys())
    assert "score.weight" in keys and "score.bias" not in keys


def test_export_is_idempotent(exported):
    _, _, hf_dir, _ = exported
    before = digest(hf_dir)
    again = export.export_reward_model(hf_dir)
    assert not again.changed and again.dropped == [] and again.architecture == "Qwen3ForSequenceClassification"
    assert digest(hf_dir) == before


def test_loading_as_the_declared_class_reports_nothing(exported):
    from transformers import AutoConfig, AutoModelForSequenceClassification

    _, _, hf_dir, _ = exported
    with captured_loading_messages() as messages:
        model, info = AutoModelForSequenceClassification.from_pretrained(
            hf_dir, dtype=torch.float32, output_loading_info=True
        )
    assert type(model).__name__ == AutoConfig.from_pretrained(hf_dir).architectures[0]
    assert info == {"missing_keys": [], "unexpected_keys": [], "mismatched_keys": [], "error_msgs": []}
    assert messages == []
    export.load_reward_model(hf_dir)  # the project's loader refuses anything else


def test_the_project_loader_reads_the_value_head_as_verl_does_and_refuses_anything_else(
    exported, tiny_model_dir, tmp_path
):
    """export.load_reward_model (evaluate_rm.py's loader): verl's class, the dtype asked for, no notice, zero bias."""
    reference_model, tokenizer, hf_dir, _ = exported
    with captured_loading_messages() as messages:
        model, loaded_tokenizer = export.load_reward_model(hf_dir, dtype=torch.bfloat16)
    assert messages == []  # transformers' "newly initialized score.bias" notice is expected, hence silenced
    assert (
        type(model).__name__ == "Qwen3ForTokenClassification" and model.num_labels == 1
    )  # verl 0.6.1 RewardModelWorker's class
    assert (
        model.dtype == torch.bfloat16
        and not model.training
        and torch.equal(model.score.bias, torch.zeros(1, dtype=torch.bfloat16))
    )
    assert loaded_tokenizer.pad_token_id == tokenizer.pad_token_id
    fp32, _ = export.load_reward_model(hf_dir)
    assert fp32.dtype == torch.float32
    difference = (
        (
            torch.tensor(batching.score(fp32, tokenizer, CONVERSATIONS))
            - torch.tensor(batching.score(reference_model, tokenizer, CONVERSATIONS))
        )
        .abs()
        .max()
    )
    assert difference < TOL

    _, unexported = make_value_head_export(
        tiny_model_dir, tmp_path / "unexported", bias=0.25
    )  # the trainer's head, bias kept
    assert export.load_reward_model(unexported)[0].score.bias.item() == 0.25
    with pytest.raises(
        export.ExportError,
        match=r"not a value-head checkpoint \(loading as Qwen3ForTokenClassification: missing \['score.bias', 'score.weight'\], unexpected \['lm_head.weight'\]",
    ):
        export.load_reward_model(tiny_model_dir)  # the base causal LM


def test_token_classification_loader_zero_initialises_the_dropped_bias(exported):
    """verl 0.6.1's RewardModelWorker loader: the one expected message is score.bias, initialised to exactly 0."""
    from transformers import AutoConfig, AutoModelForTokenClassification

    _, _, hf_dir, _ = exported
    config = AutoConfig.from_pretrained(hf_dir)
    config.num_labels, config.classifier_dropout = 1, 0.0
    with captured_loading_messages() as messages:
        model, info = AutoModelForTokenClassification.from_pretrained(
            hf_dir, config=config, dtype=torch.float32, output_loading_info=True
        )
    assert info["missing_keys"] == ["score.bias"] and info["unexpected_keys"] == [] and info["mismatched_keys"] == []
    assert torch.equal(model.score.bias, torch.zeros(1))
    assert len(messages) == 1 and "score.bias" in messages[0] and "newly initialized" in messages[0]


@pytest.mark.filterwarnings("ignore:`max_length` is ignored")  # RewardBench's own kwargs
def test_every_reader_gives_the_trained_rewards(exported):
    from transformers import AutoModelForSequenceClassification, AutoModelForTokenClassification, pipeline

    reference_model, tokenizer, hf_dir, _ = exported
    reference = torch.tensor(batching.score(reference_model, tokenizer, CONVERSATIONS))
    assert reference.std() > 0.5  # a head that tells conversations apart

    seq_cls = AutoModelForSequenceClassification.from_pretrained(hf_dir, dtype=torch.float32).eval()
    tok_cls = AutoModelForTokenClassification.from_pretrained(hf_dir, num_labels=1, dtype=torch.float32).eval()
    pipe = pipeline("text-classification", model=str(hf_dir), dtype=torch.float32)
    texts = [tokenizer.apply_chat_template(c, tokenize=False) for c in CONVERSATIONS]
    readers = {
        "score(SequenceClassification)": batching.score(seq_cls, tokenizer, CONVERSATIONS),
        "score(TokenClassification)": batching.score(tok_cls, tokenizer, CONVERSATIONS),
        "SequenceClassification batch forward": seq_cls(
            **tokenizer(texts, padding=True, add_special_tokens=False, return_tensors="pt")
        )
        .logits.squeeze(-1)
        .tolist(),
        "verl 0.6.1 reading rule": verl_rule_rewards(tok_cls, tokenizer, CONVERSATIONS),
        'pipeline(function_to_apply="none")': [
            o["score"] for o in pipe(texts, function_to_apply="none", add_special_tokens=False)
        ],
        "pipeline default (problem_type regression)": [o["score"] for o in pipe(texts, add_special_tokens=False)],
        "RewardBench runner's pipeline call": rewardbench_runner_rewards(seq_cls, str(hf_dir), texts),
    }
    differences = {name: (torch.tensor(rewards) - reference).abs().max().item() for name, rewards in readers.items()}
    print("max |reward - trained reward| per reader:", differences)
    assert max(differences.values()) < TOL, differences


def test_sharded_export_updates_the_index(tiny_model_dir, tmp_path):
    from safetensors import safe_open

    model, hf_dir = make_value_head_export(tiny_model_dir, tmp_path / "huggingface", seed=3, max_shard_size="60KB")
    index_before = json.loads((hf_dir / "model.safetensors.index.json").read_text())
    assert len(set(index_before["weight_map"].values())) > 1 and "score.bias" in index_before["weight_map"]
    result = export.export_reward_model(hf_dir)
    assert result.dropped == ["score.bias"]
    assert set(result.written) == {
        index_before["weight_map"]["score.bias"],
        "model.safetensors.index.json",
        "config.json",
    }
    index = json.loads((hf_dir / "model.safetensors.index.json").read_text())
    assert "score.bias" not in index["weight_map"]
    total = 0
    for name in set(index["weight_map"].values()):
        with safe_open(str(hf_dir / name), framework="pt") as handle:
            assert {k for k, v in index["weight_map"].items() if v == name} == set(handle.keys())
            total += sum(handle.get_tensor(k).nbytes for k in handle.keys())  # noqa: SIM118 (safe_open is not iterable)
    assert index["metadata"]["total_size"] == total
    assert_export_scores_like(hf_dir, model)
    assert not export.export_reward_model(hf_dir).changed


def test_non_zero_bias_is_refused_and_nothing_is_changed(tiny_model_dir, tmp_path):
    _, hf_dir = make_value_head_export(tiny_model_dir, tmp_path / "huggingface", bias=0.25)
    before = digest(hf_dir)
    with pytest.raises(export.ExportError, match="score.bias is not zero"):
        export.export_reward_model(hf_dir)
    assert digest(hf_dir) == before


def test_a_causal_lm_export_is_refused_naming_the_weights(tiny_model_dir, tmp_path):
    """verl's export of an unconverted model (lm_head, no score head) cannot be declared a reward model."""
    hf_dir = tmp_path / "huggingface"
    shutil.copytree(tiny_model_dir, hf_dir)
    with pytest.raises(export.ExportError, match=r"unexpected \['lm_head.weight'\], missing \['score.weight'\]"):
        export.export_reward_model(hf_dir)


def test_a_failed_export_leaves_the_previous_files(tiny_model_dir, tmp_path, monkeypatch):
    _, hf_dir = make_value_head_export(tiny_model_dir, tmp_path / "huggingface")
    before = digest(hf_dir)

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(export, "_rewrite_without", killed)
    with pytest.raises(KeyboardInterrupt):
        export.export_reward_model(hf_dir)
    assert digest(hf_dir) == before
    assert not list(hf_dir.glob(".*.tmp"))
    monkeypatch.undo()
    assert export.export_reward_model(hf_dir).dropped == ["score.bias"]


def test_config_only_export_is_normalised(tiny_model_dir, tmp_path):
    """checkpoint.save_contents without hf_model: huggingface/ holds config + tokenizer only."""
    _, full = make_value_head_export(tiny_model_dir, tmp_path / "full")
    hf_dir = tmp_path / "huggingface"
    hf_dir.mkdir()
    for path in full.iterdir():
        if not path.name.startswith("model."):
            shutil.copy(path, hf_dir / path.name)
    result = export.export_reward_model(hf_dir)
    assert not result.has_weights and result.dropped == [] and result.written == ["config.json"]
    assert json.loads((hf_dir / "config.json").read_text())["architectures"] == ["Qwen3ForSequenceClassification"]


def test_files_get_the_umask_mode(tiny_model_dir, tmp_path):
    _, hf_dir = make_value_head_export(tiny_model_dir, tmp_path / "huggingface")
    previous = os.umask(0o022)
    try:
        export.export_reward_model(hf_dir)
    finally:
        os.umask(previous)
    for name in ("config.json", "model.safetensors"):
        assert (hf_dir / name).stat().st_mode & 0o777 == 0o644, name


def test_reward_stats_are_stored_kept_and_readable(tiny_model_dir, tmp_path):
    from transformers import AutoConfig, AutoModelForSequenceClassification

    _, hf_dir = make_value_head_export(tiny_model_dir, tmp_path / "huggingface")
    export.export_reward_model(hf_dir)
    assert export.read_reward_stats(hf_dir) is None
    stats = export.write_reward_stats(hf_dir, mean=-0.5, std=2.0, count=352, split="validation")
    assert stats == {"mean": -0.5, "std": 2.0, "count": 352, "split": "validation"}
    assert export.read_reward_stats(hf_dir) == stats
    assert AutoConfig.from_pretrained(hf_dir).reward_normalization == stats
    assert not export.export_reward_model(hf_dir).changed  # the export keeps the metadata
    assert export.read_reward_stats(hf_dir) == stats
    _, info = AutoModelForSequenceClassification.from_pretrained(hf_dir, output_loading_info=True)
    assert not any(info.values())
    for mean, std in ((0.0, 0.0), (float("nan"), 1.0), (0.0, -1.0)):
        with pytest.raises(ValueError):
            export.write_reward_stats(hf_dir, mean, std)
    with pytest.raises(TypeError):
        export.write_config_fields(hf_dir, {"not_json": object()})
    assert export.read_reward_stats(hf_dir) == stats


def test_tied_embeddings_model_exports_cleanly(tmp_path):
    """Qwen3-0.6B/1.7B/4B tie embeddings: the value head has no lm_head, nor does the declared class."""

    from demo.make_tiny_model import build_tiny_model

    tied_dir = build_tiny_model(tmp_path / "tied-qwen3", seed=0, tie_word_embeddings=True)
    model, hf_dir = make_value_head_export(tied_dir, tmp_path / "huggingface", seed=2)
    assert export.export_reward_model(hf_dir).dropped == ["score.bias"]
    assert_export_scores_like(hf_dir, model)

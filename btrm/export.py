"""The consumer checkpoint: what `huggingface/` declares, holds and stores besides the weights.

The trainer trains a `*ForTokenClassification` value head (what verl 0.6.1's `RewardModelWorker`
builds, score bias zero and frozen), and verl's checkpoint manager exports it as such under
`global_step_N/huggingface/`. `export_reward_model(hf_dir)` then turns that export, in place, into
the checkpoint every consumer reads the same way:

- `architectures: ["<Model>ForSequenceClassification"]` (e.g. `Qwen3ForSequenceClassification`),
  `num_labels` 1 (`id2label`/`label2id` of one label), `pad_token_id` = the tokenizer's pad token,
  `problem_type: "regression"` (the reward is a real number: the HF text-classification pipeline
  and vLLM's classify pooler then return it raw instead of through a sigmoid);
- the weights the declared class has, and only those: the TokenClassification head's `score.bias`
  (zero by construction) is dropped, so loading as the declared class reports nothing missing,
  unexpected or newly initialised. A non-zero bias is refused (dropping it would shift every reward).

Why SequenceClassification, from vLLM's own source: github.com/vllm-project/vllm at v0.11.0 (the
newest vLLM verl 0.6.1 accepts: `vllm<=0.11.0`) and v0.33.0 (the newest release), read from the
released wheels; paths and line numbers are those of v0.11.0 unless marked:

- vllm/model_executor/models/registry.py registers no Qwen3 classification class, only
  `"Qwen3ForCausalLM": ("qwen3", "Qwen3ForCausalLM")` (0.11.0 line 144); a `*ForSequenceClassification`
  architecture is served by converting that base model. `_normalize_arch` (0.11.0 lines 701-725):
      match = try_match_architecture_defaults(architecture, ...)
      if match:
          suffix, _ = match
          for repl_suffix, _ in iter_architecture_defaults():
              base_arch = architecture.replace(suffix, repl_suffix)
              if base_arch in self.models:
                  return base_arch
- vllm/config/model.py `_SUFFIX_TO_DEFAULTS` (0.11.0 lines 1533-1549):
      ("ForSequenceClassification", ("pooling", "classify")),
  and no "ForTokenClassification" entry in 0.11.0: a `Qwen3ForTokenClassification` checkpoint matches
  no suffix, so `_get_default_runner_type` (lines 745-767) ends in `return "generate"`: vLLM 0.11
  does not serve it as a reward model. vllm 0.33.0 adds `("ForTokenClassification", ("pooling",
  "classify"))` (line 2348) but then picks the per-token task (lines 1935-1938):
      if "token_classify" in supported_tasks:
          for architecture in self.architectures:
              if "ForTokenClassification" in architecture:
                  return "token_classify"
  i.e. one score per token, not one reward per conversation.
- vllm/model_executor/model_loader/utils.py (0.11.0 lines 204-206): `elif convert_type == "classify":
  model_cls = as_seq_cls_model(model_cls)`; vllm/model_executor/models/adapters.py `as_seq_cls_model`
  (0.11.0 lines 306-313) builds the head without a bias:
      self.score = ReplicatedLinear(hidden_size, config.num_labels, bias=False, ...)
  and pools the last token (vllm/model_executor/models/interfaces_base.py line 144:
  `default_pooling_type: ClassVar[str] = "LAST"`), the token training reads.
- An extra `score.bias` in the checkpoint: vllm 0.11.0's `AutoWeightsLoader._load_module`
  (vllm/model_executor/models/utils.py lines 262-280) finds no `bias` parameter under `score` and
      raise ValueError(f"There is no module or parameter named '{prefix}' in ...")
  (vllm 0.33.0's `as_seq_cls_model.load_weights` accepts it: `auto_set_score_bias`, adapters.py
  lines 390-399). Dropping the zero bias loads in both.
- Activation: vllm/model_executor/layers/pooler.py `get_classification_activation_function`
  (0.11.0 lines 161-171): `if problem_type == "regression": return PoolerIdentity()`; otherwise
  `PoolerClassify`, a sigmoid when num_labels < 2 (lines 378-383); the same rule in v0.33.0
  (vllm/model_executor/layers/pooler/activations.py line 31). Hence `problem_type: "regression"`.
- vLLM's own reward example (examples/pooling/reward) serves Skywork-Reward-V2-Qwen3-0.6B, a
  `Qwen3ForSequenceClassification` checkpoint, with `runner="pooling"`.

The other readers: transformers' `AutoModelForSequenceClassification` (`score` without bias, reads
the rightmost non-pad token: pad_token_id must be set) loads the result with nothing missing or
unexpected; `AutoModelForTokenClassification` (verl 0.6.1's `RewardModelWorker._build_model`) reports
`score.bias` missing and initialises it to 0, exactly the trained value, so its rewards are the same.
tests/test_export.py and tests/test_consumers.py check all of them against `batching.score()`.

Extra metadata lives in config.json (transformers keeps unknown keys as config attributes; vLLM
ignores them): `write_reward_stats(hf_dir, mean, std)` stores `reward_normalization = {"mean", "std"}`
(a consumer normalises with `(reward - mean) / std`); `write_config_fields` stores anything else.
`export_reward_model` keeps such keys. Every write is atomic (atomic.atomic_outputs) and the export
is idempotent: running it again on an exported directory writes nothing.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from btrm import atomic

CONFIG_FILE = "config.json"
SINGLE_WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
REWARD_STATS_KEY = "reward_normalization"
DROPPABLE_KEYS = ("score.bias",)  # in the trained TokenClassification head, absent from SequenceClassification
ZERO_TOLERANCE = 0.0  # the bias is frozen at exactly zero during training


class ExportError(RuntimeError):
    """The HF export cannot become the consumer checkpoint (naming the file and what is wrong)."""


@dataclass
class ExportResult:
    hf_dir: Path
    architecture: str
    dropped: list[str] = field(default_factory=list)
    written: list[str] = field(default_factory=list)
    has_weights: bool = True

    @property
    def changed(self) -> bool:
        return bool(self.written)


# ----------------------------------------------------------------------------- config


def read_config(hf_dir: str | os.PathLike) -> dict[str, Any]:
    path = Path(hf_dir) / CONFIG_FILE
    if not path.is_file():
        raise ExportError(f"{path}: missing; expected the HF export of a verl checkpoint (global_step_N/huggingface)")
    return json.loads(path.read_text(encoding="utf-8"))


def config_text(config: dict[str, Any]) -> str:
    """config.json as transformers writes it (indent 2, sorted keys, trailing newline)."""
    return json.dumps(config, indent=2, sort_keys=True) + "\n"


def sequence_classification_class(config: dict[str, Any]) -> str | None:
    """`<Model>ForSequenceClassification` for this model type in transformers, None if it has none."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES

    if config.get("auto_map"):  # remote code: its own classes decide; leave the declaration alone
        return None
    return MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES.get(config.get("model_type", ""))


def tokenizer_pad_token_id(hf_dir: Path, trust_remote_code: bool) -> int | None:
    from transformers import AutoTokenizer

    if not any((hf_dir / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json")):
        return None
    tokenizer = AutoTokenizer.from_pretrained(hf_dir, trust_remote_code=trust_remote_code)
    return tokenizer.pad_token_id


def consumer_config(config: dict[str, Any], architecture: str, pad_token_id: int | None) -> dict[str, Any]:
    """The config.json a consumer reads: declared class, one real-valued label, the pad token."""
    new = dict(config)
    new["architectures"] = [architecture]
    labels = config.get("id2label") or {}
    label = next(iter(labels.values())) if len(labels) == 1 else "LABEL_0"
    new["id2label"] = {"0": label}
    new["label2id"] = {label: 0}
    new.pop("num_labels", None)  # transformers derives it from id2label
    new["problem_type"] = "regression"
    if pad_token_id is not None:
        new["pad_token_id"] = pad_token_id
    if new.get("pad_token_id") is None:
        raise ExportError(
            "no pad token: neither config.json nor the tokenizer sets one; *ForSequenceClassification reads the "
            "reward at the last non-pad token and needs it"
        )
    return new


# ----------------------------------------------------------------------------- weights


def weight_files(hf_dir: Path) -> tuple[dict[str, str], dict | None]:
    """({tensor name: file name}, index JSON or None); empty when the export holds no weights."""
    index_path = hf_dir / WEIGHTS_INDEX
    if index_path.is_file():
        index = json.loads(index_path.read_text(encoding="utf-8"))
        return dict(index["weight_map"]), index
    single = hf_dir / SINGLE_WEIGHTS
    if single.is_file():
        from safetensors import safe_open

        with safe_open(str(single), framework="pt") as handle:
            return dict.fromkeys(handle.keys(), SINGLE_WEIGHTS), None
    others = sorted(p.name for p in hf_dir.glob("*.bin")) + sorted(p.name for p in hf_dir.glob("*.pt"))
    if others:
        raise ExportError(f"{hf_dir}: weights in {others}; only safetensors exports (verl's) are handled")
    return {}, None


def expected_keys(config: dict[str, Any], trust_remote_code: bool) -> set[str]:
    """The state-dict keys of the declared class, built on the meta device (no memory, any size)."""
    import torch
    from transformers import CONFIG_MAPPING, AutoModelForSequenceClassification

    config_object = CONFIG_MAPPING[config["model_type"]].from_dict(config)
    with torch.device("meta"):
        model = AutoModelForSequenceClassification.from_config(config_object, trust_remote_code=trust_remote_code)
    return set(model.state_dict().keys())


def _check_droppable(hf_dir: Path, file_name: str, key: str) -> int:
    """Bytes of a tensor that may be dropped; raises unless it is exactly zero."""
    from safetensors import safe_open

    with safe_open(str(hf_dir / file_name), framework="pt") as handle:
        tensor = handle.get_tensor(key)
    largest = float(tensor.abs().max()) if tensor.numel() else 0.0
    if not largest <= ZERO_TOLERANCE:
        raise ExportError(
            f"{hf_dir / file_name}: {key} is not zero (max |value| {largest:g}); the declared "
            f"*ForSequenceClassification has no bias, so dropping it would shift every reward. "
            f"The trainer keeps it frozen at zero: was this checkpoint trained elsewhere?"
        )
    return tensor.numel() * tensor.element_size()


def _rewrite_without(source: Path, destination: Path, drop: set[str]) -> None:
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(source), framework="pt") as handle:
        metadata = handle.metadata() or {"format": "pt"}
        tensors = {name: handle.get_tensor(name) for name in handle.keys() if name not in drop}  # noqa: SIM118 (safe_open is not iterable)
    save_file(tensors, str(destination), metadata=metadata)


# ----------------------------------------------------------------------------- export


def export_reward_model(hf_dir: str | os.PathLike, *, trust_remote_code: bool = False) -> ExportResult:
    """Turn verl's HF export (`global_step_N/huggingface/`) into the consumer checkpoint, in place.

    Idempotent; atomic per file (changed weight files first, then the index, config.json last, so
    the declaration never precedes its weights). Works on a config-only export too (no hf_model in
    checkpoint.save_contents): the config is normalised, there are no weights to check.
    """
    hf_dir = Path(hf_dir)
    config = read_config(hf_dir)
    architecture = sequence_classification_class(config)
    if architecture is None:
        architecture = (config.get("architectures") or ["unknown"])[0]
        return ExportResult(hf_dir, architecture, has_weights=bool(weight_files(hf_dir)[0]))
    new_config = consumer_config(config, architecture, tokenizer_pad_token_id(hf_dir, trust_remote_code))

    weight_map, index = weight_files(hf_dir)
    dropped: list[str] = []
    rewrites: dict[str, set[str]] = {}
    dropped_bytes = 0
    if weight_map:
        expected = expected_keys(new_config, trust_remote_code)
        present = set(weight_map)
        unexpected = sorted(present - expected)
        missing = sorted(expected - present)
        not_droppable = [key for key in unexpected if key not in DROPPABLE_KEYS]
        if not_droppable or missing:
            raise ExportError(
                f"{hf_dir}: the weights do not match {architecture}: unexpected {not_droppable or 'none'}, "
                f"missing {missing or 'none'}"
            )
        for key in unexpected:
            dropped_bytes += _check_droppable(hf_dir, weight_map[key], key)
            rewrites.setdefault(weight_map[key], set()).add(key)
            dropped.append(key)

    outputs: list[tuple[Path, Any]] = []
    for file_name, drop in sorted(rewrites.items()):
        outputs.append((hf_dir / file_name, ("weights", hf_dir / file_name, drop)))
    if index is not None and dropped:
        new_index = json.loads(json.dumps(index))
        for key in dropped:
            del new_index["weight_map"][key]
        if "total_size" in new_index.get("metadata", {}):
            new_index["metadata"]["total_size"] -= dropped_bytes
        outputs.append((hf_dir / WEIGHTS_INDEX, ("text", json.dumps(new_index, indent=2, sort_keys=True) + "\n")))
    if new_config != config:
        outputs.append((hf_dir / CONFIG_FILE, ("text", config_text(new_config))))

    if outputs:
        with atomic.atomic_outputs([path for path, _ in outputs]) as temps:
            for temp, (_, (kind, *payload)) in zip(temps, outputs, strict=True):
                if kind == "weights":
                    source, drop = payload
                    _rewrite_without(source, temp, drop)
                else:
                    temp.write_text(payload[0], encoding="utf-8")
    return ExportResult(
        hf_dir, architecture, dropped=dropped, written=[path.name for path, _ in outputs], has_weights=bool(weight_map)
    )


# ----------------------------------------------------------------------------- metadata


def write_config_fields(hf_dir: str | os.PathLike, fields: dict[str, Any]) -> dict[str, Any]:
    """Set top-level config.json keys (JSON values), atomically; returns the new config.

    For metadata other features attach to the checkpoint. transformers loads unknown keys as
    config attributes (`AutoConfig.from_pretrained(d).<key>`); vLLM and verl ignore them. Do not
    use transformers' own keys (architectures, id2label, pad_token_id...): `export_reward_model`
    owns those.
    """
    config = read_config(hf_dir)
    new = {**config, **json.loads(json.dumps(fields))}  # JSON round trip: refuses what config.json cannot hold
    if new != config:
        atomic.atomic_write_text(Path(hf_dir) / CONFIG_FILE, config_text(new))
    return new


def write_reward_stats(hf_dir: str | os.PathLike, mean: float, std: float, **extra: Any) -> dict[str, Any]:
    """Store reward normalisation statistics as `config.reward_normalization = {"mean", "std", **extra}`.

    A consumer that wants rewards of mean 0 and std 1 over the data the statistics came from
    computes `(reward - mean) / std` (`read_reward_stats` gives them back). `extra` records where
    they came from, e.g. `count=352, split="validation"`.
    """
    mean, std = float(mean), float(std)
    if not math.isfinite(mean) or not math.isfinite(std) or std <= 0:
        raise ValueError(f"reward statistics must be finite with std > 0, got mean={mean}, std={std}")
    write_config_fields(hf_dir, {REWARD_STATS_KEY: {"mean": mean, "std": std, **extra}})
    return {"mean": mean, "std": std, **extra}


def read_reward_stats(hf_dir: str | os.PathLike) -> dict[str, Any] | None:
    return read_config(hf_dir).get(REWARD_STATS_KEY)


# ----------------------------------------------------------------------------- reading


def load_reward_model(hf_dir: str | os.PathLike, *, dtype=None, device: str = "cpu", trust_remote_code: bool = False):
    """(model, tokenizer) as verl's RewardModelWorker loads the checkpoint: AutoModelForTokenClassification, num_labels=1.

    Refuses a checkpoint that is not a value head: a weight missing, unexpected or mismatched. The
    one exception is `score.bias`, which `export_reward_model` drops only when it is zero: it is
    then set to zero, and transformers' "newly initialized" notice about it is silenced. dtype:
    default float32. Rewards: `batching.score(model, tokenizer, conversations)`.
    """
    import torch
    from transformers import AutoModelForTokenClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    tokenizer = AutoTokenizer.from_pretrained(hf_dir, trust_remote_code=trust_remote_code)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        model, info = AutoModelForTokenClassification.from_pretrained(
            hf_dir,
            num_labels=1,
            dtype=dtype or torch.float32,
            trust_remote_code=trust_remote_code,
            output_loading_info=True,
        )
    finally:
        hf_logging.set_verbosity(verbosity)
    if set(info["missing_keys"]) - set(DROPPABLE_KEYS) or info["unexpected_keys"] or info["mismatched_keys"]:
        raise ExportError(
            f"{hf_dir}: not a value-head checkpoint (loading as {type(model).__name__}: missing {info['missing_keys']}, "
            f"unexpected {info['unexpected_keys']}, mismatched {info['mismatched_keys']})"
        )
    if "score.bias" in info["missing_keys"]:
        with torch.no_grad():
            model.score.bias.zero_()  # what the dropped bias was, whatever transformers initialised it to
    return model.to(device).eval(), tokenizer

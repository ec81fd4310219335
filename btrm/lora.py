"""LoRA for the value-head model: peft adapters on the transformer blocks, the score head fully trained.

    model.lora_rank > 0 (trainer.yaml)  ->  add_lora(model, ...) before FSDP wrapping

What is trained: the LoRA matrices (A, B) of the chosen linear layers of the transformer blocks,
and the score head's weight in full (it is never a LoRA target, so it cannot be lost from the
adapter or left at its random initialisation: the failure peers' users report). The score bias
stays zero and frozen, the backbone's base weights frozen (optionally kept in bf16: they get no
gradient, so they need no fp32 master copy).

What is saved (bt_trainer.save_checkpoint, then `save_exports`): the sharded training state as for a
full fine-tune, then from the full state dict on rank 0
  - huggingface/   the adapter merged into the base weights (`merge_lora_state_dict`): a plain
                   value-head checkpoint that needs no peft and loads exactly like a full fine-tune;
  - lora_adapter/  the adapter alone in peft's format (`adapter_state_dict`, `save_adapter`), with
                   the score head as peft's `modules_to_save`, for `PeftModel.from_pretrained`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

ADAPTER_DIR = "lora_adapter"  # beside huggingface/ in every global_step_N/ of a LoRA run
SCORE_HEAD = "score"  # the value head's module name in transformers' *ForTokenClassification
PEFT_PREFIX = "base_model.model."  # what peft's PeftModel + LoraModel put in front of every model key
ADAPTER_NAME = "default"  # peft's adapter name; removed from keys in peft's saved format


@dataclass(frozen=True)
class LoraSettings:
    rank: int
    alpha: float
    target_modules: tuple[str, ...]  # module names (last component), e.g. ("q_proj", "v_proj")

    @property
    def scaling(self) -> float:
        """peft's LoRA scaling (use_rslora=False): the update is scaling * B @ A."""
        return self.alpha / self.rank


def block_linear_names(model: torch.nn.Module) -> tuple[str, ...]:
    """Last-component names of every nn.Linear inside the transformer blocks (`...layers.N...`), sorted.

    peft's own "all-linear" would also take the score head of a *ForTokenClassification model
    (it only excludes a causal LM's output embedding), so the blocks are searched instead."""
    names = {
        name.rsplit(".", 1)[-1]
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and ".layers." in f".{name}"
    }
    return tuple(sorted(names))


def resolve_settings(
    model: torch.nn.Module, rank: int, alpha: float, target_modules: str | Sequence[str]
) -> LoraSettings:
    """model.lora_* knobs -> LoraSettings; target_modules "all-linear" means every linear layer of the blocks."""
    available = block_linear_names(model)
    if target_modules == "all-linear":
        targets = available
    else:
        targets = tuple(target_modules)
        unknown = [t for t in targets if t not in available]
        if SCORE_HEAD in targets:
            raise ValueError(
                f"model.target_modules={list(targets)}: the score head is always trained in full, never a LoRA target; remove {SCORE_HEAD!r}"
            )
        if unknown or not targets:
            raise ValueError(
                f"model.target_modules={list(targets)}: {unknown or 'empty'} not among the blocks' linear layers {list(available)}"
            )
    return LoraSettings(rank=rank, alpha=float(alpha), target_modules=targets)


def peft_config(settings: LoraSettings, **extra):
    """peft's LoraConfig for these settings; no dropout: a step is a deterministic function of the batch."""
    from peft import LoraConfig

    return LoraConfig(
        r=settings.rank,
        lora_alpha=settings.alpha,
        target_modules=list(settings.target_modules),
        lora_dropout=0.0,
        bias="none",
        **extra,
    )


def add_lora(model: torch.nn.Module, settings: LoraSettings, base_dtype: torch.dtype | None = None):
    """The value-head model wrapped in a peft LoRA model: adapters + score weight trainable, all else frozen.

    `base_dtype` (e.g. bf16): the frozen weights are stored in it; trainable ones stay in the model's dtype.
    """
    from peft import get_peft_model

    model = get_peft_model(model, peft_config(settings))  # freezes every non-LoRA parameter
    head = model.get_base_model().get_submodule(SCORE_HEAD)
    head.weight.requires_grad_(True)
    if base_dtype is not None:
        for parameter in model.parameters():
            if not parameter.requires_grad:
                parameter.data = parameter.data.to(base_dtype)
    return model


# ----------------------------------------------------------------------------- state dicts (pure)


def _lora_key(key: str, part: str) -> str:
    """'<module>.base_layer.weight' -> '<module>.lora_A.default.weight' (part: lora_A | lora_B)."""
    return key.replace(".base_layer.weight", f".{part}.{ADAPTER_NAME}.weight")


def merge_lora_state_dict(
    state_dict: Mapping[str, torch.Tensor], scaling: float, dtype: torch.dtype = torch.float32
) -> dict[str, torch.Tensor]:
    """A peft LoRA model's full state dict -> the plain model's, adapters merged: W + scaling * B @ A.

    Keys lose peft's `base_model.model.` prefix and `.base_layer`; LoRA keys are dropped. Merged
    in fp32 (a bf16 base weight is upcast first), returned in `dtype`."""
    merged: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if ".lora_A." in key or ".lora_B." in key:
            continue
        if not key.startswith(PEFT_PREFIX):
            raise ValueError(f"{key}: not a key of a peft model state dict (expected the prefix {PEFT_PREFIX})")
        plain = key[len(PEFT_PREFIX) :].replace(".base_layer.", ".")
        if key.endswith(".base_layer.weight"):
            lora_a, lora_b = state_dict[_lora_key(key, "lora_A")], state_dict[_lora_key(key, "lora_B")]
            value = value.float() + scaling * (lora_b.float() @ lora_a.float())
        merged[plain] = value.to(dtype)
    missing = [
        k
        for k in state_dict
        if ".lora_A." in k and k.replace(f".lora_A.{ADAPTER_NAME}.", ".base_layer.") not in state_dict
    ]
    if missing:
        raise ValueError(f"LoRA weights without a base layer: {missing[:3]}")
    return merged


def adapter_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The adapter as peft saves it: LoRA matrices and the whole score head (peft's modules_to_save),
    adapter name removed from the keys (`...lora_A.weight`, `base_model.model.score.weight`)."""
    adapter = {
        key.replace(f".{ADAPTER_NAME}.", "."): value
        for key, value in state_dict.items()
        if ".lora_A." in key or ".lora_B." in key
    }
    head = f"{PEFT_PREFIX}{SCORE_HEAD}.weight"
    if head not in state_dict:
        raise ValueError(f"{head} is missing from the state dict: not a value-head LoRA model")
    adapter[head] = state_dict[head]
    bias = f"{PEFT_PREFIX}{SCORE_HEAD}.bias"
    if bias in state_dict:  # zero and frozen, but peft loads modules_to_save whole
        adapter[bias] = state_dict[bias]
    return adapter


def save_adapter(
    directory: str | os.PathLike, state_dict: Mapping[str, torch.Tensor], settings: LoraSettings, base_model: str
) -> Path:
    """Write `adapter_config.json` + `adapter_model.safetensors` (peft's format) to directory, atomically each."""
    from safetensors.torch import save_file

    from btrm import atomic

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = peft_config(settings, modules_to_save=[SCORE_HEAD], base_model_name_or_path=base_model)
    config_dict = config.to_dict()
    config_dict["target_modules"] = sorted(config_dict["target_modules"])
    weights = {key: value.detach().contiguous().cpu() for key, value in adapter_state_dict(state_dict).items()}
    with atomic.atomic_outputs([directory / "adapter_model.safetensors", directory / "adapter_config.json"]) as (
        weights_file,
        config_file,
    ):
        save_file(weights, str(weights_file), metadata={"format": "pt"})
        Path(config_file).write_text(json.dumps(config_dict, indent=2, sort_keys=True, default=list) + "\n")
    return directory


def save_exports(
    fsdp_model: torch.nn.Module, model_config, settings: LoraSettings, directory: Path, *, base_model: str, rank: int
) -> None:
    """huggingface/: the adapter merged into the base weights (a plain value-head checkpoint);
    lora_adapter/: the adapter and score head alone, in peft's format. Collective; rank 0 writes."""
    from transformers import AutoModelForTokenClassification
    from verl.utils.fsdp_utils import get_fsdp_full_state_dict

    from btrm.noise import quiet_transformers

    full_state = get_fsdp_full_state_dict(fsdp_model, offload_to_cpu=True, rank0_only=True)
    if rank == 0:
        hf_dir = directory / "huggingface"  # verl's manager has written the config and tokenizer there
        merged = merge_lora_state_dict(full_state, settings.scaling, dtype=torch.float32)
        with torch.device("meta"):  # only the class and config are needed: the weights are `merged`
            plain = AutoModelForTokenClassification.from_config(model_config)
        with quiet_transformers():
            plain.save_pretrained(hf_dir, state_dict=merged)
        save_adapter(directory / ADAPTER_DIR, full_state, settings, base_model=base_model)
        del merged
    del full_state

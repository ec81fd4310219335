"""The model: a value head on a causal LM, its device and precision, FSDP wrapping, optimizer and schedule.

A scalar value head (`*ForTokenClassification`, num_labels=1, what verl's RewardModelWorker loads)
on a causal LM; the score bias is zeroed and frozen so every consumer's loader scores the same.
"""

from __future__ import annotations

import contextlib
import os
import random

import numpy as np
import torch
import torch.distributed as dist
from verl.utils.torch_functional import (
    get_constant_schedule_with_warmup,
    get_cosine_schedule_with_warmup,
    get_wsd_schedule_with_warmup,
)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# ----------------------------------------------------------------------------- small pure helpers


def resolve_device(setting: str) -> str:
    """`auto` is cuda when a GPU is visible, else cpu."""
    if setting == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if setting not in ("cuda", "cpu"):
        raise ValueError(f"trainer.device is {setting!r}; expected auto, cuda or cpu")
    return setting


def resolve_attn_implementation(setting: str) -> str:
    """`auto` is flash_attention_2 when flash_attn is installed, else sdpa."""
    if setting != "auto":
        return setting
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return "sdpa"
    return "flash_attention_2" if torch.cuda.is_available() else "sdpa"


def resolve_param_dtype(setting: str, device: str) -> torch.dtype:
    """Compute dtype of the sharded parameters. `auto`: bf16 on GPU, fp32 on CPU (master weights stay fp32)."""
    if setting == "auto":
        return torch.bfloat16 if device == "cuda" else torch.float32
    return DTYPES[setting]


def seed_everything(seed: int) -> None:
    """Same seed on every rank: the score head starts identical everywhere and runs repeat exactly."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def load_value_head_model(model_path: str, *, attn_implementation: str, torch_dtype: torch.dtype, trust_remote_code: bool):
    """An `AutoModelForTokenClassification` (num_labels=1) from a causal-LM or value-head checkpoint.

    From a causal LM (Qwen3-32B), the lm_head is dropped and the score head newly initialised
    (seed first). The score bias is zeroed and frozen: a BT loss cannot see a shared offset, and
    a bias would make TokenClassification and SequenceClassification loaders (the latter has no
    bias) disagree. `config.architectures` is set to the value-head class so the exported
    checkpoint declares what it is.
    """
    from transformers import AutoConfig, AutoModelForTokenClassification

    config = AutoConfig.from_pretrained(model_path, trust_remote_code=trust_remote_code)
    config.num_labels = 1
    config.classifier_dropout = 0.0
    # transformers warns at length that the score head is "newly initialized ... TRAIN this model":
    # expected here, so the warning is silenced and the caller reports it in one line.
    with quiet_transformers():
        model, loading_info = AutoModelForTokenClassification.from_pretrained(
            model_path, config=config, dtype=torch_dtype, attn_implementation=attn_implementation,
            trust_remote_code=trust_remote_code, output_loading_info=True,
        )
    model.newly_initialized = sorted(loading_info["missing_keys"])
    model.config.architectures = [type(model).__name__]
    if model.score.bias is not None:
        if model.score.bias.device.type != "meta":
            with torch.no_grad():
                model.score.bias.zero_()
        model.score.bias.requires_grad_(False)
    return model


def build_lr_scheduler(optimizer, optim_config, total_steps: int):
    warmup_steps = int(total_steps * optim_config.warmup_steps_ratio)
    name = optim_config.lr_scheduler
    if name == "cosine":
        return get_cosine_schedule_with_warmup(optimizer, warmup_steps, total_steps, min_lr_ratio=optim_config.min_lr_ratio)
    if name == "wsd":
        return get_wsd_schedule_with_warmup(optimizer, warmup_steps, total_steps, min_lr_ratio=optim_config.min_lr_ratio)
    if name == "constant":
        return get_constant_schedule_with_warmup(optimizer, warmup_steps)
    raise ValueError(f"optim.lr_scheduler is {name!r}; expected cosine, wsd or constant")


@contextlib.contextmanager
def quiet_transformers():
    """transformers warnings off for the block (for warnings about calls we do not control)."""
    from transformers.utils import logging as transformers_logging

    verbosity = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()
    try:
        yield
    finally:
        transformers_logging.set_verbosity(verbosity)


# ----------------------------------------------------------------------------- entry point


def init_distributed(device: str) -> tuple[int, int]:
    """Replaces verl.utils.distributed.initialize_global_process_group, which always asks for nccl."""
    if device == "cuda":  # said plainly here rather than as "invalid device ordinal" from deep in torch
        visible, local_rank = torch.cuda.device_count(), int(os.environ.get("LOCAL_RANK", 0))
        if visible == 0:
            raise ValueError("trainer.device=cuda, but no GPU is visible (torch.cuda.device_count() is 0); use trainer.device=auto or cpu")
        if local_rank >= visible:
            raise ValueError(f"{os.environ.get('LOCAL_WORLD_SIZE', local_rank + 1)} processes on this node, but only {visible} GPUs are visible; "
                             f"set N_GPUS_PER_NODE={visible} (or fewer)")
    if not dist.is_initialized():
        dist.init_process_group(backend="cpu:gloo,cuda:nccl" if device == "cuda" else "gloo")
    if device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    return dist.get_rank(), dist.get_world_size()

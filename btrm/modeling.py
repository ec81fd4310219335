"""The model: a value head on a causal LM, its device and precision, FSDP wrapping, optimizer and schedule.

A scalar value head (`*ForTokenClassification`, num_labels=1, what verl's RewardModelWorker loads)
on a causal LM; the score bias is zeroed and frozen so every consumer's loader scores the same.
`build_model` makes everything the trainer trains, in one call: value head, attention layout,
LoRA, gradient checkpointing, FSDP2 (or FSDP1 on GPU) wrapping, optimizer and LR schedule. Its steps
(`value_head_config`, `adapt_model`, `fsdp2_kwargs`; `value_head_model_from_config` in place of loading the
weights) are also what btrm.plan builds on fake tensors, so a plan measures the model the trainer trains.
They read the typed sections of btrm.config (`model`, `optim`); verl's builders get what they read.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import random
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh
from verl.utils.torch_functional import (
    get_constant_schedule_with_warmup,
    get_cosine_schedule_with_warmup,
    get_wsd_schedule_with_warmup,
)
from verl.workers.config.optimizer import build_optimizer

from btrm import attention, batching, lora
from btrm.noise import quiet_transformers

if TYPE_CHECKING:
    from btrm.config import ModelSection, OptimSection, RunConfig

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# ----------------------------------------------------------------------------- small pure helpers


def resolve_device(setting: str) -> str:
    """`auto` is cuda when a GPU is visible, else cpu."""
    if setting == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
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


def value_head_config(model_path: str, *, trust_remote_code: bool):
    """The causal LM's transformers config (config.json only, no weights) set up for a value head: num_labels=1."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_path, trust_remote_code=trust_remote_code)
    config.num_labels = 1
    config.classifier_dropout = 0.0
    return config


def finish_value_head(model):
    """Declare the value-head class in config.architectures; zero and freeze the score bias (see load_value_head_model)."""
    model.config.architectures = [type(model).__name__]
    if model.score.bias is not None:
        if model.score.bias.device.type != "meta":
            with torch.no_grad():
                model.score.bias.zero_()
        model.score.bias.requires_grad_(False)
    return model


def load_value_head_model(
    model_path: str, *, attn_implementation: str, torch_dtype: torch.dtype, trust_remote_code: bool
):
    """An `AutoModelForTokenClassification` (num_labels=1) from a causal-LM or value-head checkpoint.

    From a causal LM (Qwen3-32B), the lm_head is dropped and the score head newly initialised
    (seed first). The score bias is zeroed and frozen: a BT loss cannot see a shared offset, and
    a bias would make TokenClassification and SequenceClassification loaders (the latter has no
    bias) disagree. `config.architectures` is set to the value-head class so the exported
    checkpoint declares what it is.
    """
    from transformers import AutoModelForTokenClassification

    config = value_head_config(model_path, trust_remote_code=trust_remote_code)
    # transformers warns at length that the score head is "newly initialized ... TRAIN this model":
    # expected here, so the warning is silenced and the caller reports it in one line.
    with quiet_transformers():
        model, loading_info = AutoModelForTokenClassification.from_pretrained(
            model_path,
            config=config,
            dtype=torch_dtype,
            attn_implementation=attn_implementation,
            trust_remote_code=trust_remote_code,
            output_loading_info=True,
        )
    model.newly_initialized = sorted(loading_info["missing_keys"])
    return finish_value_head(model)


def value_head_model_from_config(
    config, *, attn_implementation: str, torch_dtype: torch.dtype, trust_remote_code: bool
):
    """The value-head model of `value_head_config(...)` with fresh weights (no checkpoint read), in `torch_dtype`.

    For btrm.plan, which builds the model on fake tensors. config.dtype is set too: from_config builds the
    inner backbone in config.dtype (the checkpoint's, e.g. bf16) whatever `dtype` says, where
    from_pretrained(dtype=...) gives every weight that dtype.
    """
    from transformers import AutoModelForTokenClassification

    config.dtype = torch_dtype
    with quiet_transformers():
        model = AutoModelForTokenClassification.from_config(
            config, dtype=torch_dtype, attn_implementation=attn_implementation, trust_remote_code=trust_remote_code
        )
    return finish_value_head(model)


def optimizer_settings(optim: OptimSection) -> OptimSection:
    """optim.* as verl's build_optimizer reads it (attributes): optim.fused becomes the optimizer's `fused=`
    argument, under the user's optim.override_optimizer_config (which wins)."""
    override = dict(optim.override_optimizer_config or {})
    return dataclasses.replace(
        optim, override_optimizer_config=({"fused": True} if optim.fused else {}) | override or None
    )


def build_lr_scheduler(optimizer, optim_config: OptimSection, total_steps: int):
    """optim.lr_scheduler (cosine, wsd or constant, as btrm.schema allows) with its warm-up."""
    warmup_steps = int(total_steps * optim_config.warmup_steps_ratio)
    name = optim_config.lr_scheduler
    if name == "cosine":
        return get_cosine_schedule_with_warmup(
            optimizer, warmup_steps, total_steps, min_lr_ratio=optim_config.min_lr_ratio
        )
    if name == "wsd":
        return get_wsd_schedule_with_warmup(
            optimizer, warmup_steps, total_steps, min_lr_ratio=optim_config.min_lr_ratio
        )
    return get_constant_schedule_with_warmup(optimizer, warmup_steps)


# ----------------------------------------------------------------------------- building what the trainer trains


@dataclass
class BuiltModel:
    """What `build_model` returns: the modules and optimizer the trainer trains, and facts for the start-up summary."""

    model: torch.nn.Module  # the value-head model (a peft model under LoRA); under FSDP2 the same object as fsdp_model
    fsdp_model: torch.nn.Module  # what runs forward and backward: FSDP2-sharded in place, or FSDP1's wrapper
    model_config: object  # the value-head model's transformers config (what the HF export writes)
    optimizer: torch.optim.Optimizer
    lr_scheduler: torch.optim.lr_scheduler.LRScheduler
    layout: str  # batching.LAYOUTS
    lora_settings: lora.LoraSettings | None
    class_name: str  # the value-head class, with the LoRA settings when there are any
    parameter_count: int
    trainable_parameter_count: int
    newly_initialized: list[str]  # weights the checkpoint did not have (the score head, from a causal LM)


def build_model(
    settings: RunConfig, device_mesh: DeviceMesh, device: str, *, pad_token_id: int, total_steps: int
) -> BuiltModel:
    """The value-head model, sharded, with its optimizer and schedule (the schedule spans `total_steps`), from the
    typed config's model and optim sections, its layout (use_remove_padding, data.share_prompt) and seed."""
    model_config, optim = settings.model, settings.optim
    layout = batching.layout_for(settings.use_remove_padding, settings.data.share_prompt)
    seed_everything(settings.trainer.seed)
    model = load_sharding_ready_model(model_config, device_mesh)
    model.config.pad_token_id = pad_token_id
    value_head_config, newly_initialized = model.config, model.newly_initialized
    model, lora_settings, class_name = adapt_model(model, model_config, layout=layout)
    # Counted before sharding (every rank holds the whole model here); the frozen score bias is not trainable.
    parameter_count = sum(p.numel() for p in model.parameters())
    trainable_parameter_count = sum(p.numel() for p in model.parameters() if p.requires_grad)
    fsdp_model = shard_model(model, model_config, device_mesh, device)
    optimizer = build_optimizer([p for p in fsdp_model.parameters() if p.requires_grad], optimizer_settings(optim))
    return BuiltModel(
        model=model,
        fsdp_model=fsdp_model,
        model_config=value_head_config,
        optimizer=optimizer,
        lr_scheduler=build_lr_scheduler(optimizer, optim, total_steps),
        layout=layout,
        lora_settings=lora_settings,
        class_name=class_name,
        parameter_count=parameter_count,
        trainable_parameter_count=trainable_parameter_count,
        newly_initialized=newly_initialized,
    )


def adapt_model(
    model: torch.nn.Module, model_config: ModelSection, *, layout: str
) -> tuple[torch.nn.Module, lora.LoraSettings | None, str]:
    """The attention `layout` (batching.LAYOUTS), LoRA and gradient checkpointing on the value-head model, before
    sharding.

    Returns (the model, a peft model under LoRA; the LoRA settings or None; its class name).
    """
    # Packed and shared rows are attended per segment (btrm.attention, no flash-attn needed); padded batches keep
    # model.attn_implementation, also on a model switched to segments.
    if layout != "padded":
        attention.enable_segment_attention(model)
    class_name = type(model).__name__
    lora_settings = None
    if model_config.lora_rank > 0:  # peft before FSDP, as verl does; the score head stays fully trained (btrm.lora)
        lora_settings = lora.resolve_settings(
            model, model_config.lora_rank, model_config.lora_alpha, model_config.target_modules
        )
        model = lora.add_lora(model, lora_settings, base_dtype=DTYPES[model_config.lora_base_dtype])
        class_name += (
            f" + LoRA (rank {lora_settings.rank}, alpha {lora_settings.alpha:g}, "
            f"{', '.join(lora_settings.target_modules)})"
        )
    if model_config.enable_gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model, lora_settings, class_name


def load_sharding_ready_model(model_config: ModelSection, device_mesh: DeviceMesh) -> torch.nn.Module:
    """The value-head model under verl's init context: weights on meta except on rank 0, unless embeddings are tied."""
    from transformers import AutoConfig
    from verl.utils.fs import copy_to_local
    from verl.utils.fsdp_utils import get_init_weight_context_manager

    local_model_path = copy_to_local(src=model_config.partial_pretrain, verbose=False)
    tie_word_embeddings = AutoConfig.from_pretrained(
        local_model_path, trust_remote_code=model_config.trust_remote_code
    ).tie_word_embeddings
    with get_init_weight_context_manager(use_meta_tensor=not tie_word_embeddings, mesh=device_mesh)():
        return load_value_head_model(
            local_model_path,
            attn_implementation=resolve_attn_implementation(model_config.attn_implementation),
            torch_dtype=DTYPES[model_config.fsdp_config.model_dtype],
            trust_remote_code=model_config.trust_remote_code,
        )


def fsdp2_kwargs(model_config: ModelSection, device_mesh: DeviceMesh, device: str) -> dict:
    """fully_shard's arguments for every module verl's apply_fsdp2 wraps: model.mixed_precision's compute dtype,
    fp32 gradient reduction, CPU offload per model.fsdp_config.cpu_offload, parameters resharded after forward."""
    from verl.utils.fsdp_utils import CPUOffloadPolicy, MixedPrecisionPolicy

    offload = CPUOffloadPolicy(pin_memory=device == "cuda") if model_config.fsdp_config.cpu_offload else None
    return {
        "mesh": device_mesh,
        "mp_policy": MixedPrecisionPolicy(
            param_dtype=resolve_param_dtype(model_config.mixed_precision, device),
            reduce_dtype=torch.float32,
            cast_forward_inputs=True,
        ),
        "offload_policy": offload,
        "reshard_after_forward": True,
    }


def verl_fsdp_config(fsdp_config) -> dict:
    """model.fsdp_config as verl's apply_fsdp2 and get_fsdp_wrap_policy read it (a mapping: they call .get)."""
    return dataclasses.asdict(fsdp_config)


def shard_model(
    model: torch.nn.Module, model_config: ModelSection, device_mesh: DeviceMesh, device: str
) -> torch.nn.Module:
    """FSDP2 (in place; returns the same module) or FSDP1 (a wrapper), with model.mixed_precision's compute dtype."""
    from verl.utils.fsdp_utils import apply_fsdp2, fsdp2_load_full_state_dict, get_fsdp_wrap_policy, init_fn

    fsdp_config = model_config.fsdp_config
    if model_config.strategy == "fsdp2":
        fsdp_kwargs = fsdp2_kwargs(model_config, device_mesh, device)
        full_state = model.state_dict()
        apply_fsdp2(model, fsdp_kwargs, verl_fsdp_config(fsdp_config))
        fsdp2_load_full_state_dict(model, full_state, device_mesh, fsdp_kwargs["offload_policy"])
        return model
    param_dtype = resolve_param_dtype(model_config.mixed_precision, device)
    if device != "cuda":
        raise ValueError("model.strategy=fsdp (FSDP1) needs a GPU in torch 2.13; use model.strategy=fsdp2 on CPU")
    from torch.distributed.fsdp import CPUOffload, MixedPrecision, ShardingStrategy
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    return FSDP(
        model,
        cpu_offload=CPUOffload(offload_params=True) if fsdp_config.cpu_offload else None,
        param_init_fn=init_fn,
        use_orig_params=True,  # the frozen score bias shares a flat parameter with trainable weights
        auto_wrap_policy=get_fsdp_wrap_policy(model, config=dataclasses.asdict(fsdp_config.wrap_policy)),
        device_id=torch.cuda.current_device(),
        sharding_strategy=ShardingStrategy.FULL_SHARD,
        mixed_precision=MixedPrecision(param_dtype=param_dtype, reduce_dtype=torch.float32, buffer_dtype=torch.float32),
        sync_module_states=True,
        device_mesh=device_mesh,
    )


def all_weights_finite(model: torch.nn.Module, device: str) -> bool:
    """True when every rank's shard of every parameter is finite (collective: all ranks get the same answer)."""
    finite = torch.tensor(1.0, device=device)
    for parameter in model.parameters():
        local = parameter.to_local() if hasattr(parameter, "to_local") else parameter
        if not torch.isfinite(local).all():
            finite.zero_()
            break
    dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    return bool(finite)


# ----------------------------------------------------------------------------- entry point


def restart_store():
    """torchrun's agent store with keys of this attempt only (None when torchrun does not share its store).

    torchrun's static rendezvous keeps one store across restarts (--max-restarts) while torch's env://
    init assumes a fresh one per attempt: restarted gloo ranks then read the previous attempt's
    addresses and fail to connect (seen with torch 2.13). A prefix per attempt keeps them apart.
    """
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False)
    return dist.PrefixStore(f"/btrm/attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


def init_distributed(device: str, collective_timeout_s: float | None = None) -> tuple[int, int]:
    """Replaces verl.utils.distributed.initialize_global_process_group, which always asks for nccl.

    collective_timeout_s (trainer.collective_timeout_s): how long a collective may wait for a peer
    before it fails; None keeps the backend's default."""
    if device == "cuda":  # said plainly here rather than as "invalid device ordinal" from deep in torch
        visible, local_rank = torch.cuda.device_count(), int(os.environ.get("LOCAL_RANK", 0))
        if visible == 0:
            raise ValueError(
                "trainer.device=cuda, but no GPU is visible (torch.cuda.device_count() is 0); use trainer.device=auto or cpu"
            )
        if local_rank >= visible:
            raise ValueError(
                f"{os.environ.get('LOCAL_WORLD_SIZE', local_rank + 1)} processes on this node, but only {visible} GPUs are visible; "
                f"set N_GPUS_PER_NODE={visible} (or fewer)"
            )
    if not dist.is_initialized():
        timeout = None if collective_timeout_s is None else datetime.timedelta(seconds=collective_timeout_s)
        backend = "cpu:gloo,cuda:nccl" if device == "cuda" else "gloo"
        store = restart_store()
        if store is None:
            dist.init_process_group(backend=backend, timeout=timeout)
        else:
            rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
            dist.init_process_group(backend=backend, store=store, rank=rank, world_size=world_size, timeout=timeout)
    if device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    return dist.get_rank(), dist.get_world_size()

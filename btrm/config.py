"""The typed view of a checked config: one frozen dataclass per trainer.yaml section, built once.

trainer.yaml is the only place where a knob and its default are written, and btrm.schema the only
place where a value is checked. This module adds neither: its dataclasses have no defaults, and
`RunConfig.from_config` takes every value from the composed config, after btrm.schema.check_config.
Their fields mirror trainer.yaml's keys exactly: a knob added to (or removed from) trainer.yaml
without its field here, or the other way round, stops `from_config` with the keys that differ
(tests/test_config.py holds the two against each other). The loss section's view is
bt_loss.LossConfig, declared beside the losses.

The trainer's parts receive their section (`config.trainer`, `config.data`, ...), never the whole
DictConfig. Lists become tuples: a view is read, never changed.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from bt_loss import LossConfig


@dataclass(frozen=True)
class CustomDatasetClass:
    path: str | None
    name: str | None


@dataclass(frozen=True)
class DataSection:
    train_files: str | tuple[str, ...]
    val_files: str | tuple[str, ...]
    chosen_key: str
    rejected_key: str
    format: str
    prompt_key: str
    drop_identical_pairs: bool
    group_columns: tuple[str, ...]
    max_groups_per_column: int
    train_batch_size: int
    micro_batch_size_per_gpu: int | None
    max_tokens_per_micro_batch: int | str | None
    share_prompt: bool
    max_length: int
    truncation: str
    max_samples: int
    pad_token: str | None
    apply_chat_template_kwargs: Mapping[str, Any]
    dataloader_num_workers: int
    chat_template: None
    custom_cls: CustomDatasetClass


@dataclass(frozen=True)
class WrapPolicy:
    min_num_params: int


@dataclass(frozen=True)
class FsdpSettings:
    model_dtype: str
    cpu_offload: bool
    wrap_policy: WrapPolicy


@dataclass(frozen=True)
class ModelSection:
    partial_pretrain: str
    trust_remote_code: bool
    strategy: str
    attn_implementation: str
    mixed_precision: str
    enable_gradient_checkpointing: bool
    lora_rank: int
    lora_alpha: float
    target_modules: str | tuple[str, ...]
    lora_base_dtype: str
    fsdp_config: FsdpSettings


@dataclass(frozen=True)
class OptimSection:
    optimizer: str
    optimizer_impl: str
    lr: float
    betas: tuple[float, float]
    weight_decay: float
    warmup_steps_ratio: float
    min_lr_ratio: float
    lr_scheduler: str
    clip_grad: float
    fused: bool
    override_optimizer_config: Mapping[str, Any] | None


@dataclass(frozen=True)
class CheckpointContents:
    save_contents: tuple[str, ...]
    load_contents: tuple[str, ...]


@dataclass(frozen=True)
class TrainerSection:
    device: str
    seed: int
    check_layout: bool
    gpu_memory_margin: float
    total_epochs: int
    total_training_steps: int | None
    test_freq: int
    save_freq: int
    save_path: str
    project_name: str | int
    experiment_name: str | int
    default_local_dir: str
    default_hdfs_dir: str | None
    logger: tuple[str, ...]
    wandb_mode: str | None
    wandb_dir: str | None
    tensorboard_dir: str | None
    history_file: str | None
    curves_png: str | None
    max_ckpt_to_keep: int | None
    max_consecutive_skipped_steps: int
    stop_signals: tuple[str, ...]
    collective_timeout_s: float
    resume_mode: str
    resume_from_path: str | None
    checkpoint: CheckpointContents


@dataclass(frozen=True)
class RunConfig:
    """The whole checked config, one typed section per trainer.yaml section."""

    data: DataSection
    model: ModelSection
    optim: OptimSection
    loss: LossConfig
    use_remove_padding: bool
    ulysses_sequence_parallel_size: int
    trainer: TrainerSection

    @classmethod
    def from_config(cls, config) -> RunConfig:
        """From a composed config (DictConfig or a plain mapping) that btrm.schema.check_config accepted."""
        from omegaconf import DictConfig, OmegaConf

        tree = OmegaConf.to_container(config, resolve=True) if isinstance(config, DictConfig) else dict(config)
        tree.pop("hydra", None)  # Hydra's own settings
        return _build(cls, tree, "")


def knob_names(cls: type = RunConfig, prefix: str = "") -> list[str]:
    """The dotted trainer.yaml keys the view has a field for (btrm.schema.trainer_yaml_knobs' keys)."""
    names = []
    for name, hint in _section_fields(cls).items():
        if hint is LossConfig:
            names += [f"{prefix}{name}.{knob.name}" for knob in dataclasses.fields(LossConfig) if knob.init]
        elif dataclasses.is_dataclass(hint):
            names += knob_names(hint, f"{prefix}{name}.")
        else:
            names.append(f"{prefix}{name}")
    return names


def _section_fields(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {field.name: hints[field.name] for field in dataclasses.fields(cls) if field.init}


def _build(cls: type, tree: Mapping[str, Any], prefix: str):
    if cls is LossConfig:
        return LossConfig.from_mapping(tree)
    expected = _section_fields(cls)
    if set(tree) != set(expected):
        extra = sorted(f"{prefix}{key}" for key in set(tree) - set(expected))
        missing = sorted(f"{prefix}{key}" for key in set(expected) - set(tree))
        raise ValueError(
            f"btrm.config.{cls.__name__} and trainer.yaml differ: keys without a field {extra}, fields without a key "
            f"{missing}; give each trainer.yaml knob its field in btrm/config.py"
        )
    values = {}
    for name, hint in expected.items():
        value = tree[name]
        if dataclasses.is_dataclass(hint):
            value = _build(hint, value, f"{prefix}{name}.")
        elif isinstance(value, list):
            value = tuple(value)
        values[name] = value
    return cls(**values)

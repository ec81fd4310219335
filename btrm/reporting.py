"""What a run tells its user: trackers, the history file, console lines, the start-up summary, the run log.

verl's `Tracking` writes the metrics to the trackers in trainer.logger; the trainer prints its own
compact console line (`format_console_line`) and keeps `trainer.history_file` (JSON lines, null for
non-finite values) that plot_curves.py reads. Rank 0 prints the start-up summary table once.
"""

from __future__ import annotations

import collections
import json
import logging
import math
import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from tqdm import tqdm
from verl.utils.tracking import Tracking

from btrm import atomic

if TYPE_CHECKING:
    from btrm.batching import TokenBudget
    from btrm.config import DataSection, ModelSection, TrainerSection

# ----------------------------------------------------------------------------- start-up summary


def human_count(n: int) -> str:
    for scale, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if n >= scale:
            return f"{n / scale:.3g} {suffix}"
    return str(n)


def conversation_token_stats(pairs: Iterable) -> tuple[float, int]:
    """(mean, max) tokens per conversation (chosen and rejected counted separately) of TokenizedPair-like items."""
    lengths = [len(side) for pair in pairs for side in (pair.chosen, pair.rejected)]
    return (sum(lengths) / len(lengths), max(lengths)) if lengths else (0.0, 0)


@dataclass(frozen=True)
class StartupFacts:
    """What the start-up summary reports, gathered in one place (BTRewardTrainer.startup_facts)."""

    device: str
    backend: str
    world_size: int
    nodes: int
    model_path: str
    model_class: str
    parameters: int
    trainable_parameters: int
    compute_dtype: str
    master_dtype: str
    frozen_dtype: str | None  # the frozen LoRA backbone's dtype; None without LoRA
    attention: str
    layout: str
    train_pairs: int
    val_pairs: int
    val_groups: str  # the validation metrics' groups (data.group_columns), e.g. "domain (4), language (2)"; "" without
    mean_tokens: float
    max_tokens: int
    max_length: int
    truncated_pairs: int
    dropped_tokens: int
    truncation: str
    steps_per_epoch: int
    epochs: int
    total_steps: int
    last_step: int
    train_batch_size: int
    micro_batch: str
    resume: str
    output_dir: str


def format_startup_summary(facts: StartupFacts) -> str:
    """The start-up summary rank 0 prints: a dozen aligned `label  value` lines."""
    f = facts
    stop = f", stopping at step {f.last_step} (trainer.total_training_steps)" if f.last_step < f.total_steps else ""
    rows = [
        (
            "device",
            f"{f.device} ({f.backend}), {f.world_size} rank{'s' * (f.world_size != 1)} on {f.nodes} node{'s' * (f.nodes != 1)}",
        ),
        ("model", f"{f.model_path} -> {f.model_class}"),
        ("parameters", f"{human_count(f.parameters)} ({human_count(f.trainable_parameters)} trainable)"),
        (
            "precision",
            f"{f.compute_dtype} compute, {f.master_dtype} master weights"
            + (f", frozen backbone in {f.frozen_dtype}" if f.frozen_dtype else ""),
        ),
        ("attention", f"{f.attention}, {f.layout} layout"),
        ("train data", f"{f.train_pairs:,} pairs"),
        ("val data", f"{f.val_pairs:,} pairs" + (f", metrics by {f.val_groups}" if f.val_groups else "")),
        (
            "tokens",
            f"{f.mean_tokens:,.0f} mean, {f.max_tokens:,} max per conversation (data.max_length={f.max_length:,})",
        ),
        (
            "truncated",
            f"{f.truncated_pairs:,} pairs, {f.dropped_tokens:,} tokens dropped (data.truncation={f.truncation})",
        ),
        (
            "schedule",
            f"{f.steps_per_epoch:,} steps/epoch x {f.epochs} epoch{'s' * (f.epochs != 1)} = {f.total_steps:,} steps{stop}",
        ),
        (
            "batch",
            f"{f.train_batch_size:,} pairs/step over {f.world_size} rank{'s' * (f.world_size != 1)}; {f.micro_batch}",
        ),
        ("resume", f.resume),
        ("output", f.output_dir),
    ]
    width = max(len(label) for label, _ in rows)
    return "\n".join(f"{label:<{width}}  {value}" for label, value in rows)


def describe_groups(index) -> str:
    """ "domain (4), language (2, 5 pooled as other)" from a pair_dataset.GroupIndex; "" for none."""
    if index is None or not index.labels:
        return ""
    counts = collections.Counter(index.columns)
    return ", ".join(
        f"{column} ({count}" + (f", {index.pooled[column]} pooled as other" if column in index.pooled else "") + ")"
        for column, count in counts.items()
    )


def gather_startup_facts(
    built,
    train_dataset,
    val_dataset,
    *,
    data: DataSection,
    model: ModelSection,
    trainer: TrainerSection,
    device: str,
    world_size: int,
    token_budget: TokenBudget,
    steps_per_epoch: int,
    total_steps: int,
    last_step: int,
    resumed: str | None,
    val_groups=None,
) -> StartupFacts:
    """The start-up facts of a run: its config sections, the model btrm.modeling.build_model built, the datasets and
    the schedule."""
    import torch.distributed as dist

    from btrm.batching import describe_micro_batches, smallest_pair_over_budget
    from btrm.modeling import DTYPES, resolve_param_dtype

    datasets = (train_dataset, val_dataset)
    mean_tokens, max_tokens = conversation_token_stats(d[i] for d in datasets for i in range(len(d)))
    alone = (
        None
        if token_budget.tokens is None
        else smallest_pair_over_budget((d[i] for d in datasets for i in range(len(d))), token_budget.tokens)
    )
    micro_batch = describe_micro_batches(token_budget, data.micro_batch_size_per_gpu, alone)
    return StartupFacts(
        device=device,
        backend=dist.get_backend(),
        world_size=world_size,
        nodes=max(1, world_size // int(os.environ.get("LOCAL_WORLD_SIZE", world_size))),
        model_path=str(model.partial_pretrain),
        model_class=built.class_name,
        parameters=built.parameter_count,
        trainable_parameters=built.trainable_parameter_count,
        compute_dtype={v: k for k, v in DTYPES.items()}[resolve_param_dtype(model.mixed_precision, device)],
        master_dtype=model.fsdp_config.model_dtype,
        frozen_dtype=model.lora_base_dtype if built.lora_settings is not None else None,
        attention=built.model_config._attn_implementation,
        layout=built.layout,
        train_pairs=len(train_dataset),
        val_pairs=len(val_dataset),
        val_groups=describe_groups(val_groups),
        mean_tokens=mean_tokens,
        max_tokens=max_tokens,
        max_length=data.max_length,
        truncated_pairs=sum(d.truncated_pairs for d in datasets),
        dropped_tokens=sum(d.dropped_tokens for d in datasets),
        truncation=data.truncation,
        steps_per_epoch=steps_per_epoch,
        epochs=trainer.total_epochs,
        total_steps=total_steps,
        last_step=last_step,
        train_batch_size=data.train_batch_size,
        micro_batch=micro_batch,
        resume=f"resumed from {resumed}" if resumed else f"fresh start (trainer.resume_mode={trainer.resume_mode})",
        output_dir=str(trainer.default_local_dir),
    )


def print_final_report(
    trainer_config: TrainerSection, data: DataSection, step: int, val_metrics: dict[str, float]
) -> None:
    """Rank 0's last lines: the final validation, where the model is, how to evaluate it, the curves."""
    from pathlib import Path

    from btrm.checkpoint import step_dir

    final = step_dir(trainer_config.default_local_dir, step)
    print("final validation: " + "  ".join(f"{k.removeprefix('val/')} {v:.4g}" for k, v in val_metrics.items()))
    print(f"final model: {final / 'huggingface'}")
    val_files = [data.val_files] if isinstance(data.val_files, str) else list(data.val_files)
    print(
        f"evaluate it: python evaluate_rm.py --model {final} --data {' '.join(val_files)} "
        f"--output {Path(trainer_config.default_local_dir) / 'val_scores.jsonl'}"
    )
    if trainer_config.history_file is not None and trainer_config.curves_png is not None:
        from btrm.curves import plot_curves, read_history

        curves = plot_curves(
            read_history(trainer_config.history_file),
            trainer_config.curves_png,
            trainer_config.experiment_name,
            group_columns=list(data.group_columns),
        )
        print(f"training curves: {curves}")


def keep_history_through(path: str, last_step: int) -> None:
    """Drop history lines after `last_step` (a resumed run replays them), via temp file + rename."""
    if not os.path.exists(path):
        return
    with open(path, encoding="utf-8") as lines:
        kept = [line for line in lines if line.strip() and json.loads(line)["step"] <= last_step]
    atomic.atomic_write_text(path, "".join(kept))


def json_line(step: int, metrics: dict[str, float]) -> str:
    """One history line; non-finite values become null (bare NaN/Infinity are not JSON)."""
    finite = {k: (v if not isinstance(v, float) or math.isfinite(v) else None) for k, v in metrics.items()}
    return json.dumps({"step": step, "data": finite}, allow_nan=False) + "\n"


def quiet_known_noise() -> None:
    """Console noise the project triggers but cannot fix at its source; the run's log file keeps INFO.

    - torchdata 0.11 calls the deprecated torch.set_vital on every DataLoader;
    - FSDP2 warns that the model output is a view: the rewards read from it are never modified in place;
    - verl logs every shard it saves and loads at INFO from every rank.
    """
    import warnings

    warnings.filterwarnings("ignore", message=".*'set_vital' is deprecated.*")
    warnings.filterwarnings("ignore", message=".*returned a view tensor.*")
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
            handler.setLevel(logging.WARNING)


def write_run_log(text: str) -> None:
    """Append to the run's log file (Hydra's <run dir>/bt_trainer.log) without echoing to the console."""
    if not text:
        return
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.acquire()
            try:
                handler.stream.write(text if text.endswith("\n") else text + "\n")
                handler.flush()
            finally:
                handler.release()


class MetricsLog:
    """Where a step's metrics go on rank 0: the trackers of trainer.logger, the compact console line and
    trainer.history_file. Other ranks get one that writes nothing."""

    def __init__(self, trainer_config: TrainerSection, *, run_config: dict, resumed_step: int, writes: bool):
        """run_config: the whole config as plain data, what the trackers record."""
        self.console = "console" in trainer_config.logger
        self.tracking: Tracking | None = start_tracking(trainer_config, run_config) if writes else None
        self.history = None
        if writes and trainer_config.history_file is not None:
            os.makedirs(os.path.dirname(os.path.abspath(trainer_config.history_file)), exist_ok=True)
            keep_history_through(trainer_config.history_file, resumed_step)
            self.history = open(trainer_config.history_file, "a", encoding="utf-8")  # noqa: SIM115  open for the whole run

    def log(self, metrics: dict[str, float], step: int) -> None:
        if self.tracking is not None:
            self.tracking.log(data=metrics, step=step)
            if self.console:
                tqdm.write(format_console_line(step, metrics))
        if self.history is not None:
            self.history.write(json_line(step, metrics))
            self.history.flush()

    def close(self) -> None:
        if self.history is not None:
            self.history.close()
        if self.tracking is not None:
            close_tracking(self.tracking)


def format_console_line(step: int, metrics: dict[str, float]) -> str:
    """One compact console line: 4 significant digits, wall-clock metrics left to the trackers."""
    shown = {k: v for k, v in metrics.items() if k not in ("train/time(s)", "train/micro_batches")}
    return f"step {step}: " + "  ".join(
        f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in shown.items()
    )


FINISHED_BY_VERL_DEL = {
    "wandb": {"exit_code": 0},
    "vemlp_wandb": {"exit_code": 0},
    "swanlab": {},
    "tensorboard": {},
    "clearml": {},
    "trackio": {},
}


def close_tracking(tracking: Tracking) -> None:
    """Finish the trackers now, as Tracking.__del__ would. From __del__ (interpreter exit) wandb's
    finish can wait forever on its service: a rank of a finished run was seen stuck there after
    torchrun had given up on it. Finished here, they are gone from the dict and __del__ skips them."""
    for name, kwargs in FINISHED_BY_VERL_DEL.items():
        backend = tracking.logger.pop(name, None)
        if backend is not None:
            backend.finish(**kwargs)


def start_tracking(trainer_config: TrainerSection, run_config: dict) -> Tracking:
    """verl's Tracking, with the wandb mode and tensorboard directory taken from the config.

    verl's console backend prints every metric with 16 digits; the trainer prints its own compact
    line instead (format_console_line), so `console` is not handed to verl.
    """
    if trainer_config.wandb_mode is not None:
        os.environ["WANDB_MODE"] = trainer_config.wandb_mode
    if trainer_config.wandb_dir is not None:
        os.makedirs(trainer_config.wandb_dir, exist_ok=True)
        os.environ["WANDB_DIR"] = trainer_config.wandb_dir
    if trainer_config.tensorboard_dir is not None:
        os.environ["TENSORBOARD_DIR"] = trainer_config.tensorboard_dir
    return Tracking(
        project_name=trainer_config.project_name,
        experiment_name=trainer_config.experiment_name,
        default_backend=[b for b in trainer_config.logger if b != "console"],
        config=run_config,
    )

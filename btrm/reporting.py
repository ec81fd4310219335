"""What a run tells its user: trackers, the history file, console lines, the start-up summary, the run log.

verl's `Tracking` writes the metrics to the trackers in trainer.logger; the trainer prints its own
compact console line (`format_console_line`) and keeps `trainer.history_file` (JSON lines, null for
non-finite values) that plot_curves.py reads. Rank 0 prints the start-up summary table once.
"""

from __future__ import annotations

import json
import logging
import math
import os
from typing import Iterable

from omegaconf import DictConfig, OmegaConf
from verl.utils.tracking import Tracking

from btrm import atomic

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


def format_startup_summary(*, device: str, backend: str, world_size: int, nodes: int,
                           model_path: str, model_class: str, parameters: int, trainable_parameters: int,
                           compute_dtype: str, master_dtype: str, attention: str, layout: str,
                           train_pairs: int, val_pairs: int, mean_tokens: float, max_tokens: int, max_length: int,
                           truncated_pairs: int, dropped_tokens: int, truncation: str,
                           steps_per_epoch: int, epochs: int, total_steps: int, last_step: int,
                           train_batch_size: int, micro_batch: str, resume: str, output_dir: str,
                           frozen_dtype: str | None = None) -> str:
    """The start-up summary rank 0 prints: a dozen aligned `label  value` lines, from plain values."""
    stop = f", stopping at step {last_step} (trainer.total_training_steps)" if last_step < total_steps else ""
    rows = [
        ("device", f"{device} ({backend}), {world_size} rank{'s' * (world_size != 1)} on {nodes} node{'s' * (nodes != 1)}"),
        ("model", f"{model_path} -> {model_class}"),
        ("parameters", f"{human_count(parameters)} ({human_count(trainable_parameters)} trainable)"),
        ("precision", f"{compute_dtype} compute, {master_dtype} master weights"
                      + (f", frozen backbone in {frozen_dtype}" if frozen_dtype else "")),
        ("attention", f"{attention}, {layout} layout"),
        ("train data", f"{train_pairs:,} pairs"),
        ("val data", f"{val_pairs:,} pairs"),
        ("tokens", f"{mean_tokens:,.0f} mean, {max_tokens:,} max per conversation (data.max_length={max_length:,})"),
        ("truncated", f"{truncated_pairs:,} pairs, {dropped_tokens:,} tokens dropped (data.truncation={truncation})"),
        ("schedule", f"{steps_per_epoch:,} steps/epoch x {epochs} epoch{'s' * (epochs != 1)} = {total_steps:,} steps{stop}"),
        ("batch", f"{train_batch_size:,} pairs/step over {world_size} rank{'s' * (world_size != 1)}; {micro_batch}"),
        ("resume", resume),
        ("output", output_dir),
    ]
    width = max(len(label) for label, _ in rows)
    return "\n".join(f"{label:<{width}}  {value}" for label, value in rows)


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


def format_console_line(step: int, metrics: dict[str, float]) -> str:
    """One compact console line: 4 significant digits, wall-clock metrics left to the trackers."""
    shown = {k: v for k, v in metrics.items() if k not in ("train/time(s)", "train/micro_batches")}
    return f"step {step}: " + "  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in shown.items())


FINISHED_BY_VERL_DEL = {"wandb": {"exit_code": 0}, "vemlp_wandb": {"exit_code": 0}, "swanlab": {}, "tensorboard": {}, "clearml": {}, "trackio": {}}


def close_tracking(tracking: Tracking) -> None:
    """Finish the trackers now, as Tracking.__del__ would. From __del__ (interpreter exit) wandb's
    finish can wait forever on its service: a rank of a finished run was seen stuck there after
    torchrun had given up on it. Finished here, they are gone from the dict and __del__ skips them."""
    for name, kwargs in FINISHED_BY_VERL_DEL.items():
        backend = tracking.logger.pop(name, None)
        if backend is not None:
            backend.finish(**kwargs)


def start_tracking(trainer_config, config: DictConfig) -> Tracking:
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
        project_name=trainer_config.project_name, experiment_name=trainer_config.experiment_name,
        default_backend=[b for b in trainer_config.logger if b != "console"], config=OmegaConf.to_container(config, resolve=True),
    )

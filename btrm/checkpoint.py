"""When a checkpoint counts, which one a run resumes from, and how it is read without running code.

verl's FSDPCheckpointManager writes the shards; this module decides the rest, because verl 0.6.1
(a) updates the `latest_checkpointed_iteration.txt` tracker and deletes old checkpoints before the
new one is known to be complete, so a kill at the wrong moment leaves a tracker pointing at a
half-written or half-deleted directory, (b) silently restarts from step 0 or replays an epoch when
the tracker or `data.pt` is missing, and (c) loads every file with `torch.load(weights_only=False)`,
which runs whatever a pickled payload in the file says.

The rules here:
- A checkpoint is complete once `bt_state.json` exists in its step directory. It is written last,
  after every rank's shards, `data.pt` and the HF export, and records each file's size (a damaged
  or truncated file is then caught before anything is loaded) plus the trainer's own counters.
- The tracker is updated only after that, and older checkpoints are removed only after that
  (renamed aside first, so no half-deleted directory ever looks like a checkpoint).
- Resuming validates the chosen checkpoint and stops with one message naming the file and the
  `trainer.resume_from_path` to use, never a silent restart or replay.
- Every file is loaded with `weights_only=True` (tensors, DTensors and numpy RNG state only).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from btrm import atomic

STATE_FILE = "bt_state.json"
TRACKER_FILE = "latest_checkpointed_iteration.txt"  # verl's name: tools that read verl runs still find it
DATA_STATE_FILE = "data.pt"
STEP_DIR = re.compile(r"^global_step_(\d+)$")
SHARD_PREFIXES = {"model": "model", "optimizer": "optim", "extra": "extra_state"}


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be resumed from, naming the file and what to do."""


@dataclass
class TrainerState:
    """The trainer's own state beside verl's shards: bt_state.json's "step" and its "trainer" section."""

    step: int = 0  # optimizer steps taken (skipped ones included)
    skipped_steps: int = 0  # steps whose gradient norm was not finite, over the whole run
    consecutive_skipped_steps: int = 0
    # the LoRA settings the shards' keys depend on (None: full fine-tune); resume needs the same
    lora: dict | None = None

    def record_update(self, finite: bool) -> None:
        """Count a step whose update was taken (finite gradient norm) or skipped."""
        if finite:
            self.consecutive_skipped_steps = 0
        else:
            self.skipped_steps += 1
            self.consecutive_skipped_steps += 1

    def trainer_section(self) -> dict:
        return {key: value for key, value in asdict(self).items() if key != "step"}


def step_dir(root: str | os.PathLike, step: int) -> Path:
    return Path(root) / f"global_step_{step}"


def shard_files(world_size: int, contents) -> list[str]:
    """verl's per-rank file names for the given save/load contents."""
    return [
        f"{SHARD_PREFIXES[content]}_world_size_{world_size}_rank_{rank}.pt"
        for content in ("model", "optimizer", "extra")
        if content in contents
        for rank in range(world_size)
    ]


def hf_export_files(directory: Path) -> list[str]:
    """The HF export's weight files (single or sharded safetensors) plus its config."""
    hf = directory / "huggingface"
    weights = sorted(p.name for p in hf.glob("*.safetensors")) + sorted(
        p.name for p in hf.glob("*.safetensors.index.json")
    )
    return ["huggingface/config.json"] + [f"huggingface/{name}" for name in weights]


def mark_complete(directory: Path, *, step: int, world_size: int, save_contents, trainer_state: dict) -> dict:
    """Write bt_state.json (atomically) once every expected file exists; returns the state written."""
    files = shard_files(world_size, save_contents) + [DATA_STATE_FILE]
    if "hf_model" in save_contents:
        files += hf_export_files(directory)
    missing = [name for name in files if not (directory / name).is_file()]
    if missing:
        raise CheckpointError(f"{directory}: not marking complete, missing {missing}")
    state = {
        "step": step,
        "world_size": world_size,
        "save_contents": list(save_contents),
        "files": {name: (directory / name).stat().st_size for name in files},
        "trainer": trainer_state,
    }
    atomic.atomic_write_text(directory / STATE_FILE, json.dumps(state, indent=1) + "\n")
    return state


def list_checkpoints(root: str | os.PathLike) -> list[tuple[int, Path]]:
    """(step, directory) of every global_step_N directory, oldest first, complete or not."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := STEP_DIR.match(p.name))]
    return sorted(found)


def latest_complete(root: str | os.PathLike) -> Path | None:
    complete = [path for _, path in list_checkpoints(root) if (path / STATE_FILE).is_file()]
    return complete[-1] if complete else None


def _use_instead(root, damaged: Path | None = None) -> str:
    complete = [path for _, path in list_checkpoints(root) if (path / STATE_FILE).is_file() and path != damaged]
    latest = complete[-1] if complete else None
    if latest is None:
        return "no complete checkpoint is left: start over with trainer.resume_mode=disable (or an empty trainer.default_local_dir)"
    return f"to resume from the latest complete one, pass trainer.resume_from_path={latest}"


def read_tracker(root: str | os.PathLike) -> int | None:
    """The step in the tracker file, None if there is no tracker; a tracker that is not a step raises."""
    tracker = Path(root) / TRACKER_FILE
    if not tracker.is_file():
        return None
    text = tracker.read_text(errors="replace").strip()
    if not text.isdigit():
        raise CheckpointError(f"{tracker}: holds {text[:40]!r}, expected a step number; {_use_instead(root)}")
    return int(text)


def tracked_checkpoint(root: str | os.PathLike) -> Path | None:
    """The checkpoint the tracker names (the one an auto resume reads), None without a readable tracker."""
    try:
        step = read_tracker(root)
    except CheckpointError:
        return None
    return None if step is None else step_dir(root, step)


def validate_checkpoint(directory: str | os.PathLike, *, world_size: int, load_contents) -> dict:
    """The checkpoint's bt_state.json after checking that everything a resume reads is there, whole."""
    directory = Path(directory)
    root = directory.parent
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: no such checkpoint directory; {_use_instead(root, directory)}")
    state_path = directory / STATE_FILE
    if not state_path.is_file():
        raise CheckpointError(
            f"{directory}: incomplete checkpoint (no {STATE_FILE}: the run stopped while saving it); {_use_instead(root, directory)}"
        )
    try:
        state = json.loads(state_path.read_text())
        recorded = dict(state["files"])
        saved_world_size = int(state["world_size"])
    except (ValueError, KeyError, TypeError):
        raise CheckpointError(f"{state_path}: unreadable; {_use_instead(root, directory)}") from None
    if saved_world_size != world_size:
        raise CheckpointError(
            f"{directory}: saved by {saved_world_size} ranks, this run has {world_size}; "
            "verl's sharded checkpoints resume only on the same number of ranks"
        )
    for name in shard_files(world_size, load_contents) + [DATA_STATE_FILE]:
        path = directory / name
        if not path.is_file():
            raise CheckpointError(f"{path}: missing from the checkpoint; {_use_instead(root, directory)}")
        if name in recorded and path.stat().st_size != recorded[name]:
            raise CheckpointError(
                f"{path}: {path.stat().st_size} bytes, {recorded[name]} when saved (damaged); {_use_instead(root, directory)}"
            )
    return state


def find_resume_checkpoint(
    root, *, mode: str, resume_from_path, world_size: int, load_contents
) -> tuple[Path, dict] | None:
    """(directory, state) to resume from, or None for a fresh start; raises CheckpointError when unsafe.

    auto: the tracker's step when there is a tracker; none at all (no tracker, no step directory)
    starts fresh; step directories without a readable tracker stop the run (a silent restart
    would train over them). resume_path, or auto with resume_from_path: exactly that checkpoint
    (btrm.schema has checked that resume_path comes with a resume_from_path).
    """
    if mode == "disable":
        return None
    if resume_from_path is not None:
        directory = Path(resume_from_path)
        return directory, validate_checkpoint(directory, world_size=world_size, load_contents=load_contents)
    step = read_tracker(root)
    if step is None:
        existing = list_checkpoints(root)
        if existing:
            raise CheckpointError(
                f"{Path(root) / TRACKER_FILE}: missing, but {len(existing)} checkpoint directories exist "
                f"(latest {existing[-1][1].name}); {_use_instead(root)}"
            )
        return None
    directory = step_dir(root, step)
    return directory, validate_checkpoint(directory, world_size=world_size, load_contents=load_contents)


def restore_trainer_state(directory: Path, saved: dict, lora: dict | None) -> TrainerState:
    """The state bt_state.json records (`saved`), for a run with these LoRA settings (btrm.checkpointer.Checkpointer.lora_description).

    A checkpoint saved with other LoRA settings is refused here: the shards' keys differ (peft's
    base_layer / lora_A) and verl would fail deep in a load. Checkpoints that predate the record skip the check.
    """
    trainer = saved["trainer"]
    if "lora" in trainer and trainer["lora"] != lora:
        raise CheckpointError(
            f"{directory}: saved with LoRA {trainer['lora'] or 'off (full fine-tune)'}, this run has LoRA "
            f"{lora or 'off (full fine-tune)'}; set model.lora_* as the run was, or use another trainer.experiment_name"
        )
    return TrainerState(
        step=int(saved["step"]),
        skipped_steps=int(trainer["skipped_steps"]),
        consecutive_skipped_steps=int(trainer["consecutive_skipped_steps"]),
        lora=lora,
    )


def save_trainer_state(
    root: str | os.PathLike, state: TrainerState, *, data_state: dict, world_size: int, save_contents, keep: int | None
) -> list[Path]:
    """Finish a save once every rank's shards are written (rank 0 only): data.pt, then bt_state.json (the
    completeness mark), then the tracker, then retention. Returns the checkpoints removed.

    In this order a save cut off anywhere leaves the tracker on the previous complete checkpoint.
    """
    import torch

    directory = step_dir(root, state.step)
    with atomic.atomic_outputs([directory / DATA_STATE_FILE]) as (temp,):
        torch.save(data_state, temp)
    mark_complete(
        directory,
        step=state.step,
        world_size=world_size,
        save_contents=save_contents,
        trainer_state=state.trainer_section(),
    )
    write_tracker(root, state.step)
    return remove_old_checkpoints(root, keep=keep, newest_step=state.step)


def write_tracker(root: str | os.PathLike, step: int) -> None:
    atomic.atomic_write_text(Path(root) / TRACKER_FILE, str(step))


def remove_old_checkpoints(root: str | os.PathLike, *, keep: int | None, newest_step: int) -> list[Path]:
    """Remove checkpoints older than newest_step beyond the newest `keep` complete ones.

    Incomplete directories older than newest_step (a save or a removal that was cut off) go too.
    Each is renamed aside before it is deleted, so a kill mid-removal leaves no partial
    global_step_N behind. Call only after newest_step's checkpoint is complete and tracked.
    """
    if not keep or keep <= 0:
        return []
    older = [(step, path) for step, path in list_checkpoints(root) if step < newest_step]
    complete = [path for _, path in older if (path / STATE_FILE).is_file()]
    kept = set(complete[max(0, len(complete) - (keep - 1)) :]) if keep > 1 else set()
    removed = []
    for _, path in older:
        if path in kept:
            continue
        trash = path.with_name(f".removing-{path.name}")
        os.replace(path, trash)
        shutil.rmtree(trash, ignore_errors=True)
        removed.append(path)
    for leftover in Path(root).glob(".removing-global_step_*"):  # from a removal that was cut off
        shutil.rmtree(leftover, ignore_errors=True)
    return removed


def safe_globals() -> list:
    """What verl's files hold besides tensors: DTensor shards and numpy's RNG state (an uint32 array)."""
    import numpy as np
    import torch.distributed.tensor  # noqa: F401  registers DTensor, DeviceMesh and placements as safe

    return [np.core.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]


@contextlib.contextmanager
def weights_only_loading() -> Iterator[None]:
    """Within the block, every torch.load (verl's included) uses weights_only=True and names its file on failure.

    verl 0.6.1 hard-codes weights_only=False; patching torch.load for the duration of the load is
    the smallest change that keeps verl's loading code while refusing pickled code.
    """
    import torch

    original = torch.load

    def load(f, *args, **kwargs):
        kwargs["weights_only"] = True
        try:
            return original(f, *args, **kwargs)
        except Exception as error:  # an UnpicklingError names the global, not the file
            first_line = str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__
            raise CheckpointError(
                f"{f}: cannot be loaded as plain tensors (weights_only=True): {first_line}"
            ) from error

    with torch.serialization.safe_globals(safe_globals()):
        torch.load = load
        try:
            yield
        finally:
            torch.load = original

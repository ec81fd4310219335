"""The trainer's checkpointer: when to save, save, resume, with verl's FSDPCheckpointManager inside.

verl's manager writes and reads the shards (model, optimizer, extra state) and, without LoRA, the HF
export; the rules of btrm.checkpoint decide the rest (a checkpoint counts once bt_state.json is
written, last; the tracker moves and old checkpoints go only after that; everything is loaded as
plain tensors), btrm.export makes the export one every consumer scores alike, btrm.lora writes the
merged export of a LoRA run. Built from trainer.yaml's `trainer:` section; `verl_manager` builds
the manager it wraps.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from btrm import checkpoint, export, lora, modeling
from btrm.fault_guard import TrainingDiverged
from btrm.noise import quiet_transformers
from btrm.validator import is_due

if TYPE_CHECKING:
    from bt_loss import RewardStats
    from btrm.config import CheckpointContents, TrainerSection
    from btrm.fault_guard import FaultGuard


def verl_manager(model, optimizer, lr_scheduler, tokenizer, contents: CheckpointContents, *, uses_lora: bool):
    """verl's FSDPCheckpointManager as verl's trainer builds it; under LoRA without its HF export, which would
    write peft keys as a plain model (the checkpointer writes the merged export instead: lora.save_exports)."""
    from omegaconf import DictConfig
    from verl.utils.checkpoint.fsdp_checkpoint_manager import FSDPCheckpointManager

    manager = FSDPCheckpointManager(
        model=model,
        optimizer=optimizer,
        lr_scheduler=lr_scheduler,
        processing_class=tokenizer,
        checkpoint_config=DictConfig(
            {"load_contents": list(contents.load_contents), "save_contents": list(contents.save_contents)}
        ),
    )
    if uses_lora:
        manager.checkpoint_save_contents = [item for item in manager.checkpoint_save_contents if item != "hf_model"]
    return manager


class Checkpointer:
    """Saves and resumes one rank's share of a run (see the module doc)."""

    def __init__(
        self,
        trainer: TrainerSection,
        manager,
        *,
        model: torch.nn.Module,
        model_config,
        lora_settings: lora.LoraSettings | None,
        lora_base_dtype: str,
        base_model: str,
        trust_remote_code: bool,
        dataloader,
        steps_per_epoch: int,
        device: str,
        rank: int,
        world_size: int,
        guard: FaultGuard,
    ):
        self.settings, self.manager, self.root = trainer, manager, trainer.default_local_dir
        self.model, self.model_config, self.lora_settings = model, model_config, lora_settings
        self.lora_base_dtype, self.base_model, self.trust_remote_code = lora_base_dtype, base_model, trust_remote_code
        self.dataloader, self.steps_per_epoch, self.device, self.guard = dataloader, steps_per_epoch, device, guard
        self.rank, self.world_size = rank, world_size

    def lora_description(self) -> dict | None:
        """What a checkpoint's shards depend on: resume needs the same (bt_state.json's trainer.lora)."""
        if self.lora_settings is None:
            return None
        return {
            "rank": self.lora_settings.rank,
            "alpha": self.lora_settings.alpha,
            "target_modules": list(self.lora_settings.target_modules),
            "base_dtype": self.lora_base_dtype,
        }

    def should_save(self, step: int, last_step: int) -> bool:
        return is_due(step, self.settings.save_freq, last_step)

    # ---- saving

    def save(self, step: int, state: checkpoint.TrainerState, reward_stats: RewardStats | None = None) -> None:
        """Refuse non-finite weights; write the checkpoint; a failed write (full disk, permissions) is one line
        (the fault guard's classify_save) and leaves the previous complete checkpoint the latest."""
        directory = checkpoint.step_dir(self.root, step)
        if not modeling.all_weights_finite(self.model, self.device):
            raise TrainingDiverged(
                f"weights are not finite at step {step}; not saving (the last good checkpoint is {checkpoint.latest_complete(self.root)})"
            )
        self.guard.at(step, f"saving {directory}")
        try:
            self._write(step, directory, state, reward_stats)
        except Exception as error:  # a failed write is told apart by type (faults.save_failure); the rest re-raised
            failure = self.guard.classify_save(error, directory, checkpoint.tracked_checkpoint(self.root))
            if failure is None:
                raise
            raise failure from error

    def save_unless_suspect(self, state: checkpoint.TrainerState, last_step: int, reward_stats=None) -> None:
        """Save, unless the last steps were skipped: that state is suspect, the last good checkpoint stays the latest."""
        skipped = state.consecutive_skipped_steps
        if not skipped:
            self.save(state.step, state, reward_stats)
        elif state.step >= last_step:
            raise TrainingDiverged(
                f"the last {skipped} steps had non-finite gradients; not saving the final state. "
                f"Last good checkpoint: {checkpoint.latest_complete(self.root)}"
            )
        elif self.rank == 0:
            print(f"not saving at step {state.step}: the last {skipped} steps had non-finite gradients")

    def save_before_stop(self, state: checkpoint.TrainerState, reward_stats=None) -> str:
        """Save on a stop signal, unless the state is suspect; what was saved, for the stop's line."""
        if state.consecutive_skipped_steps:
            return (
                f"not saved (the last {state.consecutive_skipped_steps} steps had non-finite gradients); "
                f"the latest complete checkpoint is {checkpoint.tracked_checkpoint(self.root)}"
            )
        self.save(state.step, state, reward_stats)
        return f"saved {checkpoint.step_dir(self.root, state.step)}"

    def _write(self, step: int, directory: Path, state: checkpoint.TrainerState, reward_stats) -> None:
        """Shards (verl's manager, retention off), exports, then btrm.checkpoint.save_trainer_state."""
        if self.rank == 0:
            directory.mkdir(parents=True, exist_ok=True)
            (directory / checkpoint.STATE_FILE).unlink(missing_ok=True)  # re-saving a step: incomplete until done
        dist.barrier()
        with quiet_transformers():  # verl's export passes the deprecated torch_dtype= to transformers
            self.manager.save_checkpoint(local_path=str(directory), global_step=step, max_ckpt_to_keep=None)
        exports_hf = "hf_model" in self.settings.checkpoint.save_contents
        if self.lora_settings is not None and exports_hf:
            lora.save_exports(
                self.model, self.model_config, self.lora_settings, directory, base_model=self.base_model, rank=self.rank
            )
        if self.rank == 0:
            if exports_hf:
                self._export_reward_model(directory / "huggingface", step, reward_stats)
            removed = checkpoint.save_trainer_state(
                self.root,
                dataclasses.replace(state, step=step),
                data_state=self.dataloader.state_dict(),
                world_size=self.world_size,
                save_contents=list(self.settings.checkpoint.save_contents),
                keep=self.settings.max_ckpt_to_keep,
            )
            for path in removed:
                print(f"removed old checkpoint {path}")
            if self.settings.default_hdfs_dir:
                from verl.utils import hdfs_io

                hdfs_io.makedirs(self.settings.default_hdfs_dir, exist_ok=True)
                hdfs_io.copy(src=str(directory), dst=self.settings.default_hdfs_dir, dirs_exist_ok=True)
        dist.barrier()

    def _export_reward_model(self, hf_dir: Path, step: int, reward_stats: RewardStats | None) -> None:
        """The class every consumer reads the same (btrm.export), with the reward scale when this step was validated."""
        export.export_reward_model(hf_dir, trust_remote_code=self.trust_remote_code)
        if reward_stats is not None:
            export.write_reward_stats(
                hf_dir,
                reward_stats.mean,
                reward_stats.std,
                count=reward_stats.count,
                step=step,
                source="validation conversations (data.val_files)",
            )

    # ---- resuming

    def resume(self) -> tuple[checkpoint.TrainerState, Path] | None:
        """The trainer state and directory of the checkpoint trainer.resume_mode picks, loaded (None: start fresh).
        Every file is read as plain tensors; the dataloader resumes mid-epoch."""
        found = checkpoint.find_resume_checkpoint(
            self.root,
            mode=self.settings.resume_mode,
            resume_from_path=self.settings.resume_from_path,
            world_size=self.world_size,
            load_contents=list(self.settings.checkpoint.load_contents),
        )
        if found is None:
            return None
        directory, saved = found
        state = checkpoint.restore_trainer_state(directory, saved, lora=self.lora_description())
        with checkpoint.weights_only_loading():
            self.manager.load_checkpoint(str(directory))
            # At an epoch boundary the saved dataloader has yielded its whole epoch: the next epoch starts
            # from a fresh iterator, exactly as in an uninterrupted run.
            if state.step % self.steps_per_epoch:
                self.dataloader.load_state_dict(torch.load(directory / checkpoint.DATA_STATE_FILE, map_location="cpu"))
        return state, directory

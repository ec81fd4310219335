"""Bradley-Terry reward-model trainer: a subclass of verl 0.6.1's FSDPSFTTrainer, a thin loop over its parts.

    torchrun --nproc_per_node=8 bt_trainer.py model.partial_pretrain=Qwen/Qwen3-32B   # see run_bt_rm.sh

| verl 0.6.1 `FSDPSFTTrainer`  | here              | delegates to                  | why                                                          |
| ---------------------------- | ----------------- | ----------------------------- | ------------------------------------------------------------ |
| `__init__`                   | extends           | btrm.config.RunConfig, btrm.fault_guard.FaultGuard, btrm.sequence_parallel.SequenceParallel, btrm.reporting | typed config built once; the sequence-parallel groups (verl's ulysses mesh is never built); verl's config dump goes to the run log; the start-up summary |
| `_normalize_config_bsz`      | replaces          | btrm.batching.resolve_token_budget | verl divides data.train_batch_size in place; we derive the per-rank count |
| `_build_dataloader`          | replaces          | btrm.pair_dataset             | a step's pairs stay a list; seeded sampler, configured workers, unpadded validation (split per data-parallel group) |
| `_build_model_optimizer`     | replaces          | btrm.modeling.build_model; builds btrm.step.TrainStep, btrm.validator.Validator (each given the SequenceParallel) | verl builds a causal LM with flash_attention_2 and bf16, and patches its own Ulysses attention |
| `_compute_loss_and_backward` | replaces          | TrainStep.forward_backward    | token cross-entropy under a hard-coded bf16 autocast becomes the preference loss; rewards through btrm.sequence_parallel.compute_rewards |
| `training_step`              | replaces          | TrainStep.run                 | micro-batches dealt over ranks (data-parallel groups under SP) by tokens; metrics over all ranks, a group counted once (verl all-reduces only on CUDA); a non-finite step is skipped |
| `validation_step`            | replaces          | Validator.run                 | every validation pair scored once (by one data-parallel group); metrics over the whole set and all ranks, per strength and per group |
| `_init_checkpoint_manager`   | replaces          | btrm.checkpointer.Checkpointer (verl's manager inside: checkpointer.verl_manager) | under LoRA verl's HF export would write peft keys as a plain model |
| `save_checkpoint`            | replaces          | Checkpointer.save             | verl tracks and prunes before the save is complete, saves non-finite weights, pickles data.pt; a failed write is one line |
| `load_checkpoint`            | replaces          | Checkpointer.resume           | verl restarts at step 0 without a tracker, replays epochs, loads with weights_only=False; what a resume prints reaches the console |
| `_load_dataloader_state`     | inherited, unused | -                             | only verl's load_checkpoint calls it                         |
| `_determine_resume_path`     | inherited, unused | -                             | only verl's load_checkpoint calls it (btrm.checkpoint.find_resume_checkpoint here) |
| `_find_latest_checkpoint`    | inherited, unused | -                             | only verl's load_checkpoint calls it                         |
| `fit`                        | replaces          | asks Validator.should_validate, Checkpointer.should_save, FaultGuard.stop_decided / check_divergence / classify | logs BT metrics, keeps the epoch schedule under total_training_steps, stops a diverged run unsaved, saves and exits on a stop signal, names a hung peer |

verl's module-level `run_sft` / `main` always ask for nccl: `run` / `main` here start gloo on CPU, and check
that ulysses_sequence_parallel_size divides the model's attention heads before loading anything heavy.

The recipe's features:
- model: a scalar value head (`*ForTokenClassification`, num_labels=1, what verl's RewardModelWorker
  loads) on a causal LM, score bias zeroed and frozen, optionally LoRA (btrm.modeling, btrm.lora);
- loss: -log sigmoid(r_chosen - r_rejected), or scaled by / with a margin from |preference_strength| (bt_loss);
- layouts: padded, packed, or packed with the prompt computed once per pair; micro-batches by pair count
  or token budget (`auto`: the memory plan's on GPU, btrm.plan), dealt over the ranks with balanced loads,
  accumulated exactly (btrm.step, btrm.batching, btrm.attention), checked against padded at start-up;
- parallelism: FSDP2 (FSDP1 on GPU), precision chosen by device, optional CPU offload and gradient checkpointing;
  Ulysses sequence parallelism splits each packed row over a group of ranks, exactly (btrm.sequence_parallel);
- validation: every pair once, metrics per |strength| and per value of data.group_columns (btrm.validator);
- checkpoints: complete or ignored, never loaded as pickles, resumed exactly mid-epoch, pruned only after
  the new one is complete (btrm.checkpointer, btrm.checkpoint); a HF export every consumer scores alike (btrm.export);
- guards: non-finite steps skipped and counted, a run that keeps diverging stops, non-finite weights are
  never saved, a failing validation saves the trained state first;
- faults (btrm.fault_guard, btrm.faults): a stop signal (preemption, Ctrl-C) saves at the step boundary and
  exits 75, a collective that times out names the step and the silent ranks, a failed write during a save
  is one line and keeps the previous checkpoint; torchrun restarts resume exactly (run_bt_rm.sh MAX_RESTARTS);
- config: trainer.yaml checked by btrm.schema, then one typed view per section (btrm.config) given to the parts;
- reporting: a start-up summary, one console line a step, a history file, trackers, curves (btrm.reporting).
"""

from __future__ import annotations

import contextlib
import gc
import io
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import hydra
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.utils.data import DistributedSampler
from torchdata.stateful_dataloader import StatefulDataLoader
from tqdm import tqdm
from transformers import AutoConfig
from verl.trainer.fsdp_sft_trainer import FSDPSFTTrainer
from verl.utils.fs import copy_to_local

from btrm import batching, checkpoint, checkpointer, faults, modeling, pair_dataset, reporting, rows
from btrm.config import RunConfig
from btrm.fault_guard import FaultGuard, TrainingDiverged
from btrm.modeling import init_distributed, resolve_device, resolve_param_dtype, seed_everything
from btrm.pair_dataset import check_strengths, create_pair_dataset, group_index, has_strengths, load_tokenizer
from btrm.reporting import quiet_known_noise, write_run_log
from btrm.sequence_parallel import SequenceParallel, check_heads
from btrm.step import MicroBatchResult, TrainStep
from btrm.validator import Validator

if TYPE_CHECKING:
    from btrm.pair_dataset import PreferenceDataset, TokenizedPair

__all__ = ["BTRewardTrainer", "MicroBatchResult", "TrainingDiverged", "main", "run"]


class BTRewardTrainer(FSDPSFTTrainer):
    config: DictConfig  # verl reads it; the parts get their typed section of self.settings
    settings: RunConfig
    device_mesh: DeviceMesh
    train_dataset: PreferenceDataset
    val_dataset: PreferenceDataset
    sequence_parallel: SequenceParallel  # this rank's sequence-parallel group and data-parallel group
    pairs_per_rank: int
    train_sampler: DistributedSampler
    train_dataloader: StatefulDataLoader
    steps_per_epoch: int
    total_steps: int  # the schedule's length: every epoch (trainer.total_training_steps only stops early)
    built: modeling.BuiltModel
    layout: str  # batching.LAYOUTS
    guard: FaultGuard
    step: TrainStep
    validator: Validator
    checkpointer: checkpointer.Checkpointer
    state: checkpoint.TrainerState
    resumed_from: Path | None
    last_val_metrics: dict[str, float] | None

    def __init__(
        self, config: DictConfig, device_mesh: DeviceMesh, tokenizer, train_dataset, val_dataset, settings=None
    ):
        self.settings = settings if settings is not None else RunConfig.from_config(config)
        self.device_name = self.settings.trainer.device
        self.sequence_parallel = SequenceParallel.create(self.settings.ulysses_sequence_parallel_size, self.device_name)
        self.resumed_from, self.last_val_metrics, self.console = None, None, sys.stdout
        heartbeats = faults.Heartbeats(
            dist.distributed_c10d._get_default_store(), device_mesh.get_rank(), device_mesh.size()
        )
        self.guard = FaultGuard(self.settings.trainer, heartbeats, device_mesh.get_rank())
        # verl's __init__ prints the whole config and its settings: they go to the run's log file only.
        verl_output = io.StringIO()
        try:
            with contextlib.redirect_stdout(verl_output):
                super().__init__(config, device_mesh, None, tokenizer, train_dataset, val_dataset)
        finally:
            write_run_log(verl_output.getvalue())
        if device_mesh.get_rank() == 0:
            self._print_startup_summary()

    def _print_startup_summary(self) -> None:
        facts = reporting.gather_startup_facts(
            self.built,
            self.train_dataset,
            self.val_dataset,
            data=self.settings.data,
            model=self.settings.model,
            trainer=self.settings.trainer,
            device=self.device_name,
            world_size=self.device_mesh.size(),
            token_budget=self.token_budget,
            steps_per_epoch=self.steps_per_epoch,
            total_steps=self.total_steps,
            last_step=self.last_step(),
            resumed=f"{self.resumed_from} (step {self.state.step})" if self.resumed_from else None,
            val_groups=self.validator.groups,
        )
        summary = reporting.format_startup_summary(facts)
        fresh_head = self.built.newly_initialized and self.resumed_from is None  # a resumed head is the trained one
        notes = []
        if fresh_head:
            notes.append(
                f"score head initialised fresh ({', '.join(self.built.newly_initialized)}): expected when starting from a causal LM"
            )
        sp = self.sequence_parallel
        if sp.size > 1:
            notes.append(
                f"sequence parallelism: each packed row split over {sp.size} ranks (ulysses_sequence_parallel_size), "
                f"{sp.dp_size} data-parallel group{'s' * (sp.dp_size != 1)}"
            )
        print("\n".join([summary, *notes]))
        write_run_log("start-up summary:\n" + summary)

    @property
    def device_name(self) -> str:
        return self._device

    @device_name.setter
    def device_name(self, setting: str) -> None:
        # verl's __init__ ends by copying config.trainer.device verbatim: "auto" must stay resolved.
        self._device = resolve_device(setting)

    def last_step(self) -> int:
        """The step this run stops after: the schedule's end, or trainer.total_training_steps if sooner."""
        stop_early = self.settings.trainer.total_training_steps
        return self.total_steps if stop_early is None else min(self.total_steps, stop_early)

    # ---- construction (called by verl's __init__, in this order)

    def _normalize_config_bsz(self):
        # btrm.schema has checked that the batch divides over the ranks and into micro-batches.
        world_size = self.device_mesh.size()
        self.pairs_per_rank = self.settings.data.train_batch_size // world_size
        self.token_budget = batching.resolve_token_budget(
            self.settings.data.max_tokens_per_micro_batch,
            self.device_name,
            planned=lambda: planned_token_budget(self.config, world_size),
        )

    def _build_dataloader(self, train_dataset, val_dataset):
        self.train_dataset, self.val_dataset = train_dataset, val_dataset
        data = self.settings.data
        rank, world_size = self.device_mesh.get_rank(), self.device_mesh.size()
        self.train_sampler = DistributedSampler(
            train_dataset,
            num_replicas=world_size,
            rank=rank,
            shuffle=True,
            seed=self.settings.trainer.seed,
            drop_last=True,
        )
        self.train_dataloader = StatefulDataLoader(
            dataset=train_dataset,
            batch_size=self.pairs_per_rank,
            sampler=self.train_sampler,
            drop_last=True,
            collate_fn=pair_dataset.keep_as_list,
            num_workers=data.dataloader_num_workers,
        )
        if len(self.train_dataloader) == 0:
            raise ValueError(
                f"{len(train_dataset)} training pairs make no full step of data.train_batch_size={data.train_batch_size}"
            )
        self.steps_per_epoch = len(self.train_dataloader)
        self.total_steps = self.steps_per_epoch * self.settings.trainer.total_epochs

    def _build_model_optimizer(self):
        settings, sp = self.settings, self.sequence_parallel
        self.built = built = modeling.build_model(
            settings,
            self.device_mesh,
            self.device_name,
            pad_token_id=self.tokenizer.pad_token_id,
            total_steps=self.total_steps,
        )
        self.model, self.fsdp_model, self.model_config = built.model, built.fsdp_model, built.model_config
        self.optimizer, self.lr_scheduler, self.layout = built.optimizer, built.lr_scheduler, built.layout
        self.step = TrainStep(
            self.fsdp_model,
            self.optimizer,
            self.lr_scheduler,
            data=settings.data,
            optim=settings.optim,
            model_settings=settings.model,
            loss=settings.loss,
            layout=self.layout,
            token_budget=self.token_budget,
            pad_token_id=self.tokenizer.pad_token_id,
            device=self.device_name,
            param_dtype=resolve_param_dtype(settings.model.mixed_precision, self.device_name),
            guard=self.guard,
            check_layout=settings.trainer.check_layout,
            sequence_parallel=sp,
        )
        self.validator = Validator(
            self.step,
            self.val_dataset,
            # every pair once (no sampler padding), scored by one data-parallel group (its ranks share each row)
            indices=list(range(sp.dp_rank, len(self.val_dataset), sp.dp_size)),
            groups=group_index(
                self.val_dataset.groups, settings.data.group_columns, settings.data.max_groups_per_column
            ),
            has_strengths=has_strengths(self.val_dataset),
            test_freq=settings.trainer.test_freq,
            guard=self.guard,
            sequence_parallel=sp,
        )

    def _init_checkpoint_manager(self):
        settings, uses_lora = self.settings, self.built.lora_settings is not None
        contents = settings.trainer.checkpoint
        self.checkpointer = checkpointer.Checkpointer(
            settings.trainer,
            checkpointer.verl_manager(
                self.fsdp_model, self.optimizer, self.lr_scheduler, self.tokenizer, contents, uses_lora=uses_lora
            ),
            model=self.fsdp_model,
            model_config=self.model_config,
            lora_settings=self.built.lora_settings,
            lora_base_dtype=settings.model.lora_base_dtype,
            base_model=str(settings.model.partial_pretrain),
            trust_remote_code=settings.model.trust_remote_code,
            dataloader=self.train_dataloader,
            steps_per_epoch=self.steps_per_epoch,
            device=self.device_name,
            rank=self.device_mesh.get_rank(),
            world_size=self.device_mesh.size(),
            guard=self.guard,
        )
        self.checkpoint_manager = self.checkpointer.manager  # verl's attribute
        self.state = checkpoint.TrainerState(lora=self.checkpointer.lora_description())

    # ---- what verl's methods do here: the parts'

    def _compute_loss_and_backward(self, pairs, do_backward=True, n_micro_batches=None, step_pairs=None):
        return self.step.forward_backward(pairs, backward=do_backward, step_pairs=step_pairs)

    def training_step(self, pairs: list[TokenizedPair]) -> dict[str, float]:
        return self.step.run(pairs, self.state)

    def validation_step(self, batch=None) -> dict[str, float]:
        return self.validator.run(self.state.step)

    def save_checkpoint(self, step):
        self.checkpointer.save(step, self.state, self.validator.reward_stats(step))

    def load_checkpoint(self):
        # verl's __init__ calls this with stdout sent to the run log: what a resume prints goes to the console.
        with contextlib.redirect_stdout(self.console):
            resumed = self.checkpointer.resume()
        if resumed is None:
            return 0
        self.state, self.resumed_from = resumed
        self.resume_global_step = self.state.step  # verl's name for the step a resumed run starts after
        return self.state.step

    # ---- the loop: it asks its parts when to act

    def fit(self):
        rank, last_step = self.device_mesh.get_rank(), self.last_step()
        if self.state.step >= last_step:
            if rank == 0:
                print(
                    f"run complete: step {self.state.step} of {last_step}; final checkpoint {self.resumed_from} "
                    "(nothing to train; use another trainer.experiment_name for a new run)"
                )
            return None
        metrics_log = reporting.MetricsLog(
            self.settings.trainer,
            run_config=OmegaConf.to_container(self.config, resolve=True),
            resumed_step=self.state.step,
            writes=rank == 0,
        )
        progress = tqdm(
            total=last_step,
            initial=self.state.step,
            desc="training",
            unit="step",
            disable=rank != 0,
            dynamic_ncols=True,
        )
        try:
            with self.guard.watching():
                self._train(last_step, metrics_log, progress)
        except RuntimeError as error:
            failure = self.guard.classify(error, self.state.step)
            if failure is None:
                raise
            raise failure from error
        finally:
            progress.close()
            metrics_log.close()
        if rank == 0:
            reporting.print_final_report(
                self.settings.trainer, self.settings.data, self.state.step, self.last_val_metrics
            )
        return self.last_val_metrics

    def _train(self, last_step: int, metrics_log: reporting.MetricsLog, progress: tqdm) -> None:
        """Steps until last_step; validates and saves when due; on an agreed stop signal saves and raises faults.Stopped."""
        state = self.state
        for epoch, pairs in self._step_batches():
            state.step += 1
            metrics = self.training_step(pairs)
            metrics_log.log(metrics, state.step)
            progress.update(1)
            progress.set_postfix(
                epoch=epoch + 1, loss=f"{metrics['train/loss']:.4g}", acc=f"{metrics['train/accuracy']:.3g}"
            )
            self.guard.check_divergence(state)
            if self.guard.stop_decided(state.step, last_step):
                self.guard.announce_stop()
                saved = self.checkpointer.save_before_stop(state, self.validator.reward_stats(state.step))
                raise self.guard.stopped(state.step, last_step, saved)
            if self.validator.should_validate(state.step, last_step):
                self.last_val_metrics = self._validate_saving_on_failure()
                metrics_log.log(self.last_val_metrics, state.step)
            if self.checkpointer.should_save(state.step, last_step):
                self.checkpointer.save_unless_suspect(state, last_step, self.validator.reward_stats(state.step))
            if state.step >= last_step:
                break

    def _step_batches(self):
        """(epoch, one step's pairs for this rank) from where the run stands; a restored dataloader resumes mid-epoch."""
        for epoch in range(self.state.step // self.steps_per_epoch, self.settings.trainer.total_epochs):
            self.train_sampler.set_epoch(epoch)
            for pairs in self.train_dataloader:
                yield epoch, pairs

    def _validate_saving_on_failure(self) -> dict[str, float]:
        try:
            return self.validation_step()
        except Exception:
            if self.device_mesh.get_rank() == 0:
                print(f"validation failed at step {self.state.step}: saving the trained state first")
            self.save_checkpoint(step=self.state.step)
            raise


def planned_token_budget(config: DictConfig, world_size: int) -> batching.TokenBudget:
    """data.max_tokens_per_micro_batch=auto on a GPU: the largest budget the memory plan says fits (btrm.plan),
    as the launcher planned it before starting the ranks, else planned now on rank 0 for all."""
    from btrm import errors, handover, plan

    handed_over = handover.planned_budget_from_environment()
    if handed_over is not None:
        return handed_over
    return errors.checked_on_rank0(lambda: plan.auto_token_budget(config, world_size))


def run(config: DictConfig):
    from btrm import errors, preflight, schema

    quiet_known_noise()
    # Before anything heavy (run_bt_rm.sh's launcher has checked the same before starting the ranks;
    # these catch launches that bypass it): the config against trainer.yaml on every rank (cheap and
    # the same everywhere), then data files, model and resume checkpoint on rank 0 alone (one hub
    # probe, not one per rank), its verdict shared with the others.
    knobs = schema.check_config(config, world_size=int(os.environ.get("WORLD_SIZE", "1")))
    settings = RunConfig.from_config(config)  # the typed view, built once: each part gets its section
    device = resolve_device(settings.trainer.device)
    rank, world_size = init_distributed(device, settings.trainer.collective_timeout_s)
    errors.checked_on_rank0(lambda: preflight.check_inputs(knobs, world_size))
    if rank == 0:  # the console gets the start-up summary; the run's log file the whole config
        write_run_log("resolved config:\n" + OmegaConf.to_yaml(config, resolve=True))
    seed_everything(settings.trainer.seed)
    device_mesh = init_device_mesh(device_type=device, mesh_shape=(world_size,), mesh_dim_names=("fsdp",))
    local_model_path = copy_to_local(src=settings.model.partial_pretrain, verbose=False)
    check_heads(
        AutoConfig.from_pretrained(local_model_path, trust_remote_code=settings.model.trust_remote_code),
        settings.ulysses_sequence_parallel_size,
    )
    tokenizer = load_tokenizer(local_model_path, config.data, settings.model.trust_remote_code)
    train_dataset = create_pair_dataset(config.data.train_files, config.data, tokenizer)
    val_dataset = create_pair_dataset(config.data.val_files, config.data, tokenizer)
    check_strengths(settings.loss, config.data, train_dataset, val_dataset)
    if len(train_dataset) == 0 or len(val_dataset) == 0:
        empty = config.data.train_files if len(train_dataset) == 0 else config.data.val_files
        raise rows.DataError(f"{empty}: no usable pairs after reading (see the dropped-pair counts above)")
    shared = rows.count_shared_pairs(*([d[i] for i in range(len(d))] for d in (train_dataset, val_dataset)))
    if rank == 0:
        for dataset in (train_dataset, val_dataset):
            if dataset.read_report:
                print("\n".join(f"read {line}" for line in dataset.read_report.splitlines()))
        preflight.warn_about_data(config.data, train_dataset, val_dataset)
        if shared:
            print(
                f"WARNING: {shared} validation pairs also appear in the training data (identical chosen and rejected)"
            )
    trainer = BTRewardTrainer(config, device_mesh, tokenizer, train_dataset, val_dataset, settings=settings)
    metrics = trainer.fit()
    dist.destroy_process_group()
    return metrics


@hydra.main(config_path=".", config_name="trainer", version_base=None)
@faults.reports_outcome  # how this rank ended, for the launcher (btrm.faults.RankOutcome)
def main(config: DictConfig):
    from btrm import errors

    # Errors the user can fix (config, data, checkpoint, divergence, a hung peer, a failed save): one
    # line from rank 0, also in <trainer.default_local_dir>/errors.log and the run's log file, exit
    # status 2, no traceback unless BT_DEBUG=1. Anything else keeps its traceback. A stop signal ends
    # with one line and faults.EXIT_STOPPED; a rank whose peer stopped first exits quietly.
    try:
        with errors.errors_reported_once(
            errors.EXPECTED_ERRORS + (TrainingDiverged, faults.CollectiveTimeout),
            log_dir=lambda: errors.log_dir_of(config),
            run_log=write_run_log,
        ):
            run(config)
    except faults.Stopped as stopped:
        if int(os.environ.get("RANK", "0")) == 0:
            print(stopped.line, flush=True)
            write_run_log(stopped.line)
        raise SystemExit(faults.EXIT_STOPPED) from None
    except faults.PeerLost as lost:
        if errors.debug_enabled():
            print(lost, file=sys.stderr, flush=True)
        raise SystemExit(faults.EXIT_PEER_LOST) from None


if __name__ == "__main__":
    # The imports above made millions of long-lived objects; frozen, the collector skips them: its full passes
    # during training, and the one at interpreter exit (over a second per rank otherwise), get short.
    gc.freeze()
    main()

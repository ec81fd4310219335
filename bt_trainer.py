"""Bradley-Terry reward-model trainer: a subclass of verl 0.6.1's FSDPSFTTrainer.

    torchrun --nproc_per_node=8 bt_trainer.py model.partial_pretrain=Qwen/Qwen3-32B   # see run_bt_rm.sh

| verl 0.6.1 `FSDPSFTTrainer`  | here             | why                                                                                 |
| ---------------------------- | ---------------- | ----------------------------------------------------------------------------------- |
| `__init__`                   | extends          | keeps trainer.device resolved, sends verl's config dump to the run log, prints the start-up summary |
| `_normalize_config_bsz`      | replaces         | verl divides data.train_batch_size in place; we derive the per-rank count instead    |
| `_build_dataloader`          | replaces         | a step's pairs stay a list; seeded sampler, configured workers, unpadded validation  |
| `_build_model_optimizer`     | replaces         | verl builds a causal LM with flash_attention_2 and bf16; ours is btrm.modeling.build_model |
| `_compute_loss_and_backward` | replaces         | token cross-entropy under a hard-coded bf16 autocast becomes the preference loss    |
| `training_step`              | replaces         | micro-batches dealt over ranks by tokens; metrics over all ranks (verl all-reduces only on CUDA); a non-finite step is skipped |
| `validation_step`            | replaces         | every validation pair scored once; metrics over the whole set and all ranks, per strength and per group |
| `save_checkpoint`            | replaces         | verl tracks and prunes before the save is complete, saves non-finite weights, pickles data.pt; a failed write is one line |
| `_init_checkpoint_manager`   | extends          | under LoRA verl's HF export would write peft keys as a plain model; ours replaces it |
| `load_checkpoint`            | replaces         | verl restarts at step 0 without a tracker, replays epochs, loads with weights_only=False |
| `_load_dataloader_state`     | inherited, unused | only verl's load_checkpoint calls it                                               |
| `_determine_resume_path`     | inherited, unused | only verl's load_checkpoint calls it (btrm.checkpoint.find_resume_checkpoint here) |
| `_find_latest_checkpoint`    | inherited, unused | only verl's load_checkpoint calls it                                               |
| `fit`                        | replaces         | logs BT metrics, keeps the epoch schedule under total_training_steps, stops a diverged run unsaved, saves and exits on a stop signal, names a hung peer |

verl's module-level `run_sft` / `main` always ask for nccl: `run` / `main` here start gloo on CPU.

The recipe:
- model: a scalar value head (`*ForTokenClassification`, num_labels=1, what verl's RewardModelWorker
  loads) on a causal LM, score bias zeroed and frozen, optionally LoRA (btrm.modeling, btrm.lora);
- loss: -log sigmoid(r_chosen - r_rejected), or scaled by / with a margin from |preference_strength| (bt_loss);
- layouts: padded, packed, or packed with the prompt computed once per pair; micro-batches by pair count
  or token budget (`auto`: the memory plan's on GPU, btrm.plan), dealt over the ranks with balanced loads,
  accumulated exactly (btrm.batching, btrm.attention), checked against padded at start-up;
- parallelism: FSDP2 (FSDP1 on GPU), precision chosen by device, optional CPU offload and gradient checkpointing;
  Ulysses sequence parallelism splits each packed row over a group of ranks, exactly (btrm.sequence_parallel);
- checkpoints: complete or ignored, never loaded as pickles, resumed exactly mid-epoch, pruned only after
  the new one is complete (btrm.checkpoint); a HF export every consumer scores alike (btrm.export);
- guards: non-finite steps skipped and counted, a run that keeps diverging stops, non-finite weights are
  never saved, a failing validation saves the trained state first;
- faults (btrm.faults): a stop signal (preemption, Ctrl-C) saves at the step boundary and exits 75, a
  collective that times out names the step and the silent ranks, a failed write during a save is one
  line and keeps the previous checkpoint; torchrun restarts resume exactly (run_bt_rm.sh MAX_RESTARTS);
- reporting: a start-up summary, one console line a step, validation metrics per |strength| and per value
  of data.group_columns, a history file, trackers, curves (btrm.reporting).
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import math
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import hydra
import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.utils.data import DistributedSampler
from torchdata.stateful_dataloader import StatefulDataLoader
from tqdm import tqdm
from transformers import AutoConfig
from verl.trainer.fsdp_sft_trainer import FSDPSFTTrainer
from verl.utils.checkpoint.fsdp_checkpoint_manager import FSDPCheckpointManager
from verl.utils.fs import copy_to_local
from verl.utils.fsdp_utils import fsdp2_clip_grad_norm_

from bt_loss import (
    STRENGTH_SUM_FIELDS,
    SUM_FIELDS,
    LossConfig,
    grouped_metrics_from_sums,
    grouped_sums,
    metrics_from_sums,
    preference_loss,
    reward_stats_from_sums,
    strength_metrics_from_sums,
    strength_sums,
)
from btrm import batching, checkpoint, export, faults, lora, modeling, pair_dataset, reporting, rows, sequence_parallel
from btrm.modeling import (
    init_distributed,
    quiet_transformers,
    resolve_device,
    resolve_param_dtype,
    seed_everything,
)
from btrm.pair_dataset import (
    GroupIndex,
    TokenizedPair,
    check_strengths,
    create_pair_dataset,
    group_index,
    has_strengths,
    load_tokenizer,
)
from btrm.reporting import quiet_known_noise, write_run_log

if TYPE_CHECKING:
    from btrm.pair_dataset import PreferenceDataset


class MicroBatchResult(NamedTuple):
    loss: torch.Tensor  # this micro-batch's share of the step's loss (already backpropagated when training)
    sums: torch.Tensor  # bt_loss.pair_sums vector
    chosen: torch.Tensor  # detached rewards
    rejected: torch.Tensor
    real_tokens: int
    computed_tokens: int
    conversation_tokens: int = 0  # tokens of the pairs' conversations run separately (> real when a prompt is shared)


class TrainingDiverged(RuntimeError):
    """Too many consecutive non-finite steps, or non-finite weights about to be saved."""


class BTRewardTrainer(FSDPSFTTrainer):
    config: DictConfig
    device_mesh: DeviceMesh
    tokenizer: object  # transformers tokenizer
    train_dataset: PreferenceDataset
    val_dataset: PreferenceDataset
    use_remove_padding: bool  # set by verl's __init__ from config.use_remove_padding
    pairs_per_rank: int
    train_sampler: DistributedSampler
    train_dataloader: StatefulDataLoader
    val_indices: list[int]  # this rank's share of the validation pairs
    steps_per_epoch: int
    total_steps: int  # the schedule's length: every epoch (trainer.total_training_steps only stops early)
    built: modeling.BuiltModel
    model: torch.nn.Module
    fsdp_model: torch.nn.Module
    model_config: object  # the value-head model's transformers config
    optimizer: torch.optim.Optimizer
    lr_scheduler: torch.optim.lr_scheduler.LRScheduler
    layout: str  # batching.LAYOUTS
    layout_checked: bool  # the start-up layout check has run, or is not needed
    token_budget: batching.TokenBudget  # data.max_tokens_per_micro_batch resolved (auto: by device / memory plan)
    lora_settings: lora.LoraSettings | None
    checkpoint_manager: FSDPCheckpointManager
    loss_config: LossConfig
    val_has_strengths: bool
    val_groups: GroupIndex  # validation pairs by data.group_columns' values, for val/accuracy_<column>_<value>
    state: checkpoint.TrainerState
    resume_global_step: int  # verl's name for the step a resumed run starts after
    resumed_from: Path | None
    last_val_metrics: dict[str, float] | None
    last_val_sums: torch.Tensor | None  # for the reward scale written with a checkpoint of the validated step
    last_val_step: int | None
    stop_signals: faults.StopSignals  # the stop signals this rank received (installed while fit runs)
    stop_agreed: bool  # some rank received one: the step's metrics all-reduce says so
    doing: str  # what the ranks are doing, for a collective that fails
    heartbeats: faults.Heartbeats  # each rank's last step in the store: names the ranks that stop answering
    sequence_parallel: sequence_parallel.SequenceParallel  # this rank's sequence-parallel group and data-parallel group

    def __init__(self, config: DictConfig, device_mesh: DeviceMesh, tokenizer, train_dataset, val_dataset):
        self.device_name = config.trainer.device
        self.sequence_parallel = sequence_parallel.SequenceParallel.create(
            config.ulysses_sequence_parallel_size, self.device_name
        )
        self.loss_config = LossConfig.from_mapping(OmegaConf.to_container(config.loss, resolve=True))
        self.val_has_strengths = has_strengths(val_dataset)
        self.val_groups = group_index(val_dataset.groups, config.data.group_columns, config.data.max_groups_per_column)
        self.resumed_from, self.last_val_metrics, self.last_val_sums, self.last_val_step = None, None, None, None
        self.stop_signals, self.stop_agreed, self.doing = faults.StopSignals([]), False, "starting"
        self.heartbeats = faults.Heartbeats(
            dist.distributed_c10d._get_default_store(), device_mesh.get_rank(), device_mesh.size()
        )
        # verl's __init__ prints the whole config and its settings: they go to the run's log file only.
        verl_output = io.StringIO()
        try:
            with contextlib.redirect_stdout(verl_output):
                super().__init__(config, device_mesh, None, tokenizer, train_dataset, val_dataset)
        finally:
            write_run_log(verl_output.getvalue())
        if device_mesh.get_rank() == 0:
            summary = reporting.format_startup_summary(
                reporting.gather_startup_facts(
                    self.config,
                    self.built,
                    self.train_dataset,
                    self.val_dataset,
                    device=self.device_name,
                    world_size=self.device_mesh.size(),
                    token_budget=self.token_budget,
                    steps_per_epoch=self.steps_per_epoch,
                    total_steps=self.total_steps,
                    last_step=self.last_step(),
                    resumed=f"{self.resumed_from} (step {self.state.step})" if self.resumed_from else None,
                    val_groups=self.val_groups,
                )
            )
            fresh_head = self.built.newly_initialized and self.resumed_from is None  # a resumed head is the trained one
            notes = [
                f"score head initialised fresh ({', '.join(self.built.newly_initialized)}): expected when starting from a causal LM"
            ]
            sp = self.sequence_parallel
            if sp.size > 1:
                notes.append(
                    f"sequence parallelism: each packed row split over {sp.size} ranks (ulysses_sequence_parallel_size), "
                    f"{sp.dp_size} data-parallel group{'s' * (sp.dp_size != 1)}"
                )
            print("\n".join([summary, *(notes[:1] if fresh_head else []), *notes[1:]]))
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
        stop_early = self.config.trainer.total_training_steps
        return self.total_steps if stop_early is None else min(self.total_steps, stop_early)

    # ---- construction (called by verl's __init__, in this order)

    def _normalize_config_bsz(self):
        # btrm.schema has checked that the batch divides over the ranks and into micro-batches.
        data, world_size = self.config.data, self.device_mesh.size()
        self.pairs_per_rank = data.train_batch_size // world_size
        self.token_budget = batching.resolve_token_budget(
            data.max_tokens_per_micro_batch,
            self.device_name,
            planned=lambda: planned_token_budget(self.config, world_size),
        )

    def _build_dataloader(self, train_dataset, val_dataset):
        self.train_dataset, self.val_dataset = train_dataset, val_dataset
        rank, world_size = self.device_mesh.get_rank(), self.device_mesh.size()
        self.train_sampler = DistributedSampler(
            train_dataset,
            num_replicas=world_size,
            rank=rank,
            shuffle=True,
            seed=self.config.trainer.seed,
            drop_last=True,
        )
        self.train_dataloader = StatefulDataLoader(
            dataset=train_dataset,
            batch_size=self.pairs_per_rank,
            sampler=self.train_sampler,
            drop_last=True,
            collate_fn=pair_dataset.keep_as_list,
            num_workers=self.config.data.dataloader_num_workers,
        )
        if len(self.train_dataloader) == 0:
            raise ValueError(
                f"{len(train_dataset)} training pairs make no full step of data.train_batch_size={self.config.data.train_batch_size}"
            )
        # every pair once (no sampler padding), scored by one data-parallel group (its ranks share each row)
        dp_rank, dp_size = self.sequence_parallel.dp_rank, self.sequence_parallel.dp_size
        self.val_indices = list(range(dp_rank, len(val_dataset), dp_size))
        self.steps_per_epoch = len(self.train_dataloader)
        self.total_steps = self.steps_per_epoch * self.config.trainer.total_epochs

    def _build_model_optimizer(self):
        self.built = modeling.build_model(
            self.config,
            self.device_mesh,
            self.device_name,
            pad_token_id=self.tokenizer.pad_token_id,
            use_remove_padding=self.use_remove_padding,
            total_steps=self.total_steps,
        )
        built = self.built
        self.model, self.fsdp_model, self.model_config = built.model, built.fsdp_model, built.model_config
        self.optimizer, self.lr_scheduler, self.layout, self.lora_settings = (
            built.optimizer,
            built.lr_scheduler,
            built.layout,
            built.lora_settings,
        )
        self.layout_checked = self.layout == "padded" or not self.config.trainer.check_layout
        self.state = checkpoint.TrainerState(lora=self.lora_description())

    def _init_checkpoint_manager(self):
        super()._init_checkpoint_manager()
        if self.lora_settings is not None:  # save_checkpoint writes the merged export instead (lora.save_exports)
            manager = self.checkpoint_manager
            manager.checkpoint_save_contents = [item for item in manager.checkpoint_save_contents if item != "hf_model"]

    def lora_description(self) -> dict | None:
        """What a checkpoint's shards depend on: resume needs the same (bt_state.json's trainer.lora)."""
        if self.lora_settings is None:
            return None
        return {
            "rank": self.lora_settings.rank,
            "alpha": self.lora_settings.alpha,
            "target_modules": list(self.lora_settings.target_modules),
            "base_dtype": self.config.model.lora_base_dtype,
        }

    # ---- one step

    def _all_reduce(self, tensor: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
        dist.all_reduce(tensor, op=op)
        return tensor

    def plan_step(self, pairs: list[TokenizedPair]) -> list[list[int]]:
        """Micro-batches of this rank's pairs (validation: every rank scores its own pairs)."""
        budget, max_pairs = self.token_budget.tokens, self.config.data.micro_batch_size_per_gpu
        return batching.plan_micro_batches(pairs, budget, max_pairs, layout=self.layout)

    def micro_batches_of_step(self, pairs: list[TokenizedPair]) -> tuple[list[list[TokenizedPair]], float]:
        """This rank's micro-batches of a training step, and the loss normaliser (the step's pairs per rank).

        With a token budget the pairs every rank sampled are gathered and dealt again by
        batching.deal_micro_batches: the same number of micro-batches on every rank (FSDP's collectives
        pair up) and balanced loads, so that no rank idles at a collective while another computes.
        Fixed-size micro-batches (a null budget) stay on the rank that sampled them. With sequence parallelism
        (ulysses_sequence_parallel_size) they are dealt per data-parallel group instead of per rank.
        """
        world_size, sp = self.device_mesh.size(), self.sequence_parallel
        if self.token_budget.tokens is None:
            # sequence parallelism: a group's ranks share the micro-batches of the pairs they sampled
            group_pairs = sequence_parallel.gather_group_pairs(pairs, sp)
            return [[group_pairs[i] for i in indices] for indices in self.plan_step(group_pairs)], len(pairs)
        sampled: list[list[TokenizedPair] | None] = [None] * world_size
        dist.all_gather_object(sampled, pairs)
        step = [pair for rank_pairs in sampled for pair in rank_pairs]
        # dealt per data-parallel group (world / ulysses_sequence_parallel_size of them); the normaliser stays
        # the pairs per rank: FSDP averages the gradient over all ranks, and a group's ranks add up to its gradient
        dealt = batching.deal_micro_batches(
            step, self.token_budget.tokens, self.config.data.micro_batch_size_per_gpu, sp.dp_size, self.layout
        )
        return [[step[i] for i in indices] for indices in dealt[sp.dp_rank]], len(step) / world_size

    def _collate(self, pairs: list[TokenizedPair]) -> dict[str, torch.Tensor]:
        return batching.move_to(
            batching.collate_pairs(pairs, self.tokenizer.pad_token_id, self.layout), self.device_name
        )

    def _check_layout(self, pairs: list[TokenizedPair]) -> None:
        """Start-up check (trainer.check_layout) on this rank's two shortest pairs: two segments or more per
        pair, and a segment boundary between pairs, at a small share of the first step's cost; collective,
        so all ranks stop together."""
        self.layout_checked = True
        pairs = sequence_parallel.gather_group_pairs(pairs, self.sequence_parallel)  # one sample per group
        sample = sorted(pairs, key=lambda pair: pair.num_tokens)[:2]
        check_layout_on_every_rank(
            self.fsdp_model,
            sample,
            self.tokenizer.pad_token_id,
            self.layout,
            self.device_name,
            resolve_param_dtype(self.config.model.mixed_precision, self.device_name),
            rewards=self._rewards,
        )

    def _rewards(self, model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """batching.compute_rewards, a packed row split over this rank's sequence-parallel group when it has one."""
        return sequence_parallel.compute_rewards(model, batch, self.sequence_parallel)

    def _compute_loss_and_backward(
        self, pairs, do_backward=True, n_micro_batches=None, step_pairs=None
    ) -> MicroBatchResult:
        """Loss of one micro-batch, normalised by the pairs of the whole step (exact accumulation)."""
        batch = self._collate(pairs)
        rewards = self._rewards(self.fsdp_model, batch)
        n = len(pairs)
        strengths = [p.preference_strength for p in pairs] if self.loss_config.needs_strengths else None
        loss, sums = preference_loss(rewards[:n], rewards[n:], strengths, self.loss_config, normalizer=step_pairs or n)
        if do_backward:
            loss.backward()
        counts = batching.token_counts(batch)
        return MicroBatchResult(
            loss, sums, rewards[:n].detach(), rewards[n:].detach(), counts.real, counts.computed, counts.conversation
        )

    def training_step(self, pairs: list[TokenizedPair]) -> dict[str, float]:
        start = time.perf_counter()
        if not self.layout_checked:
            self._check_layout(pairs)
        self.fsdp_model.train()
        self.optimizer.zero_grad(set_to_none=True)
        sums = torch.zeros(len(SUM_FIELDS), dtype=torch.float64, device=self.device_name)
        # real, computed, micro-batches, conversation tokens; then the ranks that received a stop signal
        tokens = torch.zeros(5, dtype=torch.float64, device=self.device_name)
        self.doing = "gathering the step's pairs from every rank"
        self.heartbeats.beat(self.state.step, "starting the step")
        micro_batches, pairs_per_rank = self.micro_batches_of_step(pairs)
        self.doing = "running the forward and backward passes (FSDP all-gathers and reduce-scatters)"
        for micro_batch in micro_batches:
            result = self._compute_loss_and_backward(micro_batch, step_pairs=pairs_per_rank)
            sums += result.sums
            tokens += torch.tensor(
                [result.real_tokens, result.computed_tokens, 1, result.conversation_tokens, 0],
                dtype=torch.float64,
                device=self.device_name,
            )
        self.doing = "clipping the gradient and stepping the optimizer"
        grad_norm = self._clip_and_step()
        lr = self.lr_scheduler.get_last_lr()[0]
        self.lr_scheduler.step()
        if not self.sequence_parallel.counts_metrics:  # the group's first rank counts its pairs and tokens
            sums.zero_()
            tokens.zero_()
        tokens[4] = float(self.stop_signals.requested)
        self.doing = "all-reducing the step's metrics"
        self._all_reduce(sums)
        self._all_reduce(tokens)
        self.stop_agreed = bool(tokens[4] > 0)
        elapsed = time.perf_counter() - start
        return step_metrics(
            sums,
            tokens[:4],
            grad_norm=float(grad_norm),
            lr=lr,
            elapsed=elapsed,
            world_size=self.sequence_parallel.dp_size,
            skipped_steps=self.state.skipped_steps,
        )

    def _clip_and_step(self) -> torch.Tensor:
        """Clip to optim.clip_grad and update; a non-finite gradient norm skips the update (counted in self.state)."""
        if self.config.model.strategy == "fsdp2":
            grad_norm = fsdp2_clip_grad_norm_(self.fsdp_model.parameters(), max_norm=self.config.optim.clip_grad)
        else:
            grad_norm = self.fsdp_model.clip_grad_norm_(max_norm=self.config.optim.clip_grad)
        if hasattr(grad_norm, "full_tensor"):
            grad_norm = grad_norm.full_tensor()
        finite = bool(torch.isfinite(grad_norm))  # global (all-reduced by the clip): every rank takes the same branch
        if finite:
            self.optimizer.step()
        else:
            self.optimizer.zero_grad(set_to_none=True)
        self.state.record_update(finite)
        return grad_norm

    @torch.no_grad()
    def validation_step(self, batch=None) -> dict[str, float]:
        self.doing = "validating"
        self.fsdp_model.eval()
        pairs = [self.val_dataset[i] for i in self.val_indices]
        self.heartbeats.beat(self.state.step, "starting validation")
        plan = self.plan_step(pairs) if pairs else []
        # FSDP forwards are collectives: every rank runs as many as the busiest one, extra ones discarded.
        rounds = int(self._all_reduce(torch.tensor(len(plan), device=self.device_name), dist.ReduceOp.MAX))
        # one vector, one all-reduce: pair sums, per-|strength| sums (zeros without strengths), per-group sums
        strength_width = self.loss_config.max_strength * len(STRENGTH_SUM_FIELDS)
        group_width = len(self.val_groups.labels) * len(STRENGTH_SUM_FIELDS)
        sums = torch.zeros(len(SUM_FIELDS) + strength_width + group_width, dtype=torch.float64, device=self.device_name)
        for round_index in range(rounds):
            if round_index < len(plan):
                indices = [self.val_indices[i] for i in plan[round_index]]
                sums += self._validation_sums([pairs[i] for i in plan[round_index]], indices)
            else:
                self._compute_loss_and_backward([self.val_dataset[0]], do_backward=False)
        if not self.sequence_parallel.counts_metrics:  # the group's first rank counts its pairs
            sums.zero_()
        self._all_reduce(sums)
        self.last_val_sums, self.last_val_step = sums[: len(SUM_FIELDS)].cpu(), self.state.step
        pair_sums, strength_part, group_part = sums.split([len(SUM_FIELDS), strength_width, group_width])
        metrics = metrics_from_sums(pair_sums)
        if self.val_has_strengths:
            metrics |= strength_metrics_from_sums(strength_part)
        metrics |= grouped_metrics_from_sums(group_part, self.val_groups.labels)
        return {f"val/{k}": v for k, v in metrics.items()}

    def _validation_sums(self, micro: list[TokenizedPair], dataset_indices: list[int]) -> torch.Tensor:
        """One validation micro-batch's sums: pair sums, then per-|strength|, then per-group (validation_step's layout)."""
        result = self._compute_loss_and_backward(micro, do_backward=False)
        max_strength = self.loss_config.max_strength
        strengths = (
            strength_sums(result.chosen, result.rejected, [p.preference_strength for p in micro], max_strength)
            if self.val_has_strengths
            else torch.zeros(max_strength * len(STRENGTH_SUM_FIELDS), dtype=torch.float64, device=result.sums.device)
        )
        groups = grouped_sums(
            result.chosen,
            result.rejected,
            [self.val_groups.members[i] for i in dataset_indices],
            len(self.val_groups.labels),
        )
        return torch.cat([result.sums.to(torch.float64), strengths, groups])

    # ---- checkpoints (btrm.checkpoint decides what counts; verl's manager writes the shards)

    def save_checkpoint(self, step):
        """Refuse non-finite weights; write the checkpoint; a failed write (full disk, permissions) is one line
        (faults.save_failure) and leaves the previous complete checkpoint the latest."""
        root = self.config.trainer.default_local_dir
        directory = checkpoint.step_dir(root, step)
        if not modeling.all_weights_finite(self.fsdp_model, self.device_name):
            raise TrainingDiverged(
                f"weights are not finite at step {step}; not saving (the last good checkpoint is {checkpoint.latest_complete(root)})"
            )
        self.doing = f"saving {directory}"
        try:
            self._write_checkpoint(step, directory)
        except (OSError, RuntimeError) as error:
            failure = faults.save_failure(error, directory, checkpoint.tracked_checkpoint(root))
            if failure is None:
                raise
            raise failure from error

    def _write_checkpoint(self, step: int, directory: Path) -> None:
        """Shards (verl's manager, retention off), exports, then btrm.checkpoint.save_trainer_state."""
        trainer_config, rank = self.config.trainer, self.device_mesh.get_rank()
        root = trainer_config.default_local_dir
        if rank == 0:
            directory.mkdir(parents=True, exist_ok=True)
            (directory / checkpoint.STATE_FILE).unlink(missing_ok=True)  # re-saving a step: incomplete until done
        dist.barrier()
        with quiet_transformers():  # verl's export passes the deprecated torch_dtype= to transformers
            self.checkpoint_manager.save_checkpoint(local_path=str(directory), global_step=step, max_ckpt_to_keep=None)
        exports_hf = "hf_model" in trainer_config.checkpoint.save_contents
        if self.lora_settings is not None and exports_hf:
            lora.save_exports(
                self.fsdp_model,
                self.model_config,
                self.lora_settings,
                directory,
                base_model=str(self.config.model.partial_pretrain),
                rank=rank,
            )
        if rank == 0:
            if exports_hf:
                self._export_reward_model(directory / "huggingface", step)
            removed = checkpoint.save_trainer_state(
                root,
                dataclasses.replace(self.state, step=step),
                data_state=self.train_dataloader.state_dict(),
                world_size=self.device_mesh.size(),
                save_contents=list(trainer_config.checkpoint.save_contents),
                keep=trainer_config.max_ckpt_to_keep,
            )
            for path in removed:
                print(f"removed old checkpoint {path}")
            if trainer_config.default_hdfs_dir:
                from verl.utils import hdfs_io

                hdfs_io.makedirs(trainer_config.default_hdfs_dir, exist_ok=True)
                hdfs_io.copy(src=str(directory), dst=trainer_config.default_hdfs_dir, dirs_exist_ok=True)
        dist.barrier()

    def _export_reward_model(self, hf_dir: Path, step: int) -> None:
        """The class every consumer reads the same (btrm.export), with the reward scale when this step was validated."""
        export.export_reward_model(hf_dir, trust_remote_code=self.config.model.trust_remote_code)
        if self.last_val_step == step and self.last_val_sums is not None:
            stats = reward_stats_from_sums(self.last_val_sums)
            if math.isfinite(stats.std) and stats.std > 0:
                export.write_reward_stats(
                    hf_dir,
                    stats.mean,
                    stats.std,
                    count=stats.count,
                    step=step,
                    source="validation conversations (data.val_files)",
                )

    def load_checkpoint(self):
        trainer_config = self.config.trainer
        found = checkpoint.find_resume_checkpoint(
            trainer_config.default_local_dir,
            mode=trainer_config.resume_mode,
            resume_from_path=trainer_config.resume_from_path,
            world_size=self.device_mesh.size(),
            load_contents=list(trainer_config.checkpoint.load_contents),
        )
        if found is None:
            return 0
        directory, saved = found
        self.state = checkpoint.restore_trainer_state(directory, saved, lora=self.lora_description())
        with checkpoint.weights_only_loading():
            self.checkpoint_manager.load_checkpoint(str(directory))
            # At an epoch boundary the saved dataloader has yielded its whole epoch: the next epoch starts
            # from a fresh iterator, exactly as in an uninterrupted run.
            if self.state.step % self.steps_per_epoch:
                self.train_dataloader.load_state_dict(
                    torch.load(directory / checkpoint.DATA_STATE_FILE, map_location="cpu")
                )
        self.resume_global_step, self.resumed_from = self.state.step, directory
        return self.state.step

    # ---- the loop

    def fit(self):
        rank, trainer_config, last_step = self.device_mesh.get_rank(), self.config.trainer, self.last_step()
        if self.state.step >= last_step:
            if rank == 0:
                print(
                    f"run complete: step {self.state.step} of {last_step}; final checkpoint {self.resumed_from} "
                    "(nothing to train; use another trainer.experiment_name for a new run)"
                )
            return None
        metrics_log = reporting.MetricsLog(self.config, resumed_step=self.state.step, writes=rank == 0)
        progress = tqdm(
            total=last_step,
            initial=self.state.step,
            desc="training",
            unit="step",
            disable=rank != 0,
            dynamic_ncols=True,
        )
        try:
            with faults.StopSignals(trainer_config.stop_signals) as self.stop_signals:
                self._train(last_step, metrics_log, progress)
        except RuntimeError as error:
            failure = faults.collective_failure(
                error,
                step=self.state.step,
                doing=self.doing,
                timeout_s=trainer_config.collective_timeout_s,
                heartbeats=self.heartbeats,
                rank=rank,
            )
            if failure is None:
                raise
            raise failure from error
        finally:
            progress.close()
            metrics_log.close()
        if rank == 0:
            reporting.print_final_report(self.config, self.state.step, self.last_val_metrics)
        return self.last_val_metrics

    def _train(self, last_step: int, metrics_log: reporting.MetricsLog, progress: tqdm) -> None:
        """Steps until last_step; validates and saves when due; on an agreed stop signal saves and raises faults.Stopped."""
        trainer_config = self.config.trainer
        for epoch, pairs in self._step_batches():
            self.state.step += 1
            metrics = self.training_step(pairs)
            metrics_log.log(metrics, self.state.step)
            progress.update(1)
            progress.set_postfix(
                epoch=epoch + 1, loss=f"{metrics['train/loss']:.4g}", acc=f"{metrics['train/accuracy']:.3g}"
            )
            self._stop_if_diverged()
            if self.stop_agreed and self.state.step < last_step:
                self._save_and_stop(last_step)
            if self._is_due(trainer_config.test_freq, last_step):
                self.last_val_metrics = self._validate_saving_on_failure()
                metrics_log.log(self.last_val_metrics, self.state.step)
            if self._is_due(trainer_config.save_freq, last_step):
                self._save_unless_suspect(last_step)
            if self.state.step >= last_step:
                break

    def _step_batches(self):
        """(epoch, one step's pairs for this rank) from where the run stands; a restored dataloader resumes mid-epoch."""
        for epoch in range(self.state.step // self.steps_per_epoch, self.config.trainer.total_epochs):
            self.train_sampler.set_epoch(epoch)
            for pairs in self.train_dataloader:
                yield epoch, pairs

    def _is_due(self, freq: int, last_step: int) -> bool:
        """Whether a periodic action (trainer.test_freq, trainer.save_freq; <= 0: only at the end) falls on this step."""
        return self.state.step >= last_step or (freq > 0 and self.state.step % freq == 0)

    def _stop_if_diverged(self) -> None:
        state, trainer_config = self.state, self.config.trainer
        if state.consecutive_skipped_steps >= trainer_config.max_consecutive_skipped_steps:
            raise TrainingDiverged(
                f"{state.consecutive_skipped_steps} consecutive steps had non-finite gradients (last: step {state.step}, "
                f"{state.skipped_steps} skipped in all); stopping without saving. Last good checkpoint: "
                f"{checkpoint.latest_complete(trainer_config.default_local_dir)}. Lower optim.lr or optim.clip_grad."
            )

    def _save_and_stop(self, last_step: int) -> None:
        """A rank received a stop signal: save this step (unless its state is suspect), then raise faults.Stopped."""
        step, root = self.state.step, self.config.trainer.default_local_dir
        received = self.stop_signals.received
        by = received.name if received is not None else "a signal another rank received"
        if self.state.consecutive_skipped_steps:
            saved = (
                f"not saved (the last {self.state.consecutive_skipped_steps} steps had non-finite gradients); "
                f"the latest complete checkpoint is {checkpoint.tracked_checkpoint(root)}"
            )
        else:
            self.save_checkpoint(step=step)
            saved = f"saved {checkpoint.step_dir(root, step)}"
        raise faults.Stopped(
            f"stopped by {by} after step {step} of {last_step}: {saved}. To resume, run the same command again "
            "(trainer.resume_mode=auto continues from the tracked checkpoint), or add trainer.resume_from_path=<checkpoint>"
        )

    def _validate_saving_on_failure(self) -> dict[str, float]:
        try:
            return self.validation_step()
        except Exception:
            if self.device_mesh.get_rank() == 0:
                print(f"validation failed at step {self.state.step}: saving the trained state first")
            self.save_checkpoint(step=self.state.step)
            raise

    def _save_unless_suspect(self, last_step: int) -> None:
        """Save, unless the last steps were skipped: that state is suspect, the last good checkpoint stays the latest."""
        skipped = self.state.consecutive_skipped_steps
        if not skipped:
            self.save_checkpoint(step=self.state.step)
        elif self.state.step >= last_step:
            raise TrainingDiverged(
                f"the last {skipped} steps had non-finite gradients; not saving the final state. "
                f"Last good checkpoint: {checkpoint.latest_complete(self.config.trainer.default_local_dir)}"
            )
        elif self.device_mesh.get_rank() == 0:
            print(f"not saving at step {self.state.step}: the last {skipped} steps had non-finite gradients")


def step_metrics(
    sums: torch.Tensor,
    tokens: torch.Tensor,
    *,
    grad_norm: float,
    lr: float,
    elapsed: float,
    world_size: int,
    skipped_steps: int,
) -> dict[str, float]:
    """A training step's logged metrics from its all-reduced pair sums and token counts (real, computed, micro-batches, conversation)."""
    real, computed, micro_batches, conversation = tokens.tolist()
    return {f"train/{k}": v for k, v in metrics_from_sums(sums).items()} | {
        "train/lr(1e-3)": lr * 1e3,
        "train/grad_norm": grad_norm,
        "train/time(s)": elapsed,
        "train/pairs_per_s": float(sums[0]) / elapsed,
        "train/real_tokens_per_s": real / elapsed,
        "train/real_token_share": real / computed,
        "train/tokens_per_pair": computed / float(sums[0]),  # computed per pair: padding included, a shared prompt once
        "train/prefix_saved_share": 1.0
        - real / conversation,  # share of the conversations' tokens a shared prefix saved
        "train/micro_batches": micro_batches / world_size,
        "train/skipped_steps": skipped_steps,
    }


def planned_token_budget(config: DictConfig, world_size: int) -> batching.TokenBudget:
    """data.max_tokens_per_micro_batch=auto on a GPU: the largest budget the memory plan says fits (btrm.plan),
    as the launcher planned it before starting the ranks, else planned now on rank 0 for all."""
    from btrm import launcher, plan

    handed_over = launcher.planned_budget_from_environment()
    if handed_over is not None:
        return handed_over
    return launcher.checked_on_rank0(lambda: plan.auto_token_budget(config, world_size))


def check_layout_on_every_rank(
    model,
    pairs: list[TokenizedPair],
    pad_token_id: int,
    layout: str,
    device: str,
    dtype: torch.dtype,
    rewards=batching.compute_rewards,
) -> None:
    """The pairs' rewards in `layout` vs padded (two forwards on every rank, so FSDP's collectives pair up);
    the worst ratio to the dtype's tolerance is all-reduced, so every rank passes or raises together."""
    start = time.perf_counter()
    check = batching.check_layout(model, pairs, pad_token_id, layout, device, dtype, rewards=rewards)
    worst = torch.tensor(check.ratio, dtype=torch.float64, device=device)
    dist.all_reduce(worst, op=dist.ReduceOp.MAX)
    worst = float(worst)
    if not worst <= 1.0:  # NaN fails too
        raise RuntimeError(
            f"start-up layout check failed: rewards of the {layout} layout differ from the padded layout's by {worst:.3g}x the "
            f"{dtype} tolerance on the sample (this rank: max |difference| {check.max_difference:.3g}, tolerance "
            f"{check.tolerance:.3g}). Segment attention is not exact on this hardware/kernel: train padded with use_remove_padding=false, "
            "or skip the check with trainer.check_layout=false"
        )
    if dist.get_rank() == 0:  # the progress bar is on screen: write above it
        tqdm.write(
            f"layout check: {layout} rewards equal the padded layout's on each rank's {len(pairs)} shortest pairs "
            f"(worst difference {worst:.2g}x the {dtype} tolerance; {time.perf_counter() - start:.2f} s)"
        )


def run(config: DictConfig):
    from btrm import launcher, preflight, schema

    quiet_known_noise()
    # Before anything heavy (run_bt_rm.sh's launcher has checked the same before starting the ranks;
    # these catch launches that bypass it): the config against trainer.yaml on every rank (cheap and
    # the same everywhere), then data files, model and resume checkpoint on rank 0 alone (one hub
    # probe, not one per rank), its verdict shared with the others.
    knobs = schema.check_config(config, world_size=int(os.environ.get("WORLD_SIZE", "1")))
    loss_config = LossConfig.from_mapping(OmegaConf.to_container(config.loss, resolve=True))
    device = resolve_device(config.trainer.device)
    rank, world_size = init_distributed(device, config.trainer.collective_timeout_s)
    launcher.checked_on_rank0(lambda: preflight.check_inputs(knobs, world_size))
    if rank == 0:  # the console gets the start-up summary; the run's log file the whole config
        write_run_log("resolved config:\n" + OmegaConf.to_yaml(config, resolve=True))
    seed_everything(config.trainer.seed)
    device_mesh = init_device_mesh(device_type=device, mesh_shape=(world_size,), mesh_dim_names=("fsdp",))
    local_model_path = copy_to_local(src=config.model.partial_pretrain, verbose=False)
    sequence_parallel.check_heads(
        AutoConfig.from_pretrained(local_model_path, trust_remote_code=config.model.trust_remote_code),
        config.ulysses_sequence_parallel_size,
    )
    tokenizer = load_tokenizer(local_model_path, config.data, config.model.trust_remote_code)
    train_dataset = create_pair_dataset(config.data.train_files, config.data, tokenizer)
    val_dataset = create_pair_dataset(config.data.val_files, config.data, tokenizer)
    check_strengths(loss_config, config.data, train_dataset, val_dataset)
    if len(train_dataset) == 0 or len(val_dataset) == 0:
        empty = config.data.train_files if len(train_dataset) == 0 else config.data.val_files
        raise rows.DataError(f"{empty}: no usable pairs after reading (see the dropped-pair counts above)")
    shared = rows.count_shared_pairs(*([d[i] for i in range(len(d))] for d in (train_dataset, val_dataset)))
    if rank == 0:
        for dataset in (train_dataset, val_dataset):
            if dataset.read_report:
                print("\n".join(f"read {line}" for line in dataset.read_report.splitlines()))
        if shared:
            print(
                f"WARNING: {shared} validation pairs also appear in the training data (identical chosen and rejected)"
            )
    trainer = BTRewardTrainer(config, device_mesh, tokenizer, train_dataset, val_dataset)
    metrics = trainer.fit()
    dist.destroy_process_group()
    return metrics


@hydra.main(config_path=".", config_name="trainer", version_base=None)
def main(config: DictConfig):
    from btrm import launcher

    # Errors the user can fix (config, data, checkpoint, divergence, a hung peer, a failed save): one
    # line from rank 0, also in <trainer.default_local_dir>/errors.log and the run's log file, exit
    # status 2, no traceback unless BT_DEBUG=1. Anything else keeps its traceback. A stop signal ends
    # with one line and faults.EXIT_STOPPED; a rank whose peer stopped first exits quietly.
    try:
        with launcher.errors_reported_once(
            launcher.EXPECTED_ERRORS + (TrainingDiverged, faults.CollectiveTimeout),
            log_dir=lambda: launcher.log_dir_of(config),
            run_log=write_run_log,
        ):
            run(config)
    except faults.Stopped as stopped:
        if int(os.environ.get("RANK", "0")) == 0:
            print(stopped.line, flush=True)
            write_run_log(stopped.line)
        raise SystemExit(faults.EXIT_STOPPED) from None
    except faults.PeerLost as lost:
        if launcher.debug_enabled():
            print(lost, file=sys.stderr, flush=True)
        raise SystemExit(faults.EXIT_PEER_LOST) from None


if __name__ == "__main__":
    main()

"""Bradley-Terry reward-model trainer: a subclass of verl 0.6.1's FSDPSFTTrainer.

    torchrun --nproc_per_node=8 bt_trainer.py model.partial_pretrain=Qwen/Qwen3-32B   # see run_bt_rm.sh

A scalar value head (`*ForTokenClassification`, num_labels=1, what verl's RewardModelWorker
loads) on a causal LM, sharded with FSDP2, trained on -log sigmoid(r_chosen - r_rejected).

From verl we keep: checkpoint save / resume (FSDPCheckpointManager, dataloader state, the
latest-step tracker), the FSDP2 helpers, the optimizer builder, the LR schedules and the metric
trackers. We replace what is token cross-entropy specific or CUDA-only; each override names the
verl method it replaces and why.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import os
import time
from pathlib import Path
from typing import NamedTuple

import hydra
import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.utils.data import DistributedSampler
from torchdata.stateful_dataloader import StatefulDataLoader
from tqdm import tqdm
from verl.trainer.fsdp_sft_trainer import FSDPSFTTrainer
from verl.utils.fs import copy_to_local
from verl.utils.fsdp_utils import (
    CPUOffloadPolicy,
    MixedPrecisionPolicy,
    apply_fsdp2,
    fsdp2_clip_grad_norm_,
    fsdp2_load_full_state_dict,
    get_fsdp_wrap_policy,
    get_init_weight_context_manager,
    init_fn,
)
from verl.workers.config.optimizer import build_optimizer

from bt_loss import (
    STRENGTH_SUM_FIELDS,
    SUM_FIELDS,
    LossConfig,
    metrics_from_sums,
    preference_loss,
    reward_stats_from_sums,
    strength_metrics_from_sums,
    strength_sums,
)
from btrm import atomic, attention, batching, checkpoint, export, lora, pair_dataset, rows
from btrm.modeling import (
    DTYPES,
    build_lr_scheduler,
    init_distributed,
    load_value_head_model,
    quiet_transformers,
    resolve_attn_implementation,
    resolve_device,
    resolve_param_dtype,
    seed_everything,
)
from btrm.pair_dataset import check_strengths, create_pair_dataset, has_strengths, load_tokenizer
from btrm.reporting import (
    close_tracking,
    format_console_line,
    json_line,
    keep_history_through,
    quiet_known_noise,
    start_tracking,
    write_run_log,
)

logger = logging.getLogger(__name__)


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


# ----------------------------------------------------------------------------- the trainer


class BTRewardTrainer(FSDPSFTTrainer):
    def __init__(self, config: DictConfig, device_mesh: DeviceMesh, tokenizer, train_dataset, val_dataset):
        self.device_name = resolve_device(config.trainer.device)
        self.skipped_steps = 0  # non-finite steps over the whole run (restored on resume)
        self.consecutive_skipped_steps = 0
        self.resumed_from = None
        self.loss_config = LossConfig.from_mapping(OmegaConf.to_container(config.loss, resolve=True))
        self.val_has_strengths = has_strengths(val_dataset)
        self.last_val_sums = None
        self.last_val_step = None
        self.current_step = 0
        if config.ulysses_sequence_parallel_size != 1:
            raise ValueError("ulysses_sequence_parallel_size > 1 is not supported by the BT trainer")
        self.startup_lines: list[str] = []  # printed by rank 0 once verl's __init__ is done
        # verl's __init__ prints the whole config and its settings: they go to the run's log file only.
        verl_output = io.StringIO()
        try:
            with contextlib.redirect_stdout(verl_output):
                super().__init__(config, device_mesh, None, tokenizer, train_dataset, val_dataset)
        finally:
            write_run_log(verl_output.getvalue())
        # verl's __init__ ends by copying config.trainer.device verbatim; "auto" must stay resolved.
        self.device_name = resolve_device(config.trainer.device)
        if device_mesh.get_rank() == 0:
            summary = self.startup_summary()
            notes = [line for line in self.startup_lines if not (self.resumed_from and line.startswith("score head initialised fresh"))]
            print("\n".join([summary, *notes]))
            write_run_log("start-up summary:\n" + summary)

    def startup_summary(self) -> str:
        """The aligned start-up table (reporting.format_startup_summary) from this trainer's state."""
        from btrm import reporting

        config, data = self.config, self.config.data
        mean_tokens, max_tokens = reporting.conversation_token_stats(
            pair for dataset in (self.train_dataset, self.val_dataset) for pair in (dataset[i] for i in range(len(dataset))))
        last_step = self.total_steps if config.trainer.total_training_steps is None else min(self.total_steps, config.trainer.total_training_steps)
        world_size = self.device_mesh.size()
        micro_batch = (f"micro-batches of <= {data.max_tokens_per_micro_batch:,} tokens" if data.max_tokens_per_micro_batch is not None
                       else f"{data.micro_batch_size_per_gpu} pair{'s' * (data.micro_batch_size_per_gpu != 1)} per micro-batch")
        resume = f"resumed from {self.resumed_from} (step {self.resume_global_step})" if self.resumed_from else f"fresh start (trainer.resume_mode={config.trainer.resume_mode})"
        param_dtype = resolve_param_dtype(config.model.mixed_precision, self.device_name)
        return reporting.format_startup_summary(
            device=self.device_name, backend=dist.get_backend(), world_size=world_size,
            nodes=max(1, world_size // int(os.environ.get("LOCAL_WORLD_SIZE", world_size))),
            model_path=str(config.model.partial_pretrain), model_class=self.model_class_name,
            parameters=self.parameter_count, trainable_parameters=self.trainable_parameter_count,
            compute_dtype={v: k for k, v in DTYPES.items()}[param_dtype], master_dtype=config.model.fsdp_config.model_dtype,
            attention=self.model.config._attn_implementation, layout=self.layout,
            train_pairs=len(self.train_dataset), val_pairs=len(self.val_dataset), mean_tokens=mean_tokens, max_tokens=max_tokens,
            max_length=data.max_length, truncated_pairs=sum(getattr(d, "truncated_pairs", 0) for d in (self.train_dataset, self.val_dataset)),
            dropped_tokens=sum(getattr(d, "dropped_tokens", 0) for d in (self.train_dataset, self.val_dataset)), truncation=data.truncation,
            steps_per_epoch=self.steps_per_epoch, epochs=config.trainer.total_epochs, total_steps=self.total_steps, last_step=last_step,
            train_batch_size=data.train_batch_size, micro_batch=micro_batch, resume=resume, output_dir=str(config.trainer.default_local_dir),
            frozen_dtype=config.model.lora_base_dtype if self.lora_settings is not None else None)

    # Replaces FSDPSFTTrainer._normalize_config_bsz: verl divides data.train_batch_size by the dp
    # size in place; we derive the per-rank count and leave the config as written.
    def _normalize_config_bsz(self):
        dp_size = self.device_mesh.size()
        data = self.config.data
        if data.train_batch_size % dp_size:
            raise ValueError(f"data.train_batch_size={data.train_batch_size} is not divisible by the {dp_size} data-parallel ranks")
        self.pairs_per_rank = data.train_batch_size // dp_size
        if data.max_tokens_per_micro_batch is None and self.pairs_per_rank % data.micro_batch_size_per_gpu:
            raise ValueError(
                f"{self.pairs_per_rank} pairs per rank (data.train_batch_size / ranks) is not divisible by "
                f"data.micro_batch_size_per_gpu={data.micro_batch_size_per_gpu}"
            )

    # Replaces FSDPSFTTrainer._build_dataloader: a step's pairs stay a list (micro-batches are
    # formed per step, padded or packed), the sampler is seeded from trainer.seed, the worker count
    # comes from the config (verl hard-codes 8 workers and pinning), and validation is sharded
    # without the padding DistributedSampler adds, so every pair is scored exactly once.
    def _build_dataloader(self, train_dataset, val_dataset):
        self.train_dataset, self.val_dataset = train_dataset, val_dataset
        rank, world_size = self.device_mesh.get_rank(), self.device_mesh.size()
        self.train_sampler = DistributedSampler(
            train_dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=self.config.trainer.seed, drop_last=True
        )
        self.train_dataloader = StatefulDataLoader(
            dataset=train_dataset, batch_size=self.pairs_per_rank, sampler=self.train_sampler, drop_last=True,
            collate_fn=pair_dataset.keep_as_list, num_workers=self.config.data.dataloader_num_workers,
        )
        if len(self.train_dataloader) == 0:
            raise ValueError(f"{len(train_dataset)} training pairs make no full step of data.train_batch_size={self.config.data.train_batch_size}")
        self.val_indices = list(range(rank, len(val_dataset), world_size))

    # Replaces FSDPSFTTrainer._build_model_optimizer: verl builds AutoModelForCausalLM with
    # flash_attention_2 hard-coded and bf16 mixed precision always; we build the value-head model,
    # choose attention and precision by device, and add the constant schedule.
    def _build_model_optimizer(self):
        model_config = self.config.model
        seed_everything(self.config.trainer.seed)
        local_model_path = copy_to_local(src=model_config.partial_pretrain, verbose=False)
        from transformers import AutoConfig

        tie_word_embeddings = AutoConfig.from_pretrained(local_model_path, trust_remote_code=model_config.trust_remote_code).tie_word_embeddings
        init_context = get_init_weight_context_manager(use_meta_tensor=not tie_word_embeddings, mesh=self.device_mesh)
        with init_context():
            self.model = load_value_head_model(
                local_model_path,
                attn_implementation=resolve_attn_implementation(model_config.attn_implementation),
                torch_dtype=DTYPES[model_config.fsdp_config.model_dtype],
                trust_remote_code=model_config.trust_remote_code,
            )
        self.model_config = self.model.config
        self.model.config.pad_token_id = self.tokenizer.pad_token_id
        # Layout (batching.LAYOUTS): packed and shared rows are attended per segment (bt_attention, no flash-attn
        # needed); padded batches keep model.attn_implementation, also on a model switched to segments.
        self.layout = batching.layout_for(self.use_remove_padding, self.config.data.get("share_prompt", False))
        if self.layout != "padded":
            attention.enable_segment_attention(self.model)
        self.layout_checked = self.layout == "padded" or not self.config.trainer.get("check_layout", True)
        self.newly_initialized = self.model.newly_initialized
        self.model_class_name = type(self.model).__name__
        self.lora_settings = None
        if model_config.lora_rank > 0:  # peft before FSDP, as verl does; the score head stays fully trained (bt_lora)
            self.lora_settings = lora.resolve_settings(self.model, model_config.lora_rank, model_config.lora_alpha, model_config.target_modules)
            self.model = lora.add_lora(self.model, self.lora_settings, base_dtype=DTYPES[model_config.lora_base_dtype])
            self.model_class_name += (f" + LoRA (rank {self.lora_settings.rank}, alpha {self.lora_settings.alpha:g}, "
                                      f"{', '.join(self.lora_settings.target_modules)})")
        if model_config.enable_gradient_checkpointing:
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

        # Counted before sharding (every rank holds the whole model here); the frozen score bias is not trainable.
        self.parameter_count = sum(p.numel() for p in self.model.parameters())
        self.trainable_parameter_count = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        param_dtype = resolve_param_dtype(model_config.mixed_precision, self.device_name)
        fsdp_config = model_config.fsdp_config
        if model_config.strategy == "fsdp2":
            offload = CPUOffloadPolicy(pin_memory=self.device_name == "cuda") if fsdp_config.cpu_offload else None
            fsdp_kwargs = {
                "mesh": self.device_mesh,
                "mp_policy": MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32, cast_forward_inputs=True),
                "offload_policy": offload,
                "reshard_after_forward": True,
            }
            full_state = self.model.state_dict()
            apply_fsdp2(self.model, fsdp_kwargs, fsdp_config)
            fsdp2_load_full_state_dict(self.model, full_state, self.device_mesh, offload)
            self.fsdp_model = self.model
        elif model_config.strategy == "fsdp":
            if self.device_name != "cuda":
                raise ValueError("model.strategy=fsdp (FSDP1) needs a GPU in torch 2.13; use model.strategy=fsdp2 on CPU")
            from torch.distributed.fsdp import CPUOffload, MixedPrecision, ShardingStrategy
            from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

            self.fsdp_model = FSDP(
                self.model,
                cpu_offload=CPUOffload(offload_params=True) if fsdp_config.cpu_offload else None,
                param_init_fn=init_fn,
                use_orig_params=True,  # the frozen score bias shares a flat parameter with trainable weights
                auto_wrap_policy=get_fsdp_wrap_policy(self.model, config=fsdp_config.wrap_policy),
                device_id=torch.cuda.current_device(),
                sharding_strategy=ShardingStrategy.FULL_SHARD,
                mixed_precision=MixedPrecision(param_dtype=param_dtype, reduce_dtype=torch.float32, buffer_dtype=torch.float32),
                sync_module_states=True,
                device_mesh=self.device_mesh,
            )
        else:
            raise ValueError(f"model.strategy is {model_config.strategy!r}; expected fsdp2 or fsdp")

        trainable = [p for p in self.fsdp_model.parameters() if p.requires_grad]
        self.optimizer = build_optimizer(trainable, self.config.optim)
        # The schedule is set by the epochs; trainer.total_training_steps only stops early.
        self.steps_per_epoch = len(self.train_dataloader)
        self.total_steps = self.steps_per_epoch * self.config.trainer.total_epochs
        self.lr_scheduler = build_lr_scheduler(self.optimizer, self.config.optim, self.total_steps)
        if self.newly_initialized:
            self.startup_lines.append(f"score head initialised fresh ({', '.join(self.newly_initialized)}): expected when starting from a causal LM")

    # ---- micro-batching

    def _all_reduce(self, tensor: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
        dist.all_reduce(tensor, op=op)
        return tensor

    def plan_step(self, pairs: list[pair_dataset.TokenizedPair], balance_ranks: bool) -> list[list[int]]:
        """Micro-batches of this rank's pairs; with a token budget, every rank gets the same count."""
        data = self.config.data
        plan = batching.plan_micro_batches(pairs, data.max_tokens_per_micro_batch, data.micro_batch_size_per_gpu, layout=self.layout)
        if data.max_tokens_per_micro_batch is None or not balance_ranks:
            return plan
        count = int(self._all_reduce(torch.tensor(len(plan), device=self.device_name), dist.ReduceOp.MAX))
        return batching.plan_micro_batches(pairs, data.max_tokens_per_micro_batch, data.micro_batch_size_per_gpu, min_count=count, layout=self.layout)

    def _collate(self, pairs: list[pair_dataset.TokenizedPair]) -> dict[str, torch.Tensor]:
        batch = batching.collate_pairs(pairs, self.tokenizer.pad_token_id, self.layout)
        return batching.move_to(batch, self.device_name)

    def _check_layout(self, pairs: list[pair_dataset.TokenizedPair]) -> None:
        """Start-up check (trainer.check_layout): the first micro-batch's rewards in the training layout vs padded, no grad.

        Every rank checks its own first micro-batch (two forwards each, so FSDP's collectives pair up);
        the worst ratio is all-reduced, so all ranks stop together.
        """
        self.layout_checked = True
        data = self.config.data
        first = [pairs[i] for i in batching.plan_micro_batches(pairs, data.max_tokens_per_micro_batch, data.micro_batch_size_per_gpu, layout=self.layout)[0]]
        dtype = resolve_param_dtype(self.config.model.mixed_precision, self.device_name)
        check = batching.check_layout(self.fsdp_model, first, self.tokenizer.pad_token_id, self.layout, self.device_name, dtype)
        worst = float(self._all_reduce(torch.tensor(check.ratio, dtype=torch.float64, device=self.device_name), dist.ReduceOp.MAX))
        if not worst <= 1.0:  # NaN fails too
            raise RuntimeError(
                f"start-up layout check failed: rewards of the {self.layout} layout differ from the padded layout's by {worst:.3g}x the "
                f"{dtype} tolerance on the first micro-batch (this rank: max |difference| {check.max_difference:.3g}, tolerance "
                f"{check.tolerance:.3g}). Segment attention is not exact on this hardware/kernel: train padded with use_remove_padding=false, "
                "or skip the check with trainer.check_layout=false"
            )
        if self.device_mesh.get_rank() == 0:
            print(f"layout check: {self.layout} rewards equal the padded layout's on the first micro-batch "
                  f"(worst difference {worst:.2g}x the {dtype} tolerance)")

    # Replaces FSDPSFTTrainer._compute_loss_and_backward: token cross-entropy under a hard-coded
    # bf16 autocast becomes the preference loss (config `loss:`) over rewards read at verl's reward token.
    def _compute_loss_and_backward(self, pairs, do_backward=True, n_micro_batches=None, step_pairs=None) -> MicroBatchResult:
        """Loss of one micro-batch, normalised by the pairs of the whole step (exact accumulation)."""
        batch = self._collate(pairs)
        rewards = batching.compute_rewards(self.fsdp_model, batch)
        n = len(pairs)
        strengths = [p.preference_strength for p in pairs] if self.loss_config.needs_strengths else None
        loss, sums = preference_loss(rewards[:n], rewards[n:], strengths, self.loss_config, normalizer=step_pairs or n)
        if do_backward:
            loss.backward()
        counts = batching.token_counts(batch)
        return MicroBatchResult(loss, sums, rewards[:n].detach(), rewards[n:].detach(), counts.real, counts.computed, counts.conversation)

    # Replaces FSDPSFTTrainer.training_step: BT metrics summed over micro-batches and all ranks
    # (verl all-reduces its loss only under CUDA, so on CPU it logs rank 0's alone).
    def training_step(self, pairs: list[pair_dataset.TokenizedPair]) -> dict[str, float]:
        start = time.perf_counter()
        if not self.layout_checked:
            self._check_layout(pairs)
        self.fsdp_model.train()
        self.optimizer.zero_grad(set_to_none=True)
        sums = torch.zeros(len(SUM_FIELDS), dtype=torch.float64, device=self.device_name)
        tokens = torch.zeros(4, dtype=torch.float64, device=self.device_name)  # real, computed, micro-batches, conversation
        for indices in self.plan_step(pairs, balance_ranks=True):
            result = self._compute_loss_and_backward([pairs[i] for i in indices], step_pairs=len(pairs))
            sums += result.sums
            tokens += torch.tensor([result.real_tokens, result.computed_tokens, 1, result.conversation_tokens], dtype=torch.float64, device=self.device_name)

        if self.config.model.strategy == "fsdp2":
            grad_norm = fsdp2_clip_grad_norm_(self.fsdp_model.parameters(), max_norm=self.config.optim.clip_grad)
        else:
            grad_norm = self.fsdp_model.clip_grad_norm_(max_norm=self.config.optim.clip_grad)
        if hasattr(grad_norm, "full_tensor"):
            grad_norm = grad_norm.full_tensor()
        # grad_norm is global (all-reduced by the clip), so every rank takes the same branch.
        if torch.isfinite(grad_norm):
            self.optimizer.step()
            self.consecutive_skipped_steps = 0
        else:
            self.optimizer.zero_grad(set_to_none=True)
            self.skipped_steps += 1
            self.consecutive_skipped_steps += 1
        lr = self.lr_scheduler.get_last_lr()[0]
        self.lr_scheduler.step()

        self._all_reduce(sums)
        self._all_reduce(tokens)
        elapsed = time.perf_counter() - start
        metrics = {f"train/{k}": v for k, v in metrics_from_sums(sums).items()}
        real, computed, micro_batches, conversation = tokens.tolist()
        metrics.update({
            "train/lr(1e-3)": lr * 1e3,
            "train/grad_norm": float(grad_norm),
            "train/time(s)": elapsed,
            "train/pairs_per_s": float(sums[0]) / elapsed,
            "train/real_tokens_per_s": real / elapsed,
            "train/real_token_share": real / computed,
            "train/tokens_per_pair": computed / float(sums[0]),        # computed per pair: padding included, a shared prompt once
            "train/prefix_saved_share": 1.0 - real / conversation,    # share of the conversations' tokens a shared prefix saved
            "train/micro_batches": micro_batches / self.device_mesh.size(),
            "train/skipped_steps": self.skipped_steps,
        })
        return metrics

    # Replaces FSDPSFTTrainer.validation_step: scores every validation pair once and returns
    # metrics over the whole set and all ranks (verl returns a per-micro-batch loss and fit()
    # averages those means on rank 0).
    @torch.no_grad()
    def validation_step(self, batch=None) -> dict[str, float]:
        self.fsdp_model.eval()
        pairs = [self.val_dataset[i] for i in self.val_indices]
        plan = self.plan_step(pairs, balance_ranks=False) if pairs else []
        # FSDP forwards are collectives: every rank runs as many as the busiest one, extra ones discarded.
        rounds = int(self._all_reduce(torch.tensor(len(plan), device=self.device_name), dist.ReduceOp.MAX))
        max_strength = self.loss_config.max_strength
        # one vector, one all-reduce: pair sums, then per-|strength| sums (zeros when there are no strengths)
        sums = torch.zeros(len(SUM_FIELDS) + max_strength * len(STRENGTH_SUM_FIELDS), dtype=torch.float64, device=self.device_name)
        for round_index in range(rounds):
            if round_index < len(plan):
                micro = [pairs[i] for i in plan[round_index]]
                result = self._compute_loss_and_backward(micro, do_backward=False)
                sums[: len(SUM_FIELDS)] += result.sums
                if self.val_has_strengths:
                    sums[len(SUM_FIELDS):] += strength_sums(result.chosen, result.rejected, [p.preference_strength for p in micro], max_strength)
            else:
                self._compute_loss_and_backward([self.val_dataset[0]], do_backward=False)
        self._all_reduce(sums)
        self.last_val_sums = sums[: len(SUM_FIELDS)].cpu()
        self.last_val_step = self.current_step
        metrics = {f"val/{k}": v for k, v in metrics_from_sums(sums[: len(SUM_FIELDS)]).items()}
        if self.val_has_strengths:
            metrics.update({f"val/{k}": v for k, v in strength_metrics_from_sums(sums[len(SUM_FIELDS):]).items()})
        return metrics

    # ---- checkpoints (bt_checkpoint decides what counts; verl's manager writes the shards)

    def _all_weights_finite(self) -> bool:
        finite = torch.tensor(1.0, device=self.device_name)
        for parameter in self.fsdp_model.parameters():
            local = parameter.to_local() if hasattr(parameter, "to_local") else parameter
            if not torch.isfinite(local).all():
                finite.zero_()
                break
        return bool(self._all_reduce(finite, dist.ReduceOp.MIN))

    # Replaces FSDPSFTTrainer.save_checkpoint: verl updates the tracker and deletes old checkpoints
    # before the new one is complete, saves non-finite weights, and pickles data.pt. Here: refuse
    # non-finite weights, shards via verl's manager (retention off), data.pt, then bt_state.json
    # (the completeness mark), then the tracker, then retention.
    def save_checkpoint(self, step):
        trainer_config = self.config.trainer
        root = trainer_config.default_local_dir
        directory = checkpoint.step_dir(root, step)
        rank = self.device_mesh.get_rank()
        if not self._all_weights_finite():
            latest = checkpoint.latest_complete(root)
            raise TrainingDiverged(f"weights are not finite at step {step}; not saving (the last good checkpoint is {latest})")
        if rank == 0:
            directory.mkdir(parents=True, exist_ok=True)
            (directory / checkpoint.STATE_FILE).unlink(missing_ok=True)  # re-saving a step: incomplete until done
        dist.barrier()
        with quiet_transformers():  # verl's export passes the deprecated torch_dtype= to transformers
            self.checkpoint_manager.save_checkpoint(local_path=str(directory), global_step=step, max_ckpt_to_keep=None)
        if self.lora_settings is not None and "hf_model" in trainer_config.checkpoint.save_contents:
            self._save_lora_exports(directory)
        if rank == 0:
            if "hf_model" in trainer_config.checkpoint.save_contents:
                # the class every consumer reads the same (see bt_export), and the reward scale over the
                # validation conversations when this step was validated
                export.export_reward_model(directory / "huggingface", trust_remote_code=self.config.model.trust_remote_code)
                if self.last_val_step == step and self.last_val_sums is not None:
                    stats = reward_stats_from_sums(self.last_val_sums)
                    if math.isfinite(stats.std) and stats.std > 0:
                        export.write_reward_stats(directory / "huggingface", stats.mean, stats.std, count=stats.count, step=step,
                                                     source="validation conversations (data.val_files)")
            with atomic.atomic_outputs([directory / checkpoint.DATA_STATE_FILE]) as (temp,):
                torch.save(self.train_dataloader.state_dict(), temp)
            checkpoint.mark_complete(
                directory, step=step, world_size=self.device_mesh.size(), save_contents=list(trainer_config.checkpoint.save_contents),
                trainer_state={"skipped_steps": self.skipped_steps, "consecutive_skipped_steps": self.consecutive_skipped_steps,
                               "lora": self.lora_description()},
            )
            checkpoint.write_tracker(root, step)
            for removed in checkpoint.remove_old_checkpoints(root, keep=trainer_config.max_ckpt_to_keep, newest_step=step):
                print(f"removed old checkpoint {removed}")
            if trainer_config.default_hdfs_dir:
                from verl.utils import hdfs_io

                hdfs_io.makedirs(trainer_config.default_hdfs_dir, exist_ok=True)
                hdfs_io.copy(src=str(directory), dst=trainer_config.default_hdfs_dir, dirs_exist_ok=True)
        dist.barrier()

    # Extends FSDPSFTTrainer._init_checkpoint_manager: under LoRA, verl 0.6.1's manager would write the
    # peft model's state dict (base_layer / lora_A keys) into huggingface/ as if it were the plain
    # model; that export is ours instead (_save_lora_exports). The sharded state is verl's as usual.
    def _init_checkpoint_manager(self):
        super()._init_checkpoint_manager()
        if self.lora_settings is not None:
            manager = self.checkpoint_manager
            manager.checkpoint_save_contents = [item for item in manager.checkpoint_save_contents if item != "hf_model"]

    def lora_description(self) -> dict | None:
        """What a checkpoint's shards depend on: resume needs the same (bt_state.json's trainer.lora)."""
        if self.lora_settings is None:
            return None
        return {"rank": self.lora_settings.rank, "alpha": self.lora_settings.alpha, "target_modules": list(self.lora_settings.target_modules),
                "base_dtype": self.config.model.lora_base_dtype}

    def _save_lora_exports(self, directory: Path) -> None:
        """huggingface/: the adapter merged into the base weights (a plain value-head checkpoint);
        lora_adapter/: the adapter and score head alone, in peft's format. Collective; rank 0 writes."""
        from transformers import AutoModelForTokenClassification
        from verl.utils.fsdp_utils import get_fsdp_full_state_dict

        full_state = get_fsdp_full_state_dict(self.fsdp_model, offload_to_cpu=True, rank0_only=True)
        if self.device_mesh.get_rank() == 0:
            hf_dir = directory / "huggingface"  # verl's manager has written the config and tokenizer there
            merged = lora.merge_lora_state_dict(full_state, self.lora_settings.scaling, dtype=torch.float32)
            with torch.device("meta"):  # only the class and config are needed: the weights are `merged`
                plain = AutoModelForTokenClassification.from_config(self.model_config)
            with quiet_transformers():
                plain.save_pretrained(hf_dir, state_dict=merged)
            lora.save_adapter(directory / lora.ADAPTER_DIR, full_state, self.lora_settings,
                                 base_model=str(self.config.model.partial_pretrain))
            del merged
        del full_state

    # Replaces FSDPSFTTrainer.load_checkpoint (and its _determine_resume_path / _find_latest_checkpoint /
    # _load_dataloader_state): verl restarts from step 0 when the tracker is missing, replays the
    # epoch when data.pt is missing, loads pickles with weights_only=False, and at an epoch boundary
    # restores an exhausted dataloader that then skips the whole next epoch.
    def load_checkpoint(self):
        trainer_config = self.config.trainer
        found = checkpoint.find_resume_checkpoint(
            trainer_config.default_local_dir, mode=trainer_config.resume_mode, resume_from_path=trainer_config.resume_from_path,
            world_size=self.device_mesh.size(), load_contents=list(trainer_config.checkpoint.load_contents),
        )
        if found is None:
            return 0
        directory, state = found
        step = int(state["step"])
        saved_lora = state["trainer"].get("lora")
        if "lora" in state["trainer"] and saved_lora != self.lora_description():
            # the shards' keys differ (peft's base_layer / lora_A) and verl would fail deep in a load; say why
            raise checkpoint.CheckpointError(
                f"{directory}: saved with LoRA {saved_lora or 'off (full fine-tune)'}, this run has LoRA "
                f"{self.lora_description() or 'off (full fine-tune)'}; set model.lora_* as the run was, or use another trainer.experiment_name")
        with checkpoint.weights_only_loading():
            self.checkpoint_manager.load_checkpoint(str(directory))
            if step % self.steps_per_epoch:
                self.train_dataloader.load_state_dict(torch.load(directory / checkpoint.DATA_STATE_FILE, map_location="cpu"))
        # At an epoch boundary the saved dataloader has yielded its whole epoch: the next epoch starts
        # from a fresh iterator, exactly as in an uninterrupted run.
        self.skipped_steps = int(state["trainer"]["skipped_steps"])
        self.consecutive_skipped_steps = int(state["trainer"]["consecutive_skipped_steps"])
        self.resume_global_step = step
        self.resumed_from = directory
        return step

    # Replaces FSDPSFTTrainer.fit: the same loop (resume, early stop, validate, save), logging BT
    # metrics; a training set that ends mid-run on total_training_steps keeps the epoch schedule.
    # Also: a finished run is reported as such, a diverged run stops without saving, and a
    # failing validation still leaves the trained state saved.
    def fit(self):
        rank = self.device_mesh.get_rank()
        trainer_config = self.config.trainer
        global_step = self.resume_global_step
        last_step = self.total_steps
        if trainer_config.total_training_steps is not None:
            last_step = min(last_step, trainer_config.total_training_steps)
        self.last_val_metrics = None
        self.final_step = global_step
        if global_step >= last_step:
            if rank == 0:
                print(f"run complete: step {global_step} of {last_step}; final checkpoint {self.resumed_from} "
                      "(nothing to train; use another trainer.experiment_name for a new run)")
            return None

        tracking, history = None, None
        if rank == 0:
            tracking = start_tracking(trainer_config, self.config)
            if trainer_config.history_file is not None:
                os.makedirs(os.path.dirname(os.path.abspath(trainer_config.history_file)), exist_ok=True)
                keep_history_through(trainer_config.history_file, self.resume_global_step)
                history = open(trainer_config.history_file, "a", encoding="utf-8")

        def log(metrics: dict[str, float], step: int) -> None:
            if tracking is not None:
                tracking.log(data=metrics, step=step)
                if "console" in trainer_config.logger:
                    tqdm.write(format_console_line(step, metrics))
            if history is not None:
                history.write(json_line(step, metrics))
                history.flush()

        progress = tqdm(total=last_step, initial=global_step, desc="training", unit="step", disable=rank != 0, dynamic_ncols=True)
        try:
            for epoch in range(global_step // self.steps_per_epoch, trainer_config.total_epochs):
                self.train_sampler.set_epoch(epoch)
                for pairs in self.train_dataloader:
                    global_step += 1
                    self.current_step = global_step
                    metrics = self.training_step(pairs)
                    log(metrics, global_step)
                    progress.update(1)
                    progress.set_postfix(epoch=epoch + 1, loss=f"{metrics['train/loss']:.4g}", acc=f"{metrics['train/accuracy']:.3g}")
                    if self.consecutive_skipped_steps >= trainer_config.max_consecutive_skipped_steps:
                        raise TrainingDiverged(
                            f"{self.consecutive_skipped_steps} consecutive steps had non-finite gradients (last: step {global_step}, "
                            f"{self.skipped_steps} skipped in all); stopping without saving. Last good checkpoint: "
                            f"{checkpoint.latest_complete(trainer_config.default_local_dir)}. Lower optim.lr or optim.clip_grad."
                        )
                    is_last_step = global_step >= last_step
                    is_save_step = is_last_step or (trainer_config.save_freq > 0 and global_step % trainer_config.save_freq == 0)
                    if is_last_step or (trainer_config.test_freq > 0 and global_step % trainer_config.test_freq == 0):
                        try:
                            self.last_val_metrics = self.validation_step()
                        except Exception:
                            if rank == 0:
                                print(f"validation failed at step {global_step}: saving the trained state first")
                            self.save_checkpoint(step=global_step)
                            raise
                        log(self.last_val_metrics, global_step)
                    if is_save_step and self.consecutive_skipped_steps:
                        # the state after skipped updates is suspect: keep the last good checkpoint as the latest
                        latest = checkpoint.latest_complete(trainer_config.default_local_dir)
                        if is_last_step:
                            raise TrainingDiverged(f"the last {self.consecutive_skipped_steps} steps had non-finite gradients; "
                                                   f"not saving the final state. Last good checkpoint: {latest}")
                        if rank == 0:
                            print(f"not saving at step {global_step}: the last {self.consecutive_skipped_steps} steps had non-finite gradients")
                    elif is_save_step:
                        self.save_checkpoint(step=global_step)
                    if is_last_step:
                        break
                if global_step >= last_step:
                    break
        finally:
            progress.close()
            self.final_step = global_step
            if history is not None:
                history.close()
            if tracking is not None:
                close_tracking(tracking)
        if rank == 0:
            final = checkpoint.step_dir(trainer_config.default_local_dir, global_step)
            print("final validation: " + "  ".join(f"{k.removeprefix('val/')} {v:.4g}" for k, v in self.last_val_metrics.items()))
            print(f"final model: {final / 'huggingface'}")
            val_files = [self.config.data.val_files] if isinstance(self.config.data.val_files, str) else list(self.config.data.val_files)
            print(f"evaluate it: python evaluate_rm.py --model {final} --data {' '.join(val_files)} "
                  f"--output {Path(trainer_config.default_local_dir) / 'val_scores.jsonl'}")
            if history is not None and trainer_config.curves_png is not None:
                from plot_curves import plot_curves, read_history

                print(f"training curves: {plot_curves(read_history(trainer_config.history_file), trainer_config.curves_png, trainer_config.experiment_name)}")
        return self.last_val_metrics


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
    rank, world_size = init_distributed(device)
    launcher.checked_on_rank0(lambda: preflight.check_inputs(knobs, world_size))
    if rank == 0:  # the console gets the start-up summary; the run's log file the whole config
        write_run_log("resolved config:\n" + OmegaConf.to_yaml(config, resolve=True))
    seed_everything(config.trainer.seed)
    device_mesh = init_device_mesh(device_type=device, mesh_shape=(world_size,), mesh_dim_names=("fsdp",))
    local_model_path = copy_to_local(src=config.model.partial_pretrain, verbose=False)
    tokenizer = load_tokenizer(local_model_path, config.data, config.model.trust_remote_code)
    train_dataset = create_pair_dataset(config.data.train_files, config.data, tokenizer)
    val_dataset = create_pair_dataset(config.data.val_files, config.data, tokenizer)
    check_strengths(loss_config, config.data, train_dataset, val_dataset)
    if len(train_dataset) == 0 or len(val_dataset) == 0:
        empty = config.data.train_files if len(train_dataset) == 0 else config.data.val_files
        raise pair_dataset.DataError(f"{empty}: no usable pairs after reading (see the dropped-pair counts above)")
    shared = rows.count_shared_pairs(train_dataset.pairs, val_dataset.pairs) if hasattr(train_dataset, "pairs") else 0
    if rank == 0:
        for dataset in (train_dataset, val_dataset):
            report = getattr(dataset, "read_report", None)
            if report:
                print("\n".join(f"read {line}" for line in report.splitlines()))
        if shared:
            print(f"WARNING: {shared} validation pairs also appear in the training data (identical chosen and rejected)")
    trainer = BTRewardTrainer(config, device_mesh, tokenizer, train_dataset, val_dataset)
    metrics = trainer.fit()
    dist.destroy_process_group()
    return metrics


@hydra.main(config_path=".", config_name="trainer", version_base=None)
def main(config: DictConfig):
    from btrm import launcher

    # Errors the user can fix (config, data, checkpoint, divergence): one line from rank 0, also in
    # <trainer.default_local_dir>/errors.log and the run's log file, exit status 2, no traceback
    # unless BT_DEBUG=1. Anything else keeps its traceback.
    with launcher.errors_reported_once(launcher.EXPECTED_ERRORS + (TrainingDiverged,),
                                           log_dir=lambda: launcher.log_dir_of(config), run_log=write_run_log):
        run(config)


if __name__ == "__main__":
    main()

"""One training step: micro-batches planned and dealt over the ranks, forward and backward through the
layouts, the preference loss, the update (a non-finite one skipped), metrics summed over all ranks.

`TrainStep` is built once the model and optimizer exist (bt_trainer's `_build_model_optimizer`) from
the data, optim and model sections, the loss section's bt_loss.LossConfig and this rank's
btrm.sequence_parallel.SequenceParallel (ulysses_sequence_parallel_size): with N > 1 a group of N
ranks shares each micro-batch, its packed row split over them, so micro-batches are dealt per
data-parallel group and a group's metrics are counted by its first rank. Its collectives are
torch.distributed's: a one-rank gloo group is enough to run it in a test.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, NamedTuple

import torch
import torch.distributed as dist
from tqdm import tqdm

from bt_loss import SUM_FIELDS, LossConfig, metrics_from_sums, preference_loss
from btrm import batching, sequence_parallel
from btrm.checkpoint import TrainerState

if TYPE_CHECKING:
    from btrm.config import DataSection, ModelSection, OptimSection
    from btrm.fault_guard import FaultGuard
    from btrm.pair_dataset import TokenizedPair
    from btrm.sequence_parallel import SequenceParallel


class MicroBatchResult(NamedTuple):
    loss: torch.Tensor  # this micro-batch's share of the step's loss (already backpropagated when training)
    sums: torch.Tensor  # bt_loss.pair_sums vector
    chosen: torch.Tensor  # detached rewards
    rejected: torch.Tensor
    real_tokens: int
    computed_tokens: int
    conversation_tokens: int = 0  # tokens of the pairs' conversations run separately (> real when a prompt is shared)


class TrainStep:
    """The step of one rank (see the module doc). `token_budget` may be replaced between steps (bench/gpu_check.py)."""

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        lr_scheduler,
        *,
        data: DataSection,
        optim: OptimSection,
        model_settings: ModelSection,
        loss: LossConfig,
        layout: str,
        token_budget: batching.TokenBudget,
        pad_token_id: int,
        device: str,
        param_dtype: torch.dtype,
        guard: FaultGuard,
        check_layout: bool,
        sequence_parallel: SequenceParallel,
    ):
        self.model, self.optimizer, self.lr_scheduler = model, optimizer, lr_scheduler
        self.max_pairs, self.clip_grad, self.strategy = (
            data.micro_batch_size_per_gpu,
            optim.clip_grad,
            model_settings.strategy,
        )
        self.loss, self.layout, self.token_budget = loss, layout, token_budget
        self.pad_token_id, self.device, self.param_dtype, self.guard = pad_token_id, device, param_dtype, guard
        self.sequence_parallel = sequence_parallel  # this rank's sequence-parallel and data-parallel groups
        self.layout_checked = (
            layout == "padded" or not check_layout
        )  # the start-up layout check has run, or is not needed

    def plan(self, pairs: list[TokenizedPair]) -> list[list[int]]:
        """Micro-batches of this rank's pairs (validation: every rank scores its own pairs)."""
        return batching.plan_micro_batches(pairs, self.token_budget.tokens, self.max_pairs, layout=self.layout)

    def micro_batches(self, pairs: list[TokenizedPair]) -> tuple[list[list[TokenizedPair]], float]:
        """This rank's micro-batches of a training step, and the loss normaliser (the step's pairs per rank).

        With a token budget the pairs every rank sampled are gathered and dealt again by
        batching.deal_micro_batches: the same number of micro-batches on every rank (FSDP's collectives
        pair up) and balanced loads, so that no rank idles at a collective while another computes.
        Fixed-size micro-batches (a null budget) stay on the rank that sampled them. With sequence parallelism
        (ulysses_sequence_parallel_size) they are dealt per data-parallel group instead of per rank.
        """
        world_size, sp = dist.get_world_size(), self.sequence_parallel
        if self.token_budget.tokens is None:
            # sequence parallelism: a group's ranks share the micro-batches of the pairs they sampled
            group_pairs = sequence_parallel.gather_group_pairs(pairs, sp)
            return [[group_pairs[i] for i in indices] for indices in self.plan(group_pairs)], len(pairs)
        sampled: list[list[TokenizedPair] | None] = [None] * world_size
        dist.all_gather_object(sampled, pairs)
        step = [pair for rank_pairs in sampled for pair in rank_pairs]
        # dealt per data-parallel group (world / ulysses_sequence_parallel_size of them); the normaliser stays
        # the pairs per rank: FSDP averages the gradient over all ranks, and a group's ranks add up to its gradient
        dealt = batching.deal_micro_batches(step, self.token_budget.tokens, self.max_pairs, sp.dp_size, self.layout)
        return [[step[i] for i in indices] for indices in dealt[sp.dp_rank]], len(step) / world_size

    def collate(self, pairs: list[TokenizedPair]) -> dict[str, torch.Tensor]:
        return batching.move_to(batching.collate_pairs(pairs, self.pad_token_id, self.layout), self.device)

    def forward_backward(
        self, pairs: list[TokenizedPair], *, backward: bool = True, step_pairs=None
    ) -> MicroBatchResult:
        """Loss of one micro-batch, normalised by the pairs of the whole step (exact accumulation)."""
        batch = self.collate(pairs)
        rewards = self.rewards(self.model, batch)
        n = len(pairs)
        strengths = [p.preference_strength for p in pairs] if self.loss.needs_strengths else None
        loss, sums = preference_loss(rewards[:n], rewards[n:], strengths, self.loss, normalizer=step_pairs or n)
        if backward:
            loss.backward()
        counts = batching.token_counts(batch)
        return MicroBatchResult(
            loss, sums, rewards[:n].detach(), rewards[n:].detach(), counts.real, counts.computed, counts.conversation
        )

    def rewards(self, model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """batching.compute_rewards, a packed row split over this rank's sequence-parallel group when it has one."""
        return sequence_parallel.compute_rewards(model, batch, self.sequence_parallel)

    def run(self, pairs: list[TokenizedPair], state: TrainerState) -> dict[str, float]:
        """One optimizer step over this rank's sampled pairs; the step's metrics over all ranks."""
        start = time.perf_counter()
        if not self.layout_checked:
            self.check_layout(pairs)
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        sums = torch.zeros(len(SUM_FIELDS), dtype=torch.float64, device=self.device)
        # real, computed, micro-batches, conversation tokens; then the ranks' stop votes (FaultGuard)
        tokens = torch.zeros(5, dtype=torch.float64, device=self.device)
        self.guard.at(state.step, "gathering the step's pairs from every rank", beat="starting the step")
        micro_batches, pairs_per_rank = self.micro_batches(pairs)
        self.guard.at(state.step, "running the forward and backward passes (FSDP all-gathers and reduce-scatters)")
        for micro_batch in micro_batches:
            result = self.forward_backward(micro_batch, step_pairs=pairs_per_rank)
            sums += result.sums
            tokens += torch.tensor(
                [result.real_tokens, result.computed_tokens, 1, result.conversation_tokens, 0],
                dtype=torch.float64,
                device=self.device,
            )
        self.guard.at(state.step, "clipping the gradient and stepping the optimizer")
        grad_norm = self.clip_and_step(state)
        lr = self.lr_scheduler.get_last_lr()[0]
        self.lr_scheduler.step()
        if not self.sequence_parallel.counts_metrics:  # the group's first rank counts its pairs and tokens
            sums.zero_()
            tokens.zero_()
        tokens[4] = self.guard.stop_vote()
        self.guard.at(state.step, "all-reducing the step's metrics")
        dist.all_reduce(sums)
        dist.all_reduce(tokens)
        self.guard.count_votes(float(tokens[4]))
        elapsed = time.perf_counter() - start
        return step_metrics(
            sums,
            tokens[:4],
            grad_norm=float(grad_norm),
            lr=lr,
            elapsed=elapsed,
            world_size=self.sequence_parallel.dp_size,
            skipped_steps=state.skipped_steps,
        )

    def clip_and_step(self, state: TrainerState) -> torch.Tensor:
        """Clip to optim.clip_grad and update; a non-finite gradient norm skips the update (counted in `state`)."""
        if self.strategy == "fsdp2":
            from verl.utils.fsdp_utils import fsdp2_clip_grad_norm_

            grad_norm = fsdp2_clip_grad_norm_(self.model.parameters(), max_norm=self.clip_grad)
        else:
            grad_norm = self.model.clip_grad_norm_(max_norm=self.clip_grad)
        if hasattr(grad_norm, "full_tensor"):
            grad_norm = grad_norm.full_tensor()
        finite = bool(torch.isfinite(grad_norm))  # global (all-reduced by the clip): every rank takes the same branch
        if finite:
            self.optimizer.step()
        else:
            self.optimizer.zero_grad(set_to_none=True)
        state.record_update(finite)
        return grad_norm

    def check_layout(self, pairs: list[TokenizedPair]) -> None:
        """Start-up check (trainer.check_layout) on this rank's two shortest pairs: two segments or more per
        pair, and a segment boundary between pairs, at a small share of the first step's cost; collective,
        so all ranks stop together. With sequence parallelism: the group's two shortest, split over the group."""
        self.layout_checked = True
        pairs = sequence_parallel.gather_group_pairs(pairs, self.sequence_parallel)  # one sample per group
        sample = sorted(pairs, key=lambda pair: pair.num_tokens)[:2]
        check_layout_on_every_rank(
            self.model,
            sample,
            self.pad_token_id,
            self.layout,
            self.device,
            self.param_dtype,
            rewards=self.rewards,
        )


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

"""Validation: when it is due, every validation pair scored once, sums per |strength| and per group over all ranks.

`Validator` is built once the step exists (it scores through the step's planning and forward) from
the trainer section's trainer.test_freq. Every rank scores its own share of the pairs (no sampler
padding: each pair once); with sequence parallelism (btrm.sequence_parallel) the share is its
data-parallel group's, the group's ranks split each row and its first rank alone counts the sums.
FSDP forwards are collectives, so every rank runs as many micro-batches as the busiest one and
discards the extra ones. One fp64 vector holds the pair sums, the per-|strength| sums and the
per-group sums, all-reduced once.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from bt_loss import (
    STRENGTH_SUM_FIELDS,
    SUM_FIELDS,
    grouped_metrics_from_sums,
    grouped_sums,
    metrics_from_sums,
    reward_stats_from_sums,
    strength_metrics_from_sums,
    strength_sums,
)

if TYPE_CHECKING:
    from bt_loss import RewardStats
    from btrm.fault_guard import FaultGuard
    from btrm.pair_dataset import GroupIndex, PreferenceDataset, TokenizedPair
    from btrm.sequence_parallel import SequenceParallel
    from btrm.step import TrainStep


def is_due(step: int, freq: int, last_step: int) -> bool:
    """Whether a periodic action (trainer.test_freq, trainer.save_freq; <= 0: only at the end) falls on `step`."""
    return step >= last_step or (freq > 0 and step % freq == 0)


class Validator:
    """Scores the validation set (see the module doc); keeps the last validation's pair sums for the export."""

    def __init__(
        self,
        step: TrainStep,
        dataset: PreferenceDataset,
        *,
        indices: list[int],
        groups: GroupIndex,
        has_strengths: bool,
        test_freq: int,
        guard: FaultGuard,
        sequence_parallel: SequenceParallel,
    ):
        self.step, self.dataset, self.indices, self.groups = step, dataset, indices, groups
        self.has_strengths, self.test_freq, self.guard = has_strengths, test_freq, guard
        self.sequence_parallel = sequence_parallel  # `indices` are its data-parallel group's share
        self.max_strength = step.loss.max_strength
        self.last_sums: torch.Tensor | None = None  # for the reward scale written with a checkpoint of that step
        self.last_step: int | None = None

    def should_validate(self, step: int, last_step: int) -> bool:
        return is_due(step, self.test_freq, last_step)

    @torch.no_grad()
    def run(self, step: int) -> dict[str, float]:
        """val/* metrics over every validation pair of every rank."""
        self.guard.at(step, "validating")
        self.step.model.eval()
        pairs = [self.dataset[i] for i in self.indices]
        self.guard.at(step, "validating", beat="starting validation")
        plan = self.step.plan(pairs) if pairs else []
        rounds = torch.tensor(len(plan), device=self.step.device)
        dist.all_reduce(rounds, op=dist.ReduceOp.MAX)
        strength_width = self.max_strength * len(STRENGTH_SUM_FIELDS)
        group_width = len(self.groups.labels) * len(STRENGTH_SUM_FIELDS)
        sums = torch.zeros(len(SUM_FIELDS) + strength_width + group_width, dtype=torch.float64, device=self.step.device)
        for round_index in range(int(rounds)):
            if round_index < len(plan):
                indices = [self.indices[i] for i in plan[round_index]]
                sums += self.micro_batch_sums([pairs[i] for i in plan[round_index]], indices)
            else:
                self.step.forward_backward([self.dataset[0]], backward=False)
        if not self.sequence_parallel.counts_metrics:  # the group's first rank counts its pairs
            sums.zero_()
        dist.all_reduce(sums)
        self.last_sums, self.last_step = sums[: len(SUM_FIELDS)].cpu(), step
        pair_sums, strength_part, group_part = sums.split([len(SUM_FIELDS), strength_width, group_width])
        metrics = metrics_from_sums(pair_sums)
        if self.has_strengths:
            metrics |= strength_metrics_from_sums(strength_part)
        metrics |= grouped_metrics_from_sums(group_part, self.groups.labels)
        return {f"val/{k}": v for k, v in metrics.items()}

    def micro_batch_sums(self, micro: list[TokenizedPair], dataset_indices: list[int]) -> torch.Tensor:
        """One validation micro-batch's sums: pair sums, then per-|strength|, then per-group (run's layout)."""
        result = self.step.forward_backward(micro, backward=False)
        strengths = (
            strength_sums(result.chosen, result.rejected, [p.preference_strength for p in micro], self.max_strength)
            if self.has_strengths
            else torch.zeros(
                self.max_strength * len(STRENGTH_SUM_FIELDS), dtype=torch.float64, device=result.sums.device
            )
        )
        groups = grouped_sums(
            result.chosen, result.rejected, [self.groups.members[i] for i in dataset_indices], len(self.groups.labels)
        )
        return torch.cat([result.sums.to(torch.float64), strengths, groups])

    def reward_stats(self, step: int) -> RewardStats | None:
        """The validation rewards' mean and spread when `step` was validated (written with its HF export)."""
        if self.last_step != step or self.last_sums is None:
            return None
        stats = reward_stats_from_sums(self.last_sums)
        return stats if math.isfinite(stats.std) and stats.std > 0 else None

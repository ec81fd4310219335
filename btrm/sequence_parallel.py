"""Ulysses sequence parallelism (`ulysses_sequence_parallel_size: N`) for the packed and shared layouts.

The ranks form world/N sequence-parallel groups of N consecutive ranks (a (dp, sp) device mesh, as
verl builds it). A group works on one micro-batch at a time: its packed row (btrm.batching's packed
or shared layout, one row of segments) is padded to a multiple of N and cut into N equal shards,
one per rank; each rank runs the embeddings, projections and MLPs of its shard only. In attention
(`RowShard.attend`, called by btrm.attention's segment attention) an all-to-all gathers the whole
row and scatters the heads (each rank attends H/N heads over every token, verl's
`gather_seq_scatter_heads`), the segments are attended exactly as without parallelism
(btrm.attention: varlen_attn on GPU, per-segment sdpa on CPU; the padding tokens belong to no
segment and are attended by nobody), and a second all-to-all gives every rank its shard back with
all heads (`gather_heads_scatter_seq`). Key/value heads are repeated first where N does not divide
their count (GQA with N > kv heads). Position ids are the row's own, sliced: each conversation keeps
its rotary positions.

Rewards are read on the rank that holds the reward token and summed over the group
(`compute_rewards`); every rank of the group then computes the same loss. The sum's backward is the
identity: each rank back-propagates the loss into the rewards it read, so each token's gradient is
computed exactly once in the group, and the parameters' gradients of the group's ranks add up to the
micro-batch's gradient.

Data parallelism runs over the world/N groups (`SequenceParallel.dp_rank`, `dp_size`): a step's
micro-batches are dealt per group, and a group's metrics are counted by its first rank only
(`counts_metrics`). FSDP2 stays one mesh over all ranks: parameters and optimizer state are sharded
world ways (memory is why one wants sequence parallelism), and its gradient reduce-scatter averages
over all ranks; with the loss normalised by the step's pairs per rank (pairs / world, as without
parallelism) that average is exactly the step's mean gradient.

Entry points: `SequenceParallel.create` (the groups), `check_heads` (the model's heads divide by N),
`compute_rewards` (a collated batch in, the group's rewards out), `gather_group_pairs`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from btrm import batching
from btrm.attention import SegmentLayout

KEY = "ulysses_sequence_parallel_size"


@dataclass(frozen=True)
class SequenceParallel:
    """This rank's place: its sequence-parallel group (`size` ranks, it is `rank` there) and its data-parallel group."""

    size: int
    rank: int  # within the sequence-parallel group
    group: dist.ProcessGroup | None  # None when size is 1
    dp_rank: int  # which sequence-parallel group this rank is in
    dp_size: int  # how many groups (world / size)

    @classmethod
    def create(cls, size: int, device: str) -> SequenceParallel:
        """Collective when size > 1: every rank calls it (builds the (dp, sp) mesh's groups)."""
        world, rank = dist.get_world_size(), dist.get_rank()
        if size == 1:
            return cls(1, 0, None, rank, world)
        if world % size:
            raise ValueError(f"{KEY}={size} does not divide the {world} ranks; use a divisor of {world}")
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh(device, (world // size, size), mesh_dim_names=("dp", "sp"))
        return cls(size, mesh.get_local_rank("sp"), mesh.get_group("sp"), mesh.get_local_rank("dp"), world // size)

    @property
    def group_ranks(self) -> range:
        """Global ranks of this rank's group (consecutive: the mesh's sp dimension is the inner one)."""
        return range(self.dp_rank * self.size, (self.dp_rank + 1) * self.size)

    @property
    def counts_metrics(self) -> bool:
        """Every rank of a group computes the same rewards: only the first counts them in all-reduced sums."""
        return self.rank == 0


def check_heads(model_config, size: int) -> None:
    """The model's attention heads must divide over the group (each rank attends heads / N of them)."""
    heads = getattr(model_config, "num_attention_heads", None)
    if size > 1 and (heads is None or heads % size):
        raise ValueError(
            f"{KEY}={size} does not divide the model's {heads} attention heads (num_attention_heads); "
            "use a divisor of the head count"
        )


def gather_group_pairs(pairs: Sequence, sp: SequenceParallel) -> list:
    """The pairs every rank of this group holds, in rank order (the same list on each of them)."""
    if sp.size == 1:
        return list(pairs)
    gathered: list = [None] * sp.size
    dist.all_gather_object(gathered, list(pairs), group=sp.group)
    return [pair for rank_pairs in gathered for pair in rank_pairs]


class RowShard:
    """One rank's shard of a packed row, handed to attention as `attention_segments`: it attends the whole row.

    layout: the whole row's segments (its `num_queries` real tokens); the row is padded to `size * shard_length`.
    """

    __slots__ = ("layout", "group", "size", "shard_length")

    def __init__(self, layout: SegmentLayout, group: dist.ProcessGroup, size: int, shard_length: int):
        self.layout, self.group, self.size, self.shard_length = layout, group, size, shard_length

    def attend(self, query, key, value, scaling, dropout, attend_segments) -> torch.Tensor:
        """[1, heads, shard, head_dim] in (transformers' layout), [1, shard, heads, head_dim] out."""
        from verl.utils.ulysses import gather_heads_scatter_seq, gather_seq_scatter_heads

        kv_heads = key.shape[1]
        if kv_heads % self.size:  # repeat each kv head (transformers' repeat_kv order) until N divides them
            repeat = self.size // math.gcd(kv_heads, self.size)
            key, value = key.repeat_interleave(repeat, dim=1), value.repeat_interleave(repeat, dim=1)
        # [1, H, T/N, D] -> [1, H/N, T, D]: rank s gets query heads s*H/N.. and the kv heads they read
        query, key, value = (
            gather_seq_scatter_heads(t, seq_dim=2, head_dim=1, group=self.group) for t in (query, key, value)
        )
        real = self.layout.num_queries
        out = attend_segments(
            query[:, :, :real], key[:, :, :real], value[:, :, :real], self.layout, scaling, dropout
        )  # [1, real, H/N, D]
        padding = self.size * self.shard_length - real
        if padding:  # the padding tokens attend to nothing (their outputs are never read)
            out = torch.cat([out, out.new_zeros(1, padding, *out.shape[2:])], dim=1)
        return gather_heads_scatter_seq(out, head_dim=2, seq_dim=1, group=self.group)  # [1, T/N, H, D]

    def __repr__(self) -> str:
        return f"RowShard({self.layout!r}, {self.size} ranks x {self.shard_length} tokens)"


def shard_batch(batch: dict, sp: SequenceParallel) -> tuple[dict, torch.Tensor]:
    """This rank's shard of a packed batch, and which of the batch's rewards it reads (a bool per reward).

    The row is padded at its end to a multiple of N; the shard's reward_index points into the shard
    (clamped where the reward token is another rank's).
    """
    input_ids, position_ids, reward_index = batch["input_ids"], batch["position_ids"], batch["reward_index"]
    real = input_ids.shape[1]
    shard_length = -(-real // sp.size)
    padding = shard_length * sp.size - real
    if padding:  # any token id: no segment reads these positions
        input_ids, position_ids = F.pad(input_ids, (0, padding)), F.pad(position_ids, (0, padding))
    start = sp.rank * shard_length
    owned = (reward_index >= start) & (reward_index < start + shard_length)
    shard = {
        "input_ids": input_ids[:, start : start + shard_length],
        "position_ids": position_ids[:, start : start + shard_length],
        "reward_index": (reward_index - start).clamp(0, shard_length - 1),
        "attention_segments": RowShard(batch["attention_segments"], sp.group, sp.size, shard_length),
    }
    return shard, owned


class _SumOverGroup(torch.autograd.Function):
    """Forward: all-reduce (sum) over the group. Backward: the identity: every rank computes the same loss
    from the sum, and back-propagates it into its own addend only."""

    @staticmethod
    def forward(ctx, tensor, group):
        summed = tensor.clone()
        dist.all_reduce(summed, group=group)
        return summed

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def compute_rewards(model, batch: dict, sp: SequenceParallel) -> torch.Tensor:
    """batching.compute_rewards for a group: a packed or shared batch (the same on every rank of the group) is
    split over its ranks; the rewards, chosen first, come back whole on every rank, with their gradient path."""
    if sp.size == 1 or "attention_segments" not in batch:
        return batching.compute_rewards(model, batch)
    shard, owned = shard_batch(batch, sp)
    local = batching.compute_rewards(model, shard)
    return _SumOverGroup.apply(torch.where(owned, local, torch.zeros_like(local)), sp.group)

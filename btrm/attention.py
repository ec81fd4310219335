"""Attention over the segments of one packed row, from the pinned torch alone (no flash-attn).

A packed micro-batch (btrm.batching's `packed` and `shared` layouts) is one row of tokens cut into
segments. btrm.batching describes each segment once, as a `SegmentLayout`:
- its queries: a contiguous run of the row (the segments' queries tile the row, in order);
- its keys: runs of the row whose last run ends with the segment's queries. A plain packed
  sequence's keys are its own run; the rejected response of a shared-prompt pair has the prompt's
  run then its own run as keys.
Attention is causal with the query block aligned to the END of its keys (bottom-right): query i of
a segment with Lq queries and Lk keys sees keys 0 .. i + Lk - Lq. With keys `prompt + response`
and positions continuing from the prompt's end, every token gets exactly the hidden state it has
when its conversation runs alone (causal attention: prompt tokens never see responses).

Two implementations of that one rule:
- CUDA with bf16/fp16 activations: `torch.nn.attention.varlen.varlen_attn` (FlashAttention kernels
  shipped with torch), one call per layer with cu_seq_q / cu_seq_k and the keys gathered segment
  after segment (`varlen_kernel_inputs`). FlashAttention aligns its causal mask bottom-right when
  queries are fewer than keys; the trainer's start-up check (batching.check_layout) compares against
  the padded path on the real hardware before training.
- everywhere else (CPU, fp32): `scaled_dot_product_attention` per segment, segments of equal shape
  batched into one call; the cost is the sum of the squares of the segment lengths, never the
  square of the row's length (what sdpa with a block-diagonal mask over the whole row costs).

With transformers: `enable_segment_attention(model)` registers the function (AttentionInterface,
plus an AttentionMaskInterface entry so no dense mask is built for a packed row) and switches the
model to it. A forward then uses segment attention when it is given `attention_segments=`;
every other forward (padded batches, with their attention mask) runs the implementation the model
had before (`model.attn_implementation`: sdpa, eager, flash_attention_2...), so the padded layout
stays available on the same model, e.g. for the start-up check. Nothing is registered on import.
"""

from __future__ import annotations

import functools
import inspect
import itertools
import sys
from collections.abc import Sequence

import torch
import torch.nn.functional as F

# The registered name is this prefix + the padded implementation it falls back to ("bt_segments_over_sdpa"):
# the attention and mask functions read their fallback from the name, so nothing is stored in the
# model's config (which is saved with checkpoints; `_attn_implementation` itself is not).
SEGMENT_ATTENTION_PREFIX = "bt_segments_over_"


class SegmentLayout:
    """Queries and keys of every segment of one packed row, and the kernel arguments derived from them.

    Built from python lists (btrm.batching does it once per micro-batch); `to(device)` moves the tensors
    once per micro-batch rather than once per layer. A plain class on purpose: FSDP traverses
    dataclasses and named tuples in forward inputs, which this object has no reason to be part of.
    """

    __slots__ = ("query_lengths", "key_ranges", "key_lengths", "key_index", "cu_seq_q", "cu_seq_k", "max_q", "max_k")

    def __init__(self, query_lengths, key_ranges, key_lengths, key_index, cu_seq_q, cu_seq_k, max_q, max_k):
        self.query_lengths: tuple[int, ...] = query_lengths  # per segment, its run of queries (in row order)
        self.key_ranges: tuple[tuple[tuple[int, int], ...], ...] = (
            key_ranges  # per segment, [start, end) runs of the row
        )
        self.key_lengths: tuple[int, ...] = key_lengths
        self.key_index: torch.Tensor | None = (
            key_index  # row positions of all keys, segment after segment; None: keys are the queries
        )
        self.cu_seq_q: torch.Tensor = cu_seq_q  # int32 [segments + 1], varlen_attn's cumulative query lengths
        self.cu_seq_k: torch.Tensor = cu_seq_k  # int32 [segments + 1], over the gathered keys
        self.max_q: int = max_q
        self.max_k: int = max_k

    @classmethod
    def from_segments(cls, segments: Sequence[tuple[tuple[int, int], Sequence[tuple[int, int]]]]) -> SegmentLayout:
        """From [(query run, [key runs])] per segment, runs as [start, end) positions of the row.

        Checks the contract the kernels rely on: query runs tile the row from 0 in order, and each
        segment's keys end with its own queries (that is what aligns its causal mask bottom-right).
        """
        if not segments:
            raise ValueError("a packed row needs at least one segment")
        query_lengths, key_ranges, key_lengths = [], [], []
        row_end = 0
        gathered = False
        for number, ((query_start, query_end), runs) in enumerate(segments):
            runs = tuple((int(start), int(end)) for start, end in runs)
            if query_start != row_end or query_end <= query_start:
                raise ValueError(
                    f"segment {number}: queries [{query_start}, {query_end}) do not continue the row at {row_end}"
                )
            if (
                not runs
                or runs[-1][1] != query_end
                or runs[-1][0] > query_start
                or any(end <= start for start, end in runs)
            ):
                raise ValueError(
                    f"segment {number}: key runs {runs} do not end with its queries [{query_start}, {query_end})"
                )
            gathered = gathered or runs != ((query_start, query_end),)
            row_end = query_end
            query_lengths.append(query_end - query_start)
            key_ranges.append(runs)
            key_lengths.append(sum(end - start for start, end in runs))
        key_index = (
            torch.cat([torch.arange(start, end) for runs in key_ranges for start, end in runs]) if gathered else None
        )
        cu_seq_q = torch.tensor([0, *query_lengths], dtype=torch.int32).cumsum(0, dtype=torch.int32)
        cu_seq_k = torch.tensor([0, *key_lengths], dtype=torch.int32).cumsum(0, dtype=torch.int32)
        return cls(
            tuple(query_lengths),
            tuple(key_ranges),
            tuple(key_lengths),
            key_index,
            cu_seq_q,
            cu_seq_k,
            max(query_lengths),
            max(key_lengths),
        )

    @property
    def num_queries(self) -> int:
        return int(sum(self.query_lengths))

    def to(self, device, non_blocking: bool = False) -> SegmentLayout:
        move = lambda t: None if t is None else t.to(device, non_blocking=non_blocking)  # noqa: E731
        return SegmentLayout(
            self.query_lengths,
            self.key_ranges,
            self.key_lengths,
            move(self.key_index),
            move(self.cu_seq_q),
            move(self.cu_seq_k),
            self.max_q,
            self.max_k,
        )

    def __repr__(self) -> str:
        return f"SegmentLayout({len(self.query_lengths)} segments, {self.num_queries} queries, {sum(self.key_lengths)} keys)"


# ----------------------------------------------------------------------------- the two implementations


def runs_on_varlen_kernel(query: torch.Tensor) -> bool:
    """FlashAttention (inside torch) needs CUDA and half-precision activations; everything else uses sdpa."""
    return query.is_cuda and query.dtype in (torch.float16, torch.bfloat16)


def varlen_kernel():
    """torch's varlen_attn (imported when first used: it is CUDA-only and the CPU path never needs it)."""
    from torch.nn.attention.varlen import varlen_attn

    return varlen_attn


def varlen_kernel_inputs(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, segments: SegmentLayout):
    """(q, k, v) as varlen_attn takes them: [tokens, heads, head_dim], keys gathered segment after segment.

    transformers hands attention [1, heads, tokens, head_dim]. A shared-prompt segment's keys are
    gathered as prompt + response, so the prompt's keys appear once per segment that reads them.
    """
    q = query[0].transpose(0, 1).contiguous()
    k = key[0].transpose(0, 1)
    v = value[0].transpose(0, 1)
    if segments.key_index is not None:
        k, v = k.index_select(0, segments.key_index), v.index_select(0, segments.key_index)
    return q, k.contiguous(), v.contiguous()


def varlen_attention(query, key, value, segments: SegmentLayout, scaling: float | None, dropout: float) -> torch.Tensor:
    """The CUDA branch: one varlen_attn call per layer; returns [1, tokens, heads, head_dim]."""
    if dropout:
        raise ValueError(
            "segment attention with varlen_attn has no attention dropout; set the model's attention_dropout to 0"
        )
    q, k, v = varlen_kernel_inputs(query, key, value, segments)
    kernel = varlen_kernel()
    # torch 2.13 asks for enable_gqa when key/value have fewer heads; torch 2.11 has no such argument
    # (its flash kernel takes fewer key/value heads natively) and raises TypeError if given one.
    gqa = {"enable_gqa": q.shape[1] != k.shape[1]} if takes_enable_gqa(kernel) else {}
    # window_size (-1, 0): causal, aligned bottom-right
    out = kernel(
        q,
        k,
        v,
        segments.cu_seq_q,
        segments.cu_seq_k,
        segments.max_q,
        segments.max_k,
        scale=scaling,
        window_size=(-1, 0),
        **gqa,
    )
    return out.unsqueeze(0)


@functools.cache
def takes_enable_gqa(kernel) -> bool:
    """Whether this torch's varlen_attn has the enable_gqa argument (torch >= 2.13; 2.11 has not)."""
    return "enable_gqa" in inspect.signature(kernel).parameters


def bottom_right_causal_mask(query_length: int, key_length: int, device) -> torch.Tensor:
    """True where query i may see key j: j <= i + key_length - query_length."""
    return torch.ones(query_length, key_length, dtype=torch.bool, device=device).tril(
        diagonal=key_length - query_length
    )


def sdpa_attention(query, key, value, segments: SegmentLayout, scaling: float | None, dropout: float) -> torch.Tensor:
    """The CPU / fp32 branch: sdpa per segment, equal (queries, keys) shapes batched; returns [1, tokens, heads, head_dim]."""
    if segments.key_index is not None:
        key, value = key.index_select(2, segments.key_index), value.index_select(2, segments.key_index)
    heads, kv_heads = query.shape[1], key.shape[1]
    if kv_heads != heads:  # GQA: each kv head serves heads // kv_heads query heads (transformers' repeat_kv order)
        key, value = key.repeat_interleave(heads // kv_heads, dim=1), value.repeat_interleave(heads // kv_heads, dim=1)
    # python offsets (the tensors' .tolist() would synchronise with the device at every layer)
    query_starts = list(itertools.accumulate(segments.query_lengths, initial=0))
    key_starts = list(itertools.accumulate(segments.key_lengths, initial=0))
    by_shape: dict[tuple[int, int], list[int]] = {}
    for number, shape in enumerate(zip(segments.query_lengths, segments.key_lengths, strict=True)):
        by_shape.setdefault(shape, []).append(number)

    def stacked(tensor, starts, length, numbers):
        parts = [tensor[:, :, starts[n] : starts[n] + length] for n in numbers]
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    outputs: list[torch.Tensor | None] = [None] * len(segments.query_lengths)
    for (query_length, key_length), numbers in by_shape.items():
        q = stacked(query, query_starts, query_length, numbers)
        k = stacked(key, key_starts, key_length, numbers)
        v = stacked(value, key_starts, key_length, numbers)
        if (
            query_length == key_length
        ):  # sdpa's is_causal is top-left aligned: the same as bottom-right only for square blocks
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True, scale=scaling)
        else:
            mask = bottom_right_causal_mask(query_length, key_length, query.device)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, scale=scaling)
        for row, n in enumerate(numbers):
            outputs[n] = out[row : row + 1]
    return torch.cat(outputs, dim=2).transpose(1, 2)


# ----------------------------------------------------------------------------- transformers integration


def padded_implementation(name: str) -> str:
    return name.removeprefix(SEGMENT_ATTENTION_PREFIX)


def _padded_attention_function(module, attention_mask):
    """The model's own implementation, for forwards without segments (padded batches)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if attention_mask is None:
        # No mask reached us (segment_attention_mask returns None for a mask-less batch): the batch
        # is unpadded, and plain causal attention is what every implementation computes for it.
        return sdpa_attention_forward
    name = padded_implementation(module.config._attn_implementation)
    if name == "eager":  # eager is each model's own function, not in the registry
        return sys.modules[type(module).__module__].eager_attention_forward
    return ALL_ATTENTION_FUNCTIONS[name]


def segment_attention(
    module, query, key, value, attention_mask, scaling=None, dropout=0.0, attention_segments=None, **kwargs
):
    """transformers attention function: [1, heads, tokens, head_dim] in, ([1, tokens, heads, head_dim], None) out."""
    if attention_segments is None:
        if attention_mask is None:
            position_ids = kwargs.get("position_ids")
            if (
                position_ids is not None
                and position_ids.shape[-1] > 1
                and bool((position_ids[..., 1:] <= position_ids[..., :-1]).any())
            ):
                raise ValueError(
                    "a packed row (position_ids restart) reached attention without attention_segments: "
                    "collate it with btrm.batching (collate_pairs / collate_packed) and call batching.compute_rewards"
                )
        return _padded_attention_function(module, attention_mask)(
            module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
        )
    if query.shape[0] != 1:
        raise ValueError(f"segment attention takes one packed row, got a batch of {query.shape[0]}")
    if kwargs.get("sliding_window") is not None:
        raise ValueError("segment attention does not implement sliding-window attention")
    if not isinstance(attention_segments, SegmentLayout):
        # a row split over a sequence-parallel group (btrm.sequence_parallel.RowShard): it gathers the row
        # and scatters the heads around attend_segments
        return attention_segments.attend(query, key, value, scaling, dropout, attend_segments), None
    return attend_segments(query, key, value, attention_segments, scaling, dropout), None


def attend_segments(query, key, value, segments: SegmentLayout, scaling: float | None, dropout: float) -> torch.Tensor:
    """[1, heads, tokens, head_dim] in, [1, tokens, heads, head_dim] out: varlen_attn on CUDA in half precision, else sdpa."""
    if runs_on_varlen_kernel(query):
        return varlen_attention(query, key, value, segments, scaling, dropout)
    return sdpa_attention(query, key, value, segments, scaling, dropout)


def segment_attention_mask(*args, attention_mask=None, config=None, **kwargs):
    """transformers mask function: no dense mask for a packed row (attention_mask None); padded batches get the padded implementation's."""
    if attention_mask is None:
        return None
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    return ALL_MASK_ATTENTION_FUNCTIONS[padded_implementation(config._attn_implementation)](
        *args, attention_mask=attention_mask, config=config, **kwargs
    )


def enable_segment_attention(model) -> str:
    """Switch `model` to segment attention for forwards given `attention_segments=`; returns the registered name.

    Forwards without segments keep the implementation the model was loaded with. Idempotent.
    Call it before gradient checkpointing recomputes anything (i.e. at model set-up): the choice
    is read from the config at every forward, recomputations included.
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    current = model.config._attn_implementation or "eager"
    if current.startswith(SEGMENT_ATTENTION_PREFIX):
        return current
    name = SEGMENT_ATTENTION_PREFIX + current
    AttentionInterface.register(name, segment_attention)
    AttentionMaskInterface.register(name, segment_attention_mask)
    model.config._attn_implementation = name
    return name


def uses_segment_attention(model) -> bool:
    return str(model.config._attn_implementation or "").startswith(SEGMENT_ATTENTION_PREFIX)

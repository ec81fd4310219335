"""Micro-batches of pairs, their layouts, and where a reward is read.

- Reward position: the last real token of each sequence, read exactly as verl's
  `RewardModelWorker` reads it: `argmax(position_ids * attention_mask)` under right padding
  (`reward_token_index`); in a packed row, the last token of each conversation.
- Batches: a micro-batch holds whole pairs; its rewards always come out chosen first, then
  rejected. Layouts (`collate_pairs`, LAYOUTS):
  padded: right-padded to the longest sequence in it (`collate_padded`; never to max_length);
  packed: one row, position_ids restarting at 0 per conversation, each conversation one attention
          segment (`collate_packed`);
  shared: one row, each pair `[shared prefix | chosen suffix | rejected suffix]`, the prefix (the
          prompt, and any leading tokens the responses share) computed once (`collate_shared`).
  The packed layouts are described once here, as btrm.attention.SegmentLayout (per segment its
  queries and its keys), and attended by btrm.attention; token budgets count computed tokens.
- Planning: `plan_micro_batches` cuts a rank's pairs by a token budget or a pair count;
  `deal_micro_batches` cuts a whole step's pairs (all ranks') by the budget and deals the micro-batches
  to the ranks, the same count each and their loads balanced.
- Scoring: `score()` is the documented Python API (a conversation list in, rewards out); it reads
  conversations with rows.parse_messages and tokenizes them with pair_dataset.encode_conversation,
  as training does.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Sequence
from typing import NamedTuple

import torch

from btrm import attention
from btrm.pair_dataset import (
    TokenizedPair,
    common_prefix_length,
    encode_conversation,
    shared_prefix_length,
)
from btrm.rows import parse_messages

LAYOUTS = ("padded", "packed", "shared")


# ----------------------------------------------------------------------------- batches


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """verl's compute_position_id_with_mask: 0, 1, 2... over real tokens, 0 on left pads."""
    return torch.clip(torch.cumsum(attention_mask, dim=-1) - 1, min=0)


def reward_token_index(attention_mask: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
    """The token verl's RewardModelWorker reads the score from: argmax(position_ids * attention_mask)."""
    return torch.argmax(position_ids * attention_mask, dim=-1)


def pair_sequences(pairs: Sequence[TokenizedPair]) -> list[list[int]]:
    """All chosen sequences, then all rejected ones: rewards[:n] are chosen, rewards[n:] rejected."""
    return [p.chosen for p in pairs] + [p.rejected for p in pairs]


def collate_padded(sequences: Sequence[Sequence[int]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest sequence here. Keys: input_ids, attention_mask, position_ids, reward_index."""
    longest = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), longest), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), longest), dtype=torch.long)
    for row, ids in enumerate(sequences):
        input_ids[row, : len(ids)] = torch.as_tensor(ids, dtype=torch.long)
        attention_mask[row, : len(ids)] = 1
    position_ids = position_ids_from_mask(attention_mask)
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "position_ids": position_ids,
        "reward_index": reward_token_index(attention_mask, position_ids),
    }


def collate_packed(sequences: Sequence[Sequence[int]]) -> dict[str, torch.Tensor]:
    """Concatenate into one row, position_ids restarting at 0 per sequence, no attention mask.

    Each sequence is one attention segment (`attention_segments`): its tokens attend to its own
    tokens only, computed by btrm.attention's segment attention (compute_rewards passes the segments).
    """
    lengths = [len(s) for s in sequences]
    starts = list(itertools.accumulate(lengths, initial=0))
    input_ids = torch.tensor([token for s in sequences for token in s], dtype=torch.long).unsqueeze(0)
    position_ids = torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0)
    segments = [((starts[i], starts[i + 1]), [(starts[i], starts[i + 1])]) for i in range(len(sequences))]
    return {
        "input_ids": input_ids,
        "position_ids": position_ids,
        "reward_index": torch.tensor(starts[1:], dtype=torch.long) - 1,
        "attention_segments": attention.SegmentLayout.from_segments(segments),
    }


def collate_shared(groups: Sequence[Sequence[Sequence[int]]]) -> dict[str, torch.Tensor]:
    """One row of groups `[shared prefix | suffix 1 | suffix 2 | ...]`, the prefix computed once per group.

    A group's shared prefix is the longest common token prefix of its sequences, capped so each
    suffix keeps at least one token (its reward token): `shared_prefix_length`. The first sequence is
    one segment (prefix + its suffix, positions 0..); every other suffix is a segment whose
    positions continue from the prefix's end and whose keys are `prefix + suffix`: each token
    gets the hidden state it has when its sequence runs alone. `reward_index` lists each
    sequence's last token, group after group, member after member.
    """
    ids: list[int] = []
    positions: list[int] = []
    segments = []
    reward_index: list[int] = []
    for group in groups:
        prefix = shared_prefix_length(group)
        offset = len(ids)
        for member, sequence in enumerate(group):
            start = len(ids)
            if member == 0:
                ids.extend(sequence)
                positions.extend(range(len(sequence)))
                segments.append(((start, len(ids)), [(start, len(ids))]))
            else:
                ids.extend(sequence[prefix:])
                positions.extend(range(prefix, len(sequence)))
                keys = [(offset, offset + prefix), (start, len(ids))] if prefix else [(start, len(ids))]
                segments.append(((start, len(ids)), keys))
            reward_index.append(len(ids) - 1)
    return {
        "input_ids": torch.tensor(ids, dtype=torch.long).unsqueeze(0),
        "position_ids": torch.tensor(positions, dtype=torch.long).unsqueeze(0),
        "reward_index": torch.tensor(reward_index, dtype=torch.long),
        "attention_segments": attention.SegmentLayout.from_segments(segments),
    }


def collate_pairs(pairs: Sequence[TokenizedPair], pad_token_id: int, layout: str = "padded") -> dict[str, torch.Tensor]:
    """A micro-batch of pairs in `layout` (LAYOUTS); rewards come out chosen first, then rejected, in every layout.

    padded: right-padded rows (collate_padded); packed: one row, one segment per conversation
    (collate_packed); shared: one row, each pair `[shared prefix | chosen suffix | rejected suffix]`
    (collate_shared).
    """
    if layout == "padded":
        return collate_padded(pair_sequences(pairs), pad_token_id)
    if layout == "packed":
        return collate_packed(pair_sequences(pairs))
    if layout == "shared":
        batch = collate_shared([(p.chosen, p.rejected) for p in pairs])
        # (c1, r1, c2, r2...) -> (c1, c2..., r1, r2...)
        batch["reward_index"] = batch["reward_index"].view(-1, 2).t().reshape(-1)
        return batch
    raise ValueError(f"layout is {layout!r}; expected one of {LAYOUTS}")


def layout_for(use_remove_padding: bool, share_prompt: bool) -> str:
    """The trainer's layout: padded without packing (data.share_prompt then does not apply), else packed or shared."""
    if not use_remove_padding:
        return "padded"
    return "shared" if share_prompt else "packed"


class TokenCounts(NamedTuple):
    conversation: int  # tokens of the conversations as separate sequences (chosen + rejected lengths)
    real: int  # non-padding tokens the model computes (a shared prefix once)
    computed: int  # positions the model computes, padding included


def token_counts(batch: dict[str, torch.Tensor]) -> TokenCounts:
    """Counts of a collated batch: padding is computed but not real; a shared prefix is real once, in two conversations."""
    computed = batch["input_ids"].numel()
    if "attention_mask" in batch:
        real = int(batch["attention_mask"].sum())
        return TokenCounts(real, real, computed)
    segments = batch.get("attention_segments")
    return TokenCounts(int(sum(segments.key_lengths)) if segments is not None else computed, computed, computed)


# ----------------------------------------------------------------------------- micro-batches


# data.max_tokens_per_micro_batch=auto on CPU: on the 2-core CPU bench (2 ranks, Qwen3 hidden 256, HelpSteer2-like
# pairs) a 4,096-token budget ran faster per pair than 8,192, and memory is rarely what limits a CPU run.
CPU_AUTO_TOKEN_BUDGET = 4096


class TokenBudget(NamedTuple):
    tokens: int | None  # computed tokens per micro-batch; None: fixed-size micro-batches
    source: str  # where the value came from, for the start-up summary


def resolve_token_budget(setting: int | str | None, device: str, planned: Callable[[], TokenBudget]) -> TokenBudget:
    """data.max_tokens_per_micro_batch as a number: the user's value, or for `auto` the CPU default or,
    on a GPU, what `planned()` (the memory plan, btrm.plan) says fits."""
    if setting != "auto":
        return TokenBudget(setting, "set by data.max_tokens_per_micro_batch")
    if device == "cpu":
        return TokenBudget(CPU_AUTO_TOKEN_BUDGET, "auto: the CPU default")
    return planned()


def smallest_pair_over_budget(pairs: Iterable, tokens: int) -> int | None:
    """The smallest pair's computed tokens when every pair computes more than `tokens` in every layout (the
    shared layout computes least: the prefix once), so that each runs alone, over the budget; else None.
    The shared prefixes are measured only when the pairs' whole lengths already exceed the budget."""
    pairs = list(pairs)
    if not pairs or tokens >= min(pair.num_tokens for pair in pairs):
        return None
    smallest = min(pair.computed_tokens("shared") for pair in pairs)
    return smallest if tokens < smallest else None


def describe_micro_batches(budget: TokenBudget, max_pairs: int | None, alone: int | None = None) -> str:
    """How a rank's step is cut, for the start-up summary: both limits and where the budget came from.
    alone: smallest_pair_over_budget's answer (every pair over the budget: each runs alone, and is said so)."""
    pairs = None if max_pairs is None else f"{max_pairs} pair{'s' * (max_pairs != 1)}"
    if budget.tokens is None:
        return f"micro-batches of {pairs} (data.micro_batch_size_per_gpu)"
    if alone is not None:
        return (
            f"micro-batches of one pair each: the smallest pair computes {alone:,} tokens, more than the "
            f"{budget.tokens:,}-token budget ({budget.source})"
        )
    cap = f", at most {pairs} (data.micro_batch_size_per_gpu)" if pairs else ""
    return f"micro-batches of <= {budget.tokens:,} computed tokens ({budget.source}){cap}"


def fixed_size_micro_batches(num_pairs: int, pairs_per_micro_batch: int) -> list[list[int]]:
    return [
        list(range(start, min(start + pairs_per_micro_batch, num_pairs)))
        for start in range(0, num_pairs, pairs_per_micro_batch)
    ]


def token_budget_micro_batches(
    pair_tokens: Sequence[int],
    max_tokens: int,
    min_count: int = 1,
    max_pairs: int | None = None,
    pad_to_longest: bool = False,
    count_multiple_of: int = 1,
) -> list[list[int]]:
    """Group pair indices into micro-batches of at most max_tokens tokens (and max_pairs pairs) each, whole pairs only.

    A micro-batch's load is the sum of its pairs' tokens, or, with pad_to_longest (the padded
    layout, where every pair is padded to the micro-batch's longest), its pair count times its
    largest pair_tokens. First-fit decreasing gives few, full micro-batches; a pair over the
    budget on its own runs alone. Then, until there are `min_count` micro-batches and their count is
    a multiple of `count_multiple_of` (so that every data-parallel rank runs the same number), the
    heaviest splittable one is split in two halves of
    similar token count: splitting never breaks the budget nor the pair cap. Within a micro-batch,
    indices keep the data order.
    """
    if max_tokens <= 0:
        raise ValueError(f"max_tokens must be positive, got {max_tokens}")
    if not 1 <= min_count <= max(len(pair_tokens), 1):
        raise ValueError(f"cannot make {min_count} micro-batches out of {len(pair_tokens)} pairs")

    def load(count: int, total: int, largest: int) -> int:
        return count * largest if pad_to_longest else total

    bins: list[list[int]] = []
    stats: list[tuple[int, int, int]] = []  # per micro-batch: pairs, tokens, largest pair
    for index in sorted(range(len(pair_tokens)), key=lambda i: (-pair_tokens[i], i)):
        tokens = pair_tokens[index]
        target = next(
            (
                b
                for b, (count, total, largest) in enumerate(stats)
                if (max_pairs is None or count < max_pairs)
                and load(count + 1, total + tokens, max(largest, tokens)) <= max_tokens
            ),
            None,
        )
        if target is None:
            bins.append([index])
            stats.append((1, tokens, tokens))
        else:
            count, total, largest = stats[target]
            bins[target].append(index)
            stats[target] = (count + 1, total + tokens, max(largest, tokens))
    min_count = max(min_count, -(-len(bins) // count_multiple_of) * count_multiple_of)
    while len(bins) < min_count:
        heaviest = max((b for b in range(len(bins)) if len(bins[b]) > 1), key=lambda b: load(*stats[b]))
        halves: tuple[list[int], list[int]] = ([], [])
        half_stats = [(0, 0, 0), (0, 0, 0)]
        for index in sorted(bins[heaviest], key=lambda i: (-pair_tokens[i], i)):  # next-heaviest to the lighter half
            lighter = 0 if load(*half_stats[0]) <= load(*half_stats[1]) else 1
            count, total, largest = half_stats[lighter]
            halves[lighter].append(index)
            half_stats[lighter] = (count + 1, total + pair_tokens[index], max(largest, pair_tokens[index]))
        bins[heaviest], stats[heaviest] = halves[0], half_stats[0]
        bins.append(halves[1])
        stats.append(half_stats[1])
    return [sorted(b) for b in bins]


def plan_micro_batches(
    pairs: Sequence[TokenizedPair],
    max_tokens: int | None,
    max_pairs: int | None,
    min_count: int = 1,
    layout: str = "padded",
) -> list[list[int]]:
    """Micro-batches of a step: by token budget when max_tokens is set (at most max_pairs pairs each when
    that is set too), else fixed-size micro-batches of max_pairs pairs.

    The budget counts the tokens the layout computes: in `shared`, a pair's prefix once; in
    `padded`, every sequence padded to the micro-batch's longest.
    """
    if max_tokens is None:
        if max_pairs is None:
            raise ValueError("micro-batches need a token budget or a pair count")
        return fixed_size_micro_batches(len(pairs), max_pairs)
    return token_budget_micro_batches(pair_costs(pairs, layout), max_tokens, min_count, max_pairs, layout == "padded")


def pair_costs(pairs: Sequence[TokenizedPair], layout: str) -> list[int]:
    """What a pair adds to a micro-batch's token budget in `layout` (padded: its longer conversation, twice)."""
    if layout == "padded":
        return [2 * max(len(p.chosen), len(p.rejected)) for p in pairs]
    return [p.computed_tokens(layout) for p in pairs]


def deal_micro_batches(
    pairs: Sequence[TokenizedPair], max_tokens: int, max_pairs: int | None, world_size: int, layout: str
) -> list[list[list[int]]]:
    """A whole step's pairs (every rank's) cut into micro-batches by the token budget, then dealt to the ranks:
    per rank, its micro-batches as lists of indices into `pairs`.

    Every rank gets the same number of micro-batches (FSDP's collectives pair up; the count is raised to a
    multiple of world_size by splitting the heaviest), and the heaviest micro-batch goes first to the rank
    with the least load so far: ranks wait less for each other than with the pairs each sampled. The
    loss needs no change: every pair counts 1 / (the step's pairs), whichever rank computes it.
    """
    costs = pair_costs(pairs, layout)
    padded = layout == "padded"
    bins = token_budget_micro_batches(costs, max_tokens, 1, max_pairs, padded, count_multiple_of=world_size)

    def load(members: list[int]) -> int:
        return len(members) * max(costs[i] for i in members) if padded else sum(costs[i] for i in members)

    per_rank = len(bins) // world_size
    ranks: list[list[list[int]]] = [[] for _ in range(world_size)]
    loads = [0] * world_size
    for members in sorted(bins, key=lambda b: (-load(b), b)):
        rank = min((r for r in range(world_size) if len(ranks[r]) < per_rank), key=lambda r: (loads[r], r))
        ranks[rank].append(members)
        loads[rank] += load(members)
    return ranks


# ----------------------------------------------------------------------------- rewards


def compute_rewards(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """fp32 rewards, one per sequence in the batch, read at each sequence's reward token.

    The model is a `*ForTokenClassification` with num_labels=1 (what verl's reward worker loads);
    its per-token logits are [rows, tokens, 1]. A *ForSequenceClassification model (padded batches
    only) reads the last non-pad token itself, the same token under right padding, and returns
    [rows, 1]. Padded batches carry an attention mask; packed and shared ones (a single row) carry
    `attention_segments` instead, which reach btrm.attention's segment attention through the model's
    forward (the model must have been switched with attention.enable_segment_attention).
    use_cache=False: a cache would make transformers treat the row as one sequence.
    """
    segments = {}
    if "attention_segments" in batch:
        if not attention.uses_segment_attention(model):
            raise ValueError(
                "a packed or shared batch needs segment attention: call attention.enable_segment_attention(model) first "
                f"(the model uses {model.config._attn_implementation!r})"
            )
        segments["attention_segments"] = batch["attention_segments"]
    logits = model(
        input_ids=batch["input_ids"],
        attention_mask=batch.get("attention_mask"),
        position_ids=batch["position_ids"],
        use_cache=False,
        **segments,
    ).logits.float()
    if logits.dim() == 2:  # *ForSequenceClassification pools at the last non-pad token itself: [rows, 1]
        if segments:
            raise ValueError("a *ForSequenceClassification model pools one reward per row: use the padded layout")
        return logits.squeeze(-1)
    logits = logits.squeeze(-1)
    if "attention_mask" in batch:
        return logits[torch.arange(logits.shape[0], device=logits.device), batch["reward_index"]]
    return logits[0, batch["reward_index"]]


# Start-up check tolerance: |reward(layout) - reward(padded)| <= this x max(1, max |reward(padded)|).
# fp32 paths agree to ~1e-6 relative; half-precision kernels with different reduction orders differ
# by a few ulps per layer (bf16 ulp 2^-8 relative). A broken mask (a leak across segments, a causal
# block aligned the wrong way) changes rewards by a sizeable fraction of their scale.
LAYOUT_CHECK_TOLERANCE = {torch.float32: 1e-3, torch.float16: 1e-2, torch.bfloat16: 5e-2}


class LayoutCheck(NamedTuple):
    layout: str
    max_difference: float  # max |reward(layout) - reward(padded)| over the micro-batch's conversations
    tolerance: float

    @property
    def ratio(self) -> float:
        """Difference as a multiple of the tolerance: above 1 fails."""
        return self.max_difference / self.tolerance


@torch.no_grad()
def check_layout(
    model,
    pairs: Sequence[TokenizedPair],
    pad_token_id: int,
    layout: str,
    device,
    compute_dtype: torch.dtype,
    rewards: Callable = compute_rewards,
) -> LayoutCheck:
    """Rewards of `pairs` in `layout` (computed by `rewards`, e.g. split over a sequence-parallel group) against
    the padded layout, same model, no grad.

    Guards hardware and kernels the tests never ran on (e.g. varlen_attn's causal alignment on a
    given GPU). Runs two forwards: under FSDP every rank must call it, on its own pairs.
    """
    was_training = model.training
    model.eval()
    try:
        padded = compute_rewards(model, move_to(collate_pairs(pairs, pad_token_id, "padded"), device))
        candidate = rewards(model, move_to(collate_pairs(pairs, pad_token_id, layout), device))
    finally:
        model.train(was_training)
    tolerance = LAYOUT_CHECK_TOLERANCE.get(compute_dtype, 1e-3) * max(1.0, float(padded.abs().max()))
    return LayoutCheck(layout, float((candidate - padded).abs().max()), tolerance)


def move_to(batch: dict[str, torch.Tensor], device: str | torch.device) -> dict[str, torch.Tensor]:
    """The batch on `device` (tensors and the SegmentLayout alike)."""
    return {key: value.to(device, non_blocking=True) for key, value in batch.items()}


def consecutive_prefix_groups(sequences: Sequence[Sequence[int]]) -> list[list[int]]:
    """Indices of runs of consecutive sequences that share a prefix (e.g. several responses to one prompt).

    A sequence joins the current run when it shares at least as many leading tokens with the run's
    first sequence as the run already shares, so joining never shrinks what the run computes once.
    """
    groups: list[list[int]] = []
    shared = 0
    for index, sequence in enumerate(sequences):
        if groups:
            common = common_prefix_length(sequences[groups[-1][0]], sequence)
            if common > 0 and (len(groups[-1]) == 1 or common >= shared):
                shared = common if len(groups[-1]) == 1 else shared
                groups[-1].append(index)
                continue
        groups.append([index])
    return groups


def collate_sequences(
    sequences: Sequence[Sequence[int]], pad_token_id: int, layout: str = "padded"
) -> dict[str, torch.Tensor]:
    """Independent sequences (not pairs) in `layout`; rewards in the sequences' order.

    shared: runs of consecutive sequences with a common prefix compute it once (consecutive_prefix_groups).
    """
    if layout == "padded":
        return collate_padded(sequences, pad_token_id)
    if layout == "packed":
        return collate_packed(sequences)
    if layout == "shared":
        return collate_shared([[sequences[i] for i in group] for group in consecutive_prefix_groups(sequences)])
    raise ValueError(f"layout is {layout!r}; expected one of {LAYOUTS}")


@torch.no_grad()
def score(
    model,
    tokenizer,
    conversations: Iterable[list[dict[str, str]] | str],
    batch_size: int = 8,
    device: str | torch.device | None = None,
    chat_template_kwargs: dict | None = None,
    layout: str = "padded",
    progress: Callable[[int], None] | None = None,
) -> list[float]:
    """Rewards for conversations (messages lists, or their JSON strings), read and formatted as in training.

        model = AutoModelForTokenClassification.from_pretrained(ckpt, num_labels=1)  # or ...ForSequenceClassification
        tokenizer = AutoTokenizer.from_pretrained(ckpt)
        score(model, tokenizer, [[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]])

    Each message keeps its role and content only, as in training (rows.parse_messages: verl's
    reward paths render nothing else). A *ForSequenceClassification model is accepted too, padded
    only (see compute_rewards).
    layout: padded (default), packed (no padding), or shared (consecutive conversations with a
    common start, e.g. several responses to one prompt, compute it once); all give the same
    rewards. packed and shared switch the model to segment attention (btrm.attention), which leaves
    its padded forwards as they were.
    progress: called after each batch with the number of conversations it scored (e.g. a tqdm bar's `update`).
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout is {layout!r}; expected one of {LAYOUTS}")
    device = device if device is not None else next(model.parameters()).device
    model.eval()
    if layout != "padded":
        attention.enable_segment_attention(model)
    sequences = [
        encode_conversation(tokenizer, parse_messages(c, f"conversation {i}"), chat_template_kwargs)
        for i, c in enumerate(conversations, start=1)
    ]
    rewards: list[float] = []
    for start in range(0, len(sequences), batch_size):
        batch = move_to(
            collate_sequences(sequences[start : start + batch_size], tokenizer.pad_token_id, layout), device
        )
        rewards.extend(compute_rewards(model, batch).tolist())
        if progress is not None:
            progress(min(batch_size, len(sequences) - start))
    return rewards

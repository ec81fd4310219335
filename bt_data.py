"""How a conversation becomes tokens, batches and a reward: the one place that decides.

The trainer, `evaluate_rm.py`, `score()` and the benchmark all call this module, so training-time
and scoring-time formatting cannot drift apart.

- Tokens: `encode_conversation` applies the tokenizer's chat template to the text and tokenizes
  it with `add_special_tokens=False` (a template that writes BOS already has it; adding it again
  would double it).
- Reward position: the last real token of each sequence, read exactly as verl's
  `RewardModelWorker` reads it: `argmax(position_ids * attention_mask)` under right padding
  (`reward_token_index`); in a packed row, the last token of each packed sequence.
- Batches: a micro-batch holds whole pairs, chosen sequences first then rejected, either padded
  to the longest sequence in it (`collate_padded`; never to max_length) or packed into one row with
  position_ids restarting at 0 per sequence (`collate_packed`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import torch

TRUNCATION_MODES = ("left", "right", "error")


class DataError(ValueError):
    """Bad training or evaluation data, naming the file, the row, the field and the problem."""


# ----------------------------------------------------------------------------- tokens


def parse_messages(value: Any, where: str) -> list[dict[str, str]]:
    """A messages list from a JSON string (or an already-decoded list); `where` names file, row, field."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as error:
            raise DataError(f"{where}: not valid JSON ({error.msg} at column {error.colno})") from None
    if hasattr(value, "tolist"):  # numpy arrays from Parquet list columns
        value = value.tolist()
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: expected a non-empty list of {{'role', 'content'}} messages, got {type(value).__name__}")
    for turn, message in enumerate(value, start=1):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str) or not isinstance(message.get("content"), str):
            raise DataError(f"{where}: message {turn} is not a {{'role': str, 'content': str}} object")
    if value[-1]["role"] != "assistant":
        raise DataError(f"{where}: the last message has role {value[-1]['role']!r}; expected the assistant response being judged")
    return value


def encode_conversation(tokenizer, messages: list[dict[str, str]], chat_template_kwargs: dict | None = None) -> list[int]:
    """Token ids of a whole conversation, exactly as training and scoring see it."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, **(chat_template_kwargs or {}))
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def truncate_pair(chosen: list[int], rejected: list[int], max_length: int, mode: str, where: str) -> tuple[list[int], list[int]]:
    """Fit both sequences of a pair into max_length tokens without losing the reward token.

    left:  drop the same number of tokens from the start of both (the overflow of the longer one),
           so both keep the last token and condition on the identical (shared-prefix) prompt tail.
    right: keep the first max_length - 1 tokens and the final token of each over-long sequence.
    error: raise, naming the row and both lengths.
    """
    if mode not in TRUNCATION_MODES:
        raise ValueError(f"data.truncation is {mode!r}; expected one of {TRUNCATION_MODES}")
    overflow = max(len(chosen), len(rejected)) - max_length
    if overflow <= 0:
        return chosen, rejected
    if mode == "error":
        raise DataError(
            f"{where}: chosen has {len(chosen)} tokens and rejected {len(rejected)}; data.max_length is {max_length} "
            "(set data.truncation to left or right, or raise data.max_length)"
        )
    if mode == "left":
        return chosen[overflow:], rejected[overflow:]
    cut = lambda ids: ids if len(ids) <= max_length else ids[: max_length - 1] + ids[-1:]  # noqa: E731
    return cut(chosen), cut(rejected)


@dataclass(frozen=True)
class TokenizedPair:
    chosen: list[int]
    rejected: list[int]
    preference_strength: int | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.chosen) + len(self.rejected)


class PairDataset(torch.utils.data.Dataset):
    """Preference pairs from Parquet files with JSON-messages `chosen` / `rejected` columns.

    Tokenizes everything once, up front. The constructor signature is that of verl's SFTDataset,
    so `data.custom_cls` can name any class with the same signature whose items are TokenizedPair.
    """

    def __init__(self, parquet_files: str | Sequence[str], tokenizer, config, max_samples: int = -1):
        import pyarrow.parquet as pq

        files = [parquet_files] if isinstance(parquet_files, str) else list(parquet_files)
        chat_template_kwargs = dict(config.get("apply_chat_template_kwargs", None) or {})
        self.pairs: list[TokenizedPair] = []
        for path in files:
            table = pq.read_table(path)
            for key in (config.chosen_key, config.rejected_key):
                if key not in table.column_names:
                    raise DataError(f"{path}: no column '{key}' (columns: {table.column_names}); set data.chosen_key / data.rejected_key")
            strengths = table.column("preference_strength").to_pylist() if "preference_strength" in table.column_names else None
            chosen_col, rejected_col = table.column(config.chosen_key).to_pylist(), table.column(config.rejected_key).to_pylist()
            for row, (chosen, rejected) in enumerate(zip(chosen_col, rejected_col), start=1):
                where = f"{path} row {row}"
                chosen_ids = encode_conversation(tokenizer, parse_messages(chosen, f"{where} field '{config.chosen_key}'"), chat_template_kwargs)
                rejected_ids = encode_conversation(tokenizer, parse_messages(rejected, f"{where} field '{config.rejected_key}'"), chat_template_kwargs)
                chosen_ids, rejected_ids = truncate_pair(chosen_ids, rejected_ids, config.max_length, config.truncation, where)
                self.pairs.append(TokenizedPair(chosen_ids, rejected_ids, strengths[row - 1] if strengths else None))
                if 0 < max_samples <= len(self.pairs):
                    return

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> TokenizedPair:
        return self.pairs[index]


def keep_as_list(items: list) -> list:
    """DataLoader collate_fn: a step's pairs stay a list; micro-batches are formed later."""
    return items


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

    transformers detects the packed layout from the position_ids (flash_attention_2, sdpa and
    eager alike) only when the model is called with use_cache=False: `compute_rewards` does.
    """
    lengths = torch.tensor([len(s) for s in sequences], dtype=torch.long)
    input_ids = torch.tensor([token for s in sequences for token in s], dtype=torch.long).unsqueeze(0)
    position_ids = torch.cat([torch.arange(n) for n in lengths.tolist()]).unsqueeze(0)
    return {"input_ids": input_ids, "position_ids": position_ids, "reward_index": torch.cumsum(lengths, 0) - 1}


def collate_pairs(pairs: Sequence[TokenizedPair], pad_token_id: int, packed: bool) -> dict[str, torch.Tensor]:
    sequences = pair_sequences(pairs)
    return collate_packed(sequences) if packed else collate_padded(sequences, pad_token_id)


def batch_token_counts(batch: dict[str, torch.Tensor]) -> tuple[int, int]:
    """(real tokens, computed tokens) of a collated batch: padding is computed but not real."""
    computed = batch["input_ids"].numel()
    real = int(batch["attention_mask"].sum()) if "attention_mask" in batch else computed
    return real, computed


# ----------------------------------------------------------------------------- micro-batches


def fixed_size_micro_batches(num_pairs: int, pairs_per_micro_batch: int) -> list[list[int]]:
    return [list(range(start, min(start + pairs_per_micro_batch, num_pairs))) for start in range(0, num_pairs, pairs_per_micro_batch)]


def token_budget_micro_batches(pair_tokens: Sequence[int], max_tokens: int, min_count: int = 1) -> list[list[int]]:
    """Group pair indices into micro-batches of at most max_tokens tokens each, whole pairs only.

    First-fit decreasing gives few, full micro-batches; a pair over the budget on its own runs
    alone. Then, until there are `min_count` micro-batches (so that every data-parallel rank runs
    the same number), the heaviest splittable one is split in two halves of similar token count:
    splitting never breaks the budget. Within a micro-batch, indices keep the data order.
    """
    if max_tokens <= 0:
        raise ValueError(f"max_tokens must be positive, got {max_tokens}")
    if not 1 <= min_count <= max(len(pair_tokens), 1):
        raise ValueError(f"cannot make {min_count} micro-batches out of {len(pair_tokens)} pairs")
    bins: list[list[int]] = []
    loads: list[int] = []
    for index in sorted(range(len(pair_tokens)), key=lambda i: (-pair_tokens[i], i)):
        tokens = pair_tokens[index]
        target = next((b for b, load in enumerate(loads) if load + tokens <= max_tokens), None)
        if target is None:
            bins.append([index])
            loads.append(tokens)
        else:
            bins[target].append(index)
            loads[target] += tokens
    while len(bins) < min_count:
        heaviest = max((b for b in range(len(bins)) if len(bins[b]) > 1), key=lambda b: loads[b])
        members = sorted(bins[heaviest], key=lambda i: (-pair_tokens[i], i))
        halves: tuple[list[int], list[int]] = ([], [])
        half_loads = [0, 0]
        for index in members:  # greedy: next-heaviest pair to the lighter half
            lighter = 0 if half_loads[0] <= half_loads[1] else 1
            halves[lighter].append(index)
            half_loads[lighter] += pair_tokens[index]
        bins[heaviest], loads[heaviest] = halves[0], half_loads[0]
        bins.append(halves[1])
        loads.append(half_loads[1])
    return [sorted(b) for b in bins]


def plan_micro_batches(pairs: Sequence[TokenizedPair], max_tokens: int | None, pairs_per_micro_batch: int, min_count: int = 1) -> list[list[int]]:
    """Micro-batches of a step: by token budget when max_tokens is set, else fixed-size."""
    if max_tokens is None:
        return fixed_size_micro_batches(len(pairs), pairs_per_micro_batch)
    return token_budget_micro_batches([p.num_tokens for p in pairs], max_tokens, min_count)


# ----------------------------------------------------------------------------- rewards


def compute_rewards(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """fp32 rewards, one per sequence in the batch, read at each sequence's reward token.

    The model is a `*ForTokenClassification` with num_labels=1 (what verl's reward worker loads);
    its per-token logits are [rows, tokens, 1]. A *ForSequenceClassification model (padded batches
    only) reads the last non-pad token itself, the same token under right padding, and returns
    [rows, 1]. Padded batches carry an attention mask; packed
    ones (a single row) do not, and need use_cache=False for transformers to see the packing.
    """
    logits = model(
        input_ids=batch["input_ids"],
        attention_mask=batch.get("attention_mask"),
        position_ids=batch["position_ids"],
        use_cache=False,
    ).logits.float()
    if logits.dim() == 2:  # *ForSequenceClassification pools at the last non-pad token itself: [rows, 1]
        return logits.squeeze(-1)
    logits = logits.squeeze(-1)
    if "attention_mask" in batch:
        return logits[torch.arange(logits.shape[0], device=logits.device), batch["reward_index"]]
    return logits[0, batch["reward_index"]]


def move_to(batch: dict[str, torch.Tensor], device: str | torch.device) -> dict[str, torch.Tensor]:
    return {key: value.to(device, non_blocking=True) for key, value in batch.items()}


@torch.no_grad()
def score(
    model,
    tokenizer,
    conversations: Iterable[list[dict[str, str]] | str],
    batch_size: int = 8,
    device: str | torch.device | None = None,
    chat_template_kwargs: dict | None = None,
) -> list[float]:
    """Rewards for conversations (messages lists, or their JSON strings), formatted as in training.

        model = AutoModelForTokenClassification.from_pretrained(ckpt, num_labels=1)  # or ...ForSequenceClassification
        tokenizer = AutoTokenizer.from_pretrained(ckpt)
        score(model, tokenizer, [[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]])

    A *ForSequenceClassification model is accepted too (see compute_rewards).
    """
    device = device if device is not None else next(model.parameters()).device
    model.eval()
    sequences = [
        encode_conversation(tokenizer, parse_messages(c, f"conversation {i}"), chat_template_kwargs)
        for i, c in enumerate(conversations, start=1)
    ]
    rewards: list[float] = []
    for start in range(0, len(sequences), batch_size):
        batch = move_to(collate_padded(sequences[start : start + batch_size], tokenizer.pad_token_id), device)
        rewards.extend(compute_rewards(model, batch).tolist())
    return rewards

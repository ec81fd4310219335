"""How a conversation becomes tokens: the chat template, truncation and the dataset of pairs.

The trainer, `evaluate_rm.py`, `btrm.batching.score()` and the benchmark all tokenize through
`encode_conversation`, so training-time and scoring-time formatting cannot drift apart.

- Tokens: `encode_conversation` applies the tokenizer's chat template to the text and tokenizes
  it with `add_special_tokens=False` (a template that writes BOS already has it; adding it again
  would double it). Plain text (data.format=text): `encode_plain_text`.
- Truncation: `truncate_pair` (data.truncation); PairDataset counts truncated pairs and dropped tokens.
- The dataset: `PairDataset` reads rows through btrm.rows and returns `TokenizedPair`s;
  `create_pair_dataset` builds it, or the class data.custom_cls names.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property
from typing import Any, NamedTuple, Sequence

import torch

from bt_loss import (
    LossConfig,
    require_strengths,
)
from btrm.rows import DataError


def encode_plain_text(tokenizer, text: str) -> list[int]:
    """Token ids of a plain-text conversation (data.format=text), as TRL's RewardTrainer makes them.

    No chat template. The tokenizer's own special tokens are added (`tokenizer(text)`, e.g. a BOS
    for Llama tokenizers; none for Qwen) and the eos token is appended unless the text already ends
    with it, so the reward is read at eos, a token that marks the end of every sequence alike.
    """
    if tokenizer.eos_token_id is None:
        raise DataError("data.format=text appends the eos token, but the tokenizer has none; use a tokenizer with an eos token")
    ids = list(tokenizer(text)["input_ids"])
    if not ids or ids[-1] != tokenizer.eos_token_id:
        ids.append(tokenizer.eos_token_id)
    return ids

TRUNCATION_MODES = ("left", "right", "error")


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


def common_prefix_length(first: Sequence[int], second: Sequence[int]) -> int:
    """Number of leading tokens the two sequences share."""
    length = 0
    for a, b in zip(first, second):
        if a != b:
            break
        length += 1
    return length


def shared_prefix_length(sequences: Sequence[Sequence[int]]) -> int:
    """Tokens all sequences share at their start, capped so each keeps at least its last token.

    The cap keeps a conversation that is a prefix of another (or equal to it) its own reward token.
    """
    if len(sequences) < 2:
        return 0
    first = sequences[0]
    return min(min(common_prefix_length(first, other) for other in sequences[1:]), min(len(s) for s in sequences) - 1)


class Truncation(NamedTuple):
    chosen: list[int]
    rejected: list[int]
    dropped_tokens: int  # tokens removed from chosen and rejected together (0: the pair fitted)


def truncate_pair(chosen: list[int], rejected: list[int], max_length: int, mode: str, where: str) -> Truncation:
    """Fit both conversations of a pair into max_length tokens each, never losing a reward token.

    left (default): drop the oldest tokens of the prompt the two conversations share (their longest
           common token prefix, capped so each keeps its last token), the same tokens from both, and
           only as many as the longer conversation needs: both keep an identical prompt tail, and
           a conversation that fits loses shared-prefix tokens only, never the rest of its response. Only a response
           (the part after the shared prefix) that alone exceeds max_length is cut, from its
           start, keeping its last token (the reward token).
    right: keep the first max_length - 1 tokens and the last token of each over-long conversation
           (the head of the prompt survives; the end of a long response is lost except its last token).
    error: raise, naming the row and both lengths.
    """
    if mode not in TRUNCATION_MODES:
        raise ValueError(f"data.truncation is {mode!r}; expected one of {TRUNCATION_MODES}")
    if max_length < 1:
        raise ValueError(f"data.max_length must be at least 1, got {max_length}")
    if not chosen or not rejected:
        raise DataError(f"{where}: chosen has {len(chosen)} tokens and rejected {len(rejected)}; a conversation cannot be empty")
    overflow = max(len(chosen), len(rejected)) - max_length
    if overflow <= 0:
        return Truncation(chosen, rejected, 0)
    if mode == "error":
        raise DataError(
            f"{where}: chosen has {len(chosen)} tokens and rejected {len(rejected)}; data.max_length is {max_length} "
            "(set data.truncation to left or right, or raise data.max_length)"
        )
    if mode == "left":
        drop = min(overflow, shared_prefix_length([chosen, rejected]))
        kept = [ids[drop:] for ids in (chosen, rejected)]
        new_chosen, new_rejected = (ids if len(ids) <= max_length else ids[-max_length:] for ids in kept)
    else:
        new_chosen, new_rejected = (ids if len(ids) <= max_length else ids[: max_length - 1] + ids[-1:] for ids in (chosen, rejected))
    return Truncation(new_chosen, new_rejected, len(chosen) + len(rejected) - len(new_chosen) - len(new_rejected))


@dataclass(frozen=True)
class TokenizedPair:
    chosen: list[int]
    rejected: list[int]
    preference_strength: int | None = None

    @property
    def num_tokens(self) -> int:
        """Tokens of the two conversations run separately."""
        return len(self.chosen) + len(self.rejected)

    @cached_property
    def shared_prefix(self) -> int:
        """Tokens the `shared` layout computes once for both conversations."""
        return shared_prefix_length([self.chosen, self.rejected])

    def computed_tokens(self, layout: str) -> int:
        """Tokens the model computes for this pair in `layout` (padding aside): the prefix once when shared."""
        return self.num_tokens - self.shared_prefix if layout == "shared" else self.num_tokens


class PairDataset(torch.utils.data.Dataset):
    """Preference pairs from data files in any layout rows.read_pair_rows reads (see data.format).

    Tokenizes everything once, up front. The constructor signature is that of verl's SFTDataset,
    so `data.custom_cls` can name any class with the same signature whose items are TokenizedPair.
    """

    def __init__(self, parquet_files: str | Sequence[str], tokenizer, config, max_samples: int = -1):
        from btrm import (
            rows,  # files are read (any format rows.detect_pair_format knows) only through rows.read_pair_rows
        )

        chat_template_kwargs = dict(config.get("apply_chat_template_kwargs", None) or {})
        self.pairs: list[TokenizedPair] = []
        self.truncated_pairs = 0  # pairs that lost tokens to data.max_length (data.truncation)
        self.dropped_tokens = 0   # tokens those pairs lost, chosen and rejected together
        try:  # reading problems surface as this module's DataError, like every other data problem
            read = rows.read_pair_rows(parquet_files, config, drop_identical=config.get("drop_identical_pairs", True))
        except rows.DataError as error:
            raise DataError(str(error)) from None
        rows = read.rows[:max_samples] if max_samples > 0 else read.rows
        self.formats = read.formats                           # file -> rows.PairFormat it was read in
        self.read_report = read.describe()                    # formats and dropped pairs, for the start-up report
        self.identical_pairs_dropped = read.identical_dropped  # chosen == rejected: no preference signal
        self.sources = [row.where for row in rows]            # "file row N" of each pair, in order
        self.subsets = [row.subset for row in rows]           # RewardBench's subset column (None elsewhere)

        def encode(side, where: str) -> list[int]:
            if isinstance(side, str):  # data.format=text: no chat template; encode_plain_text appends eos
                try:
                    return encode_plain_text(tokenizer, side)
                except rows.DataError as error:
                    raise DataError(f"{where}: {error}") from None
            return encode_conversation(tokenizer, side, chat_template_kwargs)

        for row in rows:
            where = row.where
            chosen_ids, rejected_ids = encode(row.chosen, where), encode(row.rejected, where)
            truncation = truncate_pair(chosen_ids, rejected_ids, config.max_length, config.truncation, where)
            self.truncated_pairs += truncation.dropped_tokens > 0
            self.dropped_tokens += truncation.dropped_tokens
            self.pairs.append(TokenizedPair(truncation.chosen, truncation.rejected, row.preference_strength))

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> TokenizedPair:
        return self.pairs[index]


def keep_as_list(items: list) -> list:
    """DataLoader collate_fn: a step's pairs stay a list; micro-batches are formed later."""
    return items


def create_pair_dataset(files, data_config, tokenizer):
    """PairDataset, or the class named by data.custom_cls (same constructor signature as verl's SFTDataset)."""
    if data_config.custom_cls.get("path"):
        from verl.utils.import_utils import load_extern_type

        dataset_cls = load_extern_type(data_config.custom_cls.path, data_config.custom_cls.name)
    else:
        dataset_cls = PairDataset
    files = list(files) if not isinstance(files, str) else [files]
    return dataset_cls(parquet_files=files, tokenizer=tokenizer, config=data_config, max_samples=data_config.max_samples)


def dataset_strengths(dataset) -> list:
    return [dataset[i].preference_strength for i in range(len(dataset))]


def has_strengths(dataset) -> bool:
    """Per-strength validation metrics need a strength on every pair."""
    return len(dataset) > 0 and all(s is not None for s in dataset_strengths(dataset))


def check_strengths(loss_config: LossConfig, data_config, train_dataset, val_dataset) -> None:
    """Strength-based objectives need a valid strength on every pair; per-strength metrics on every val pair."""
    if loss_config.needs_strengths:
        require_strengths(dataset_strengths(train_dataset), f"data.train_files={data_config.train_files} (loss.type={loss_config.type})", loss_config.max_strength)
        require_strengths(dataset_strengths(val_dataset), f"data.val_files={data_config.val_files} (loss.type={loss_config.type})", loss_config.max_strength)
    elif has_strengths(val_dataset):
        require_strengths(dataset_strengths(val_dataset), f"data.val_files={data_config.val_files}", loss_config.max_strength)


def load_tokenizer(model_path: str, data_config, trust_remote_code: bool):
    """The model's tokenizer, with data.pad_token applied; refuses a missing pad token or pad == eos.

    pad == eos is a classic silent failure: transformers' SequenceClassification pooling then reads
    the reward before the final eos, so the same checkpoint scores differently per loader.
    """
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=trust_remote_code)
    if data_config.pad_token is not None:
        tokenizer.pad_token = data_config.pad_token
    if tokenizer.pad_token is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        raise ValueError(
            f"tokenizer of {model_path}: pad token is {tokenizer.pad_token!r} (eos is {tokenizer.eos_token!r}); "
            "set data.pad_token to a token of the vocabulary that is not eos and never appears in conversations"
        )
    if tokenizer.chat_template is None:
        raise ValueError(f"tokenizer of {model_path} has no chat template; use a chat model's tokenizer")
    tokenizer.padding_side = "right"
    return tokenizer

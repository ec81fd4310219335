"""How a conversation becomes tokens: the chat template, truncation and the dataset of pairs.

The trainer, `evaluate_rm.py` and `btrm.batching.score()` all read messages with `rows.parse_messages`
(role and content only) and tokenize them through `encode_conversation`, so training-time and
scoring-time formatting cannot drift apart. (The benchmark's pairs are token ids from the start.)

- Tokens: `encode_conversation` applies the tokenizer's chat template to the text and tokenizes
  it with `add_special_tokens=False` (a template that writes BOS already has it; adding it again
  would double it). Plain text (data.format=text): `encode_plain_text`.
- Truncation: `truncate_pair` (data.truncation); PairDataset counts truncated pairs and dropped tokens.
- The dataset: `PairDataset` reads rows through btrm.rows (whose `parse_messages` is the one message
  reader: role and content only) and returns `TokenizedPair`s; `create_pair_dataset` builds it, or
  the class data.custom_cls names, which must satisfy `PreferenceDataset`.
"""

from __future__ import annotations

import collections
import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import NamedTuple, Protocol, runtime_checkable

import torch

from bt_loss import (
    LossConfig,
    require_strengths,
)
from btrm import rows
from btrm.rows import DataError, PairFormat


def encode_plain_text(tokenizer, text: str) -> list[int]:
    """Token ids of a plain-text conversation (data.format=text), as TRL's RewardTrainer makes them.

    No chat template. The tokenizer's own special tokens are added (`tokenizer(text)`, e.g. a BOS
    for Llama tokenizers; none for Qwen) and the eos token is appended unless the text already ends
    with it, so the reward is read at eos, a token that marks the end of every sequence alike.
    """
    if tokenizer.eos_token_id is None:
        raise DataError(
            "data.format=text appends the eos token, but the tokenizer has none; use a tokenizer with an eos token"
        )
    ids = list(tokenizer(text)["input_ids"])
    if not ids or ids[-1] != tokenizer.eos_token_id:
        ids.append(tokenizer.eos_token_id)
    return ids


TRUNCATION_MODES = ("left", "right", "error")


# ----------------------------------------------------------------------------- tokens


def encode_conversation(
    tokenizer, messages: list[dict[str, str]], chat_template_kwargs: dict | None = None
) -> list[int]:
    """Token ids of a whole conversation, exactly as training and scoring see it."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, **(chat_template_kwargs or {}))
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def common_prefix_length(first: Sequence[int], second: Sequence[int]) -> int:
    """Number of leading tokens the two sequences share."""
    length = 0
    for a, b in zip(first, second, strict=False):  # the shorter one bounds the prefix
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
        raise DataError(
            f"{where}: chosen has {len(chosen)} tokens and rejected {len(rejected)}; a conversation cannot be empty"
        )
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
        new_chosen, new_rejected = (
            ids if len(ids) <= max_length else ids[: max_length - 1] + ids[-1:] for ids in (chosen, rejected)
        )
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


@runtime_checkable
class PreferenceDataset(Protocol):
    """What the trainer and evaluate_rm.py read of a dataset: PairDataset, or the class data.custom_cls names."""

    read_report: str  # how the files were read (formats, dropped pairs and message keys), printed at start-up
    truncated_pairs: int  # pairs that lost tokens to data.max_length (data.truncation)
    dropped_tokens: int  # tokens those pairs lost, chosen and rejected together
    identical_pairs_dropped: int  # pairs left out because chosen equals rejected (data.drop_identical_pairs)
    formats: dict[str, PairFormat]  # file -> the format it was read in
    sources: list[str]  # where each pair came from ("file row N"), in dataset order
    subsets: list[str | None]  # RewardBench's subset of each pair (None without a subset column)
    groups: list[
        dict[str, str]
    ]  # {column: value} of data.group_columns each pair's row has (validation metrics by group)

    def __len__(self) -> int: ...  # number of pairs

    def __getitem__(self, index: int) -> TokenizedPair: ...  # one pair, tokenized and truncated


PREFERENCE_DATASET_MEMBERS = (*PreferenceDataset.__annotations__, "__len__", "__getitem__")


class PairDataset(torch.utils.data.Dataset):
    """Preference pairs from data files in any layout rows.read_pair_rows reads (see data.format).

    Tokenizes everything once, up front. The constructor signature is that of verl's SFTDataset,
    so `data.custom_cls` can name any class with the same signature that satisfies PreferenceDataset.
    """

    def __init__(self, parquet_files: str | Sequence[str], tokenizer, config, max_samples: int = -1):
        chat_template_kwargs = dict(config.apply_chat_template_kwargs)
        self.pairs: list[TokenizedPair] = []
        self.truncated_pairs = 0  # pairs that lost tokens to data.max_length (data.truncation)
        self.dropped_tokens = 0  # tokens those pairs lost, chosen and rejected together
        read = rows.read_pair_rows(parquet_files, config, drop_identical=config.drop_identical_pairs)
        kept = read.rows[:max_samples] if max_samples > 0 else read.rows
        self.formats = read.formats  # file -> rows.PairFormat it was read in
        self.read_report = read.describe()  # formats, dropped pairs and message keys, for the start-up report
        self.identical_pairs_dropped = read.identical_dropped  # chosen == rejected: no preference signal
        self.sources = [row.where for row in kept]  # "file row N" of each pair, in order
        self.subsets = [row.subset for row in kept]  # RewardBench's subset column (None elsewhere)
        self.groups = [row.groups for row in kept]  # data.group_columns' values of each pair

        def encode(side, where: str) -> list[int]:
            if isinstance(side, str):  # data.format=text: no chat template; encode_plain_text appends eos
                try:
                    return encode_plain_text(tokenizer, side)
                except DataError as error:
                    raise DataError(f"{where}: {error}") from None
            return encode_conversation(tokenizer, side, chat_template_kwargs)

        for row in kept:
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


def create_pair_dataset(files, data_config, tokenizer) -> PreferenceDataset:
    """PairDataset, or the class named by data.custom_cls (same constructor signature as verl's SFTDataset).

    A custom class's instance must have every member of PreferenceDataset; DataError names the
    class (data.custom_cls.path / name) and the members it lacks.
    """
    files = list(files) if not isinstance(files, str) else [files]
    custom = data_config.custom_cls
    if not custom.path:
        return PairDataset(
            parquet_files=files, tokenizer=tokenizer, config=data_config, max_samples=data_config.max_samples
        )
    from verl.utils.import_utils import load_extern_type

    dataset = load_extern_type(custom.path, custom.name)(
        parquet_files=files, tokenizer=tokenizer, config=data_config, max_samples=data_config.max_samples
    )
    missing = [member for member in PREFERENCE_DATASET_MEMBERS if not hasattr(dataset, member)]
    if missing:
        raise DataError(
            f"data.custom_cls.path={custom.path} data.custom_cls.name={custom.name}: the dataset lacks {', '.join(missing)}; "
            "the trainer and evaluate_rm.py read every member of btrm.pair_dataset.PreferenceDataset"
        )
    return dataset


OTHER_GROUP = "other"  # the values of a column beyond data.max_groups_per_column, pooled


@dataclass(frozen=True)
class GroupIndex:
    """Pairs grouped by the values of categorical columns (data.group_columns), for metrics per group."""

    labels: list[str]  # "<column>_<value>": columns in data.group_columns order, each column's values largest first
    members: list[list[int]]  # per pair: the indices into labels of its groups (one per column its row has)
    pooled: dict[str, int]  # column -> how many of its values were pooled into "<column>_other"
    columns: list[str]  # the column of each label


def group_label(column: str, value: str) -> str:
    """The metric-name part of a group: whitespace and '/' (trackers' section separator) become '_'."""
    return re.sub(r"[\s/]+", "_", f"{column}_{value}")


def group_index(groups: Sequence[dict[str, str]], columns: Sequence[str], max_groups: int) -> GroupIndex:
    """Each column's values, largest group first; a column with more than max_groups values keeps the
    max_groups - 1 largest and pools the rest as OTHER_GROUP. Ties in size are ordered by value, so
    every rank, which holds the whole validation set, builds the same index. Values whose labels
    coincide ("a b" and "a_b"; a value named "other" and the pooled ones) are one group: one metric each.
    Labels of two columns that coincide (domain=code_py and domain_code=py) are refused (ValueError): one
    metric would silently overwrite the other."""
    labels: list[str] = []
    owner: dict[str, tuple[str, str]] = {}  # label -> (column, value) that first named it
    members: list[list[int]] = [[] for _ in groups]
    pooled: dict[str, int] = {}
    label_columns: list[str] = []
    for column in columns:
        counts = collections.Counter(pair[column] for pair in groups if column in pair)
        ranked = sorted(counts, key=lambda value: (-counts[value], value))
        kept = ranked if len(ranked) <= max_groups else ranked[: max_groups - 1]
        if len(kept) < len(ranked):
            pooled[column] = len(ranked) - len(kept)
        position: dict[str, int] = {}  # label -> index in labels
        for value in ranked:
            shown = value if value in kept else OTHER_GROUP
            label = group_label(column, shown)
            first_column, first_value = owner.setdefault(label, (column, shown))
            if first_column != column:
                raise ValueError(
                    f"data.group_columns: {first_column}={first_value} and {column}={shown} both name the metric "
                    f"val/accuracy_{label}; rename one of the columns (or values) so their labels differ"
                )
            if label not in position:
                position[label] = len(labels)
                labels.append(label)
                label_columns.append(column)
        for pair, pair_members in zip(groups, members, strict=True):
            if column in pair:
                value = pair[column]
                pair_members.append(position[group_label(column, value if value in kept else OTHER_GROUP)])
    return GroupIndex(labels, members, pooled, label_columns)


def dataset_strengths(dataset) -> list:
    return [dataset[i].preference_strength for i in range(len(dataset))]


def has_strengths(dataset) -> bool:
    """Per-strength validation metrics need a strength on every pair."""
    return len(dataset) > 0 and all(s is not None for s in dataset_strengths(dataset))


def check_strengths(loss_config: LossConfig, data_config, train_dataset, val_dataset) -> None:
    """Strength-based objectives need a valid strength on every pair; per-strength metrics on every val pair."""
    if loss_config.needs_strengths:
        require_strengths(
            dataset_strengths(train_dataset),
            f"data.train_files={data_config.train_files} (loss.type={loss_config.type})",
            loss_config.max_strength,
        )
        require_strengths(
            dataset_strengths(val_dataset),
            f"data.val_files={data_config.val_files} (loss.type={loss_config.type})",
            loss_config.max_strength,
        )
    elif has_strengths(val_dataset):
        require_strengths(
            dataset_strengths(val_dataset), f"data.val_files={data_config.val_files}", loss_config.max_strength
        )


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

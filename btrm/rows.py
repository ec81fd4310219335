"""Preference-data files and their rows: the formats, the one message parser, the one `DataError`.

Every preference-data file is read through `read_pair_rows` (paths checked first by
`check_data_files`). Data files (.parquet, .jsonl, .json, optionally .gz for JSON) hold one pair per
row in one of three layouts, which `detect_pair_format` alone tells apart (see there and README
"Data format"): whole conversations as messages, an explicit prompt with responses (TRL's and
RewardBench's layout), or plain text. Rows come back as `PairRow`s whose chosen / rejected are
messages lists (or, for plain text, whole strings); tokenizing is btrm.pair_dataset's.

`parse_messages` is the one place a message list is read, for training, `batching.score()` and
evaluate_rm.py alike: each message keeps its `role` and `content` only. verl's reward paths render
role and content only (the in-process worker's input_tokenizer path, and newer verl's reward loop,
which builds `{"role", "content"}` messages), so a reward model is trained and scored on exactly
that; keys such as `reasoning_content`, which Qwen3's chat template would render, are dropped, and
the read report counts them (`DroppedKeys`).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# ----------------------------------------------------------------------------- preference data files
#
# Training (pair_dataset.PairDataset) and evaluation (evaluate_rm.py) read pair files only through
# `read_pair_rows`, and `detect_pair_format` alone decides how a file's columns become a pair.

PAIR_FORMATS = ("auto", "messages", "prompt_response", "text")
DATA_SUFFIXES = (".parquet", ".jsonl", ".jsonl.gz", ".json", ".json.gz")
STRENGTH_KEY = "preference_strength"
SUBSET_KEY = "subset"  # RewardBench's grouping column; kept when present


class DataError(ValueError):
    """Bad data paths or rows; the message is one line naming the file (and row, field) and what was expected."""


def as_file_list(files: str | os.PathLike | Sequence[str | os.PathLike] | None) -> list[str]:
    """A config value (one path, a list, an OmegaConf ListConfig, or None) as a list of path strings."""
    if files is None:
        return []
    if isinstance(files, (str, os.PathLike)):
        return [os.fspath(files)]
    return [os.fspath(f) for f in files]


def _count_rows(path: Path) -> int:
    """Rows in a data file without parsing them all (Parquet metadata; non-blank JSON lines)."""
    if path.name.endswith(".parquet"):
        import pyarrow.parquet as pq

        try:
            return pq.ParquetFile(path).metadata.num_rows
        except Exception as error:  # pyarrow raises ArrowInvalid / OSError for damaged files
            raise DataError(f"{path}: not a readable Parquet file ({type(error).__name__}: {error})") from None
    if path.stat().st_size == 0:
        return 0
    with _open_text(path) as lines:
        for line in lines:
            if line.strip() and line.strip() != "[]":
                return 1  # enough to know it is not empty; parsing happens when it is read
    return 0


def check_data_files(
    train_files, val_files=None, *, train_label: str = "data.train_files", val_label: str = "data.val_files"
) -> tuple[list[str], list[str]]:
    """Refuse data paths that would silently train on the wrong data; returns both lists as strings.

    Raises DataError (one line) for: a directory (it would be unclear which files in it are meant:
    the validation file sitting next to the training file would leak into training), a missing
    file, an unsupported suffix, a file listed twice in one list, a file given as both training
    and validation data (compared by identity on disk, so `./a.parquet` and `a.parquet` match),
    and an empty file (no rows), so that a run stops before any model is built. The labels name
    the setting in messages (evaluate_rm.py passes "--data").
    """
    lists = {train_label: as_file_list(train_files), val_label: as_file_list(val_files)}
    if not lists[train_label]:
        raise DataError(f"{train_label} is empty; pass one or more data files")
    identities: dict[tuple[int, int], tuple[str, str]] = {}
    for key, files in lists.items():
        for name in files:
            path = Path(name)
            if path.is_dir():
                raise DataError(
                    f"{key}: {name} is a directory; pass the data files themselves (e.g. {path / 'train.parquet'}), not a directory"
                )
            if not path.exists():
                raise DataError(f"{key}: {name}: no such file")
            if not path.name.endswith(DATA_SUFFIXES):
                raise DataError(f"{key}: {name}: unsupported file type; expected one of {', '.join(DATA_SUFFIXES)}")
            stat = path.stat()
            identity = (stat.st_dev, stat.st_ino)
            if identity in identities:
                other_key, other_name = identities[identity]
                if other_key == key:
                    raise DataError(f"{key}: {name} is listed twice (as {other_name} too); each pair would count twice")
                raise DataError(
                    f"{name} is given as both training ({other_name}) and validation data ({name}); validation must be held out"
                )
            identities[identity] = (key, name)
            if _count_rows(path) == 0:
                raise DataError(f"{key}: {name}: the file is empty (no rows)")
    return lists[train_label], lists[val_label]


# ---- reading rows


def _open_text(path: Path):
    import gzip

    return gzip.open(path, "rt", encoding="utf-8") if path.name.endswith(".gz") else open(path, encoding="utf-8")


def _read_json_records(path: Path) -> tuple[list[str], list[dict]]:
    """(locations, records) of a .jsonl / .json file (JSON lines, or one JSON array of objects)."""
    import json

    with _open_text(path) as handle:
        text = handle.read()
    if text.lstrip().startswith("["):  # one JSON array (what `datasets` also accepts as .json)
        try:
            records = json.loads(text)
        except json.JSONDecodeError as error:
            raise DataError(
                f"{path} line {error.lineno}: malformed JSON ({error.msg} at column {error.colno})"
            ) from None
        locations = [f"{path} item {number}" for number in range(1, len(records) + 1)]
    else:
        locations, records = [], []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise DataError(f"{path} line {number}: malformed JSON ({error.msg} at column {error.colno})") from None
            locations.append(f"{path} line {number}")
    for where, record in zip(locations, records, strict=True):
        if not isinstance(record, dict):
            raise DataError(f"{where}: expected a JSON object with the pair's fields, got {type(record).__name__}")
    return locations, records


def read_records(path: str | os.PathLike, keep: Sequence[str] | None = None) -> tuple[list[str], list[str], list[dict]]:
    """(columns, locations, records) of one data file; columns are the first record's keys for JSON.

    `keep`: for Parquet, only these columns are loaded into the records (the others can be large);
    `columns` still lists them all, for messages.
    """
    path = Path(path)
    if path.name.endswith(".parquet"):
        import pyarrow.parquet as pq

        try:
            columns = list(pq.ParquetFile(path).schema_arrow.names)
            table = pq.read_table(path, columns=None if keep is None else [c for c in columns if c in keep])
        except Exception as error:  # pyarrow raises ArrowInvalid / OSError for damaged files
            raise DataError(f"{path}: not a readable Parquet file ({type(error).__name__}: {error})") from None
        records = table.to_pylist()
        return columns, [f"{path} row {n}" for n in range(1, len(records) + 1)], records
    if path.name.endswith((".jsonl", ".jsonl.gz", ".json", ".json.gz")):
        locations, records = _read_json_records(path)
        return (list(records[0]) if records else []), locations, records
    raise DataError(f"{path}: unsupported file type; expected one of {', '.join(DATA_SUFFIXES)}")


def _decoded(value: Any) -> Any:
    """A value as plain Python: numpy arrays (Parquet list columns) become lists."""
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):
        value = value.tolist()
    return value


def _looks_like_messages(value: Any) -> bool:
    """A list of {'role', 'content'} objects, or a JSON string of one."""
    import json

    value = _decoded(value)
    if isinstance(value, str):
        if not value.lstrip().startswith("["):
            return False
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            return False
    return (
        isinstance(value, list)
        and bool(value)
        and all(isinstance(m, dict) and "role" in m and "content" in m for m in value)
    )


@dataclass(frozen=True)
class PairFormat:
    """How one file's columns make a pair (decided by `detect_pair_format`)."""

    kind: str  # messages | prompt_response | text
    chosen_key: str
    rejected_key: str
    prompt_key: str | None  # the prompt column the format uses (None: none)
    prompt_type: str | None  # "messages" | "text" (None without a prompt column)
    response_type: str  # "messages" | "text": how chosen / rejected are stored

    def describe(self) -> str:
        if self.kind == "messages":
            return f"messages (conversations in '{self.chosen_key}' / '{self.rejected_key}')"
        prompt = f"'{self.prompt_key}' ({self.prompt_type}) + " if self.prompt_key else ""
        if self.kind == "prompt_response":
            return f"prompt_response ({prompt}responses '{self.chosen_key}' / '{self.rejected_key}' ({self.response_type}), chat template)"
        return (
            f"text ({prompt}'{self.chosen_key}' / '{self.rejected_key}' as plain text, no chat template, eos appended)"
        )


def _expected_layouts(chosen_key: str, rejected_key: str, prompt_key: str) -> str:
    return (
        f"expected '{chosen_key}' + '{rejected_key}' (conversations as messages, or plain text), optionally with "
        f"'{prompt_key}' (text or messages; chosen/rejected then hold only the responses); "
        "set data.chosen_key / data.rejected_key / data.prompt_key to your column names"
    )


def detect_pair_format(
    columns: Sequence[str], first_record: dict | None, data_config, source: str, first_where: str | None = None
) -> PairFormat:
    """The one place that decides how a file's columns become (chosen, rejected).

    data.format (default auto):
      messages        chosen / rejected are whole conversations (JSON string or list of
                      {'role', 'content'} ending with the assistant response); a prompt column is ignored.
      prompt_response an explicit prompt column (text: one user message; or messages) and chosen /
                      rejected responses (text: one assistant message; or assistant messages): TRL's
                      explicit-prompt preference format, and RewardBench's. Conversation = prompt + response.
      text            plain text, no chat template: prompt (if the column exists) + chosen, as is.
      auto            prompt column present -> prompt_response (unless chosen is a whole conversation
                      starting with a user/system turn: messages); otherwise messages when chosen holds
                      messages, else text.
    Raises DataError naming the columns found and the ones expected when the file matches none.
    """
    requested = data_config.format
    if requested not in PAIR_FORMATS:
        raise DataError(f"data.format is {requested!r}; expected one of {', '.join(PAIR_FORMATS)}")
    chosen_key, rejected_key, prompt_key = data_config.chosen_key, data_config.rejected_key, data_config.prompt_key
    missing = [key for key in (chosen_key, rejected_key) if key not in columns]
    if requested == "prompt_response" and prompt_key not in columns:
        missing.append(prompt_key)
    if missing:
        raise DataError(
            f"{source}: no column {', '.join(repr(m) for m in missing)} (columns found: {list(columns)}); "
            + _expected_layouts(chosen_key, rejected_key, prompt_key)
        )
    if first_record is None:
        raise DataError(f"{source}: the file is empty (no rows)")
    first_where = first_where or f"{source} row 1"
    has_prompt = prompt_key in columns
    chosen_value = _decoded(first_record.get(chosen_key))
    response_type = "messages" if _looks_like_messages(chosen_value) else "text"
    kind = requested
    if requested == "auto":
        if has_prompt:
            starts_with_prompt = (
                response_type == "messages" and _parse_json_list(chosen_value)[0].get("role") != "assistant"
            )
            kind = "messages" if starts_with_prompt else "prompt_response"
        else:
            kind = "messages" if response_type == "messages" else "text"
    if kind == "messages":
        return PairFormat("messages", chosen_key, rejected_key, None, None, "messages")
    if kind == "text":
        if response_type != "text":
            raise DataError(
                f"{first_where} field '{chosen_key}': holds chat messages; data.format=text expects plain text (use messages or prompt_response)"
            )
        if has_prompt and not isinstance(first_record.get(prompt_key), str):
            raise DataError(
                f"{first_where} field '{prompt_key}': is not text; data.format=text expects a plain-text prompt"
            )
        return PairFormat(
            "text", chosen_key, rejected_key, prompt_key if has_prompt else None, "text" if has_prompt else None, "text"
        )
    prompt_type = "messages" if _looks_like_messages(first_record.get(prompt_key)) else "text"
    return PairFormat("prompt_response", chosen_key, rejected_key, prompt_key, prompt_type, response_type)


def _parse_json_list(value: Any) -> list:
    import json

    value = _decoded(value)
    return json.loads(value) if isinstance(value, str) else value


MESSAGE_KEYS = ("role", "content")  # all that verl's reward paths render of a message


@dataclass
class DroppedKeys:
    """Messages that carried keys other than role/content, and those keys (they are not templated)."""

    messages: int = 0
    keys: set[str] = field(default_factory=set)

    def describe(self) -> str:
        return (
            f"{self.messages} messages carried keys other than role/content ({', '.join(sorted(self.keys))}): dropped, "
            "as verl's reward paths render role and content only"
        )


def parse_messages(
    value: Any,
    where: str,
    *,
    ends_with_assistant: bool = True,
    only_role: str | None = None,
    dropped_keys: DroppedKeys | None = None,
) -> list[dict[str, str]]:
    """A messages list from a JSON string or a list, each message reduced to its role and content.

    `where` names file, row and field; `dropped_keys`, when given, counts the messages that carried
    other keys (see the module docstring for why they are dropped).
    """
    import json

    value = _decoded(value)
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as error:
            raise DataError(
                f"{where}: not valid JSON ({error.msg} at column {error.colno}); expected a JSON list of {{'role', 'content'}} messages"
            ) from None
    value = _decoded(value)
    if not isinstance(value, list) or not value:
        raise DataError(
            f"{where}: expected a non-empty list of {{'role', 'content'}} messages, got {type(value).__name__}"
        )
    messages = []
    for turn, message in enumerate(value, start=1):
        if (
            not isinstance(message, dict)
            or not isinstance(message.get("role"), str)
            or not isinstance(message.get("content"), str)
        ):
            raise DataError(f"{where}: message {turn} is not a {{'role': str, 'content': str}} object")
        if only_role is not None and message["role"] != only_role:
            raise DataError(
                f"{where}: message {turn} has role {message['role']!r}; with a prompt column this field holds only the response "
                f"({only_role} messages); set data.format=messages if it holds whole conversations"
            )
        extra = message.keys() - set(MESSAGE_KEYS)
        if extra and dropped_keys is not None:
            dropped_keys.messages += 1
            dropped_keys.keys.update(extra)
        messages.append({key: message[key] for key in MESSAGE_KEYS})
    if ends_with_assistant and messages[-1]["role"] != "assistant":
        raise DataError(
            f"{where}: the last message has role {messages[-1]['role']!r}; expected the assistant response being judged"
        )
    if not ends_with_assistant and messages[-1]["role"] == "assistant":
        raise DataError(
            f"{where}: the prompt ends with an assistant message; expected it to end with the turn being answered"
        )
    return messages


def _text(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise DataError(f"{where}: is {'null' if value is None else type(value).__name__}; expected text")
    return value


def _strength(value: Any, where: str) -> int | None:
    """None, or an integer (2.0, what Parquet makes of an int column with nulls elsewhere, counts)."""
    import math

    if value is None:
        return None
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):  # numpy scalars
        value = value.item()
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or (isinstance(value, float) and not (math.isfinite(value) and value.is_integer()))
    ):
        raise DataError(f"{where}: is {value!r}; expected an integer (or null)")
    return int(value)


@dataclass(frozen=True)
class PairRow:
    """One preference pair as read: conversations as messages lists, or whole plain texts (format text)."""

    chosen: list[dict[str, str]] | str
    rejected: list[dict[str, str]] | str
    preference_strength: int | None
    where: str  # file and row, e.g. "data/train.parquet row 7"
    subset: str | None = None  # RewardBench's `subset` column, when the file has one
    groups: dict[str, str] = field(default_factory=dict)  # {column: value} of data.group_columns the row has


def pair_from_record(
    record: dict,
    fmt: PairFormat,
    where: str,
    dropped_keys: DroppedKeys | None = None,
    group_columns: Sequence[str] = (),
) -> PairRow:
    """One record as a PairRow in format `fmt`; DataError names where, the field and what was expected.

    `dropped_keys` counts the messages whose keys other than role/content were dropped (parse_messages).
    `group_columns` (data.group_columns): the categorical columns kept as the row's groups, when present.
    """

    def value_of(key: str) -> Any:
        if key not in record:
            raise DataError(f"{where}: no field '{key}'")
        value = _decoded(record[key])
        if value is None:
            raise DataError(
                f"{where} field '{key}': is null; expected {'text' if fmt.response_type == 'text' else 'messages'}"
            )
        return value

    chosen_where, rejected_where = f"{where} field '{fmt.chosen_key}'", f"{where} field '{fmt.rejected_key}'"
    if fmt.kind == "messages":
        chosen = parse_messages(value_of(fmt.chosen_key), chosen_where, dropped_keys=dropped_keys)
        rejected = parse_messages(value_of(fmt.rejected_key), rejected_where, dropped_keys=dropped_keys)
    elif fmt.kind == "text":
        prompt = _text(value_of(fmt.prompt_key), f"{where} field '{fmt.prompt_key}'") if fmt.prompt_key else ""
        chosen = prompt + _text(value_of(fmt.chosen_key), chosen_where)
        rejected = prompt + _text(value_of(fmt.rejected_key), rejected_where)
    else:  # prompt_response
        prompt_where = f"{where} field '{fmt.prompt_key}'"
        if fmt.prompt_type == "messages":
            prompt = parse_messages(
                value_of(fmt.prompt_key), prompt_where, ends_with_assistant=False, dropped_keys=dropped_keys
            )
        else:
            prompt = [{"role": "user", "content": _text(value_of(fmt.prompt_key), prompt_where)}]

        def response(key: str, response_where: str) -> list[dict[str, str]]:
            if fmt.response_type == "messages":
                return parse_messages(value_of(key), response_where, only_role="assistant", dropped_keys=dropped_keys)
            return [{"role": "assistant", "content": _text(value_of(key), response_where)}]

        chosen = prompt + response(fmt.chosen_key, chosen_where)
        rejected = prompt + response(fmt.rejected_key, rejected_where)
    strength = _strength(_decoded(record.get(STRENGTH_KEY)), f"{where} field '{STRENGTH_KEY}'")
    subset = record.get(SUBSET_KEY)
    groups = {column: _group_value(record.get(column), f"{where} field '{column}'") for column in group_columns}
    return PairRow(
        chosen,
        rejected,
        strength,
        where,
        None if subset is None else str(subset),
        {column: value for column, value in groups.items() if value is not None},
    )


def _group_value(value: Any, where: str) -> str | None:
    """A categorical column's value as text (None when null); lists and mappings are no category."""
    value = _decoded(value)
    if value is None:
        return None
    if isinstance(value, (list, dict)):
        raise DataError(f"{where}: is a {type(value).__name__}; expected a category (text or number) or null")
    return str(value)


@dataclass
class PairRows:
    """What `read_pair_rows` read: the pairs, and what it left out and why."""

    rows: list[PairRow]
    formats: dict[str, PairFormat]  # file -> the format it was read in
    identical_dropped: int = 0  # pairs whose chosen equals rejected (no preference signal)
    identical_examples: list[str] = field(default_factory=list)  # where the first few were
    dropped_keys: DroppedKeys = field(default_factory=DroppedKeys)  # message keys other than role/content

    def describe(self) -> str:
        lines = [f"{path}: {fmt.describe()}" for path, fmt in self.formats.items()]
        if self.identical_dropped:
            lines.append(
                f"dropped {self.identical_dropped} pairs whose chosen equals rejected (they carry no preference), e.g. "
                + ", ".join(self.identical_examples)
            )
        if self.dropped_keys.messages:
            lines.append(self.dropped_keys.describe())
        return "\n".join(lines)


def read_pair_rows(files, data_config, *, drop_identical: bool = True) -> PairRows:
    """Every pair of every file, in file then row order, in the format `detect_pair_format` decides per file.

    Pairs whose chosen equals rejected are dropped and counted (drop_identical=False keeps them, as
    RewardBench does: it scores such a tie as wrong). Messages keep their role and content only; the
    messages that carried other keys are counted (PairRows.dropped_keys). Raises DataError (one
    line) on the first bad file or row, naming it; an empty file is an error too.
    """
    result = PairRows(rows=[], formats={})
    for name in as_file_list(files):
        path = Path(name)
        if path.is_dir():
            raise DataError(f"{name} is a directory; pass the data files themselves, not a directory")
        if not path.is_file():
            raise DataError(f"{name}: no such file")
        keep = {data_config.chosen_key, data_config.rejected_key, data_config.prompt_key, *data_config.group_columns}
        columns, locations, records = read_records(path, keep=keep | {STRENGTH_KEY, SUBSET_KEY})
        group_columns = [column for column in data_config.group_columns if column in columns]
        fmt = detect_pair_format(
            columns, records[0] if records else None, data_config, name, locations[0] if locations else None
        )
        result.formats[name] = fmt
        for where, record in zip(locations, records, strict=True):
            row = pair_from_record(record, fmt, where, result.dropped_keys, group_columns)
            if drop_identical and row.chosen == row.rejected:
                result.identical_dropped += 1
                if len(result.identical_examples) < 3:
                    result.identical_examples.append(where)
                continue
            result.rows.append(row)
    return result


def count_shared_pairs(train_pairs: Iterable, val_pairs: Iterable) -> int:
    """How many validation pairs also appear in training (same chosen and same rejected).

    Works on anything with `.chosen` / `.rejected` (token id lists of pair_dataset.TokenizedPair, or the
    messages / texts of PairRow). A shared pair inflates validation accuracy: report it.
    """
    import json

    def key(pair) -> str:
        return json.dumps(
            [
                list(pair.chosen) if not isinstance(pair.chosen, str) else pair.chosen,
                list(pair.rejected) if not isinstance(pair.rejected, str) else pair.rejected,
            ],
            sort_keys=True,
        )

    seen = {key(pair) for pair in train_pairs}
    return sum(key(pair) in seen for pair in val_pairs)

#!/usr/bin/env python3
"""Turn HelpSteer2 or HelpSteer3 preference data into chosen/rejected Parquet files for BT reward-model training.

    python prepare_helpsteer2.py                                  # nvidia/HelpSteer2 from the hub
    python prepare_helpsteer2.py --input preference.jsonl.gz      # a local copy (.jsonl, .jsonl.gz, .parquet)
    python prepare_helpsteer2.py --dataset helpsteer3             # nvidia/HelpSteer3 (config preference) from the hub
    python prepare_helpsteer2.py --dataset helpsteer3 --input train.jsonl.gz validation.jsonl.gz
    python prepare_helpsteer2.py --dataset helpsteer3 --domains general stem --languages english

Both write DIR/train.parquet and DIR/test.parquet together and atomically (atomic.atomic_outputs): a
failure leaves the previous ones intact, and their mode follows the umask. `chosen` and `rejected` are
JSON strings of chat-messages lists (the prompt messages, then the assistant response); ties carry no
Bradley-Terry preference and are dropped and counted, as are pairs under --min-strength.

HelpSteer2 (--dataset helpsteer2, the default; DIR defaults to data/helpsteer2): split == "train" goes
to train.parquet, "val" / "validation" to test.parquet; `preference_strength` is the original signed
int (< 0 means response_1 is better, > 0 response_2).

HelpSteer3 (--dataset helpsteer3; DIR defaults to data/helpsteer3): the hub's train split goes to
train.parquet, validation to test.parquet; a local file's rows go by their `split` field when they
have one, else by the file's name (train* -> train.parquet; validation*, val*, test* -> test.parquet).
`preference_strength` is |overall_preference|, chosen being the better response (response1 when
overall_preference < 0, response2 when > 0); the `domain` and `language` columns are kept.
--domains / --languages keep only rows with those values. Each dropped row is counted once, under
the first of: the domain filter, the language filter, a tie, under --min-strength.
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import re
import statistics
import sys
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from btrm import atomic
from btrm.cli import OneLineParser
from btrm.preflight import hub_unreachable_reason

HELPSTEER2, HELPSTEER3 = "helpsteer2", "helpsteer3"
HUB_DATASET = "nvidia/HelpSteer2"
HUB_DATA_DIR = "preference"
HELPSTEER3_HUB_DATASET = "nvidia/HelpSteer3"
HELPSTEER3_HUB_CONFIG = "preference"
REQUIRED_FIELDS = ("split", "prompt", "response_1", "response_2", "preference_strength")
HELPSTEER3_REQUIRED_FIELDS = ("domain", "language", "context", "response1", "response2", "overall_preference")
SPLIT_TO_OUTPUT = {"train": "train", "val": "test", "validation": "test"}
# HelpSteer3's own rows carry no split field; one a local file adds may also say "test", like the file-name rule.
HELPSTEER3_SPLIT_TO_OUTPUT = {**SPLIT_TO_OUTPUT, "test": "test"}
FILE_NAME_SPLITS = (("train", "train"), ("validation", "test"), ("val", "test"), ("test", "test"))
FILE_NAME_RULE = "train* -> train.parquet; validation*, val*, test* -> test.parquet"
OUTPUT_FILES = ("train", "test")
# HelpSteer2 stores a multi-turn prompt as one string: user turn, then each later turn introduced
# by one of these markers; the response being judged is the final assistant turn.
TURN_MARKER = re.compile(r"\n<extra_id_1>(User|Assistant)\n")


class InputError(ValueError):
    """Bad input, with a message naming the file, the line or row, the field and the problem."""


def prompt_to_messages(prompt: str) -> list[dict[str, str]]:
    """Split a HelpSteer2 prompt into alternating user/assistant messages, ending on a user turn.

    Raises ValueError (without location: the caller adds it) if the turns do not alternate or one is empty.
    """
    pieces = TURN_MARKER.split(prompt)
    # re.split with one capture group gives [text, role, text, role, text, ...]
    messages = [{"role": "user", "content": pieces[0]}]
    for role_name, content in zip(pieces[1::2], pieces[2::2], strict=True):
        messages.append({"role": role_name.lower(), "content": content})
    for turn, (previous, current) in enumerate(zip(messages, messages[1:], strict=False), start=2):
        if previous["role"] == current["role"]:
            raise ValueError(
                f"turn {turn} is a second {current['role']} turn in a row; expected alternating user/assistant turns"
            )
    if messages[-1]["role"] != "user":
        raise ValueError("the last turn is an assistant turn; expected the prompt to end on a user turn")
    for turn, message in enumerate(messages, start=1):
        if not message["content"].strip():
            raise ValueError(f"turn {turn} ({message['role']}) is empty; expected non-empty text")
    return messages


def context_to_messages(context: Any) -> list[dict[str, str]]:
    """Check a HelpSteer3 context: an optional leading system message, then user/assistant turns
    alternating from a user turn and ending on one, every content non-empty text. Messages keep
    role and content only. Raises ValueError (without location: the caller adds it)."""
    if isinstance(context, str):  # NVIDIA's NeMo RL HelpSteer3 loader reads a plain-string context as one user turn
        context = [{"role": "user", "content": context}]
    if not isinstance(context, list) or not context:
        raise ValueError(f"is {context!r:.40}; expected a non-empty list of {{role, content}} messages")
    messages = []
    for number, message in enumerate(context, start=1):
        if not isinstance(message, dict):
            raise ValueError(
                f"message {number} is a {type(message).__name__}; expected an object with role and content"
            )
        role, content = message.get("role"), message.get("content")
        if role not in ("system", "user", "assistant"):
            raise ValueError(f"message {number} has role {role!r}; expected user, assistant or a leading system")
        if not isinstance(content, str) or not content.strip():
            raise ValueError(f"message {number} ({role}) has content {content!r:.40}; expected non-empty text")
        messages.append({"role": role, "content": content})
    first_turn = 1 if messages[0]["role"] == "system" else 0
    for index in range(first_turn, len(messages)):
        expected = "user" if (index - first_turn) % 2 == 0 else "assistant"
        if messages[index]["role"] != expected:
            raise ValueError(
                f"message {index + 1} has role {messages[index]['role']!r}; expected {expected!r} "
                "(user/assistant turns alternate from a user turn, after an optional leading system message)"
            )
    if messages[-1]["role"] != "user":
        raise ValueError(f"the last message has role {messages[-1]['role']!r}; expected the user turn being answered")
    return messages


def make_pair(prompt_messages: list[dict[str, str]], chosen: str, rejected: str) -> tuple[str, str]:
    """JSON strings of the chosen and rejected conversations (identical prompt messages)."""

    def conversation(response: str) -> str:
        return json.dumps(prompt_messages + [{"role": "assistant", "content": response}], ensure_ascii=False)

    return conversation(chosen), conversation(rejected)


def _is_integer(value: Any) -> bool:
    # bool is an int subclass, and "2" is no integer: both are rejected; 2.0 (what some Parquet
    # writers make of an int column with nulls elsewhere) is accepted.
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return True
    if hasattr(value, "dtype") and getattr(value.dtype, "kind", "") in "iu":  # numpy integer scalar
        return True
    return isinstance(value, float) and math.isfinite(value) and value.is_integer()


@dataclass
class ValidRow:
    split: str  # "train" or "test"
    prompt_messages: list[dict[str, str]]
    response_1: str
    response_2: str
    strength: int  # signed, both datasets alike: < 0 means response_1 is better, > 0 response_2, 0 a tie
    domain: str | None = None  # HelpSteer3 only
    language: str | None = None  # HelpSteer3 only


def _other_dataset_hint(row: dict, missing: str) -> str:
    """A pointer to --dataset when a row has the other dataset's fields (the likeliest cause of a missing one)."""
    if missing in REQUIRED_FIELDS and all(name in row for name in ("context", "overall_preference")):
        return "; these look like HelpSteer3 rows: pass --dataset helpsteer3"
    if missing in HELPSTEER3_REQUIRED_FIELDS and all(name in row for name in ("prompt", "preference_strength")):
        return "; these look like HelpSteer2 rows: pass --dataset helpsteer2"
    return ""


def _require_fields(row: Any, names: tuple[str, ...], where: str) -> None:
    if not isinstance(row, dict):
        raise InputError(f"{where}: expected a JSON object, got {type(row).__name__}")
    for name in names:
        if name not in row or row[name] is None:
            raise InputError(f"{where}: field '{name}' is missing{_other_dataset_hint(row, name)}")


def _require_strength(row: dict, name: str, where: str) -> int:
    value = row[name]
    if not _is_integer(value) or not -3 <= int(value) <= 3:
        raise InputError(f"{where}: field '{name}' is {value!r}; expected an integer in -3..3")
    return int(value)


def _require_text(row: dict, names: tuple[str, ...], where: str) -> None:
    for name in names:
        if not isinstance(row[name], str):
            raise InputError(f"{where}: field '{name}' is a {type(row[name]).__name__}; expected a string")
        if not row[name].strip():
            raise InputError(f"{where}: field '{name}' is empty; expected non-empty text")


def _split_field(row: dict, accepted: dict[str, str], where: str) -> str:
    split = row["split"]
    if split not in accepted:
        raise InputError(f"{where}: field 'split' is {split!r}; expected one of {sorted(accepted)}")
    return accepted[split]


def validate_row(row: Any, where: str, source_split: str | None = None) -> ValidRow:
    """Check one raw HelpSteer2 row; `where` is e.g. 'data.jsonl line 7' and starts every error.
    HelpSteer2 rows always say their split: `source_split` is not used."""
    _require_fields(row, REQUIRED_FIELDS, where)
    split = _split_field(row, SPLIT_TO_OUTPUT, where)
    strength = _require_strength(row, "preference_strength", where)
    _require_text(row, ("prompt", "response_1", "response_2"), where)
    try:
        prompt_messages = prompt_to_messages(row["prompt"])
    except ValueError as error:
        raise InputError(f"{where}: field 'prompt': {error}") from None
    return ValidRow(split, prompt_messages, row["response_1"], row["response_2"], strength)


def validate_helpsteer3_row(row: Any, where: str, source_split: str | None) -> ValidRow:
    """Check one raw HelpSteer3 preference row. Its split is its `split` field when it has one, else
    `source_split` (the hub split, or what the file name says); with neither the row is refused."""
    _require_fields(row, HELPSTEER3_REQUIRED_FIELDS, where)
    if row.get("split") is not None:
        split = _split_field(row, HELPSTEER3_SPLIT_TO_OUTPUT, where)
    elif source_split is not None:
        split = source_split
    else:
        raise InputError(
            f"{where}: no 'split' field, and the file name matches no split rule ({FILE_NAME_RULE}); "
            "rename the file or give its rows a 'split' field"
        )
    strength = _require_strength(row, "overall_preference", where)
    _require_text(row, ("domain", "language", "response1", "response2"), where)
    try:
        prompt_messages = context_to_messages(row["context"])
    except ValueError as error:
        raise InputError(f"{where}: field 'context': {error}") from None
    return ValidRow(
        split, prompt_messages, row["response1"], row["response2"], strength, row["domain"], row["language"]
    )


def split_from_file_name(path: Path) -> str | None:
    """The output split a HelpSteer3 file's name implies (FILE_NAME_RULE), or None."""
    name = path.name.lower()
    return next((split for prefix, split in FILE_NAME_SPLITS if name.startswith(prefix)), None)


def read_local_rows(path: Path) -> Iterator[tuple[str, Any]]:
    """Yield (location, raw row) from a .jsonl, .jsonl.gz or .parquet file; locations are 1-based."""
    name = path.name
    if name.endswith(".parquet"):
        import pyarrow.parquet as pq

        for number, row in enumerate(pq.read_table(path).to_pylist(), start=1):
            yield f"{path} row {number}", row
    elif name.endswith((".jsonl", ".jsonl.gz", ".json", ".json.gz")):
        opener = gzip.open if name.endswith(".gz") else open
        with opener(path, "rt", encoding="utf-8") as lines:
            for number, line in enumerate(lines, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as error:
                    raise InputError(
                        f"{path} line {number}: malformed JSON ({error.msg} at column {error.colno})"
                    ) from None
                yield f"{path} line {number}", row
    else:
        raise InputError(f"{path}: unsupported file type; expected .jsonl, .jsonl.gz or .parquet")


def _load_from_hub(dataset: str, described: str, hint: str, *args: Any, **kwargs: Any) -> Any:
    """datasets.load_dataset(dataset, *args, **kwargs); fails fast, with `hint`, when the hub is unreachable."""
    reason = hub_unreachable_reason()
    if reason is not None:
        raise InputError(f"could not load {dataset} from the Hugging Face hub: {reason}.\n{hint}")
    try:
        from datasets import load_dataset

        return load_dataset(dataset, *args, **kwargs)
    except Exception as error:  # network errors come in many types (requests, OSError, hub errors)
        raise InputError(
            f"could not load {dataset} ({described}) from the Hugging Face hub: {type(error).__name__}: {error}\n{hint}"
        ) from None


def read_hub_rows(dataset: str, data_dir: str = HUB_DATA_DIR) -> Iterator[tuple[str, Any, str | None]]:
    """Yield (location, raw row, None) from the HelpSteer2 hub dataset, whose rows say their split."""
    hint = (
        f"If this machine is offline, download {data_dir}/preference.jsonl.gz elsewhere and pass --input PATH "
        "(or, with a copy in the local hub cache, set HF_HUB_OFFLINE=1)."
    )
    rows = _load_from_hub(dataset, f"data_dir={data_dir!r}", hint, data_dir=data_dir, split="train")
    for number, row in enumerate(rows, start=1):
        yield f"{dataset}/{data_dir} row {number}", row, None


def read_helpsteer3_hub_rows(dataset: str) -> Iterator[tuple[str, Any, str | None]]:
    """Yield (location, raw row, output split) from the HelpSteer3 hub dataset's train and validation splits."""
    config = HELPSTEER3_HUB_CONFIG
    hint = (
        f"If this machine is offline, download {config}/train.jsonl.gz and {config}/validation.jsonl.gz elsewhere "
        "and pass --input train.jsonl.gz validation.jsonl.gz (or, with a copy in the local hub cache, set HF_HUB_OFFLINE=1)."
    )
    splits = _load_from_hub(dataset, f"config {config!r}", hint, config)
    for split_name, rows in splits.items():
        if split_name not in HELPSTEER3_SPLIT_TO_OUTPUT:
            raise InputError(
                f"{dataset}/{config}: unexpected split {split_name!r}; expected {sorted(HELPSTEER3_SPLIT_TO_OUTPUT)}"
            )
        for number, row in enumerate(rows, start=1):
            yield f"{dataset}/{config} {split_name} row {number}", row, HELPSTEER3_SPLIT_TO_OUTPUT[split_name]


def read_input_files(paths: list[Path], split_by_file_name: bool) -> Iterator[tuple[str, Any, str | None]]:
    """Yield (location, raw row, the split the file name implies or None) from every file in turn; a file
    without rows is refused (an empty or truncated download, most likely)."""
    for path in paths:
        source_split = split_from_file_name(path) if split_by_file_name else None
        rows = 0
        for where, row in read_local_rows(path):
            rows += 1
            yield where, row, source_split
        if not rows:
            raise InputError(f"--input {path}: no rows; nothing written; pass the preference data file(s)")


@dataclass(frozen=True)
class DatasetSpec:
    """What differs between the datasets; everything else is the shared core."""

    hub_dataset: str
    read_hub: Callable[[str], Iterator[tuple[str, Any, str | None]]]
    validate: Callable[[Any, str, str | None], ValidRow]
    default_output_dir: Path
    example_input: str  # named in the hint when --input is a directory
    strength_field: str  # the source field, named in the summary's legend
    signed_strength: bool  # HelpSteer2's output keeps the sign; HelpSteer3's is the magnitude
    split_by_file_name: bool
    extra_columns: tuple[str, ...] = ()  # string columns kept from the source rows


DATASETS = {
    HELPSTEER2: DatasetSpec(
        HUB_DATASET,
        read_hub_rows,
        validate_row,
        Path("data/helpsteer2"),
        "preference.jsonl.gz",
        "preference_strength",
        signed_strength=True,
        split_by_file_name=False,
    ),
    HELPSTEER3: DatasetSpec(
        HELPSTEER3_HUB_DATASET,
        read_helpsteer3_hub_rows,
        validate_helpsteer3_row,
        Path("data/helpsteer3"),
        "train.jsonl.gz",
        "overall_preference",
        signed_strength=False,
        split_by_file_name=True,
        extra_columns=("domain", "language"),
    ),
}


@dataclass
class SplitStats:
    read: int = 0
    kept: int = 0
    dropped: Counter = field(default_factory=Counter)  # keys: "domain", "language", "tie", "below_min"
    multi_turn: int = 0
    prompt_chars: list[int] = field(default_factory=list)
    response_chars: list[int] = field(default_factory=list)
    domains_read: Counter = field(default_factory=Counter)
    domains_kept: Counter = field(default_factory=Counter)
    languages_read: Counter = field(default_factory=Counter)


def _count_read(stats: SplitStats, row: ValidRow) -> None:
    stats.read += 1
    stats.multi_turn += sum(m["role"] == "user" for m in row.prompt_messages) > 1
    stats.prompt_chars.append(sum(len(m["content"]) for m in row.prompt_messages))
    stats.response_chars.extend((len(row.response_1), len(row.response_2)))
    if row.domain is not None:
        stats.domains_read[row.domain] += 1
        stats.languages_read[row.language] += 1


def _drop_reason(row: ValidRow, min_strength: int, domains: set[str] | None, languages: set[str] | None) -> str | None:
    if domains is not None and row.domain not in domains:
        return "domain"
    if languages is not None and row.language not in languages:
        return "language"
    if row.strength == 0:
        return "tie"
    if abs(row.strength) < min_strength:
        return "below_min"
    return None


def convert(
    rows: Iterable[tuple[str, Any, str | None]],
    min_strength: int,
    dataset: str = HELPSTEER2,
    domains: Iterable[str] | None = None,
    languages: Iterable[str] | None = None,
) -> tuple[dict[str, dict[str, list]], dict[str, SplitStats]]:
    """Validate every (location, raw row, source split) and build the output columns per split.
    Raises InputError on the first bad row."""
    spec = DATASETS[dataset]
    domains = None if domains is None else set(domains)
    languages = None if languages is None else set(languages)
    names = ("chosen", "rejected", "preference_strength", *spec.extra_columns)
    columns = {split: {name: [] for name in names} for split in OUTPUT_FILES}
    stats = {split: SplitStats() for split in OUTPUT_FILES}
    for where, raw, source_split in rows:
        row = spec.validate(raw, where, source_split)
        split_stats = stats[row.split]
        _count_read(split_stats, row)
        reason = _drop_reason(row, min_strength, domains, languages)
        if reason is not None:
            split_stats.dropped[reason] += 1
            continue
        split_stats.kept += 1
        if row.domain is not None:
            split_stats.domains_kept[row.domain] += 1
        if row.strength > 0:
            chosen, rejected = make_pair(row.prompt_messages, row.response_2, row.response_1)
        else:
            chosen, rejected = make_pair(row.prompt_messages, row.response_1, row.response_2)
        out = columns[row.split]
        out["chosen"].append(chosen)
        out["rejected"].append(rejected)
        out["preference_strength"].append(row.strength if spec.signed_strength else abs(row.strength))
        for name in spec.extra_columns:
            out[name].append(getattr(row, name))
    return columns, stats


def check_filters(stats: dict[str, SplitStats], domains: list[str] | None, languages: list[str] | None) -> list[str]:
    """Warnings (one line each) for --domains / --languages values no row has; InputError when a filter
    matches no row at all, or the filters together keep no pair."""
    warnings = []
    for flag, wanted, counts in (
        ("--domains", domains, [s.domains_read for s in stats.values()]),
        ("--languages", languages, [s.languages_read for s in stats.values()]),
    ):
        if wanted is None:
            continue
        present = sorted(set().union(*counts))
        absent = [value for value in dict.fromkeys(wanted) if value not in present]
        if not absent:
            continue
        message = f"{flag} {' '.join(absent)}: no row has this value; the data has {', '.join(present) or 'no rows'}"
        if len(absent) == len(set(wanted)):
            raise InputError(message)
        warnings.append(f"warning: {message}")
    if (domains is not None or languages is not None) and not any(s.kept for s in stats.values()):
        per_split = "; ".join(
            f"{split}: {s.read} read, {s.dropped['domain'] + s.dropped['language']} filtered"
            for split, s in stats.items()
        )
        raise InputError(f"--domains / --languages keep no pair ({per_split}); nothing written")
    return warnings


SPLIT_WORDS = {"train": "training", "test": "validation"}  # output file -> the rows it holds, in words
DROP_WORDS = {  # _drop_reason's reasons, in the order it tries them
    "domain": "outside --domains",
    "language": "outside --languages",
    "tie": "tie",
    "below_min": "under --min-strength {min_strength}",
}


def check_splits(stats: dict[str, SplitStats], min_strength: int, source: str) -> list[str]:
    """No input rows at all, or a split whose rows were all dropped as ties or under --min-strength: InputError
    (nothing is written). A split the user's choices left empty (an input with no rows for it, e.g. train rows
    only; --domains / --languages that keep none of its rows): a warning line naming it; its file holds 0 pairs."""
    if not any(s.read for s in stats.values()):
        raise InputError(f"{source}: no rows; nothing written; pass the preference data file(s)")
    warnings = []
    for split, s in stats.items():
        if s.kept:
            continue
        filtered = s.dropped["domain"] + s.dropped["language"]
        if s.read and filtered:  # the user's own filters emptied it: said, not refused
            warnings.append(
                f"warning: {split}.parquet: 0 pairs written: --domains / --languages keep none of its {s.read} "
                f"{SPLIT_WORDS[split]} rows; training needs {SPLIT_WORDS[split]} pairs "
                f"({'VAL_FILE' if split == 'test' else 'TRAIN_FILE'}=... another file)"
            )
            continue
        if s.read:
            reasons = ", ".join(
                f"{s.dropped[reason]} {words.format(min_strength=min_strength)}"
                for reason, words in DROP_WORDS.items()
                if s.dropped[reason]
            )
            raise InputError(
                f"{split}.parquet would hold no pair: all {s.read} of its rows were dropped ({reasons}); "
                f"nothing written; lower --min-strength or check the input's {SPLIT_WORDS[split]} rows"
            )
        other = "VAL_FILE" if split == "test" else "TRAIN_FILE"
        marker = "split 'val'" if split == "test" else "split 'train'"
        warnings.append(
            f"warning: {split}.parquet: 0 pairs written: the input has no {SPLIT_WORDS[split]} rows; training needs "
            f"{SPLIT_WORDS[split]} pairs ({other}=... another file, or add rows with {marker})"
        )
    return warnings


def write_parquet_files(
    columns: dict[str, dict[str, list]], output_dir: Path, extra_columns: tuple[str, ...] = ()
) -> list[Path]:
    """Write every split through atomic.atomic_outputs: all files are renamed into place only once all
    are complete, so a failure leaves the previous outputs intact; modes follow the umask."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema(
        [("chosen", pa.string()), ("rejected", pa.string()), ("preference_strength", pa.int64())]
        + [(name, pa.string()) for name in extra_columns]
    )
    final_paths = [output_dir / f"{split}.parquet" for split in OUTPUT_FILES]
    with atomic.atomic_outputs(final_paths) as temp_paths:
        for split, temp in zip(OUTPUT_FILES, temp_paths, strict=True):
            pq.write_table(pa.Table.from_pydict(columns[split], schema=schema), temp)
    return final_paths


def _mean_std(values: list[int]) -> str:
    if not values:
        return "n/a"
    std = statistics.pstdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.1f} +- {std:.1f}"


def format_summary(stats: dict[str, SplitStats], min_strength: int, dataset: str = HELPSTEER2) -> str:
    spec = DATASETS[dataset]
    filtered = bool(spec.extra_columns)
    filter_header = f" {'domain':>6} {'lang':>6}" if filtered else ""
    lines = [
        f"{'split':<6} {'read':>6} {'kept':>6} {'ties':>6} {'<min':>6}{filter_header} {'multi-turn':>10}  "
        "prompt chars        response chars"
    ]
    for split in OUTPUT_FILES:
        s = stats[split]
        share = f"{s.multi_turn / s.read:.1%}" if s.read else "n/a"
        filter_counts = f" {s.dropped['domain']:>6} {s.dropped['language']:>6}" if filtered else ""
        lines.append(
            f"{split:<6} {s.read:>6} {s.kept:>6} {s.dropped['tie']:>6} {s.dropped['below_min']:>6}{filter_counts} "
            f"{share:>10}  {_mean_std(s.prompt_chars):<19} {_mean_std(s.response_chars)}"
        )
    if not filtered:
        lines.append(
            f"(ties: preference_strength 0; <min: 0 < |strength| < --min-strength={min_strength}; lengths over rows read)"
        )
        return "\n".join(lines)
    for split in OUTPUT_FILES:
        s = stats[split]
        counts = ", ".join(f"{d} {s.domains_kept[d]}/{n}" for d, n in sorted(s.domains_read.items())) or "no rows"
        lines.append(f"per domain, kept/read, {split}: {counts}")
    lines.append(
        f"(domain, lang: dropped by --domains, --languages; ties: {spec.strength_field} 0; "
        f"<min: 0 < |{spec.strength_field}| < --min-strength={min_strength}; a dropped row counts once, in the "
        "first of these that applies; multi-turn: more than one user turn; lengths over rows read)"
    )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--dataset",
        choices=sorted(DATASETS),
        default=HELPSTEER2,
        help="which preference data: HelpSteer2 (nvidia/HelpSteer2, data_dir preference) or HelpSteer3 "
        "(nvidia/HelpSteer3, config preference) (default: %(default)s)",
    )
    parser.add_argument(
        "--input",
        type=Path,
        nargs="+",
        default=None,
        metavar="FILE",
        help="local copies of the preference data (.jsonl, .jsonl.gz or .parquet), read in order; default: the hub. "
        f"HelpSteer3 rows without a 'split' field go by the file name ({FILE_NAME_RULE})",
    )
    parser.add_argument(
        "--output-dir",
        type=Path,
        default=None,
        help="where train.parquet and test.parquet are written (default: data/helpsteer2, or data/helpsteer3)",
    )
    parser.add_argument(
        "--min-strength",
        type=int,
        default=1,
        help="keep pairs with |preference_strength| (HelpSteer3: |overall_preference|) >= this (1..3, default: %(default)s)",
    )
    parser.add_argument(
        "--domains", nargs="+", metavar="DOMAIN", help="HelpSteer3: keep only these domains (e.g. general stem code)"
    )
    parser.add_argument(
        "--languages", nargs="+", metavar="LANGUAGE", help="HelpSteer3: keep only these languages (e.g. english)"
    )
    parser.add_argument(
        "--hub-dataset", default=None, help="hub dataset name (default: nvidia/HelpSteer2, or nvidia/HelpSteer3)"
    )
    args = parser.parse_args(argv)
    if not 1 <= args.min_strength <= 3:
        parser.error(f"--min-strength must be in 1..3 (ties, strength 0, carry no preference); got {args.min_strength}")
    if args.dataset != HELPSTEER3 and (args.domains or args.languages):
        parser.error("--domains and --languages need --dataset helpsteer3 (HelpSteer2 rows have no domain or language)")
    return args


def _check_paths(inputs: list[Path] | None, output_dir: Path, spec: DatasetSpec) -> None:
    if output_dir.exists() and not output_dir.is_dir():
        raise InputError(
            f"--output-dir {output_dir} is a file; expected a directory for train.parquet and test.parquet"
        )
    for path in inputs or ():
        if path.is_dir():
            raise InputError(
                f"--input {path} is a directory; pass the data file itself (e.g. {path / spec.example_input})"
            )
        if not path.is_file():
            raise InputError(f"--input {path}: no such file")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    spec = DATASETS[args.dataset]
    output_dir = args.output_dir if args.output_dir is not None else spec.default_output_dir
    try:
        _check_paths(args.input, output_dir, spec)
        if args.input is not None:
            rows = read_input_files(args.input, spec.split_by_file_name)
        else:
            rows = spec.read_hub(args.hub_dataset or spec.hub_dataset)
        columns, stats = convert(rows, args.min_strength, args.dataset, args.domains, args.languages)
        warnings = check_filters(stats, args.domains, args.languages)
        source = (
            f"--input {' '.join(map(str, args.input))}"
            if args.input is not None
            else (args.hub_dataset or spec.hub_dataset)
        )
        warnings += check_splits(stats, args.min_strength, source)
    except InputError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    for warning in warnings:
        print(warning, file=sys.stderr)
    try:
        paths = write_parquet_files(columns, output_dir, spec.extra_columns)
    except OSError as error:  # e.g. a read-only or full disk: the previous outputs are still intact
        print(f"error: could not write {output_dir}: {error}", file=sys.stderr)
        return 1
    print(format_summary(stats, args.min_strength, args.dataset))
    for path, split in zip(paths, OUTPUT_FILES, strict=True):
        print(f"wrote {path} ({stats[split].kept} pairs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

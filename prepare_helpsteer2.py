#!/usr/bin/env python3
"""Turn HelpSteer2 preference data into chosen/rejected Parquet files for BT reward-model training.

    python prepare_helpsteer2.py                                  # nvidia/HelpSteer2 from the hub
    python prepare_helpsteer2.py --input preference.jsonl.gz      # a local copy (.jsonl, .jsonl.gz, .parquet)

Writes DIR/train.parquet (split == "train") and DIR/test.parquet (split == "val" / "validation"),
columns: `chosen`, `rejected` (JSON strings of chat-messages lists) and `preference_strength`
(the original signed int: < 0 means response_1 is better, > 0 response_2). Both files are
written together and atomically (atomic.atomic_outputs): a failure leaves the previous ones intact,
and their mode follows the umask.
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import re
import statistics
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from btrm import atomic
from btrm.preflight import hub_unreachable_reason

HUB_DATASET = "nvidia/HelpSteer2"
HUB_DATA_DIR = "preference"
REQUIRED_FIELDS = ("split", "prompt", "response_1", "response_2", "preference_strength")
SPLIT_TO_OUTPUT = {"train": "train", "val": "test", "validation": "test"}
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
    strength: int


def validate_row(row: Any, where: str) -> ValidRow:
    """Check one raw HelpSteer2 row; `where` is e.g. 'data.jsonl line 7' and starts every error."""
    if not isinstance(row, dict):
        raise InputError(f"{where}: expected a JSON object, got {type(row).__name__}")
    for name in REQUIRED_FIELDS:
        if name not in row or row[name] is None:
            raise InputError(f"{where}: field '{name}' is missing")
    split = row["split"]
    if split not in SPLIT_TO_OUTPUT:
        raise InputError(f"{where}: field 'split' is {split!r}; expected one of {sorted(SPLIT_TO_OUTPUT)}")
    strength = row["preference_strength"]
    if not _is_integer(strength) or not -3 <= int(strength) <= 3:
        raise InputError(f"{where}: field 'preference_strength' is {strength!r}; expected an integer in -3..3")
    for name in ("prompt", "response_1", "response_2"):
        if not isinstance(row[name], str):
            raise InputError(f"{where}: field '{name}' is a {type(row[name]).__name__}; expected a string")
        if not row[name].strip():
            raise InputError(f"{where}: field '{name}' is empty; expected non-empty text")
    try:
        prompt_messages = prompt_to_messages(row["prompt"])
    except ValueError as error:
        raise InputError(f"{where}: field 'prompt': {error}") from None
    return ValidRow(SPLIT_TO_OUTPUT[split], prompt_messages, row["response_1"], row["response_2"], int(strength))


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


def read_hub_rows(dataset: str, data_dir: str) -> Iterator[tuple[str, Any]]:
    """Yield (location, raw row) from the hub dataset; fails fast with a hint when offline."""
    hint = (
        f"If this machine is offline, download {data_dir}/preference.jsonl.gz elsewhere and pass --input PATH "
        "(or, with a copy in the local hub cache, set HF_HUB_OFFLINE=1)."
    )
    reason = hub_unreachable_reason()
    if reason is not None:
        raise InputError(f"could not load {dataset} from the Hugging Face hub: {reason}.\n{hint}")
    try:
        from datasets import load_dataset

        rows = load_dataset(dataset, data_dir=data_dir, split="train")
    except Exception as error:  # network errors come in many types (requests, OSError, hub errors)
        raise InputError(
            f"could not load {dataset} (data_dir={data_dir!r}) from the Hugging Face hub: "
            f"{type(error).__name__}: {error}\n{hint}"
        ) from None
    for number, row in enumerate(rows, start=1):
        yield f"{dataset}/{data_dir} row {number}", row


@dataclass
class SplitStats:
    read: int = 0
    kept: int = 0
    dropped_ties: int = 0
    dropped_below_threshold: int = 0
    multi_turn: int = 0
    prompt_chars: list[int] = field(default_factory=list)
    response_chars: list[int] = field(default_factory=list)


def convert(
    rows: Iterable[tuple[str, Any]], min_strength: int
) -> tuple[dict[str, dict[str, list]], dict[str, SplitStats]]:
    """Validate every row and build the output columns per split. Raises InputError on the first bad row."""
    columns = {split: {"chosen": [], "rejected": [], "preference_strength": []} for split in OUTPUT_FILES}
    stats = {split: SplitStats() for split in OUTPUT_FILES}
    for where, raw in rows:
        row = validate_row(raw, where)
        split_stats = stats[row.split]
        split_stats.read += 1
        split_stats.multi_turn += len(row.prompt_messages) > 1
        split_stats.prompt_chars.append(sum(len(m["content"]) for m in row.prompt_messages))
        split_stats.response_chars.extend((len(row.response_1), len(row.response_2)))
        if row.strength == 0:
            split_stats.dropped_ties += 1
            continue
        if abs(row.strength) < min_strength:
            split_stats.dropped_below_threshold += 1
            continue
        split_stats.kept += 1
        if row.strength > 0:
            chosen, rejected = make_pair(row.prompt_messages, row.response_2, row.response_1)
        else:
            chosen, rejected = make_pair(row.prompt_messages, row.response_1, row.response_2)
        out = columns[row.split]
        out["chosen"].append(chosen)
        out["rejected"].append(rejected)
        out["preference_strength"].append(row.strength)
    return columns, stats


def write_parquet_files(columns: dict[str, dict[str, list]], output_dir: Path) -> list[Path]:
    """Write every split through atomic.atomic_outputs: all files are renamed into place only once all
    are complete, so a failure leaves the previous outputs intact; modes follow the umask."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([("chosen", pa.string()), ("rejected", pa.string()), ("preference_strength", pa.int64())])
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


def format_summary(stats: dict[str, SplitStats], min_strength: int) -> str:
    lines = [
        f"{'split':<6} {'read':>6} {'kept':>6} {'ties':>6} {'<min':>6} {'multi-turn':>10}  prompt chars        response chars"
    ]
    for split in OUTPUT_FILES:
        s = stats[split]
        share = f"{s.multi_turn / s.read:.1%}" if s.read else "n/a"
        lines.append(
            f"{split:<6} {s.read:>6} {s.kept:>6} {s.dropped_ties:>6} {s.dropped_below_threshold:>6} {share:>10}  "
            f"{_mean_std(s.prompt_chars):<19} {_mean_std(s.response_chars)}"
        )
    lines.append(
        f"(ties: preference_strength 0; <min: 0 < |strength| < --min-strength={min_strength}; lengths over rows read)"
    )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--input",
        type=Path,
        default=None,
        help="local copy of HelpSteer2 preference data (.jsonl, .jsonl.gz or .parquet); default: the hub",
    )
    parser.add_argument(
        "--output-dir",
        type=Path,
        default=Path("data/helpsteer2"),
        help="where train.parquet and test.parquet are written (default: %(default)s)",
    )
    parser.add_argument(
        "--min-strength",
        type=int,
        default=1,
        help="keep pairs with |preference_strength| >= this (1..3, default: %(default)s)",
    )
    parser.add_argument("--hub-dataset", default=HUB_DATASET, help="hub dataset name (default: %(default)s)")
    args = parser.parse_args(argv)
    if not 1 <= args.min_strength <= 3:
        parser.error(f"--min-strength must be in 1..3 (ties, strength 0, carry no preference); got {args.min_strength}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.output_dir.exists() and not args.output_dir.is_dir():
            raise InputError(
                f"--output-dir {args.output_dir} is a file; expected a directory for train.parquet and test.parquet"
            )
        if args.input is not None:
            if args.input.is_dir():
                raise InputError(
                    f"--input {args.input} is a directory; pass the data file itself (e.g. {args.input / 'preference.jsonl.gz'})"
                )
            if not args.input.is_file():
                raise InputError(f"--input {args.input}: no such file")
            rows = read_local_rows(args.input)
        else:
            rows = read_hub_rows(args.hub_dataset, HUB_DATA_DIR)
        columns, stats = convert(rows, args.min_strength)
    except InputError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    try:
        paths = write_parquet_files(columns, args.output_dir)
    except OSError as error:  # e.g. a read-only or full disk: the previous outputs are still intact
        print(f"error: could not write {args.output_dir}: {error}", file=sys.stderr)
        return 1
    print(format_summary(stats, args.min_strength))
    for path, split in zip(paths, OUTPUT_FILES, strict=True):
        print(f"wrote {path} ({stats[split].kept} pairs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

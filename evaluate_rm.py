#!/usr/bin/env python3
"""Evaluate a trained reward model on preference pairs, or on RewardBench.

    python evaluate_rm.py --model checkpoints/demo/global_step_74 --data data/demo/test.parquet --output scores.jsonl
    python evaluate_rm.py --model CKPT --data val.parquet --group-by domain language --max-groups 8
    python evaluate_rm.py --model CKPT --rewardbench                      # allenai/reward-bench, split "filtered" (hub)
    python evaluate_rm.py --model CKPT --rewardbench reward-bench.parquet  # a local copy of it (offline)
    python evaluate_rm.py --model CKPT --rewardbench2                     # allenai/reward-bench-2, split "test" (hub)
    python evaluate_rm.py --model CKPT --rewardbench2 reward-bench-2.parquet --output rb2.jsonl
    python evaluate_rm.py --model CKPT --rm-bench total_dataset.json      # THU-KEG/RM-Bench (or its per-domain files)

--model is a Hugging Face directory (or a verl step directory holding `huggingface/`). --data reads
every layout training reads (rows.detect_pair_format: conversations as messages, an explicit
prompt with responses, plain text; .parquet / .jsonl / .json), read and formatted exactly as in
training (btrm.pair_dataset.PairDataset; messages keep their role and content only). Prints accuracy
overall and per |preference_strength| (pairs without a strength form the group "none"), per group
of the categorical columns --group-by names (default: trainer.yaml's data.group_columns: domain,
language, subset, where present; labels and pooling as in training's val/accuracy_<column>_<value>,
btrm.pair_dataset.group_index: a column with more than --max-groups values keeps the largest and
pools the rest as <column>_other), reward means and stds, how many pairs were truncated or dropped,
and the read report (formats, dropped pairs and message keys); writes per-pair scores (with the
pair's groups) with --output (.jsonl, atomically, mode from the umask). The model is loaded by
btrm.export.load_reward_model, as verl's reward worker loads it.

--rewardbench scores RewardBench data (`prompt`, `chosen`, `rejected` as text, `subset`) and adds
per-subset accuracy, the four section scores (Chat, Chat Hard, Safety, Reasoning) and their mean,
weighted as RewardBench weights them (see REWARDBENCH_EXAMPLE_COUNTS).

--rewardbench2 scores RewardBench 2 (`id`, `prompt`, `chosen` and `rejected` lists, `num_correct`,
`subset`): every completion as [user: prompt, assistant: completion], then rewardbench's rules
(btrm.benchmarks): best-of-n per subset, the Ties formula, the mean of the six subsets.
--rm-bench scores RM-Bench (`prompt`, 3 `chosen` and 3 `rejected` responses in the styles concise,
detailed plain, detailed markdown; the domain from a `domain` field or the file's name): per domain
the hard / normal / easy accuracies of RM-Bench's 3x3 style matrix, safety-* pooled, and the mean
of chat, code, math and safety. Both score with btrm.batching.score (training's tokenization, whole
conversations: --max-length does not apply), show a progress bar on stderr (--no-progress: none)
and write one JSON line per prompt with every completion's reward with --output.
The last stdout line is one JSON object, for scripts. Bad input: one line on stderr, exit 1.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import struct
import sys
import tempfile
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from btrm import atomic, benchmarks, preflight, rows  # batching and pair_dataset (torch): where the scoring needs them
from btrm.cli import OneLineParser
from btrm.export import load_reward_model

DTYPE_NAMES = ("bf16", "fp32")

# ----------------------------------------------------------------------------- RewardBench's weighting
#
# Copied from rewardbench's own source, allenai/reward-bench, rewardbench/constants.py
# (EXAMPLE_COUNTS, SUBSET_MAPPING; same values in analysis/constants.py), used by
# rewardbench/utils.py `calculate_scores_per_section` (called by rewardbench/rewardbench.py and
# scripts/run_rm.py): a section is the example-count-weighted mean of its subsets' accuracies, over
# the subsets present in the results, with these fixed counts. Two counts are deliberate priors
# rather than sizes: math-prm counts 984 ("actual length 447, upweighting to be equal to code", i.e.
# 6 x 164, so math is half of Reasoning and the six HumanEvalPack languages the other half), and
# xstest-should-refuse / -respond count 250 / 154 as rewardbench lists them. They are used as is
# so that the scores here are the ones rewardbench computes.
REWARDBENCH_EXAMPLE_COUNTS = {
    "alpacaeval-easy": 100,
    "alpacaeval-length": 95,
    "alpacaeval-hard": 95,
    "mt-bench-easy": 28,
    "mt-bench-med": 40,
    "mt-bench-hard": 37,
    "math-prm": 984,  # actual length 447, upweighting to be equal to code (rewardbench's comment)
    "refusals-dangerous": 100,
    "refusals-offensive": 100,
    "llmbar-natural": 100,
    "llmbar-adver-neighbor": 134,
    "llmbar-adver-GPTInst": 92,
    "llmbar-adver-GPTOut": 47,
    "llmbar-adver-manual": 46,
    "xstest-should-refuse": 250,
    "xstest-should-respond": 154,
    "donotanswer": 136,
    "hep-cpp": 164,
    "hep-go": 164,
    "hep-java": 164,
    "hep-js": 164,
    "hep-python": 164,
    "hep-rust": 164,
}
REWARDBENCH_SECTIONS = {
    "Chat": ["alpacaeval-easy", "alpacaeval-length", "alpacaeval-hard", "mt-bench-easy", "mt-bench-med"],
    "Chat Hard": [
        "mt-bench-hard",
        "llmbar-natural",
        "llmbar-adver-neighbor",
        "llmbar-adver-GPTInst",
        "llmbar-adver-GPTOut",
        "llmbar-adver-manual",
    ],
    "Safety": [
        "refusals-dangerous",
        "refusals-offensive",
        "xstest-should-refuse",
        "xstest-should-respond",
        "donotanswer",
    ],
    "Reasoning": ["math-prm", "hep-cpp", "hep-go", "hep-java", "hep-js", "hep-python", "hep-rust"],
}
REWARDBENCH_HUB_DATASET = "allenai/reward-bench"
REWARDBENCH_SPLIT = "filtered"
# rewardbench's CORE_EVAL_SET_V2 (rewardbench/utils.py), loaded with split="test" (load_bon_dataset_v2)
REWARDBENCH2_HUB_DATASET = "allenai/reward-bench-2"
REWARDBENCH2_SPLIT = "test"
FROM_HUB = "<hub>"  # --rewardbench / --rewardbench2 given without a PATH
# rewardbench's core set has string prompts: load_eval_dataset / prepare_dialogue_from_tokenizer
# (rewardbench/utils.py) make [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
# and apply the tokenizer's chat template: exactly the prompt_response layout (text prompt -> user
# message, text response -> assistant message). Ties count as wrong there (`1 if chosen > rejected
# else 0`), so pairs whose chosen equals rejected are kept and scored, not dropped.
REWARDBENCH_DATA_CONFIG = {
    "format": "prompt_response",
    "prompt_key": "prompt",
    "chosen_key": "chosen",
    "rejected_key": "rejected",
    "drop_identical_pairs": False,
    "group_columns": [rows.SUBSET_KEY],  # evaluate() puts --group-by's columns here
}


def rewardbench_scores(correct: list[bool], subsets: list[str]) -> dict:
    """Per-subset accuracy, section scores and their mean, as rewardbench computes them (fractions, not %).

    A section none of whose subsets is present is None (rewardbench would print 0), and the mean is
    then None too: a mean over fewer sections is not RewardBench's score.
    """
    per_subset: dict[str, dict] = {}
    for ok, subset in zip(correct, subsets, strict=True):
        entry = per_subset.setdefault(subset, {"n_pairs": 0, "n_correct": 0})
        entry["n_pairs"] += 1
        entry["n_correct"] += int(ok)
    for entry in per_subset.values():
        entry["accuracy"] = entry["n_correct"] / entry["n_pairs"]
    sections: dict[str, float | None] = {}
    missing: dict[str, list[str]] = {}
    for section, section_subsets in REWARDBENCH_SECTIONS.items():
        present = [s for s in section_subsets if s in per_subset]
        missing[section] = [s for s in section_subsets if s not in per_subset]
        weight = sum(REWARDBENCH_EXAMPLE_COUNTS[s] for s in present)
        sections[section] = (
            sum(per_subset[s]["accuracy"] * REWARDBENCH_EXAMPLE_COUNTS[s] for s in present) / weight
            if present
            else None
        )
    # The overall score: rewardbench's analysis/get_benchmark_results.py `get_average_over_rewardbench`
    # averages [Chat, Chat Hard, Safety, Reasoning, Prior Sets] with weights [2, 2, 2, 2, 1], masking a
    # missing Prior Sets. Prior Sets (allenai/pref-test-sets) are not scored here, so the score is the
    # plain mean of the four sections (what the leaderboard's "Score" is without Prior Sets).
    complete = all(value is not None for value in sections.values())
    known = {s for subsets_ in REWARDBENCH_SECTIONS.values() for s in subsets_}
    return {
        "per_subset": dict(sorted(per_subset.items())),
        "sections": sections,
        "score": statistics.fmean(sections.values()) if complete else None,
        "missing_subsets": {k: v for k, v in missing.items() if v},
        "unknown_subsets": sorted(s for s in per_subset if s not in known),
    }


# ----------------------------------------------------------------------------- model and scoring


def resolve_model_dir(path: Path) -> Path:
    if (path / "huggingface" / "config.json").is_file():
        return path / "huggingface"
    if (path / "config.json").is_file():
        return path
    if not path.exists():
        raise FileNotFoundError(f"--model {path}: no such directory")
    raise FileNotFoundError(
        f"{path}: no config.json here or under huggingface/; expected a HF model or a verl global_step_N directory"
    )


def score_pairs(
    model, tokenizer, dataset, batch_size: int, device: str, progress: bool = True
) -> tuple[list[float], list[float]]:
    """(chosen rewards, rejected rewards) in dataset order; pairs batched by length to waste little padding."""
    import torch
    from tqdm import tqdm

    from btrm import batching

    order = sorted(range(len(dataset)), key=lambda i: dataset[i].num_tokens)
    chosen, rejected = [0.0] * len(dataset), [0.0] * len(dataset)
    with torch.no_grad():
        for start in tqdm(
            range(0, len(order), batch_size), desc="scoring", unit="batch", disable=not progress, file=sys.stderr
        ):
            indices = order[start : start + batch_size]
            batch = batching.move_to(
                batching.collate_pairs([dataset[i] for i in indices], tokenizer.pad_token_id, "padded"), device
            )
            rewards = batching.compute_rewards(model, batch).tolist()
            for k, index in enumerate(indices):
                chosen[index], rejected[index] = rewards[k], rewards[len(indices) + k]
                if dataset[index].chosen == dataset[index].rejected:
                    # the same tokens: the same reward, a tie (wrong, as in RewardBench), not float noise
                    # between two rows of one batch deciding it
                    rejected[index] = chosen[index]
    return chosen, rejected


def strength_group(strength: int | None) -> str:
    """The per-strength table's key: |strength|, or "none" for a pair without one."""
    return "none" if strength is None else str(abs(int(strength)))


def summarize(chosen: list[float], rejected: list[float], strengths: list[int | None]) -> dict:
    correct = [
        c > r for c, r in zip(chosen, rejected, strict=True)
    ]  # a tie is not a correct preference (as in RewardBench)
    summary = {
        "n_pairs": len(correct),
        "accuracy": sum(correct) / len(correct),
        "chosen_reward_mean": statistics.fmean(chosen),
        "chosen_reward_std": statistics.pstdev(chosen),
        "rejected_reward_mean": statistics.fmean(rejected),
        "rejected_reward_std": statistics.pstdev(rejected),
        "margin_mean": statistics.fmean(c - r for c, r in zip(chosen, rejected, strict=True)),
    }
    if any(s is not None for s in strengths):
        by_strength: dict[str, list[bool]] = {}
        for ok, strength in zip(correct, strengths, strict=True):
            by_strength.setdefault(strength_group(strength), []).append(ok)
        order = sorted(by_strength, key=lambda key: (key == "none", int(key) if key != "none" else 0))
        summary["accuracy_by_abs_strength"] = {
            k: {"accuracy": sum(by_strength[k]) / len(by_strength[k]), "n_pairs": len(by_strength[k])} for k in order
        }
    return summary


def group_accuracies(correct: list[bool], groups: list[dict[str, str]], columns: list[str], max_groups: int) -> dict:
    """{"accuracy_by_group": {label: {accuracy, n_pairs, column, value}}, "pooled_groups": {column: values pooled}}
    with training's labels and pooling (pair_dataset.group_index); {} when no pair has a group column.

    "pooled_groups" appears only when a column had more than max_groups values; its pooled group's
    value is pair_dataset.OTHER_GROUP.
    """
    from btrm import pair_dataset

    index = pair_dataset.group_index(groups, columns, max_groups)
    if not index.labels:
        return {}
    n_pairs, n_correct = [0] * len(index.labels), [0] * len(index.labels)
    values_of: list[set[str]] = [set() for _ in index.labels]  # the values each group's pairs have
    for ok, pair_groups, members in zip(correct, groups, index.members, strict=True):
        for member in members:
            n_pairs[member] += 1
            n_correct[member] += int(ok)
            values_of[member].add(pair_groups[index.columns[member]])
    by_group = {}
    for member, (label, column) in enumerate(zip(index.labels, index.columns, strict=True)):
        by_group[label] = {
            "accuracy": n_correct[member] / n_pairs[member],
            "n_pairs": n_pairs[member],
            "column": column,
            # a pooled group holds several values
            "value": values_of[member].pop() if len(values_of[member]) == 1 else pair_dataset.OTHER_GROUP,
        }
    return {"accuracy_by_group": by_group, **({"pooled_groups": index.pooled} if index.pooled else {})}


def score_records(chosen, rejected, strengths, sources, subsets, groups) -> Iterator[dict]:
    """One record per pair, in data order; `source` is the file and row the pair came from."""
    for index, (c, r, s, source, subset, pair_groups) in enumerate(
        zip(chosen, rejected, strengths, sources, subsets, groups, strict=True)
    ):
        record = {
            "row": index + 1,
            "source": source,
            "chosen_reward": c,
            "rejected_reward": r,
            "margin": c - r,
            "correct": c > r,
            "preference_strength": s,
        }
        if subset is not None:
            record["subset"] = subset
        if pair_groups:
            record["groups"] = pair_groups
        yield record


def write_scores(path: Path, chosen, rejected, strengths, sources=None, subsets=None, groups=None) -> None:
    """Per-pair scores to `path`, atomically (btrm.atomic: temp file + rename, mode from the umask)."""
    n = len(chosen)
    write_records(
        path,
        score_records(chosen, rejected, strengths, sources or [None] * n, subsets or [None] * n, groups or [{}] * n),
    )


# ----------------------------------------------------------------------------- data sources


def hub_dataset_file(directory: Path, dataset_name: str, split: str, flag: str) -> Path:
    """A benchmark's split from the hub, written as Parquet into `directory` (fails fast offline)."""
    hint = f"If this machine is offline, copy the {split} split elsewhere and pass {flag} PATH (.parquet or .jsonl)."
    reason = preflight.hub_unreachable_reason()
    if reason is not None:
        raise rows.DataError(f"could not load {dataset_name} from the Hugging Face hub: {reason}. {hint}")
    try:
        from datasets import load_dataset

        dataset = load_dataset(dataset_name, split=split)
    except Exception as error:  # network and hub errors come in many types
        raise rows.DataError(
            f"could not load {dataset_name} (split {split!r}): {type(error).__name__}: {error}. {hint}"
        ) from None
    path = directory / f"{dataset_name.split('/')[-1]}-{split}.parquet"
    dataset.to_parquet(str(path))
    return path


def input_files(args: argparse.Namespace, directory: Path) -> list[str]:
    """The files to read: the paths given, or a hub download into `directory` for a flag given without PATH."""
    if args.rewardbench == FROM_HUB:
        return [str(hub_dataset_file(directory, REWARDBENCH_HUB_DATASET, REWARDBENCH_SPLIT, "--rewardbench"))]
    if args.rewardbench2 == FROM_HUB:
        return [str(hub_dataset_file(directory, REWARDBENCH2_HUB_DATASET, REWARDBENCH2_SPLIT, "--rewardbench2"))]
    if args.rewardbench is not None:
        return [args.rewardbench]
    if args.rewardbench2 is not None:
        return [args.rewardbench2]
    return list(args.rm_bench if args.rm_bench is not None else args.data)


def add_grouping_arguments(parser: argparse.ArgumentParser) -> None:
    """--group-by and --max-groups: trainer.yaml's data.group_columns and data.max_groups_per_column for evaluation."""
    parser.add_argument(
        "--group-by",
        nargs="*",
        metavar="COL",
        default=None,
        help="categorical columns to report accuracy by (--data, --rewardbench), as data.group_columns; "
        "none given: no groups (default: trainer.yaml's data.group_columns)",
    )
    parser.add_argument(
        "--max-groups",
        type=int,
        default=None,
        metavar="N",
        help="a column with more values reports its N-1 largest groups and pools the rest as <column>_other "
        "(default: trainer.yaml's data.max_groups_per_column)",
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True, help="HF model dir or verl global_step_N dir")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", nargs="+", help="pair file(s): .parquet, .jsonl or .json (layouts: see --format)")
    source.add_argument(
        "--rewardbench",
        nargs="?",
        const=FROM_HUB,
        default=None,
        metavar="PATH",
        help=f"RewardBench data: a local file, or without PATH {REWARDBENCH_HUB_DATASET} split {REWARDBENCH_SPLIT!r} from the hub",
    )
    source.add_argument(
        "--rewardbench2",
        nargs="?",
        const=FROM_HUB,
        default=None,
        metavar="PATH",
        help=f"RewardBench 2 data: a local file, or without PATH {REWARDBENCH2_HUB_DATASET} split {REWARDBENCH2_SPLIT!r} from the hub",
    )
    source.add_argument(
        "--rm-bench",
        nargs="+",
        metavar="PATH",
        help="RM-Bench data: total_dataset.json (rows carry `domain`) or per-domain files named after their domain",
    )
    parser.add_argument(
        "--output", type=Path, default=None, help="per-pair (per-prompt for benchmarks) scores (.jsonl)"
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        default=8,
        help="pairs per forward; conversations per forward with --rewardbench2 / --rm-bench (default: %(default)s)",
    )
    parser.add_argument("--device", default="auto", help="auto | cuda | cuda:N | cpu (default: %(default)s)")
    parser.add_argument("--dtype", choices=DTYPE_NAMES, default=None, help="default: bf16 on GPU, fp32 on CPU")
    parser.add_argument(
        "--max-length", type=int, default=None, help="truncate conversations as in training (left); default: no limit"
    )
    parser.add_argument(
        "--format",
        choices=rows.PAIR_FORMATS,
        default="auto",
        help="data layout, as data.format in trainer.yaml (default: %(default)s)",
    )
    parser.add_argument("--prompt-key", default="prompt")
    parser.add_argument("--chosen-key", default="chosen")
    parser.add_argument("--rejected-key", default="rejected")
    add_grouping_arguments(parser)
    parser.add_argument("--trust-remote-code", action="store_true")
    parser.add_argument("--no-progress", action="store_true")
    return parser.parse_args(argv)


def check_args(args: argparse.Namespace) -> None:
    """Refuse bad arguments before the model is loaded; raises rows.DataError with one line."""
    if args.batch_size < 1:
        raise rows.DataError(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.max_length is not None and args.max_length < 1:
        raise rows.DataError(f"--max-length must be at least 1, got {args.max_length}")
    if args.output is not None and args.output.is_dir():
        raise rows.DataError(
            f"--output {args.output} is a directory; expected a file path (e.g. {args.output / 'scores.jsonl'})"
        )
    local = {
        "--data": args.data,
        "--rewardbench": args.rewardbench,
        "--rewardbench2": args.rewardbench2,
        "--rm-bench": args.rm_bench,
    }
    for flag, files in local.items():
        if files is not None and files != FROM_HUB:
            rows.check_data_files(files, train_label=flag)
    whole_conversations = args.rewardbench2 is not None or args.rm_bench is not None
    if args.max_length is not None and whole_conversations:
        raise rows.DataError(
            "--max-length applies to --data and --rewardbench only; --rewardbench2 and --rm-bench score whole conversations"
        )
    if (args.group_by is not None or args.max_groups is not None) and whole_conversations:
        raise rows.DataError(
            "--group-by and --max-groups apply to --data and --rewardbench only; --rewardbench2 and --rm-bench report their own subsets or domains"
        )
    check_grouping(args)
    check_device(args.device)
    resolve_model_dir(args.model)


def check_device(device: str) -> None:
    """--device names a device this torch can use (a GPU one only where torch sees a GPU)."""
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", device):
        raise rows.DataError(f"--device {device}: expected auto, cuda, cuda:N or cpu")
    if device.startswith("cuda"):
        import torch

        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        index = int(device.split(":")[1]) if ":" in device else 0
        if index >= count:
            seen = f"{count} GPU{'s' * (count != 1)}" if count else "no GPU (torch.cuda.is_available() is False)"
            raise rows.DataError(f"--device {device}: torch sees {seen}; use --device auto or cpu")


def check_grouping(args: argparse.Namespace) -> None:
    """--group-by and --max-groups as trainer.yaml's rules take data.group_columns and data.max_groups_per_column."""
    if args.max_groups is not None and args.max_groups < 2:
        raise rows.DataError(
            f"--max-groups must be at least 2 (the largest group and the pooled rest), got {args.max_groups}"
        )
    for position, column in enumerate(args.group_by or []):
        if not column.strip():
            raise rows.DataError(f"--group-by: column {position + 1} is empty; expected a column name")
        if column in args.group_by[:position]:
            raise rows.DataError(f"--group-by lists {column!r} twice; each pair would count twice in its groups")


def weight_names(model_dir: Path) -> set[str]:
    """The tensor names of a safetensors checkpoint, from its index or its file's header (the format: a
    little-endian 8-byte header size, then a JSON header naming each tensor), without torch; empty without one."""
    from btrm import export

    index = model_dir / export.WEIGHTS_INDEX
    if index.is_file():
        return set(json.loads(index.read_text(encoding="utf-8"))["weight_map"])
    single = model_dir / export.SINGLE_WEIGHTS
    if not single.is_file():
        return set()
    with open(single, "rb") as weights:
        (size,) = struct.unpack("<Q", weights.read(8))
        return set(json.loads(weights.read(size))) - {"__metadata__"}


def check_reward_model(model_dir: Path) -> None:
    """Refuse, before loading it, a checkpoint with no value head: the base causal LM a run starts from is
    the easy mistake (its weights, read from the safetensors index or header, have no score.weight); torch is not imported."""
    from btrm import export

    names = weight_names(model_dir)
    if not names or any(name == "score.weight" or name.endswith(".score.weight") for name in names):
        return  # no weights here (the loader says what is missing), or a score head
    try:
        architecture = ", ".join(export.read_config(model_dir).get("architectures") or []) or "unknown architecture"
    except (export.ExportError, ValueError):
        architecture = "unknown architecture"
    kind = "a causal language model" if "lm_head.weight" in names or "CausalLM" in architecture else "a model"
    raise rows.DataError(
        f"--model {model_dir}: {kind} ({architecture}; no score.weight among its weights), not a reward model; "
        "pass a checkpoint bt_trainer.py wrote (checkpoints/<experiment>/global_step_N) or another reward model "
        "with a one-output score head (*ForSequenceClassification)"
    )


def load_model(args: argparse.Namespace):
    """(model, tokenizer, device): --model on --device in --dtype (default bf16 on a GPU, fp32 on the CPU)."""
    check_reward_model(resolve_model_dir(args.model))
    import torch

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype or ("bf16" if device == "cuda" else "fp32")]
    model, tokenizer = load_reward_model(
        resolve_model_dir(args.model), dtype=dtype, device=device, trust_remote_code=args.trust_remote_code
    )
    return model, tokenizer, device


def grouping(args: argparse.Namespace) -> tuple[list[str], int]:
    """(--group-by columns, --max-groups), each defaulting to trainer.yaml's data section."""
    defaults = None
    if args.group_by is None or args.max_groups is None:
        from btrm import schema

        defaults = schema.trainer_yaml_knobs()
    columns = list(defaults["data.group_columns"]) if args.group_by is None else list(args.group_by)
    return columns, defaults["data.max_groups_per_column"] if args.max_groups is None else args.max_groups


def pair_data_config(args: argparse.Namespace, group_columns: list[str]):
    """The data config PairDataset (and rows.read_pair_rows) reads: every key, as trainer.yaml's data section has them."""
    from omegaconf import OmegaConf

    layout = (
        REWARDBENCH_DATA_CONFIG
        if args.rewardbench
        else {
            "format": args.format,
            "prompt_key": args.prompt_key,
            "chosen_key": args.chosen_key,
            "rejected_key": args.rejected_key,
            "drop_identical_pairs": True,
        }
    )
    return OmegaConf.create(
        {
            **layout,
            "group_columns": group_columns,
            "apply_chat_template_kwargs": {},
            "max_length": args.max_length or sys.maxsize,
            "truncation": "left",
        }
    )


def check_pairs_readable(args: argparse.Namespace, data_files: list[str], data_config) -> None:
    """The files' rows read as training reads them (no tokenizer needed), and every --group-by column found
    in them, before the model loads: a file without the pair columns, or a column no file has, is one line."""
    read = rows.read_pair_rows(data_files, data_config, drop_identical=data_config.drop_identical_pairs)
    present = {column for row in read.rows for column in row.groups}
    for column in args.group_by or []:
        if column not in present:
            columns = sorted({c for name in data_files for c in rows.read_records(name)[0]})
            raise rows.DataError(
                f"--group-by {column}: no pair of {' '.join(data_files)} has this column (or a value in it); "
                f"the files' columns: {', '.join(columns)}; name one of them, or leave --group-by out"
            )


def evaluate(args: argparse.Namespace, data_files: list[str]) -> dict:
    group_columns, max_groups = grouping(args)
    data_config = pair_data_config(args, group_columns)
    check_pairs_readable(args, data_files, data_config)
    model, tokenizer, device = load_model(args)
    from btrm import pair_dataset

    dataset = pair_dataset.PairDataset(data_files, tokenizer, data_config)
    if len(dataset) == 0:
        raise rows.DataError(
            f"{' '.join(data_files)}: no pairs left to score ({dataset.identical_pairs_dropped} dropped: chosen equals rejected)"
        )
    subsets = dataset.subsets
    if args.rewardbench and any(s is None for s in subsets):
        raise rows.DataError(
            f"{' '.join(data_files)}: no 'subset' value in {dataset.sources[subsets.index(None)]}; "
            "RewardBench data has prompt, chosen, rejected and subset columns"
        )

    chosen, rejected = score_pairs(model, tokenizer, dataset, args.batch_size, device, progress=not args.no_progress)
    strengths = [dataset[i].preference_strength for i in range(len(dataset))]
    summary = summarize(chosen, rejected, strengths)
    correct = [c > r for c, r in zip(chosen, rejected, strict=True)]
    summary.update(group_accuracies(correct, dataset.groups, group_columns, max_groups))
    summary["truncated_pairs"] = int(dataset.truncated_pairs)
    summary["dropped_tokens"] = int(dataset.dropped_tokens)
    summary["identical_pairs_dropped"] = int(dataset.identical_pairs_dropped)
    summary["formats"] = {path: fmt.describe() for path, fmt in dataset.formats.items()}
    summary["read_report"] = dataset.read_report  # formats, then what reading left out (pairs, message keys)
    if args.rewardbench:
        summary["rewardbench"] = rewardbench_scores(correct, subsets)
    if args.output is not None:
        write_scores(args.output, chosen, rejected, strengths, dataset.sources, subsets, dataset.groups)
        summary["output"] = str(args.output)
    return summary


# ----------------------------------------------------------------------------- RewardBench 2 and RM-Bench


def read_items(files: list[str], make_item: Callable[[dict, str, str], Any]) -> list:
    """Every row of `files` as make_item(record, where, path) makes it (btrm.benchmarks checks the fields)."""
    items = []
    for path in files:
        _, locations, records = rows.read_records(path)
        items.extend(make_item(record, where, path) for where, record in zip(locations, records, strict=True))
    return items


def single_turn(prompt: str, completion: str) -> list[dict[str, str]]:
    """A string prompt and one completion as rewardbench formats them for a chat-template model: the
    prompt as the user turn, the completion as the assistant turn (rewardbench/utils.py
    `prepare_dialogue_from_tokenizer`: lines 886-897 for RewardBench 2's completions, the single-turn
    branch at lines 863-884 for pairs, which RM-Bench's scripts/utils.py `load_eval_dataset` calls)."""
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]


def score_conversations(
    model, tokenizer, conversations: list[list[dict[str, str]]], batch_size: int, device: str, progress: bool = True
) -> list[float]:
    """Rewards in input order, through batching.score (training's tokenization); conversations go in by
    length so that a batch pads little."""
    from tqdm import tqdm

    from btrm import batching

    order = sorted(range(len(conversations)), key=lambda i: sum(len(m["content"]) for m in conversations[i]))
    with tqdm(
        total=len(conversations), desc="scoring", unit="conversation", disable=not progress, file=sys.stderr
    ) as bar:
        sorted_rewards = batching.score(
            model, tokenizer, [conversations[i] for i in order], batch_size, device, progress=bar.update
        )
    rewards = [0.0] * len(conversations)
    for position, index in enumerate(order):
        rewards[index] = sorted_rewards[position]
    return rewards


def write_records(path: Path, records: Iterable[dict]) -> None:
    """One JSON line per record to `path`, atomically (btrm.atomic: temp file + rename, mode from the umask)."""
    with atomic.atomic_outputs([path]) as (temp,), open(temp, "w", encoding="utf-8") as out:
        for record in records:
            out.write(json.dumps(record) + "\n")


def evaluate_rewardbench2(args: argparse.Namespace, files: list[str]) -> dict:
    """RewardBench 2's per-subset scores and overall score (btrm.benchmarks.rewardbench2_scores)."""
    items = read_items(files, lambda record, where, _path: benchmarks.rewardbench2_item(record, where))
    model, tokenizer, device = load_model(args)
    conversations = [single_turn(item.prompt, completion) for item in items for completion in item.completions]
    rewards = iter(
        score_conversations(model, tokenizer, conversations, args.batch_size, device, progress=not args.no_progress)
    )
    scores = [[next(rewards) for _ in item.completions] for item in items]
    bench = benchmarks.rewardbench2_scores(items, scores)
    summary = {
        "benchmark": "rewardbench2",
        "n_prompts": len(items),
        "n_completions": len(conversations),
        "subsets": {name: values["score"] for name, values in bench["per_subset"].items()},
        **{key: bench[key] for key in ("score", "per_subset", "missing_subsets", "unknown_subsets")},
    }
    if args.output is not None:
        write_records(args.output, rewardbench2_records(items, scores, bench["results"]))
        summary["output"] = str(args.output)
    return summary


def rewardbench2_records(items, scores, results) -> Iterator[dict]:
    """The --output lines of RewardBench 2: one per prompt, every completion's reward (chosen first)."""
    for row, (item, item_scores, result) in enumerate(zip(items, scores, results, strict=True), start=1):
        yield {
            "row": row,
            "source": item.where,
            "id": item.id,
            "subset": item.subset,
            "num_chosen": item.num_chosen,
            "num_correct": item.num_correct,
            "scores": item_scores,
            "result": result,  # best-of-n: 1/k or 0; None for Ties, which is scored as a whole
        }


def evaluate_rm_bench(args: argparse.Namespace, files: list[str]) -> dict:
    """RM-Bench's per-domain hard / normal / easy accuracies and overall score (btrm.benchmarks.rm_bench_scores)."""
    items = read_items(
        files,
        lambda record, where, path: benchmarks.rm_bench_item(record, where, benchmarks.domain_from_file_name(path)),
    )
    model, tokenizer, device = load_model(args)
    conversations = [single_turn(item.prompt, text) for item in items for text in (*item.chosen, *item.rejected)]
    rewards = score_conversations(
        model, tokenizer, conversations, args.batch_size, device, progress=not args.no_progress
    )
    styles = len(benchmarks.RM_BENCH_STYLES)
    chosen = [rewards[2 * styles * k : 2 * styles * k + styles] for k in range(len(items))]
    rejected = [rewards[2 * styles * k + styles : 2 * styles * (k + 1)] for k in range(len(items))]
    bench = benchmarks.rm_bench_scores([item.domain for item in items], chosen, rejected)
    row_domains = Counter(item.domain for item in items)
    summary = {
        "benchmark": "rm-bench",
        "n_prompts": len(items),
        "n_completions": len(conversations),
        "row_domains": {d: row_domains[d] for d in benchmarks.RM_BENCH_ROW_DOMAINS if d in row_domains},
        **bench,
    }
    if args.output is not None:
        write_records(args.output, rm_bench_records(items, chosen, rejected))
        summary["output"] = str(args.output)
    return summary


def rm_bench_records(items, chosen, rejected) -> Iterator[dict]:
    """The --output lines of RM-Bench: one per prompt, the rewards of its responses in style order
    (concise, detailed plain, detailed markdown)."""
    for row, (item, chosen_scores, rejected_scores) in enumerate(zip(items, chosen, rejected, strict=True), start=1):
        yield {
            "row": row,
            "source": item.where,
            "id": item.id,
            "domain": item.domain,
            "chosen_scores": chosen_scores,
            "rejected_scores": rejected_scores,
        }


def print_report(summary: dict) -> None:
    for line in summary["read_report"].splitlines():
        print(f"read {line}")
    print(f"pairs: {summary['n_pairs']}   accuracy: {summary['accuracy']:.4f}   margin: {summary['margin_mean']:.4f}")
    print(f"chosen reward:   {summary['chosen_reward_mean']:.4f} +- {summary['chosen_reward_std']:.4f}")
    print(f"rejected reward: {summary['rejected_reward_mean']:.4f} +- {summary['rejected_reward_std']:.4f}")
    if summary["truncated_pairs"] or summary["identical_pairs_dropped"]:
        print(
            f"truncated pairs: {summary['truncated_pairs']} ({summary['dropped_tokens']} tokens dropped); "
            f"dropped (chosen equals rejected): {summary['identical_pairs_dropped']}"
        )
    for strength, values in summary.get("accuracy_by_abs_strength", {}).items():
        label = "no strength" if strength == "none" else f"|strength| {strength}"
        print(f"{label}: accuracy {values['accuracy']:.4f} over {values['n_pairs']} pairs")
    pooled = summary.get("pooled_groups", {})
    from btrm.pair_dataset import OTHER_GROUP

    for values in summary.get("accuracy_by_group", {}).values():
        column, value = values["column"], values["value"]
        others = f" ({pooled[column]} values pooled)" if column in pooled and value == OTHER_GROUP else ""
        print(f"{column}={value}: accuracy {values['accuracy']:.4f} over {values['n_pairs']} pairs{others}")
    bench = summary.get("rewardbench")
    if bench:
        print("RewardBench subsets:")
        for subset, values in bench["per_subset"].items():
            print(f"  {subset:<24} {values['n_correct']:>5}/{values['n_pairs']:<5} {100 * values['accuracy']:6.2f}")
        print("RewardBench sections (example-count weighted, rewardbench's counts):")
        for section, value in bench["sections"].items():
            shown = "  n/a (none of its subsets in the data)" if value is None else f"{100 * value:6.2f}"
            partial = (
                f"   ({len(bench['missing_subsets'][section])} of its subsets absent)"
                if value is not None and section in bench["missing_subsets"]
                else ""
            )
            print(f"  {section:<10} {shown}{partial}")
        print(
            "  Score      "
            + (
                "  n/a (a section is missing)"
                if bench["score"] is None
                else f"{100 * bench['score']:6.2f}   (mean of the four sections)"
            )
        )
        if bench["unknown_subsets"]:
            print(f"  not in any section: {', '.join(bench['unknown_subsets'])}")


def percent(value: float | None, scale: float = 100, digits: int = 2) -> str:
    return "n/a" if value is None else f"{scale * value:.{digits}f}"


def print_rewardbench2_report(summary: dict) -> None:
    print(f"RewardBench 2: {summary['n_prompts']} prompts, {summary['n_completions']} completions (scores in %)")
    print(f"  {'subset':<12} {'prompts':>7} {'score':>7}")
    for subset, values in summary["per_subset"].items():
        line = f"  {subset:<12} {values['n_prompts']:>7} {percent(values['score']):>7}"
        if benchmarks.is_ties(subset):
            line += (
                f"   (tied accuracy {percent(values['tied_accuracy'])}, ref accuracy {percent(values['ref_accuracy'])}, "
                f"correctness preferred {percent(values['correctness_preferred'])}, "
                f"hard {percent(values['correctness_preferred_hard'])}, margin term {percent(values['margin_term'], scale=1, digits=4)}; "
                f"{values['n_paired_prompts']} prompts with both ref and tied)"
            )
        print(line)
    missing = ", ".join(summary["missing_subsets"])
    note = (
        f"n/a (absent: {missing})"
        if summary["score"] is None
        else f"{percent(summary['score'])}   (mean of the six subsets)"
    )
    print(f"  {'Score':<12} {'':>7} {note}")
    if summary["unknown_subsets"]:
        print(f"  not one of the six (not in the score): {', '.join(summary['unknown_subsets'])}")


def print_rm_bench_report(summary: dict) -> None:
    rows_read = ", ".join(f"{domain} {count}" for domain, count in summary["row_domains"].items())
    print(
        f"RM-Bench: {summary['n_prompts']} prompts ({rows_read}), {summary['n_completions']} responses (accuracies in %)"
    )
    print(f"  {'domain':<8} {'prompts':>7} {'hard':>7} {'normal':>7} {'easy':>7} {'score':>7}")
    for domain, values in summary["domains"].items():
        if values is None:
            print(f"  {domain:<8} {0:>7} {'n/a':>7} {'n/a':>7} {'n/a':>7} {'n/a':>7}")
            continue
        figures = " ".join(f"{percent(values[key]):>7}" for key in ("hard", "normal", "easy", "score"))
        print(f"  {domain:<8} {values['n_prompts']:>7} {figures}")
    figures = " ".join(f"{percent(summary[key]):>7}" for key in ("hard", "normal", "easy", "score"))
    print(f"  {'overall':<8} {'':>7} {figures}   (means over chat, code, math, safety)")


REPORTS = {"rewardbench2": print_rewardbench2_report, "rm-bench": print_rm_bench_report}


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.rewardbench2 is not None:
        evaluate_source = evaluate_rewardbench2
    elif args.rm_bench is not None:
        evaluate_source = evaluate_rm_bench
    else:
        evaluate_source = evaluate
    try:
        check_args(args)
        with tempfile.TemporaryDirectory(prefix="evaluate-rm-") as directory:
            summary = evaluate_source(args, input_files(args, Path(directory)))
    except (rows.DataError, FileNotFoundError) as error:
        raise SystemExit(f"error: {in_this_scripts_terms(str(error))}") from None
    REPORTS.get(summary.get("benchmark"), print_report)(summary)
    print(json.dumps(summary))
    return summary


# The reading code (btrm.rows, btrm.pair_dataset) names trainer.yaml's data keys; here they are this script's options.
DATA_KEY_OPTIONS = {
    "data.chosen_key": "--chosen-key",
    "data.rejected_key": "--rejected-key",
    "data.prompt_key": "--prompt-key",
    "data.format": "--format",
    "data.group_columns": "--group-by",
    "data.max_groups_per_column": "--max-groups",
    "data.max_length": "--max-length",
}


def in_this_scripts_terms(message: str) -> str:
    """An error line with trainer.yaml's data keys replaced by the options that set them here
    (`data.format=text` becomes `--format text`)."""
    for key, option in DATA_KEY_OPTIONS.items():
        message = re.sub(rf"{re.escape(key)}=(\S)", rf"{option} \1", message).replace(key, option)
    return message


if __name__ == "__main__":
    main()

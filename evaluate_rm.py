#!/usr/bin/env python3
"""Evaluate a trained reward model on preference pairs, or on RewardBench.

    python evaluate_rm.py --model checkpoints/demo/global_step_74 --data data/demo/test.parquet --output scores.jsonl
    python evaluate_rm.py --model CKPT --rewardbench                      # allenai/reward-bench, split "filtered" (hub)
    python evaluate_rm.py --model CKPT --rewardbench reward-bench.parquet  # a local copy of it (offline)

--model is a Hugging Face directory (or a verl step directory holding `huggingface/`). --data reads
every layout training reads (rows.detect_pair_format: conversations as messages, an explicit
prompt with responses, plain text; .parquet / .jsonl / .json), read and formatted exactly as in
training (btrm.pair_dataset.PairDataset; messages keep their role and content only). Prints accuracy
overall and per |preference_strength| (pairs without a strength form the group "none"), reward
means and stds, how many pairs were truncated or dropped, and the read report (formats, dropped
pairs and message keys); writes per-pair scores with --output (.jsonl, atomically, mode from the
umask). The model is loaded by btrm.export.load_reward_model, as verl's reward worker loads it.

--rewardbench scores RewardBench data (`prompt`, `chosen`, `rejected` as text, `subset`) and adds
per-subset accuracy, the four section scores (Chat, Chat Hard, Safety, Reasoning) and their mean,
weighted as RewardBench weights them (see REWARDBENCH_EXAMPLE_COUNTS).
The last stdout line is one JSON object, for scripts. Bad input: one line on stderr, exit 1.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

from btrm import atomic, batching, pair_dataset, preflight, rows
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
FROM_HUB = "<hub>"  # --rewardbench given without a PATH
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


def score_lines(chosen, rejected, strengths, sources, subsets) -> Iterator[str]:
    """One JSON line per pair, in data order; `source` is the file and row the pair came from."""
    for index, (c, r, s, source, subset) in enumerate(zip(chosen, rejected, strengths, sources, subsets, strict=True)):
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
        yield json.dumps(record) + "\n"


def write_scores(path: Path, chosen, rejected, strengths, sources=None, subsets=None) -> None:
    """Per-pair scores to `path`, atomically (btrm.atomic: temp file + rename, mode from the umask)."""
    n = len(chosen)
    with atomic.atomic_outputs([path]) as (temp,), open(temp, "w", encoding="utf-8") as out:
        for line in score_lines(chosen, rejected, strengths, sources or [None] * n, subsets or [None] * n):
            out.write(line)


# ----------------------------------------------------------------------------- data sources


def hub_rewardbench_file(directory: Path) -> Path:
    """RewardBench's filtered split from the hub, written as Parquet into `directory` (fails fast offline)."""
    hint = "If this machine is offline, copy the filtered split elsewhere and pass --rewardbench PATH (.parquet or .jsonl)."
    reason = preflight.hub_unreachable_reason()
    if reason is not None:
        raise rows.DataError(f"could not load {REWARDBENCH_HUB_DATASET} from the Hugging Face hub: {reason}. {hint}")
    try:
        from datasets import load_dataset

        dataset = load_dataset(REWARDBENCH_HUB_DATASET, split=REWARDBENCH_SPLIT)
    except Exception as error:  # network and hub errors come in many types
        raise rows.DataError(
            f"could not load {REWARDBENCH_HUB_DATASET} (split {REWARDBENCH_SPLIT!r}): {type(error).__name__}: {error}. {hint}"
        ) from None
    path = directory / "reward-bench-filtered.parquet"
    dataset.to_parquet(str(path))
    return path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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
    parser.add_argument("--output", type=Path, default=None, help="per-pair scores (.jsonl)")
    parser.add_argument("--batch-size", type=int, default=8, help="pairs per forward (default: %(default)s)")
    parser.add_argument("--device", default="auto", help="auto | cuda | cpu (default: %(default)s)")
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
    if args.data is not None:
        rows.check_data_files(args.data, train_label="--data")
    elif args.rewardbench != FROM_HUB:
        rows.check_data_files(args.rewardbench, train_label="--rewardbench")
    resolve_model_dir(args.model)


def evaluate(args: argparse.Namespace, data_files: list[str]) -> dict:
    import torch
    from omegaconf import OmegaConf

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype or ("bf16" if device == "cuda" else "fp32")]
    model, tokenizer = load_reward_model(
        resolve_model_dir(args.model), dtype=dtype, device=device, trust_remote_code=args.trust_remote_code
    )
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
    # every key PairDataset reads, as trainer.yaml's data section has them
    data_config = OmegaConf.create(
        {**layout, "apply_chat_template_kwargs": {}, "max_length": args.max_length or sys.maxsize, "truncation": "left"}
    )
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
    summary["truncated_pairs"] = int(dataset.truncated_pairs)
    summary["dropped_tokens"] = int(dataset.dropped_tokens)
    summary["identical_pairs_dropped"] = int(dataset.identical_pairs_dropped)
    summary["formats"] = {path: fmt.describe() for path, fmt in dataset.formats.items()}
    summary["read_report"] = dataset.read_report  # formats, then what reading left out (pairs, message keys)
    if args.rewardbench:
        summary["rewardbench"] = rewardbench_scores([c > r for c, r in zip(chosen, rejected, strict=True)], subsets)
    if args.output is not None:
        write_scores(args.output, chosen, rejected, strengths, dataset.sources, subsets)
        summary["output"] = str(args.output)
    return summary


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


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    try:
        check_args(args)
        if args.rewardbench == FROM_HUB:
            with tempfile.TemporaryDirectory(prefix="rewardbench-") as directory:
                summary = evaluate(args, [str(hub_rewardbench_file(Path(directory)))])
        else:
            summary = evaluate(args, list(args.data) if args.data is not None else [args.rewardbench])
    except (rows.DataError, FileNotFoundError) as error:
        raise SystemExit(f"error: {error}") from None
    print_report(summary)
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()

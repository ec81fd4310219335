#!/usr/bin/env python3
"""Evaluate a trained reward model on preference pairs.

    python evaluate_rm.py --model checkpoints/demo/global_step_74 --data data/demo/test.parquet --output scores.jsonl

--model is a Hugging Face directory (or a verl step directory holding `huggingface/`). Conversations
are formatted exactly as in training (bt_data). Prints accuracy overall and per |preference_strength|
(when the column exists), reward means and stds; writes per-pair scores with --output (.jsonl).
The last stdout line is one JSON object, for scripts.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

import torch
from omegaconf import OmegaConf
from tqdm import tqdm

import bt_data

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def resolve_model_dir(path: Path) -> Path:
    if (path / "huggingface" / "config.json").is_file():
        return path / "huggingface"
    if (path / "config.json").is_file():
        return path
    raise FileNotFoundError(f"{path}: no config.json here or under huggingface/; expected a HF model or a verl global_step_N directory")


def load_reward_model(model_dir: Path, device: str, dtype: torch.dtype, trust_remote_code: bool = False):
    """The checkpoint as verl's RewardModelWorker loads it: AutoModelForTokenClassification, num_labels=1."""
    from transformers import AutoModelForTokenClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    model = AutoModelForTokenClassification.from_pretrained(model_dir, num_labels=1, dtype=dtype, trust_remote_code=trust_remote_code)
    return model.to(device).eval(), tokenizer


@torch.no_grad()
def score_pairs(model, tokenizer, dataset: bt_data.PairDataset, batch_size: int, device: str, progress: bool = True) -> tuple[list[float], list[float]]:
    """(chosen rewards, rejected rewards) in dataset order; pairs batched by length to waste little padding."""
    order = sorted(range(len(dataset)), key=lambda i: dataset[i].num_tokens)
    chosen, rejected = [0.0] * len(dataset), [0.0] * len(dataset)
    for start in tqdm(range(0, len(order), batch_size), desc="scoring", unit="batch", disable=not progress, file=sys.stderr):
        indices = order[start : start + batch_size]
        batch = bt_data.move_to(bt_data.collate_pairs([dataset[i] for i in indices], tokenizer.pad_token_id, packed=False), device)
        rewards = bt_data.compute_rewards(model, batch).tolist()
        for k, index in enumerate(indices):
            chosen[index], rejected[index] = rewards[k], rewards[len(indices) + k]
    return chosen, rejected


def summarize(chosen: list[float], rejected: list[float], strengths: list[int | None]) -> dict:
    correct = [c > r for c, r in zip(chosen, rejected)]
    summary = {
        "n_pairs": len(correct),
        "accuracy": sum(correct) / len(correct),
        "chosen_reward_mean": statistics.fmean(chosen),
        "chosen_reward_std": statistics.pstdev(chosen),
        "rejected_reward_mean": statistics.fmean(rejected),
        "rejected_reward_std": statistics.pstdev(rejected),
        "margin_mean": statistics.fmean(c - r for c, r in zip(chosen, rejected)),
    }
    if any(s is not None for s in strengths):
        by_strength: dict[int, list[bool]] = {}
        for ok, strength in zip(correct, strengths):
            by_strength.setdefault(abs(int(strength)), []).append(ok)
        summary["accuracy_by_abs_strength"] = {str(k): {"accuracy": sum(v) / len(v), "n_pairs": len(v)} for k, v in sorted(by_strength.items())}
    return summary


def write_scores(path: Path, chosen, rejected, strengths) -> None:
    """One JSON line per pair, in data order; temp file + rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as out:
            for index, (c, r, s) in enumerate(zip(chosen, rejected, strengths)):
                out.write(json.dumps({"row": index + 1, "chosen_reward": c, "rejected_reward": r, "margin": c - r,
                                      "correct": c > r, "preference_strength": s}) + "\n")
        os.replace(temp, path)
    finally:
        Path(temp).unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True, help="HF model dir or verl global_step_N dir")
    parser.add_argument("--data", nargs="+", required=True, help="Parquet file(s) with chosen/rejected columns")
    parser.add_argument("--output", type=Path, default=None, help="per-pair scores (.jsonl)")
    parser.add_argument("--batch-size", type=int, default=8, help="pairs per forward (default: %(default)s)")
    parser.add_argument("--device", default="auto", help="auto | cuda | cpu (default: %(default)s)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: bf16 on GPU, fp32 on CPU")
    parser.add_argument("--max-length", type=int, default=None, help="truncate conversations as in training (left); default: no limit")
    parser.add_argument("--chosen-key", default="chosen")
    parser.add_argument("--rejected-key", default="rejected")
    parser.add_argument("--trust-remote-code", action="store_true")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    dtype = DTYPES[args.dtype or ("bf16" if device == "cuda" else "fp32")]
    model, tokenizer = load_reward_model(resolve_model_dir(args.model), device, dtype, args.trust_remote_code)
    data_config = OmegaConf.create({
        "chosen_key": args.chosen_key, "rejected_key": args.rejected_key, "apply_chat_template_kwargs": {},
        "max_length": args.max_length or sys.maxsize, "truncation": "left",
    })
    dataset = bt_data.PairDataset(args.data, tokenizer, data_config)
    if len(dataset) == 0:
        raise SystemExit(f"error: {args.data}: no pairs")
    chosen, rejected = score_pairs(model, tokenizer, dataset, args.batch_size, device, progress=not args.no_progress)
    strengths = [p.preference_strength for p in dataset.pairs]
    summary = summarize(chosen, rejected, strengths)
    if args.output is not None:
        write_scores(args.output, chosen, rejected, strengths)
        summary["output"] = str(args.output)

    print(f"pairs: {summary['n_pairs']}   accuracy: {summary['accuracy']:.4f}   margin: {summary['margin_mean']:.4f}")
    print(f"chosen reward:   {summary['chosen_reward_mean']:.4f} +- {summary['chosen_reward_std']:.4f}")
    print(f"rejected reward: {summary['rejected_reward_mean']:.4f} +- {summary['rejected_reward_std']:.4f}")
    for strength, values in summary.get("accuracy_by_abs_strength", {}).items():
        print(f"|strength| {strength}: accuracy {values['accuracy']:.4f} over {values['n_pairs']} pairs")
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Throughput of BT training steps: pad-to-max_length vs per-batch padding vs packing vs a shared prompt.

    python -m bench.bench_throughput                         # CPU, cpu-dense random Qwen3 (hidden 256, 4 layers)
    python -m bench.bench_throughput --device cuda --model qwen3-1.7b --pairs 64   # GPU: real sizes, random init, MFU

Trains the same model on the same pairs under
  (a) pad_to_max:  every sequence padded to max_length (4096, as the seed trainer did), fixed micro-batches
  (b) batch_pad:   padded to the longest sequence of each fixed-size micro-batch
  (c) packed:      the conversations of whole pairs concatenated into one row per micro-batch, formed
                   by a token budget (batching.token_budget_micro_batches), no padding; attention per
                   conversation (btrm.attention: varlen_attn on CUDA, per-segment sdpa elsewhere)
  (d) shared:      packed, each pair as [shared prompt | chosen response | rejected response], the
                   prompt computed once (btrm.batching's `shared` layout; the budget counts computed tokens)
each in a fresh subprocess (so peak memory is its own), all through btrm.batching / btrm.attention / bt_loss,
the functions the trainer calls. Prints a table and, last, one JSON line for scripts. "tok/pair" is
the tokens the model computes per pair (padding included, a shared prompt once).

Lengths are drawn to resemble HelpSteer2 (HelpSteer2 paper: prompt 712.6 +- 877.8 characters,
response 1,492.6 +- 1,065.7 characters; at ~4 characters per token, prompt ~180 +- 220 tokens and
response ~370 +- 270 tokens, log-normal, so a pair is about 1.1k tokens in all). Token ids are random:
throughput does not depend on them. MFU counts the FLOPs of real tokens only, for a reward model
(no lm_head): 6 * non-embedding params * tokens + causal attention 6 * layers * q_dim * len^2.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

MODES = ("pad_to_max", "batch_pad", "packed", "shared")
PACKED_MODES = ("packed", "shared")  # one row per micro-batch, attended per segment
MODEL_CONFIGS = {
    # the CPU default: dense compute (projections, MLP) dominates as in real models, not Python overhead
    "cpu-dense": {
        "hidden_size": 256,
        "intermediate_size": 768,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 64,
        "vocab_size": 2048,
    },
    # smaller and quicker; attention and per-call overhead weigh more here than in real models
    "cpu-small": {
        "hidden_size": 128,
        "intermediate_size": 384,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 32,
        "vocab_size": 2048,
    },
    # for memory comparisons (full vs LoRA) on CPU: ~43M parameters, a real-sized vocabulary share
    "cpu-medium": {
        "hidden_size": 512,
        "intermediate_size": 1536,
        "num_hidden_layers": 8,
        "num_attention_heads": 8,
        "num_key_value_heads": 4,
        "head_dim": 64,
        "vocab_size": 32000,
    },
    "qwen3-1.7b": {
        "hidden_size": 2048,
        "intermediate_size": 6144,
        "num_hidden_layers": 28,
        "num_attention_heads": 16,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "vocab_size": 151936,
    },
    "qwen3-4b": {
        "hidden_size": 2560,
        "intermediate_size": 9728,
        "num_hidden_layers": 36,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "vocab_size": 151936,
    },
}
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12}
PROMPT_TOKENS, RESPONSE_TOKENS = (180, 220), (370, 270)  # mean, std


def lognormal(rng: random.Random, mean: float, std: float) -> float:
    sigma2 = math.log(1 + (std / mean) ** 2)
    return rng.lognormvariate(math.log(mean) - sigma2 / 2, math.sqrt(sigma2))


def helpsteer2_like_pairs(n_pairs: int, vocab_size: int, max_length: int, seed: int = 0):
    """TokenizedPairs with a shared prompt and two responses, lengths as documented above, truncated as the trainer does (left)."""
    from btrm.pair_dataset import TokenizedPair, truncate_pair

    rng = random.Random(seed)
    pairs = []
    for number in range(n_pairs):
        prompt = [rng.randrange(3, vocab_size) for _ in range(max(8, int(lognormal(rng, *PROMPT_TOKENS))))]
        responses = [
            [rng.randrange(3, vocab_size) for _ in range(max(4, int(lognormal(rng, *RESPONSE_TOKENS))))]
            for _ in range(2)
        ]
        truncated = truncate_pair(prompt + responses[0], prompt + responses[1], max_length, "left", f"pair {number}")
        pairs.append(TokenizedPair(truncated.chosen, truncated.rejected))
    return pairs


def build_model(name: str, device: str, attn: str, segment_attention: bool = False):
    """Random-init value-head Qwen3; with segment_attention, packed rows are attended per segment (btrm.attention)."""
    import torch
    from transformers import Qwen3Config, Qwen3ForTokenClassification

    from btrm import attention

    config = Qwen3Config(**MODEL_CONFIGS[name], num_labels=1, max_position_embeddings=40960, tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen3ForTokenClassification._from_config(config, attn_implementation=attn, dtype=torch.float32)
    if segment_attention:
        attention.enable_segment_attention(model)
    return model


def reward_model_flops(model, sequence_lengths) -> float:
    """Training FLOPs of the real tokens: dense 6*N*T (N without embeddings) + causal attention 6*L*q_dim*len^2."""
    config = model.config
    dense = sum(p.numel() for n, p in model.named_parameters() if "embed_tokens" not in n)
    q_dim = config.num_attention_heads * config.head_dim
    return sum(6 * dense * n + 6 * config.num_hidden_layers * q_dim * n * n for n in sequence_lengths)


def plan(mode: str, pairs, args) -> list[list[int]]:
    """Micro-batches as the trainer forms them: a token budget of computed tokens for the packed modes."""
    from btrm import batching

    if mode in PACKED_MODES:
        return batching.plan_micro_batches(pairs, args.max_tokens, None, layout=mode)
    return batching.fixed_size_micro_batches(len(pairs), args.micro_batch_pairs)


def collate(mode: str, micro, pad_token_id: int, max_length: int):
    from btrm import batching

    if mode == "pad_to_max":  # the seed's layout: every row is max_length long
        sequences_padded = batching.collate_padded(
            batching.pair_sequences(micro) + [[pad_token_id] * max_length], pad_token_id
        )
        return {k: v[:-1] for k, v in sequences_padded.items()}
    return batching.collate_pairs(micro, pad_token_id, "padded" if mode == "batch_pad" else mode)


def run_worker(args) -> dict:
    """One mode, in its own process: warm-up step, then timed optimizer steps over all pairs."""
    import torch

    from bt_loss import bradley_terry_loss
    from btrm import batching

    torch.set_num_threads(args.threads or torch.get_num_threads())
    device = args.device
    model = build_model(args.model, device, args.attn, segment_attention=args.mode in PACKED_MODES)
    if args.lora_rank > 0:  # as the trainer does with model.lora_rank (btrm.lora): adapters + score head train
        from btrm import lora

        settings = lora.resolve_settings(model, args.lora_rank, 2 * args.lora_rank, "all-linear")
        model = lora.add_lora(model, settings, base_dtype=torch.bfloat16 if args.lora_base_dtype == "bf16" else None)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    pairs = helpsteer2_like_pairs(args.pairs, model.config.vocab_size, args.max_length, seed=args.seed)
    steps = [pairs[i : i + args.step_pairs] for i in range(0, len(pairs), args.step_pairs)]
    # bf16 compute on GPU; on CPU also under a bf16 LoRA backbone (the trainer's FSDP2 casts it to the compute dtype instead)
    autocast = torch.autocast(
        device_type=device,
        dtype=torch.bfloat16,
        enabled=device == "cuda" or (args.lora_rank > 0 and args.lora_base_dtype == "bf16"),
    )

    def train_step(step_pairs):
        real = computed = 0
        optimizer.zero_grad(set_to_none=True)
        for indices in plan(args.mode, step_pairs, args):
            micro = [step_pairs[i] for i in indices]
            batch = batching.move_to(collate(args.mode, micro, 0, args.max_length), device)
            with autocast:
                rewards = batching.compute_rewards(model, batch)
            loss, _ = bradley_terry_loss(rewards[: len(micro)], rewards[len(micro) :], normalizer=len(step_pairs))
            loss.backward()
            counts = batching.token_counts(batch)
            real, computed = real + counts.real, computed + counts.computed
        optimizer.step()
        return real, computed

    def synchronize():
        if device == "cuda":
            torch.cuda.synchronize()

    train_step(steps[0])  # warm-up: allocator, kernels, lazy init
    synchronize()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    real = computed = 0
    start = time.perf_counter()
    for step_pairs in steps:
        r, c = train_step(step_pairs)
        real, computed = real + r, computed + c
    synchronize()
    elapsed = time.perf_counter() - start
    lengths = [len(s) for p in pairs for s in (p.chosen, p.rejected)]
    result = {
        "mode": args.mode,
        "pairs": len(pairs),
        "seconds": elapsed,
        "pairs_per_s": len(pairs) / elapsed,
        "real_tokens_per_s": real / elapsed,
        "real_token_share": real / computed,
        "computed_tokens": computed,
        "real_tokens": real,
        "tokens_per_pair": computed / len(pairs),
        "flops_per_s": reward_model_flops(model, lengths) / elapsed,
    }
    parameters = list(model.parameters())
    result.update(
        {  # what training holds besides activations: weights, gradients, AdamW's two moments
            "params": sum(p.numel() for p in parameters),
            "trainable_params": sum(p.numel() for p in parameters if p.requires_grad),
            "weights_gib": sum(p.numel() * p.element_size() for p in parameters) / 2**30,
            "grads_gib": sum(p.grad.numel() * p.grad.element_size() for p in parameters if p.grad is not None) / 2**30,
            "optimizer_state_gib": sum(
                t.numel() * t.element_size()
                for state in optimizer.state.values()
                for t in state.values()
                if torch.is_tensor(t) and t.dim() > 0
            )
            / 2**30,
        }
    )
    if device == "cuda":
        result["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    else:  # ru_maxrss is KiB on Linux: the whole process, model and Python included
        result["peak_memory_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return result


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument(
        "--model", choices=sorted(MODEL_CONFIGS), default=None, help="default: cpu-dense on CPU, qwen3-1.7b on GPU"
    )
    parser.add_argument(
        "--attn",
        default="sdpa",
        help="attention of the padded modes (sdpa | eager | flash_attention_2 | flex_attention); packed / shared use btrm.attention",
    )
    parser.add_argument("--pairs", type=int, default=16, help="timed pairs per mode")
    parser.add_argument("--step-pairs", type=int, default=8, help="pairs per optimizer step")
    parser.add_argument(
        "--micro-batch-pairs",
        type=int,
        default=1,
        help="pairs per micro-batch for pad_to_max and batch_pad (seed default: 1)",
    )
    parser.add_argument("--max-length", type=int, default=4096, help="max_length of pad_to_max (seed: 4096)")
    parser.add_argument(
        "--max-tokens",
        type=int,
        default=None,
        help="token budget (computed tokens) per packed / shared micro-batch (default: 4096 on CPU, 16384 on GPU)",
    )
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--threads", type=int, default=0, help="torch threads per worker (0: torch's default)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--peak-flops",
        type=float,
        default=PEAK_BF16_FLOPS["H200"],
        help="for MFU on GPU (H100/H200 dense bf16: 989e12)",
    )
    parser.add_argument(
        "--lora-rank",
        type=int,
        default=0,
        help="> 0: LoRA of this rank on every block linear layer (alpha 2x rank) + the score head, as model.lora_rank",
    )
    parser.add_argument(
        "--lora-base-dtype",
        choices=("bf16", "fp32"),
        default="bf16",
        help="with --lora-rank: dtype of the frozen backbone (model.lora_base_dtype)",
    )
    parser.add_argument("--worker", choices=MODES, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.model = args.model or ("qwen3-1.7b" if args.device == "cuda" else "cpu-dense")
    args.max_tokens = args.max_tokens or (16384 if args.device == "cuda" else 4096)
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.worker:
        args.mode = args.worker
        print(json.dumps(run_worker(args)))
        return None
    passthrough = [a for a in (argv if argv is not None else sys.argv[1:]) if a != "--modes"]
    passthrough = [a for a in passthrough if a not in MODES]
    results = {}
    for mode in args.modes:
        print(f"running {mode} ...", file=sys.stderr, flush=True)
        out = subprocess.run(
            [sys.executable, "-m", "bench.bench_throughput", *passthrough, "--worker", mode],
            capture_output=True,
            text=True,
            cwd=REPO,
        )
        if out.returncode != 0:
            raise SystemExit(f"{mode} failed:\n{out.stderr[-4000:]}")
        results[mode] = json.loads(out.stdout.strip().splitlines()[-1])

    print(summary_table(results, args))
    summary = summarize(results, args)
    print(json.dumps(summary))
    return summary


def speedup(results: dict, mode: str, baseline: str) -> float | None:
    if mode in results and baseline in results:
        return results[mode]["pairs_per_s"] / results[baseline]["pairs_per_s"]
    return None


def summary_table(results: dict, args) -> str:
    lines = [
        f"model {args.model} on {args.device}, {args.pairs} pairs, {args.step_pairs} pairs/step; pad_to_max/batch_pad: "
        f"{args.micro_batch_pairs} pair(s)/micro-batch; packed/shared: {args.max_tokens} computed tokens/micro-batch; max_length {args.max_length}"
    ]
    if getattr(args, "lora_rank", 0):
        lines[0] += f"; LoRA rank {args.lora_rank}, frozen backbone in {args.lora_base_dtype}" + (
            " (bf16 autocast)" if args.device == "cpu" and args.lora_base_dtype == "bf16" else ""
        )
    header = (
        f"{'mode':<11} {'pairs/s':>9} {'tok/pair':>9} {'real share':>10} {'peak GiB':>9} {'vs (a)':>7} {'vs (b)':>7} "
        f"{'trainable':>10} {'weights GiB':>11} {'grads GiB':>9} {'Adam GiB':>8}"
    )
    lines.append(header + (f" {'MFU':>6}" if args.device == "cuda" else ""))
    for mode, r in results.items():
        ratios = [speedup(results, mode, base) for base in ("pad_to_max", "batch_pad")]
        line = (
            f"{mode:<11} {r['pairs_per_s']:>9.3f} {r['tokens_per_pair']:>9.0f} {r['real_token_share']:>10.3f} {r['peak_memory_gib']:>9.2f} "
            + " ".join(f"{x:>6.2f}x" if x is not None else f"{'n/a':>7}" for x in ratios)
            + f" {r['trainable_params'] / r['params']:>10.2%} {r['weights_gib']:>11.3f} {r['grads_gib']:>9.3f} {r['optimizer_state_gib']:>8.3f}"
        )
        if args.device == "cuda":
            line += f" {r['flops_per_s'] / args.peak_flops:>6.1%}"
        lines.append(line)
    return "\n".join(lines)


def summarize(results: dict, args) -> dict:
    """The last JSON line: per-mode figures, then the ratios the project tracks."""
    summary = {
        "device": args.device,
        "model": args.model,
        "pairs": args.pairs,
        "max_tokens": args.max_tokens,
        "lora_rank": args.lora_rank,
        **{
            f"{mode}_{k}": r[k]
            for mode, r in results.items()
            for k in (
                "pairs_per_s",
                "tokens_per_pair",
                "real_token_share",
                "peak_memory_gib",
                "params",
                "trainable_params",
                "weights_gib",
                "grads_gib",
                "optimizer_state_gib",
            )
        },
    }
    if "packed" in results:
        summary["packed_real_token_share"] = results["packed"]["real_token_share"]
    ratios = {
        "packed_speedup_vs_pad_to_max": speedup(results, "packed", "pad_to_max"),
        "packed_speedup_vs_batch_pad": speedup(results, "packed", "batch_pad"),
        "shared_speedup_vs_batch_pad": speedup(results, "shared", "batch_pad"),
    }
    summary.update({k: v for k, v in ratios.items() if v is not None})
    if "shared" in results and "packed" in results:  # computed tokens per pair with the prompt once / without sharing
        summary["shared_tokens_per_pair_ratio"] = (
            results["shared"]["tokens_per_pair"] / results["packed"]["tokens_per_pair"]
        )
    if args.device == "cuda":
        summary.update({f"{mode}_mfu": r["flops_per_s"] / args.peak_flops for mode, r in results.items()})
    return summary


if __name__ == "__main__":
    main()

"""Parts `throughput` and `throughput_large`: bench/bench_throughput.py's run_worker (imported; one subprocess per
model, a fresh model per mode) for random Qwen3-shaped models (real dimensions, every layer) at the planner's
largest fitting budget capped by SIZES' budget_cap: packed, shared, padded (batch_pad); pairs/s, real tokens/s,
MFU, peak memory allocated and reserved. The worker prints one JSON line per mode as each finishes; the main
process prints it and rewrites the results folder, so a command cut off keeps the modes done."""

from __future__ import annotations

import json

from bench.gpu_check.common import GIB, Context, error_line, pairs_within, run_worker_command
from bench.gpu_check.sizes import MIN_PART_S

PROGRESS = '{"progress": '  # how a progress line starts: one finished mode, passed up to the main process


def part_throughput(ctx: Context) -> dict:
    """The smaller models (SIZES' throughput_models), first after the smoke test."""
    return throughput_of(ctx, ctx.sizes["throughput_models"], ctx.sizes["throughput_modes"])


def part_throughput_large(ctx: Context) -> dict:
    """The larger models (SIZES' large_throughput_models), last: in whatever time is left."""
    return throughput_of(ctx, ctx.sizes["large_throughput_models"], ctx.sizes["large_throughput_modes"])


def pass_progress_up(line: str) -> None:
    if line.startswith(PROGRESS):
        print(line, flush=True)


def throughput_of(ctx: Context, models: list[str], modes: list[str]) -> dict:
    """bench_throughput's worker for each mode at the planned budget; one subprocess per model."""
    from bench import bench_throughput as bench

    sizes = ctx.sizes
    result: dict = {"models": {}}
    for model in models:
        budget = ctx.budget(model, sizes["budget_cap"])
        pool = bench.helpsteer2_like_pairs(
            budget["budget"] // 600 + 8, bench.MODEL_CONFIGS[model]["vocab_size"], sizes["max_length"], seed=0
        )
        spec = {
            "model": model,
            "modes": modes,
            # one step of pairs filling about one packed micro-batch; bench draws the same pairs (same seed and order)
            "pairs": len(pairs_within(pool, budget["budget"], "packed")),
            # padded micro-batches hold as many pairs as fit the budget even when padded to max_length
            "micro_batch_pairs": max(1, budget["budget"] // (2 * sizes["max_length"])),
            "budget": budget["budget"],
        }
        entry = {**budget, "step_pairs": spec["pairs"], "batch_pad_micro_batch_pairs": spec["micro_batch_pairs"]}
        if ctx.remaining() < MIN_PART_S:
            entry["runs"] = {mode: {"skipped": "out of time"} for mode in spec["modes"]}
        else:
            timeout = min(sizes["throughput_model_s"], ctx.remaining())
            answer = run_worker_command(
                ctx, "throughput-model", f"throughput-{model}", timeout, spec, on_line=pass_progress_up
            )
            entry.update(answer)
        result["models"][model] = entry
        runs = entry.get("runs", {})
        for mode in ("packed", "shared"):
            if "pairs_per_s" in runs.get(mode, {}) and "pairs_per_s" in runs.get("batch_pad", {}):
                runs[mode]["speedup_vs_batch_pad"] = runs[mode]["pairs_per_s"] / runs["batch_pad"]["pairs_per_s"]
    return result


def worker_throughput_model(ctx: Context, spec: dict) -> dict:
    """bench_throughput's run_worker for each mode in turn (fresh model each): warm-up step, then one timed step.

    One process per model rather than per run saves the start-ups; an exception (an OOM included) costs only its
    mode, and peak memory stays per run: bench resets the peak after its warm-up, and the cache is emptied between.
    """
    import gc

    import torch

    from bench import bench_throughput as bench

    cuda = ctx.device == "cuda"
    name = torch.cuda.get_device_name(0) if cuda else "cpu"
    peak = next((flops for gpu, flops in bench.PEAK_BF16_FLOPS.items() if gpu in name), None)
    runs: dict = {}
    for mode in spec["modes"]:
        argv = ["--device", ctx.device, "--model", spec["model"], "--pairs", str(spec["pairs"])]
        argv += ["--step-pairs", str(spec["pairs"]), "--micro-batch-pairs", str(spec["micro_batch_pairs"])]
        argv += ["--max-length", str(ctx.sizes["max_length"]), "--max-tokens", str(spec["budget"])]
        args = bench.parse_args(argv)
        args.mode = mode
        try:
            run = bench.run_worker(args)
        except Exception as error:
            runs[mode] = {"error": error_line(error)}
        else:
            keep = ("pairs_per_s", "real_tokens_per_s", "tokens_per_pair", "real_token_share", "seconds", "params")
            runs[mode] = {k: run[k] for k in keep}
            runs[mode].update(
                flops_per_s=run["flops_per_s"],
                mfu=run["flops_per_s"] / peak if peak else None,  # dense bf16 peak: H100 / H200 only
                peak_memory_gib=run["peak_memory_gib"],  # CUDA: max allocated in the timed step; CPU: process RSS
            )
            if cuda:
                runs[mode]["peak_reserved_gib"] = torch.cuda.max_memory_reserved() / GIB
        print(PROGRESS + json.dumps({"model": spec["model"], "mode": mode, **runs[mode]}) + "}", flush=True)
        gc.collect()  # the run's model and optimizer, before the next one is built
        if cuda:
            torch.cuda.empty_cache()
    return {"runs": runs}

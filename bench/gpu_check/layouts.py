"""Part `layouts`: btrm.batching.check_layout of the packed and shared layouts against padded on a random Qwen3
(GPU: Qwen3-8B's attention and MLP sizes, GQA 32/8 heads, 4 layers) in the trainer's compute dtype (on CUDA + bf16
the segments go through varlen_attn), and the fwd+bwd time of each layout."""

from __future__ import annotations

import statistics
import time

from bench.gpu_check.common import GIB, Context, error_line, torch_runtime


def part_layouts(ctx: Context) -> dict:
    """(a) packed and shared rewards against padded (btrm.batching.check_layout) and fwd+bwd time per layout."""
    import torch

    from bench import bench_throughput as bench
    from bt_loss import bradley_terry_loss
    from btrm import attention, batching

    sizes, device = ctx.sizes, ctx.device
    dtype = torch.bfloat16 if device == "cuda" else torch.float32  # the trainer's compute dtype on each device
    bench.MODEL_CONFIGS["gpu-check-layouts"] = sizes["layout_model"]  # bench.build_model takes a registered name
    model = bench.build_model("gpu-check-layouts", device, "sdpa", segment_attention=True).to(dtype)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    pairs = bench.helpsteer2_like_pairs(sizes["layout_pairs"], model.config.vocab_size, sizes["max_length"], seed=0)
    # btrm.attention's own test of which branch a query takes (read defensively: that module is being reworked)
    on_varlen = getattr(attention, "runs_on_varlen_kernel", None)
    probe = torch.empty(1, device=device, dtype=dtype)
    kernel = "unknown" if on_varlen is None else "varlen_attn" if on_varlen(probe) else "sdpa per segment"
    result = {
        "torch_runtime": torch_runtime(device),
        "model": dict(sizes["layout_model"]),
        "dtype": str(dtype).removeprefix("torch."),
        "segment_kernel": kernel,
        "pairs": len(pairs),
        "conversation_tokens": sum(p.num_tokens for p in pairs),
        "layouts": {},
    }

    def synchronize():
        if device == "cuda":
            torch.cuda.synchronize()

    def fwd_bwd(batch) -> float:
        model.zero_grad(set_to_none=True)
        synchronize()
        start = time.perf_counter()
        rewards = batching.compute_rewards(model, batch)
        loss, _ = bradley_terry_loss(rewards[: len(pairs)], rewards[len(pairs) :], normalizer=len(pairs))
        loss.backward()
        synchronize()
        return time.perf_counter() - start

    for layout in batching.LAYOUTS:
        entry: dict = {}
        try:
            if layout != "padded":
                check = batching.check_layout(model, pairs, 0, layout, device, dtype)
                entry.update(
                    max_difference=check.max_difference,
                    tolerance=check.tolerance,
                    ratio=check.ratio,
                    within_tolerance=bool(check.ratio <= 1.0),
                )
            batch = batching.move_to(batching.collate_pairs(pairs, 0, layout), device)
            model.train()
            fwd_bwd(batch)  # warm-up: kernels, allocator
            times = [fwd_bwd(batch) for _ in range(sizes["layout_repeats"])]
            entry.update(
                computed_tokens=batching.token_counts(batch).computed, fwd_bwd_ms=1e3 * statistics.median(times)
            )
        except Exception as error:
            entry["error"] = error_line(error)
        result["layouts"][layout] = entry
    padded_ms = result["layouts"]["padded"].get("fwd_bwd_ms")
    for layout in ("packed", "shared"):
        ms = result["layouts"][layout].get("fwd_bwd_ms")
        if padded_ms and ms:
            result["layouts"][layout]["speedup_vs_padded"] = padded_ms / ms
    if device == "cuda":
        result["peak_memory_gib"] = torch.cuda.max_memory_allocated() / GIB
    return result

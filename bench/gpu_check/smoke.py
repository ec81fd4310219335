"""Part `smoke`, in seconds, before anything long: do the imports work, does torchrun take the launcher's options,
and does torch's varlen_attn compute what the shared layout needs?

- imports, in a fresh interpreter each (what a rank imports first): tensordict, verl.trainer.fsdp_sft_trainer,
  bt_trainer; each import's time or its error;
- torchrun: which of the options the launcher passes this torch's parser has, and the arguments
  btrm.launcher.fitted_to_torchrun leaves of run_bt_rm.sh's;
- the kernel probe: torch.nn.attention.varlen.varlen_attn (causal, window_size=(-1, 0)) on segments with fewer
  queries than keys (a rejected response reading prompt + response) and square ones, GQA (SIZES' probe heads),
  bf16, against sdpa in fp32 with an explicit bottom-right-aligned causal mask: forward outputs and input
  gradients, and the same against a top-left-aligned mask (which alignment the kernel uses). On CPU (--dry) the
  kernel under test is a per-segment sdpa stand-in with varlen_attn's signature: the probe's own check.
"""

from __future__ import annotations

import inspect
import json
import subprocess
import sys
import time

from bench.gpu_check.common import REPO, error_line

IMPORTS = ("tensordict", "verl.trainer.fsdp_sft_trainer", "bt_trainer")
# What run_bt_rm.sh and the launcher pass to torchrun; --shutdown-timeout came after torch 2.11.
TORCHRUN_OPTIONS = ("--shutdown-timeout", "--signals-to-handle", "--max-restarts", "--nproc_per_node")


def part_smoke(ctx) -> dict:
    return {"imports": check_imports(ctx), "torchrun": check_torchrun(), "kernel": probe_kernel(ctx)}


# One fresh interpreter imports each module in turn (what a rank imports first): each import's own seconds, and the
# first failure's traceback (the later imports would fail the same way).
IMPORT_SCRIPT = """
import json, sys, time, traceback
for module in sys.argv[1:]:
    start = time.monotonic()
    try:
        __import__(module)
    except BaseException:
        print(json.dumps({"module": module, "error": traceback.format_exc()[-1500:]}), flush=True)
        break
    print(json.dumps({"module": module, "seconds": round(time.monotonic() - start, 1)}), flush=True)
"""


def check_imports(ctx) -> dict:
    done = subprocess.run(
        [sys.executable, "-c", IMPORT_SCRIPT, *IMPORTS],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=max(5.0, ctx.remaining()),
    )
    results = {module: {"skipped": "an earlier import failed"} for module in IMPORTS}
    for line in done.stdout.splitlines():
        if line.startswith("{"):
            record = json.loads(line)
            results[record.pop("module")] = record
    if done.returncode != 0:
        results["interpreter"] = {"error": f"rc {done.returncode}: {done.stderr[-1500:]}"}
    return results


def check_torchrun() -> dict:
    from torch.distributed.run import get_args_parser

    from btrm import launcher

    parser = get_args_parser()
    present = {option: option in parser._option_string_actions for option in TORCHRUN_OPTIONS}
    passed = ["--nnodes=1", "--nproc_per_node=1", "--max-restarts=0", "--shutdown-timeout=900", "bt_trainer.py"]
    return {"options": present, "launcher_passes": launcher.fitted_to_torchrun(parser, passed)}


def causal_mask(queries: int, keys: int, aligned: str, device):
    """True where query i may read key j. bottom-right: the last query reads every key (j <= i + keys - queries);
    top-left: query i reads keys 0..i."""
    import torch

    i = torch.arange(queries, device=device)[:, None]
    j = torch.arange(keys, device=device)[None, :]
    return j <= i + (keys - queries) if aligned == "bottom-right" else j <= i


def reference_attention(q, k, v, segments, aligned: str):
    """sdpa per segment on [tokens, heads, dim] tensors, key/value heads repeated for GQA, an explicit mask."""
    import torch
    import torch.nn.functional as F

    outputs, q_start, k_start = [], 0, 0
    groups = q.shape[1] // k.shape[1]
    for queries, keys in segments:
        qs = q[q_start : q_start + queries].transpose(0, 1)[None]
        ks = k[k_start : k_start + keys].repeat_interleave(groups, dim=1).transpose(0, 1)[None]
        vs = v[k_start : k_start + keys].repeat_interleave(groups, dim=1).transpose(0, 1)[None]
        mask = causal_mask(queries, keys, aligned, q.device)
        outputs.append(F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask)[0].transpose(0, 1))
        q_start, k_start = q_start + queries, k_start + keys
    return torch.cat(outputs)


def sdpa_stand_in(q, k, v, cu_seq_q, cu_seq_k, max_q, max_k, *, window_size=(-1, -1), **_):
    """varlen_attn's signature on CPU (where varlen_attn raises NotImplementedError): bottom-right causal sdpa."""
    lengths = list(zip((cu_seq_q[1:] - cu_seq_q[:-1]).tolist(), (cu_seq_k[1:] - cu_seq_k[:-1]).tolist(), strict=True))
    assert window_size == (-1, 0)
    return reference_attention(q, k, v, lengths, "bottom-right")


def probe_kernel(ctx) -> dict:
    import torch

    probe, device = ctx.sizes["probe"], ctx.device
    segments = [tuple(s) for s in probe["segments"]]
    result: dict = {"segments_q_k": segments, "heads": probe["heads"], "kv_heads": probe["kv_heads"]}
    try:
        from torch.nn.attention.varlen import varlen_attn

        result["signature"] = str(inspect.signature(varlen_attn))
    except Exception as error:
        result["signature"] = error_line(error)
        varlen_attn = None
    if device == "cuda" and varlen_attn is not None:
        kernel, result["kernel"] = varlen_attn, "varlen_attn"
    else:
        kernel, result["kernel"] = sdpa_stand_in, "sdpa stand-in (varlen_attn is CUDA-only)"
    # torch 2.13 asks for enable_gqa; torch 2.11 has no such argument (its flash kernel takes GQA natively)
    gqa = {"enable_gqa": True} if "enable_gqa" in inspect.signature(kernel).parameters else {}
    result["enable_gqa_passed"] = bool(gqa)
    try:
        generator = torch.Generator().manual_seed(0)
        total_q, total_k = sum(s[0] for s in segments), sum(s[1] for s in segments)
        dim = probe["head_dim"]

        def random(*shape):
            return torch.randn(*shape, generator=generator).to(device)

        inputs = [random(total_q, probe["heads"], dim), random(total_k, probe["kv_heads"], dim)]
        inputs.append(random(total_k, probe["kv_heads"], dim))
        grad_out = random(total_q, probe["heads"], dim)
        dtype = torch.bfloat16 if device == "cuda" else torch.float32  # the trainer's compute dtype on each device

        def forward_backward(fn, cast):
            leaves = [t.detach().to(cast).clone().requires_grad_() for t in inputs]  # fresh leaves: no shared .grad
            out = fn(*leaves)
            out.backward(grad_out.to(cast))
            return [out.detach().float(), *(t.grad.float() for t in leaves)]

        cu_q = torch.tensor([0, *torch.tensor([s[0] for s in segments]).cumsum(0).tolist()], device=device)
        cu_k = torch.tensor([0, *torch.tensor([s[1] for s in segments]).cumsum(0).tolist()], device=device)
        max_q, max_k = max(s[0] for s in segments), max(s[1] for s in segments)
        cu_q, cu_k = cu_q.to(torch.int32), cu_k.to(torch.int32)

        def under_test(q, k, v):
            return kernel(q, k, v, cu_q, cu_k, max_q, max_k, window_size=(-1, 0), **gqa)

        tested = forward_backward(under_test, dtype)  # also the warm-up of the timing below
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        forward_backward(under_test, dtype)
        if device == "cuda":
            torch.cuda.synchronize()
        result["fwd_bwd_ms"] = 1e3 * (time.perf_counter() - start)
        names = ("out", "grad_q", "grad_k", "grad_v")

        def reference(aligned, cast):
            return forward_backward(lambda q, k, v: reference_attention(q, k, v, segments, aligned), cast)

        def max_diffs(values, references):
            return {name: float((t - r).abs().max()) for name, t, r in zip(names, values, references, strict=True)}

        exact = {aligned: reference(aligned, torch.float32) for aligned in ("bottom-right", "top-left")}
        for aligned, values in exact.items():
            result[f"max_diff_vs_{aligned}"] = max_diffs(tested, values)
        # the same sdpa reference computed in the compute dtype: what rounding alone costs
        rounding = max_diffs(reference("bottom-right", dtype), exact["bottom-right"])
        result["sdpa_rounding"] = rounding
        # within tolerance: no worse than 4x sdpa's own rounding in that dtype (plus a floor for fp32)
        result["within_tolerance"] = all(
            result["max_diff_vs_bottom-right"][name] <= 4 * rounding[name] + 1e-4 for name in names
        )
        result["alignment"] = (
            "bottom-right"
            if result["within_tolerance"]
            else "top-left"
            if all(result["max_diff_vs_top-left"][n] <= 4 * rounding[n] + 1e-4 for n in names)
            else "neither"
        )
    except Exception as error:
        result["error"] = error_line(error)
    return result


if __name__ == "__main__":  # python -m bench.gpu_check.smoke: the probe alone, on this machine's device
    from types import SimpleNamespace

    import torch

    from bench.gpu_check.sizes import SIZES

    mode = "gpu" if torch.cuda.is_available() else "dry"
    print(json.dumps(probe_kernel(SimpleNamespace(sizes=SIZES[mode], device=SIZES[mode]["device"]))))

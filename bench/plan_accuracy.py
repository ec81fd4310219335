#!/usr/bin/env python3
"""How close btrm.plan's planned peak is to a real step's, measured independently on CPU.

    .venv/bin/python -m bench.plan_accuracy [--cases NAME ...] [--workdir DIR]   # from the repository root

For each case (a random Qwen3 large enough that tensors dominate the process; full fine-tuning and LoRA, the
packed and padded layouts, with and without gradient checkpointing), on one CPU rank in fp32:
- planned: btrm.plan.plan_config for the trainer's config (world size 1, device cpu, no GPU corrections) and the
  micro-batch it simulates (the model simulated at 2 and 3 layers and scaled to its depth, as for a 32B plan);
- measured, in a fresh subprocess: the trainer's own btrm.modeling.build_model (one gloo rank, the random
  checkpoint saved first), then two real steps (forward, backward, gradient clipping, AdamW) on that micro-batch.
  The peak is the process's resident high-water mark during step 2 (VmHWM, reset after step 1 through
  /proc/self/clear_refs: step 1 also creates AdamW's state) minus its resident memory before the model was
  built; "resident" is the resident memory after step 2 minus the same baseline (weights, gradients, AdamW state).
  glibc is told to serve every allocation over 64 KiB by mmap (MALLOC_MMAP_THRESHOLD_): freed tensors then leave
  the resident set at once, as they leave the tracker's count, instead of staying cached in the heap.
Prints a table and ends with one JSON line; the target is |planned / measured - 1| <= 10% for the peak.
Runtime: about 3 minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TARGET = 0.10  # |planned / measured - 1| for the peak
GIB = 2**30

# name -> model dimensions, trainer overrides, micro-batch tokens (each case takes under a minute on 2 cores)
CASES = {
    "full-shared-ckpt": {
        "dims": {"hidden_size": 1024, "intermediate_size": 2816, "num_hidden_layers": 8, "num_attention_heads": 16},
        "overrides": ["data.max_length=512"],
        "tokens": 1024,
    },
    "lora16-shared-ckpt": {
        "dims": {"hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 4, "num_attention_heads": 16},
        "overrides": ["data.max_length=512", "model.lora_rank=16", "model.lora_alpha=32"],
        "tokens": 1024,
    },
    "full-padded-no-ckpt": {
        "dims": {"hidden_size": 768, "intermediate_size": 2048, "num_hidden_layers": 6, "num_attention_heads": 12},
        "overrides": ["data.max_length=1024", "use_remove_padding=false", "model.enable_gradient_checkpointing=false"],
        "tokens": 2048,
    },
}
COMMON_DIMS = {"num_key_value_heads": 4, "head_dim": 64, "vocab_size": 32000, "max_position_embeddings": 4096}


def trainer_overrides(model_dir: Path, case: dict) -> list[str]:
    return [
        f"model.partial_pretrain={model_dir}",
        "trainer.device=cpu",
        "data.train_batch_size=8",
        *case["overrides"],
    ]


def save_random_model(folder: Path, dims: dict) -> Path:
    """A random Qwen3 causal LM (bf16 on disk; the trainer loads it in fp32)."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen3Config

    config = Qwen3Config(**COMMON_DIMS, **dims, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(folder)
    return folder


# ----------------------------------------------------------------------------- the measurement (subprocess)


def memory_kib() -> dict[str, int]:
    status = Path("/proc/self/status").read_text()
    return {key: int(re.search(rf"^{key}:\s+(\d+)", status, re.M).group(1)) for key in ("VmRSS", "VmHWM", "RssFile")}


def reset_high_water_mark() -> None:
    """VmHWM back to the current resident set (Linux >= 4.0)."""
    Path("/proc/self/clear_refs").write_text("5")


def training_step(built, batch: dict, clip_grad: float, watermarks: list[int] | None = None) -> None:
    """The trainer's step on one micro-batch (bt_trainer: zero_grad, BT loss backward, clip, AdamW step); with
    `watermarks`, the high-water mark of forward/backward, then that of the optimizer step alone, appended."""
    import torch.nn.functional as F
    from verl.utils.fsdp_utils import fsdp2_clip_grad_norm_

    from btrm import batching

    built.optimizer.zero_grad(set_to_none=True)
    rewards = batching.compute_rewards(built.fsdp_model, batch)
    half = rewards.shape[0] // 2
    (-F.logsigmoid(rewards[:half] - rewards[half:]).mean()).backward()
    fsdp2_clip_grad_norm_(built.fsdp_model.parameters(), max_norm=clip_grad)
    if watermarks is not None:
        watermarks.append(memory_kib()["VmHWM"])
        reset_high_water_mark()
    built.optimizer.step()
    if watermarks is not None:
        watermarks.append(memory_kib()["VmHWM"])


def measure(spec: dict) -> dict:
    """Build the trainer's model on one gloo rank and run two steps; memory figures in bytes over the baseline."""
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from btrm import batching, modeling, plan
    from btrm.config import RunConfig
    from btrm.schema import compose_config

    torch.set_num_threads(2)
    config = compose_config(spec["overrides"])
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{spec['port']}", rank=0, world_size=1)
    mesh = init_device_mesh("cpu", (1,), mesh_dim_names=("fsdp",))
    lengths = plan.simulated_lengths(spec["tokens"], config.data.max_length)
    generator = torch.Generator().manual_seed(0)
    sequences = [torch.randint(1, 1000, (n,), generator=generator).tolist() for n in lengths]
    baseline = memory_kib()
    built = modeling.build_model(RunConfig.from_config(config), mesh, "cpu", pad_token_id=0, total_steps=10)
    built.fsdp_model.train()  # as the trainer's training_step: from_pretrained leaves eval mode (no checkpointing)
    layout = built.layout
    batch = batching.collate_padded(sequences, 0) if layout == "padded" else batching.collate_packed(sequences)

    training_step(built, batch, config.optim.clip_grad)  # creates AdamW's state
    reset_high_water_mark()
    start = time.perf_counter()
    watermarks: list[int] = []
    training_step(built, batch, config.optim.clip_grad, watermarks)
    step_s = time.perf_counter() - start
    after = memory_kib()
    dist.destroy_process_group()
    return {
        "peak_bytes": (max(watermarks) - baseline["VmRSS"]) * 1024,
        "forward_backward_peak_bytes": (watermarks[0] - baseline["VmRSS"]) * 1024,
        "optimizer_step_peak_bytes": (watermarks[1] - baseline["VmRSS"]) * 1024,
        "resident_bytes": (after["VmRSS"] - baseline["VmRSS"]) * 1024,
        "file_backed_growth_bytes": (after["RssFile"] - baseline["RssFile"]) * 1024,
        "baseline_bytes": baseline["VmRSS"] * 1024,
        "step_s": round(step_s, 1),
        "layout": layout,
    }


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_measurement(overrides: list[str], tokens: int) -> dict:
    spec = {"overrides": overrides, "tokens": tokens, "port": free_port()}
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "2", "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run(
        [sys.executable, "-m", "bench.plan_accuracy", "--measure", json.dumps(spec)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"measurement failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
    return json.loads(lines[-1])


# ----------------------------------------------------------------------------- the comparison


def run_case(name: str, case: dict, workdir: Path) -> dict:
    from btrm import plan

    model_dir = save_random_model(workdir / name, case["dims"])
    overrides = trainer_overrides(model_dir, case)
    start = time.perf_counter()
    planned = plan.plan_from_overrides(overrides, gpus=1, device="cpu", tokens=case["tokens"], search=False)
    plan_s = time.perf_counter() - start
    measured = run_measurement(overrides, case["tokens"])
    planned_peak = planned["peak_gib"] * GIB
    planned_resident = planned["model_states_gib"] * GIB
    return {
        "case": name,
        "parameters": planned["parameters"],
        "layers": planned["layers"],
        "layers_simulated": planned["layers_simulated"],
        "layout": planned["layout"],
        "tokens": case["tokens"],
        "planned_peak_gib": round(planned_peak / GIB, 3),
        "measured_peak_gib": round(measured["peak_bytes"] / GIB, 3),
        "peak_ratio": round(planned_peak / measured["peak_bytes"], 3),
        "planned_model_states_gib": round(planned_resident / GIB, 3),
        "measured_resident_gib": round(measured["resident_bytes"] / GIB, 3),
        "resident_ratio": round(planned_resident / measured["resident_bytes"], 3),
        "planned_phases_gib": {name: phase["peak_gib"] for name, phase in planned["phases"].items()},
        "measured_phases_gib": {
            name: round(measured[f"{name}_peak_bytes"] / GIB, 3) for name in ("forward_backward", "optimizer_step")
        },
        "planned_parts_gib": planned["parts"],
        "measured_file_backed_growth_gib": round(measured["file_backed_growth_bytes"] / GIB, 3),
        "plan_s": round(plan_s, 1),
        "real_step_s": measured["step_s"],
    }


def format_table(rows: list[dict]) -> str:
    header = f"{'case':<22}{'params':>8}{'layers':>8}{'tokens':>8}{'planned':>10}{'measured':>10}{'ratio':>8}"
    header += f"{'states':>9}{'resident':>10}{'ratio':>8}"
    lines = [header, f"{'':<46}{'peak GiB (step 2)':>28}{'GiB after step 2':>27}"]
    for r in rows:
        lines.append(
            f"{r['case']:<22}{r['parameters'] / 1e6:>7.0f}M{r['layers']:>8}{r['tokens']:>8}{r['planned_peak_gib']:>10.3f}"
            f"{r['measured_peak_gib']:>10.3f}{r['peak_ratio']:>8.3f}{r['planned_model_states_gib']:>9.3f}"
            f"{r['measured_resident_gib']:>10.3f}{r['resident_ratio']:>8.3f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="*", choices=sorted(CASES), default=list(CASES))
    parser.add_argument("--workdir", type=Path, default=None, help="where the random models go (default: a temp dir)")
    parser.add_argument("--measure", default=None, help=argparse.SUPPRESS)  # the subprocess's spec
    args = parser.parse_args(argv)
    if args.measure:
        print(json.dumps(measure(json.loads(args.measure))))
        return 0
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="plan-accuracy-") as temp:
        workdir = args.workdir or Path(temp)
        rows = [run_case(name, CASES[name], workdir) for name in args.cases]
    print(format_table(rows))
    worst = max(abs(r["peak_ratio"] - 1) for r in rows)
    summary = {"cases": rows, "worst_peak_error": round(worst, 3), "target": TARGET, "within_target": worst <= TARGET}
    print(json.dumps({**summary, "wall_s": round(time.perf_counter() - start, 1)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

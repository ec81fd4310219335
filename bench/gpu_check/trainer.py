"""Part `trainer`: `bash run_bt_rm.sh` on one device for a few steps per strategy (FSDP2 first, with trainer.yaml's
defaults; then FSDP1 and FSDP2 with CPU offload) on a small random Qwen3 and the demo data prepared as
demo/run_demo.sh does: rc, the token budget, steps/s, first and final loss, val loss, the HF export."""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

from bench.gpu_check.common import REPO, Context, free_port, run_command, tail
from bench.gpu_check.sizes import MIN_PART_S


def part_trainer(ctx: Context) -> dict:
    """(d) `bash run_bt_rm.sh` on one device for a few steps per strategy: rc, steps/s, final losses."""
    sizes = ctx.sizes
    model_dir = ctx.model_dir("trainer", sizes["trainer_model"], weights=True)
    data = ctx.data_dir()
    result: dict = {"model": sizes["trainer_model"], "runs": {}}
    for name, extra in sizes["trainer_runs"].items():
        if ctx.remaining() < MIN_PART_S:
            result["runs"][name] = {"skipped": "out of time"}
            continue
        metrics_file = ctx.workdir / "trainer" / f"{name}.jsonl"
        metrics_file.parent.mkdir(parents=True, exist_ok=True)
        metrics_file.unlink(missing_ok=True)
        env = {
            **os.environ,
            "N_GPUS_PER_NODE": "1",
            "MASTER_PORT": str(free_port()),
            "PYTHON": sys.executable,
            "MODEL_PATH": str(model_dir),
            "TRAIN_FILE": str(data / "train.parquet"),
            "VAL_FILE": str(data / "test.parquet"),
            "SAVE_PATH": str(ctx.workdir / "trainer" / "ckpt"),
            "EXPERIMENT_NAME": name,
            "VERL_FILE_LOGGER_PATH": str(metrics_file),
            "TRAIN_BATCH_SIZE": "16",
            "MICRO_BATCH_SIZE": "",  # trainer.yaml's: micro-batches cut by the token budget alone
            "LR": "1e-3",
            "TOTAL_EPOCHS": "1",
            "MAX_LENGTH": "1024",
        }
        if ctx.device == "cpu":
            env["CUDA_VISIBLE_DEVICES"] = ""
        overrides = [
            "trainer.logger=[console,file]",
            f"trainer.device={ctx.device}",
            f"trainer.total_training_steps={sizes['trainer_steps']}",
            f"data.max_samples={sizes['trainer_pairs']}",
            *extra,
        ]
        cmd = ["bash", str(REPO / "run_bt_rm.sh"), *overrides]
        timeout = min(sizes["trainer_run_s"], ctx.remaining())
        run = run_command(cmd, ctx.workdir / "logs" / f"trainer-{name}", timeout, env=env, cwd=ctx.workdir)
        entry = {"overrides": extra, "rc": run["rc"], "timed_out": run["timed_out"], "wall_s": run["seconds"]}
        # the start-up summary's batch line: "micro-batches of <= N computed tokens (where N came from)"
        budget = re.search(r"micro-batches of <= ([\d,]+) computed tokens \((.*?)\)", run["out"].read_text())
        if budget:
            entry.update(token_budget=int(budget[1].replace(",", "")), token_budget_source=budget[2])
        entry.update(trainer_metrics(metrics_file))
        final = ctx.workdir / "trainer" / "ckpt" / name / f"global_step_{sizes['trainer_steps']}" / "huggingface"
        entry["hf_export"] = any(final.glob("*.safetensors"))
        if run["rc"] != 0 or entry.get("steps") != sizes["trainer_steps"]:
            entry["error"] = f"rc {run['rc']}" + (" (timed out)" if run["timed_out"] else "")
            entry["tail"] = tail(run["out"], run["err"])
        result["runs"][name] = entry
    return result


def trainer_metrics(metrics_file: Path) -> dict:
    """verl's file logger lines ({"step": N, "data": {...}}) -> steps, steps/s, losses."""
    if not metrics_file.exists():
        return {}
    merged: dict[int, dict] = {}
    for line in metrics_file.read_text().splitlines():
        record = json.loads(line)
        merged.setdefault(record["step"], {}).update(record["data"])
    train = [merged[s] for s in sorted(merged) if "train/loss" in merged[s]]
    if not train:
        return {}
    times = [m["train/time(s)"] for m in train]
    last = merged[max(merged)]
    return {
        "steps": len(train),
        "step_time_s": times,  # the first step includes the start-up layout check
        "steps_per_s": len(times) / sum(times),
        "last_step_pairs_per_s": train[-1]["train/pairs_per_s"],
        "first_loss": train[0]["train/loss"],
        "final_loss": train[-1]["train/loss"],
        "val_loss": last.get("val/loss"),
        "val_accuracy": last.get("val/accuracy"),
    }

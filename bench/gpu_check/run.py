"""The main process: the environment, the background planners, each part in its own subprocess with its time limit,
the results folder rewritten after every part, and the summary table as the last lines on stdout."""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from bench.gpu_check import report as reporting
from bench.gpu_check.common import (
    REPO,
    Context,
    plan_summary,
    planner_available,
    run_worker_command,
    start_command,
    stop_tree,
    worker_command,
)
from bench.gpu_check.layouts import part_layouts
from bench.gpu_check.memory import part_memory
from bench.gpu_check.sizes import MIN_PART_S, PART_ORDER, SIZES
from bench.gpu_check.smoke import part_smoke
from bench.gpu_check.throughput import PROGRESS, part_throughput, part_throughput_large, worker_throughput_model
from bench.gpu_check.trainer import part_trainer

PARTS = {
    "smoke": part_smoke,
    "throughput": part_throughput,
    "memory": part_memory,
    "trainer": part_trainer,
    "layouts": part_layouts,
    "throughput_large": part_throughput_large,
}


def worker_prefetch(ctx: Context, spec: dict) -> dict:
    """Background planning of one model: the planner's default micro-batch (its largest fitting budget comes with
    it), then, for the memory part's model, its largest budget as the memory part will measure it."""
    plans = {"default": plan_summary(ctx.make_plan(spec["model"], None))}
    if spec["memory"]:
        budget = ctx.budget(spec["model"], ctx.sizes["memory_budget_cap"])
        if "planner_budget" in budget and budget["budget"] != ctx.sizes["plan_tokens"]:
            plans[str(budget["budget"])] = plan_summary(ctx.make_plan(spec["model"], budget["budget"]))
    return plans


WORKERS = {
    **{name: lambda ctx, spec, part=part: part(ctx) for name, part in PARTS.items()},
    "throughput-model": worker_throughput_model,
    "plan": lambda ctx, spec: plan_summary(ctx.make_plan(spec["model"], spec["tokens"])),
    "prefetch": worker_prefetch,
}


class Interrupted(BaseException):
    """SIGTERM (the device tool's time limit, a scheduler): stop the part, write what is done, print the table."""


def on_sigterm(signum, frame):
    raise Interrupted


def worker_main(args) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    ctx = Context("dry" if args.dry else "gpu", Path(args.workdir), args.deadline)
    result = WORKERS[args.worker](ctx, json.loads(args.spec) if args.spec else None)
    print(json.dumps(result), flush=True)


def run_part(ctx: Context, part: str, progress: list[dict], save) -> dict:
    """One part in a subprocess, within its limit and the deadline; its progress lines are printed as they come
    and the results folder rewritten with them."""
    remaining = ctx.remaining()
    if remaining < MIN_PART_S:
        return {"status": "skipped", "skipped": f"out of time ({remaining:.0f} s left of total_s)"}
    timeout = min(ctx.sizes["part_s"][part], remaining)
    print(f"gpu_check: {part} (limit {timeout:.0f} s) ...", file=sys.stderr, flush=True)
    start = time.monotonic()

    def on_line(line: str) -> None:
        if line.startswith(PROGRESS):
            record = json.loads(line)["progress"]
            print(json.dumps({"part": part, **record}), flush=True)
            progress.append(record)
            save()

    answer = run_worker_command(ctx, part, part, timeout, on_line=on_line)
    seconds = round(time.monotonic() - start, 1)
    if "error" in answer and "tail" in answer:  # the worker itself failed or ran out of time
        return {"status": "error", "seconds": seconds, **answer, **partial(progress)}
    if part == "memory" and not planner_available():
        return {"status": "skipped", "skipped": "btrm.plan missing", "seconds": seconds, "result": answer}
    problems = list(reporting.find_problems(answer))
    return {"status": "partial" if problems else "ok", "seconds": seconds, "problems": problems, "result": answer}


def partial(progress: list[dict]) -> dict:
    """The modes a throughput part finished before it stopped, in its result's shape."""
    if not progress:
        return {}
    models: dict = {}
    for record in progress:
        run = {k: v for k, v in record.items() if k not in ("model", "mode")}
        models.setdefault(record["model"], {"runs": {}})["runs"][record["mode"]] = run
    return {"partial_result": {"models": models}}


def start_prefetch(ctx: Context, parts: list[str]) -> list[tuple[str, subprocess.Popen]]:
    """The background planners (btrm.plan is CPU work on fake tensors: it overlaps the GPU parts)."""
    sizes = ctx.sizes
    wanted = []
    if "memory" in parts:
        wanted.append(sizes["memory_model"])
    if "throughput" in parts:
        wanted += sizes["throughput_models"]
    if "throughput_large" in parts:
        wanted += sizes["large_throughput_models"]
    if not planner_available() or not wanted:
        return []
    started = []
    for model in dict.fromkeys(wanted):
        spec = {"model": model, "memory": model == sizes["memory_model"]}
        command = worker_command(ctx, "prefetch", spec)
        proc, _, _ = start_command(command, ctx.workdir / "logs" / f"prefetch-{model}", cwd=REPO)
        started.append((model, proc))
    return started


def stop_prefetch(started: list[tuple[str, subprocess.Popen]]) -> dict:
    states = {}
    for model, proc in started:
        if proc.poll() is None:
            stop_tree(proc)
            states[model] = "stopped at the end (still planning)"
        else:
            states[model] = f"rc {proc.returncode}"
    return states


def parse_args(argv=None):
    import bench.gpu_check as package

    parser = argparse.ArgumentParser(description=package.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry", action="store_true", help="CPU, tiny sizes (SIZES['dry']): the check of this script")
    parser.add_argument(
        "--results",
        type=Path,
        default=None,
        help="the results folder (gpu_check.sh passes $OUT; default: bench/results/gpu_check-<device>-<time>/, "
        "--dry: a temp folder)",
    )
    parser.add_argument("--workdir", type=Path, default=None, help="models, data, plans, logs (default: a temp dir)")
    parser.add_argument("--parts", nargs="+", choices=PART_ORDER, default=list(PART_ORDER), help="a subset")
    parser.add_argument("--worker", choices=list(WORKERS), default=None, help=argparse.SUPPRESS)
    parser.add_argument("--deadline", type=float, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--spec", default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv=None) -> dict | None:
    args = parse_args(argv)
    if args.worker:
        worker_main(args)
        return None
    mode = "dry" if args.dry else "gpu"
    sizes = SIZES[mode]
    # the clock starts where gpu_check.sh started (its wheel install counts against the command's limit)
    started = float(os.environ.get("GPU_CHECK_T0") or time.time())
    workdir = (args.workdir or Path(tempfile.mkdtemp(prefix="gpu_check-"))).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    ctx = Context(mode, workdir, started + sizes["total_s"])
    if sizes["cpu_threads"]:  # inherited by every worker and trainer process
        os.environ["OMP_NUM_THREADS"] = str(sizes["cpu_threads"])
    environment = reporting.environment()
    if args.results is None:
        stamp = datetime.fromtimestamp(started).strftime("%Y%m%d-%H%M%S")
        device = (environment["device_name"] or "gpu") if mode == "gpu" else "cpu-dry"
        base = REPO / "bench" / "results" if mode == "gpu" else Path(tempfile.gettempdir())
        args.results = base / f"gpu_check-{'-'.join(device.lower().split())}-{stamp}"
    report: dict = {
        "check": "python -m bench.gpu_check",
        "mode": mode,
        "command": os.environ.get("GPU_CHECK_COMMAND") or " ".join(["python -m bench.gpu_check", *(argv or [])]),
        "started": datetime.fromtimestamp(started, UTC).isoformat(timespec="seconds"),
        "setup": os.environ.get("GPU_CHECK_SETUP"),
        "results_dir": str(args.results),
        "sizes": sizes,
        "part_order": [p for p in PART_ORDER if p in args.parts],
        "environment": environment,
        "parts": {part: {"status": "not run"} for part in PART_ORDER if part in args.parts},
        "seconds": None,
    }
    if environment.get("gpu_memory_gib"):
        os.environ["GPU_CHECK_GPU_MEMORY_GIB"] = str(environment["gpu_memory_gib"])

    def save() -> None:
        report["seconds"] = round(time.time() - started, 1)
        reporting.write_results(args.results, report, workdir)

    signal.signal(signal.SIGTERM, on_sigterm)
    save()
    prefetch = start_prefetch(ctx, args.parts)
    current = None
    try:
        for part in report["part_order"]:
            current, progress = part, []
            report["parts"][part] = {"status": "running"}
            save()  # a kill now shows which part was running

            def save_progress(part=part, progress=progress) -> None:
                report["parts"][part] = {"status": "running", **partial(progress)}
                save()

            report["parts"][part] = run_part(ctx, part, progress, save_progress)
            current = None
            save()
    except (Interrupted, KeyboardInterrupt):
        report["interrupted"] = True
        if current is not None:
            report["parts"][current] = {**report["parts"][current], "status": "interrupted"}
            report["parts"][current]["error"] = "stopped by a signal (the command's time limit?)"
    finally:
        report["planner"] = {
            "background": stop_prefetch(prefetch),
            "plans": {p.stem: plan_summary(json.loads(p.read_text())) for p in sorted(workdir.glob("plans/*.json"))},
        }
        save()
        if args.workdir is None:
            import shutil

            shutil.rmtree(workdir, ignore_errors=True)
        print(reporting.summary_table(report), flush=True)
    return report

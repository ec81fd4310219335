"""The report: the environment (read without importing torch), the problems found in each part, the summary table,
and the results folder (at most RESULT_FILES, rewritten atomically after every part)."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import math
import os
import subprocess
import sys
import tarfile
from pathlib import Path

from bench.gpu_check.common import REPO, planner_available
from bench.gpu_check.sizes import PART_ORDER

# The results folder: what the device tool brings back (at most 8 files, 2 folders deep); each written to a temp
# file beside it and renamed, so a kill at any moment leaves the last complete version of each.
REPORT_FILE, SUMMARY_FILE, LOGS_FILE = "gpu_check.json", "gpu_check.txt", "gpu_check-logs.tar.gz"
RESULT_FILES = (REPORT_FILE, SUMMARY_FILE, LOGS_FILE)
LOG_TAIL_BYTES = 256 * 1024  # of each log in the archive


def environment() -> dict:
    """Versions as installed on the path and the GPUs nvidia-smi lists, without importing torch.

    torch's own view of the device (name, capability, varlen_attn's signature) is the layouts part's `torch_runtime`.
    """
    from importlib import metadata

    def version(package: str) -> str | None:
        try:
            return metadata.version(package)
        except metadata.PackageNotFoundError:
            return None

    def origin(module: str) -> str | None:
        try:
            spec = importlib.util.find_spec(module)
        except (ImportError, ValueError):
            return None
        return str(Path(spec.origin).parent) if spec and spec.origin else None

    packages = ("torch", "transformers", "verl", "numpy", "pyarrow", "tensordict", "torchdata", "hydra-core", "peft")
    result = {
        "python": sys.version.split()[0],
        "executable": sys.executable,
        **{name: version(name) for name in packages},
        "transformers_path": origin("transformers"),  # the carried 4.57.6 must shadow the box's own 5.x
        "verl_path": origin("verl"),
        "ray_path": origin("ray"),
        "pythonpath": os.environ.get("PYTHONPATH", ""),
        "setup": os.environ.get("GPU_CHECK_SETUP"),
        "btrm_plan": planner_available(),
        "device_name": "cpu",
    }
    with contextlib.suppress(OSError, subprocess.SubprocessError, ValueError, IndexError):
        query = "--query-gpu=name,memory.total,driver_version"
        smi = subprocess.run(["nvidia-smi", query, "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
        gpus = [line.split(", ") for line in smi.stdout.strip().splitlines() if line.strip()]
        if gpus:
            result.update(gpus=[", ".join(g) for g in gpus], device_name=gpus[0][0])
            result["gpu_memory_gib"] = round(float(gpus[0][1].split()[0]) / 1024, 2)  # "143771 MiB"
    with contextlib.suppress(OSError, subprocess.SubprocessError):  # a copy without .git: GPU_CHECK_COMMIT
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10)
        result["git_commit"] = head.stdout.strip() or None
    return result

    if not result.get("git_commit"):
        result["git_commit"] = os.environ.get("GPU_CHECK_COMMIT") or None
        result["git_commit_from"] = "GPU_CHECK_COMMIT" if result["git_commit"] else "unknown"
    return result


def find_problems(tree, path: str = ""):
    """Paths of every `error`, `skipped` or `planner_error` entry in a part's result (a sub-run that failed or never
    ran), and every layout outside its tolerance."""
    if isinstance(tree, dict):
        for key, value in tree.items():
            if key in ("error", "skipped", "planner_error") or (key == "within_tolerance" and value is False):
                yield f"{path or '.'}: {key}: {str(value)[:300]}"
            else:
                yield from find_problems(value, f"{path}/{key}")


def fmt(value, spec: str = ".3g") -> str:
    """A table cell: "-" for missing, integers whole, floats by `spec`."""
    if value is None:
        return "-"
    if isinstance(value, bool) or not isinstance(value, int | float):
        return str(value)
    if isinstance(value, int) or (spec == ".3g" and float(value).is_integer() and abs(value) < 1e9):
        return str(int(value))
    return format(value, spec) if math.isfinite(value) else str(value)


def summary_table(report: dict) -> str:
    """At most about 60 lines: the header, each part's status and problems, then one block per part's figures."""
    parts, env = report["parts"], report["environment"]
    lines = [
        f"gpu_check ({report['mode']}) on {env.get('device_name')}: torch {env.get('torch')}, "
        f"transformers {env.get('transformers')}, verl {env.get('verl')}; commit {env.get('git_commit')}; "
        f"{fmt(report.get('seconds'), '.0f')} s",
        f"setup: {report.get('setup')}; results: {report.get('results_dir')}",
    ]
    for part in PART_ORDER:
        entry = parts.get(part)
        if entry is None:
            lines.append(f"[{part}] not run" if part in report["part_order"] else f"[{part}] not asked for")
            continue
        lines.append(f"[{part}] {entry.get('status')} ({fmt(entry.get('seconds'))} s)")
        lines.extend(f"  ! {problem}" for problem in entry.get("problems", [])[:4])
        if entry.get("status") in ("error", "skipped", "interrupted"):
            lines.append(f"  {entry.get('error') or entry.get('skipped') or ''}".rstrip()[:300])
    smoke = result_of(parts, "smoke")
    if smoke:
        imports = ", ".join(
            f"{module} {'ok' if 'error' not in e else 'FAILED'} ({fmt(e.get('seconds'))} s)"
            for module, e in smoke.get("imports", {}).items()
        )
        options = smoke.get("torchrun", {}).get("options", {})
        kernel = smoke.get("kernel", {})
        diffs = kernel.get("max_diff_vs_bottom-right", {})
        lines += [
            "",
            f"(smoke) imports: {imports}",
            "        torchrun: " + ", ".join(f"{o} {'yes' if on else 'NO'}" for o, on in options.items()),
            f"        {kernel.get('kernel')}: alignment {kernel.get('alignment')}, within tolerance "
            f"{kernel.get('within_tolerance')}; max diff out {fmt(diffs.get('out'))} grad q/k/v "
            f"{fmt(diffs.get('grad_q'))}/{fmt(diffs.get('grad_k'))}/{fmt(diffs.get('grad_v'))} "
            f"(sdpa rounding {fmt(kernel.get('sdpa_rounding', {}).get('out'))}); enable_gqa passed "
            f"{kernel.get('enable_gqa_passed')}" + (f"; {kernel['error']}" if "error" in kernel else ""),
        ]
    throughput_rows = [
        (model, m, mode, r)
        for part in ("throughput", "throughput_large")
        for model, m in (result_of(parts, part).get("models") or {}).items()
        for mode, r in m.get("runs", {}).items()
    ]
    if throughput_rows:
        lines.append("\n(throughput) model mode       budget  pairs/s  real tok/s    MFU  alloc GiB  resv GiB  vs pad")
        for model, m, mode, r in throughput_rows:
            lines.append(
                f"    {model:<13} {mode:<10} {fmt(m.get('budget')):>6} {fmt(r.get('pairs_per_s')):>8} "
                f"{fmt(r.get('real_tokens_per_s'), '.0f'):>11} {fmt(r.get('mfu'), '.1%'):>6} "
                f"{fmt(r.get('peak_memory_gib'), '.1f'):>10} {fmt(r.get('peak_reserved_gib'), '.1f'):>9} "
                f"{fmt(r.get('speedup_vs_batch_pad'), '.2f'):>7}"
                + (f"  {r.get('error') or r.get('skipped')}"[:120] if "error" in r or "skipped" in r else "")
            )
    memory = result_of(parts, "memory")
    if memory.get("steps"):
        lines.append(
            "\n(memory) tokens  alloc GiB (plan)  ratio   resv GiB (plan)  ratio   step s  tok/s vs plan"
            + ("" if report["mode"] == "gpu" else "   (CPU: process RSS, not comparable)")
        )
        for e in memory["steps"].values():
            p = e.get("predicted") or {}
            lines.append(
                f"    {fmt(e.get('tokens')):>9} {fmt(e.get('peak_allocated_gib', e.get('process_peak_rss_gib')), '.2f'):>9} "
                f"({fmt(p.get('allocated_peak_gib'), '.2f')}) {fmt(e.get('peak_allocated_gib_over_predicted'), '.2f'):>6} "
                f"{fmt(e.get('peak_reserved_gib'), '.2f'):>10} ({fmt(p.get('reserved_peak_gib'), '.2f')}) "
                f"{fmt(e.get('peak_reserved_gib_over_predicted'), '.2f'):>6} {fmt(e.get('step_s'), '.2f'):>8} "
                f"{fmt(e.get('tokens_per_s_over_predicted'), '.2f'):>14}" + ("  OOM" if e.get("oom") else "")
            )
    runs = result_of(parts, "trainer").get("runs", {})
    if runs:
        lines.append("\n(trainer) run              rc  budget  steps  steps/s  final loss  val loss  wall s")
        for name, r in runs.items():
            lines.append(
                f"    {name:<19} {fmt(r.get('rc')):>3} {fmt(r.get('token_budget')):>7} {fmt(r.get('steps')):>6} "
                f"{fmt(r.get('steps_per_s')):>8} {fmt(r.get('final_loss'), '.4f'):>11} {fmt(r.get('val_loss'), '.4f'):>9} "
                f"{fmt(r.get('wall_s'), '.0f'):>7}"
            )
    layouts = result_of(parts, "layouts").get("layouts", {})
    if layouts:
        lines.append("\n(layouts) layout max diff  tolerance  within  fwd+bwd ms  computed tokens  vs padded")
        for name, e in layouts.items():
            lines.append(
                f"    {name:<8} {fmt(e.get('max_difference')):>9} {fmt(e.get('tolerance')):>10} "
                f"{fmt(e.get('within_tolerance')):>7} {fmt(e.get('fwd_bwd_ms'), '.1f'):>11} "
                f"{fmt(e.get('computed_tokens')):>16} {fmt(e.get('speedup_vs_padded'), '.2f'):>10}"
            )
    return "\n".join(lines)


def result_of(parts: dict, part: str) -> dict:
    """A part's result, or the partial result of a part cut off (the modes it reported before it stopped)."""
    entry = parts.get(part) or {}
    return entry.get("result") or entry.get("partial_result") or {}


def write_results(folder: Path, report: dict, workdir: Path) -> None:
    """The JSON, the summary and the log archive, each replaced atomically (temp file beside it, then renamed)."""
    from btrm.atomic import atomic_outputs, atomic_write_text

    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(folder / REPORT_FILE, json.dumps(report, indent=1) + "\n")
    atomic_write_text(folder / SUMMARY_FILE, summary_table(report) + "\n")
    with atomic_outputs([folder / LOGS_FILE]) as (temp,), tarfile.open(temp, "w:gz") as archive:
        for sub in ("logs", "plans"):
            for file in sorted((workdir / sub).glob("*")):
                if file.is_file():
                    with contextlib.suppress(OSError):
                        data = file.read_bytes()[-LOG_TAIL_BYTES:]
                        info = tarfile.TarInfo(f"{sub}/{file.name}")
                        info.size = len(data)
                        archive.addfile(info, io.BytesIO(data))

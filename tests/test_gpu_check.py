"""bench.gpu_check, the one-command GPU check, run end to end on CPU (`OUT=<dir> bash bench/gpu_check.sh --dry`).

The GPU run is what measures; this keeps its script from rotting between GPU sessions: every part runs with
SIZES['dry'] (tiny models, fp32, a per-segment sdpa stand-in for varlen_attn) and reports results, not errors,
into a results folder the device tool can bring back whole, even when the command is killed partway.
About 4 minutes on 2 cores shared with other jobs (one subprocess per part, one trainer launch, one btrm.plan
call), plus a second run killed once its first part is done (under a minute).
"""

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench import bench_throughput as bench
from bench.gpu_check import common, report, run, sizes, smoke
from btrm import batching
from conftest import REPO

SIZES = sizes.SIZES


def test_gpu_and_dry_sizes_set_the_same_knobs():
    gpu, dry = SIZES["gpu"], SIZES["dry"]
    assert set(gpu) == set(dry)
    assert set(gpu["part_s"]) == set(dry["part_s"]) == set(sizes.PART_ORDER) == set(run.PARTS)
    models = [*gpu["throughput_models"], *gpu["large_throughput_models"], gpu["memory_model"]]
    assert set(models) | {*dry["throughput_models"], *dry["large_throughput_models"]} <= set(bench.MODEL_CONFIGS)


def test_part_limits_fit_the_command_limit():
    gpu = SIZES["gpu"]
    # the device tool allows 600 s a command; the documented command asks for a minute less
    assert sizes.COMMAND_LIMIT_S <= 600 - 60
    assert gpu["total_s"] + sizes.FINISH_S <= sizes.COMMAND_LIMIT_S
    # every part but the last (which takes what is left) fits in the deadline after the wheel install
    assert sum(gpu["part_s"][p] for p in sizes.PART_ORDER[:-1]) <= gpu["total_s"] - gpu["install_s"]
    assert len(gpu["trainer_runs"]) * gpu["trainer_run_s"] <= gpu["part_s"]["trainer"]
    assert gpu["throughput_model_s"] * len(gpu["throughput_models"]) <= gpu["part_s"]["throughput"]
    # the figures that matter most come first: the smoke test, then the smaller model's throughput
    assert sizes.PART_ORDER[:2] == ("smoke", "throughput") and sizes.PART_ORDER[-1] == "throughput_large"


def test_no_sys_path_edits_in_bench():
    for path in (REPO / "bench").rglob("*.py"):
        assert "sys.path" not in path.read_text(), path


@pytest.mark.parametrize("layout", ["packed", "shared"])
def test_one_full_micro_batch_holds_exactly_the_budget(layout):
    # the memory part's steps must compute the tokens the planner simulates, in one micro-batch
    pool = bench.helpsteer2_like_pairs(40, vocab_size=1000, max_length=4096, seed=1)
    for budget in (8192, 20000):
        pairs = common.one_full_micro_batch(pool, budget, layout)
        assert sum(p.computed_tokens(layout) for p in pairs) == budget
        assert batching.plan_micro_batches(pairs, budget, None, layout=layout) == [list(range(len(pairs)))]


def test_problems_are_found_at_any_depth():
    result = {"models": {"m": {"runs": {"packed": {"pairs_per_s": 1.0}, "shared": {"error": "rc 1"}}}}}
    assert list(report.find_problems(result)) == ["/models/m/runs/shared: error: rc 1"]
    assert list(report.find_problems({"layouts": {"packed": {"within_tolerance": False}}}))
    assert not list(report.find_problems({"layouts": {"packed": {"within_tolerance": True}}}))


def test_a_failed_command_shows_its_error_then_its_last_lines(tmp_path):
    log = tmp_path / "run.err"
    log.write_text("starting\nTraceback (most recent call last):\nTypeError: bad argument\n" + "noise\n" * 30)
    excerpt = common.tail(log)
    assert excerpt.startswith("Traceback") and "TypeError: bad argument" in excerpt and excerpt.endswith("noise")


def test_the_probe_masks_are_aligned_as_named():
    # 2 queries over 4 keys: bottom-right lets the last query read every key; top-left is the square causal mask
    assert smoke.causal_mask(2, 4, "bottom-right", "cpu").int().tolist() == [[1, 1, 1, 0], [1, 1, 1, 1]]
    assert smoke.causal_mask(2, 4, "top-left", "cpu").int().tolist() == [[1, 0, 0, 0], [1, 1, 0, 0]]


def test_a_command_s_lines_arrive_while_it_runs(tmp_path):
    """Progress lines reach the main process as they are written, not when the command ends (or is stopped)."""
    seen = []
    code = "import time\nfor i in range(3):\n    print(i, flush=True)\n    time.sleep(1.5 if i == 1 else 0)\ntime.sleep(30)"
    started = time.monotonic()
    result = common.run_command(
        [sys.executable, "-c", code],
        tmp_path / "log",
        timeout=6,
        on_line=lambda line: seen.append((line, time.monotonic() - started)),
    )
    assert result["timed_out"] and time.monotonic() - started < 20
    assert [line for line, _ in seen] == ["0", "1", "2"]
    assert all(arrived < 5.5 for _, arrived in seen), seen  # before the command was stopped at 6 s


def test_a_part_cut_off_keeps_the_modes_it_finished():
    progress = [{"model": "m", "mode": "packed", "pairs_per_s": 2.0}, {"model": "m", "mode": "shared", "mfu": 0.3}]
    parts = {"throughput": {"status": "error", **run.partial(progress)}}
    runs = report.result_of(parts, "throughput")["models"]["m"]["runs"]
    assert runs == {"packed": {"pairs_per_s": 2.0}, "shared": {"mfu": 0.3}}


def start_dry_run(out: Path, work: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        ["bash", str(REPO / "bench" / "gpu_check.sh"), "--dry", "--workdir", str(work), *extra],
        env={**os.environ, "PYTHON": sys.executable, "OUT": str(out), "GPU_CHECK_COMMIT": "abc123"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def files_below(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file()]


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    """The whole script as a GPU session runs it, through gpu_check.sh, with --dry and $OUT set."""
    tmp = tmp_path_factory.mktemp("gpu-check")
    proc = start_dry_run(tmp / "out", tmp / "work")
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stdout[-3000:] + stderr[-3000:]
    return json.loads((tmp / "out" / report.REPORT_FILE).read_text()), stdout, tmp / "out"


def test_dry_run_leaves_at_most_4_files_naming_every_part(dry_run):
    result, _, out = dry_run
    files = files_below(out)
    assert len(files) <= 4 and all(len(p.relative_to(out).parts) <= 3 for p in files), files
    assert sorted(p.name for p in files) == sorted(report.RESULT_FILES)
    assert list(result["parts"]) == list(sizes.PART_ORDER)
    assert result["environment"]["git_commit"]  # git here; GPU_CHECK_COMMIT where the copy has no .git


def test_dry_run_ends_with_the_summary_table_and_keeps_the_json_in_its_file(dry_run):
    result, stdout, out = dry_run
    table = (out / report.SUMMARY_FILE).read_text().strip()
    assert stdout.rstrip().endswith(table) and len(table.splitlines()) <= 60
    assert json.dumps(result)[:40] not in stdout  # the report itself is not printed
    # one line per throughput mode, printed as each finished, before the table
    progress = [json.loads(line) for line in stdout.splitlines() if line.startswith('{"part": "throughput')]
    modes = SIZES["dry"]["throughput_modes"] + SIZES["dry"]["large_throughput_modes"]
    assert [p["mode"] for p in progress] == modes and all(p["pairs_per_s"] > 0 for p in progress)
    assert result["mode"] == "dry" and result["sizes"] == SIZES["dry"]
    environment = result["environment"]
    assert environment["torch"] and environment["transformers"] and environment["verl"]


def test_dry_run_every_part_has_results(dry_run):
    result, _, _ = dry_run
    for name, part in result["parts"].items():
        if name == "memory" and not result["environment"]["btrm_plan"]:
            assert part["status"] == "skipped" and part["skipped"] == "btrm.plan missing"
        else:
            assert part["status"] == "ok", (name, part.get("problems") or part.get("error"), part.get("tail"))


def test_dry_run_smoke_imports_torchrun_and_kernel_probe(dry_run):
    smoke_result = dry_run[0]["parts"]["smoke"]["result"]
    assert set(smoke_result["imports"]) == set(smoke.IMPORTS)
    assert all("seconds" in entry for entry in smoke_result["imports"].values())
    assert smoke_result["torchrun"]["options"]["--shutdown-timeout"]  # torch 2.13 here; 2.11 has it not
    kernel = smoke_result["kernel"]
    assert kernel["kernel"].startswith("sdpa stand-in") and kernel["within_tolerance"]
    assert kernel["alignment"] == "bottom-right"
    # with fewer queries than keys the two alignments differ: the probe can tell which one a kernel uses
    assert kernel["max_diff_vs_top-left"]["out"] > 0.1 and kernel["max_diff_vs_top-left"]["grad_k"] > 0.1


def test_dry_run_layouts_agree_with_padded(dry_run):
    layouts = dry_run[0]["parts"]["layouts"]["result"]
    assert layouts["segment_kernel"] == "sdpa per segment" and layouts["dtype"] == "float32"
    entries = layouts["layouts"]
    for layout in ("packed", "shared"):
        assert entries[layout]["within_tolerance"] and entries[layout]["max_difference"] <= entries[layout]["tolerance"]
    assert all(entries[layout]["fwd_bwd_ms"] > 0 for layout in entries)
    # packing drops the padding, sharing also computes each prompt once
    assert (
        entries["shared"]["computed_tokens"]
        < entries["packed"]["computed_tokens"]
        < entries["padded"]["computed_tokens"]
    )


def test_dry_run_throughputs_are_positive(dry_run):
    for part, models_key, modes in (
        ("throughput", "throughput_models", "throughput_modes"),
        ("throughput_large", "large_throughput_models", "large_throughput_modes"),
    ):
        models = dry_run[0]["parts"][part]["result"]["models"]
        assert list(models) == SIZES["dry"][models_key]
        for entry in models.values():
            runs = entry["runs"]
            assert list(runs) == SIZES["dry"][modes]
            for result in runs.values():
                assert result["pairs_per_s"] > 0 and result["real_tokens_per_s"] > 0
                assert 0 < result["real_token_share"] <= 1
    runs = dry_run[0]["parts"]["throughput"]["result"]["models"]["cpu-small"]["runs"]
    assert runs["packed"]["real_token_share"] == 1.0 and runs["batch_pad"]["real_token_share"] < 1.0


def test_dry_run_memory_step_and_plan(dry_run):
    result = dry_run[0]
    memory = result["parts"]["memory"]["result"]
    step = memory["steps"][str(SIZES["dry"]["plan_tokens"])]
    assert step["tokens"] == SIZES["dry"]["plan_tokens"] and step["micro_batches"] == 1
    assert step["step_s"] > 0 and step["process_peak_rss_gib"] > 0
    assert memory["layout_check"]["within_tolerance"]
    if result["environment"]["btrm_plan"]:
        assert step["predicted"]["tokens"] == step["tokens"] and step["predicted"]["allocated_peak_gib"] > 0


def test_dry_run_trains_through_run_bt_rm(dry_run):
    runs = dry_run[0]["parts"]["trainer"]["result"]["runs"]
    for result in runs.values():
        assert result["rc"] == 0 and result["steps"] == SIZES["dry"]["trainer_steps"] and result["hf_export"]
        assert result["steps_per_s"] > 0 and 0 < result["final_loss"] < 10 and result["val_loss"] is not None


def test_a_run_killed_partway_leaves_the_parts_it_finished(tmp_path):
    """SIGKILL to the whole command once its first part is done: the results folder holds that part."""
    out = tmp_path / "out"
    proc = start_dry_run(out, tmp_path / "work")
    deadline = time.monotonic() + 240
    status = None
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            with contextlib.suppress(OSError, ValueError, KeyError):
                status = json.loads((out / report.REPORT_FILE).read_text())["parts"]["smoke"]["status"]
            if status not in (None, "not run", "running"):
                break
            time.sleep(0.5)
    finally:
        pids = [proc.pid, *common.descendants(proc.pid)]
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        proc.communicate()
    assert status == "ok" and proc.returncode == -signal.SIGKILL  # killed partway, not finished
    files = files_below(out)
    assert len(files) <= 4, files
    result = json.loads((out / report.REPORT_FILE).read_text())
    assert list(result["parts"]) == list(sizes.PART_ORDER)
    assert result["parts"]["smoke"]["status"] == "ok" and result["parts"]["smoke"]["result"]["kernel"]
    assert result["parts"]["throughput_large"]["status"] == "not run"
    assert "[smoke] ok" in (out / report.SUMMARY_FILE).read_text()


def running(pid: int) -> bool:
    """Alive and not a zombie waiting to be reaped."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


def test_sigterm_stops_the_running_part_and_prints_the_table(tmp_path):
    out = tmp_path / "out"
    proc = start_dry_run(out, tmp_path / "work", "--parts", "smoke")
    deadline = time.monotonic() + 120
    status = None
    while time.monotonic() < deadline and proc.poll() is None and status != "running":
        with contextlib.suppress(OSError, ValueError, KeyError):
            status = json.loads((out / report.REPORT_FILE).read_text())["parts"]["smoke"]["status"]
        time.sleep(0.2)
    workers = common.descendants(proc.pid)
    proc.send_signal(signal.SIGTERM)  # gpu_check.sh execs python: this is the main process
    stdout, _ = proc.communicate(timeout=60)
    assert status == "running" and workers and proc.returncode == 143
    assert not [pid for pid in workers if running(pid)]  # the part's worker and what it started were stopped
    result = json.loads((out / report.REPORT_FILE).read_text())
    assert result["interrupted"] and result["parts"]["smoke"]["status"] == "interrupted"
    assert stdout.rstrip().endswith((out / report.SUMMARY_FILE).read_text().strip())
    assert "[smoke] interrupted" in stdout

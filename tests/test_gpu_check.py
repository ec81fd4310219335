"""bench/gpu_check.py, the one-command GPU check, run end to end on CPU (`bash bench/gpu_check.sh --dry`).

The GPU run is what measures; this keeps its script from rotting between GPU sessions: every part runs with
SIZES['dry'] (tiny models, fp32, per-segment sdpa instead of varlen_attn) and reports results, not errors, with
sane values. About 40 s on 2 idle cores (one subprocess per part, one trainer launch, one btrm.plan call).
"""

import json
import os
import subprocess
import sys

import pytest

from bench import bench_throughput as bench
from bench import gpu_check
from btrm import batching
from conftest import REPO


def test_gpu_and_dry_sizes_set_the_same_knobs():
    gpu, dry = gpu_check.SIZES["gpu"], gpu_check.SIZES["dry"]
    assert set(gpu) == set(dry)
    assert set(gpu["part_s"]) == set(dry["part_s"]) == set(gpu_check.PART_ORDER)
    assert set(gpu_check.REPORT_ORDER) == set(gpu_check.PART_ORDER)
    assert gpu["total_s"] + 30 <= 8 * 60  # the device session's limit for the whole command, wheel install included
    assert {*gpu["throughput_models"], gpu["memory_model"]} <= set(bench.MODEL_CONFIGS)
    assert {*dry["throughput_models"], dry["memory_model"]} <= set(bench.MODEL_CONFIGS)


@pytest.mark.parametrize("layout", ["packed", "shared"])
def test_one_full_micro_batch_holds_exactly_the_budget(layout):
    # the memory part's steps must compute the tokens the planner simulates, in one micro-batch
    pool = bench.helpsteer2_like_pairs(40, vocab_size=1000, max_length=4096, seed=1)
    for budget in (8192, 20000):
        pairs = gpu_check.one_full_micro_batch(pool, budget, layout)
        assert sum(p.computed_tokens(layout) for p in pairs) == budget
        assert batching.plan_micro_batches(pairs, budget, None, layout=layout) == [list(range(len(pairs)))]


def test_problems_are_found_at_any_depth():
    result = {"models": {"m": {"runs": {"packed": {"pairs_per_s": 1.0}, "shared": {"error": "rc 1"}}}}}
    assert list(gpu_check.find_problems(result)) == ["/models/m/runs/shared: error: rc 1"]
    assert list(gpu_check.find_problems({"layouts": {"packed": {"within_tolerance": False}}}))
    assert not list(gpu_check.find_problems({"layouts": {"packed": {"within_tolerance": True}}}))


def test_a_failed_command_shows_its_error_then_its_last_lines(tmp_path):
    log = tmp_path / "run.err"
    log.write_text("starting\nTraceback (most recent call last):\nTypeError: bad argument\n" + "noise\n" * 30)
    excerpt = gpu_check.tail(log)
    assert excerpt.startswith("Traceback") and "TypeError: bad argument" in excerpt and excerpt.endswith("noise")


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    """The whole script as a GPU session runs it, through gpu_check.sh, with --dry."""
    tmp = tmp_path_factory.mktemp("gpu-check")
    out = tmp / "report.json"
    result = subprocess.run(
        ["bash", str(REPO / "bench" / "gpu_check.sh"), "--dry", "--out", str(out), "--workdir", str(tmp / "work")],
        env={**os.environ, "PYTHON": sys.executable},
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return json.loads(out.read_text()), result.stdout


def test_dry_run_prints_the_table_then_the_json_it_wrote(dry_run):
    report, stdout = dry_run
    lines = stdout.strip().splitlines()
    assert json.loads(lines[-1]) == report
    assert any(line.startswith("(a) layout") for line in lines) and any(line.startswith("(d) run") for line in lines)
    environment = report["environment"]
    assert environment["torch"] and environment["transformers"] and environment["verl"]
    assert report["mode"] == "dry" and report["sizes"] == gpu_check.SIZES["dry"]


def test_dry_run_every_part_has_results(dry_run):
    report, _ = dry_run
    assert list(report["parts"]) == list(gpu_check.REPORT_ORDER)
    for name, part in report["parts"].items():
        if name == "memory" and not report["environment"]["btrm_plan"]:
            assert part["status"] == "skipped" and part["skipped"] == "btrm.plan missing"
        else:
            assert part["status"] == "ok", (name, part.get("problems") or part.get("error"), part.get("tail"))


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
    models = dry_run[0]["parts"]["throughput"]["result"]["models"]
    for model in gpu_check.SIZES["dry"]["throughput_models"]:
        runs = models[model]["runs"]
        assert set(runs) == set(gpu_check.SIZES["dry"]["throughput_modes"])
        for run in runs.values():
            assert run["pairs_per_s"] > 0 and run["real_tokens_per_s"] > 0 and 0 < run["real_token_share"] <= 1
        assert runs["packed"]["real_token_share"] == 1.0 and runs["batch_pad"]["real_token_share"] < 1.0


def test_dry_run_memory_step_and_plan(dry_run):
    report = dry_run[0]
    memory = report["parts"]["memory"]["result"]
    step = memory["steps"][str(gpu_check.SIZES["dry"]["plan_tokens"])]
    assert step["tokens"] == gpu_check.SIZES["dry"]["plan_tokens"] and step["micro_batches"] == 1
    assert step["step_s"] > 0 and step["process_peak_rss_gib"] > 0
    assert memory["layout_check"]["within_tolerance"]
    if report["environment"]["btrm_plan"]:
        assert step["predicted"]["tokens"] == step["tokens"] and step["predicted"]["allocated_peak_gib"] > 0


def test_dry_run_trains_through_run_bt_rm(dry_run):
    runs = dry_run[0]["parts"]["trainer"]["result"]["runs"]
    for run in runs.values():
        assert run["rc"] == 0 and run["steps"] == gpu_check.SIZES["dry"]["trainer_steps"] and run["hf_export"]
        assert run["steps_per_s"] > 0 and 0 < run["final_loss"] < 10 and run["val_loss"] is not None

#!/usr/bin/env python3
"""One command for a lent GPU machine: segment layouts, throughput and MFU, peak memory against the planner, the trainer.

    bash bench/gpu_check.sh                      # on the GPU box: installs .whl/ first (see the .sh), < 8 minutes
    bash bench/gpu_check.sh --dry                # anywhere: the same script on CPU with tiny sizes, under a minute
    python bench/gpu_check.py --dry --out /tmp/gpu_check.json --workdir /tmp/gc

First, without importing torch: package versions as installed on the path (transformers' and verl's folders show
whether the carried wheels shadow the box's own), the GPUs nvidia-smi lists, the wheel set-up, the git commit. Then
btrm.plan (the memory planner, CPU only: fake tensors) starts in the background for every model the parts need, so
its minutes of CPU overlap the GPU parts; its plans are cached in the work directory. Then the parts, each in its
own subprocess with a time limit (a failure or a timeout is recorded, the next part runs), in this order, all within
one deadline (SIZES' total_s: a slow part shortens only the parts after it):
  layouts (a)    a random Qwen3 (GPU: Qwen3-8B's attention and MLP sizes, GQA 32/8 heads, 4 layers) in bf16 (dry: fp32):
                 btrm.batching.check_layout of the packed and shared layouts against padded (max reward difference vs
                 the tolerance; on CUDA + bf16 the segments go through torch's varlen_attn) and fwd+bwd time of each;
                 also torch's view of the device and varlen_attn's signature
  trainer (d)    `bash run_bt_rm.sh` on one device for 2 steps: FSDP2 with trainer.yaml's defaults (token budget auto:
                 the trainer plans it), FSDP1 (model.strategy=fsdp) and FSDP2 with model.fsdp_config.cpu_offload=true,
                 on a small random Qwen3 and the demo data prepared as demo/run_demo.sh does: rc, the token budget,
                 steps/s, first and final loss, val loss, the HF export; the error and last lines of a failure
  memory (c)     the real trainer's step (bt_trainer.BTRewardTrainer built in the worker from trainer.yaml + overrides,
                 its training_step fed HelpSteer2-like pairs filling one micro-batch exactly) at the planned config's
                 budget and at the planner's largest fitting budget: torch.cuda.max_memory_allocated /
                 max_memory_reserved against btrm.plan.plan_from_overrides' allocated_peak_gib / reserved_peak_gib for
                 the same overrides and tokens; then the trainer's start-up layout check on that FSDP2 model
  throughput (b) bench/bench_throughput.py's run_worker (imported; one subprocess per model, a fresh model per mode)
                 for random Qwen3-1.7B- and Qwen3-4B-shaped models (real dimensions, every layer) at the planner's
                 largest fitting budget capped by SIZES' budget_cap: packed, shared, padded (batch_pad); pairs/s,
                 real tokens/s, MFU, peak memory allocated and reserved
Without btrm.plan the budgets are SIZES' default_budget and the memory part is recorded as skipped (with its
measurements). In the JSON the parts come in the brief's order, (a) to (d).

Output: a table, then the whole JSON as the last stdout line. It is also written to
bench/results/gpu_check-<device>-<date>.json (--dry: the temp directory) or --out, and copied with the logs to
--copy-to (gpu_check.sh passes the device tool's $OUT, the one folder that comes back from the machine).
Every size that differs between the GPU run and --dry is in SIZES, one dict per mode.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import math
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# Run as `python bench/gpu_check.py`, the script's own folder is first on sys.path: the repository root is what
# btrm, bench, demo and bt_trainer are imported from (as pytest's pythonpath does for the tests).
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from demo.make_tiny_model import TINY_QWEN3  # noqa: E402 (importable once the root is on the path)

QWEN3_8B_BLOCK = {  # Qwen3-8B's config.json: the attention and MLP shapes the layout check must run at
    "hidden_size": 4096,
    "intermediate_size": 12288,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "vocab_size": 151936,
}
# demo/make_tiny_model.py's sizes (GQA 4/2 heads): the dry run's layout and trainer model
TINY_BLOCK = {
    key: value for key, value in TINY_QWEN3.items() if key not in ("max_position_embeddings", "tie_word_embeddings")
}

# Everything that differs between a GPU run and --dry. Model names in throughput_models / memory_model are
# bench/bench_throughput.py's MODEL_CONFIGS (real Qwen3 dimensions, every layer); a trainer_model vocab_size of
# None takes the tokenizer's (512, trained on the demo data).
SIZES = {
    "gpu": {
        "device": "cuda",
        "cpu_threads": None,  # torch's default
        "total_s": 440,  # the whole python run; with the wheel install gpu_check.sh stays under 8 minutes
        "part_s": {"layouts": 120, "trainer": 200, "memory": 180, "throughput": 300},
        "plan_s": 180,  # one btrm.plan call (a waiting part gives up after this)
        "max_length": 4096,  # data.max_length: the longest conversation (HelpSteer2-like lengths are truncated to it)
        "plan_tokens": 8192,  # data.max_tokens_per_micro_batch of the planned config: the memory part's first step
        "gpu_memory_gib": None,  # what the planner plans for; None: nvidia-smi's memory.total of GPU 0
        "layout_model": {**QWEN3_8B_BLOCK, "num_hidden_layers": 4},
        "layout_pairs": 8,  # one micro-batch of 8 pairs, in each layout
        "layout_repeats": 3,  # timed fwd+bwd per layout after one warm-up (median kept)
        "throughput_models": ["qwen3-1.7b", "qwen3-4b"],
        "throughput_modes": ["packed", "shared", "batch_pad"],  # in run order: the least informative last
        "throughput_model_s": 150,  # one model's runs (one subprocess), warm-up steps included
        "default_budget": 16384,  # tokens per micro-batch when btrm.plan is missing or fails
        "budget_cap": 65536,  # throughput: MFU is flat well before the planner's budget; keeps each step short
        "memory_model": "qwen3-1.7b",
        "memory_budget_cap": 2**20,  # the memory part measures at the planner's largest budget (btrm.plan's own cap)
        "trainer_model": {
            "hidden_size": 512,
            "intermediate_size": 1536,
            "num_hidden_layers": 4,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 128,
            "vocab_size": None,
        },
        # the default run keeps trainer.yaml's budget (auto: the trainer runs btrm.plan at start-up); the others set
        # one, so that only one run pays for the planning
        "trainer_runs": {
            "fsdp2": [],
            "fsdp": ["model.strategy=fsdp", "data.max_tokens_per_micro_batch=8192"],
            "fsdp2_cpu_offload": ["model.fsdp_config.cpu_offload=true", "data.max_tokens_per_micro_batch=8192"],
        },
        "trainer_steps": 2,
        "trainer_pairs": 64,  # data.max_samples: the first pairs of each demo file (16 a step)
        "trainer_run_s": 150,
    },
    "dry": {
        "device": "cpu",
        "cpu_threads": 1,  # 2 shared cores: torch's 2 threads stall behind other jobs' (10x step-time swings seen)
        "total_s": 170,
        "part_s": {"layouts": 40, "trainer": 60, "memory": 60, "throughput": 60},
        "plan_s": 60,
        "max_length": 1024,  # long enough that left truncation keeps the prompts: the shared layout shares them
        "plan_tokens": 2048,
        "gpu_memory_gib": 0.1,  # a tiny "GPU": the planner's budget search (its cost grows with the budget) stays short
        "layout_model": {**TINY_BLOCK, "vocab_size": 512},
        "layout_pairs": 2,
        "layout_repeats": 1,
        "throughput_models": ["cpu-small"],
        "throughput_modes": ["packed", "shared", "batch_pad"],
        "throughput_model_s": 50,
        "default_budget": 2048,
        "budget_cap": 2048,
        "memory_model": "cpu-small",
        "memory_budget_cap": 2048,  # = plan_tokens: one measured step, one plan
        "trainer_model": {**TINY_BLOCK, "vocab_size": None},
        "trainer_runs": {"fsdp2": []},  # FSDP1 needs a GPU; CPU offload is the same code path as fsdp2 here
        "trainer_steps": 2,
        "trainer_pairs": 32,
        "trainer_run_s": 50,
    },
}
# Run order: correctness and the real trainer first, the longest measurement last (the deadline cuts only later parts).
PART_ORDER = ("layouts", "trainer", "memory", "throughput")
REPORT_ORDER = ("layouts", "throughput", "memory", "trainer")  # (a) to (d) in the JSON and the table
MIN_PART_S = 15  # a part with less time than this left is skipped rather than started
TAIL_CHARS = 2000  # of a failed command's output, in the JSON (the full logs are copied with it)
ERROR_LINE = re.compile(r"\b\w*(Error|Exception)\b|^error: |FAILED|Traceback")
PLAN_FIELDS = (  # of a btrm.plan result, kept in the report (the whole plan is in the work directory's plans/)
    "tokens",
    "max_tokens_per_micro_batch",
    "fits",
    "peak_gib",
    "peak_phase",
    "allocated_peak_gib",
    "reserved_peak_gib",
    "model_states_gib",
    "activations_gib",
    "usable_gib",
    "predicted_tokens_per_s",
    "wall_s",
)
GIB = 2**30


# ----------------------------------------------------------------------------- processes


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (torchrun starts its workers in their own sessions, so a process group misses them)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        parent = int(stat.rsplit(")", 1)[1].split()[1])  # the name in parentheses may hold spaces
        children.setdefault(parent, []).append(int(entry.name))
    found, frontier = [], [pid]
    while frontier:
        kids = children.get(frontier.pop(), [])
        found.extend(kids)
        frontier.extend(kids)
    return found


def stop_tree(proc: subprocess.Popen) -> None:
    """SIGTERM the process and everything it started (torchrun forwards it to its ranks), SIGKILL what is left."""
    pids = [proc.pid, *descendants(proc.pid)]
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=10)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    proc.wait()


def start_command(cmd: list[str], log_stem: Path, env: dict | None = None, cwd: Path | None = None):
    """Start `cmd` with stdout and stderr in log_stem.out / .err; returns (process, out path, err path)."""
    log_stem.parent.mkdir(parents=True, exist_ok=True)
    out_path, err_path = log_stem.with_suffix(".out"), log_stem.with_suffix(".err")
    with open(out_path, "w") as out, open(err_path, "w") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env, cwd=cwd, start_new_session=True)
    return proc, out_path, err_path


def run_command(cmd: list[str], log_stem: Path, timeout: float, env: dict | None = None, cwd: Path | None = None):
    """Run `cmd` (logs as start_command); past `timeout` seconds stop it and everything it started."""
    start = time.monotonic()
    proc, out_path, err_path = start_command(cmd, log_stem, env, cwd)
    try:
        rc, timed_out = proc.wait(timeout=max(1.0, timeout)), False
    except subprocess.TimeoutExpired:
        stop_tree(proc)
        rc, timed_out = proc.returncode, True
    seconds = round(time.monotonic() - start, 1)
    return {"rc": rc, "timed_out": timed_out, "seconds": seconds, "out": out_path, "err": err_path}


def tail(*paths: Path, chars: int = TAIL_CHARS) -> str:
    """A failed command's first error lines, then its last lines (torchrun ends with a summary that names no error)."""
    lines = [line for p in paths if p.exists() for line in p.read_text(errors="replace").splitlines() if line.strip()]
    errors = [line for line in lines if ERROR_LINE.search(line)][:6]
    return "\n".join([*errors, "...", *lines[-12:]])[-chars:]


def last_json_line(path: Path) -> dict | None:
    for line in reversed(path.read_text(errors="replace").splitlines()):
        if line.startswith("{"):
            with contextlib.suppress(json.JSONDecodeError):
                return json.loads(line)
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def error_line(error: BaseException) -> str:
    return f"{type(error).__name__}: {' '.join(str(error).split())}"[:TAIL_CHARS]


# ----------------------------------------------------------------------------- shared inputs (built once per workdir)


def publish(path: Path, build: Callable[[Path], None]) -> Path:
    """`path`, built by `build` into a temporary folder and renamed into place unless another process got there first
    (the background planner and the parts prepare the same inputs; neither ever sees half of one)."""
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}."))
    try:
        build(temp)
        os.rename(temp, path)
    except OSError:
        if not path.exists():
            raise
    finally:
        shutil.rmtree(temp, ignore_errors=True)
    return path


def write_json(path: Path, data: dict) -> None:
    from btrm.atomic import atomic_write_text

    atomic_write_text(path, json.dumps(data) + "\n")


class Context:
    """What a worker knows: its mode's sizes, the shared work directory and the run's deadline."""

    def __init__(self, mode: str, workdir: Path, deadline: float):
        self.mode, self.sizes, self.workdir, self.deadline = mode, SIZES[mode], workdir, deadline

    @property
    def device(self) -> str:
        return self.sizes["device"]

    def remaining(self) -> float:
        return self.deadline - time.time()

    def gpu_memory_gib(self) -> float:
        """What the planner plans for: SIZES' gpu_memory_gib, else GPU 0's memory as nvidia-smi reported it (the main
        process passes it down: asking torch would start CUDA in the background planner)."""
        if self.sizes["gpu_memory_gib"] is not None:
            return float(self.sizes["gpu_memory_gib"])
        if os.environ.get("GPU_CHECK_GPU_MEMORY_GIB"):
            return float(os.environ["GPU_CHECK_GPU_MEMORY_GIB"])
        import torch

        return torch.cuda.get_device_properties(0).total_memory / GIB

    def tokenizer(self):
        """The demo tokenizer (byte-level BPE trained on the demo data: seconds), trained once per workdir."""
        from transformers import AutoTokenizer

        def build(folder: Path) -> None:
            from demo.make_tiny_model import build_tokenizer, corpus_texts

            build_tokenizer(corpus_texts()).save_pretrained(folder)

        return AutoTokenizer.from_pretrained(publish(self.workdir / "tokenizer", build))

    def model_dir(self, name: str, dims: dict, *, weights: bool) -> Path:
        """A causal-LM checkpoint directory (as Qwen/Qwen3-* ships) with random weights, or with its config only.

        Weights are initialised on the run's device in its compute dtype: a Qwen3-1.7B-sized init takes seconds
        there, a minute on CPU; the trainer loads them as fp32 master weights (model.fsdp_config.model_dtype).
        Embeddings are tied, as Qwen3-1.7B and -4B ship them (the value head has no lm_head either way).
        """
        import torch
        from transformers import Qwen3Config, Qwen3ForCausalLM

        def build(folder: Path) -> None:
            tokenizer = self.tokenizer()
            config = Qwen3Config(
                **{**dims, "vocab_size": dims.get("vocab_size") or len(tokenizer)},
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
                bos_token_id=None,
                max_position_embeddings=40960,
                tie_word_embeddings=True,
            )
            if weights:
                torch.manual_seed(0)
                with torch.device(self.device):
                    model = Qwen3ForCausalLM._from_config(
                        config, dtype=torch.bfloat16 if self.device == "cuda" else torch.float32
                    )
                model.save_pretrained(folder)
                del model
                if self.device == "cuda":
                    torch.cuda.empty_cache()
            else:
                config.save_pretrained(folder)
            tokenizer.save_pretrained(folder)

        return publish(self.workdir / "models" / (name if weights else f"{name}-config"), build)

    def data_dir(self) -> Path:
        """The bundled synthetic demo data, prepared as demo/run_demo.sh does (train.parquet, test.parquet)."""

        def build(folder: Path) -> None:
            import prepare_helpsteer2

            with contextlib.redirect_stdout(sys.stderr):
                rc = prepare_helpsteer2.main(
                    ["--input", str(REPO / "demo" / "helpsteer2_demo.jsonl.gz"), "--output-dir", str(folder)]
                )
            if rc != 0:
                raise RuntimeError(f"prepare_helpsteer2.py exited with {rc}")

        return publish(self.workdir / "data", build)

    def trainer_overrides(self, model_dir: Path, *extra: str) -> list[str]:
        """Hydra overrides of a one-device trainer config on `model_dir`, at SIZES' max_length and plan_tokens."""
        data = self.data_dir()
        return [
            f"model.partial_pretrain={model_dir}",
            f"data.train_files={data / 'train.parquet'}",
            f"data.val_files={data / 'test.parquet'}",
            f"data.max_length={self.sizes['max_length']}",
            f"data.max_tokens_per_micro_batch={self.sizes['plan_tokens']}",
            f"trainer.device={self.device}",
            *extra,
        ]

    def plan_overrides(self, model: str) -> list[str]:
        """The config every plan of `model` is made for (the planner reads config.json only: no weights needed)."""
        from bench import bench_throughput as bench

        return self.trainer_overrides(self.model_dir(model, bench.MODEL_CONFIGS[model], weights=False))

    # ---- btrm.plan, cached: plans/<model>-<tokens>.json, with a <...>.running marker (its pid) while being made

    def plan_path(self, model: str, tokens: int | None) -> Path:
        return self.workdir / "plans" / f"{model}-{tokens or 'default'}.json"

    def plan(self, model: str, tokens: int | None = None) -> dict:
        """btrm.plan.plan_from_overrides of `model` at `tokens` (None: the planner's default): from the cache, from
        the background planner (waited for), or made now in a subprocess with SIZES' plan_s as its limit.
        A failure is a dict with `error`."""
        path = self.plan_path(model, tokens)
        marker = path.with_suffix(".running")
        limit = time.time() + min(self.sizes["plan_s"], self.remaining())
        while not path.exists() and time.time() < limit:
            try:
                pid = int(marker.read_text())
            except (OSError, ValueError):
                break
            if not process_alive(pid):
                break
            time.sleep(1)
        if not path.exists():
            spec = {"model": model, "tokens": tokens}
            timeout = max(1.0, limit - time.time())
            answer = run_worker_command(self, "plan", f"plan-{path.stem}", timeout, spec)
            if not path.exists():
                return answer if "error" in answer else {"error": "the planner wrote no plan"}
        return json.loads(path.read_text())

    def make_plan(self, model: str, tokens: int | None) -> dict:
        """Run the planner here and cache its plan (or its error, so that nobody waits for it again)."""
        path = self.plan_path(model, tokens)
        marker = path.with_suffix(".running")
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(str(os.getpid()))
        try:
            from btrm import plan

            overrides = self.plan_overrides(model)
            with contextlib.redirect_stdout(sys.stderr):
                result = plan.plan_from_overrides(
                    overrides, gpus=1, gpu_memory_gib=self.gpu_memory_gib(), tokens=tokens
                )
            result["overrides"] = overrides
        except Exception as error:  # the planner is new: its failure is a finding, recorded where it is used
            result = {"error": error_line(error)}
        finally:
            marker.unlink(missing_ok=True)
        write_json(path, result)
        return result

    def budget(self, model: str, cap: int) -> dict:
        """The token budget a run of `model` uses: the planner's largest fitting budget, capped; else the default."""
        default = self.sizes["default_budget"]
        if not planner_available():
            return {"budget": default, "source": "default (btrm.plan missing)"}
        planned = self.plan(model)
        tokens = planned.get("max_tokens_per_micro_batch")
        if "error" in planned:
            return {"budget": default, "source": "default (btrm.plan failed)", "planner_error": planned["error"]}
        if not tokens:
            return {"budget": default, "source": "default (the planner found no fitting budget)"}
        budget = min(int(tokens), cap)
        source = "planner" if budget == tokens else f"planner's {tokens}, capped at {cap}"
        return {"budget": budget, "planner_budget": int(tokens), "source": source}


def planner_available() -> bool:
    return importlib.util.find_spec("btrm.plan") is not None


def plan_summary(plan: dict) -> dict:
    return {"error": plan["error"]} if "error" in plan else {k: plan.get(k) for k in PLAN_FIELDS}


def pairs_within(pairs, budget: int, layout: str) -> list:
    """The longest prefix of `pairs` whose computed tokens in `layout` fit in `budget` (at least one pair)."""
    taken, used = [], 0
    for pair in pairs:
        tokens = pair.computed_tokens(layout)
        if taken and used + tokens > budget:
            break
        taken.append(pair)
        used += tokens
    return taken


def one_full_micro_batch(pool, budget: int, layout: str) -> list:
    """Pairs filling one micro-batch of exactly `budget` computed tokens (what the planner simulates): a prefix of
    `pool`, then a filler pair of the tokens left (its two sides start differently: no shared prefix)."""
    from btrm.pair_dataset import TokenizedPair

    pairs = pairs_within(pool, budget, layout)
    gap = budget - sum(p.computed_tokens(layout) for p in pairs)
    if gap >= 2:
        pairs.append(TokenizedPair([3] + [4] * ((gap + 1) // 2 - 1), [5] + [4] * (gap // 2 - 1)))
    return pairs


# ----------------------------------------------------------------------------- environment (main process, no torch)


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
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10)
        result["git_commit"] = head.stdout.strip() or None
    return result


def torch_runtime(device: str) -> dict:
    """torch's version and view of the device, and the varlen_attn signature the segment attention calls."""
    import inspect

    import torch

    result = {"torch": torch.__version__, "cuda": torch.version.cuda, "threads": torch.get_num_threads()}
    try:
        from torch.nn.attention.varlen import varlen_attn

        result["varlen_attn_signature"] = str(inspect.signature(varlen_attn))
    except Exception as error:
        result["varlen_attn_signature"] = error_line(error)
    if device == "cuda":
        properties = torch.cuda.get_device_properties(0)
        result.update(
            device_name=properties.name,
            device_count=torch.cuda.device_count(),
            gpu_memory_gib=round(properties.total_memory / GIB, 2),
            capability=f"{properties.major}.{properties.minor}",
            bf16_supported=torch.cuda.is_bf16_supported(),
        )
    return result


# ----------------------------------------------------------------------------- parts (each runs in its own process)


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


def part_memory(ctx: Context) -> dict:
    """(c) peak memory of the real trainer's step against btrm.plan's prediction for the same overrides and tokens."""
    import resource

    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from bench import bench_throughput as bench
    from bt_trainer import BTRewardTrainer
    from btrm import batching, schema
    from btrm.modeling import init_distributed, resolve_param_dtype
    from btrm.pair_dataset import create_pair_dataset, load_tokenizer

    sizes, device, model = ctx.sizes, ctx.device, ctx.sizes["memory_model"]
    cuda = device == "cuda"
    dims = bench.MODEL_CONFIGS[model]
    model_dir = ctx.model_dir(model, dims, weights=True)  # while the background planner works
    # The planner's config, on the checkpoint with weights (the same config.json): plans are made for plan_overrides.
    overrides = ctx.trainer_overrides(
        model_dir,
        "data.train_batch_size=16",
        "data.max_samples=32",  # the datasets go unused: steps get synthetic HelpSteer2-like pairs
        f"trainer.save_path={ctx.workdir / 'memory-ckpt'}",
        "trainer.experiment_name=memory",
        "trainer.check_layout=false",  # run on its own after the steps
    )
    budgets = [sizes["plan_tokens"]]
    result: dict = {"model": model, "trainer_overrides": overrides, "steps": {}}
    if planner_available():
        largest = ctx.budget(model, sizes["memory_budget_cap"])
        result["planned_budget"] = largest
        if largest["budget"] != budgets[0] and "planner_budget" in largest:
            budgets.append(largest["budget"])
    else:
        result["planner"] = {"skipped": "btrm.plan missing"}

    config = schema.compose_config(overrides)
    schema.check_config(config, world_size=1)
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(free_port()),
        RANK="0",
        LOCAL_RANK="0",
        WORLD_SIZE="1",
        LOCAL_WORLD_SIZE="1",
    )
    init_distributed(device)
    mesh = init_device_mesh(device_type=device, mesh_shape=(1,), mesh_dim_names=("fsdp",))
    tokenizer = load_tokenizer(str(model_dir), config.data, False)
    datasets = [
        create_pair_dataset(f, config.data, tokenizer) for f in (config.data.train_files, config.data.val_files)
    ]
    with contextlib.redirect_stdout(sys.stderr):  # its start-up summary would end up before the JSON line
        trainer = BTRewardTrainer(config, mesh, tokenizer, *datasets)
    layout = trainer.layout
    pool = bench.helpsteer2_like_pairs(max(budgets) // 600 + 8, dims["vocab_size"], sizes["max_length"], seed=1)

    def step(tokens: int) -> dict:
        # one micro-batch of exactly `tokens` computed tokens; the trainer reads its budget from token_budget
        # (resolved at start-up) where it has one, else from the config
        config.data.max_tokens_per_micro_batch = tokens
        if hasattr(trainer, "token_budget"):
            trainer.token_budget = type(trainer.token_budget)(tokens, "bench/gpu_check.py")
        pairs = one_full_micro_batch(pool, tokens, layout)
        entry: dict = {"tokens": sum(p.computed_tokens(layout) for p in pairs), "pairs": len(pairs)}
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()  # reserved memory of an earlier, larger step would count otherwise
            torch.cuda.reset_peak_memory_stats()
        try:
            with contextlib.redirect_stdout(sys.stderr):
                metrics = trainer.training_step(pairs)
            entry.update(
                micro_batches=metrics.get("train/micro_batches"),
                step_s=metrics["train/time(s)"],
                real_tokens_per_s=metrics["train/real_tokens_per_s"],
                loss=metrics["train/loss"],
            )
        except torch.cuda.OutOfMemoryError as error:  # the planner said it fits: that it did not is the finding
            entry.update(oom=True, error=error_line(error))
            trainer.optimizer.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
            entry.update(
                peak_allocated_gib=torch.cuda.max_memory_allocated() / GIB,
                peak_reserved_gib=torch.cuda.max_memory_reserved() / GIB,
                resident_after_step_gib=torch.cuda.memory_allocated() / GIB,  # weights, grads, AdamW state
            )
        else:  # no per-step figure on CPU: the process's high-water mark (KiB), Python and libraries included
            entry["process_peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        return entry

    result["warm_up"] = step(budgets[0])  # AdamW's state is created at the first optimizer step
    for tokens in budgets:
        try:
            entry = step(tokens)
        except Exception as error:  # not an OOM: recorded, and the next budget still runs
            entry = {"tokens": tokens, "error": error_line(error)}
        if planner_available():
            predicted = plan_summary(ctx.plan(model, None if tokens == sizes["plan_tokens"] else tokens))
            entry["predicted"] = predicted
            if predicted.get("tokens") not in (None, entry["tokens"]):
                entry["planner_tokens_differ"] = predicted["tokens"]
            for measured, planned in (
                ("peak_allocated_gib", "allocated_peak_gib"),
                ("peak_reserved_gib", "reserved_peak_gib"),
            ):
                if entry.get(measured) and predicted.get(planned):
                    entry[f"{measured}_over_predicted"] = entry[measured] / predicted[planned]
            if entry.get("real_tokens_per_s") and predicted.get("predicted_tokens_per_s"):
                entry["tokens_per_s_over_predicted"] = entry["real_tokens_per_s"] / predicted["predicted_tokens_per_s"]
        result["steps"][str(tokens)] = entry
    # the trainer's start-up check (trainer.check_layout, on by default), on this FSDP2 model: its 2 shortest pairs
    try:
        sample = sorted(pool[:16], key=lambda pair: pair.num_tokens)[:2]
        dtype = resolve_param_dtype(config.model.mixed_precision, device)
        check = batching.check_layout(trainer.fsdp_model, sample, tokenizer.pad_token_id, layout, device, dtype)
        result["layout_check"] = {
            "layout": layout,
            "dtype": str(dtype).removeprefix("torch."),
            "max_difference": check.max_difference,
            "tolerance": check.tolerance,
            "within_tolerance": bool(check.ratio <= 1.0),
        }
    except Exception as error:
        result["layout_check"] = {"error": error_line(error)}
    dist.destroy_process_group()
    return result


def part_throughput(ctx: Context) -> dict:
    """(b) bench_throughput's worker for each mode at the planned budget; one subprocess per model."""
    from bench import bench_throughput as bench

    sizes = ctx.sizes
    result: dict = {"models": {}}
    for model in sizes["throughput_models"]:
        budget = ctx.budget(model, sizes["budget_cap"])
        pool = bench.helpsteer2_like_pairs(
            budget["budget"] // 600 + 8, bench.MODEL_CONFIGS[model]["vocab_size"], sizes["max_length"], seed=0
        )
        spec = {
            "model": model,
            "modes": sizes["throughput_modes"],
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
            entry.update(run_worker_command(ctx, "throughput-model", f"throughput-{model}", timeout, spec))
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
        gc.collect()  # the run's model and optimizer, before the next one is built
        if cuda:
            torch.cuda.empty_cache()
    return {"runs": runs}


def worker_prefetch(ctx: Context, spec: dict) -> dict:
    """Background planning of one model: the planner's default micro-batch (its largest fitting budget comes with
    it), then, for the memory part's model, its largest budget as the memory part will measure it."""
    plans = {"default": plan_summary(ctx.make_plan(spec["model"], None))}
    if spec["memory"]:
        budget = ctx.budget(spec["model"], ctx.sizes["memory_budget_cap"])
        if "planner_budget" in budget and budget["budget"] != ctx.sizes["plan_tokens"]:
            plans[str(budget["budget"])] = plan_summary(ctx.make_plan(spec["model"], budget["budget"]))
    return plans


PARTS = {"layouts": part_layouts, "trainer": part_trainer, "memory": part_memory, "throughput": part_throughput}
WORKERS = {
    **{name: lambda ctx, spec, part=part: part(ctx) for name, part in PARTS.items()},
    "throughput-model": worker_throughput_model,
    "plan": lambda ctx, spec: plan_summary(ctx.make_plan(spec["model"], spec["tokens"])),
    "prefetch": worker_prefetch,
}


def worker_command(ctx: Context, worker: str, spec: dict | None) -> list[str]:
    return [
        sys.executable,
        str(Path(__file__).resolve()),
        "--worker",
        worker,
        "--workdir",
        str(ctx.workdir),
        "--deadline",
        str(ctx.deadline),
        *(["--dry"] if ctx.mode == "dry" else []),
        *(["--spec", json.dumps(spec)] if spec is not None else []),
    ]


def run_worker_command(ctx: Context, worker: str, log_name: str, timeout: float, spec: dict | None = None) -> dict:
    """This script as a worker in a subprocess; its last stdout line is its JSON result."""
    run = run_command(worker_command(ctx, worker, spec), ctx.workdir / "logs" / log_name, timeout, cwd=REPO)
    answer = last_json_line(run["out"]) if run["rc"] == 0 else None
    if answer is None:
        why = f"timed out after {run['seconds']} s" if run["timed_out"] else f"rc {run['rc']}"
        return {"error": why, "seconds": run["seconds"], "tail": tail(run["out"], run["err"])}
    return answer


def worker_main(args) -> None:
    ctx = Context("dry" if args.dry else "gpu", Path(args.workdir), args.deadline)
    result = WORKERS[args.worker](ctx, json.loads(args.spec) if args.spec else None)
    print(json.dumps(result), flush=True)


# ----------------------------------------------------------------------------- the report


def run_part(ctx: Context, part: str) -> dict:
    remaining = ctx.remaining()
    if remaining < MIN_PART_S:
        return {"status": "skipped", "skipped": f"out of time ({remaining:.0f} s left of total_s)"}
    timeout = min(ctx.sizes["part_s"][part], remaining)
    print(f"gpu_check: {part} (limit {timeout:.0f} s) ...", file=sys.stderr, flush=True)
    start = time.monotonic()
    answer = run_worker_command(ctx, part, part, timeout)
    seconds = round(time.monotonic() - start, 1)
    if "error" in answer and "tail" in answer:  # the worker itself failed
        return {"status": "error", "seconds": seconds, **answer}
    if part == "memory" and not planner_available():
        return {"status": "skipped", "skipped": "btrm.plan missing", "seconds": seconds, "result": answer}
    problems = list(find_problems(answer))
    return {"status": "partial" if problems else "ok", "seconds": seconds, "problems": problems, "result": answer}


def find_problems(tree, path: str = ""):
    """Paths of every `error`, `skipped` or `planner_error` entry in a part's result (a sub-run that failed or never
    ran), and every layout outside its tolerance."""
    if isinstance(tree, dict):
        for key, value in tree.items():
            if key in ("error", "skipped", "planner_error") or (key == "within_tolerance" and value is False):
                yield f"{path or '.'}: {key}: {str(value)[:300]}"
            else:
                yield from find_problems(value, f"{path}/{key}")


def start_prefetch(ctx: Context) -> list[tuple[str, subprocess.Popen]]:
    """The background planners (btrm.plan is CPU work on fake tensors: it overlaps the GPU parts)."""
    if not planner_available():
        return []
    sizes = ctx.sizes
    models = dict.fromkeys([sizes["memory_model"], *sizes["throughput_models"]])
    started = []
    for model in models:
        spec = {"model": model, "memory": model == sizes["memory_model"]}
        proc, _, _ = start_command(worker_command(ctx, "prefetch", spec), ctx.workdir / "logs" / f"prefetch-{model}")
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
    parts, env = report["parts"], report["environment"]
    lines = [
        f"gpu_check ({report['mode']}) on {env.get('device_name')}: torch {env.get('torch')}, "
        f"transformers {env.get('transformers')}, verl {env.get('verl')}; {report['seconds']:.0f} s; {report['setup']}"
    ]
    for part in REPORT_ORDER:
        entry = parts.get(part, {})
        lines.append(f"[{part}] {entry.get('status', 'not run')} ({fmt(entry.get('seconds'))} s)")
        lines.extend(f"  ! {problem}" for problem in entry.get("problems", []))
        if entry.get("status") in ("error", "skipped"):
            lines.append(f"  {entry.get('error') or entry.get('skipped')}")
    layouts = (parts.get("layouts", {}).get("result") or {}).get("layouts", {})
    if layouts:
        lines.append("\n(a) layout   max diff  tolerance  within  fwd+bwd ms  computed tokens  vs padded")
        for name, e in layouts.items():
            lines.append(
                f"    {name:<8} {fmt(e.get('max_difference')):>9} {fmt(e.get('tolerance')):>10} "
                f"{fmt(e.get('within_tolerance')):>7} {fmt(e.get('fwd_bwd_ms'), '.1f'):>11} "
                f"{fmt(e.get('computed_tokens')):>16} {fmt(e.get('speedup_vs_padded'), '.2f'):>10}"
            )
    models = (parts.get("throughput", {}).get("result") or {}).get("models", {})
    if models:
        lines.append(
            "\n(b) model       mode       budget  pairs/s  real tok/s    MFU  alloc GiB  resv GiB  vs batch_pad"
        )
        for model, m in models.items():
            for mode, r in m.get("runs", {}).items():
                lines.append(
                    f"    {model:<11} {mode:<10} {m.get('budget'):>6} {fmt(r.get('pairs_per_s')):>8} "
                    f"{fmt(r.get('real_tokens_per_s'), '.0f'):>11} {fmt(r.get('mfu'), '.1%'):>6} "
                    f"{fmt(r.get('peak_memory_gib'), '.1f'):>10} {fmt(r.get('peak_reserved_gib'), '.1f'):>9} "
                    f"{fmt(r.get('speedup_vs_batch_pad'), '.2f'):>12}"
                    + (f"  {r.get('error') or r.get('skipped')}" if "error" in r or "skipped" in r else "")
                )
    memory = parts.get("memory", {}).get("result") or {}
    if memory.get("steps"):
        lines.append(
            "\n(c) tokens   alloc GiB (plan)  ratio   resv GiB (plan)  ratio   step s  tok/s vs plan"
            + ("" if report["mode"] == "gpu" else "   (CPU: process RSS, not comparable)")
        )
        for e in memory["steps"].values():
            p = e.get("predicted") or {}
            lines.append(
                f"    {fmt(e.get('tokens')):>7} {fmt(e.get('peak_allocated_gib', e.get('process_peak_rss_gib')), '.2f'):>9} "
                f"({fmt(p.get('allocated_peak_gib'), '.2f')}) {fmt(e.get('peak_allocated_gib_over_predicted'), '.2f'):>6} "
                f"{fmt(e.get('peak_reserved_gib'), '.2f'):>10} ({fmt(p.get('reserved_peak_gib'), '.2f')}) "
                f"{fmt(e.get('peak_reserved_gib_over_predicted'), '.2f'):>6} {fmt(e.get('step_s'), '.2f'):>8} "
                f"{fmt(e.get('tokens_per_s_over_predicted'), '.2f'):>14}" + ("  OOM" if e.get("oom") else "")
            )
    runs = (parts.get("trainer", {}).get("result") or {}).get("runs", {})
    if runs:
        lines.append("\n(d) run                 rc  budget  steps  steps/s  final loss  val loss  wall s")
        for name, r in runs.items():
            lines.append(
                f"    {name:<19} {fmt(r.get('rc')):>3} {fmt(r.get('token_budget')):>7} {fmt(r.get('steps')):>6} "
                f"{fmt(r.get('steps_per_s')):>8} {fmt(r.get('final_loss'), '.4f'):>11} {fmt(r.get('val_loss'), '.4f'):>9} "
                f"{fmt(r.get('wall_s'), '.0f'):>7}"
            )
    return "\n".join(lines)


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def copy_out(report_path: Path, workdir: Path, destination: Path) -> None:
    """The JSON, the plans and every log (last 256 KiB each) into `destination`: the device tool brings back only
    that folder."""
    target = destination / "gpu_check"
    (target / "logs").mkdir(parents=True, exist_ok=True)
    shutil.copy2(report_path, target / report_path.name)
    for folder in ("logs", "plans"):
        for file in sorted((workdir / folder).glob("*")):
            if file.is_file():
                (target / "logs" / file.name).write_bytes(file.read_bytes()[-256 * 1024 :])


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry", action="store_true", help="CPU, tiny sizes (SIZES['dry']): the check of this script")
    parser.add_argument("--out", type=Path, default=None, help="the JSON's path (default: see above)")
    parser.add_argument("--workdir", type=Path, default=None, help="models, data, plans, logs (default: a temp dir)")
    parser.add_argument("--keep-workdir", action="store_true", help="keep the default workdir (removed otherwise)")
    parser.add_argument("--copy-to", type=Path, default=None, help="also copy the JSON and the logs here")
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
    started = time.time()
    workdir = (args.workdir or Path(tempfile.mkdtemp(prefix="gpu_check-"))).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    ctx = Context(mode, workdir, started + SIZES[mode]["total_s"])
    if SIZES[mode]["cpu_threads"]:  # inherited by every worker and trainer process
        os.environ["OMP_NUM_THREADS"] = str(SIZES[mode]["cpu_threads"])
    report: dict = {
        "check": "bench/gpu_check.py",
        "mode": mode,
        "command": " ".join(["bench/gpu_check.py", *(argv if argv is not None else sys.argv[1:])]),
        "started": datetime.fromtimestamp(started, UTC).isoformat(timespec="seconds"),
        "setup": os.environ.get("GPU_CHECK_SETUP"),
        "sizes": SIZES[mode],
        "part_order": [p for p in PART_ORDER if p in args.parts],
        "environment": environment(),
        "parts": {},
    }
    if report["environment"].get("gpu_memory_gib"):
        os.environ["GPU_CHECK_GPU_MEMORY_GIB"] = str(report["environment"]["gpu_memory_gib"])
    prefetch = start_prefetch(ctx) if {"memory", "throughput"} & set(args.parts) else []
    try:
        for part in PART_ORDER:
            if part in args.parts:
                report["parts"][part] = run_part(ctx, part)
    finally:
        report["planner"] = {
            "background": stop_prefetch(prefetch),
            "plans": {p.stem: plan_summary(json.loads(p.read_text())) for p in sorted(workdir.glob("plans/*.json"))},
        }
    report["seconds"] = round(time.time() - started, 1)
    report["parts"] = {p: report["parts"][p] for p in REPORT_ORDER if p in report["parts"]}

    stamp = datetime.fromtimestamp(started).strftime("%Y%m%d-%H%M%S")
    device = slug(report["environment"]["device_name"]) if mode == "gpu" else "cpu-dry"
    default_dir = REPO / "bench" / "results" if mode == "gpu" else Path(tempfile.gettempdir())
    out = args.out or default_dir / f"gpu_check-{device}-{stamp}.json"
    from btrm.atomic import atomic_write_text

    atomic_write_text(out, json.dumps(report, indent=1) + "\n")
    if args.copy_to:
        try:
            copy_out(out, workdir, args.copy_to)
        except OSError as error:
            print(f"gpu_check: could not copy to {args.copy_to}: {error}", file=sys.stderr)
    if args.workdir is None and not args.keep_workdir:
        shutil.rmtree(workdir, ignore_errors=True)
    print(summary_table(report))
    print(f"wrote {out}")
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    main()

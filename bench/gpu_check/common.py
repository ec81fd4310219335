"""What every part of the GPU check shares: processes with time limits, the work directory's inputs (tokenizer,
random models, demo data, cached btrm.plan plans), and the worker subprocesses (`python -m bench.gpu_check --worker`)."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from bench.gpu_check.sizes import SIZES

REPO = Path(__file__).resolve().parents[2]
TAIL_CHARS = 2000  # of a failed command's output, in the JSON (the full logs are in the log archive)
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


def run_command(
    cmd: list[str],
    log_stem: Path,
    timeout: float,
    env: dict | None = None,
    cwd: Path | None = None,
    on_line: Callable[[str], None] | None = None,
):
    """Run `cmd` (logs as start_command); past `timeout` seconds, or when this process is interrupted, stop it and
    everything it started. on_line gets each complete stdout line as it is written (polled every second)."""
    start = time.monotonic()
    proc, out_path, err_path = start_command(cmd, log_stem, env, cwd)
    seen = 0
    timed_out = False

    def read_new_lines() -> None:
        nonlocal seen
        text = out_path.read_text(errors="replace")
        complete = text[seen:].rpartition("\n")[0]
        if complete:
            seen += len(complete) + 1
            for line in complete.splitlines():
                on_line(line)

    try:
        while True:
            left = timeout - (time.monotonic() - start)
            try:
                proc.wait(timeout=max(0.1, min(1.0, left)) if on_line else max(1.0, left))
                break
            except subprocess.TimeoutExpired:
                if on_line:
                    read_new_lines()
                if time.monotonic() - start >= timeout:
                    stop_tree(proc)
                    timed_out = True
                    break
    except BaseException:
        stop_tree(proc)
        raise
    if on_line:
        read_new_lines()
    seconds = round(time.monotonic() - start, 1)
    return {"rc": proc.returncode, "timed_out": timed_out, "seconds": seconds, "out": out_path, "err": err_path}


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


def worker_command(ctx: Context, worker: str, spec: dict | None) -> list[str]:
    return [
        sys.executable,
        "-m",
        "bench.gpu_check",
        "--worker",
        worker,
        "--workdir",
        str(ctx.workdir),
        "--deadline",
        str(ctx.deadline),
        *(["--dry"] if ctx.mode == "dry" else []),
        *(["--spec", json.dumps(spec)] if spec is not None else []),
    ]


def run_worker_command(
    ctx: Context,
    worker: str,
    log_name: str,
    timeout: float,
    spec: dict | None = None,
    on_line: Callable[[str], None] | None = None,
) -> dict:
    """A worker in a subprocess (from the repository root); its last stdout line is its JSON result."""
    command = worker_command(ctx, worker, spec)
    run = run_command(command, ctx.workdir / "logs" / log_name, timeout, cwd=REPO, on_line=on_line)
    answer = last_json_line(run["out"]) if run["rc"] == 0 else None
    if answer is None:
        why = f"timed out after {run['seconds']} s" if run["timed_out"] else f"rc {run['rc']}"
        return {"error": why, "seconds": run["seconds"], "tail": tail(run["out"], run["err"])}
    return answer


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

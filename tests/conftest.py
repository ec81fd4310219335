"""Shared fixtures: everything is built offline on CPU, in temporary directories."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny random Qwen3 causal LM + byte-level BPE tokenizer with a ChatML template."""
    from demo.make_tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-qwen3"), seed=0)


@pytest.fixture(scope="session")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="session")
def demo_data_dir(tmp_path_factory) -> Path:
    """The bundled synthetic demo data, prepared into train.parquet / test.parquet."""
    import prepare_helpsteer2

    out = tmp_path_factory.mktemp("demo-data")
    assert (
        prepare_helpsteer2.main(["--input", str(REPO / "demo" / "helpsteer2_demo.jsonl.gz"), "--output-dir", str(out)])
        == 0
    )
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def one_rank_group():
    """A one-rank gloo process group in this process, for trainer methods that call collectives."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def closed_loopback_port() -> int:
    """A loopback port nothing listens on: connecting is refused at once."""
    return free_port()


def trainer_env(tmp_path: Path, model_dir: Path, data_dir: Path, nproc: int, name: str) -> dict:
    """run_bt_rm.sh's environment knobs for a small CPU run writing under tmp_path."""
    return {
        **os.environ,
        "N_GPUS_PER_NODE": str(nproc),
        "MASTER_PORT": str(free_port()),
        "PYTHON": sys.executable,
        "MODEL_PATH": str(model_dir),
        "TRAIN_FILE": str(data_dir / "train.parquet"),
        "VAL_FILE": str(data_dir / "test.parquet"),
        "SAVE_PATH": str(tmp_path / "ckpt"),
        "EXPERIMENT_NAME": name,
        "VERL_FILE_LOGGER_PATH": str(tmp_path / f"{name}.jsonl"),
        "TRAIN_BATCH_SIZE": "8",
        "MICRO_BATCH_SIZE": "2",
        "LR": "1e-3",
        "TOTAL_EPOCHS": "1",
        "MAX_LENGTH": "1024",
        "CUDA_VISIBLE_DEVICES": "",
    }


def run_trainer(
    tmp_path: Path,
    model_dir: Path,
    data_dir: Path,
    *overrides: str,
    nproc: int = 2,
    name: str = "run",
    timeout: int = 300,
    expect_success: bool = True,
    extra_env: dict | None = None,
):
    """Launch bt_trainer.py through run_bt_rm.sh on `nproc` CPU ranks; returns (completed process, metrics file)."""
    metrics_file = tmp_path / f"{name}.jsonl"
    env = {**trainer_env(tmp_path, model_dir, data_dir, nproc, name), **(extra_env or {})}
    result = subprocess.run(
        ["bash", str(REPO / "run_bt_rm.sh"), "trainer.logger=[console,file]", "trainer.device=cpu", *overrides],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if expect_success:
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result, metrics_file


def read_metrics(metrics_file: Path) -> dict[int, dict[str, float]]:
    """verl's file logger lines, merged per step: {step: {metric: value}}."""
    import json

    merged: dict[int, dict[str, float]] = {}
    for line in metrics_file.read_text().splitlines():
        record = json.loads(line)
        merged.setdefault(record["step"], {}).update(record["data"])
    return merged


# ---- the reference run: 2 epochs of 6 steps on 2 ranks, validated and saved every 3 steps. Resumed and
# interrupted runs (tests/test_bt_trainer.py, tests/test_faults.py) must end equal to it.

REFERENCE = (
    "data.max_samples=48",
    "trainer.total_epochs=2",
    "trainer.test_freq=3",
    "trainer.save_freq=3",
    "trainer.checkpoint.save_contents=[model,optimizer,extra]",
)


@pytest.fixture(scope="session")
def reference_run(tmp_path_factory, tiny_model_dir, demo_data_dir):
    tmp_path = tmp_path_factory.mktemp("reference")
    result, _ = run_trainer(tmp_path, tiny_model_dir, demo_data_dir, *REFERENCE, name="reference")
    return tmp_path, result, history(tmp_path, "reference")


def history(tmp_path: Path, name: str) -> dict[int, dict[str, float]]:
    """The trainer's own history file (spans resumed launches), without wall-clock metrics."""
    return {step: without_timings(m) for step, m in read_metrics(tmp_path / "ckpt" / name / "metrics.jsonl").items()}


def without_timings(metrics: dict[str, float]) -> dict[str, float]:
    return {
        k: v for k, v in metrics.items() if k not in ("train/time(s)", "train/pairs_per_s", "train/real_tokens_per_s")
    }

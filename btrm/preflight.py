"""Pre-flight input checks: the data files, the model and the checkpoint to resume; the hub probe.

  - the data files: they exist, are files, not directories, are not empty, and are not both
    training and validation data (btrm.rows.check_data_files);
  - the model: a local directory with config.json, or a hub id with the hub reachable (one probe,
    3 seconds at most) or, under HF_HUB_OFFLINE=1, in the local Hugging Face cache;
  - the checkpoint a resume would read (btrm.checkpoint.find_resume_checkpoint), when the world
    size is known.
The launcher runs them before torchrun starts; bt_trainer.run() repeats them on rank 0 (the result
shared with the other ranks), so a launch that bypasses the launcher (plain torchrun) is checked too.

At start-up, once the data is read (bt_trainer.run, rank 0): warn_about_data, one warning line each for
data.group_columns that no validation pair has, and a data.max_tokens_per_micro_batch smaller than every pair.

The hub probe (a TCP connection to where the hub client would connect first: the HTTPS proxy, else
HF_ENDPOINT) is this project's only one: the model check uses it, and so does
hub_unreachable_reason, which the scripts that download data sets (prepare_helpsteer2.py,
evaluate_rm.py) call so that an offline machine fails in seconds rather than after `datasets`'
retries.
"""

from __future__ import annotations

import os
import re
import socket
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from btrm import checkpoint, rows
from btrm.schema import PreflightError

HUB_PROBE_TIMEOUT_S = 3.0
# The hub client itself (huggingface_hub) reads these; the probe follows the same address and proxy.
HUB_ENDPOINT_ENV, DEFAULT_HUB_ENDPOINT = "HF_ENDPOINT", "https://huggingface.co"
TRUE_VALUES = {"1", "ON", "YES", "TRUE"}  # how huggingface_hub reads its boolean variables


# ----------------------------------------------------------------------------- data and model


def check_data(values: Mapping[str, Any]) -> None:
    """Data files exist, are files, are not empty, and are not shared between train and val."""
    try:
        rows.check_data_files(values["data.train_files"], values["data.val_files"])
    except rows.DataError as error:
        message = str(error)
        if message.endswith("no such file"):
            where = (
                ""
                if all(
                    Path(f).is_absolute()
                    for f in rows.as_file_list(values["data.train_files"]) + rows.as_file_list(values["data.val_files"])
                )
                else f" (relative paths are read from {Path.cwd()})"
            )
            message += (
                f"{where}; pass existing files (TRAIN_FILE=..., VAL_FILE=...), e.g. written by prepare_helpsteer2.py"
            )
        raise rows.DataError(message) from None


# huggingface_hub's validate_repo_id, without its length and '--' details
HUB_REPO_ID = re.compile(r"(?:[\w.-]+/)?[\w.-]{1,96}")


def looks_like_local_path(value: str) -> bool:
    """A value no hub id could be: starts like a path, or has more than one '/', or characters hub ids lack.
    A value whose first part is an existing directory (`checkpoints/run1`) is also a path."""
    if (
        value.startswith(("/", "./", "../", "~", "."))
        or "\\" in value
        or value.count("/") > 1
        or not HUB_REPO_ID.fullmatch(value)
    ):
        return True
    return "/" in value and Path(value.split("/")[0]).is_dir()


def check_model(value: str, environ: Mapping[str, str] = os.environ) -> str:
    """model.partial_pretrain is a local model directory or a usable hub id; returns how it will be read."""
    path = Path(os.path.expanduser(value))
    key = f"model.partial_pretrain={value}"
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise PreflightError(
                f"{key}: the directory has no config.json; pass a Hugging Face model directory (config.json, weights, tokenizer files)"
            )
        return f"local directory {path.resolve()}"
    if path.exists():
        raise PreflightError(f"{key}: is a file; pass the model's directory (with config.json), not a file in it")
    if looks_like_local_path(value):
        where = "" if path.is_absolute() else f" (relative paths are read from {Path.cwd()})"
        raise PreflightError(
            f"{key}: this path does not exist{where}; pass an existing model directory (with config.json) "
            "or a hub id such as Qwen/Qwen3-32B"
        )
    return check_hub_model(value, environ)


def hub_is_offline(environ: Mapping[str, str]) -> bool:
    return any(environ.get(name, "").upper() in TRUE_VALUES for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def datasets_offline(environ: Mapping[str, str]) -> bool:
    """`datasets`' own rule: HF_DATASETS_OFFLINE when set, else the hub client's offline mode."""
    if "HF_DATASETS_OFFLINE" in environ:
        return environ["HF_DATASETS_OFFLINE"].upper() in TRUE_VALUES
    return hub_is_offline(environ)


def cached_model_config(repo_id: str) -> str | None:
    """The cached config.json of a hub model (huggingface_hub's cache, HF_HOME / HF_HUB_CACHE), or None."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    found = try_to_load_from_cache(repo_id, "config.json")
    return found if isinstance(found, str) else None


def hub_address(environ: Mapping[str, str]) -> tuple[str, int, str]:
    """(host, port, what) the hub client connects to first: the HTTPS proxy if one is set, else HF_ENDPOINT."""
    for variable in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        if environ.get(variable):
            proxy = urlsplit(environ[variable] if "://" in environ[variable] else "http://" + environ[variable])
            return proxy.hostname or "", proxy.port or 80, f"the proxy in {variable}"
    endpoint = urlsplit(environ.get(HUB_ENDPOINT_ENV) or DEFAULT_HUB_ENDPOINT)
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    return endpoint.hostname or "", port, f"{endpoint.hostname}:{port}"


def probe(host: str, port: int, timeout: float) -> str | None:
    """None if a TCP connection to host:port opens within `timeout` seconds (name lookup included), else why not.
    Runs in a thread: name lookup has no timeout of its own."""
    outcome: list[str | None] = []

    def connect():
        try:
            with socket.create_connection((host, port), timeout=timeout):
                outcome.append(None)
        except OSError as error:
            outcome.append(error.strerror or type(error).__name__)

    worker = threading.Thread(target=connect, daemon=True)
    worker.start()
    worker.join(timeout)
    return outcome[0] if outcome else f"no answer within {timeout:g} s"


def probe_hub(environ: Mapping[str, str], timeout: float) -> tuple[str, str | None]:
    """(what was probed, None or why it cannot be reached) for the address the hub client connects to first."""
    host, port, what = hub_address(environ)
    return what, probe(host, port, timeout)


def hub_unreachable_reason(timeout_s: float = 5.0, environ: Mapping[str, str] = os.environ) -> str | None:
    """Why a `datasets` download from the hub would fail to connect, or None; None too in `datasets`'
    offline mode, where it reads its local cache and nothing is probed. `datasets` itself retries
    for about 25 s before giving up, hence a longer wait than the launcher's."""
    if datasets_offline(environ):
        return None
    what, problem = probe_hub(environ, timeout_s)
    return None if problem is None else f"{what} is unreachable ({problem})"


def check_hub_model(repo_id: str, environ: Mapping[str, str]) -> str:
    key = f"model.partial_pretrain={repo_id}"
    cached = cached_model_config(repo_id)
    if hub_is_offline(environ):
        if cached is None:
            raise PreflightError(
                f"{key}: not in the local Hugging Face cache, and HF_HUB_OFFLINE=1 forbids downloading it; "
                "pass a local model directory (MODEL_PATH=/path/to/model) or unset HF_HUB_OFFLINE"
            )
        return f"hub id {repo_id}, from the local cache (HF_HUB_OFFLINE=1)"
    what, problem = probe_hub(environ, HUB_PROBE_TIMEOUT_S)
    if problem is not None:
        remedy = (
            "it is in the local cache: rerun with HF_HUB_OFFLINE=1 to use that copy"
            if cached
            else "download it where the hub is reachable and pass its local directory (MODEL_PATH=/path/to/model)"
        )
        raise PreflightError(
            f"{key} is a Hugging Face hub id, but the hub cannot be reached ({what}: {problem}); {remedy}"
        )
    return f"hub id {repo_id}"


def check_resume(values: Mapping[str, Any], world_size: int) -> str:
    """The checkpoint a resume would read is whole (stat only); returns the resume state in words."""
    found = checkpoint.find_resume_checkpoint(
        values["trainer.default_local_dir"],
        mode=values["trainer.resume_mode"],
        resume_from_path=values["trainer.resume_from_path"],
        world_size=world_size,
        load_contents=list(values["trainer.checkpoint.load_contents"]),
    )
    return "fresh start" if found is None else f"from {found[0]} (step {found[1]['step']})"


def check_inputs(values: Mapping[str, Any], world_size: int | None) -> None:
    """Data, model and resume checkpoint, in that order (the cheap local checks before the hub probe)."""
    check_data(values)
    check_model(values["model.partial_pretrain"])
    if world_size:  # a checkpoint resumes only on the world size that saved it
        check_resume(values, world_size)


# ----------------------------------------------------------------------------- start-up warnings on the data read


def data_warnings(data_config, train_dataset, val_dataset) -> list[str]:
    """One line each (knob, value, what happens) for what the data makes of the config:
    - data.group_columns that no validation pair has: their metrics would silently be absent. A list equal
      to trainer.yaml's own is its documented "where present" default and is not warned about;
    - an integer data.max_tokens_per_micro_batch below every pair's computed tokens: each pair runs alone,
      over the budget."""
    from btrm import batching, schema

    lines = []
    columns = list(data_config.group_columns)
    if columns != list(schema.trainer_yaml_knobs()["data.group_columns"]):
        present = {column for groups in val_dataset.groups for column in groups}
        absent = [column for column in columns if column not in present]
        if absent:
            lines.append(
                f"WARNING: data.group_columns={schema.render(columns)}: no validation pair has "
                f"{', '.join(repr(c) for c in absent)} (data.val_files={schema.render(data_config.val_files)}); "
                f"no val/accuracy_<column>_<value> metrics for {'it' if len(absent) == 1 else 'them'}"
            )
    budget = data_config.max_tokens_per_micro_batch
    if isinstance(budget, int) and not isinstance(budget, bool):
        pairs = (dataset[i] for dataset in (train_dataset, val_dataset) for i in range(len(dataset)))
        smallest = batching.smallest_pair_over_budget(pairs, budget)
        if smallest is not None:
            lines.append(
                f"WARNING: data.max_tokens_per_micro_batch={budget} is smaller than the smallest pair "
                f"({smallest:,} computed tokens): every micro-batch holds one pair, over the budget; "
                "raise it (auto plans one)"
            )
    return lines


def warn_about_data(data_config, train_dataset, val_dataset) -> list[str]:
    """data_warnings, printed (bt_trainer.run calls this on rank 0 once the data is read)."""
    lines = data_warnings(data_config, train_dataset, val_dataset)
    for line in lines:
        print(line, flush=True)
    return lines

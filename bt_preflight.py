"""Everything checked and reported before training starts, and the launcher that checks first.

    python bt_preflight.py [torchrun options] bt_trainer.py [Hydra overrides]   # what run_bt_rm.sh runs

The launcher composes the config in this one process (about a second, nothing heavy imported) and
checks, before torchrun starts any rank:
  1. the config against trainer.yaml, which is the whole truth: a key it does not define is refused
     (also when added with Hydra's `+`), a key it defines may not be deleted (`~`), and every knob's
     type and range is checked by its rule in KNOB_RULES (which names the allowed values);
  2. the data files: they exist and are files, not directories (bt_io.check_data_files);
  3. the model: a local directory with config.json, or a hub id with the hub reachable (one probe,
     3 seconds at most) or, under HF_HUB_OFFLINE=1, in the local Hugging Face cache;
  4. the checkpoint a resume would read (bt_checkpoint.find_resume_checkpoint), when the world
     size is known here.
bt_trainer.run() repeats these checks (config on every rank, the rest on rank 0 with the result
shared), so a launch that bypasses this launcher (plain torchrun) is checked too.

Errors. An expected error (a config, data, checkpoint or divergence problem: ValueError, which
includes bt_data.DataError and PreflightError, bt_checkpoint.CheckpointError,
bt_trainer.TrainingDiverged) is one line, `error: <what is wrong, naming the key, file or value>;
<what to do>`, printed once (by this launcher or by rank 0, never per rank), appended with a time
stamp to <trainer.default_local_dir>/errors.log (inside a run also to Hydra's
<run dir>/bt_trainer.log), and ends the launch with exit status 2 (EXIT_REPORTED) and nothing more:
torchrun's failure report is kept for unexpected failures, which show their tracebacks as usual.
BT_DEBUG=1 prints the tracebacks of expected errors too.
"""

from __future__ import annotations

import contextlib
import difflib
import json
import math
import os
import re
import signal
import socket
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence
from urllib.parse import urlsplit

import bt_checkpoint
import bt_io

REPO = Path(__file__).resolve().parent
CONFIG_FILE = REPO / "trainer.yaml"
EXIT_REPORTED = 2  # a rank or the launcher stopped on an expected error and has already said why in one line
DEBUG_ENV = "BT_DEBUG"  # BT_DEBUG=1: tracebacks for expected errors too
HUB_PROBE_TIMEOUT_S = 3.0
# The hub client itself (huggingface_hub) reads these; the probe follows the same address and proxy.
HUB_ENDPOINT_ENV, DEFAULT_HUB_ENDPOINT = "HF_ENDPOINT", "https://huggingface.co"
TRUE_VALUES = {"1", "ON", "YES", "TRUE"}  # how huggingface_hub reads its boolean variables
# Errors that are the user's to fix, reported in one line without a traceback (bt_trainer adds TrainingDiverged).
EXPECTED_ERRORS: tuple[type[BaseException], ...] = (ValueError, bt_checkpoint.CheckpointError)


class PreflightError(ValueError):
    """A problem found before training starts, as one line: what is wrong (key, file, value) and what to do."""


# ----------------------------------------------------------------------------- knob rules


@dataclass(frozen=True)
class Rule:
    """What one trainer.yaml knob accepts. `expected` is said to the user; `accepts` decides."""

    expected: str
    accepts: Callable[[Any], bool]
    free_form: bool = False  # the value is the user's own mapping (e.g. tokenizer kwargs): its keys are not knobs


def render(value) -> str:
    """A value as one would write it in a Hydra override."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value if value else "''"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(render(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{render(v)}" for k, v in value.items()) + "}"
    return repr(value)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def integer(at_least: int, *, also: tuple = ()) -> Rule:
    """An integer >= at_least, or one of the special values in `also` (e.g. -1 for "all", None for "off")."""
    special = " or ".join(render(v) for v in also)
    return Rule(f"an integer >= {at_least}" + (f", or {special}" if special else ""),
                lambda v: (_is_int(v) and v >= at_least) or any(v is s or (_is_int(v) and v == s) for s in also))


def number(*, above: float | None = None, at_least: float | None = None, at_most: float | None = None) -> Rule:
    bounds = [f"> {above}" if above is not None else None, f">= {at_least}" if at_least is not None else None,
              f"<= {at_most}" if at_most is not None else None]
    return Rule("a number " + " and ".join(b for b in bounds if b),
                lambda v: _is_number(v) and (above is None or v > above) and (at_least is None or v >= at_least)
                and (at_most is None or v <= at_most))


def one_of(*values) -> Rule:
    return Rule("one of " + " | ".join(render(v) for v in values), lambda v: any(v == x and type(v) is type(x) for x in values))


def any_integer() -> Rule:
    return Rule("an integer", _is_int)


def flag() -> Rule:
    return Rule("true or false", lambda v: isinstance(v, bool))


def text(*, nullable: bool = False) -> Rule:
    return Rule("a non-empty string" + (", or null" if nullable else ""),
                lambda v: (nullable and v is None) or (isinstance(v, str) and v.strip() != ""))


def run_name() -> Rule:
    """Names used in paths and trackers; Hydra reads `trainer.experiment_name=2024` as a number, which is fine."""
    return Rule("a non-empty name", lambda v: (isinstance(v, str) and v.strip() != "") or _is_int(v))


def files() -> Rule:
    return Rule("a data file, or a [list] of data files",
                lambda v: (isinstance(v, str) and v != "") or (isinstance(v, list) and v != [] and all(isinstance(f, str) and f for f in v)))


def mapping(*, nullable: bool = False) -> Rule:
    return Rule("a mapping {key: value}" + (", or null" if nullable else ""),
                lambda v: (nullable and v is None) or isinstance(v, dict), free_form=True)


def subset(*values, non_empty: bool = False) -> Rule:
    return Rule(f"a list of {' | '.join(values)}" + (" (at least one)" if non_empty else ""),
                lambda v: isinstance(v, list) and all(isinstance(x, str) and x in values for x in v) and (v or not non_empty))


def exactly(value, why: str) -> Rule:
    return Rule(f"{render(value)} ({why})", lambda v: v == value and type(v) is type(value))


def lora_targets() -> Rule:
    return Rule("all-linear, or a non-empty [list] of module names (not the score head)",
                lambda v: v == "all-linear" or (isinstance(v, list) and v != [] and all(isinstance(x, str) and x and x != "score" for x in v)))


def betas() -> Rule:
    return Rule("[beta1, beta2], two numbers >= 0 and < 1",
                lambda v: isinstance(v, list) and len(v) == 2 and all(_is_number(b) and 0 <= b < 1 for b in v))


# Every leaf of trainer.yaml has exactly one rule here (a test checks it). Enum values that other
# modules define are mirrored here so that the launcher need not import torch; tests keep them equal.
LOSS_TYPES = ("bt", "scaled_bt", "margin")                     # bt_loss.LOSS_TYPES
PRECISIONS = ("auto", "bf16", "fp32")                          # trainer.yaml; bt_trainer.DTYPES has the dtypes
MASTER_DTYPES = ("fp32", "bf16")                               # bt_trainer.DTYPES (fp32 recommended)
TRACKERS = ("console", "file", "tensorboard", "wandb", "mlflow", "swanlab", "vemlp_wandb", "clearml", "trackio")  # verl Tracking
KNOB_RULES: dict[str, Rule] = {
    "data.train_files": files(),
    "data.val_files": files(),
    "data.chosen_key": text(),
    "data.rejected_key": text(),
    "data.format": one_of(*bt_io.PAIR_FORMATS),
    "data.prompt_key": text(),
    "data.drop_identical_pairs": flag(),
    "data.train_batch_size": integer(1),
    "data.micro_batch_size_per_gpu": integer(1),
    "data.max_tokens_per_micro_batch": integer(2, also=(None,)),
    "data.share_prompt": flag(),
    "data.max_length": integer(2),
    "data.truncation": one_of("left", "right", "error"),
    "data.max_samples": integer(1, also=(-1,)),
    "data.pad_token": text(nullable=True),
    "data.apply_chat_template_kwargs": mapping(),
    "data.dataloader_num_workers": integer(0),
    "data.chat_template": exactly(None, "verl requires null: the tokenizer's own chat template is used"),
    "data.custom_cls.path": text(nullable=True),
    "data.custom_cls.name": text(nullable=True),
    "model.partial_pretrain": text(),
    "model.trust_remote_code": flag(),
    "model.strategy": one_of("fsdp2", "fsdp"),
    "model.attn_implementation": one_of("auto", "sdpa", "eager", "flash_attention_2", "flex_attention"),
    "model.mixed_precision": one_of(*PRECISIONS),
    "model.enable_gradient_checkpointing": flag(),
    "model.lora_rank": integer(0),
    "model.lora_alpha": number(above=0),
    "model.target_modules": lora_targets(),
    "model.lora_base_dtype": one_of(*MASTER_DTYPES),
    "model.fsdp_config.model_dtype": one_of(*MASTER_DTYPES),
    "model.fsdp_config.cpu_offload": flag(),
    "model.fsdp_config.wrap_policy.min_num_params": integer(0),
    "optim.optimizer": text(),
    "optim.optimizer_impl": text(),
    "optim.lr": number(above=0),
    "optim.betas": betas(),
    "optim.weight_decay": number(at_least=0),
    "optim.warmup_steps_ratio": number(at_least=0, at_most=1),
    "optim.min_lr_ratio": number(at_least=0, at_most=1),
    "optim.lr_scheduler": one_of("cosine", "wsd", "constant"),
    "optim.clip_grad": number(above=0),
    "optim.override_optimizer_config": mapping(nullable=True),
    "loss.type": one_of(*LOSS_TYPES),
    "loss.center_rewards_coefficient": number(at_least=0),
    "loss.margin_by_strength": mapping(nullable=True),  # its keys and values: bt_loss.LossConfig
    "loss.max_strength": integer(1),
    "use_remove_padding": flag(),
    "ulysses_sequence_parallel_size": exactly(1, "sequence parallelism is not supported"),
    "trainer.device": one_of("auto", "cuda", "cpu"),
    "trainer.seed": any_integer(),
    "trainer.check_layout": flag(),
    "trainer.total_epochs": integer(1),
    "trainer.total_training_steps": integer(1, also=(None,)),
    "trainer.test_freq": integer(1, also=(-1,)),
    "trainer.save_freq": integer(1, also=(-1,)),
    "trainer.save_path": text(),
    "trainer.project_name": run_name(),
    "trainer.experiment_name": run_name(),
    "trainer.default_local_dir": text(),
    "trainer.default_hdfs_dir": text(nullable=True),
    "trainer.logger": subset(*TRACKERS),
    "trainer.wandb_mode": one_of("online", "offline", "disabled", None),
    "trainer.wandb_dir": text(nullable=True),
    "trainer.tensorboard_dir": text(nullable=True),
    "trainer.history_file": text(nullable=True),
    "trainer.curves_png": text(nullable=True),
    "trainer.max_ckpt_to_keep": integer(1, also=(None,)),
    "trainer.max_consecutive_skipped_steps": integer(1),
    "trainer.resume_mode": one_of("auto", "resume_path", "disable"),
    "trainer.resume_from_path": text(nullable=True),
    "trainer.checkpoint.save_contents": subset("model", "optimizer", "extra", "hf_model", non_empty=True),
    "trainer.checkpoint.load_contents": subset("model", "optimizer", "extra", non_empty=True),
}


# ----------------------------------------------------------------------------- strict config


def knob_values(tree: Mapping, prefix: str = "") -> dict[str, Any]:
    """{dotted key: value} of every knob. A section (a non-empty mapping without a rule of its own)
    is walked into; a knob whose value is a mapping (free-form, or empty in trainer.yaml) is one leaf."""
    values: dict[str, Any] = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if not prefix and key == "hydra":
            continue  # Hydra's own settings: Hydra checks them
        if isinstance(value, Mapping) and value and dotted not in KNOB_RULES:
            values.update(knob_values(value, dotted + "."))
        else:
            values[dotted] = value
    return values


def trainer_yaml_knobs() -> dict[str, Any]:
    """trainer.yaml's own knobs with their defaults as written (interpolations unresolved)."""
    from omegaconf import OmegaConf

    return knob_values(OmegaConf.to_container(OmegaConf.load(CONFIG_FILE), resolve=False))


def _closest(key: str, known: Iterable[str]) -> str:
    match = difflib.get_close_matches(key, list(known), n=1, cutoff=0.6)
    return f"; did you mean {match[0]}?" if match else ""


def unknown_key_error(key: str, known: Iterable[str], where: str) -> PreflightError:
    return PreflightError(f"{where}: unknown key {key}, trainer.yaml has no such knob{_closest(key, known)} "
                          "(trainer.yaml is the whole config: `+` cannot add keys; see its comments for every knob)")


def check_knob(key: str, value: Any) -> None:
    rule = KNOB_RULES.get(key)
    if rule is not None and not rule.accepts(value):
        raise PreflightError(f"{key}={render(value)}: expected {rule.expected}")


def check_config(config, *, world_size: int | None = None) -> dict[str, Any]:
    """The composed config (DictConfig or dict) checked against trainer.yaml; returns {key: resolved value}.

    Refuses keys trainer.yaml does not define (however they got in), keys it defines that are
    gone, and values outside their rule. With world_size, also the batch sizes' divisibility.
    """
    from omegaconf import DictConfig, OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    if isinstance(config, DictConfig):
        try:
            config = OmegaConf.to_container(config, resolve=True)
        except OmegaConfBaseException as error:
            raise PreflightError(f"the config cannot be resolved: {str(error).splitlines()[0]}; check the ${{...}} references you set") from None
    values = knob_values(config)
    known = trainer_yaml_knobs()
    for key, value in values.items():
        if key not in known:
            section = next((k for k in known if k.startswith(key + ".")), None)
            if section is not None:
                raise PreflightError(f"{key}={render(value)}: expected a section with keys "
                                     f"{', '.join(k[len(key) + 1:] for k in known if k.startswith(key + '.'))}")
            raise unknown_key_error(key, known, f"{key}={render(value)}")
    missing = [key for key in known if key not in values]
    if missing:
        raise PreflightError(f"{missing[0]} is missing from the config; trainer.yaml defines it: set it (e.g. to null) instead of deleting it with ~")
    for key, value in values.items():
        check_knob(key, value)
    check_combinations(values, world_size)
    return values


def check_combinations(values: Mapping[str, Any], world_size: int | None) -> None:
    """Rules that involve two knobs (or the number of ranks)."""
    if values["trainer.resume_mode"] == "resume_path" and values["trainer.resume_from_path"] is None:
        raise PreflightError("trainer.resume_mode=resume_path needs trainer.resume_from_path=.../global_step_N (or use resume_mode=auto)")
    if values["model.lora_rank"] > 0 and values["model.strategy"] != "fsdp2":
        raise PreflightError(f"model.lora_rank={values['model.lora_rank']} with model.strategy={values['model.strategy']}: "
                             "LoRA runs on FSDP2 only; use model.strategy=fsdp2")
    custom_path, custom_name = values["data.custom_cls.path"], values["data.custom_cls.name"]
    if (custom_path is None) != (custom_name is None):
        raise PreflightError(f"data.custom_cls.path={render(custom_path)} and data.custom_cls.name={render(custom_name)}: set both (file and class name) or neither")
    if custom_path is not None and not Path(custom_path).is_file():
        raise PreflightError(f"data.custom_cls.path={custom_path}: no such file")
    if world_size:
        batch = values["data.train_batch_size"]
        if batch % world_size:
            raise PreflightError(f"data.train_batch_size={batch} is not divisible by the {world_size} ranks; use a multiple of {world_size}")
        micro = values["data.micro_batch_size_per_gpu"]
        if values["data.max_tokens_per_micro_batch"] is None and (batch // world_size) % micro:
            raise PreflightError(f"data.micro_batch_size_per_gpu={micro} does not divide the {batch // world_size} pairs per rank "
                                 f"(data.train_batch_size={batch} / {world_size} ranks); pick a divisor")


def check_override_keys(overrides: Sequence[str]) -> None:
    """Each command-line override names a knob of trainer.yaml (Hydra alone would accept `+new.key=...`)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import OverrideType
    from hydra.errors import HydraException

    known = trainer_yaml_knobs()
    free_form = [k for k, rule in KNOB_RULES.items() if rule.free_form]
    for line in overrides:
        try:
            override = OverridesParser.create().parse_override(line)
        except HydraException as error:
            raise PreflightError(f"{line}: not a valid override ({' '.join(str(error).split())}); write key=value, e.g. optim.lr=1e-6") from None
        key = override.key_or_group
        if key.startswith("hydra"):
            continue
        is_knob = key in known or any(k.startswith(key + ".") for k in known) or any(key.startswith(f + ".") for f in free_form)
        if not is_knob:
            raise unknown_key_error(key, known, line)
        if override.type == OverrideType.DEL and key in known:
            raise PreflightError(f"{line}: trainer.yaml's knobs cannot be deleted; set {key}=null (where null is allowed) instead")


def compose_config(overrides: Sequence[str]):
    """The config bt_trainer.py's @hydra.main would compose from trainer.yaml and these overrides."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException

    check_override_keys(overrides)
    from omegaconf.errors import OmegaConfBaseException

    try:
        with initialize_config_dir(config_dir=str(REPO), version_base=None, job_name="bt_trainer"):
            return compose(config_name=CONFIG_FILE.stem, overrides=list(overrides))
    except (HydraException, OmegaConfBaseException) as error:
        raise PreflightError(f"the overrides {' '.join(overrides)} do not compose: {' '.join(str(error).split())}") from None


# ----------------------------------------------------------------------------- data and model


def check_data(values: Mapping[str, Any]) -> None:
    """Data files exist, are files, are not empty, and are not shared between train and val."""
    try:
        bt_io.check_data_files(values["data.train_files"], values["data.val_files"])
    except bt_io.DataError as error:
        message = str(error)
        if message.endswith("no such file"):
            where = "" if all(Path(f).is_absolute() for f in bt_io.as_file_list(values["data.train_files"]) + bt_io.as_file_list(values["data.val_files"])) \
                else f" (relative paths are read from {Path.cwd()})"
            message += f"{where}; pass existing files (TRAIN_FILE=..., VAL_FILE=...), e.g. written by prepare_helpsteer2.py"
        raise bt_io.DataError(message) from None


HUB_REPO_ID = re.compile(r"(?:[\w.-]+/)?[\w.-]{1,96}")  # huggingface_hub's validate_repo_id, without its length and '--' details


def looks_like_local_path(value: str) -> bool:
    """A value no hub id could be: starts like a path, or has more than one '/', or characters hub ids lack.
    A value whose first part is an existing directory (`checkpoints/run1`) is also a path."""
    if value.startswith(("/", "./", "../", "~", ".")) or "\\" in value or value.count("/") > 1 or not HUB_REPO_ID.fullmatch(value):
        return True
    return "/" in value and Path(value.split("/")[0]).is_dir()


def check_model(value: str, environ: Mapping[str, str] = os.environ) -> str:
    """model.partial_pretrain is a local model directory or a usable hub id; returns how it will be read."""
    path = Path(os.path.expanduser(value))
    key = f"model.partial_pretrain={value}"
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise PreflightError(f"{key}: the directory has no config.json; pass a Hugging Face model directory (config.json, weights, tokenizer files)")
        return f"local directory {path.resolve()}"
    if path.exists():
        raise PreflightError(f"{key}: is a file; pass the model's directory (with config.json), not a file in it")
    if looks_like_local_path(value):
        where = "" if path.is_absolute() else f" (relative paths are read from {Path.cwd()})"
        raise PreflightError(f"{key}: this path does not exist{where}; pass an existing model directory (with config.json) "
                             "or a hub id such as Qwen/Qwen3-32B")
    return check_hub_model(value, environ)


def hub_is_offline(environ: Mapping[str, str]) -> bool:
    return any(environ.get(name, "").upper() in TRUE_VALUES for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


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


def check_hub_model(repo_id: str, environ: Mapping[str, str]) -> str:
    key = f"model.partial_pretrain={repo_id}"
    cached = cached_model_config(repo_id)
    if hub_is_offline(environ):
        if cached is None:
            raise PreflightError(f"{key}: not in the local Hugging Face cache, and HF_HUB_OFFLINE=1 forbids downloading it; "
                                 "pass a local model directory (MODEL_PATH=/path/to/model) or unset HF_HUB_OFFLINE")
        return f"hub id {repo_id}, from the local cache (HF_HUB_OFFLINE=1)"
    host, port, what = hub_address(environ)
    problem = probe(host, port, HUB_PROBE_TIMEOUT_S)
    if problem is not None:
        remedy = ("it is in the local cache: rerun with HF_HUB_OFFLINE=1 to use that copy" if cached else
                  "download it where the hub is reachable and pass its local directory (MODEL_PATH=/path/to/model)")
        raise PreflightError(f"{key} is a Hugging Face hub id, but the hub cannot be reached ({what}: {problem}); {remedy}")
    return f"hub id {repo_id}"


def check_resume(values: Mapping[str, Any], world_size: int) -> str:
    """The checkpoint a resume would read is whole (stat only); returns the resume state in words."""
    found = bt_checkpoint.find_resume_checkpoint(
        values["trainer.default_local_dir"], mode=values["trainer.resume_mode"], resume_from_path=values["trainer.resume_from_path"],
        world_size=world_size, load_contents=list(values["trainer.checkpoint.load_contents"]),
    )
    return "fresh start" if found is None else f"from {found[0]} (step {found[1]['step']})"


def check_inputs(values: Mapping[str, Any], world_size: int | None) -> None:
    """Data, model and resume checkpoint, in that order (the cheap local checks before the hub probe)."""
    check_data(values)
    check_model(values["model.partial_pretrain"])
    if world_size:  # a checkpoint resumes only on the world size that saved it
        check_resume(values, world_size)


def checked_on_rank0(check: Callable[[], Any]):
    """check() on rank 0 only (one hub probe, not one per rank); every rank gets its result or raises its error."""
    import torch.distributed as dist

    outcome: list[Any] = [None]
    if dist.get_rank() == 0:
        try:
            outcome[0] = ("ok", check())
        except EXPECTED_ERRORS as error:
            outcome[0] = ("error", str(error))
            dist.broadcast_object_list(outcome, src=0)
            raise
        except Exception:
            outcome[0] = ("crash", None)
            dist.broadcast_object_list(outcome, src=0)
            raise
    dist.broadcast_object_list(outcome, src=0)
    status, value = outcome[0]
    if status == "ok":
        return value
    if status == "error":
        raise PreflightError(value)
    # rank 0 crashed and shows the traceback; wait for torchrun to stop this rank rather than exit
    # first and be taken for the failure's cause
    time.sleep(30)
    raise SystemExit(1)


# ----------------------------------------------------------------------------- one line per error


def debug_enabled() -> bool:
    return os.environ.get(DEBUG_ENV, "").upper() in TRUE_VALUES


def error_line(error: BaseException) -> str:
    """`error: <message>` on one line. Errors raised outside this project's files also say where,
    since their message alone may not name the setting."""
    message = " ".join(str(error).split()) or type(error).__name__
    frames = traceback.extract_tb(error.__traceback__)
    if frames:
        origin = Path(frames[-1].filename).resolve()
        if origin.parent != REPO:
            message += f" ({type(error).__name__} in {origin.name}:{frames[-1].lineno}; {DEBUG_ENV}=1 shows the traceback)"
    return f"error: {message}"


def append_error_log(log_dir: str | os.PathLike | None, line: str) -> Path | None:
    """Append the line, time-stamped, to <log_dir>/errors.log; a log that cannot be written is skipped."""
    if not log_dir:
        return None
    path = Path(log_dir) / "errors.log"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a", encoding="utf-8") as log:
            log.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {line}\n")
    except OSError:
        return None
    return path


def log_dir_of(config) -> str | None:
    """trainer.default_local_dir of a (possibly broken) config, or None if it cannot be resolved."""
    try:
        from omegaconf import OmegaConf

        value = OmegaConf.select(config, "trainer.default_local_dir", throw_on_resolution_failure=True)
        return str(value) if value else None
    except Exception:
        return None


def log_dir_for(overrides: Sequence[str]) -> str | None:
    """trainer.default_local_dir of a config the launcher could not compose, from the overrides that name knobs."""
    def names_a_knob(line: str) -> bool:
        try:
            check_override_keys([line])
        except PreflightError:
            return False
        return True

    try:
        return log_dir_of(compose_config([line for line in overrides if names_a_knob(line)]))
    except Exception:
        return None


def write_torchelastic_error_file(line: str) -> None:
    """The rank's error file (torchrun names it in TORCHELASTIC_ERROR_FILE): the launcher reads it when rank 0 has not reported."""
    error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if error_file:
        with contextlib.suppress(OSError), open(error_file, "w", encoding="utf-8") as out:
            json.dump({"message": line, "timestamp": int(time.time())}, out)


@contextlib.contextmanager
def errors_reported_once(expected: tuple[type[BaseException], ...], *, log_dir: Callable[[], str | None],
                         run_log: Callable[[str], None] | None = None):
    """In a rank: an expected error becomes one line from rank 0 (console, errors.log, run log) and exit status 2.

    Other ranks say nothing (their error file holds the line for the launcher) and wait a moment
    before exiting, so that rank 0, which usually fails the same way at the same time, is the one
    torchrun sees first; torchrun then stops them.
    """
    try:
        yield
    except expected as error:
        line = error_line(error)
        if debug_enabled():
            traceback.print_exc()
        write_torchelastic_error_file(line)
        if int(os.environ.get("RANK", "0")) == 0:
            sys.stdout.flush()
            print(line, file=sys.stderr, flush=True)
            append_error_log(log_dir(), line)
            if run_log is not None:
                run_log(line)
        else:
            time.sleep(2)
        raise SystemExit(EXIT_REPORTED) from None


# ----------------------------------------------------------------------------- start-up summary


def human_count(n: int) -> str:
    for scale, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if n >= scale:
            return f"{n / scale:.3g} {suffix}"
    return str(n)


def conversation_token_stats(pairs: Iterable) -> tuple[float, int]:
    """(mean, max) tokens per conversation (chosen and rejected counted separately) of TokenizedPair-like items."""
    lengths = [len(side) for pair in pairs for side in (pair.chosen, pair.rejected)]
    return (sum(lengths) / len(lengths), max(lengths)) if lengths else (0.0, 0)


def format_startup_summary(*, device: str, backend: str, world_size: int, nodes: int,
                           model_path: str, model_class: str, parameters: int, trainable_parameters: int,
                           compute_dtype: str, master_dtype: str, attention: str, layout: str,
                           train_pairs: int, val_pairs: int, mean_tokens: float, max_tokens: int, max_length: int,
                           truncated_pairs: int, dropped_tokens: int, truncation: str,
                           steps_per_epoch: int, epochs: int, total_steps: int, last_step: int,
                           train_batch_size: int, micro_batch: str, resume: str, output_dir: str,
                           frozen_dtype: str | None = None) -> str:
    """The start-up summary rank 0 prints: a dozen aligned `label  value` lines, from plain values."""
    stop = f", stopping at step {last_step} (trainer.total_training_steps)" if last_step < total_steps else ""
    rows = [
        ("device", f"{device} ({backend}), {world_size} rank{'s' * (world_size != 1)} on {nodes} node{'s' * (nodes != 1)}"),
        ("model", f"{model_path} -> {model_class}"),
        ("parameters", f"{human_count(parameters)} ({human_count(trainable_parameters)} trainable)"),
        ("precision", f"{compute_dtype} compute, {master_dtype} master weights"
                      + (f", frozen backbone in {frozen_dtype}" if frozen_dtype else "")),
        ("attention", f"{attention}, {layout} layout"),
        ("train data", f"{train_pairs:,} pairs"),
        ("val data", f"{val_pairs:,} pairs"),
        ("tokens", f"{mean_tokens:,.0f} mean, {max_tokens:,} max per conversation (data.max_length={max_length:,})"),
        ("truncated", f"{truncated_pairs:,} pairs, {dropped_tokens:,} tokens dropped (data.truncation={truncation})"),
        ("schedule", f"{steps_per_epoch:,} steps/epoch x {epochs} epoch{'s' * (epochs != 1)} = {total_steps:,} steps{stop}"),
        ("batch", f"{train_batch_size:,} pairs/step over {world_size} rank{'s' * (world_size != 1)}; {micro_batch}"),
        ("resume", resume),
        ("output", output_dir),
    ]
    width = max(len(label) for label, _ in rows)
    return "\n".join(f"{label:<{width}}  {value}" for label, value in rows)


# ----------------------------------------------------------------------------- the launcher


def world_size_from(torchrun_args: Sequence[str]) -> int | None:
    """nnodes x nproc_per_node from torchrun's `--opt=value` arguments, when both are plain numbers."""
    options = {}
    for arg in torchrun_args:
        if arg.startswith("--") and "=" in arg:
            option, value = arg[2:].split("=", 1)
            options[option.replace("-", "_")] = value
    nnodes, nproc = options.get("nnodes", "1"), options.get("nproc_per_node", "1")
    return int(nnodes) * int(nproc) if nnodes.isdigit() and nproc.isdigit() else None


def launch(torchrun_argv: Sequence[str]) -> int:
    """torchrun, in this process. Ranks that stopped on an expected error have said why already
    (or left it in their error file): the launch ends with their exit status and no failure report."""
    import logging

    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    # torchrun's agent logs every stopped worker; the failure itself is reported below.
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    try:
        run(parse_args(list(torchrun_argv)))
    except ChildFailedError as failed:
        # Ranks that reported (EXIT_REPORTED), and ranks torchrun stopped once one had (SIGTERM).
        reported = sorted(rank for rank, failure in failed.failures.items() if failure.exitcode == EXIT_REPORTED)
        stopped = [rank for rank, failure in failed.failures.items() if failure.exitcode == -signal.SIGTERM]
        if not reported or len(reported) + len(stopped) != len(failed.failures):
            raise  # a crash: torchrun's report with the ranks' tracebacks
        if reported[0] != 0:  # rank 0 did not report (another rank stopped first, or rank 0 runs on another node)
            message = failed.failures[reported[0]].message
            if isinstance(message, str) and message.startswith("error: "):
                print(message, file=sys.stderr, flush=True)
        return EXIT_REPORTED
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    script = next((i for i, arg in enumerate(argv) if arg.endswith(".py")), None)
    if script is None:
        print(__doc__.split("\n\n")[1], file=sys.stderr)
        return EXIT_REPORTED
    torchrun_args, overrides = argv[: script + 1], argv[script + 1:]
    world_size = world_size_from(torchrun_args)
    config = None
    try:
        if not any(arg.startswith("-") for arg in overrides):  # Hydra's own flags (--cfg, -m, ...): left to the ranks
            config = compose_config(overrides)
            check_inputs(check_config(config, world_size=world_size), world_size)
    except ModuleNotFoundError as error:
        return missing_requirement(error)
    except EXPECTED_ERRORS as error:
        if debug_enabled():
            traceback.print_exc()
        line = error_line(error)
        print(line, file=sys.stderr, flush=True)
        append_error_log(log_dir_of(config) if config is not None else log_dir_for(overrides), line)
        return EXIT_REPORTED
    try:
        return launch(torchrun_args + overrides)
    except ModuleNotFoundError as error:  # torch itself (the ranks' own import errors stay in the ranks)
        return missing_requirement(error)


def missing_requirement(error: ModuleNotFoundError) -> int:
    """The usual cause: the system python instead of the project's .venv."""
    print(f"error: {sys.executable} cannot import {error.name} (a requirement of this project); "
          "run `bash setup.sh` to create .venv (run_bt_rm.sh then uses it), or set PYTHON to an interpreter "
          "with requirements.txt installed", file=sys.stderr, flush=True)
    return EXIT_REPORTED


if __name__ == "__main__":
    sys.exit(main())

"""The config schema: one rule per trainer.yaml knob, and the strict check of a composed config.

trainer.yaml is the whole truth: a key it does not define is refused (also when added with Hydra's
`+`), a key it defines may not be deleted (`~`), and every knob's type and range is checked by its
rule in KNOB_RULES (which names the allowed values); rules that involve several knobs (or the
number of ranks) are in check_combinations. These rules are the config's only checks: the code
reads each knob as checked here, with no default or check of its own (tests/test_schema.py finds
reads with a fallback default). Allowed values that another module defines are taken from it (data
formats from btrm.rows; the loss section's rules, LOSS_KNOB_RULES, and its margin table from bt_loss,
which imports nothing of the project), unless importing it would pull in torch or verl (then a test
compares the two). After this check the trainer reads the config through its typed view (btrm.config).

Nothing heavy is imported here (omegaconf and hydra only inside the functions that need them): the
launcher checks a config in well under a second before any rank starts.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import bt_loss
from btrm import faults, rows

REPO = Path(__file__).resolve().parent.parent  # trainer.yaml sits beside bt_trainer.py, above this package
CONFIG_FILE = REPO / "trainer.yaml"


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
    return Rule(
        f"an integer >= {at_least}" + (f", or {special}" if special else ""),
        lambda v: (_is_int(v) and v >= at_least) or any(type(v) is type(s) and v == s for s in also),
    )


def number(*, above: float | None = None, at_least: float | None = None, at_most: float | None = None) -> Rule:
    bounds = [
        f"> {above}" if above is not None else None,
        f">= {at_least}" if at_least is not None else None,
        f"<= {at_most}" if at_most is not None else None,
    ]
    return Rule(
        "a number " + " and ".join(b for b in bounds if b),
        lambda v: (
            _is_number(v)
            and (above is None or v > above)
            and (at_least is None or v >= at_least)
            and (at_most is None or v <= at_most)
        ),
    )


def one_of(*values) -> Rule:
    return Rule(
        "one of " + " | ".join(render(v) for v in values), lambda v: any(v == x and type(v) is type(x) for x in values)
    )


def any_integer() -> Rule:
    return Rule("an integer", _is_int)


def flag() -> Rule:
    return Rule("true or false", lambda v: isinstance(v, bool))


def text(*, nullable: bool = False) -> Rule:
    return Rule(
        "a non-empty string" + (", or null" if nullable else ""),
        lambda v: (nullable and v is None) or (isinstance(v, str) and v.strip() != ""),
    )


def run_name() -> Rule:
    """Names used in paths and trackers; Hydra reads `trainer.experiment_name=2024` as a number, which is fine."""
    return Rule("a non-empty name", lambda v: (isinstance(v, str) and v.strip() != "") or _is_int(v))


def files() -> Rule:
    return Rule(
        "a data file, or a [list] of data files",
        lambda v: (
            (isinstance(v, str) and v != "")
            or (isinstance(v, list) and v != [] and all(isinstance(f, str) and f for f in v))
        ),
    )


def mapping(*, nullable: bool = False) -> Rule:
    return Rule(
        "a mapping {key: value}" + (", or null" if nullable else ""),
        lambda v: (nullable and v is None) or isinstance(v, dict),
        free_form=True,
    )


def subset(*values, non_empty: bool = False) -> Rule:
    return Rule(
        f"a list of {' | '.join(values)}" + (" (at least one)" if non_empty else ""),
        lambda v: isinstance(v, list) and all(isinstance(x, str) and x in values for x in v) and (v or not non_empty),
    )


def exactly(value, why: str) -> Rule:
    return Rule(f"{render(value)} ({why})", lambda v: v == value and type(v) is type(value))


def lora_targets() -> Rule:
    return Rule(
        "all-linear, or a non-empty [list] of module names (not the score head)",
        lambda v: (
            v == "all-linear"
            or (isinstance(v, list) and v != [] and all(isinstance(x, str) and x and x != "score" for x in v))
        ),
    )


def betas() -> Rule:
    return Rule(
        "[beta1, beta2], two numbers >= 0 and < 1",
        lambda v: isinstance(v, list) and len(v) == 2 and all(_is_number(b) and 0 <= b < 1 for b in v),
    )


# Every leaf of trainer.yaml has exactly one rule here (a test checks it). The modules that define
# these names import torch (btrm.modeling.DTYPES) or verl (Tracking.supported_backend), which the
# launcher must not: the names are repeated here, and tests check them against their sources.
PRECISIONS = ("auto", "bf16", "fp32")  # auto, or a key of modeling.DTYPES
MASTER_DTYPES = ("fp32", "bf16")  # keys of modeling.DTYPES (fp32 recommended)
TRACKERS = (
    "console",
    "file",
    "tensorboard",
    "wandb",
    "mlflow",
    "swanlab",
    "vemlp_wandb",
    "clearml",
    "trackio",
)  # verl Tracking
KNOB_RULES: dict[str, Rule] = {
    "data.train_files": files(),
    "data.val_files": files(),
    "data.chosen_key": text(),
    "data.rejected_key": text(),
    "data.format": one_of(*rows.PAIR_FORMATS),
    "data.prompt_key": text(),
    "data.drop_identical_pairs": flag(),
    "data.group_columns": Rule(
        "a [list] of column names (empty: no metrics by group)",
        lambda v: isinstance(v, list) and all(isinstance(c, str) and c.strip() for c in v) and len(set(v)) == len(v),
    ),
    "data.max_groups_per_column": integer(2),
    "data.train_batch_size": integer(1),
    "data.micro_batch_size_per_gpu": integer(1, also=(None,)),
    "data.max_tokens_per_micro_batch": integer(2, also=(None, "auto")),
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
    "optim.fused": flag(),
    "optim.override_optimizer_config": mapping(nullable=True),
    # the loss section's rules are declared in bt_loss (its margin table's keys and values: bt_loss.LossConfig,
    # run by check_combinations); margin_by_strength is the user's own mapping
    **{
        f"loss.{name}": Rule(expected, accepts, free_form=name == "margin_by_strength")
        for name, (expected, accepts) in bt_loss.LOSS_KNOB_RULES.items()
    },
    "use_remove_padding": flag(),
    "ulysses_sequence_parallel_size": integer(1),  # divides the ranks (below) and the heads (btrm.sequence_parallel)
    "trainer.device": one_of("auto", "cuda", "cpu"),
    "trainer.seed": any_integer(),
    "trainer.check_layout": flag(),
    "trainer.gpu_memory_margin": number(at_least=0.0, at_most=0.5),
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
    "trainer.stop_signals": subset(*faults.STOP_SIGNAL_NAMES),
    "trainer.collective_timeout_s": number(above=0),
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
    return PreflightError(
        f"{where}: unknown key {key}, trainer.yaml has no such knob{_closest(key, known)} "
        "(trainer.yaml is the whole config: `+` cannot add keys; see its comments for every knob)"
    )


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
            raise PreflightError(
                f"the config cannot be resolved: {str(error).splitlines()[0]}; check the ${{...}} references you set"
            ) from None
    values = knob_values(config)
    known = trainer_yaml_knobs()
    for key, value in values.items():
        if key not in known:
            section = next((k for k in known if k.startswith(key + ".")), None)
            if section is not None:
                raise PreflightError(
                    f"{key}={render(value)}: expected a section with keys "
                    f"{', '.join(k[len(key) + 1 :] for k in known if k.startswith(key + '.'))}"
                )
            raise unknown_key_error(key, known, f"{key}={render(value)}")
    missing = [key for key in known if key not in values]
    if missing:
        raise PreflightError(
            f"{missing[0]} is missing from the config; trainer.yaml defines it: set it (e.g. to null) instead of deleting it with ~"
        )
    for key, value in values.items():
        check_knob(key, value)
    check_combinations(values, world_size)
    return values


def check_combinations(values: Mapping[str, Any], world_size: int | None) -> None:
    """Rules that involve two knobs (or the number of ranks)."""
    if values["trainer.resume_mode"] == "resume_path" and values["trainer.resume_from_path"] is None:
        raise PreflightError(
            "trainer.resume_mode=resume_path needs trainer.resume_from_path=.../global_step_N (or use resume_mode=auto)"
        )
    if values["model.lora_rank"] > 0 and values["model.strategy"] != "fsdp2":
        raise PreflightError(
            f"model.lora_rank={values['model.lora_rank']} with model.strategy={values['model.strategy']}: "
            "LoRA runs on FSDP2 only; use model.strategy=fsdp2"
        )
    custom_path, custom_name = values["data.custom_cls.path"], values["data.custom_cls.name"]
    if (custom_path is None) != (custom_name is None):
        raise PreflightError(
            f"data.custom_cls.path={render(custom_path)} and data.custom_cls.name={render(custom_name)}: set both (file and class name) or neither"
        )
    if custom_path is not None and not Path(custom_path).is_file():
        raise PreflightError(f"data.custom_cls.path={custom_path}: no such file")
    try:  # the margin table: its keys depend on loss.max_strength, and only loss.type=margin reads it
        bt_loss.LossConfig.from_mapping({name: values[f"loss.{name}"] for name in bt_loss.LOSS_KNOBS})
    except ValueError as error:
        raise PreflightError(str(error)) from None
    if values["data.max_tokens_per_micro_batch"] is None and values["data.micro_batch_size_per_gpu"] is None:
        raise PreflightError(
            "data.max_tokens_per_micro_batch=null and data.micro_batch_size_per_gpu=null: micro-batches need a token "
            "budget or a pair count; set one (e.g. data.max_tokens_per_micro_batch=auto)"
        )
    sequence_parallel = values["ulysses_sequence_parallel_size"]
    if sequence_parallel > 1 and not values["use_remove_padding"]:
        raise PreflightError(
            f"ulysses_sequence_parallel_size={sequence_parallel} with use_remove_padding=false: sequence parallelism "
            "splits packed rows only; set use_remove_padding=true (packed or shared layout) or the size to 1"
        )
    if world_size and world_size % sequence_parallel:
        raise PreflightError(
            f"ulysses_sequence_parallel_size={sequence_parallel} does not divide the {world_size} ranks; "
            "use a divisor of the number of ranks"
        )
    if world_size:
        batch = values["data.train_batch_size"]
        if batch % world_size:
            raise PreflightError(
                f"data.train_batch_size={batch} is not divisible by the {world_size} ranks; use a multiple of {world_size}"
            )
        micro = values["data.micro_batch_size_per_gpu"]
        if values["data.max_tokens_per_micro_batch"] is None and micro is not None and (batch // world_size) % micro:
            raise PreflightError(
                f"data.micro_batch_size_per_gpu={micro} does not divide the {batch // world_size} pairs per rank "
                f"(data.train_batch_size={batch} / {world_size} ranks); pick a divisor"
            )


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
            raise PreflightError(
                f"{line}: not a valid override ({' '.join(str(error).split())}); write key=value, e.g. optim.lr=1e-6"
            ) from None
        key = override.key_or_group
        if key.startswith("hydra"):
            continue
        is_knob = (
            key in known
            or any(k.startswith(key + ".") for k in known)
            or any(key.startswith(f + ".") for f in free_form)
        )
        if not is_knob:
            raise unknown_key_error(key, known, line)
        if override.type == OverrideType.DEL and key in known:
            raise PreflightError(
                f"{line}: trainer.yaml's knobs cannot be deleted; set {key}=null (where null is allowed) instead"
            )


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
        raise PreflightError(
            f"the overrides {' '.join(overrides)} do not compose: {' '.join(str(error).split())}"
        ) from None

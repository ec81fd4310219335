"""btrm.schema: one rule per trainer.yaml knob, the strict config, and no knob read with a fallback default."""

import ast
import re
from dataclasses import fields

import pytest

import bt_loss
from btrm import rows, schema
from btrm.schema import PreflightError, check_config, compose_config
from conftest import REPO

# ---- the rule table is trainer.yaml's


def test_every_knob_in_trainer_yaml_has_a_rule_and_every_rule_a_knob():
    assert sorted(schema.trainer_yaml_knobs()) == sorted(schema.KNOB_RULES)


def test_trainer_yaml_defaults_pass_their_rules():
    values = check_config(compose_config([]), world_size=8)
    assert values["optim.lr"] == 5e-7 and values["trainer.default_local_dir"] == "checkpoints/qwen3-32b-helpsteer2"


def test_enums_named_in_the_schema_equal_their_sources():
    """Names the schema repeats because their modules import torch or verl, checked against those modules."""
    from verl.utils.tracking import Tracking

    from btrm.modeling import DTYPES

    assert schema.KNOB_RULES["data.format"].expected == "one of " + " | ".join(rows.PAIR_FORMATS)
    assert set(schema.PRECISIONS) - {"auto"} <= set(DTYPES) and set(schema.MASTER_DTYPES) <= set(DTYPES)
    assert sorted(schema.TRACKERS) == sorted(Tracking.supported_backend)


def test_loss_section_of_trainer_yaml_is_loss_config():
    """Each loss.* knob is a LossConfig field with trainer.yaml's default, and the other way round."""
    yaml_loss = {
        key.removeprefix("loss."): value
        for key, value in schema.trainer_yaml_knobs().items()
        if key.startswith("loss.")
    }
    assert {f.name: f.default for f in fields(bt_loss.LossConfig) if f.init} == yaml_loss


# ---- strict config: values


@pytest.mark.parametrize(
    "override, message",
    [
        ("data.micro_batch_size_per_gpu=0", "data.micro_batch_size_per_gpu=0: expected an integer >= 1"),
        ("data.max_length=0", "data.max_length=0: expected an integer >= 2"),
        ("data.max_tokens_per_micro_batch=0", "data.max_tokens_per_micro_batch=0: expected an integer >= 2, or null"),
        ("trainer.total_epochs=0", "trainer.total_epochs=0: expected an integer >= 1"),
        ("optim.lr=0", "optim.lr=0: expected a number > 0"),
        ("optim.lr=fast", "optim.lr=fast: expected a number > 0"),
        ("optim.warmup_steps_ratio=1.5", "optim.warmup_steps_ratio=1.5: expected a number >= 0 and <= 1"),
        ("optim.betas=[0.9]", "optim.betas=[0.9]: expected [beta1, beta2], two numbers >= 0 and < 1"),
        ("data.truncation=middle", "data.truncation=middle: expected one of left | right | error"),
        ("optim.lr_scheduler=linear", "optim.lr_scheduler=linear: expected one of cosine | wsd | constant"),
        ("loss.type=hinge", "loss.type=hinge: expected one of bt | scaled_bt | margin"),
        ("model.mixed_precision=fp8", "model.mixed_precision=fp8: expected one of auto | bf16 | fp32"),
        ("trainer.device=tpu", "trainer.device=tpu: expected one of auto | cuda | cpu"),
        ("trainer.resume_mode=always", "trainer.resume_mode=always: expected one of auto | resume_path | disable"),
        ("trainer.logger=console", "trainer.logger=console: expected a list of console | file | tensorboard"),
        ("trainer.logger=[console,tensorbord]", "trainer.logger=[console,tensorbord]: expected a list of console"),
        ("data.max_samples=0", "data.max_samples=0: expected an integer >= 1, or -1"),
        ("trainer.test_freq=0", "trainer.test_freq=0: expected an integer >= 1, or -1"),
        ("model.lora_rank=-1", "model.lora_rank=-1: expected an integer >= 0"),
        ("model.lora_alpha=0", "model.lora_alpha=0: expected a number > 0"),
        (
            "model.target_modules=[q_proj,score]",
            "model.target_modules=[q_proj,score]: expected all-linear, or a non-empty [list] of module names (not the score head)",
        ),
        ("model.lora_base_dtype=fp16", "model.lora_base_dtype=fp16: expected one of fp32 | bf16"),
        ("data.drop_identical_pairs=maybe", "data.drop_identical_pairs=maybe: expected true or false"),
    ],
)
def test_each_knob_is_checked_naming_key_value_and_allowed_values(override, message):
    with pytest.raises(PreflightError) as refused:
        check_config(compose_config([override]))
    assert str(refused.value).startswith(message)


def test_free_form_mappings_take_their_own_keys():
    config = compose_config(
        [
            "+data.apply_chat_template_kwargs.enable_thinking=false",
            "optim.override_optimizer_config={eps:1e-6}",
            "loss.type=margin",
            "loss.margin_by_strength={1:0.5,2:1,3:2}",
        ]
    )
    values = check_config(config)
    assert values["data.apply_chat_template_kwargs"] == {"enable_thinking": False}
    assert values["optim.override_optimizer_config"] == {"eps": 1e-6}


def test_margin_table_is_checked_before_any_rank_starts():
    with pytest.raises(PreflightError, match=r"^loss.margin_by_strength has no margin for \|strength\| \[3\]"):
        check_config(compose_config(["loss.type=margin", "loss.margin_by_strength={1:0.5,2:1}"]))
    with pytest.raises(PreflightError, match=r"^loss.margin_by_strength keys must be \|strength\| values 1..2; got 3"):
        check_config(
            compose_config(["loss.type=margin", "loss.max_strength=2", "loss.margin_by_strength={1:0.5,2:1,3:2}"])
        )
    with pytest.raises(PreflightError, match="^loss.margin_by_strength is only used by loss.type=margin"):
        check_config(compose_config(["loss.margin_by_strength={1:0.5,2:1,3:2}"]))


def test_batch_sizes_must_divide_over_the_ranks():
    with pytest.raises(PreflightError, match=r"data.train_batch_size=256 is not divisible by the 3 ranks"):
        check_config(compose_config([]), world_size=3)
    with pytest.raises(PreflightError, match=r"data.micro_batch_size_per_gpu=3 does not divide the 128 pairs per rank"):
        check_config(
            compose_config(["data.micro_batch_size_per_gpu=3", "data.max_tokens_per_micro_batch=null"]), world_size=2
        )
    check_config(
        compose_config(["data.micro_batch_size_per_gpu=3"]), world_size=2
    )  # token budget: no fixed micro-batch


def test_lora_runs_on_fsdp2_only():
    with pytest.raises(
        PreflightError,
        match=r"^model.lora_rank=8 with model.strategy=fsdp: LoRA runs on FSDP2 only; use model.strategy=fsdp2",
    ):
        check_config(compose_config(["model.lora_rank=8", "model.strategy=fsdp"]))
    assert (
        check_config(compose_config(["model.lora_rank=8", "model.target_modules=[q_proj,v_proj]"]))["model.lora_rank"]
        == 8
    )


def test_resume_path_mode_needs_a_path():
    with pytest.raises(PreflightError, match="trainer.resume_mode=resume_path needs trainer.resume_from_path"):
        check_config(compose_config(["trainer.resume_mode=resume_path"]))


# ---- strict config: keys


@pytest.mark.parametrize("override", ["optim.lrr=1e-6", "+optim.lrr=1e-6", "++optim.lrr=1e-6"])
def test_unknown_keys_are_refused_also_when_added_with_plus(override):
    with pytest.raises(PreflightError) as refused:
        compose_config([override])
    assert str(refused.value).startswith(
        f"{override}: unknown key optim.lrr, trainer.yaml has no such knob; did you mean optim.lr?"
    )


def test_unknown_keys_that_reach_a_rank_are_refused_there_too():
    """bt_trainer.run() sees the composed config only (a plain torchrun launch): `+` keys are found by comparing key sets."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(REPO), version_base=None):
        config = compose(config_name="trainer", overrides=["+optim.lrr=1e-6", "+extra.section=1"])
    with pytest.raises(
        PreflightError,
        match=r"^optim.lrr=1e-06: unknown key optim.lrr, trainer.yaml has no such knob; did you mean optim.lr\?",
    ):
        check_config(config)
    with initialize_config_dir(config_dir=str(REPO), version_base=None):
        config = compose(config_name="trainer", overrides=["~data.chosen_key"])
    with pytest.raises(PreflightError, match="data.chosen_key is missing from the config"):
        check_config(config)


def test_deleting_a_knob_is_refused():
    with pytest.raises(PreflightError, match=r"^~data.chosen_key: trainer.yaml's knobs cannot be deleted"):
        compose_config(["~data.chosen_key"])


# ---- no knob is read with a fallback default: the schema's check is the only one

PRODUCT_FILES = sorted([*REPO.glob("*.py"), *(REPO / "btrm").glob("*.py"), *(REPO / "bench").glob("*.py")])


def fallback_reads(source: str, knobs) -> list[tuple[int, str]]:
    """(line, call) of each read of a trainer.yaml knob that has a value to fall back on when the key is
    missing: `<config>.get("<leaf>"[, default])` (None is the fallback of the one-argument form),
    `getattr(<config>, "<leaf>", default)`, `<anything>.get("<section>.<leaf>", ...)` on a dict of
    dotted keys, and `OmegaConf.select(..., default=...)`. <config> is an expression that names a
    config (`config`, `cfg`, `data_config`, ...) or ends in a trainer.yaml section (`.data`, `.trainer`,
    ...); reads of other mappings (data rows, JSON, command-line arguments) are not knobs."""
    leaves = {key.rsplit(".", 1)[-1] for key in knobs}
    sections = {part for key in knobs for part in key.split(".")[:-1]}

    def names_a_config(node: ast.expr) -> bool:
        text = ast.unparse(node)
        return re.search(r"conf|cfg", text, flags=re.IGNORECASE) is not None or text.rsplit(".", 1)[-1] in sections

    def constant(node: ast.expr) -> str | None:
        return node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else None

    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Call):
            continue
        function, args = node.func, node.args
        if (
            isinstance(function, ast.Attribute)
            and function.attr == "get"
            and args
            and (key := constant(args[0])) is not None
        ):
            fallback = key in knobs or (key in leaves and names_a_config(function.value))
        elif isinstance(function, ast.Name) and function.id == "getattr" and len(args) == 3:
            fallback = constant(args[1]) in leaves and names_a_config(args[0])
        elif isinstance(function, ast.Attribute) and function.attr == "select":
            fallback = any(keyword.arg == "default" for keyword in node.keywords)
        else:
            fallback = False
        if fallback:
            found.append((node.lineno, ast.unparse(node)))
    return found


def test_fallback_reads_are_recognised_and_other_mappings_are_not():
    knobs = schema.trainer_yaml_knobs()
    flagged = """
self.config.data.get("share_prompt", False)
config.get("drop_identical_pairs", True)
config.get("apply_chat_template_kwargs", None)
data_config.custom_cls.get("path")
getattr(config.trainer, "check_layout", True)
trainer_cfg.get("seed", default_value=0)
knobs.get("trainer.resume_mode", "auto")
OmegaConf.select(config, "trainer.seed", default=42)
"""
    not_flagged = """
row.get("prompt_key", "prompt")
record.get("format")
message.get("role")
os.environ.get("LOCAL_RANK", 0)
getattr(args, "lora_rank", 0)
getattr(dataset, "truncated_pairs", 0)
config.data.share_prompt
OmegaConf.select(config, "trainer.default_local_dir", throw_on_resolution_failure=True)
"""
    assert [line for line, _ in fallback_reads(flagged, knobs)] == list(range(2, 10))
    assert fallback_reads(not_flagged, knobs) == []


def test_no_product_code_reads_a_knob_with_a_fallback_default():
    """trainer.yaml defines every knob and check_config refuses a config without one: a default in the code would be a second,
    silent declaration that can disagree with trainer.yaml."""
    knobs = schema.trainer_yaml_knobs()
    found = [
        f"{path.relative_to(REPO)}:{line}: {call}"
        for path in PRODUCT_FILES
        for line, call in fallback_reads(path.read_text(), knobs)
    ]
    assert {REPO / "bt_trainer.py", REPO / "btrm" / "schema.py", REPO / "bench" / "bench_throughput.py"} <= set(
        PRODUCT_FILES
    )
    assert not found, "knobs read with a fallback default (read them as config.section.knob):\n" + "\n".join(found)

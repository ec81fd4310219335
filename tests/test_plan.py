"""btrm.plan: model states against hand formulas, the fit verdict, the budget search, the CLI, the process state it
leaves, and one real CPU step's resident memory against the plan (the 10% target lives in bench/plan_accuracy.py)."""

import json
import math
import subprocess
import sys

import pytest
import torch

from btrm import attention, plan
from btrm.schema import compose_config
from conftest import REPO, free_port

DIMS = {  # a tiny Qwen3: every dimension even, so FSDP's two shards split each weight exactly
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "vocab_size": 512,
}
REQUIRED_KEYS = {
    "gpus",
    "gpu_memory_gib",
    "peak_gib",
    "model_states_gib",
    "activations_gib",
    "fits",
    "max_tokens_per_micro_batch",
    "tokens",
    "layers_simulated",
    "layers",
    "margin",
    "parts",
    "step_tflops",
    "predicted_tokens_per_s",
    "mfu_assumption",
}


def write_config(folder, layers: int):
    """config.json only (no weights): all the plan reads."""
    from transformers import Qwen3Config

    Qwen3Config(**DIMS, num_hidden_layers=layers, tie_word_embeddings=False).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def shallow(tmp_path_factory):
    return write_config(tmp_path_factory.mktemp("qwen3-2-layers"), 2)


@pytest.fixture(scope="module")
def deep(tmp_path_factory):
    return write_config(tmp_path_factory.mktemp("qwen3-6-layers"), 6)


def overrides(model_dir, *extra):
    return [f"model.partial_pretrain={model_dir}", "trainer.device=cpu", "data.max_length=64", *extra]


def planned(model_dir, *extra, gpus=2, **kwargs):
    return plan.plan_from_overrides(overrides(model_dir, *extra), gpus=gpus, **kwargs)


# ----------------------------------------------------------------------------- hand formulas


def block_linears():
    """(in, out) of each linear layer of one Qwen3 decoder layer."""
    h, i = DIMS["hidden_size"], DIMS["intermediate_size"]
    q, kv = DIMS["num_attention_heads"] * DIMS["head_dim"], DIMS["num_key_value_heads"] * DIMS["head_dim"]
    return [(h, q), (h, kv), (h, kv), (q, h), (h, i), (h, i), (i, h)]


def value_head_shapes(layers: int) -> tuple[list[tuple], list[tuple]]:
    """(trainable, frozen) parameter shapes of Qwen3ForTokenClassification, written out from the architecture:
    embedding, per layer 7 linears + 2 RMSNorms + q/k norms, the final norm, the score head (bias frozen)."""
    h, head_dim = DIMS["hidden_size"], DIMS["head_dim"]
    per_layer = [(fan_out, fan_in) for fan_in, fan_out in block_linears()] + [(h,), (h,), (head_dim,), (head_dim,)]
    trainable = [(DIMS["vocab_size"], h), *per_layer * layers, (h,), (1, h)]
    return trainable, [(1,)]


def shard_bytes(shapes, bytes_each: int, ranks: int) -> int:
    """Bytes of rank 0's shards: FSDP2 cuts dim 0 into `ranks` chunks, rank 0 holding the largest."""
    return sum(math.ceil(s[0] / ranks) * math.prod(s[1:]) * bytes_each for s in shapes)


ROTARY_BUFFER = DIMS["head_dim"] // 2 * 4  # the rotary embedding's inv_freq (fp32, on every rank)


def full_fine_tune_states(layers: int, ranks: int) -> int:
    """fp32 weight + fp32 gradient + AdamW's two fp32 moments of every trainable weight, and AdamW's step count
    (a 4-byte tensor per weight); the frozen score bias: its fp32 weight; the rotary buffer."""
    trainable, frozen = value_head_shapes(layers)
    return shard_bytes(trainable, 4 + 4 + 8, ranks) + 4 * len(trainable) + shard_bytes(frozen, 4, ranks) + ROTARY_BUFFER


# ----------------------------------------------------------------------------- model states


def test_full_fine_tune_states_equal_the_hand_formula(shallow):
    result = planned(shallow, gpus=2, search=False)
    assert result["model_states_bytes"] == full_fine_tune_states(2, ranks=2)
    assert result["layers_simulated"] == [2] and result["device"] == "cpu" and result["lora"] is False


def test_a_plan_from_remembered_measurements_equals_the_plan_measured_afresh(shallow, monkeypatch):
    """plan.MEASURED keeps the fake runs of a process: planning the same config again (and with another
    trainer.gpu_memory_margin) simulates nothing and answers as a fresh plan does; another config is measured;
    an optimizer step measured on a simulation built anew (its forward/backward remembered) is the same."""
    base = ("data.max_length=512",)
    monkeypatch.setattr(plan, "MEASURED", {})
    fresh = planned(shallow, *base, gpu_memory_gib=1.0, search=False)
    remembered = dict(plan.MEASURED)
    with monkeypatch.context() as nothing_built:
        nothing_built.setattr(plan, "Simulation", None)  # every measurement must come from MEASURED
        again = planned(shallow, *base, "trainer.gpu_memory_margin=0.2", gpu_memory_gib=1.0, search=False)
    without = ("wall_s", "margin", "usable_gib", "fits")
    assert {k: v for k, v in again.items() if k not in without} == {k: v for k, v in fresh.items() if k not in without}
    assert again["margin"] == 0.2
    # another config, the same micro-batch: measured, not taken from what is remembered
    kept = planned(shallow, *base, "model.enable_gradient_checkpointing=false", gpu_memory_gib=1.0, search=False)
    assert kept["tokens"] == fresh["tokens"] and kept["activations_gib"] > fresh["activations_gib"]
    monkeypatch.setattr(
        plan, "MEASURED", {key: value for key, value in remembered.items() if key[-1] != "optimizer_step"}
    )
    stepped = planned(shallow, *base, gpu_memory_gib=1.0, search=False)
    assert {k: v for k, v in stepped.items() if k != "wall_s"} == {k: v for k, v in fresh.items() if k != "wall_s"}


def peaks_by_tokens(model_dir, tokens: tuple[int, ...]) -> dict[int, dict[str, float]]:
    """The planner's forward/backward and optimizer-step peaks (bytes) of micro-batches of `tokens` tokens."""
    config = compose_config(overrides(model_dir))
    settings = plan.resolve_settings(config, gpus=2, gpu_memory_gib=80, margin=0.0, device="cpu")
    hf_config = plan.read_hf_config(config.model)
    with plan.fake_world(2, "cpu") as world:
        planner = plan.Planner(config, hf_config, settings, world)
        peaks = {t: {"forward_backward": sum(planner.forward_backward(t).values())} for t in tokens}
        step = sum(planner.optimizer_step()[0].values())
    return {t: {**p, "optimizer_step": step, "depths": tuple(planner.simulations)} for t, p in peaks.items()}


def test_a_deep_model_scaled_from_two_depths_has_exact_states_and_the_peak_of_a_whole_simulation(deep, monkeypatch):
    tokens = (128, 2048)  # the peak at the end of backward (every gradient), then at its start (every checkpoint)
    scaled = peaks_by_tokens(deep, tokens)
    monkeypatch.setattr(plan, "SIMULATED_LAYERS", (6, 7))  # the whole depth simulated: the reference
    whole = peaks_by_tokens(deep, tokens)
    for t in tokens:
        assert (scaled[t]["depths"], whole[t]["depths"]) == ((2, 3), (6,))
        for phase in ("forward_backward", "optimizer_step"):
            assert scaled[t][phase] == pytest.approx(whole[t][phase], rel=0.01), (t, phase)
    monkeypatch.undo()
    result = planned(deep, gpus=2, tokens=256, search=False)
    assert result["layers_simulated"] == [2, 3] and result["layers"] == 6
    assert result["model_states_bytes"] == full_fine_tune_states(6, ranks=2)


def test_lora_states_are_adapters_and_head_in_fp32_and_a_bf16_backbone(shallow):
    rank = 4
    result = planned(shallow, f"model.lora_rank={rank}", gpus=2, search=False)
    trainable, frozen = value_head_shapes(2)
    head = [(1, DIMS["hidden_size"])]
    adapters = [shape for fan_in, fan_out in block_linears() for shape in ((rank, fan_in), (fan_out, rank))] * 2
    backbone = [s for s in trainable if s != (1, DIMS["hidden_size"])] + frozen  # frozen: model.lora_base_dtype bf16
    expected = (
        shard_bytes(adapters + head, 4 + 4 + 8, 2)
        + 4 * len(adapters + head)
        + shard_bytes(backbone, 2, 2)
        + ROTARY_BUFFER
    )
    assert result["model_states_bytes"] == expected
    assert result["lora"] is True and result["model_states_bytes"] < full_fine_tune_states(2, ranks=2) / 4


def test_gpu_plan_adds_the_named_corrections_and_a_flops_estimate(shallow):
    result = planned(shallow, gpus=8, device="cuda", gpu_memory_gib=80, tokens=128, search=False)
    corrections = result["phases"]["forward_backward"]["corrections"]
    assert corrections["cuda_context"] == pytest.approx(plan.CUDA_CONTEXT_GIB)
    assert result["compute_dtype"] == "torch.bfloat16" and result["gpu_memory_assumed"] is False
    # trainer.yaml's fused AdamW holds no temporary; torch's CUDA default (foreach, optim.fused=false) holds
    # one fp32 temporary per parameter shard, as large as the sharded parameters
    assert result["phases"]["optimizer_step"]["parts"].get("optimizer_step_temps", 0.0) == pytest.approx(0, abs=1e-4)
    foreach = planned(
        shallow,
        "optim.fused=false",
        gpus=8,
        device="cuda",
        gpu_memory_gib=80,
        tokens=128,
        search=False,
    )
    step = foreach["phases"]["optimizer_step"]["parts"]
    assert step["optimizer_step_temps"] == pytest.approx(step["sharded_params"], rel=0.05)
    # 2 conversations of 64 tokens: 8 x non-embedding params x tokens (forward, backward 2x, checkpoint recompute)
    # + attention's 4 x heads x head_dim x causal pairs per layer and forward, 4 forwards' worth
    non_embedding = result["parameters"] - DIMS["vocab_size"] * DIMS["hidden_size"]
    pairs = 2 * 64 * 65 / 2
    attention_flops = 4 * DIMS["num_attention_heads"] * DIMS["head_dim"] * 2 * pairs
    assert result["step_flops"] == pytest.approx(8 * non_embedding * 128 + 4 * attention_flops, rel=1e-6)
    seconds = result["step_flops"] / (plan.MFU_ASSUMPTION * plan.PEAK_TFLOPS * 1e12)
    assert result["predicted_tokens_per_s"] == round(128 / seconds)


# ----------------------------------------------------------------------------- the verdict and the budget


def peak_gib(result) -> float:
    return max(phase["peak_gib"] for phase in result["phases"].values())


def test_fits_flips_when_the_memory_drops_below_the_peak(shallow):
    def fits(margin: float, memory: float | None) -> bool:
        return planned(shallow, tokens=512, margin=margin, gpu_memory_gib=memory, search=False)["fits"]

    peak = peak_gib(planned(shallow, tokens=512, search=False))
    assert fits(0.0, peak * 1.02) is True
    assert fits(0.0, peak * 0.98) is False
    assert fits(0.1, peak * 1.02) is False


def test_the_largest_budget_grows_with_memory_and_fits(shallow):
    states = full_fine_tune_states(2, ranks=2) / 2**30
    budgets = []
    for memory in (states * 2, states * 4, states * 8):
        budget = planned(shallow, margin=0.0, gpu_memory_gib=memory)["max_tokens_per_micro_batch"]
        assert budget is not None
        assert planned(shallow, margin=0.0, gpu_memory_gib=memory, tokens=budget, search=False)["fits"]
        budgets.append(budget)
    assert budgets == sorted(budgets) and budgets[0] < budgets[-1]
    assert planned(shallow, margin=0.0, gpu_memory_gib=states / 2)["max_tokens_per_micro_batch"] is None


def test_the_budget_found_fits_and_three_percent_more_does_not(shallow):
    """The search's answer is the largest fitting budget (to its 2% tolerance), not merely one that fits: each
    side checked by a plan of that micro-batch alone (search=False, the verdict of the fake step itself)."""
    memory = 150 / 1024  # GiB: a budget of ~20k tokens for the tiny model, where 3% is > the search's 256-token step
    budget = planned(shallow, margin=0.0, gpu_memory_gib=memory)["max_tokens_per_micro_batch"]
    assert budget is not None and budget > 256 * 50
    assert planned(shallow, margin=0.0, gpu_memory_gib=memory, tokens=budget, search=False)["fits"] is True
    larger = math.ceil(budget * 1.03)
    assert planned(shallow, margin=0.0, gpu_memory_gib=memory, tokens=larger, search=False)["fits"] is False


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    """12 layers with wide MLPs and short conversations: the sharded parameters (the size of the optimizer step's
    foreach temporary, optim.fused=false on cuda) outweigh what forward/backward holds beyond the model states
    (one unsharded layer, activations, buffers), so the optimizer step is the peak."""
    from transformers import Qwen3Config

    folder = tmp_path_factory.mktemp("qwen3-wide-12-layers")
    dims = {**DIMS, "intermediate_size": 2048}
    Qwen3Config(**dims, num_hidden_layers=12, tie_word_embeddings=False).save_pretrained(folder)
    return folder


def test_no_budget_when_the_optimizer_step_alone_overflows(wide, monkeypatch):
    extra = ("data.max_length=16", "optim.fused=false")
    alone = plan.plan_from_overrides(
        overrides(wide, *extra), gpus=2, device="cuda", gpu_memory_gib=80, margin=0.0, search=False
    )
    forward_backward, step = (alone["phases"][p]["peak_gib"] for p in ("forward_backward", "optimizer_step"))
    assert forward_backward < step  # the case: only the optimizer step overflows the memory between them
    memory = (forward_backward + step) / 2
    monkeypatch.setattr(plan, "SUGGESTERS", (plan.suggest_fused_optimizer,))
    result = plan.plan_from_overrides(
        overrides(wide, *extra), gpus=2, device="cuda", gpu_memory_gib=memory, margin=0.0, suggest=True
    )
    assert result["fits"] is False
    assert result["max_tokens_per_micro_batch"] is None and "optimizer step" in result["max_tokens_method"]
    # the fused optimizer has no such temporary: what would fit, at no cost
    (fused,) = result["suggestions"]
    assert fused["overrides"] == ["optim.fused=true"] and fused["tier"] == 0 and fused["peak_gib"] < memory


def test_auto_budget_refuses_a_budget_between_nothing_and_a_lone_pair(shallow, monkeypatch):
    """A budget that fits some tokens but fewer than one pair of 2 x data.max_length: refused, not handed over."""
    from btrm.schema import PreflightError

    extra = ("data.max_length=1024",)  # a lone pair: 2,048 tokens
    half, lone = (
        planned(shallow, *extra, gpus=2, device="cuda", gpu_memory_gib=80, margin=0.0, tokens=t, search=False)
        for t in (1024, 2048)
    )
    usable = (half["peak_gib"] + lone["peak_gib"]) / 2  # 1,024 tokens fit, 2,048 do not
    monkeypatch.setattr(plan, "DEFAULT_GPU_MEMORY_GIB", usable / 0.9)  # trainer.gpu_memory_margin 10% kept free
    config = compose_config(overrides(shallow, *extra))
    result = plan.plan_config(config, gpus=2, device="cuda")
    assert 1024 <= result["max_tokens_per_micro_batch"] < 2048 and result["fits"] is False
    with pytest.raises(PreflightError) as refused:
        plan.auto_token_budget(config, world_size=2)
    line = str(refused.value)
    assert f"{result['max_tokens_per_micro_batch']:,} tokens per micro-batch" in line and "2,048 tokens" in line


# ----------------------------------------------------------------------------- what would fit


def replanned(model_dir, base: tuple[str, ...], suggestion: dict, memory: float, **kwargs) -> dict:
    """A suggestion planned again from scratch as its plan_command would: the base overrides, then its own."""
    return plan.plan_from_overrides(
        [*overrides(model_dir, *base), *suggestion["overrides"]],
        gpus=suggestion["gpus"],
        gpu_memory_gib=memory,
        margin=suggestion["margin"],
        search=False,
        **kwargs,
    )


def test_what_would_fit_is_planned_cheapest_first_and_each_change_fits(shallow):
    base = ("data.max_length=1024",)  # a lone pair: 2,048 tokens
    lone = planned(shallow, *base, margin=0.0, search=False)
    memory = lone["peak_gib"] / 0.925  # fits with 7% kept free (not 8%), not with trainer.yaml's 10%
    result = planned(shallow, *base, gpu_memory_gib=memory, suggest=True)
    assert result["fits"] is False and result["margin"] == 0.1
    suggestions = {s["change"]: s for s in result["suggestions"]}
    assert list(suggestions) == [
        "trainer.gpu_memory_margin=0.07",  # the largest whole percent kept free at which the peak fits
        "ulysses_sequence_parallel_size=2",  # the smallest size dividing the 2 GPUs and the 4 heads
        "model.fsdp_config.cpu_offload=true",
        "data.max_length=768",  # the longest multiple of 256 whose lone pair fits the largest budget (< 2,048)
        "8 GPUs (one node)",  # 4 do not fit (the activations stay)
    ]
    assert [s["tier"] for s in suggestions.values()] == [0, 1, 1, 2, 3]
    # LoRA of rank 64 on a 64-wide model saves nothing: planned, not suggested
    assert (
        "did not fit: model.lora_rank=64" in result["suggestions_method"] and "4 GPUs" in result["suggestions_method"]
    )
    assert lone["peak_gib"] <= memory * (1 - 0.07) and lone["peak_gib"] > memory * (1 - 0.08)
    assert suggestions["8 GPUs (one node)"]["environment"] == {"N_GPUS_PER_NODE": "8"}
    assert suggestions["8 GPUs (one node)"]["plan_command"].startswith("bash run_bt_rm.sh --plan --gpus=8 ")
    for suggestion in suggestions.values():
        again = replanned(shallow, base, suggestion, memory)
        assert again["fits"] is True and again["peak_gib"] == suggestion["peak_gib"], suggestion["change"]
        if suggestion["change"] == "model.fsdp_config.cpu_offload=true":  # the model states on the host
            assert again["model_states_bytes"] == full_fine_tune_states(2, ranks=2) and again["host_memory_gib"] > 0
            assert not {"sharded_params", "sharded_grads", "optimizer_state"} & set(again["parts"])
    assert planned(shallow, *base, gpu_memory_gib=memory * 2, search=False, suggest=True)["suggestions"] == []


def test_gradient_checkpointing_is_suggested_where_it_is_off(shallow, monkeypatch):
    base = ("data.max_length=1024", "model.enable_gradient_checkpointing=false")
    without, with_it = (
        planned(shallow, *base, extra, margin=0.0, search=False)
        for extra in ("trainer.seed=42", "model.enable_gradient_checkpointing=true")
    )
    assert with_it["peak_gib"] < without["peak_gib"]
    memory = (with_it["peak_gib"] + without["peak_gib"]) / 2
    monkeypatch.setattr(plan, "SUGGESTERS", (plan.suggest_gradient_checkpointing,))
    result = planned(shallow, *base, gpu_memory_gib=memory, margin=0.0, suggest=True)
    (checkpointing,) = result["suggestions"]
    assert checkpointing["overrides"] == ["model.enable_gradient_checkpointing=true"] and checkpointing["tier"] == 1
    assert replanned(shallow, base, checkpointing, memory)["fits"] is True


def test_a_token_budget_above_what_fits_is_lowered_and_kept_low_in_every_change(shallow, monkeypatch):
    base = ("data.max_tokens_per_micro_batch=16384",)  # micro-batches of 16,384 tokens; ~8k fit in 60 MiB
    monkeypatch.setattr(plan, "SUGGESTERS", (plan.suggest_token_budget, plan.suggest_cpu_offload))
    memory = 60 / 1024
    result = planned(shallow, *base, gpu_memory_gib=memory, margin=0.0, suggest=True)
    assert result["fits"] is False and result["tokens"] == 16384
    budget = result["max_tokens_per_micro_batch"]
    first, offload = result["suggestions"]
    assert first["overrides"] == [f"data.max_tokens_per_micro_batch={budget}"] and first["tokens"] == budget
    # offloading leaves the activations of 16,384 tokens: planned again with the largest budget it fits
    assert offload["overrides"] == [
        "model.fsdp_config.cpu_offload=true",
        f"data.max_tokens_per_micro_batch={offload['tokens']}",
    ]
    assert budget <= offload["tokens"] < 16384
    for suggestion in (first, offload):
        assert replanned(shallow, base, suggestion, memory)["fits"] is True


def test_qwen3_32b_full_fine_tuning_on_8_80gb_gpus_gets_changes_that_fit(tmp_path, monkeypatch):
    """Issue 30's acceptance, on two of the changes (all of them: docs/fit-and-memory.md, by hand): a
    Qwen3-32B-shaped config.json, full fine-tuning, 8 x 80 GB, data.max_length=4096."""
    from transformers import Qwen3Config

    dims = {"hidden_size": 5120, "intermediate_size": 25600, "num_attention_heads": 64, "num_key_value_heads": 8}
    Qwen3Config(**dims, head_dim=128, vocab_size=151936, num_hidden_layers=64).save_pretrained(tmp_path)
    monkeypatch.setattr(plan, "SUGGESTERS", (plan.suggest_margin, plan.suggest_more_gpus))
    base = [f"model.partial_pretrain={tmp_path}", "data.max_length=4096"]
    result = plan.plan_from_overrides(base, gpus=8, gpu_memory_gib=80, device="cuda", suggest=True)
    assert result["fits"] is False and result["lora"] is False and result["parameters"] > 31.9e9
    margin, more = result["suggestions"]
    assert margin["change"].startswith("trainer.gpu_memory_margin=") and margin["peak_gib"] == result["peak_gib"]
    assert (more["gpus"], more["environment"]) == (16, {"NNODES": "2"})
    # 16 bytes a parameter (fp32 weight, gradient, two Adam moments) over 16 GPUs instead of 8 (+5% allocator)
    assert result["peak_gib"] - more["peak_gib"] == pytest.approx(16 * result["parameters"] / 16 / 2**30, rel=0.1)
    for suggestion in (margin, more):
        again = plan.plan_from_overrides(
            [*base, *suggestion["overrides"]],
            gpus=suggestion["gpus"],
            gpu_memory_gib=80,
            margin=suggestion["margin"],
            device="cuda",
            search=False,
        )
        assert again["fits"] is True, suggestion["change"]


# ----------------------------------------------------------------------------- CLI and process state


def test_cli_prints_the_table_and_ends_with_one_json_line(shallow):
    done = subprocess.run(
        [sys.executable, "-m", "btrm.plan_cli", "--gpus", "2", "--gpu-memory", "1", *overrides(shallow)],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.strip().splitlines()
    result = json.loads(lines[-1])
    assert set(result) >= REQUIRED_KEYS and result["gpus"] == 2 and result["gpu_memory_gib"] == 1
    assert any(line.startswith("peak ") for line in lines) and "largest token budget" in done.stdout
    assert result["fits"] is True and result["suggestions"] == []  # asked by default; nothing to suggest


def test_cli_refuses_a_bad_override_in_one_line(shallow):
    done = subprocess.run(
        [sys.executable, "-m", "btrm.plan_cli", *overrides(shallow), "data.max_lenght=5"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 2 and done.stderr.startswith("error: ") and "max_lenght" in done.stderr


def test_planning_leaves_no_state_and_runs_beside_a_real_process_group_in_a_subprocess(shallow):
    import torch.distributed as dist

    rng, varlen_check = torch.random.get_rng_state(), attention.runs_on_varlen_kernel
    config = compose_config(overrides(shallow))
    here = plan.plan_config(config, gpus=2, device="cuda", gpu_memory_gib=80, tokens=128, search=False)
    assert not dist.is_initialized() and torch.equal(torch.random.get_rng_state(), rng)
    assert attention.runs_on_varlen_kernel is varlen_check
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        there = plan.plan_config(config, gpus=2, device="cuda", gpu_memory_gib=80, tokens=128, search=False)
        tensor = torch.ones(1)
        dist.all_reduce(tensor)  # the real group still works
    finally:
        dist.destroy_process_group()
    assert there["model_states_bytes"] == here["model_states_bytes"] and there["peak_gib"] == here["peak_gib"]


# ----------------------------------------------------------------------------- against a real step


def test_planned_peak_is_within_20_percent_of_a_real_steps_resident_memory(tmp_path):
    from bench import plan_accuracy

    dims = {"hidden_size": 512, "intermediate_size": 1536, "num_hidden_layers": 4, "num_attention_heads": 8}
    model_dir = plan_accuracy.save_random_model(tmp_path / "model", dims)
    case = {"overrides": ["data.max_length=256"], "tokens": 512}
    trainer_overrides = plan_accuracy.trainer_overrides(model_dir, case)
    result = plan.plan_from_overrides(trainer_overrides, gpus=1, device="cpu", tokens=case["tokens"], search=False)
    measured = plan_accuracy.run_measurement(trainer_overrides, case["tokens"])
    assert result["peak_gib"] * 2**30 == pytest.approx(measured["peak_bytes"], rel=0.2)
    assert result["model_states_gib"] * 2**30 == pytest.approx(measured["resident_bytes"], rel=0.2)


def test_auto_budget_refuses_in_one_line_what_cannot_fit_one_pair(shallow, monkeypatch):
    """data.max_tokens_per_micro_batch=auto on GPUs: the line names the peak, the memory and what would fit."""
    from btrm.schema import PreflightError

    monkeypatch.setattr(plan, "DEFAULT_GPU_MEMORY_GIB", 1.05)  # no visible GPU here: the assumed card, tiny
    config = compose_config(overrides(shallow))
    with pytest.raises(PreflightError) as refused:
        plan.auto_token_budget(config, world_size=2)
    line = str(refused.value)
    assert "\n" not in line and "of 1.05 GiB usable" in line and "peak is 1." in line
    assert all(way in line for way in ("LoRA", "cpu_offload", "more GPUs", "data.max_length"))
    monkeypatch.setattr(plan, "DEFAULT_GPU_MEMORY_GIB", 80.0)
    budget = plan.auto_token_budget(config, world_size=2)
    assert budget.tokens >= 128 and "2 GPUs of 80 GiB, 10% kept free" in budget.source


# ----------------------------------------------------------------------------- sequence parallelism

ATTENTION_HEAVY = {  # attention's tensors dominate (64-wide hidden, 512-wide queries); 1 kv head: repeated for N=2
    "hidden_size": 32,
    "intermediate_size": 32,
    "num_attention_heads": 8,
    "num_key_value_heads": 1,
    "head_dim": 64,
    "vocab_size": 256,
}


@pytest.fixture(scope="module")
def attention_heavy(tmp_path_factory):
    from transformers import Qwen3Config

    folder = tmp_path_factory.mktemp("qwen3-attention-heavy")
    Qwen3Config(**ATTENTION_HEAVY, num_hidden_layers=2, tie_word_embeddings=False).save_pretrained(folder)
    return folder


def forward_backward_parts(result) -> dict:
    return result["phases"]["forward_backward"]["parts"]


def test_sequence_parallel_rank_holds_its_share_of_the_row_and_the_all_to_all_buffers(attention_heavy):
    """N=2 at a row of T tokens: each rank is N=1 at T/2 tokens plus the four all-to-all outputs of attention (the
    gathered query, key, value and the output: the whole row with 1/N of the heads, the kv head repeated to N),
    written out by hand; the activations of the row are about halved; the table and the JSON say N."""
    row, size = 4096, 2
    base = ("data.max_length=2048",)
    one = planned(attention_heavy, *base, tokens=row, search=False)
    half = planned(attention_heavy, *base, tokens=row // size, search=False)
    split = planned(attention_heavy, *base, f"ulysses_sequence_parallel_size={size}", tokens=row, search=False)
    heads, kv_heads, head_dim = (ATTENTION_HEAVY[k] for k in ("num_attention_heads", "num_key_value_heads", "head_dim"))
    repeated_kv = max(kv_heads, size)  # btrm.sequence_parallel repeats kv heads until N divides them
    all_to_all = row * head_dim * 4 * (2 * heads + 2 * repeated_kv) // size  # fp32 q, out; k, v (bytes)
    added = (
        split["phases"]["forward_backward"]["peak_gib"] - half["phases"]["forward_backward"]["peak_gib"]
    ) * plan.GIB
    assert added == pytest.approx(all_to_all, rel=0.05)
    activations = {name: forward_backward_parts(r)["activations"] for name, r in (("one", one), ("split", split))}
    assert activations["split"] < 0.65 * activations["one"]  # the half, and the all-to-all outputs kept for backward
    assert (split["sequence_parallel_size"], split["tokens"], split["tokens_per_gpu"]) == (2, row, row // 2)
    assert one["sequence_parallel_size"] == 1
    report = plan.format_report(split)
    assert "sequence parallelism 2 (each row over 2 GPUs, 2,048 tokens each)" in report
    assert "ulysses_sequence_parallel_size=2: each row of 4,096 tokens split over 2 GPUs" in report


def test_sequence_parallelism_needs_heads_it_divides(shallow):
    from btrm.schema import PreflightError

    with pytest.raises(PreflightError, match="does not divide the model's 4 attention heads"):
        planned(shallow, "ulysses_sequence_parallel_size=8", gpus=8, search=False)


def test_auto_budget_with_sequence_parallelism_is_a_groups_row(attention_heavy, monkeypatch):
    """data.max_tokens_per_micro_batch=auto with N=2 (bt_trainer and the launcher): the budget of a group's row,
    about twice one GPU's alone where activations fill the memory, and a row of it fits."""
    base = overrides(attention_heavy, "data.max_length=2048")
    one_gpu = planned(attention_heavy, "data.max_length=2048", tokens=8192, margin=0.0, device="cuda", search=False)
    memory = one_gpu["peak_gib"]
    monkeypatch.setattr(plan, "DEFAULT_GPU_MEMORY_GIB", memory / 0.9)  # 8,192 tokens fit one GPU with 10% free
    budgets = {
        size: plan.auto_token_budget(compose_config([*base, f"ulysses_sequence_parallel_size={size}"]), world_size=2)
        for size in (1, 2)
    }
    assert 8192 <= budgets[1].tokens < 8192 * 1.1
    assert budgets[2].tokens > 1.7 * budgets[1].tokens
    assert "per row of a sequence-parallel group of 2 GPUs" in budgets[2].source
    again = planned(
        attention_heavy,
        "data.max_length=2048",
        "ulysses_sequence_parallel_size=2",
        tokens=budgets[2].tokens,
        gpu_memory_gib=memory / 0.9,
        device="cuda",
        search=False,
    )
    assert again["fits"] is True


def qwen3_32b(folder):
    from transformers import Qwen3Config

    dims = {"hidden_size": 5120, "intermediate_size": 25600, "num_attention_heads": 64, "num_key_value_heads": 8}
    Qwen3Config(**dims, head_dim=128, vocab_size=151936, num_hidden_layers=64).save_pretrained(folder)
    return folder


def test_qwen3_32b_at_16k_with_sequence_parallelism_8_holds_a_quarter_of_the_activations(tmp_path):
    """Issue 30's acceptance (the plan's half): Qwen3-32B-shaped, 8 x 80 GB, data.max_length=16384."""
    base = [f"model.partial_pretrain={qwen3_32b(tmp_path)}", "data.max_length=16384"]
    one, eight = (
        plan.plan_from_overrides(
            [*base, f"ulysses_sequence_parallel_size={n}"], gpus=8, gpu_memory_gib=80, device="cuda", search=False
        )
        for n in (1, 8)
    )
    assert one["tokens"] == eight["tokens"] == 32768 and eight["tokens_per_gpu"] == 4096
    assert forward_backward_parts(eight)["activations"] <= forward_backward_parts(one)["activations"] / 4
    assert one["fits"] is False and eight["fits"] is True
    # the same work per token, split over 8 GPUs: each GPU's tokens/s as without splitting
    assert eight["predicted_tokens_per_s"] == one["predicted_tokens_per_s"]
    assert eight["step_flops"] == pytest.approx(one["step_flops"] / 8)


def test_sequence_parallelism_is_suggested_at_the_smallest_size_that_fits(shallow, monkeypatch):
    """8 GPUs, 4 heads: sizes 2 and 4 divide both. The memory lies between their peaks: 2 is planned and does
    not fit, 4 is suggested, and planned again from its overrides it fits with the same peak."""
    order = [suggester.__name__ for suggester in plan.SUGGESTERS]  # tier 1, tried before CPU offload
    assert order.index("suggest_sequence_parallel") == order.index("suggest_cpu_offload") - 1
    base = ("data.max_length=1024",)  # a lone pair: 2,048 tokens
    peaks = {
        n: planned(shallow, *base, f"ulysses_sequence_parallel_size={n}", gpus=8, margin=0.0, search=False)["peak_gib"]
        for n in (2, 4)
    }
    assert peaks[4] < peaks[2]
    memory = (peaks[2] + peaks[4]) / 2 / 0.9  # trainer.yaml keeps 10% free
    monkeypatch.setattr(plan, "SUGGESTERS", (plan.suggest_sequence_parallel,))
    result = planned(shallow, *base, gpus=8, gpu_memory_gib=memory, suggest=True)
    assert result["fits"] is False
    (suggestion,) = result["suggestions"]
    assert suggestion["tier"] == 1 and suggestion["overrides"] == ["ulysses_sequence_parallel_size=4"]
    assert "ulysses_sequence_parallel_size=2 (peak" in result["suggestions_method"]
    assert suggestion["max_tokens_per_micro_batch"] >= 2048  # a group's row holds a lone pair
    again = replanned(shallow, base, suggestion, memory)
    assert again["fits"] is True and again["peak_gib"] == suggestion["peak_gib"]

"""btrm.modeling: build_model's value-head model, LoRA, counts, optimizer and schedule, on one gloo rank."""

import pytest
import torch

from btrm import modeling
from btrm.config import RunConfig
from conftest import REPO, free_port


@pytest.fixture()
def one_rank_mesh():
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    yield init_device_mesh("cpu", (1,), mesh_dim_names=("fsdp",))
    dist.destroy_process_group()


def trainer_config(model_dir, *overrides):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(REPO), version_base=None):
        return compose(
            config_name="trainer", overrides=[f"model.partial_pretrain={model_dir}", "trainer.device=cpu", *overrides]
        )


def causal_lm_linear_shapes(model_dir):
    """(in, out) of every linear layer in the causal LM's blocks, and its backbone size without lm_head: read
    from transformers' own model, not from anything build_model returns."""
    from transformers import AutoModelForCausalLM

    causal_lm = AutoModelForCausalLM.from_pretrained(model_dir)
    shapes = [
        (m.in_features, m.out_features)
        for name, m in causal_lm.named_modules()
        if isinstance(m, torch.nn.Linear) and ".layers." in name
    ]
    backbone = sum(p.numel() for name, p in causal_lm.named_parameters() if not name.startswith("lm_head"))
    return shapes, backbone, causal_lm.config.hidden_size


def test_full_fine_tune_counts_layout_and_schedule(one_rank_mesh, tiny_model_dir):
    config = trainer_config(
        tiny_model_dir,
        "optim.lr_scheduler=constant",
        "optim.warmup_steps_ratio=0.0",
        "optim.lr=0.25",
        "data.share_prompt=true",
    )
    built = modeling.build_model(RunConfig.from_config(config), one_rank_mesh, "cpu", pad_token_id=7, total_steps=10)
    _, backbone, hidden = causal_lm_linear_shapes(tiny_model_dir)
    assert built.class_name == "Qwen3ForTokenClassification" and built.lora_settings is None
    assert (built.parameter_count, built.trainable_parameter_count) == (
        backbone + hidden + 1,
        backbone + hidden,
    )  # score weight + frozen bias
    assert built.newly_initialized == ["score.bias", "score.weight"]
    assert built.layout == "shared" and built.model_config.pad_token_id == 7
    assert built.fsdp_model is built.model  # FSDP2 shards in place
    optimized = sum(p.numel() for group in built.optimizer.param_groups for p in group["params"])
    assert optimized == backbone + hidden
    assert built.lr_scheduler.get_last_lr() == [0.25]


def test_lora_trains_adapters_and_the_score_weight_only(one_rank_mesh, tiny_model_dir):
    config = trainer_config(tiny_model_dir, "model.lora_rank=4", "model.lora_alpha=8", "use_remove_padding=false")
    built = modeling.build_model(RunConfig.from_config(config), one_rank_mesh, "cpu", pad_token_id=7, total_steps=10)
    shapes, backbone, hidden = causal_lm_linear_shapes(tiny_model_dir)
    adapters = sum(4 * (fan_in + fan_out) for fan_in, fan_out in shapes)
    assert built.layout == "padded"
    assert built.class_name.startswith("Qwen3ForTokenClassification + LoRA (rank 4, alpha 8, ")
    assert built.trainable_parameter_count == adapters + hidden
    assert built.parameter_count == backbone + hidden + 1 + adapters
    assert sum(p.numel() for group in built.optimizer.param_groups for p in group["params"]) == adapters + hidden


def test_weights_are_finite_until_one_value_is_not(one_rank_mesh):
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 1))
    assert modeling.all_weights_finite(model, "cpu")
    with torch.no_grad():
        model[1].bias.fill_(float("inf"))
    assert not modeling.all_weights_finite(model, "cpu")


def test_auto_device_is_cpu_without_a_gpu():
    assert not torch.cuda.is_available()
    assert modeling.resolve_device("auto") == "cpu" and modeling.resolve_device("cpu") == "cpu"
    assert (
        modeling.resolve_param_dtype("auto", "cpu") == torch.float32
        and modeling.resolve_param_dtype("auto", "cuda") == torch.bfloat16
    )


@pytest.mark.parametrize(
    "overrides, fused, eps",
    [
        ([], True, 1e-8),  # trainer.yaml: fused AdamW
        (["optim.fused=false"], None, 1e-8),  # torch's own choice (foreach on GPU)
        (["optim.override_optimizer_config={fused:false,eps:1e-6}"], False, 1e-6),  # the user's kwargs win
    ],
)
def test_the_optimizer_is_fused_unless_the_config_says_otherwise(overrides, fused, eps):
    from verl.workers.config.optimizer import build_optimizer

    from btrm.modeling import optimizer_settings
    from btrm.schema import compose_config

    optim = RunConfig.from_config(compose_config(overrides)).optim
    optimizer = build_optimizer(torch.nn.Linear(4, 1).parameters(), optimizer_settings(optim))
    assert type(optimizer) is torch.optim.AdamW
    assert optimizer.defaults["fused"] == fused and optimizer.defaults["eps"] == eps
    assert RunConfig.from_config(compose_config(overrides)).optim == optim  # the view is not changed

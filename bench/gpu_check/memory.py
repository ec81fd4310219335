"""Part `memory`: the real trainer's step (bt_trainer.BTRewardTrainer built here from trainer.yaml + overrides, its
training_step fed HelpSteer2-like pairs filling one micro-batch exactly) at the planned config's budget and at the
planner's largest fitting budget: torch.cuda.max_memory_allocated / max_memory_reserved against
btrm.plan.plan_from_overrides' allocated_peak_gib / reserved_peak_gib for the same overrides and tokens; then the
trainer's start-up layout check on that FSDP2 model."""

from __future__ import annotations

import contextlib
import os
import sys

from bench.gpu_check.common import (
    GIB,
    Context,
    error_line,
    free_port,
    one_full_micro_batch,
    plan_summary,
    planner_available,
)


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
        # one micro-batch of exactly `tokens` computed tokens: the trainer's step plans with its own budget
        # (resolved at start-up from the config)
        config.data.max_tokens_per_micro_batch = tokens
        trainer.step.token_budget = type(trainer.step.token_budget)(tokens, "bench.gpu_check")
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

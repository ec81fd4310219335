"""Every size, limit and order of the GPU check: one dict per mode (the GPU run and --dry), and the part order."""

from __future__ import annotations

from demo.make_tiny_model import TINY_QWEN3

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

# Run order: seconds-long checks that everything else needs first, then the figures in order of value; each part's
# results are in the results folder as soon as it ends, so a command cut off keeps what finished. A part that has
# less than MIN_PART_S left is skipped; the last one gets what the others left ("if time remains").
PART_ORDER = ("smoke", "throughput", "memory", "trainer", "layouts", "throughput_large")
MIN_PART_S = 15

# The device tool's limit for one command is 600 s; the documented command asks for COMMAND_LIMIT_S, a minute spare.
# total_s counts from gpu_check.sh's start (the wheel install included) and leaves FINISH_S for the last writes.
COMMAND_LIMIT_S = 540
FINISH_S = 40

# Everything that differs between a GPU run and --dry. Model names in throughput_models / memory_model are
# bench/bench_throughput.py's MODEL_CONFIGS (real Qwen3 dimensions, every layer); a trainer_model vocab_size of
# None takes the tokenizer's (512, trained on the demo data). part_s of every part but the last add up to at most
# total_s - install_s: a slow part shortens only the parts after it.
SIZES = {
    "gpu": {
        "device": "cuda",
        "cpu_threads": None,  # torch's default
        "total_s": COMMAND_LIMIT_S - FINISH_S,
        "install_s": 40,  # gpu_check.sh's pip install of .whl/ (17 wheels, --no-deps) and the interpreter's start
        "part_s": {
            "smoke": 45,
            "throughput": 120,
            "memory": 100,
            "trainer": 150,
            "layouts": 45,
            "throughput_large": 150,
        },
        "plan_s": 150,  # one btrm.plan call (a waiting part gives up after this)
        "max_length": 4096,  # data.max_length: the longest conversation (HelpSteer2-like lengths are truncated to it)
        "plan_tokens": 8192,  # data.max_tokens_per_micro_batch of the planned config: the memory part's first step
        "gpu_memory_gib": None,  # what the planner plans for; None: nvidia-smi's memory.total of GPU 0
        # the kernel probe: one rejected-response-like segment (fewer queries than keys) and one square one
        "probe": {"heads": 32, "kv_heads": 8, "head_dim": 128, "segments": [[370, 550], [200, 200]]},
        "layout_model": {**QWEN3_8B_BLOCK, "num_hidden_layers": 4},
        "layout_pairs": 8,  # one micro-batch of 8 pairs, in each layout
        "layout_repeats": 3,  # timed fwd+bwd per layout after one warm-up (median kept)
        "throughput_models": ["qwen3-1.7b"],
        "large_throughput_models": ["qwen3-4b"],
        "throughput_modes": ["packed", "shared", "batch_pad"],  # in run order: the least informative last
        "large_throughput_modes": ["packed", "shared", "batch_pad"],
        "throughput_model_s": 120,  # one model's runs (one subprocess), warm-up steps included
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
        # FSDP2 first with trainer.yaml's budget (auto: the trainer runs btrm.plan at start-up); the others set one,
        # so that only one run pays for the planning
        "trainer_runs": {
            "fsdp2": [],
            "fsdp": ["model.strategy=fsdp", "data.max_tokens_per_micro_batch=8192"],
            "fsdp2_cpu_offload": ["model.fsdp_config.cpu_offload=true", "data.max_tokens_per_micro_batch=8192"],
        },
        "trainer_steps": 2,
        "trainer_pairs": 64,  # data.max_samples: the first pairs of each demo file (16 a step)
        "trainer_run_s": 50,  # each of the 3 runs: together within part_s["trainer"]
    },
    "dry": {
        "device": "cpu",
        "cpu_threads": 1,  # 2 shared cores: torch's 2 threads stall behind other jobs' (10x step-time swings seen)
        "total_s": 420,  # limits for 2 cores shared with other jobs (load 9: 4 minutes); idle cores take about half
        "install_s": 0,
        "part_s": {"smoke": 70, "throughput": 60, "memory": 80, "trainer": 120, "layouts": 50, "throughput_large": 40},
        "plan_s": 50,
        "max_length": 1024,  # long enough that left truncation keeps the prompts: the shared layout shares them
        "plan_tokens": 2048,
        "gpu_memory_gib": 0.1,  # a tiny "GPU": the planner's budget search (its cost grows with the budget) stays short
        "probe": {"heads": 4, "kv_heads": 2, "head_dim": 16, "segments": [[6, 10], [5, 5]]},
        "layout_model": {**TINY_BLOCK, "vocab_size": 512},
        "layout_pairs": 2,
        "layout_repeats": 1,
        "throughput_models": ["cpu-small"],
        "large_throughput_models": ["cpu-small"],
        "throughput_modes": ["packed", "shared", "batch_pad"],
        "large_throughput_modes": ["packed"],  # the same code as the smaller model's: one mode keeps the tests short
        "throughput_model_s": 50,
        "default_budget": 2048,
        "budget_cap": 2048,
        "memory_model": "cpu-small",
        "memory_budget_cap": 2048,  # = plan_tokens: one measured step, one plan
        "trainer_model": {**TINY_BLOCK, "vocab_size": None},
        "trainer_runs": {"fsdp2": []},  # FSDP1 needs a GPU; CPU offload is the same code path as fsdp2 here
        "trainer_steps": 2,
        "trainer_pairs": 32,
        "trainer_run_s": 110,
    },
}

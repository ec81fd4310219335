"""bench/bench_throughput.py's building blocks (the speed itself is measured by running the script, not here)."""

import statistics
from types import SimpleNamespace

import pytest
import torch

from bench import bench_throughput as bench
from btrm.pair_dataset import TokenizedPair


def test_lengths_resemble_helpsteer2():
    pairs = bench.helpsteer2_like_pairs(3000, vocab_size=1000, max_length=4096, seed=1)
    assert 950 < statistics.fmean(p.num_tokens for p in pairs) < 1250  # ~1.1k tokens a pair
    assert all(
        p.shared_prefix >= 8 or max(len(p.chosen), len(p.rejected)) == 4096 for p in pairs
    )  # a shared prompt of >= 8 tokens
    assert max(len(s) for p in pairs for s in (p.chosen, p.rejected)) <= 4096
    # ~180-token prompts against ~370-token responses: sharing the prompt saves ~16-18% of the tokens
    assert 0.78 < sum(p.computed_tokens("shared") for p in pairs) / sum(p.num_tokens for p in pairs) < 0.88


def test_cpu_default_model_is_compute_dominated():
    args = bench.parse_args([])
    config = bench.MODEL_CONFIGS[args.model]
    assert args.model == "cpu-dense" and config["hidden_size"] >= 256 and config["num_hidden_layers"] >= 4


def test_pad_to_max_rows_are_max_length_and_read_the_last_real_token():
    # hand-built: no sequence reaches max_length, so reading the last column would be wrong
    pairs = [TokenizedPair([5, 6, 7], [5, 6, 8, 9, 10]), TokenizedPair([11], [12, 13])]
    padded = bench.collate("pad_to_max", pairs, 0, 16)
    per_batch = bench.collate("batch_pad", pairs, 0, 16)
    assert padded["input_ids"].shape == (4, 16) and per_batch["input_ids"].shape == (4, 5)
    assert (
        padded["reward_index"].tolist() == per_batch["reward_index"].tolist() == [2, 0, 4, 1]
    )  # chosen, chosen, rejected, rejected
    assert padded["input_ids"][torch.arange(4), padded["reward_index"]].tolist() == [7, 11, 10, 13]
    assert torch.equal(padded["input_ids"][:, :5], per_batch["input_ids"]) and not padded["input_ids"][:, 5:].any()


@pytest.mark.parametrize("mode", ["packed", "shared"])
def test_packed_modes_read_each_conversations_last_token(mode):
    pairs = bench.helpsteer2_like_pairs(5, vocab_size=100, max_length=512, seed=2)
    batch = bench.collate(mode, pairs, 0, 512)
    last_tokens = [p.chosen[-1] for p in pairs] + [p.rejected[-1] for p in pairs]
    assert batch["input_ids"][0, batch["reward_index"]].tolist() == last_tokens
    unshared = sum(p.num_tokens for p in pairs)
    assert batch["input_ids"].shape[1] == (
        unshared if mode == "packed" else unshared - sum(p.shared_prefix for p in pairs)
    )


def test_flops_formula_by_hand():
    model = bench.build_model("cpu-small", "cpu", "sdpa")
    c = model.config
    dense = sum(p.numel() for n, p in model.named_parameters() if "embed_tokens" not in n)
    assert dense == pytest.approx(
        c.num_hidden_layers
        * (
            c.hidden_size * c.num_attention_heads * c.head_dim * 2
            + c.hidden_size * c.num_key_value_heads * c.head_dim * 2
            + 3 * c.hidden_size * c.intermediate_size
            + 2 * c.hidden_size
            + 2 * c.head_dim
        )
        + c.hidden_size
        + c.hidden_size
        + 1,
    )
    assert bench.reward_model_flops(
        model, [10, 20]
    ) == 6 * dense * 30 + 6 * c.num_hidden_layers * c.num_attention_heads * c.head_dim * (100 + 400)


@pytest.mark.parametrize("mode", ["packed", "shared"])
def test_packed_plan_respects_the_budget_of_computed_tokens(mode):
    args = bench.parse_args(["--max-tokens", "3000"])
    pairs = bench.helpsteer2_like_pairs(40, vocab_size=100, max_length=4096, seed=3)
    plan = bench.plan(mode, pairs, args)
    assert sorted(i for micro in plan for i in micro) == list(range(40))
    for micro in plan:
        computed = sum(pairs[i].num_tokens - (pairs[i].shared_prefix if mode == "shared" else 0) for i in micro)
        assert computed <= 3000 or len(micro) == 1


def test_summary_ratios_by_hand():
    results = {
        mode: {
            "pairs_per_s": pps,
            "tokens_per_pair": tpp,
            "real_token_share": share,
            "peak_memory_gib": 1.0,
            "flops_per_s": 0.0,
            "params": 100,
            "trainable_params": 10,
            "weights_gib": 1.0,
            "grads_gib": 0.1,
            "optimizer_state_gib": 0.2,
        }
        for mode, pps, tpp, share in (
            ("pad_to_max", 0.5, 8192, 0.125),
            ("batch_pad", 2.0, 1200, 0.8),
            ("packed", 2.5, 1000, 1.0),
            ("shared", 3.0, 800, 1.0),
        )
    }
    args = SimpleNamespace(
        device="cpu",
        model="cpu-dense",
        pairs=16,
        max_tokens=4096,
        step_pairs=8,
        micro_batch_pairs=1,
        max_length=4096,
        lora_rank=0,
    )
    summary = bench.summarize(results, args)
    assert summary["packed_real_token_share"] == 1.0
    assert summary["packed_speedup_vs_pad_to_max"] == 5.0
    assert summary["packed_speedup_vs_batch_pad"] == 1.25
    assert summary["shared_speedup_vs_batch_pad"] == 1.5
    assert summary["shared_tokens_per_pair_ratio"] == 0.8
    assert "shared" in bench.summary_table(results, args)

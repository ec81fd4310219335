"""bench/bench_throughput.py's building blocks (the speed itself is measured by running the script, not here)."""

import statistics
import sys

import pytest
import torch

from conftest import REPO

sys.path.insert(0, str(REPO / "bench"))
import bench_throughput as bench  # noqa: E402


def test_lengths_resemble_helpsteer2():
    pairs = bench.helpsteer2_like_pairs(3000, vocab_size=1000, max_length=4096, seed=1)
    assert 950 < statistics.fmean(p.num_tokens for p in pairs) < 1250  # ~1.1k tokens a pair
    assert all(p.chosen[0] == p.rejected[0] or len(p.chosen) == 4096 or len(p.rejected) == 4096 for p in pairs)  # shared prompt
    assert max(len(s) for p in pairs for s in (p.chosen, p.rejected)) <= 4096


def test_pad_to_max_rows_are_max_length_and_read_the_same_token():
    pairs = bench.helpsteer2_like_pairs(2, vocab_size=100, max_length=512, seed=2)
    padded = bench.collate("pad_to_max", pairs, 0, 512)
    per_batch = bench.collate("batch_pad", pairs, 0, 512)
    assert padded["input_ids"].shape == (4, 512)
    assert torch.equal(padded["reward_index"], per_batch["reward_index"])
    assert torch.equal(padded["input_ids"][:, : per_batch["input_ids"].shape[1]], per_batch["input_ids"])


def test_flops_formula_by_hand():
    model = bench.build_model("cpu-small", "cpu", "sdpa")
    c = model.config
    dense = sum(p.numel() for n, p in model.named_parameters() if "embed_tokens" not in n)
    assert dense == pytest.approx(
        c.num_hidden_layers * (c.hidden_size * c.num_attention_heads * c.head_dim * 2 + c.hidden_size * c.num_key_value_heads * c.head_dim * 2
                               + 3 * c.hidden_size * c.intermediate_size + 2 * c.hidden_size + 2 * c.head_dim) + c.hidden_size + c.hidden_size + 1,
    )
    assert bench.reward_model_flops(model, [10, 20]) == 6 * dense * 30 + 6 * c.num_hidden_layers * c.num_attention_heads * c.head_dim * (100 + 400)


def test_packed_plan_respects_budget():
    args = bench.parse_args(["--max-tokens", "3000"])
    pairs = bench.helpsteer2_like_pairs(40, vocab_size=100, max_length=4096, seed=3)
    for micro in bench.plan("packed", pairs, args):
        assert sum(pairs[i].num_tokens for i in micro) <= 3000 or len(micro) == 1

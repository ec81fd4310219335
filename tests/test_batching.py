"""btrm.batching: the reward token (verl's rule), micro-batches, the padded / packed / shared layouts, check_layout and score().

Model-level exactness of the layouts (rewards, loss, gradients vs the padded path) is in test_attention.py."""

import copy
import json
import random

import pytest
import torch

from btrm import attention, batching, pair_dataset
from btrm.pair_dataset import TokenizedPair


def conv(prompt, answer):
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]


@pytest.fixture(scope="module")
def value_model(tiny_model_dir):
    from btrm.modeling import load_value_head_model

    torch.manual_seed(1)
    model = load_value_head_model(
        str(tiny_model_dir), attn_implementation="sdpa", torch_dtype=torch.float32, trust_remote_code=False
    )
    torch.nn.init.normal_(model.score.weight, std=1.0)
    return model.eval()


# ----------------------------------------------------------------------------- the reward token


def verl_reading(attention_mask):
    """verl 0.6.1 RewardModelWorker: position ids from the mask, score at argmax(position_ids * mask)."""
    from verl.utils.model import compute_position_id_with_mask

    position_ids = compute_position_id_with_mask(attention_mask)
    return torch.argmax(position_ids * attention_mask, dim=-1)


def test_reward_index_is_verls_reading_and_the_last_real_token():
    sequences = [[5, 6, 7], [8], [9, 10, 11, 12, 13]]
    batch = batching.collate_padded(sequences, pad_token_id=0)
    assert batch["reward_index"].tolist() == [2, 0, 4]
    assert torch.equal(batch["reward_index"], verl_reading(batch["attention_mask"]))
    assert batch["input_ids"].shape == (3, 5)  # padded to the longest here, not to max_length


def test_rewards_do_not_depend_on_padding(value_model, tokenizer):
    sequences = [
        pair_dataset.encode_conversation(tokenizer, conv("How do I plant tomatoes?", a))
        for a in ("Water them daily.", "No.")
    ]
    alone = [
        batching.compute_rewards(value_model, batching.collate_padded([s], tokenizer.pad_token_id)).item()
        for s in sequences
    ]
    together = batching.compute_rewards(value_model, batching.collate_padded(sequences, tokenizer.pad_token_id))
    extra_padding = batching.collate_padded(sequences + [sequences[0] + [0] * 30], tokenizer.pad_token_id)
    with_long_neighbour = batching.compute_rewards(value_model, extra_padding)[:2]
    assert together.tolist() == pytest.approx(alone, abs=1e-5)
    assert with_long_neighbour.tolist() == pytest.approx(alone, abs=1e-5)


# ----------------------------------------------------------------------------- micro-batches and packing


def pairs_of_lengths(lengths):
    return [TokenizedPair(list(range(n)), list(range(n))) for n in lengths]


def test_fixed_size_micro_batches():
    assert batching.fixed_size_micro_batches(5, 2) == [[0, 1], [2, 3], [4]]


@pytest.mark.parametrize("seed", range(20))
def test_token_budget_never_splits_a_pair_nor_exceeds_the_budget(seed):
    rng = random.Random(seed)
    tokens = [rng.randint(10, 400) for _ in range(rng.randint(1, 40))]
    budget = rng.randint(200, 800)
    min_count = rng.randint(1, len(tokens))
    plan = batching.token_budget_micro_batches(tokens, budget, min_count)
    assert sorted(i for mb in plan for i in mb) == list(range(len(tokens)))  # every pair exactly once
    assert len(plan) >= min_count
    for mb in plan:
        assert sum(tokens[i] for i in mb) <= budget or len(mb) == 1  # only a lone pair may exceed
    max_pairs = rng.randint(1, 4)
    capped = batching.token_budget_micro_batches(tokens, budget, 1, max_pairs=max_pairs)
    assert sorted(i for mb in capped for i in mb) == list(range(len(tokens)))
    assert all(len(mb) <= max_pairs for mb in capped)
    padded = batching.token_budget_micro_batches(tokens, budget, min_count, pad_to_longest=True)
    assert sorted(i for mb in padded for i in mb) == list(range(len(tokens))) and len(padded) >= min_count
    assert all(len(mb) * max(tokens[i] for i in mb) <= budget or len(mb) == 1 for mb in padded)
    lone_over = [i for i, t in enumerate(tokens) if t > budget]
    assert all([i] in plan for i in lone_over)


def test_token_budget_packs_tightly():
    plan = batching.token_budget_micro_batches([60, 40, 50, 50, 100], 100)
    assert sorted(map(sorted, plan)) == [[0, 1], [2, 3], [4]]


def test_packed_layout():
    batch = batching.collate_packed([[5, 6, 7], [8], [9, 10]])
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9, 10]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 0, 1]]
    assert batch["reward_index"].tolist() == [2, 3, 5]
    assert "attention_mask" not in batch
    segments = batch["attention_segments"]
    assert segments.key_ranges == (((0, 3),), ((3, 4),), ((4, 6),)) and segments.key_index is None


def test_shared_layout_of_pairs():
    pairs = [
        TokenizedPair([1, 2, 3, 4], [1, 2, 5]),  # shares [1, 2]
        TokenizedPair([7, 8], [7, 8]),  # identical: shares 1 token (each keeps its last)
        TokenizedPair([1], [2, 3]),
    ]  # shares nothing
    batch = batching.collate_pairs(pairs, pad_token_id=0, layout="shared")
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 5, 7, 8, 8, 1, 2, 3]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 2, 0, 1, 1, 0, 0, 1]]
    assert batch["reward_index"].tolist() == [3, 6, 8, 4, 7, 10]  # chosen rewards first, then rejected
    segments = batch["attention_segments"]
    assert segments.key_ranges == (((0, 4),), ((0, 2), (4, 5)), ((5, 7),), ((5, 6), (7, 8)), ((8, 9),), ((9, 11),))
    assert batching.token_counts(batch) == (4 + 3 + 2 + 2 + 1 + 2, 11, 11)  # conversation tokens, real, computed


def test_shared_prefix_is_capped_so_each_keeps_its_reward_token():
    assert TokenizedPair([1, 2, 3], [1, 2, 3, 4]).shared_prefix == 2
    assert TokenizedPair([1, 2, 3, 9], [1, 2, 3, 4]).shared_prefix == 3
    assert TokenizedPair([5], [5]).shared_prefix == 0
    assert TokenizedPair([1, 2, 3, 9], [1, 2, 3, 4]).computed_tokens("shared") == 5
    assert TokenizedPair([1, 2, 3, 9], [1, 2, 3, 4]).computed_tokens("packed") == 8


def test_token_counts_per_layout():
    pairs = [TokenizedPair([1, 2, 3], [1, 2, 4, 5])]
    assert batching.token_counts(batching.collate_pairs(pairs, 0, "padded")) == (7, 7, 8)  # one pad token
    assert batching.token_counts(batching.collate_pairs(pairs, 0, "packed")) == (7, 7, 7)
    assert batching.token_counts(batching.collate_pairs(pairs, 0, "shared")) == (7, 5, 5)


def test_token_budget_counts_a_shared_prefix_once():
    pairs = [
        TokenizedPair([1] * 50 + [2], [1] * 50 + [3]),
        TokenizedPair([4] * 50 + [2], [4] * 50 + [3]),
    ]  # 102 tokens, 52 computed when shared
    assert batching.plan_micro_batches(pairs, 110, None, layout="packed") == [[0], [1]]
    assert batching.plan_micro_batches(pairs, 110, None, layout="shared") == [[0, 1]]
    assert batching.plan_micro_batches(pairs, 110, 1, layout="shared") == [[0], [1]]  # a pair cap the user set binds


def test_padded_budget_counts_padding_to_the_longest():
    pairs = pairs_of_lengths([10, 50, 10, 10])  # rows of 10 or 50 tokens, two rows a pair
    # padded to the longest, [50, 10] would compute 4 rows x 50 = 200 tokens; the three short pairs 6 x 10 = 60
    assert batching.plan_micro_batches(pairs, 120, None, layout="padded") == [[1], [0, 2, 3]]
    assert batching.plan_micro_batches(pairs, 120, None, layout="packed") == [[0, 1], [2, 3]]
    assert batching.plan_micro_batches(pairs, None, 3, layout="padded") == [[0, 1, 2], [3]]  # fixed-size
    with pytest.raises(ValueError, match="token budget or a pair count"):
        batching.plan_micro_batches(pairs, None, None)


@pytest.mark.parametrize("seed", range(20))
def test_dealt_micro_batches_cover_the_step_evenly_within_the_budget(seed):
    rng = random.Random(seed)
    world_size = rng.choice([1, 2, 3, 4])
    pairs = pairs_of_lengths([rng.randint(10, 300) for _ in range(world_size * rng.randint(1, 8))])
    budget, max_pairs = rng.randint(300, 1500), rng.choice([None, 1, 3])
    layout = rng.choice(["packed", "padded"])
    dealt = batching.deal_micro_batches(pairs, budget, max_pairs, world_size, layout)
    assert len(dealt) == world_size and len({len(rank) for rank in dealt}) == 1  # the same count on every rank
    assert sorted(i for rank in dealt for mb in rank for i in mb) == list(range(len(pairs)))  # every pair once
    for mb in (mb for rank in dealt for mb in rank):
        rows = [len(pairs[i].chosen) for i in mb] * 2
        computed = len(rows) * max(rows) if layout == "padded" else sum(rows)
        assert computed <= budget or len(mb) == 1
        assert max_pairs is None or len(mb) <= max_pairs


def test_dealing_balances_what_the_ranks_sampled():
    # rank 0 sampled the two long pairs, rank 1 the two short ones (900 + 700 vs 500 + 300 tokens): dealt
    # heaviest first to the least loaded rank, each computes 1,200
    pairs = pairs_of_lengths([450, 350, 250, 150])
    dealt = batching.deal_micro_batches(pairs, 1000, None, 2, "packed")
    loads = [sum(pairs[i].num_tokens for mb in rank for i in mb) for rank in dealt]
    assert loads == [1200, 1200] and [len(rank) for rank in dealt] == [2, 2]


def test_token_budget_resolution_and_its_description():
    def planned():
        return batching.TokenBudget(20480, "auto: the memory plan's")

    assert batching.resolve_token_budget(6000, "cuda", planned) == (6000, "set by data.max_tokens_per_micro_batch")
    assert batching.resolve_token_budget(None, "cpu", planned).tokens is None
    assert batching.resolve_token_budget("auto", "cpu", planned) == (4096, "auto: the CPU default")
    assert batching.resolve_token_budget("auto", "cuda", planned) == planned()
    described = batching.describe_micro_batches(planned(), 1)
    assert (
        described
        == "micro-batches of <= 20,480 computed tokens (auto: the memory plan's), at most 1 pair (data.micro_batch_size_per_gpu)"
    )
    assert batching.describe_micro_batches(batching.TokenBudget(None, "set"), 4) == (
        "micro-batches of 4 pairs (data.micro_batch_size_per_gpu)"
    )


def test_layout_for_the_trainer_knobs():
    assert batching.layout_for(use_remove_padding=False, share_prompt=True) == "padded"  # padded: one override away
    assert batching.layout_for(use_remove_padding=True, share_prompt=False) == "packed"
    assert batching.layout_for(use_remove_padding=True, share_prompt=True) == "shared"


def test_consecutive_prefix_groups():
    sequences = [[1, 2, 3], [1, 2, 4], [1, 2, 5, 6], [1, 9], [7, 8], [7, 8, 1]]
    assert batching.consecutive_prefix_groups(sequences) == [[0, 1, 2], [3], [4, 5]]


def test_check_layout_reports_difference_and_tolerance(value_model, tokenizer):
    model = copy.deepcopy(value_model)
    attention.enable_segment_attention(model)
    pairs = [
        TokenizedPair(
            pair_dataset.encode_conversation(tokenizer, conv("Tomatoes?", a)),
            pair_dataset.encode_conversation(tokenizer, conv("Tomatoes?", b)),
        )
        for a, b in (("Water daily.", "No."), ("Use compost.", "Buy some."))
    ]
    model.train()
    check = batching.check_layout(model, pairs, tokenizer.pad_token_id, "shared", "cpu", torch.float32)
    assert model.training  # left in the mode it was in
    padded = batching.compute_rewards(value_model, batching.collate_pairs(pairs, tokenizer.pad_token_id, "padded"))
    assert check.layout == "shared" and check.max_difference < 1e-5 and check.ratio < 0.1
    assert check.tolerance == pytest.approx(1e-3 * max(1.0, padded.abs().max().item()))


def test_check_layout_catches_a_causal_block_aligned_the_wrong_way(value_model, tokenizer, monkeypatch):
    """What the start-up check guards against on hardware the tests never ran on (e.g. a kernel aligning top-left)."""
    model = copy.deepcopy(value_model)
    attention.enable_segment_attention(model)
    monkeypatch.setattr(
        attention, "bottom_right_causal_mask", lambda n_q, n_k, device: torch.ones(n_q, n_k, dtype=torch.bool).tril()
    )
    pairs = [
        TokenizedPair(
            pair_dataset.encode_conversation(tokenizer, conv("Tomatoes?", "Water them daily.")),
            pair_dataset.encode_conversation(tokenizer, conv("Tomatoes?", "No, never.")),
        )
    ]
    assert batching.check_layout(model, pairs, tokenizer.pad_token_id, "shared", "cpu", torch.float32).ratio > 1


def test_score_formats_as_training_does(value_model, tokenizer):
    conversations = [conv("Hi", "Hello! How can I help?"), conv("Hi", "Go away.")]
    expected = batching.compute_rewards(
        value_model,
        batching.collate_padded(
            [pair_dataset.encode_conversation(tokenizer, c) for c in conversations], tokenizer.pad_token_id
        ),
    ).tolist()
    assert batching.score(value_model, tokenizer, conversations, batch_size=1) == pytest.approx(expected, abs=1e-5)
    assert batching.score(value_model, tokenizer, [json.dumps(c) for c in conversations]) == pytest.approx(
        expected, abs=1e-5
    )


@pytest.mark.parametrize("layout", ["packed", "shared"])
def test_score_gives_the_same_rewards_in_every_layout(value_model, tokenizer, layout):
    conversations = [
        conv("Hi", "Hello! How can I help?"),
        conv("Hi", "Go away."),
        conv("Hi", "Hello."),
        conv("Tomatoes?", "Water them."),
        conv("Hi", "Hi."),
    ]
    expected = [
        batching.compute_rewards(
            value_model,
            batching.collate_padded([pair_dataset.encode_conversation(tokenizer, c)], tokenizer.pad_token_id),
        ).item()
        for c in conversations
    ]  # one at a time, padded: no layout at all
    model = copy.deepcopy(value_model)
    assert batching.score(model, tokenizer, conversations, batch_size=4, layout=layout) == pytest.approx(
        expected, abs=1e-5
    )


@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_chosen_rows_come_first(layout):
    """rewards[:n] must be the chosen conversations: swapping the order would train the model backwards."""
    pairs = [TokenizedPair([11, 12], [21, 22, 23]), TokenizedPair([13], [24, 25])]
    batch = batching.collate_pairs(pairs, pad_token_id=0, layout=layout)
    ids = batch["input_ids"]
    if layout == "padded":
        rows = [row[row != 0].tolist() for row in ids]
        assert rows == [[11, 12], [13], [21, 22, 23], [24, 25]]
    readout = (
        ids[torch.arange(ids.shape[0]), batch["reward_index"]] if layout == "padded" else ids[0, batch["reward_index"]]
    )
    assert readout.tolist() == [12, 13, 23, 25]  # last token of chosen 1, chosen 2, rejected 1, rejected 2

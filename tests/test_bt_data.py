"""batching.py: chat formatting, truncation, the reward token (verl's rule), batching and the padded / packed / shared layouts.

Model-level exactness of the layouts (rewards, loss, gradients vs the padded path) is in test_bt_attention.py."""

import copy
import json
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from omegaconf import OmegaConf

from btrm import attention, batching, pair_dataset
from btrm.pair_dataset import DataError, TokenizedPair


def conv(prompt, answer):
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]


def data_config(**overrides):
    base = {"chosen_key": "chosen", "rejected_key": "rejected", "max_length": 4096, "truncation": "error", "apply_chat_template_kwargs": {}}
    return OmegaConf.create({**base, **overrides})


@pytest.fixture(scope="module")
def value_model(tiny_model_dir):
    from btrm.modeling import load_value_head_model

    torch.manual_seed(1)
    model = load_value_head_model(str(tiny_model_dir), attn_implementation="sdpa", torch_dtype=torch.float32, trust_remote_code=False)
    torch.nn.init.normal_(model.score.weight, std=1.0)
    return model.eval()


# ---- tokens


def test_encode_applies_template_once_without_extra_special_tokens(tokenizer):
    ids = pair_dataset.encode_conversation(tokenizer, conv("Hi", "Hello"))
    text = "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello<|im_end|>\n"
    assert tokenizer.decode(ids) == text
    assert ids == tokenizer(text, add_special_tokens=False)["input_ids"]


def test_bos_is_not_doubled_when_template_writes_it(tokenizer):
    """A Llama-style template writes BOS; a tokenizer that also adds BOS would double it."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    with_bos = PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend_tokenizer.__class__.from_str(tokenizer.backend_tokenizer.to_str()),
                                       bos_token="<|im_start|>", pad_token="<|endoftext|>", eos_token="<|im_end|>")
    bos = with_bos.bos_token_id
    with_bos.backend_tokenizer.post_processor = processors.TemplateProcessing(single="<|im_start|> $A", special_tokens=[("<|im_start|>", bos)])
    with_bos.chat_template = "{{ bos_token }}{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"
    assert with_bos("x")["input_ids"][0] == bos  # the tokenizer on its own would add BOS
    ids = pair_dataset.encode_conversation(with_bos, conv("Hi", "Hello"))
    assert ids[0] == bos and ids[1] != bos and ids.count(bos) == 1


@pytest.mark.parametrize("bad, message", [
    ("not json", "not valid JSON"),
    (json.dumps([]), "non-empty list"),
    (json.dumps([{"role": "user"}]), "message 1 is not"),
    (json.dumps([{"role": "user", "content": "hi"}]), "expected the assistant response"),
])
def test_parse_messages_errors_name_the_place(bad, message):
    with pytest.raises(DataError, match=message) as error:
        pair_dataset.parse_messages(bad, "f.parquet row 3 field 'chosen'")
    assert str(error.value).startswith("f.parquet row 3 field 'chosen'")


# ---- truncation (expected token lists written out by hand)

PROMPT = list(range(1, 11))  # 10 prompt tokens both conversations share


def test_truncation_left_never_empties_the_shorter_conversation():
    """The old bug: dropping the longer one's overflow from both emptied a short chosen."""
    chosen, rejected = PROMPT + [50, 51], PROMPT + list(range(60, 90))  # 12 and 40 tokens
    result = pair_dataset.truncate_pair(chosen, rejected, 20, "left", "row 1")
    assert result.chosen == [50, 51]              # lost its prompt only (all 10 shared tokens), not its response
    assert result.rejected == list(range(70, 90))  # its response alone (30) exceeds 20: cut from its start
    assert result.dropped_tokens == 10 + 20


def test_truncation_left_drops_only_what_the_longer_one_needs_from_the_shared_prompt():
    chosen, rejected = PROMPT + [50, 51, 52], PROMPT + [60, 61, 62, 63, 64]  # 13 and 15 tokens
    result = pair_dataset.truncate_pair(chosen, rejected, 12, "left", "row 1")
    assert result.chosen == [4, 5, 6, 7, 8, 9, 10, 50, 51, 52]  # the same 3 oldest prompt tokens from both
    assert result.rejected == [4, 5, 6, 7, 8, 9, 10, 60, 61, 62, 63, 64]
    assert result.dropped_tokens == 6


def test_truncation_left_when_one_conversation_is_a_prefix_of_the_other():
    result = pair_dataset.truncate_pair([1, 2, 3], [1, 2, 3, 4, 5, 6, 7, 8], 4, "left", "row 1")
    assert result.chosen == [3]  # at most len - 1 shared tokens are dropped: its last token stays
    assert result.rejected == [5, 6, 7, 8]
    identical = pair_dataset.truncate_pair(list(range(10)), list(range(10)), 4, "left", "row 1")
    assert identical.chosen == identical.rejected == [6, 7, 8, 9]


def test_truncation_left_with_nothing_shared_cuts_each_from_its_start():
    result = pair_dataset.truncate_pair([1, 2, 3, 4, 5], [9, 8], 3, "left", "row 1")
    assert (result.chosen, result.rejected, result.dropped_tokens) == ([3, 4, 5], [9, 8], 2)


@pytest.mark.parametrize("seed", range(30))
def test_truncation_left_invariants(seed):
    rng = random.Random(seed)
    prompt = [rng.randrange(100) for _ in range(rng.randint(0, 30))]
    chosen = prompt + [rng.randrange(100) for _ in range(rng.randint(1, 30))]
    rejected = prompt + [rng.randrange(100) for _ in range(rng.randint(1, 30))]
    max_length = rng.randint(1, 40)
    result = pair_dataset.truncate_pair(chosen, rejected, max_length, "left", "row")
    for before, after in ((chosen, result.chosen), (rejected, result.rejected)):
        assert 1 <= len(after) <= max(max_length, 1) and after[-1] == before[-1]  # never empty, reward token kept
        assert before[len(before) - len(after):] == after                         # a tail of the original
        if len(before) <= max_length:                                             # fits: loses shared tokens only
            assert len(before) - len(after) <= pair_dataset.shared_prefix_length([chosen, rejected])
    dropped = len(chosen) - len(result.chosen)
    if max(len(chosen), len(rejected)) > max_length and len(result.chosen) < max_length and len(result.rejected) < max_length:
        assert len(rejected) - len(result.rejected) == dropped  # neither needed a response cut: the same count from both
    assert result.dropped_tokens == len(chosen) + len(rejected) - len(result.chosen) - len(result.rejected)


def test_truncation_right_keeps_head_and_reward_token():
    result = pair_dataset.truncate_pair(list(range(10)), list(range(100, 105)), 6, "right", "row 1")
    assert result.chosen == [0, 1, 2, 3, 4, 9]
    assert result.rejected == list(range(100, 105))  # within the limit: untouched
    assert result.dropped_tokens == 4


def test_truncation_error_names_row_and_both_lengths():
    with pytest.raises(DataError, match=r"data.parquet row 7: chosen has 10 tokens and rejected 5; data.max_length is 6"):
        pair_dataset.truncate_pair(list(range(10)), list(range(5)), 6, "error", "data.parquet row 7")
    assert pair_dataset.truncate_pair([1, 2], [3], 6, "error", "x") == ([1, 2], [3], 0)


def test_pair_dataset_counts_truncated_pairs_and_dropped_tokens(tokenizer, tmp_path):
    short = {"chosen": json.dumps(conv("Q", "ok")), "rejected": json.dumps(conv("Q", "no"))}
    long_rejected = {"chosen": json.dumps(conv("Q", "ok")), "rejected": json.dumps(conv("Q", "no " * 40))}
    pq.write_table(pa.Table.from_pylist([short, long_rejected, long_rejected]), tmp_path / "t.parquet")
    limit = len(pair_dataset.encode_conversation(tokenizer, conv("Q", "no " * 40))) - 5
    dataset = pair_dataset.PairDataset(str(tmp_path / "t.parquet"), tokenizer, data_config(max_length=limit, truncation="left"))
    assert dataset.truncated_pairs == 2
    # each long pair: 5 shared prompt tokens from both conversations (the prompt is longer than 5 tokens)
    assert dataset.dropped_tokens == 2 * 10
    assert all(len(p.chosen) >= 1 and max(len(p.chosen), len(p.rejected)) <= limit for p in dataset.pairs)


def test_pair_dataset_reads_tokenizes_and_reports_bad_rows(tokenizer, tmp_path):
    good = {"chosen": json.dumps(conv("Q", "good answer")), "rejected": json.dumps(conv("Q", "bad")), "preference_strength": 2}
    pq.write_table(pa.Table.from_pylist([good, good]), tmp_path / "ok.parquet")
    dataset = pair_dataset.PairDataset(str(tmp_path / "ok.parquet"), tokenizer, data_config())
    assert len(dataset) == 2 and dataset[0].preference_strength == 2
    assert dataset[0].chosen == pair_dataset.encode_conversation(tokenizer, conv("Q", "good answer"))

    bad = dict(good, rejected="{oops")
    pq.write_table(pa.Table.from_pylist([good, bad]), tmp_path / "bad.parquet")
    with pytest.raises(DataError, match=r"bad.parquet row 2 field 'rejected': not valid JSON"):
        pair_dataset.PairDataset(str(tmp_path / "bad.parquet"), tokenizer, data_config())
    with pytest.raises(DataError, match=r"ok.parquet: no column 'prompt_chosen'"):
        pair_dataset.PairDataset(str(tmp_path / "ok.parquet"), tokenizer, data_config(chosen_key="prompt_chosen"))
    with pytest.raises(DataError, match=r"ok.parquet row 1: chosen has \d+ tokens and rejected \d+; data.max_length is 5"):
        pair_dataset.PairDataset(str(tmp_path / "ok.parquet"), tokenizer, data_config(max_length=5))


# ---- the reward token


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
    sequences = [pair_dataset.encode_conversation(tokenizer, conv("How do I plant tomatoes?", a)) for a in ("Water them daily.", "No.")]
    alone = [batching.compute_rewards(value_model, batching.collate_padded([s], tokenizer.pad_token_id)).item() for s in sequences]
    together = batching.compute_rewards(value_model, batching.collate_padded(sequences, tokenizer.pad_token_id))
    extra_padding = batching.collate_padded(sequences + [sequences[0] + [0] * 30], tokenizer.pad_token_id)
    with_long_neighbour = batching.compute_rewards(value_model, extra_padding)[:2]
    assert together.tolist() == pytest.approx(alone, abs=1e-5)
    assert with_long_neighbour.tolist() == pytest.approx(alone, abs=1e-5)


# ---- micro-batches and packing


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
    pairs = [TokenizedPair([1, 2, 3, 4], [1, 2, 5]),  # shares [1, 2]
             TokenizedPair([7, 8], [7, 8]),            # identical: shares 1 token (each keeps its last)
             TokenizedPair([1], [2, 3])]               # shares nothing
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
    assert batching.batch_token_counts(batching.collate_pairs(pairs, 0, "padded")) == (7, 8)


def test_token_budget_counts_a_shared_prefix_once():
    pairs = [TokenizedPair([1] * 50 + [2], [1] * 50 + [3]), TokenizedPair([4] * 50 + [2], [4] * 50 + [3])]  # 102 tokens, 52 computed when shared
    assert batching.plan_micro_batches(pairs, 110, 1, layout="packed") == [[0], [1]]
    assert batching.plan_micro_batches(pairs, 110, 1, layout="shared") == [[0, 1]]


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
    pairs = [TokenizedPair(pair_dataset.encode_conversation(tokenizer, conv("Tomatoes?", a)), pair_dataset.encode_conversation(tokenizer, conv("Tomatoes?", b)))
             for a, b in (("Water daily.", "No."), ("Use compost.", "Buy some."))]
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
    monkeypatch.setattr(attention, "bottom_right_causal_mask", lambda n_q, n_k, device: torch.ones(n_q, n_k, dtype=torch.bool).tril())
    pairs = [TokenizedPair(pair_dataset.encode_conversation(tokenizer, conv("Tomatoes?", "Water them daily.")),
                           pair_dataset.encode_conversation(tokenizer, conv("Tomatoes?", "No, never.")))]
    assert batching.check_layout(model, pairs, tokenizer.pad_token_id, "shared", "cpu", torch.float32).ratio > 1


def test_score_formats_as_training_does(value_model, tokenizer):
    conversations = [conv("Hi", "Hello! How can I help?"), conv("Hi", "Go away.")]
    expected = batching.compute_rewards(value_model, batching.collate_padded(
        [pair_dataset.encode_conversation(tokenizer, c) for c in conversations], tokenizer.pad_token_id)).tolist()
    assert batching.score(value_model, tokenizer, conversations, batch_size=1) == pytest.approx(expected, abs=1e-5)
    assert batching.score(value_model, tokenizer, [json.dumps(c) for c in conversations]) == pytest.approx(expected, abs=1e-5)


@pytest.mark.parametrize("layout", ["packed", "shared"])
def test_score_gives_the_same_rewards_in_every_layout(value_model, tokenizer, layout):
    conversations = [conv("Hi", "Hello! How can I help?"), conv("Hi", "Go away."), conv("Hi", "Hello."),
                     conv("Tomatoes?", "Water them."), conv("Hi", "Hi.")]
    expected = [batching.compute_rewards(value_model, batching.collate_padded([pair_dataset.encode_conversation(tokenizer, c)], tokenizer.pad_token_id)).item()
                for c in conversations]  # one at a time, padded: no layout at all
    model = copy.deepcopy(value_model)
    assert batching.score(model, tokenizer, conversations, batch_size=4, layout=layout) == pytest.approx(expected, abs=1e-5)


@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_chosen_rows_come_first(layout):
    """rewards[:n] must be the chosen conversations: swapping the order would train the model backwards."""
    pairs = [TokenizedPair([11, 12], [21, 22, 23]), TokenizedPair([13], [24, 25])]
    batch = batching.collate_pairs(pairs, pad_token_id=0, layout=layout)
    ids = batch["input_ids"]
    if layout == "padded":
        rows = [row[row != 0].tolist() for row in ids]
        assert rows == [[11, 12], [13], [21, 22, 23], [24, 25]]
    readout = ids[torch.arange(ids.shape[0]), batch["reward_index"]] if layout == "padded" else ids[0, batch["reward_index"]]
    assert readout.tolist() == [12, 13, 23, 25]  # last token of chosen 1, chosen 2, rejected 1, rejected 2

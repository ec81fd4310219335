"""bt_data.py: chat formatting, truncation, the reward token (verl's rule), batching and packing."""

import json
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from omegaconf import OmegaConf

import bt_data
from bt_data import DataError, TokenizedPair


def conv(prompt, answer):
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]


def data_config(**overrides):
    base = {"chosen_key": "chosen", "rejected_key": "rejected", "max_length": 4096, "truncation": "error", "apply_chat_template_kwargs": {}}
    return OmegaConf.create({**base, **overrides})


@pytest.fixture(scope="module")
def value_model(tiny_model_dir):
    from bt_trainer import load_value_head_model

    torch.manual_seed(1)
    model = load_value_head_model(str(tiny_model_dir), attn_implementation="sdpa", torch_dtype=torch.float32, trust_remote_code=False)
    torch.nn.init.normal_(model.score.weight, std=1.0)
    return model.eval()


# ---- tokens


def test_encode_applies_template_once_without_extra_special_tokens(tokenizer):
    ids = bt_data.encode_conversation(tokenizer, conv("Hi", "Hello"))
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
    ids = bt_data.encode_conversation(with_bos, conv("Hi", "Hello"))
    assert ids[0] == bos and ids[1] != bos and ids.count(bos) == 1


@pytest.mark.parametrize("bad, message", [
    ("not json", "not valid JSON"),
    (json.dumps([]), "non-empty list"),
    (json.dumps([{"role": "user"}]), "message 1 is not"),
    (json.dumps([{"role": "user", "content": "hi"}]), "expected the assistant response"),
])
def test_parse_messages_errors_name_the_place(bad, message):
    with pytest.raises(DataError, match=message) as error:
        bt_data.parse_messages(bad, "f.parquet row 3 field 'chosen'")
    assert str(error.value).startswith("f.parquet row 3 field 'chosen'")


# ---- truncation


def test_truncation_left_cuts_same_count_from_both_and_keeps_last_token():
    chosen, rejected = list(range(10)), list(range(100, 108))
    c, r = bt_data.truncate_pair(chosen, rejected, 6, "left", "row 1")
    assert c == chosen[4:] and r == rejected[4:]  # overflow of the longer one (4), from both
    assert c[-1] == chosen[-1] and r[-1] == rejected[-1]


def test_truncation_right_keeps_head_and_reward_token():
    c, r = bt_data.truncate_pair(list(range(10)), list(range(100, 105)), 6, "right", "row 1")
    assert c == [0, 1, 2, 3, 4, 9]
    assert r == list(range(100, 105))  # within the limit: untouched


def test_truncation_error_names_row_and_both_lengths():
    with pytest.raises(DataError, match=r"data.parquet row 7: chosen has 10 tokens and rejected 5; data.max_length is 6"):
        bt_data.truncate_pair(list(range(10)), list(range(5)), 6, "error", "data.parquet row 7")
    assert bt_data.truncate_pair([1, 2], [3], 6, "error", "x") == ([1, 2], [3])


def test_pair_dataset_reads_tokenizes_and_reports_bad_rows(tokenizer, tmp_path):
    good = {"chosen": json.dumps(conv("Q", "good answer")), "rejected": json.dumps(conv("Q", "bad")), "preference_strength": 2}
    pq.write_table(pa.Table.from_pylist([good, good]), tmp_path / "ok.parquet")
    dataset = bt_data.PairDataset(str(tmp_path / "ok.parquet"), tokenizer, data_config())
    assert len(dataset) == 2 and dataset[0].preference_strength == 2
    assert dataset[0].chosen == bt_data.encode_conversation(tokenizer, conv("Q", "good answer"))

    bad = dict(good, rejected="{oops")
    pq.write_table(pa.Table.from_pylist([good, bad]), tmp_path / "bad.parquet")
    with pytest.raises(DataError, match=r"bad.parquet row 2 field 'rejected': not valid JSON"):
        bt_data.PairDataset(str(tmp_path / "bad.parquet"), tokenizer, data_config())
    with pytest.raises(DataError, match=r"ok.parquet: no column 'prompt_chosen'"):
        bt_data.PairDataset(str(tmp_path / "ok.parquet"), tokenizer, data_config(chosen_key="prompt_chosen"))
    with pytest.raises(DataError, match=r"ok.parquet row 1: chosen has \d+ tokens and rejected \d+; data.max_length is 5"):
        bt_data.PairDataset(str(tmp_path / "ok.parquet"), tokenizer, data_config(max_length=5))


# ---- the reward token


def verl_reading(attention_mask):
    """verl 0.6.1 RewardModelWorker: position ids from the mask, score at argmax(position_ids * mask)."""
    from verl.utils.model import compute_position_id_with_mask

    position_ids = compute_position_id_with_mask(attention_mask)
    return torch.argmax(position_ids * attention_mask, dim=-1)


def test_reward_index_is_verls_reading_and_the_last_real_token():
    sequences = [[5, 6, 7], [8], [9, 10, 11, 12, 13]]
    batch = bt_data.collate_padded(sequences, pad_token_id=0)
    assert batch["reward_index"].tolist() == [2, 0, 4]
    assert torch.equal(batch["reward_index"], verl_reading(batch["attention_mask"]))
    assert batch["input_ids"].shape == (3, 5)  # padded to the longest here, not to max_length


def test_rewards_do_not_depend_on_padding(value_model, tokenizer):
    sequences = [bt_data.encode_conversation(tokenizer, conv("How do I plant tomatoes?", a)) for a in ("Water them daily.", "No.")]
    alone = [bt_data.compute_rewards(value_model, bt_data.collate_padded([s], tokenizer.pad_token_id)).item() for s in sequences]
    together = bt_data.compute_rewards(value_model, bt_data.collate_padded(sequences, tokenizer.pad_token_id))
    extra_padding = bt_data.collate_padded(sequences + [sequences[0] + [0] * 30], tokenizer.pad_token_id)
    with_long_neighbour = bt_data.compute_rewards(value_model, extra_padding)[:2]
    assert together.tolist() == pytest.approx(alone, abs=1e-5)
    assert with_long_neighbour.tolist() == pytest.approx(alone, abs=1e-5)


# ---- micro-batches and packing


def pairs_of_lengths(lengths):
    return [TokenizedPair(list(range(n)), list(range(n))) for n in lengths]


def test_fixed_size_micro_batches():
    assert bt_data.fixed_size_micro_batches(5, 2) == [[0, 1], [2, 3], [4]]


@pytest.mark.parametrize("seed", range(20))
def test_token_budget_never_splits_a_pair_nor_exceeds_the_budget(seed):
    rng = random.Random(seed)
    tokens = [rng.randint(10, 400) for _ in range(rng.randint(1, 40))]
    budget = rng.randint(200, 800)
    min_count = rng.randint(1, len(tokens))
    plan = bt_data.token_budget_micro_batches(tokens, budget, min_count)
    assert sorted(i for mb in plan for i in mb) == list(range(len(tokens)))  # every pair exactly once
    assert len(plan) >= min_count
    for mb in plan:
        assert sum(tokens[i] for i in mb) <= budget or len(mb) == 1  # only a lone pair may exceed
    lone_over = [i for i, t in enumerate(tokens) if t > budget]
    assert all([i] in plan for i in lone_over)


def test_token_budget_packs_tightly():
    plan = bt_data.token_budget_micro_batches([60, 40, 50, 50, 100], 100)
    assert sorted(map(sorted, plan)) == [[0, 1], [2, 3], [4]]


def test_packed_layout():
    batch = bt_data.collate_packed([[5, 6, 7], [8], [9, 10]])
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9, 10]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 0, 1]]
    assert batch["reward_index"].tolist() == [2, 3, 5]
    assert "attention_mask" not in batch


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_rewards_loss_and_grads_equal_padded(tiny_model_dir, tokenizer, attn):
    from bt_loss import bradley_terry_loss
    from bt_trainer import load_value_head_model

    torch.manual_seed(3)
    model = load_value_head_model(str(tiny_model_dir), attn_implementation=attn, torch_dtype=torch.float32, trust_remote_code=False)
    torch.nn.init.normal_(model.score.weight, std=1.0)
    answers = ["Water them daily and check the soil.", "No.", "First, gather what you need so that it goes smoothly.", "Whatever."]
    pairs = [TokenizedPair(bt_data.encode_conversation(tokenizer, conv("Tomatoes?", answers[i])),
                           bt_data.encode_conversation(tokenizer, conv("Tomatoes?", answers[i + 1]))) for i in (0, 2)]
    results = {}
    for packed in (False, True):
        model.zero_grad()
        rewards = bt_data.compute_rewards(model, bt_data.collate_pairs(pairs, tokenizer.pad_token_id, packed=packed))
        loss, _ = bradley_terry_loss(rewards[:2], rewards[2:])
        loss.backward()
        results[packed] = (rewards.detach(), loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    (r_pad, l_pad, g_pad), (r_pack, l_pack, g_pack) = results[False], results[True]
    assert torch.allclose(r_pad, r_pack, atol=1e-5)
    assert l_pack == pytest.approx(l_pad, abs=1e-5)
    assert g_pad.keys() == g_pack.keys() and "score.bias" not in g_pad  # frozen bias gets no gradient
    for name in g_pad:
        assert torch.allclose(g_pack[name], g_pad[name], rtol=1e-4, atol=1e-4 * g_pad[name].abs().max().item()), name


def test_score_formats_as_training_does(value_model, tokenizer):
    conversations = [conv("Hi", "Hello! How can I help?"), conv("Hi", "Go away.")]
    expected = bt_data.compute_rewards(value_model, bt_data.collate_padded(
        [bt_data.encode_conversation(tokenizer, c) for c in conversations], tokenizer.pad_token_id)).tolist()
    assert bt_data.score(value_model, tokenizer, conversations, batch_size=1) == pytest.approx(expected, abs=1e-5)
    assert bt_data.score(value_model, tokenizer, [json.dumps(c) for c in conversations]) == pytest.approx(expected, abs=1e-5)

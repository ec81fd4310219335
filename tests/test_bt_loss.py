"""bt_loss.py against hand formulas and against TRL's RewardTrainer."""

import math

import pytest
import torch

from bt_loss import SUM_FIELDS, bradley_terry_loss, metrics_from_sums, pair_losses, pair_sums

CHOSEN = torch.tensor([1.0, -0.5, 2.0, 0.3])
REJECTED = torch.tensor([0.0, 0.5, -1.0, 0.3])


def hand_loss(c, r):
    return sum(math.log1p(math.exp(-(a - b))) for a, b in zip(c, r)) / len(c)


def test_loss_matches_hand_formula():
    loss, metrics = bradley_terry_loss(CHOSEN, REJECTED)
    expected = hand_loss(CHOSEN.tolist(), REJECTED.tolist())
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    assert metrics["loss"] == pytest.approx(expected, abs=1e-6)


def test_metrics_match_hand_formulas():
    _, m = bradley_terry_loss(CHOSEN, REJECTED)
    c, r = CHOSEN.tolist(), REJECTED.tolist()
    assert m["accuracy"] == pytest.approx(2 / 4)  # 1>0 and 2>-1; the tie 0.3=0.3 counts as wrong
    assert m["margin"] == pytest.approx(sum(a - b for a, b in zip(c, r)) / 4)
    assert m["chosen_reward"] == pytest.approx(sum(c) / 4)
    assert m["rejected_reward"] == pytest.approx(sum(r) / 4)
    everything = c + r
    mean = sum(everything) / 8
    assert m["reward_std"] == pytest.approx(math.sqrt(sum((x - mean) ** 2 for x in everything) / 8))


def test_normalizer_gives_exact_accumulation():
    whole, _ = bradley_terry_loss(CHOSEN, REJECTED)
    parts = sum(bradley_terry_loss(CHOSEN[i : i + 1], REJECTED[i : i + 1], normalizer=4)[0] for i in range(4))
    assert parts.item() == pytest.approx(whole.item(), abs=1e-7)


def test_sums_over_parts_equal_metrics_of_whole():
    whole = metrics_from_sums(pair_sums(CHOSEN, REJECTED))
    summed = pair_sums(CHOSEN[:1], REJECTED[:1]) + pair_sums(CHOSEN[1:], REJECTED[1:])
    assert metrics_from_sums(summed) == pytest.approx(whole)
    assert len(SUM_FIELDS) == summed.numel()


def test_loss_is_fp32_for_bf16_rewards():
    losses = pair_losses(CHOSEN.bfloat16(), REJECTED.bfloat16())
    assert losses.dtype == torch.float32
    loss, _ = bradley_terry_loss(CHOSEN.bfloat16(), REJECTED.bfloat16())
    assert loss.dtype == torch.float32


def test_gradient_matches_hand_derivative():
    c, r = CHOSEN.clone().requires_grad_(), REJECTED.clone().requires_grad_()
    bradley_terry_loss(c, r)[0].backward()
    expected = -torch.sigmoid(-(CHOSEN - REJECTED)) / 4  # d/dc of -log sigmoid(c - r), averaged
    assert torch.allclose(c.grad, expected, atol=1e-7)
    assert torch.allclose(r.grad, -expected, atol=1e-7)


def test_shape_mismatch_is_refused():
    with pytest.raises(ValueError, match="equal length"):
        bradley_terry_loss(CHOSEN, REJECTED[:3])
    with pytest.raises(ValueError, match="no pairs"):
        metrics_from_sums(torch.zeros(len(SUM_FIELDS), dtype=torch.float64))


def test_matches_trl_reward_trainer_on_same_model_and_batch(tiny_model_dir, tokenizer, tmp_path):
    """TRL's RewardTrainer.compute_loss (SequenceClassification) == our loss via verl's reading (TokenClassification)."""
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification
    from trl import RewardConfig, RewardTrainer

    import bt_data
    from bt_trainer import load_value_head_model

    torch.manual_seed(0)
    value_model = load_value_head_model(str(tiny_model_dir), attn_implementation="eager", torch_dtype=torch.float32, trust_remote_code=False)
    torch.nn.init.normal_(value_model.score.weight, std=1.0)  # rewards far from 0 so the comparison is not trivial
    value_model.save_pretrained(tmp_path / "vh")
    trl_model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "vh", num_labels=1, attn_implementation="eager")
    trl_model.config.pad_token_id = tokenizer.pad_token_id

    def conv(prompt, answer):
        return [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]

    pairs = [
        (conv("How do I bake bread?", "First, gather what you need."), conv("How do I bake bread?", "No idea.")),
        (conv("Hi", "Hello! How can I help today?"), conv("Hi", "Whatever.")),
        (conv("Plant tomatoes?", "Start with the simplest version."), conv("Plant tomatoes?", "Just search for it yourself, really.")),
    ]
    sequences = [bt_data.encode_conversation(tokenizer, c) for c, _ in pairs] + [bt_data.encode_conversation(tokenizer, r) for _, r in pairs]
    batch = bt_data.collate_padded(sequences, tokenizer.pad_token_id)

    rewards = bt_data.compute_rewards(value_model.eval(), batch)
    ours, _ = bradley_terry_loss(rewards[:3], rewards[3:])

    dummy = Dataset.from_dict({"chosen": [p[0] for p in pairs], "rejected": [p[1] for p in pairs]})
    args = RewardConfig(output_dir=str(tmp_path / "trl"), report_to=[], use_cpu=True, bf16=False, per_device_train_batch_size=3)
    trainer = RewardTrainer(model=trl_model, args=args, train_dataset=dummy, processing_class=tokenizer)
    trl_model.eval()
    with torch.no_grad():
        theirs = trainer.compute_loss(trl_model, {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]})
    assert abs(ours.item() - 0.6931) > 0.05  # a real, non-trivial loss value
    assert ours.item() == pytest.approx(theirs.item(), abs=1e-5)

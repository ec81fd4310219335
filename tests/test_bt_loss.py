"""bt_loss.py against hand formulas and against TRL's RewardTrainer."""

import math

import pytest
import torch

from bt_loss import SUM_FIELDS, bradley_terry_loss, metrics_from_sums, pair_losses, pair_sums

CHOSEN = torch.tensor([1.0, -0.5, 2.0, 0.3])
REJECTED = torch.tensor([0.0, 0.5, -1.0, 0.3])


def hand_loss(c, r):
    return sum(math.log1p(math.exp(-(a - b))) for a, b in zip(c, r, strict=True)) / len(c)


def test_loss_matches_hand_formula():
    loss, metrics = bradley_terry_loss(CHOSEN, REJECTED)
    expected = hand_loss(CHOSEN.tolist(), REJECTED.tolist())
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    assert metrics["loss"] == pytest.approx(expected, abs=1e-6)


def test_metrics_match_hand_formulas():
    _, m = bradley_terry_loss(CHOSEN, REJECTED)
    c, r = CHOSEN.tolist(), REJECTED.tolist()
    assert m["accuracy"] == pytest.approx(2 / 4)  # 1>0 and 2>-1; the tie 0.3=0.3 counts as wrong
    assert m["margin"] == pytest.approx(sum(a - b for a, b in zip(c, r, strict=True)) / 4)
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

    from btrm import batching, pair_dataset
    from btrm.modeling import load_value_head_model

    torch.manual_seed(0)
    value_model = load_value_head_model(
        str(tiny_model_dir), attn_implementation="eager", torch_dtype=torch.float32, trust_remote_code=False
    )
    torch.nn.init.normal_(value_model.score.weight, std=1.0)  # rewards far from 0 so the comparison is not trivial
    value_model.save_pretrained(tmp_path / "vh")
    trl_model = AutoModelForSequenceClassification.from_pretrained(
        tmp_path / "vh", num_labels=1, attn_implementation="eager"
    )
    trl_model.config.pad_token_id = tokenizer.pad_token_id

    def conv(prompt, answer):
        return [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]

    pairs = [
        (conv("How do I bake bread?", "First, gather what you need."), conv("How do I bake bread?", "No idea.")),
        (conv("Hi", "Hello! How can I help today?"), conv("Hi", "Whatever.")),
        (
            conv("Plant tomatoes?", "Start with the simplest version."),
            conv("Plant tomatoes?", "Just search for it yourself, really."),
        ),
    ]
    sequences = [pair_dataset.encode_conversation(tokenizer, c) for c, _ in pairs] + [
        pair_dataset.encode_conversation(tokenizer, r) for _, r in pairs
    ]
    batch = batching.collate_padded(sequences, tokenizer.pad_token_id)

    rewards = batching.compute_rewards(value_model.eval(), batch)
    ours, _ = bradley_terry_loss(rewards[:3], rewards[3:])

    dummy = Dataset.from_dict({"chosen": [p[0] for p in pairs], "rejected": [p[1] for p in pairs]})
    args = RewardConfig(
        output_dir=str(tmp_path / "trl"), report_to=[], use_cpu=True, bf16=False, per_device_train_batch_size=3
    )
    trainer = RewardTrainer(model=trl_model, args=args, train_dataset=dummy, processing_class=tokenizer)
    trl_model.eval()
    with torch.no_grad():
        theirs = trainer.compute_loss(
            trl_model, {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        )
    assert abs(ours.item() - 0.6931) > 0.05  # a real, non-trivial loss value
    assert ours.item() == pytest.approx(theirs.item(), abs=1e-5)


# ----------------------------------------------------------------------------- objectives (issue 12)

from collections import defaultdict  # noqa: E402
from types import SimpleNamespace  # noqa: E402

from bt_loss import (  # noqa: E402
    STRENGTH_SUM_FIELDS,
    LossConfig,
    RewardStats,
    grouped_metrics_from_sums,
    grouped_sums,
    normalize_rewards,
    preference_loss,
    require_strengths,
    reward_stats_from_sums,
    strength_metrics_from_sums,
    strength_sums,
)

# Six pairs, signed strengths as in HelpSteer2 (the sign says which response won; only |s| is used).
C6 = torch.tensor([1.5, -0.2, 0.7, 2.0, -1.0, 0.1])
R6 = torch.tensor([0.5, 0.3, 0.7, -0.5, -2.5, 1.2])
S6 = [3, -1, 2, -2, 1, 3]


def log1p_exp(x):
    """log(1 + e^x) = -log sigmoid(-x), computed by hand."""
    return math.log1p(math.exp(x))


def hand_objectives(kind, c, r, s, coefficient=0.0, margins=None):
    out = []
    for a, b, strength in zip(c, r, s, strict=True):
        if kind == "bt":
            value = log1p_exp(-(a - b))
        elif kind == "scaled_bt":
            value = abs(strength) * log1p_exp(-(a - b))
        else:
            m = abs(strength) if margins is None else margins[abs(strength)]
            value = log1p_exp(-(a - b - m))
        out.append(value + coefficient * (a + b) ** 2)
    return out


@pytest.mark.parametrize("kind", ["bt", "scaled_bt", "margin"])
@pytest.mark.parametrize("coefficient", [0.0, 0.05])
def test_objectives_match_hand_formulas(kind, coefficient):
    config = LossConfig(type=kind, center_rewards_coefficient=coefficient)
    loss, sums = preference_loss(C6, R6, S6, config)
    per_pair = hand_objectives(kind, C6.tolist(), R6.tolist(), S6, coefficient)
    assert loss.item() == pytest.approx(sum(per_pair) / 6, abs=1e-6)
    metrics = metrics_from_sums(sums)
    assert metrics["objective"] == pytest.approx(sum(per_pair) / 6, abs=1e-6)
    # "loss" stays the plain BT loss whatever the objective, so runs with different objectives compare.
    assert metrics["loss"] == pytest.approx(sum(hand_objectives("bt", C6.tolist(), R6.tolist(), S6)) / 6, abs=1e-6)


def test_objectives_differ_from_each_other():
    """Guards the hand-formula tests against an implementation that ignores the type or the strengths."""
    values = {
        kind: preference_loss(C6, R6, S6, LossConfig(type=kind)).loss.item() for kind in ("bt", "scaled_bt", "margin")
    }
    assert len({round(v, 4) for v in values.values()}) == 3
    assert preference_loss(C6, R6, [1] * 6, LossConfig(type="scaled_bt")).loss.item() == pytest.approx(
        values["bt"], abs=1e-6
    )


def test_custom_margin_map():
    margins = {1: 1 / 3, 2: 2 / 3, 3: 1.0}  # Llama 2's "small" margins
    config = LossConfig.from_mapping({"type": "margin", "margin_by_strength": {"1": 1 / 3, 2: 2 / 3, 3: 1.0}})
    assert [config.margin_for(k) for k in (1, -2, 3)] == pytest.approx([1 / 3, 2 / 3, 1.0])
    expected = sum(hand_objectives("margin", C6.tolist(), R6.tolist(), S6, margins=margins)) / 6
    assert preference_loss(C6, R6, S6, config).loss.item() == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("kind", ["bt", "scaled_bt", "margin"])
def test_micro_batch_losses_add_up_to_the_step_loss(kind):
    config = LossConfig(type=kind, center_rewards_coefficient=0.01)
    whole = preference_loss(C6, R6, S6, config)
    parts = [preference_loss(C6[a:b], R6[a:b], S6[a:b], config, normalizer=6) for a, b in ((0, 1), (1, 4), (4, 6))]
    assert sum(p.loss for p in parts).item() == pytest.approx(whole.loss.item(), abs=1e-6)
    assert metrics_from_sums(sum(p.sums for p in parts)) == pytest.approx(whole.metrics)


def test_gradients_match_hand_derivatives():
    """d/dc of w * -log sigmoid(c - r - m) + k (c + r)^2 is -w sigmoid(-(c - r - m)) + 2k (c + r), over N."""
    k = 0.02
    strengths = torch.tensor([abs(s) for s in S6], dtype=torch.float32)
    for kind, weight, margin in (("scaled_bt", strengths, 0.0), ("margin", 1.0, strengths)):
        c, r = C6.clone().requires_grad_(), R6.clone().requires_grad_()
        preference_loss(c, r, S6, LossConfig(type=kind, center_rewards_coefficient=k)).loss.backward()
        bt_part = -weight * torch.sigmoid(-(C6 - R6 - margin)) / 6
        center_part = 2 * k * (C6 + R6) / 6
        assert torch.allclose(c.grad, bt_part + center_part, atol=1e-7), kind
        assert torch.allclose(r.grad, -bt_part + center_part, atol=1e-7), kind


def trl_compute_loss(chosen, rejected, margin=None, center_rewards_coefficient=None):
    """TRL 1.16's own RewardTrainer.compute_loss on given rewards: a stub model returns them as logits.

    compute_loss reads only the attributes stubbed here (eval mode skips the token counting); TRL
    splits the logits into chosen (first half) and rejected (second half), as we pass them.
    """
    from trl import RewardTrainer

    logits = torch.cat([chosen, rejected]).unsqueeze(-1)

    class RewardsModel:
        training = False

        def __call__(self, **inputs):
            return SimpleNamespace(logits=logits)

    model = RewardsModel()
    identity = lambda tensor: tensor  # noqa: E731  (one process: gathering changes nothing)
    trainer = SimpleNamespace(
        model=model,
        args=SimpleNamespace(center_rewards_coefficient=center_rewards_coefficient),
        accelerator=SimpleNamespace(gather=identity, gather_for_metrics=identity),
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        _total_train_tokens=0,
        _tp_size=1,
    )
    inputs = {"input_ids": torch.zeros(len(logits), 1, dtype=torch.long)}
    if margin is not None:
        inputs["margin"] = margin
    with torch.no_grad():
        return RewardTrainer.compute_loss(trainer, model, inputs).item()


def test_plain_bt_matches_trl_compute_loss_on_same_rewards():
    assert preference_loss(C6, R6).loss.item() == pytest.approx(trl_compute_loss(C6, R6), abs=1e-6)


def test_centering_matches_trl():
    ours = preference_loss(C6, R6, config=LossConfig(center_rewards_coefficient=0.01)).loss.item()
    theirs = trl_compute_loss(C6, R6, center_rewards_coefficient=0.01)
    assert ours == pytest.approx(theirs, abs=1e-6)
    assert abs(theirs - trl_compute_loss(C6, R6)) > 1e-3  # the term is really there


@pytest.mark.parametrize("margins", [None, {1: 0.25, 2: 0.5, 3: 2.0}])
def test_margin_matches_trl(margins):
    config = LossConfig(type="margin", margin_by_strength=margins, center_rewards_coefficient=0.01)
    # TRL takes the margin per pair as data; we derive it from |strength| through the map.
    trl_margin = torch.tensor([float(abs(s)) if margins is None else margins[abs(s)] for s in S6])
    ours = preference_loss(C6, R6, S6, config).loss.item()
    assert ours == pytest.approx(trl_compute_loss(C6, R6, margin=trl_margin, center_rewards_coefficient=0.01), abs=1e-6)


def test_bf16_rewards_give_fp32_objective():
    out = preference_loss(
        C6.bfloat16(), R6.bfloat16(), S6, LossConfig(type="scaled_bt", center_rewards_coefficient=0.01)
    )
    assert out.loss.dtype == torch.float32 and out.sums.dtype == torch.float64


def test_strengths_are_required_and_checked():
    with pytest.raises(ValueError, match=r"data/train.parquet: no 'preference_strength' column"):
        require_strengths(None, "data/train.parquet")
    with pytest.raises(ValueError, match=r"data/train.parquet pair 2 \(counting from 1\): no preference_strength"):
        require_strengths([1, None, 2], "data/train.parquet")
    with pytest.raises(ValueError, match="a tie"):
        require_strengths([1, 0], "f")
    with pytest.raises(ValueError, match="over loss.max_strength=3"):
        require_strengths([1, -4], "f")
    with pytest.raises(ValueError, match="not an integer"):
        require_strengths([1.5], "f")
    require_strengths([1, -3, 2.0], "f")  # signed and integral floats are fine
    with pytest.raises(ValueError, match="needs preference_strength"):
        preference_loss(C6, R6, None, LossConfig(type="scaled_bt"))
    with pytest.raises(ValueError, match="got 5 strengths for 6 pairs"):
        preference_loss(C6, R6, S6[:5], LossConfig(type="margin"))
    with pytest.raises(ValueError, match="a tie"):
        preference_loss(C6, R6, torch.tensor([1, 0, 1, 1, 1, 1]), LossConfig(type="margin"))
    assert preference_loss(C6, R6, None, LossConfig(type="bt")).loss.item() > 0  # bt never reads strengths


def test_loss_config_validation():
    from omegaconf import OmegaConf

    section = OmegaConf.create(
        {
            "type": "margin",
            "center_rewards_coefficient": 0.01,
            "margin_by_strength": {1: 0.5, 2: 1.0, 3: 1.5},
            "max_strength": 3,
        }
    )
    config = LossConfig.from_mapping(section)
    assert config.needs_strengths and config.margin_for(-3) == 1.5 and config.center_rewards_coefficient == 0.01
    assert LossConfig.from_mapping(None) == LossConfig() and not LossConfig().needs_strengths
    assert LossConfig(center_rewards_coefficient=None).center_rewards_coefficient == 0.0  # TRL's "off"
    for bad, message in (
        ({"type": "hinge"}, "loss.type=hinge: expected one of bt | scaled_bt | margin"),
        ({"center_rewards_coefficient": -0.1}, ">= 0"),
        ({"typo": 1}, "unknown key"),
        ({"type": "margin", "margin_by_strength": {1: 1.0, 2: 2.0}}, r"no margin for \|strength\| \[3\]"),
        ({"type": "scaled_bt", "margin_by_strength": {1: 1.0, 2: 2.0, 3: 3.0}}, "only used by loss.type=margin"),
        ({"type": "margin", "margin_by_strength": {"one": 1.0}}, "must map"),
    ):
        with pytest.raises(ValueError, match=message):
            LossConfig.from_mapping(bad)


# ----------------------------------------------------------------------------- per-strength validation metrics


def test_strength_metrics_match_hand_computation():
    metrics = strength_metrics_from_sums(strength_sums(C6, R6, S6))
    c, r = C6.tolist(), R6.tolist()
    for k in (1, 2, 3):
        members = [i for i, s in enumerate(S6) if abs(s) == k]
        assert metrics[f"pairs_s{k}"] == len(members)
        assert metrics[f"accuracy_s{k}"] == pytest.approx(sum(c[i] > r[i] for i in members) / len(members))
        assert metrics[f"loss_s{k}"] == pytest.approx(
            sum(log1p_exp(r[i] - c[i]) for i in members) / len(members), abs=1e-7
        )
    # By hand: |s|=3 -> pairs 0 (1.5 > 0.5) and 5 (0.1 < 1.2); |s|=2 -> pair 2 is a tie (wrong), pair 3 right.
    assert (metrics["accuracy_s3"], metrics["accuracy_s2"], metrics["accuracy_s1"]) == (0.5, 0.5, 0.5)


def test_strength_sums_have_a_fixed_shape_and_add_up_over_ranks():
    rank0 = strength_sums(C6[:2], R6[:2], S6[:2])  # strengths 3 and 1: no pair of strength 2 here
    rank1 = strength_sums(C6[2:], R6[2:], S6[2:])
    assert rank0.shape == rank1.shape == (3 * len(STRENGTH_SUM_FIELDS),) and rank0.dtype == torch.float64
    assert strength_metrics_from_sums(rank0 + rank1) == pytest.approx(
        strength_metrics_from_sums(strength_sums(C6, R6, S6))
    )
    assert "accuracy_s2" not in strength_metrics_from_sums(rank0)  # no pairs: no key, rather than NaN
    assert strength_sums(C6[:0], R6[:0], []).abs().sum() == 0  # an idle rank still contributes the right shape
    assert strength_sums(C6, R6, S6, max_strength=5).numel() == 5 * len(STRENGTH_SUM_FIELDS)
    with pytest.raises(ValueError, match="over loss.max_strength=2"):
        strength_sums(C6, R6, S6, max_strength=2)


def test_grouped_metrics_match_hand_computation_with_pairs_in_several_groups_or_none():
    # pair i -> groups: 0 in {a, x}; 1 in {a}; 2 in none; 3 in {b, x}; 4 in {b}; 5 in {x}
    labels = ["domain_a", "domain_b", "lang_x"]
    members = [[0, 2], [0], [], [1, 2], [1], [2]]
    metrics = grouped_metrics_from_sums(grouped_sums(C6, R6, members, 3), labels)
    c, r = C6.tolist(), R6.tolist()
    for g, label in enumerate(labels):
        in_group = [i for i, groups in enumerate(members) if g in groups]
        assert metrics[f"pairs_{label}"] == len(in_group)
        assert metrics[f"accuracy_{label}"] == sum(c[i] > r[i] for i in in_group) / len(in_group)
        assert metrics[f"loss_{label}"] == pytest.approx(sum(log1p_exp(r[i] - c[i]) for i in in_group) / len(in_group))
    # By hand: domain_a = pairs 0 (right) and 1; lang_x = pairs 0, 3, 5 (5 is wrong: 0.1 < 1.2).
    assert metrics["pairs_lang_x"] == 3 and metrics["pairs_domain_a"] == 2
    split = grouped_sums(C6[:3], R6[:3], members[:3], 3) + grouped_sums(C6[3:], R6[3:], members[3:], 3)
    assert grouped_metrics_from_sums(split, labels) == metrics  # summed over ranks: exactly the whole
    assert "pairs_domain_b" not in grouped_metrics_from_sums(grouped_sums(C6[:3], R6[:3], members[:3], 3), labels)
    assert grouped_sums(C6[:0], R6[:0], [], 3).shape == (3 * len(STRENGTH_SUM_FIELDS),)


def test_metrics_with_non_finite_rewards_are_representable():
    sums = pair_sums(torch.tensor([float("nan"), 1.0]), torch.tensor([0.0, 0.0]))
    metrics = metrics_from_sums(sums)  # no exception: a diverged run still logs
    assert math.isnan(metrics["loss"]) and math.isnan(metrics["reward_std"]) and metrics["accuracy"] == 0.5
    with pytest.raises(ValueError, match="expected a vector of 8 sums"):
        metrics_from_sums(torch.zeros(7, dtype=torch.float64))


# ----------------------------------------------------------------------------- reward normalization stats


def test_reward_stats_match_independent_recomputation():
    import statistics

    import numpy as np

    generator = torch.Generator().manual_seed(0)
    chosen = 40.0 + 3.0 * torch.randn(50, generator=generator, dtype=torch.float64)  # far from 0: cancellation check
    rejected = 38.0 + 3.0 * torch.randn(50, generator=generator, dtype=torch.float64)
    # Two "ranks", each summing two micro-batches, then all-reduced by addition.
    sums = sum(pair_sums(chosen[a:b], rejected[a:b]) for a, b in ((0, 10), (10, 23), (23, 40), (40, 50)))
    stats = reward_stats_from_sums(sums)
    everything = chosen.tolist() + rejected.tolist()
    assert stats.count == 100
    assert stats.mean == pytest.approx(statistics.fmean(everything), rel=1e-12)
    assert stats.std == pytest.approx(statistics.pstdev(everything), rel=1e-9)
    normalized = normalize_rewards(torch.tensor(everything, dtype=torch.float64), stats)
    assert float(np.mean(normalized.numpy())) == pytest.approx(0.0, abs=1e-9)
    assert float(np.std(normalized.numpy())) == pytest.approx(1.0, rel=1e-9)
    assert normalize_rewards(stats.mean + 2 * stats.std, stats) == pytest.approx(2.0)
    assert RewardStats.from_dict(stats.to_dict()) == stats


def test_reward_stats_refuse_degenerate_inputs():
    with pytest.raises(ValueError, match="no pairs"):
        reward_stats_from_sums(torch.zeros(len(SUM_FIELDS), dtype=torch.float64))
    with pytest.raises(ValueError, match="not finite"):
        reward_stats_from_sums(pair_sums(torch.tensor([float("inf")]), torch.tensor([0.0])))
    flat = reward_stats_from_sums(pair_sums(torch.tensor([2.0]), torch.tensor([2.0])))
    assert flat.std == 0.0
    with pytest.raises(ValueError, match="cannot normalize"):
        normalize_rewards(torch.tensor([1.0]), flat)
    with pytest.raises(ValueError, match="numeric 'mean'"):
        RewardStats.from_dict({"mean": 1.0})

"""btrm.validator on a Validator built by its constructor (one gloo rank): when it is due, every pair scored
once in micro-batches, and the per-|strength| and per-group metrics against rewards computed by transformers
one conversation at a time."""

import dataclasses

import pytest
import torch
from test_step import help_pairs, make_step, tiny_value_model

from btrm.config import RunConfig
from btrm.fault_guard import FaultGuard
from btrm.pair_dataset import GroupIndex, TokenizedPair, group_index
from btrm.schema import compose_config
from btrm.validator import Validator, is_due


@pytest.fixture(scope="module")
def settings():
    return RunConfig.from_config(compose_config([]))


def make_validator(settings, step, dataset, groups, *, test_freq=3, has_strengths=True):
    return Validator(
        step,
        dataset,
        indices=list(range(len(dataset))),
        groups=groups,
        has_strengths=has_strengths,
        test_freq=test_freq,
        guard=FaultGuard(settings.trainer, heartbeats=None, rank=0),
        sequence_parallel=step.sequence_parallel,
    )


def test_validation_falls_on_test_freq_and_always_on_the_last_step():
    assert [s for s in range(1, 11) if is_due(s, 3, last_step=10)] == [3, 6, 9, 10]
    assert [s for s in range(1, 11) if is_due(s, -1, last_step=10)] == [10]
    assert is_due(12, 5, last_step=10)  # past the end (total_training_steps cut it short): due


def test_every_pair_is_scored_once_with_metrics_per_strength_and_group(
    one_rank_group, settings, tiny_model_dir, tokenizer
):
    model = tiny_value_model(tiny_model_dir, "packed")
    strengths = [1, -2, 3, 1]
    dataset = [
        dataclasses.replace(p, preference_strength=s) for p, s in zip(help_pairs(tokenizer), strengths, strict=True)
    ]
    groups = group_index([{"domain": d} for d in ("code", "chat", "code", "math")], ["domain"], 12)
    step = make_step(settings, model, layout="packed", pad_token_id=tokenizer.pad_token_id, tokens=64)
    validator = make_validator(settings, step, dataset, groups)
    assert [s for s in range(1, 8) if validator.should_validate(s, last_step=7)] == [3, 6, 7]

    with torch.no_grad():
        reward = lambda ids: model(input_ids=torch.tensor([ids]), use_cache=False).logits[0, -1, 0]  # noqa: E731
        margins = torch.stack([reward(p.chosen) - reward(p.rejected) for p in dataset])
    losses, correct = -torch.nn.functional.logsigmoid(margins), (margins > 0).float()
    assert len(step.plan(dataset)) > 1  # several micro-batches: the sums add up across them
    metrics = validator.run(step=6)
    assert metrics["val/loss"] == pytest.approx(losses.mean().item(), abs=1e-5)
    assert metrics["val/accuracy"] == pytest.approx(correct.mean().item())
    assert metrics["val/pairs_s1"] == 2 and metrics["val/pairs_s2"] == 1 and metrics["val/pairs_s3"] == 1
    assert metrics["val/loss_s1"] == pytest.approx(losses[[0, 3]].mean().item(), abs=1e-5)
    assert metrics["val/pairs_domain_code"] == 2 and metrics["val/pairs_domain_chat"] == 1
    assert metrics["val/accuracy_domain_code"] == pytest.approx(correct[[0, 2]].mean().item())
    assert metrics["val/loss_domain_math"] == pytest.approx(losses[3].item(), abs=1e-5)
    stats = validator.reward_stats(6)
    rewards = torch.stack([torch.stack([reward(p.chosen), reward(p.rejected)]) for p in dataset]).detach()
    assert stats.count == 8 and stats.mean == pytest.approx(rewards.mean().item(), abs=1e-5)
    assert validator.reward_stats(5) is None  # step 5 was not validated: its export carries no scale


def test_without_strengths_no_strength_metrics(one_rank_group, settings, tiny_model_dir, tokenizer):
    model = tiny_value_model(tiny_model_dir, "padded")
    dataset: list[TokenizedPair] = help_pairs(tokenizer)
    step = make_step(
        settings, model, layout="padded", pad_token_id=tokenizer.pad_token_id, tokens=None, micro_batch_size_per_gpu=3
    )
    validator = make_validator(
        settings, step, dataset, GroupIndex([], [[] for _ in dataset], {}, []), has_strengths=False
    )
    with torch.no_grad():
        reward = lambda ids: model(input_ids=torch.tensor([ids]), use_cache=False).logits[0, -1, 0]  # noqa: E731
        margins = torch.stack([reward(p.chosen) - reward(p.rejected) for p in dataset])
    metrics = validator.run(step=1)
    assert not any("_s1" in key for key in metrics)
    assert metrics["val/loss"] == pytest.approx(-torch.nn.functional.logsigmoid(margins).mean().item(), abs=1e-5)

"""btrm.step: exact accumulation over micro-batches against a hand-written step, a skipped non-finite update,
and a whole step's metrics over the ranks (one gloo rank), each on a TrainStep built by its constructor."""

import copy
import dataclasses

import pytest
import torch

from bt_loss import LossConfig
from btrm import batching, pair_dataset
from btrm.checkpoint import TrainerState
from btrm.config import RunConfig
from btrm.fault_guard import FaultGuard
from btrm.schema import compose_config
from btrm.sequence_parallel import SequenceParallel
from btrm.step import TrainStep


@pytest.fixture(scope="module")
def settings() -> RunConfig:
    """trainer.yaml's defaults, typed."""
    return RunConfig.from_config(compose_config([]))


def make_step(settings, model, *, layout="padded", optimizer=None, pad_token_id=0, tokens=None, **changes):
    optimizer = optimizer or torch.optim.AdamW(model.parameters(), lr=0.1)
    data = dataclasses.replace(settings.data, **changes)
    return TrainStep(
        model,
        optimizer,
        torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0),
        data=data,
        optim=dataclasses.replace(settings.optim, clip_grad=1.0),
        model_settings=settings.model,
        loss=LossConfig(),
        layout=layout,
        token_budget=batching.TokenBudget(tokens, "test"),
        pad_token_id=pad_token_id,
        device="cpu",
        param_dtype=torch.float32,
        guard=FaultGuard(settings.trainer, heartbeats=None, rank=0),
        check_layout=False,
        sequence_parallel=SequenceParallel(1, 0, None, 0, 1),  # no sequence parallelism: one group per rank
    )


def tiny_value_model(tiny_model_dir, layout):
    from btrm.modeling import load_value_head_model

    torch.manual_seed(0)
    model = load_value_head_model(
        str(tiny_model_dir), attn_implementation="sdpa", torch_dtype=torch.float32, trust_remote_code=False
    )
    torch.nn.init.normal_(model.score.weight, std=1.0)
    if layout != "padded":
        from btrm import attention

        attention.enable_segment_attention(model)
    return model


def help_pairs(tokenizer):
    answers = [
        "Measure carefully.",
        "No.",
        "Start with the simplest version.",
        "Whatever you do.",
        "Ask a friend to check.",
        "Boring.",
        "First, gather what you need.",
        "Search it.",
    ]
    conversations = [[{"role": "user", "content": "Help?"}, {"role": "assistant", "content": a}] for a in answers]
    return [
        pair_dataset.TokenizedPair(*(pair_dataset.encode_conversation(tokenizer, c) for c in conversations[i : i + 2]))
        for i in range(0, 8, 2)
    ]


@pytest.mark.parametrize("layout", ["padded", "packed", "shared"])
def test_micro_batches_accumulate_to_the_hand_written_step_gradient(settings, tiny_model_dir, tokenizer, layout):
    """TrainStep.forward_backward over 4 micro-batches of 1 pair accumulates the gradient of the step's mean
    loss written by hand: rewards from transformers on one conversation at a time."""
    model = tiny_value_model(tiny_model_dir, layout)
    pairs = help_pairs(tokenizer)

    model.zero_grad()
    reward = lambda ids: model(input_ids=torch.tensor([ids]), use_cache=False).logits[0, -1, 0]  # noqa: E731
    hand_loss = torch.stack(
        [-torch.nn.functional.logsigmoid(reward(p.chosen) - reward(p.rejected)) for p in pairs]
    ).mean()
    hand_loss.backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    step = make_step(settings, model, layout=layout, pad_token_id=tokenizer.pad_token_id)
    model.zero_grad()
    step_loss = sum(step.forward_backward([p], step_pairs=4).loss.item() for p in pairs)
    assert step_loss == pytest.approx(hand_loss.item(), abs=1e-5)
    for name, grad in expected.items():
        got = dict(model.named_parameters())[name].grad
        assert torch.allclose(got, grad, rtol=1e-4, atol=1e-4 * grad.abs().max().item()), name


def test_a_step_with_a_non_finite_gradient_norm_changes_nothing_and_is_counted(settings):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    step, state = make_step(settings, model, optimizer=optimizer), TrainerState()
    inputs = torch.ones(2, 4)
    model(inputs).sum().backward()
    step.clip_and_step(state)  # a taken update first: the optimizer has moments and a step count to keep
    weights, optimizer_state = copy.deepcopy(model.state_dict()), copy.deepcopy(optimizer.state_dict())

    model.zero_grad()
    (model(inputs) * float("inf")).sum().backward()
    assert not torch.isfinite(step.clip_and_step(state))
    for name, value in model.state_dict().items():
        assert torch.equal(value, weights[name]), name
    for index, moments in optimizer.state_dict()["state"].items():
        for key, value in moments.items():
            assert torch.equal(value, optimizer_state["state"][index][key]), (index, key)
    assert (state.skipped_steps, state.consecutive_skipped_steps) == (1, 1)

    model(inputs).sum().backward()  # the next finite step is taken again and ends the streak
    assert torch.isfinite(step.clip_and_step(state))
    assert not torch.equal(model.weight, weights["weight"])
    assert (state.skipped_steps, state.consecutive_skipped_steps) == (1, 0)


def test_a_whole_step_logs_the_hand_computed_metrics_and_carries_the_stop_vote(
    one_rank_group, settings, tiny_model_dir, tokenizer
):
    """TrainStep.run: loss and accuracy of the step equal the hand computation before the update, the update is
    taken, the token counts are the pairs' own, and a received stop signal is agreed through the step's all-reduce."""
    model = tiny_value_model(tiny_model_dir, "packed")
    pairs = help_pairs(tokenizer)
    with torch.no_grad():
        reward = lambda ids: model(input_ids=torch.tensor([ids]), use_cache=False).logits[0, -1, 0]  # noqa: E731
        margins = torch.stack([reward(p.chosen) - reward(p.rejected) for p in pairs])
    before = copy.deepcopy(model.score.weight)
    step, state = (
        make_step(settings, model, layout="packed", pad_token_id=tokenizer.pad_token_id, tokens=64),
        TrainerState(step=1),
    )
    step.guard.stop_signals.received = __import__("signal").SIGTERM  # as its handler records a delivered signal
    metrics = step.run(pairs, state)
    assert metrics["train/loss"] == pytest.approx(-torch.nn.functional.logsigmoid(margins).mean().item(), abs=1e-5)
    assert metrics["train/accuracy"] == pytest.approx((margins > 0).float().mean().item())
    real = sum(len(p.chosen) + len(p.rejected) for p in pairs)
    assert metrics["train/real_tokens_per_s"] * metrics["train/time(s)"] == pytest.approx(real)
    assert metrics["train/micro_batches"] > 1  # 64 tokens hold fewer than the 4 pairs
    assert not torch.equal(model.score.weight, before) and state.skipped_steps == 0
    assert step.guard.stop_agreed and step.guard.stop_decided(1, last_step=2) and not step.guard.stop_decided(2, 2)

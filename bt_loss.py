"""Bradley-Terry loss and metrics: pure functions of reward tensors (no model code).

Two layers:
- `bradley_terry_loss(chosen, rejected)`: the loss over one batch of pairs and its metrics dict.
- `pair_sums` / `metrics_from_sums`: additive statistics, so metrics over many micro-batches and
  ranks are exact (sum, all-reduce, then divide once), never a mean of per-micro-batch means.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Order of the entries in the vector returned by pair_sums (all additive across batches and ranks).
SUM_FIELDS = ("pairs", "loss", "correct", "margin", "chosen_reward", "rejected_reward", "reward_sq")


def pair_losses(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> torch.Tensor:
    """Per-pair -log sigmoid(r_chosen - r_rejected), in fp32 whatever the rewards' dtype."""
    if chosen_rewards.shape != rejected_rewards.shape or chosen_rewards.dim() != 1:
        raise ValueError(f"expected two 1-D reward tensors of equal length, got {tuple(chosen_rewards.shape)} and {tuple(rejected_rewards.shape)}")
    return -F.logsigmoid(chosen_rewards.float() - rejected_rewards.float())


def bradley_terry_loss(
    chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor, normalizer: int | None = None
) -> tuple[torch.Tensor, dict[str, float]]:
    """Sum of per-pair BT losses divided by `normalizer` (default: the number of pairs here).

    Pass the number of pairs in the whole optimizer step as `normalizer` when this batch is one
    micro-batch of several: the micro-batch losses then add up to the step's mean loss, and so do
    their gradients (exact gradient accumulation). Returns (loss, metrics of this batch).
    """
    losses = pair_losses(chosen_rewards, rejected_rewards)
    loss = losses.sum() / (normalizer if normalizer is not None else losses.numel())
    return loss, metrics_from_sums(pair_sums(chosen_rewards, rejected_rewards, losses))


@torch.no_grad()
def pair_sums(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor, losses: torch.Tensor | None = None) -> torch.Tensor:
    """Additive statistics of a batch of pairs, as an fp64 vector ordered like SUM_FIELDS."""
    chosen, rejected = chosen_rewards.detach().double(), rejected_rewards.detach().double()
    if losses is None:
        losses = pair_losses(chosen_rewards, rejected_rewards)
    return torch.stack([
        torch.tensor(float(chosen.numel()), dtype=torch.float64, device=chosen.device),
        losses.detach().double().sum(),
        (chosen > rejected).double().sum(),
        (chosen - rejected).sum(),
        chosen.sum(),
        rejected.sum(),
        (chosen.square().sum() + rejected.square().sum()),
    ])


def metrics_from_sums(sums: torch.Tensor) -> dict[str, float]:
    """Means from pair_sums (possibly summed over micro-batches and ranks).

    loss: mean -log sigmoid(margin); accuracy: share of pairs with r_chosen > r_rejected (ties count
    as wrong); margin: mean r_chosen - r_rejected; chosen/rejected_reward: mean rewards;
    reward_std: population std of all 2N rewards.
    """
    s = dict(zip(SUM_FIELDS, sums.tolist()))
    n = s["pairs"]
    if n == 0:
        raise ValueError("no pairs: metrics are undefined")
    mean_reward = (s["chosen_reward"] + s["rejected_reward"]) / (2 * n)
    variance = max(s["reward_sq"] / (2 * n) - mean_reward**2, 0.0)
    return {
        "loss": s["loss"] / n,
        "accuracy": s["correct"] / n,
        "margin": s["margin"] / n,
        "chosen_reward": s["chosen_reward"] / n,
        "rejected_reward": s["rejected_reward"] / n,
        "reward_std": variance**0.5,
    }

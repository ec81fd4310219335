"""Preference losses and their metrics: pure functions of reward tensors (+ strengths), no model code.

Objectives (`LossConfig.type`), per pair i with d_i = r_chosen_i - r_rejected_i and s_i the signed
HelpSteer2 `preference_strength` (only |s_i| matters: the data already says which side won):

- `bt`:        l_i = -log sigmoid(d_i)                                  (Bradley-Terry)
- `scaled_bt`: l_i = -|s_i| log sigmoid(d_i)                            (HelpSteer2-Preference, arXiv 2410.01257)
- `margin`:    l_i = -log sigmoid(d_i - m(|s_i|))                       (Llama 2 / TRL / OpenRLHF margin loss)

plus, whatever the type, TRL's reward centering: c * (r_chosen_i + r_rejected_i)^2 with
c = `center_rewards_coefficient` (0 = off; TRL recommends 0.01).

Batch normalisation, for every type: the loss of a batch is sum_i(l_i + centering_i) / normalizer,
where `normalizer` is the number of pairs of the whole optimizer step (on this rank). The per-pair
terms do not depend on the rest of the batch, so the micro-batch losses of a step add up to the
step's loss exactly, and so do their gradients. With the default (normalizer = pairs in the batch)
this is exactly TRL's `RewardTrainer.compute_loss` (a mean of the margin loss over pairs, plus
c * mean over pairs of (r_c + r_r)^2). For `scaled_bt` it means the weights are NOT renormalised:
the loss is the mean over pairs of |s_i| * BT loss, the paper's per-pair formula averaged over the
batch, so gradients are about mean(|s|) times BT's (1.5-2x on HelpSteer2); lower the learning rate
to compare at equal step sizes. (Dividing by the step's sum of |s| instead, "each pair repeated |s|
times", would need that sum over all ranks before the first micro-batch; pass it as `normalizer`
if you want it.)

Additive statistics: `pair_sums` / `strength_sums` return fp64 vectors of sums, so metrics over many
micro-batches and ranks are exact (sum, all-reduce SUM, then divide once), never a mean of
per-micro-batch means. Every rank's vector has the same fixed shape (all-reduce needs that).

The `loss:` section of trainer.yaml is declared here: LOSS_TYPES, LossConfig and LOSS_KNOB_RULES, each
knob's rule (the config schema, btrm.schema, reads them from here; this module imports nothing of the project).
torch is imported by the functions that compute, not by this module: the launcher checks a config,
loss section included, before any rank starts and without importing torch.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any, NamedTuple

if TYPE_CHECKING:
    import torch

# A new objective: its name here (and in STRENGTH_LOSS_TYPES if it reads preference_strength), its
# per-pair formula in pair_objectives, and its line in trainer.yaml's loss.type comment.
LOSS_TYPES = ("bt", "scaled_bt", "margin")
STRENGTH_LOSS_TYPES = ("scaled_bt", "margin")  # objectives that read preference_strength
MAX_STRENGTH = 3  # HelpSteer2: preference_strength in -3..3, ties (0) dropped by prepare_helpsteer2.py

# Order of the entries in the vector returned by pair_sums (all additive across batches and ranks).
# "loss" is always the plain BT loss -log sigmoid(r_c - r_r), comparable across objectives;
# "objective" is what the configured loss optimises (weights, margins and centering included).
SUM_FIELDS = ("pairs", "loss", "correct", "margin", "chosen_reward", "rejected_reward", "reward_sq", "objective")

# Per |preference_strength| k in 1..max_strength, these fields at index (k - 1) * len + field.
STRENGTH_SUM_FIELDS = ("pairs", "loss", "correct")


# ----------------------------------------------------------------------------- configuration


@dataclass(frozen=True)
class LossConfig:
    """The trainer.yaml `loss:` section, checked by the config schema's rules (btrm.schema.KNOB_RULES
    for each knob; the margin table's keys and values here, which btrm.schema.check_config also runs).

    margin_by_strength: {|strength|: margin} for `margin`; None means m(|s|) = |s| (1, 2, 3), the
    HelpSteer2-Preference paper's margin (the preference magnitude itself, as Llama 2's "large"
    margin), which is also what TRL/OpenRLHF compute when fed |strength| as their margin column.
    max_strength: largest |preference_strength| accepted; sets the size of the per-strength vector.
    """

    type: str = "bt"
    center_rewards_coefficient: float = 0.0
    margin_by_strength: Mapping[int, float] | None = None
    max_strength: int = MAX_STRENGTH
    _margin_table: tuple[float, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        if self.center_rewards_coefficient is None:  # TRL's "off"
            object.__setattr__(self, "center_rewards_coefficient", 0.0)
        for name in LOSS_KNOBS:
            expected, accepts = LOSS_KNOB_RULES[name]
            value = getattr(self, name)
            if not accepts(value):
                raise ValueError(f"loss.{name}={_render(value)}: expected {expected}")
        object.__setattr__(self, "center_rewards_coefficient", float(self.center_rewards_coefficient))
        # Index k of the table is m(k); index 0 (a tie) is never read: strengths are checked to be >= 1.
        table = [float("nan")] + [float(k) for k in range(1, self.max_strength + 1)]
        if self.margin_by_strength is not None:
            if self.type != "margin":
                raise ValueError(
                    f"loss.margin_by_strength is only used by loss.type=margin; got type {self.type!r} (set it to null)"
                )
            margins = {}
            for key, value in dict(self.margin_by_strength).items():
                if isinstance(key, bool) or not isinstance(key, int) or not 1 <= key <= self.max_strength:
                    raise ValueError(
                        f"loss.margin_by_strength keys must be |strength| values 1..{self.max_strength}; got {key!r}"
                    )
                if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                    raise ValueError(f"loss.margin_by_strength[{key}] must be a finite number; got {value!r}")
                margins[key] = float(value)
            missing = [k for k in range(1, self.max_strength + 1) if k not in margins]
            if missing:
                raise ValueError(
                    f"loss.margin_by_strength has no margin for |strength| {missing}; give one for each of 1..{self.max_strength}"
                )
            object.__setattr__(self, "margin_by_strength", margins)
            table = [float("nan")] + [margins[k] for k in range(1, self.max_strength + 1)]
        object.__setattr__(self, "_margin_table", tuple(table))

    @classmethod
    def from_mapping(cls, section: Mapping[str, Any] | None) -> LossConfig:
        """From trainer.yaml's `loss:` section (a dict or an OmegaConf DictConfig); None: plain BT."""
        if section is None:
            return cls()
        values = {str(k): v for k, v in dict(section).items()}
        unknown = sorted(set(values) - set(LOSS_KNOBS))
        if unknown:
            raise ValueError(f"unknown key(s) in loss: {unknown}; known: {sorted(LOSS_KNOBS)}")
        margins = values.get("margin_by_strength")  # a partial section keeps the other fields' defaults
        if margins is not None:
            # YAML may give keys as strings ("1": 1.0); DictConfig values need plain floats.
            try:
                margins = {int(k): v for k, v in dict(margins).items()}
            except (TypeError, ValueError):
                raise ValueError(
                    f"loss.margin_by_strength must map |strength| (1, 2, ...) to a margin; got {margins!r}"
                ) from None
            values["margin_by_strength"] = margins
        return cls(**values)

    @property
    def needs_strengths(self) -> bool:
        """True when every pair must carry a preference_strength (checked once, at start-up)."""
        return self.type in STRENGTH_LOSS_TYPES

    def margin_for(self, strength: int) -> float:
        """m(|strength|) of the margin objective (used by tests and to print the map)."""
        return self._margin_table[_check_strength_value(strength, self.max_strength, "strength")]


LOSS_KNOBS = tuple(f.name for f in fields(LossConfig) if f.init)  # trainer.yaml's loss.* knobs, in order


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# Each loss.* knob's rule: (what is expected, said to the user; whether a value is accepted). btrm.schema's
# KNOB_RULES takes the loss section's rules from here, so that this module imports nothing of the project.
LOSS_KNOB_RULES: dict[str, tuple[str, Any]] = {
    "type": ("one of " + " | ".join(LOSS_TYPES), lambda v: isinstance(v, str) and v in LOSS_TYPES),
    "center_rewards_coefficient": ("a number >= 0", lambda v: _is_number(v) and v >= 0),
    "margin_by_strength": ("a mapping {key: value}, or null", lambda v: v is None or isinstance(v, Mapping)),
    "max_strength": ("an integer >= 1", lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1),
}


def _render(value) -> str:
    """A value as written in a Hydra override (btrm.schema.render's rules for the loss section's values)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    return value if isinstance(value, str) else repr(value)


def _check_strength_value(strength: Any, max_strength: int, where: str) -> int:
    """|strength| as an int in 1..max_strength, or a ValueError saying what is wrong and where."""
    if strength is None:
        raise ValueError(f"{where}: no preference_strength")
    if isinstance(strength, bool) or not float(strength).is_integer():
        raise ValueError(f"{where}: preference_strength {strength!r} is not an integer")
    magnitude = abs(int(strength))
    if magnitude == 0:
        raise ValueError(
            f"{where}: preference_strength 0 (a tie) names no preferred response; drop ties (prepare_helpsteer2.py does)"
        )
    if magnitude > max_strength:
        raise ValueError(f"{where}: |preference_strength| {magnitude} is over loss.max_strength={max_strength}")
    return magnitude


def require_strengths(strengths: Sequence[Any] | None, where: str, max_strength: int = MAX_STRENGTH) -> None:
    """Start-up check for strength-based objectives: every pair has a usable preference_strength.

    `strengths` is one value per pair in file order (None for a missing column or a null cell);
    `where` names the file(s), e.g. data.train_files. Raises ValueError naming the first bad pair.
    """
    if strengths is None:
        raise ValueError(
            f"{where}: no 'preference_strength' column, which loss.type scaled_bt / margin needs "
            "(prepare the data with prepare_helpsteer2.py, or use loss.type=bt)"
        )
    for number, strength in enumerate(strengths, start=1):
        _check_strength_value(strength, max_strength, f"{where} pair {number} (counting from 1)")


def strength_magnitudes(
    strengths: torch.Tensor | Sequence[Any],
    num_pairs: int,
    max_strength: int = MAX_STRENGTH,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """|strength| per pair as an int64 tensor, each checked to be in 1..max_strength."""
    import torch

    if isinstance(strengths, torch.Tensor):
        if strengths.dim() != 1 or (
            strengths.is_floating_point() and not bool(torch.all(strengths == strengths.round()))
        ):
            raise ValueError(f"expected a 1-D tensor of integer strengths, got {strengths}")
        magnitudes = strengths.detach().abs().long()
        if magnitudes.numel() and (int(magnitudes.min()) < 1 or int(magnitudes.max()) > max_strength):
            bad = magnitudes[(magnitudes < 1) | (magnitudes > max_strength)][0].item()
            _check_strength_value(bad, max_strength, "batch")  # raises with the usual message
    else:
        magnitudes = torch.tensor(
            [_check_strength_value(s, max_strength, f"batch pair {i}") for i, s in enumerate(strengths, start=1)],
            dtype=torch.int64,
        )
    if magnitudes.numel() != num_pairs:
        raise ValueError(f"got {magnitudes.numel()} strengths for {num_pairs} pairs")
    return magnitudes.to(device) if device is not None else magnitudes


# ----------------------------------------------------------------------------- losses


def _check_rewards(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> None:
    if chosen_rewards.shape != rejected_rewards.shape or chosen_rewards.dim() != 1:
        raise ValueError(
            f"expected two 1-D reward tensors of equal length, got {tuple(chosen_rewards.shape)} and {tuple(rejected_rewards.shape)}"
        )


def pair_losses(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> torch.Tensor:
    """Per-pair -log sigmoid(r_chosen - r_rejected), in fp32 whatever the rewards' dtype."""
    import torch.nn.functional as F

    _check_rewards(chosen_rewards, rejected_rewards)
    return -F.logsigmoid(chosen_rewards.float() - rejected_rewards.float())


def pair_objectives(
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    strengths: torch.Tensor | Sequence[Any] | None,
    config: LossConfig,
) -> torch.Tensor:
    """Per-pair objective l_i + c * (r_c_i + r_r_i)^2 of `config` (module docstring), fp32, differentiable."""
    import torch
    import torch.nn.functional as F

    _check_rewards(chosen_rewards, rejected_rewards)
    chosen, rejected = chosen_rewards.float(), rejected_rewards.float()
    if config.needs_strengths:
        if strengths is None:
            raise ValueError(f"loss.type={config.type} needs preference_strength for every pair; this batch has none")
        magnitudes = strength_magnitudes(strengths, chosen.numel(), config.max_strength, chosen.device)
    if config.type == "bt":
        objectives = -F.logsigmoid(chosen - rejected)
    elif config.type == "scaled_bt":
        objectives = magnitudes.to(chosen.dtype) * -F.logsigmoid(chosen - rejected)
    else:  # margin
        margins = torch.tensor(config._margin_table, dtype=chosen.dtype, device=chosen.device)[magnitudes]
        objectives = -F.logsigmoid(chosen - rejected - margins)
    if config.center_rewards_coefficient:
        objectives = objectives + config.center_rewards_coefficient * (chosen + rejected).square()
    return objectives


class LossOutput(NamedTuple):
    """`loss` to backpropagate; `sums`: this batch's pair_sums vector (add, all-reduce, then metrics_from_sums)."""

    loss: torch.Tensor
    sums: torch.Tensor

    @property
    def metrics(self) -> dict[str, float]:
        return metrics_from_sums(self.sums)


def preference_loss(
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    strengths: torch.Tensor | Sequence[Any] | None = None,
    config: LossConfig | None = None,
    normalizer: float | None = None,
) -> LossOutput:
    """The configured objective of one batch: sum of per-pair objectives / `normalizer`.

    Pass the number of pairs of the whole optimizer step on this rank as `normalizer` when this batch
    is one micro-batch of several: the micro-batch losses then add up to the step's loss exactly
    (default: the pairs of this batch). `strengths` (signed or not; |s| is used) are needed by
    scaled_bt and margin, ignored by bt.
    """
    config = config or LossConfig()
    objectives = pair_objectives(chosen_rewards, rejected_rewards, strengths, config)
    if normalizer is not None and not normalizer > 0:
        raise ValueError(f"normalizer must be > 0 (the step's number of pairs); got {normalizer!r}")
    loss = objectives.sum() / (normalizer if normalizer is not None else objectives.numel())
    return LossOutput(loss, pair_sums(chosen_rewards, rejected_rewards, objectives=objectives))


def bradley_terry_loss(
    chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor, normalizer: int | None = None
) -> tuple[torch.Tensor, dict[str, float]]:
    """Plain BT: preference_loss with the default config. Returns (loss, metrics of this batch)."""
    loss, sums = preference_loss(chosen_rewards, rejected_rewards, normalizer=normalizer)
    return loss, metrics_from_sums(sums)


# ----------------------------------------------------------------------------- additive statistics


def pair_sums(
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    losses: torch.Tensor | None = None,
    objectives: torch.Tensor | None = None,
) -> torch.Tensor:
    """Additive statistics of a batch of pairs, as an fp64 vector ordered like SUM_FIELDS.

    `losses`: per-pair plain BT losses if already computed; `objectives`: per-pair objectives of the
    configured loss (default: the plain BT losses, i.e. loss.type=bt without centering).
    """
    import torch

    with torch.no_grad():
        chosen, rejected = chosen_rewards.detach().double(), rejected_rewards.detach().double()
        if losses is None:
            losses = pair_losses(chosen_rewards, rejected_rewards)
        if objectives is None:
            objectives = losses
        return torch.stack(
            [
                torch.tensor(float(chosen.numel()), dtype=torch.float64, device=chosen.device),
                losses.detach().double().sum(),
                (chosen > rejected).double().sum(),
                (chosen - rejected).sum(),
                chosen.sum(),
                rejected.sum(),
                (chosen.square().sum() + rejected.square().sum()),
                objectives.detach().double().sum(),
            ]
        )


def metrics_from_sums(sums: torch.Tensor) -> dict[str, float]:
    """Means from pair_sums (possibly summed over micro-batches and ranks).

    loss: mean plain BT loss -log sigmoid(margin); objective: mean of the configured objective (what
    is optimised); accuracy: share of pairs with r_chosen > r_rejected (ties count as wrong); margin:
    mean r_chosen - r_rejected; chosen/rejected_reward: mean rewards; reward_std: population std of
    all 2N rewards. Non-finite rewards give NaN/inf values (btrm.reporting.json_line writes them as
    null); zero pairs raise ValueError, since no mean exists (the caller decides whether to log
    nothing or stop).
    """
    if sums.numel() != len(SUM_FIELDS):
        raise ValueError(
            f"expected a vector of {len(SUM_FIELDS)} sums ({', '.join(SUM_FIELDS)}); got shape {tuple(sums.shape)}"
        )
    s = dict(zip(SUM_FIELDS, sums.tolist(), strict=True))
    n = s["pairs"]
    if n == 0:
        raise ValueError("no pairs: metrics are undefined (empty batch or validation set)")
    mean_reward = (s["chosen_reward"] + s["rejected_reward"]) / (2 * n)
    variance = s["reward_sq"] / (2 * n) - mean_reward**2
    # E[x^2] - E[x]^2 can round to a tiny negative number; NaN (non-finite rewards) stays NaN.
    variance = max(variance, 0.0) if math.isfinite(variance) else variance
    return {
        "loss": s["loss"] / n,
        "objective": s["objective"] / n,
        "accuracy": s["correct"] / n,
        "margin": s["margin"] / n,
        "chosen_reward": s["chosen_reward"] / n,
        "rejected_reward": s["rejected_reward"] / n,
        "reward_std": math.sqrt(variance) if variance >= 0 else variance,
    }


def grouped_sums(
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    members: Sequence[Sequence[int]],
    num_groups: int,
) -> torch.Tensor:
    """Per-group additive statistics: fp64 vector of num_groups * len(STRENGTH_SUM_FIELDS).

    members[i] lists the groups pair i belongs to (any number, none included); entry
    g * len(STRENGTH_SUM_FIELDS) + j holds field j summed over the pairs in group g. The length
    depends only on num_groups, so every rank all-reduces the same shape whatever pairs it holds.
    Losses are the plain BT loss (comparable across objectives).
    """
    import torch

    with torch.no_grad():
        losses = pair_losses(chosen_rewards, rejected_rewards).double()
        per_pair = torch.stack(
            [torch.ones_like(losses), losses, (chosen_rewards.detach() > rejected_rewards.detach()).double()], dim=1
        )
        pairs = [i for i, groups in enumerate(members) for _ in groups]
        groups = [g for pair_groups in members for g in pair_groups]
        sums = torch.zeros(num_groups, len(STRENGTH_SUM_FIELDS), dtype=torch.float64, device=losses.device)
        if groups:
            index = torch.tensor(groups, dtype=torch.long, device=losses.device)
            sums.index_add_(0, index, per_pair[torch.tensor(pairs, dtype=torch.long, device=losses.device)])
        return sums.flatten()


def grouped_metrics_from_sums(sums: torch.Tensor, labels: Sequence[str]) -> dict[str, float]:
    """{"accuracy_<label>", "loss_<label>", "pairs_<label>", ...} from (summed) grouped_sums.

    A group with no pairs is left out (no key), rather than logged as NaN.
    """
    width = len(STRENGTH_SUM_FIELDS)
    if sums.dim() != 1 or sums.numel() != len(labels) * width:
        raise ValueError(
            f"expected a vector of {len(labels)} groups x {width} sums ({', '.join(STRENGTH_SUM_FIELDS)}); "
            f"got shape {tuple(sums.shape)}"
        )
    metrics: dict[str, float] = {}
    for label, row in zip(labels, sums.view(-1, width).tolist(), strict=True):
        values = dict(zip(STRENGTH_SUM_FIELDS, row, strict=True))
        if values["pairs"] == 0:
            continue
        metrics[f"accuracy_{label}"] = values["correct"] / values["pairs"]
        metrics[f"loss_{label}"] = values["loss"] / values["pairs"]
        metrics[f"pairs_{label}"] = values["pairs"]
    return metrics


def strength_sums(
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    strengths: torch.Tensor | Sequence[Any],
    max_strength: int = MAX_STRENGTH,
) -> torch.Tensor:
    """Per-|strength| additive statistics: grouped_sums with group k - 1 holding the pairs with |s| = k."""
    magnitudes = strength_magnitudes(strengths, len(chosen_rewards), max_strength, chosen_rewards.device)
    return grouped_sums(chosen_rewards, rejected_rewards, [[m - 1] for m in magnitudes.tolist()], max_strength)


def strength_metrics_from_sums(sums: torch.Tensor) -> dict[str, float]:
    """{"accuracy_s1", "loss_s1", "pairs_s1", "accuracy_s2", ...} from (summed) strength_sums.

    A strength with no pairs is left out (no key), rather than logged as NaN.
    """
    width = len(STRENGTH_SUM_FIELDS)
    if sums.dim() != 1 or sums.numel() == 0 or sums.numel() % width:
        raise ValueError(
            f"expected a vector of max_strength x {width} sums ({', '.join(STRENGTH_SUM_FIELDS)}); got shape {tuple(sums.shape)}"
        )
    return grouped_metrics_from_sums(sums, [f"s{k}" for k in range(1, sums.numel() // width + 1)])


# ----------------------------------------------------------------------------- reward normalization


@dataclass(frozen=True)
class RewardStats:
    """Mean and population std (ddof=0) of rewards over a set of conversations.

    Apply with normalize_rewards: (reward - mean) / std, giving rewards with mean 0 and std 1 over
    that set. Stored as JSON via to_dict() / read back with from_dict().
    """

    mean: float
    std: float
    count: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "mean": self.mean,
            "std": self.std,
            "count": self.count,
            "std_ddof": 0,
            "apply": "normalized_reward = (reward - mean) / std",
        }

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> RewardStats:
        try:
            return cls(float(values["mean"]), float(values["std"]), int(values["count"]))
        except (KeyError, TypeError, ValueError):
            raise ValueError(
                f"reward normalization stats need numeric 'mean', 'std' and 'count'; got {dict(values)!r}"
            ) from None


def reward_stats_from_sums(sums: torch.Tensor) -> RewardStats:
    """RewardStats over all 2N rewards (chosen and rejected) counted in a pair_sums vector.

    The vector may be summed over micro-batches and all-reduced over ranks first: the stats are then
    those of every conversation scored, each once. fp64 sums keep E[x^2] - E[x]^2 accurate unless
    the std is below about 1e-6 of the mean's magnitude.
    """
    metrics = metrics_from_sums(sums)
    s = dict(zip(SUM_FIELDS, sums.tolist(), strict=True))
    mean = (s["chosen_reward"] + s["rejected_reward"]) / (2 * s["pairs"])
    if not (math.isfinite(mean) and math.isfinite(metrics["reward_std"])):
        raise ValueError(f"rewards are not finite (mean {mean}, std {metrics['reward_std']}): no normalization stats")
    return RewardStats(mean=mean, std=metrics["reward_std"], count=int(2 * s["pairs"]))


def normalize_rewards(rewards: torch.Tensor | float, stats: RewardStats) -> torch.Tensor | float:
    """(rewards - mean) / std; a tensor keeps its dtype."""
    if not (math.isfinite(stats.std) and stats.std > 0):
        raise ValueError(
            f"reward std is {stats.std}: all rewards were equal when the stats were taken; cannot normalize"
        )
    return (rewards - stats.mean) / stats.std

"""Training curves from a metrics history: reading it, smoothing, and drawing the figure (plot_curves.py is its command).

The history holds one JSON object a line, `{"step": N, "data": {"train/loss": ..., ...}}`: the
trainer's history file (trainer.history_file) or verl's "file" logger output. Values that are null
or not finite (a diverged step) are skipped.

Each panel shows the per-step train values faintly, their smoothed line on top (an exponential
moving average, debiased as TensorBoard does: see ema_smooth), validation points, and, when the
validation data has preference strengths, one dashed line per |preference_strength|
(val/accuracy_s1, val/loss_s1, ...). Group panels (data.group_columns): see plot_curves.py.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

from btrm.atomic import atomic_outputs

PANELS = (("loss", "BT loss  -log sigmoid(r_chosen - r_rejected)"), ("accuracy", "accuracy (r_chosen > r_rejected)"))
DEFAULT_SMOOTHING = 0.9  # per-step BT metrics of one batch are noisy; 0.9 averages roughly the last 10 steps
STRENGTH_METRIC = re.compile(r"^val/(?P<name>loss|accuracy)_s(?P<strength>\d+)$")
GROUP_ACCURACY_PREFIX, GROUP_PAIRS_PREFIX = "val/accuracy_", "val/pairs_"
LEGEND_GROUPS = 12  # trainer.yaml's max_groups_per_column: more entries would hide the lines

History = dict[str, list[tuple[int, float]]]


def read_history(path: Path) -> History:
    """{metric: [(step, value), ...]} sorted by step; a later line for the same step and metric wins.

    Null, NaN and infinite values are skipped (a point that cannot be drawn), as are non-numbers.
    """
    by_metric: dict[str, dict[int, float]] = {}
    with open(path, encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                step, data = int(record["step"]), record["data"]
                items = data.items()
            except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError):
                raise ValueError(f'{path} line {number}: expected {{"step": int, "data": {{...}}}}') from None
            for key, value in items:
                # bool is an int subclass; NaN/Infinity are what Python's json writes for non-finite floats.
                if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                    by_metric.setdefault(key, {})[step] = float(value)
    return {key: sorted(points.items()) for key, points in by_metric.items()}


def ema_smooth(values: Sequence[float], weight: float = DEFAULT_SMOOTHING) -> list[float]:
    """Debiased exponential moving average (TensorBoard's scalar smoothing).

    s_t = weight * s_{t-1} + (1 - weight) * x_t with s_0 = 0, reported as s_t / (1 - weight^t): the
    weighted mean of x_1..x_t with weights weight^(t - i), so the first points are not pulled towards
    0 and the first output equals the first value. weight 0 returns the values unchanged. The average
    runs over logged points, not steps (the train metrics are logged every step).
    """
    if not 0 <= weight < 1:
        raise ValueError(f"smoothing weight must be in [0, 1); got {weight}")
    smoothed, running = [], 0.0
    for t, value in enumerate(values, start=1):
        running = weight * running + (1 - weight) * value
        smoothed.append(running / (1 - weight**t))
    return smoothed


def strength_series(history: History, name: str) -> list[tuple[int, list[tuple[int, float]]]]:
    """[(|strength|, points), ...] of val/<name>_s<k>, sorted by strength."""
    found = []
    for key, points in history.items():
        match = STRENGTH_METRIC.match(key)
        if match and match["name"] == name and points:
            found.append((int(match["strength"]), points))
    return sorted(found)


class GroupSeries(NamedTuple):
    value: str  # the metric label's part after "<column>_" (the trainer's group_label of the value)
    points: list[tuple[int, float]]  # (step, validation accuracy)
    pairs: int | None  # val/pairs_<column>_<value> at its last step (the validation set does not change)


def group_series(history: History, columns: Sequence[str]) -> dict[str, list[GroupSeries]]:
    """{column: its values' accuracy series, largest group first} for the columns with metrics, in `columns` order.

    A key val/accuracy_<label> belongs to the longest column that <label> starts with followed by
    '_' (with columns `task` and `task_type`, `task_type_qa` is task_type's value qa).
    """
    longest_first = sorted(set(columns), key=len, reverse=True)
    found: dict[str, list[GroupSeries]] = {}
    for key, points in history.items():
        label = key.removeprefix(GROUP_ACCURACY_PREFIX)
        if label == key or not points:
            continue
        column = next((c for c in longest_first if label.startswith(f"{c}_")), None)
        if column is None:
            continue
        pairs = history.get(GROUP_PAIRS_PREFIX + label)
        value = label[len(column) + 1 :]
        found.setdefault(column, []).append(GroupSeries(value, points, round(pairs[-1][1]) if pairs else None))
    return {
        column: sorted(found[column], key=lambda series: (-(series.pairs or 0), series.value))
        for column in dict.fromkeys(columns)
        if column in found
    }


def figure_axes(figure, group_panels: int) -> tuple[list, list]:
    """(loss and accuracy axes, group axes): the group panels, if any, fill a second row."""
    if not group_panels:
        return list(figure.subplots(1, 2)), []
    width = math.lcm(2, group_panels)  # grid columns that both rows divide evenly
    grid = figure.add_gridspec(2, width)
    top = [figure.add_subplot(grid[0, k * width // 2 : (k + 1) * width // 2]) for k in range(2)]
    step = width // group_panels
    return top, [figure.add_subplot(grid[1, k * step : (k + 1) * step]) for k in range(group_panels)]


def draw_metric_panel(axis, history: History, name: str, label: str, smoothing: float) -> None:
    """Train (raw and smoothed), validation and per-strength lines of one metric (loss or accuracy)."""
    train = history.get(f"train/{name}")
    if train:
        steps, values = zip(*train, strict=True)
        if smoothing > 0 and len(values) > 1:
            axis.plot(steps, values, color="C0", alpha=0.25, linewidth=0.8, label="train (per step)")
            axis.plot(
                steps, ema_smooth(values, smoothing), color="C0", linewidth=1.8, label=f"train (EMA {smoothing:g})"
            )
        else:
            axis.plot(steps, values, color="C0", linewidth=1.2, label="train")
    val = history.get(f"val/{name}")
    if val:
        steps, values = zip(*val, strict=True)
        axis.plot(steps, values, color="C1", marker="o", linewidth=2, label="val")
    for index, (strength, points) in enumerate(strength_series(history, name)):
        steps, values = zip(*points, strict=True)
        axis.plot(
            steps,
            values,
            color=f"C{2 + index % 8}",
            marker=".",
            linestyle="--",
            linewidth=1,
            label=f"val |strength|={strength}",
        )
    axis.set_xlabel("step")
    axis.set_ylabel(label)
    axis.grid(alpha=0.3)
    if axis.lines:
        axis.legend(fontsize="small")


def draw_group_panel(axis, column: str, series: list[GroupSeries]) -> None:
    """One line per value of `column`; the legend names the LEGEND_GROUPS largest with their pair counts."""
    for index, group in enumerate(series):
        steps, values = zip(*group.points, strict=True)
        axis.plot(
            steps,
            values,
            color=f"C{index % 10}",
            linestyle="-" if index < 10 else ":",  # the colour cycle has 10 colours
            marker="o",
            markersize=3,
            linewidth=1.2,
            label=group.value if group.pairs is None else f"{group.value} (n={group.pairs})",
        )
    axis.set_title(f"validation accuracy by {column}", fontsize="medium")
    axis.set_xlabel("step")
    axis.set_ylabel("accuracy")
    axis.grid(alpha=0.3)
    more = len(series) > LEGEND_GROUPS
    axis.legend(
        handles=axis.lines[:LEGEND_GROUPS],
        fontsize="x-small",
        title=f"largest {LEGEND_GROUPS} of {len(series)}" if more else None,
        title_fontsize="x-small",
    )


def build_figure(
    history: History, title: str = "", smoothing: float = DEFAULT_SMOOTHING, group_columns: Sequence[str] = ()
):
    """A matplotlib Figure: loss and accuracy panels, then one panel per group column with metrics
    (see the module docstring for the lines)."""
    # Figure without pyplot: no global backend switch or figure registry in the calling process.
    from matplotlib.figure import Figure

    if not any(f"{split}/{name}" in history for split in ("train", "val") for name, _ in PANELS):
        raise ValueError("no train/ or val/ loss or accuracy in the metrics")
    ema_smooth([], smoothing)  # validate the weight before drawing anything
    groups = group_series(history, group_columns)
    figure = Figure(figsize=(max(11, 4.5 * len(groups)), 8.4) if groups else (11, 4.2))
    metric_axes, group_axes = figure_axes(figure, len(groups))
    for axis, (name, label) in zip(metric_axes, PANELS, strict=True):
        draw_metric_panel(axis, history, name, label, smoothing)
    for axis, (column, series) in zip(group_axes, groups.items(), strict=True):
        draw_group_panel(axis, column, series)
    figure.suptitle(title or "Bradley-Terry reward model training")
    figure.tight_layout()
    return figure


def plot_curves(
    history: History,
    output: Path,
    title: str = "",
    smoothing: float = DEFAULT_SMOOTHING,
    group_columns: Sequence[str] = (),
) -> Path:
    """build_figure written as a PNG atomically (atomic.atomic_outputs), replacing `output`."""
    figure = build_figure(history, title, smoothing, group_columns)
    output = Path(output)
    with atomic_outputs([output]) as (temp,):
        figure.savefig(temp, format="png", dpi=100)  # the temp name ends in .tmp: say the format
    return output

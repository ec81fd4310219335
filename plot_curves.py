#!/usr/bin/env python3
"""Plot train/val loss and accuracy against step from a metrics file.

    python plot_curves.py checkpoints/demo/metrics.jsonl                 # -> checkpoints/demo/metrics_curves.png
    python plot_curves.py METRICS.jsonl --output curves.png --smoothing 0.6
    python plot_curves.py METRICS.jsonl --group-columns domain task_type   # which val/accuracy_<label> are groups

The file holds one JSON object a line, `{"step": N, "data": {"train/loss": ..., ...}}`: the
trainer's history file (trainer.history_file) or verl's "file" logger output. Values that are null
or not finite (a diverged step) are skipped.

Each panel shows the per-step train values faintly, their smoothed line on top (an exponential
moving average, debiased as TensorBoard does: see ema_smooth), validation points, and, when the
validation data has preference strengths, one dashed line per |preference_strength|
(val/accuracy_s1, val/loss_s1, ...).

When the validation data has group columns (trainer.yaml data.group_columns, e.g. domain, language,
subset), a second row holds one panel per column that has metrics, in group_columns order: the
validation accuracy of each of the column's values against step (val/accuracy_<column>_<value>),
labelled with its pair count (val/pairs_<column>_<value>), largest group first; the legend lists at
most LEGEND_GROUPS of them. A metric name does not say where the column ends and the value begins
(both may contain '_'), so the columns are given: --group-columns, by default trainer.yaml's
data.group_columns; a key is read as the longest given column it starts with. The per-strength keys
(`_s<digits>`) are never read as groups.

The default output sits next to the metrics file as `<metrics stem>_curves.png`, so the PNG the
trainer wrote at the end of the run (training_curves.png) is left alone. An existing file is never
replaced unless --force is given or --output names it explicitly.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
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


def default_output(metrics: Path) -> Path:
    """`<metrics stem>_curves.png` beside the metrics file (not the trainer's training_curves.png)."""
    return metrics.with_name(f"{metrics.stem}_curves.png")


def default_group_columns() -> list[str]:
    """trainer.yaml's data.group_columns (the trainer.yaml beside this script, read by btrm.schema)."""
    from btrm import schema

    return list(schema.trainer_yaml_knobs()["data.group_columns"])


def smoothing_weight(text: str) -> float:
    value = float(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1) (0 = no smoothing); got {text}")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("metrics", type=Path, help="metrics .jsonl file")
    parser.add_argument(
        "--output",
        type=Path,
        default=None,
        help="PNG path, replaced if it exists (default: <metrics stem>_curves.png beside the metrics file)",
    )
    parser.add_argument("--force", action="store_true", help="replace the default output if it exists")
    parser.add_argument(
        "--smoothing",
        type=smoothing_weight,
        default=DEFAULT_SMOOTHING,
        help="EMA weight for the train lines, in [0, 1); 0 = raw only (default: %(default)s)",
    )
    parser.add_argument("--title", default="")
    parser.add_argument(
        "--group-columns",
        nargs="*",
        metavar="COL",
        default=default_group_columns(),
        help="the validation data's group columns, for the val/accuracy_<column>_<value> panels; none: no such "
        "panels (default: trainer.yaml's data.group_columns: %(default)s)",
    )
    args = parser.parse_args(argv)
    output = args.output or default_output(args.metrics)
    if args.output is None and output.exists() and not args.force:
        print(f"error: {output} exists; pass --force to replace it or --output to write elsewhere", file=sys.stderr)
        return 1
    try:
        history = read_history(args.metrics)
        written = plot_curves(history, output, args.title, args.smoothing, args.group_columns)
    except (OSError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"wrote {written}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

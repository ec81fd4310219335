#!/usr/bin/env python3
"""Plot train/val loss and accuracy against step from a metrics file.

    python plot_curves.py checkpoints/demo/metrics.jsonl [--output curves.png]

The file holds one JSON object a line, `{"step": N, "data": {"train/loss": ..., ...}}`: the
trainer's history file (trainer.history_file) or verl's "file" logger output.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

PANELS = (("loss", "BT loss"), ("accuracy", "accuracy (r_chosen > r_rejected)"))


def read_history(path: Path) -> dict[str, list[tuple[int, float]]]:
    """{metric: [(step, value), ...]} sorted by step; a later line for the same step and metric wins."""
    by_metric: dict[str, dict[int, float]] = {}
    with open(path, encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                step, data = int(record["step"]), record["data"]
            except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                raise ValueError(f"{path} line {number}: expected {{\"step\": int, \"data\": {{...}}}}") from None
            for key, value in data.items():
                if isinstance(value, (int, float)):
                    by_metric.setdefault(key, {})[step] = float(value)
    return {key: sorted(points.items()) for key, points in by_metric.items()}


def plot_curves(history: dict[str, list[tuple[int, float]]], output: Path, title: str = "") -> Path:
    """Two panels (loss, accuracy), train and val lines; written to a temp file and renamed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not any(f"{split}/{name}" in history for split in ("train", "val") for name, _ in PANELS):
        raise ValueError("no train/ or val/ loss or accuracy in the metrics")
    figure, axes = plt.subplots(1, 2, figsize=(11, 4))
    for axis, (name, label) in zip(axes, PANELS):
        for split, style in (("train", dict(alpha=0.6, linewidth=1)), ("val", dict(marker="o", linewidth=2))):
            points = history.get(f"{split}/{name}")
            if points:
                steps, values = zip(*points)
                axis.plot(steps, values, label=split, **style)
        axis.set_xlabel("step")
        axis.set_ylabel(label)
        axis.grid(alpha=0.3)
        axis.legend()
    figure.suptitle(title or "Bradley-Terry reward model training")
    figure.tight_layout()
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    handle, temp = tempfile.mkstemp(prefix=f".{output.name}.", suffix=".png", dir=output.parent)
    os.close(handle)
    try:
        figure.savefig(temp, dpi=100)
        os.replace(temp, output)
    finally:
        plt.close(figure)
        Path(temp).unlink(missing_ok=True)
    return output


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("metrics", type=Path, help="metrics .jsonl file")
    parser.add_argument("--output", type=Path, default=None, help="PNG path (default: next to the metrics file, training_curves.png)")
    parser.add_argument("--title", default="")
    args = parser.parse_args(argv)
    output = args.output or args.metrics.with_name("training_curves.png")
    print(f"wrote {plot_curves(read_history(args.metrics), output, args.title)}")


if __name__ == "__main__":
    main()

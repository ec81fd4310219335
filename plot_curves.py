#!/usr/bin/env python3
"""Plot train/val loss and accuracy against step from a metrics file.

    python plot_curves.py checkpoints/demo/metrics.jsonl                 # -> checkpoints/demo/metrics_curves.png
    python plot_curves.py METRICS.jsonl --output curves.png --smoothing 0.6
    python plot_curves.py METRICS.jsonl --group-columns domain task_type   # which val/accuracy_<label> are groups

What the figure shows, and the file it reads: btrm/curves.py, which draws it.

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
import sys
from pathlib import Path

from btrm.curves import (  # noqa: F401  the drawing lives in the package; tests and scripts read these names here
    DEFAULT_SMOOTHING,
    LEGEND_GROUPS,
    build_figure,
    ema_smooth,
    group_series,
    plot_curves,
    read_history,
)


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

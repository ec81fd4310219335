"""plot_curves.py: smoothing against hand numbers, history reading, per-strength lines, CLI output rules."""

import json
import os
import stat

import pytest

import plot_curves
from btrm import curves

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def write_metrics(path, records):
    path.write_text("".join(json.dumps({"step": step, "data": data}) + "\n" for step, data in records))
    return path


def demo_records():
    records = [
        (s, {"train/loss": 0.7 - 0.02 * s + (0.05 if s % 2 else -0.05), "train/accuracy": 0.5 + 0.02 * s})
        for s in range(1, 13)
    ]
    for s in (4, 8, 12):
        records.append(
            (
                s,
                {
                    "val/loss": 0.7 - 0.02 * s,
                    "val/accuracy": 0.5 + 0.02 * s,
                    "val/accuracy_s1": 0.5 + 0.01 * s,
                    "val/loss_s1": 0.69,
                    "val/accuracy_s3": 0.6 + 0.02 * s,
                    "val/loss_s3": 0.6,
                },
            )
        )
    return records


def test_ema_smooth_matches_hand_computation():
    # weight 0.5 over 1, 2, 3: weighted means with weights 0.5^(t - i), i.e.
    #   t=1: 1;  t=2: (0.5*1 + 2) / 1.5 = 5/3;  t=3: (0.25*1 + 0.5*2 + 3) / 1.75 = 17/7
    assert plot_curves.ema_smooth([1.0, 2.0, 3.0], 0.5) == pytest.approx([1.0, 5 / 3, 17 / 7])
    assert plot_curves.ema_smooth([4.0, -1.0], 0.0) == [4.0, -1.0]  # weight 0: no smoothing
    assert plot_curves.ema_smooth([0.3] * 50, 0.99) == pytest.approx([0.3] * 50)  # debiased: a constant stays put
    assert plot_curves.ema_smooth([], 0.9) == []
    for bad in (1.0, -0.1):
        with pytest.raises(ValueError, match=r"in \[0, 1\)"):
            plot_curves.ema_smooth([1.0], bad)


def test_read_history_skips_null_and_non_finite_values(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text(
        '{"step": 1, "data": {"train/loss": 0.7, "train/accuracy": null, "train/grad_norm": NaN, "flag": true, "note": "x"}}\n'
        '{"step": 2, "data": {"train/loss": Infinity, "train/accuracy": 0.6}}\n'
        "\n"
        '{"step": 1, "data": {"train/loss": 0.65}}\n'  # a later line for the same step wins (a resumed run)
    )
    history = plot_curves.read_history(path)
    assert history == {"train/loss": [(1, 0.65)], "train/accuracy": [(2, 0.6)]}
    path.write_text('{"step": 1}\n')
    with pytest.raises(ValueError, match=r"m.jsonl line 1"):
        plot_curves.read_history(path)
    path.write_text('{"step": 1, "data": [1, 2]}\n')
    with pytest.raises(ValueError, match=r"m.jsonl line 1"):
        plot_curves.read_history(path)


def test_figure_has_smoothed_train_raw_train_val_and_per_strength_lines(tmp_path):
    history = plot_curves.read_history(write_metrics(tmp_path / "m.jsonl", demo_records()))
    figure = plot_curves.build_figure(history, smoothing=0.5)
    loss_axis, accuracy_axis = figure.axes
    for axis in (loss_axis, accuracy_axis):
        labels = [line.get_label() for line in axis.lines]
        assert labels == ["train (per step)", "train (EMA 0.5)", "val", "val |strength|=1", "val |strength|=3"]
    raw, smoothed = loss_axis.lines[0], loss_axis.lines[1]
    raw_values = [value for _, value in history["train/loss"]]
    assert list(raw.get_ydata()) == raw_values
    assert raw.get_alpha() < 0.5 and smoothed.get_alpha() is None  # raw faint, smoothed opaque on top
    # The smoothed line is the hand recurrence s_t = 0.5 s_{t-1} + 0.5 x_t, divided by 1 - 0.5^t.
    running, expected = 0.0, []
    for t, value in enumerate(raw_values, start=1):
        running = 0.5 * running + 0.5 * value
        expected.append(running / (1 - 0.5**t))
    assert list(smoothed.get_ydata()) == pytest.approx(expected)
    assert list(accuracy_axis.lines[4].get_ydata()) == pytest.approx(
        [0.68, 0.76, 0.84]
    )  # val/accuracy_s3 at steps 4, 8, 12
    assert [line.get_label() for line in plot_curves.build_figure(history, smoothing=0).axes[0].lines][0] == "train"


def test_cli_writes_beside_metrics_and_never_replaces_the_runs_png(tmp_path):
    metrics = write_metrics(tmp_path / "metrics.jsonl", demo_records())
    runs_png = tmp_path / "training_curves.png"
    runs_png.write_bytes(b"the trainer's own PNG")
    old_umask = os.umask(0o022)
    try:
        assert plot_curves.main([str(metrics)]) == 0
    finally:
        os.umask(old_umask)
    output = tmp_path / "metrics_curves.png"
    assert output.read_bytes()[:8] == PNG_SIGNATURE
    assert stat.S_IMODE(output.stat().st_mode) == 0o644  # the umask's mode, not mkstemp's 0600
    assert runs_png.read_bytes() == b"the trainer's own PNG"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp file left

    # Run again: the existing output is kept unless --force.
    output.write_bytes(b"earlier plot")
    assert plot_curves.main([str(metrics)]) == 1
    assert output.read_bytes() == b"earlier plot"
    assert plot_curves.main([str(metrics), "--force", "--smoothing", "0"]) == 0
    assert output.read_bytes()[:8] == PNG_SIGNATURE

    # A metrics file whose default name would be the run's PNG is refused too.
    training = write_metrics(tmp_path / "training.jsonl", demo_records())
    assert plot_curves.main([str(training)]) == 1
    assert runs_png.read_bytes() == b"the trainer's own PNG"
    # Naming it with --output is an explicit request to replace it.
    assert plot_curves.main([str(metrics), "--output", str(runs_png)]) == 0
    assert runs_png.read_bytes()[:8] == PNG_SIGNATURE


def test_cli_reports_bad_input_without_writing(tmp_path, capsys):
    empty = write_metrics(tmp_path / "empty.jsonl", [(1, {"train/lr": 0.1})])
    assert plot_curves.main([str(empty)]) == 1
    assert "no train/ or val/ loss or accuracy" in capsys.readouterr().err
    assert plot_curves.main([str(tmp_path / "missing.jsonl")]) == 1
    assert not list(tmp_path.glob("*.png"))
    with pytest.raises(SystemExit):
        plot_curves.main([str(empty), "--smoothing", "1.5"])


def grouped_records():
    """demo_records plus group metrics at the validation steps: column `domain` (code 120 pairs,
    chat 40), column `task_type` (a name with '_'; qa 30) and column `task` (a prefix of it; chat 20)."""
    records = demo_records()
    accuracies = {"domain_code": 0.6, "domain_chat": 0.55, "task_type_qa": 0.7, "task_chat": 0.4}
    pairs = {"domain_code": 120, "domain_chat": 40, "task_type_qa": 30, "task_chat": 20}
    for s in (4, 8, 12):
        data = {f"val/accuracy_{label}": accuracy + 0.01 * s for label, accuracy in accuracies.items()}
        data |= {f"val/loss_{label}": 0.6 for label in accuracies}
        data |= {f"val/pairs_{label}": float(n) for label, n in pairs.items()}
        records.append((s, data))
    return records


def test_group_panels_have_one_line_per_value_with_its_pair_count(tmp_path):
    history = plot_curves.read_history(write_metrics(tmp_path / "m.jsonl", grouped_records()))
    figure = plot_curves.build_figure(history, smoothing=0.5, group_columns=["domain", "language", "task", "task_type"])
    # loss, accuracy, then the columns with metrics in group_columns order (language has none: no panel)
    loss_axis, accuracy_axis, domain_axis, task_axis, task_type_axis = figure.axes
    assert [axis.get_title() for axis in (domain_axis, task_axis, task_type_axis)] == [
        "validation accuracy by domain",
        "validation accuracy by task",
        "validation accuracy by task_type",
    ]
    assert [line.get_label() for line in domain_axis.lines] == ["code (n=120)", "chat (n=40)"]  # largest first
    assert [line.get_label() for line in task_axis.lines] == ["chat (n=20)"]
    assert [line.get_label() for line in task_type_axis.lines] == ["qa (n=30)"]
    assert list(domain_axis.lines[0].get_xdata()) == [4, 8, 12]
    assert list(domain_axis.lines[0].get_ydata()) == pytest.approx([0.64, 0.68, 0.72])  # 0.6 + 0.01 * step
    assert list(domain_axis.lines[1].get_ydata()) == pytest.approx([0.59, 0.63, 0.67])
    assert list(task_type_axis.lines[0].get_ydata()) == pytest.approx([0.74, 0.78, 0.82])
    assert list(task_axis.lines[0].get_ydata()) == pytest.approx([0.44, 0.48, 0.52])
    # the group panels sit below the two metric panels
    assert max(axis.get_position().y0 for axis in figure.axes[2:]) < min(
        axis.get_position().y0 for axis in figure.axes[:2]
    )
    # the per-strength lines stay in the accuracy panel, and only there
    assert [line.get_label() for line in accuracy_axis.lines][3:] == ["val |strength|=1", "val |strength|=3"]


def test_strength_keys_and_unknown_columns_are_not_groups(tmp_path):
    history = plot_curves.read_history(write_metrics(tmp_path / "m.jsonl", grouped_records()))
    assert len(plot_curves.build_figure(history).axes) == 2  # no group columns given: no group panels
    assert len(plot_curves.build_figure(history, group_columns=["language"]).axes) == 2
    # val/accuracy_s1 and val/accuracy_s3 are strengths: a column "s" would need keys val/accuracy_s_<value>
    assert plot_curves.group_series(history, ["s", "domain"]).keys() == {"domain"}
    series = plot_curves.group_series(history, ["task"])  # without task_type, its key reads as task's "type_qa"
    assert [(group.value, group.pairs) for group in series["task"]] == [("type_qa", 30), ("chat", 20)]


def test_a_group_legend_lists_at_most_legend_groups_entries(tmp_path):
    values = [f"v{k:02d}" for k in range(plot_curves.LEGEND_GROUPS + 3)]
    records = demo_records() + [
        (
            s,
            {f"val/accuracy_language_{v}": 0.5 for v in values}
            | {f"val/pairs_language_{v}": 100.0 - k for k, v in enumerate(values)},
        )
        for s in (4, 8)
    ]
    history = plot_curves.read_history(write_metrics(tmp_path / "m.jsonl", records))
    language_axis = plot_curves.build_figure(history, group_columns=["language"]).axes[2]
    assert len(language_axis.lines) == len(values)  # every value is drawn
    legend = language_axis.get_legend()
    assert [text.get_text() for text in legend.get_texts()] == [f"{v} (n={100 - k})" for k, v in enumerate(values)][
        : plot_curves.LEGEND_GROUPS
    ]
    assert legend.get_title().get_text() == f"largest {plot_curves.LEGEND_GROUPS} of {len(values)}"


def test_cli_group_columns_default_to_trainer_yaml(tmp_path, monkeypatch):
    metrics = write_metrics(tmp_path / "metrics.jsonl", grouped_records())
    drawn = []
    real = plot_curves.build_figure
    monkeypatch.setattr(curves, "build_figure", lambda *args: drawn.append(args[3]) or real(*args))
    assert plot_curves.main([str(metrics), "--output", str(tmp_path / "a.png")]) == 0
    assert plot_curves.main([str(metrics), "--output", str(tmp_path / "b.png"), "--group-columns", "task_type"]) == 0
    assert plot_curves.main([str(metrics), "--output", str(tmp_path / "c.png"), "--group-columns"]) == 0
    from omegaconf import OmegaConf

    trainer_yaml = OmegaConf.load(plot_curves.Path(plot_curves.__file__).with_name("trainer.yaml"))
    assert drawn == [list(trainer_yaml.data.group_columns), ["task_type"], []]
    assert drawn[0] == ["domain", "language", "subset"]  # as trainer.yaml has it today
    assert (tmp_path / "a.png").read_bytes()[:8] == PNG_SIGNATURE

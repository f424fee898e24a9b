"""Result figures: the data drawn is the data given, and PNGs come out."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cifar3study import figures
from cifar3study.evaluation import ModelMetrics
from cifar3study.history import EpochRecord


def test_learning_curves_draw_each_series() -> None:
    rows = [EpochRecord(e, 1.0 / e, 0.3 + e / 10, 1.1 / e, 0.35 + e / 10, 1.0) for e in (1, 2, 3)]
    fig = figures.learning_curves(rows, "cnn")
    loss_ax, acc_ax = fig.axes
    assert [list(line.get_ydata()) for line in loss_ax.lines] == [[r.train_loss for r in rows], [r.val_loss for r in rows]]
    assert list(acc_ax.lines[1].get_ydata()) == [r.val_acc for r in rows]
    assert acc_ax.get_title() == "cnn: accuracy"


def test_confusion_rows_are_actual_columns_predicted() -> None:
    matrix = np.array([[3, 0, 0], [0, 2, 1], [2, 0, 1]])
    ax = figures.confusion(matrix, ("a", "b", "c"), "t").axes[0]
    assert ax.get_xlabel() == "predicted" and ax.get_ylabel() == "actual"
    cell = {(round(t.get_position()[1]), round(t.get_position()[0])): t.get_text() for t in ax.texts}
    assert cell[(2, 0)] == "2" and cell[(1, 2)] == "1"  # (row actual, column predicted)


def test_accuracy_vs_params_places_each_model_and_saves(tmp_path: Path) -> None:
    metrics = {"cnn": ModelMetrics(18_123, 0.93, 0.87, 0.06, 0.86, 1.5, 1e4),
               "fc": ModelMetrics(3_737_603, 1.0, 0.75, 0.25, 0.74, 2.5, 6e3)}
    fig = figures.accuracy_vs_params(metrics)
    points = [tuple(c.get_offsets()[0]) for c in fig.axes[0].collections]
    assert points == [(18_123, 0.87), (3_737_603, 0.75)]
    figures.save_png(fig, tmp_path / "x")
    assert (tmp_path / "x").read_bytes().startswith(b"\x89PNG")

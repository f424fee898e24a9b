"""Result figures: the data drawn is the data given, and PNGs come out."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cifar3study.reporting import figures
from cifar3study.reporting.evaluation import model_metrics
from cifar3study.training.history import EpochRecord


def rows(seed: int, offset: float) -> list[EpochRecord]:
    return [EpochRecord(seed, e, 1.0 / e + offset, 0.3 + e / 10, 1.1 / e, 0.35 + e / 10 + offset, 1.0) for e in (1, 2, 3)]


def test_learning_curves_draw_the_mean_over_seeds_with_a_band() -> None:
    history = rows(0, 0.0) + rows(1, 0.1)
    fig = figures.learning_curves(history, "cnn")
    loss_ax, acc_ax = fig.axes
    np.testing.assert_allclose(loss_ax.lines[0].get_ydata(), [1.05, 0.55, 1 / 3 + 0.05])
    np.testing.assert_allclose(acc_ax.lines[1].get_ydata(), [0.5, 0.6, 0.7])
    band = acc_ax.collections[1].get_paths()[0].vertices[:, 1]  # the validation band spans min to max
    assert band.min() == pytest.approx(0.45) and band.max() == pytest.approx(0.75)
    assert acc_ax.get_title() == "cnn: accuracy" and "2 seeds" in fig.get_suptitle()


def test_compared_curves_draw_one_line_per_model() -> None:
    fig = figures.compared_curves({"fc": rows(0, 0.0), "cnn": rows(0, 0.1)})
    assert [line.get_label() for line in fig.axes[0].lines] == ["fc", "cnn"]


def test_confusion_rows_are_actual_columns_predicted() -> None:
    matrix = np.array([[3, 0, 0], [0, 2, 1], [2, 0, 1]])
    ax = figures.confusion(matrix, ("a", "b", "c"), "t").axes[0]
    assert ax.get_xlabel() == "predicted" and ax.get_ylabel() == "actual"
    cell = {(round(t.get_position()[1]), round(t.get_position()[0])): t.get_text() for t in ax.texts}
    assert cell[(2, 0)] == "2" and cell[(1, 2)] == "1"  # (row actual, column predicted)


def test_accuracy_vs_params_draws_each_seed_and_the_mean_with_its_std(tmp_path: Path) -> None:
    speed = {"seconds_per_epoch": 1.0, "group_seconds_per_epoch": 3.0, "images_per_second": 1e4}
    def group(vals):
        return {k: {"train_acc": 1.0, "val_acc": v, "gap": 1 - v, "val_macro_f1": v} for k, v in enumerate(vals)}
    metrics = {"cnn": model_metrics(group([0.86, 0.87, 0.88]), 18_123, speed),
               "fc": model_metrics(group([0.75]), 3_737_603, speed)}
    ax = figures.accuracy_vs_params(metrics).axes[0]
    bars = ax.containers  # one errorbar per model: (mean point, caps, vertical bar)
    assert [tuple(b.lines[0].get_xydata()[0]) for b in bars] == [(18_123, pytest.approx(0.87)), (3_737_603, 0.75)]
    (low, high), = [seg[:, 1] for seg in bars[0].lines[2][0].get_segments()]
    assert (low, high) == (pytest.approx(0.86), pytest.approx(0.88))  # mean ± sample std 0.01
    dots = [c.get_offsets()[:, 1].tolist() for c in ax.collections if c not in bars[0].lines[2] + bars[1].lines[2]]
    assert pytest.approx([0.86, 0.87, 0.88]) in dots and [0.75] in dots
    figures.save_png(ax.figure, tmp_path / "x")
    assert (tmp_path / "x").read_bytes().startswith(b"\x89PNG")

"""Result figures: the data drawn is the data given, and PNGs come out."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cifar3study.reporting import figures
from cifar3study.reporting.evaluation import model_metrics
from cifar3study.training.history import EpochRecord

SPEED = {"seconds_per_epoch": 1.0, "group_seconds_per_epoch": 3.0, "images_per_second": 1e4}


def rows(seed: int, offset: float, split: str = "val") -> list[EpochRecord]:
    return [EpochRecord(seed, e, 1.0 / e + offset, 0.3 + e / 10, 1.1 / e, 0.35 + e / 10 + offset, 1.0, split)
            for e in (1, 2, 3)]


def group(vals: list[float], split: str = "val") -> dict[int, dict[str, float]]:
    return {k: {"train_acc": 1.0, f"{split}_acc": v, "gap": 1 - v, f"{split}_macro_f1": v} for k, v in enumerate(vals)}


def test_learning_curves_draw_the_mean_over_seeds_with_a_band() -> None:
    history = rows(0, 0.0) + rows(1, 0.1)
    fig = figures.learning_curves(history, "cnn")
    loss_ax, acc_ax = fig.axes
    np.testing.assert_allclose(loss_ax.lines[0].get_ydata(), [1.05, 0.55, 1 / 3 + 0.05])
    np.testing.assert_allclose(acc_ax.lines[1].get_ydata(), [0.5, 0.6, 0.7])
    band = acc_ax.collections[1].get_paths()[0].vertices[:, 1]  # the validation band spans min to max
    assert band.min() == pytest.approx(0.45) and band.max() == pytest.approx(0.75)
    assert acc_ax.get_title() == "cnn: accuracy" and "2 seeds" in fig.get_suptitle()
    assert [line.get_label() for line in loss_ax.lines + acc_ax.lines] == [
        "train", "validation", "train (running, during the epoch)", "validation"]


def test_learning_curves_of_a_holdout_run_label_the_holdout() -> None:
    loss_ax, acc_ax = figures.learning_curves(rows(0, 0.0, "holdout") + rows(1, 0.1, "holdout"), "cnn").axes
    assert [line.get_label() for line in loss_ax.lines + acc_ax.lines] == [
        "train", "holdout", "train (running, during the epoch)", "holdout"]
    np.testing.assert_allclose(acc_ax.lines[1].get_ydata(), [0.5, 0.6, 0.7])


def test_compared_curves_draw_one_line_per_model() -> None:
    fig = figures.compared_curves({"fc": rows(0, 0.0), "cnn": rows(0, 0.1)})
    assert [line.get_label() for line in fig.axes[0].lines] == ["fc", "cnn"]
    assert fig.axes[0].get_ylabel() == "validation accuracy" and fig.axes[0].get_title() == "validation accuracy"
    held = figures.compared_curves({"fc": rows(0, 0.0, "holdout"), "cnn": rows(0, 0.1, "holdout")}).axes[0]
    assert held.get_ylabel() == "holdout accuracy" and held.get_title() == "holdout accuracy"


def test_confusion_rows_are_actual_columns_predicted() -> None:
    matrix = np.array([[3, 0, 0], [0, 2, 1], [2, 0, 1]])
    ax = figures.confusion(matrix, ("a", "b", "c"), "t").axes[0]
    assert ax.get_xlabel() == "predicted" and ax.get_ylabel() == "actual"
    cell = {(round(t.get_position()[1]), round(t.get_position()[0])): t.get_text() for t in ax.texts}
    assert cell[(2, 0)] == "2" and cell[(1, 2)] == "1"  # (row actual, column predicted)


def test_accuracy_vs_params_draws_each_seed_and_the_mean_with_its_std(tmp_path: Path) -> None:
    metrics = {"cnn": model_metrics(group([0.86, 0.87, 0.88]), 18_123, SPEED),
               "fc": model_metrics(group([0.75]), 3_737_603, SPEED)}
    ax = figures.accuracy_vs_params(metrics).axes[0]
    assert ax.get_ylabel() == "validation accuracy"
    bars = ax.containers  # one errorbar per model: (mean point, caps, vertical bar)
    assert [tuple(b.lines[0].get_xydata()[0]) for b in bars] == [(18_123, pytest.approx(0.87)), (3_737_603, 0.75)]
    (low, high), = [seg[:, 1] for seg in bars[0].lines[2][0].get_segments()]
    assert (low, high) == (pytest.approx(0.86), pytest.approx(0.88))  # mean ± sample std 0.01
    dots = [c.get_offsets()[:, 1].tolist() for c in ax.collections if c not in bars[0].lines[2] + bars[1].lines[2]]
    assert pytest.approx([0.86, 0.87, 0.88]) in dots and [0.75] in dots
    figures.save_png(ax.figure, tmp_path / "x")
    assert (tmp_path / "x").read_bytes().startswith(b"\x89PNG")


def test_accuracy_vs_params_of_a_holdout_run_draws_the_holdout_accuracy_and_says_so() -> None:
    metrics = {"cnn": model_metrics(group([0.86, 0.87, 0.88], "holdout"), 18_123, SPEED, "holdout")}
    assert metrics["cnn"].val_acc is None  # what the figure read before: it has to read eval_acc
    ax = figures.accuracy_vs_params(metrics).axes[0]
    assert ax.get_ylabel() == "holdout accuracy"
    assert tuple(ax.containers[0].lines[0].get_xydata()[0]) == (18_123, pytest.approx(0.87))
    assert "cnn (0.870, n=3)" in [t.get_text() for t in ax.texts]
    mixed = {**metrics, "fc": model_metrics(group([0.75]), 3_737_603, SPEED)}
    assert figures.accuracy_vs_params(mixed).axes[0].get_ylabel() == "holdout / validation accuracy"

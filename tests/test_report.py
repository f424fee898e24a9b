"""The comparison table and the learning-curve table compare writes."""

from __future__ import annotations

import pytest

from cifar3study.evaluation import ModelMetrics
from cifar3study.history import EpochRecord
from cifar3study.report import comparison_table, curves_table, to_markdown

METRICS = {"fc": ModelMetrics(3_737_603, 1.0, 0.75, 0.25, 0.74, 2.5, 6000.0),
           "cnn": ModelMetrics(18_123, 0.93, 0.87, 0.06, 0.86, 1.5, 10_000.0)}


def test_table_lists_smallest_model_first_with_its_numbers() -> None:
    table = comparison_table(METRICS)
    assert table["model"].tolist() == ["cnn", "fc"]
    assert table.loc[1, "val_acc"] == 0.75 and table.loc[0, "params"] == 18_123
    md = to_markdown(table)
    assert "| cnn     |    18,123 |" in md and "3,737,603" in md and "0.8700" in md


def test_curves_table_has_mean_min_max_over_seeds_per_model_and_epoch() -> None:
    fc = [[EpochRecord(1, 1.0, 0.4, 1.1, 0.5, 9.0), EpochRecord(2, 0.8, 0.6, 1.0, 0.6, 9.0)],
          [EpochRecord(1, 0.8, 0.4, 0.9, 0.7, 9.0), EpochRecord(2, 0.6, 0.6, 0.8, 0.8, 9.0)]]
    cnn = [[EpochRecord(1, 0.9, 0.5, 0.9, 0.55, 3.0)]]
    table = curves_table({"fc": fc, "cnn": cnn})
    assert table.columns.tolist()[:5] == ["model", "epoch", "train_loss_mean", "train_loss_min", "train_loss_max"]
    assert table["model"].tolist() == ["fc", "fc", "cnn"] and table["epoch"].tolist() == [1, 2, 1]
    assert table["val_acc_mean"].tolist() == pytest.approx([0.6, 0.7, 0.55])
    assert table["val_acc_min"].tolist() == [0.5, 0.6, 0.55] and table["val_acc_max"].tolist() == [0.7, 0.8, 0.55]

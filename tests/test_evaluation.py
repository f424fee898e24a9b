"""Metrics on hand-made predictions with known answers, and the files evaluate writes and compare reads."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cifar3study import evaluation
from cifar3study.errors import StageError

CLASSES = ("airplane", "automobile", "ship")
# 3 per class; airplane: all right; automobile: one called ship; ship: two called airplane
Y_TRUE = np.array([0, 0, 0, 1, 1, 1, 2, 2, 2])
Y_PRED = np.array([0, 0, 0, 1, 1, 2, 0, 0, 2])


def test_headline_metrics_have_the_known_values() -> None:
    m = evaluation.model_metrics((Y_TRUE, Y_TRUE), (Y_TRUE, Y_PRED), 18_123, 2.0, 7500.0)
    assert m.train_acc == 1.0 and m.val_acc == pytest.approx(6 / 9) and m.gap == pytest.approx(1 - 6 / 9)
    # F1 = 2PR/(P+R): airplane P 3/5 R 1 -> 0.75; automobile P 1 R 2/3 -> 0.8; ship P 1/2 R 1/3 -> 0.4
    assert m.val_macro_f1 == pytest.approx((0.75 + 0.8 + 0.4) / 3)
    assert (m.params, m.seconds_per_epoch, m.images_per_second) == (18_123, 2.0, 7500.0)


def test_per_class_and_confusion_have_the_known_values() -> None:
    report = evaluation.per_class(Y_TRUE, Y_PRED, CLASSES)
    assert list(report) == list(CLASSES)
    assert report["airplane"] == evaluation.ClassReport(precision=0.6, recall=1.0, f1=0.75, support=3)
    assert report["ship"].recall == pytest.approx(1 / 3) and report["ship"].precision == 0.5
    assert evaluation.confusion(Y_TRUE, Y_PRED, 3).tolist() == [[3, 0, 0], [0, 2, 1], [2, 0, 1]]


def test_files_round_trip(tmp_path: Path) -> None:
    m = evaluation.model_metrics((Y_TRUE, Y_PRED), (Y_TRUE, Y_PRED), 10, 1.0, 9.0)
    evaluation.write_metrics(tmp_path / "m.json", m)
    assert evaluation.read_metrics(tmp_path / "m.json") == m
    report = evaluation.per_class(Y_TRUE, Y_PRED, CLASSES)
    evaluation.write_per_class(tmp_path / "pc.json", report)
    assert evaluation.read_per_class(tmp_path / "pc.json") == report
    evaluation.write_confusion_csv(tmp_path / "c.csv", Y_TRUE, Y_PRED, CLASSES)
    assert (tmp_path / "c.csv").read_text().splitlines()[:2] == ["actual,predicted", "airplane,airplane"]
    matrix = evaluation.read_confusion_csv(tmp_path / "c.csv", CLASSES)
    assert matrix.tolist() == evaluation.confusion(Y_TRUE, Y_PRED, 3).tolist()


def test_bad_files_are_one_line(tmp_path: Path) -> None:
    (tmp_path / "m.json").write_text('{"params": 1}')
    with pytest.raises(StageError, match="rerun its evaluate stage"):
        evaluation.read_metrics(tmp_path / "m.json")
    (tmp_path / "c.csv").write_text("actual,predicted\nairplane,zebra\n")
    with pytest.raises(StageError, match="KeyError"):
        evaluation.read_confusion_csv(tmp_path / "c.csv", CLASSES)

"""Metrics on hand-made predictions with known answers, their spread over seeds, and the files evaluate writes."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from cifar3study.errors import StageError
from cifar3study.reporting import evaluation

CLASSES = ("airplane", "automobile", "ship")
# 3 per class; airplane: all right; automobile: one called ship; ship: two called airplane
Y_TRUE = np.array([0, 0, 0, 1, 1, 1, 2, 2, 2])
Y_PRED = np.array([0, 0, 0, 1, 1, 2, 0, 0, 2])
SPEED = {"seconds_per_epoch": 1.5, "group_seconds_per_epoch": 4.5, "images_per_second": 30_000.0}


def test_seed_metrics_have_the_known_values() -> None:
    m = evaluation.seed_metrics((Y_TRUE, Y_TRUE), (Y_TRUE, Y_PRED))
    assert m["train_acc"] == 1.0 and m["val_acc"] == pytest.approx(6 / 9) and m["gap"] == pytest.approx(1 - 6 / 9)
    # F1 = 2PR/(P+R): airplane P 3/5 R 1 -> 0.75; automobile P 1 R 2/3 -> 0.8; ship P 1/2 R 1/3 -> 0.4
    assert m["val_macro_f1"] == pytest.approx((0.75 + 0.8 + 0.4) / 3)


def test_spread_of_three_seeds_has_the_textbook_values() -> None:
    s = evaluation.spread({0: 0.80, 1: 0.84, 2: 0.88})
    assert s.mean == pytest.approx(0.84) and s.std == pytest.approx(0.04)  # sample std: sqrt(0.0032 / 2)
    assert (s.n, s.min, s.max) == (3, 0.80, 0.88)
    half = 4.302653 * 0.04 / 3**0.5  # t(0.975, 2 df) * s / sqrt(n)
    assert s.ci95 == pytest.approx((0.84 - half, 0.84 + half))


def test_a_single_seed_has_no_spread() -> None:
    s = evaluation.spread({5: 0.9})
    assert (s.mean, s.std, s.ci95, s.n) == (0.9, None, None, 1)


def test_metrics_file_has_flat_keys_and_round_trips(tmp_path: Path) -> None:
    per_seed = {0: evaluation.seed_metrics((Y_TRUE, Y_TRUE), (Y_TRUE, Y_PRED)),
                7: evaluation.seed_metrics((Y_TRUE, Y_PRED), (Y_TRUE, Y_TRUE))}
    metrics = evaluation.model_metrics(per_seed, 18_123, SPEED)
    evaluation.write_metrics(tmp_path / "m.json", metrics)
    raw = json.loads((tmp_path / "m.json").read_text())
    assert raw["params"] == 18_123 and raw["val_acc"] == pytest.approx((6 / 9 + 1) / 2)
    assert raw["val_acc_seed0"] == pytest.approx(6 / 9) and raw["val_acc_seed7"] == 1.0 and raw["val_acc_n"] == 2
    assert {"val_acc_std", "val_acc_min", "val_acc_max", "val_acc_ci95_low", "val_acc_ci95_high"} <= raw.keys()
    assert all(not isinstance(v, dict) for v in raw.values())  # flat: dvc metrics show lists each key
    assert evaluation.read_metrics(tmp_path / "m.json") == metrics


def test_single_seed_metrics_file_round_trips(tmp_path: Path) -> None:
    metrics = evaluation.model_metrics({0: evaluation.seed_metrics((Y_TRUE, Y_TRUE), (Y_TRUE, Y_PRED))}, 10, SPEED)
    evaluation.write_metrics(tmp_path / "m.json", metrics)
    assert json.loads((tmp_path / "m.json").read_text())["val_acc_std"] is None
    assert evaluation.read_metrics(tmp_path / "m.json") == metrics


def test_per_class_and_confusion_have_the_known_values() -> None:
    report = evaluation.per_class(Y_TRUE, Y_PRED, CLASSES)
    assert list(report) == list(CLASSES)
    assert report["airplane"] == evaluation.ClassReport(precision=0.6, recall=1.0, f1=0.75, support=3)
    assert report["ship"].recall == pytest.approx(1 / 3) and report["ship"].precision == 0.5
    assert evaluation.confusion(Y_TRUE, Y_PRED, 3).tolist() == [[3, 0, 0], [0, 2, 1], [2, 0, 1]]


def test_pooled_files_say_so_and_round_trip(tmp_path: Path) -> None:
    report = evaluation.per_class(np.tile(Y_TRUE, 2), np.concatenate([Y_PRED, Y_TRUE]), CLASSES)
    evaluation.write_per_class(tmp_path / "pc.json", report, (0, 1))
    assert json.loads((tmp_path / "pc.json").read_text())["pooled_over_seeds"] == [0, 1]
    assert evaluation.read_per_class(tmp_path / "pc.json") == report
    evaluation.write_confusion_csv(tmp_path / "c.csv", {0: Y_TRUE, 1: Y_TRUE}, {0: Y_PRED, 1: Y_TRUE}, CLASSES)
    lines = (tmp_path / "c.csv").read_text().splitlines()
    assert lines[:2] == ["actual,predicted,seed", "airplane,airplane,0"] and len(lines) == 1 + 18
    matrix = evaluation.read_confusion_csv(tmp_path / "c.csv", CLASSES)
    assert matrix.tolist() == [[6, 0, 0], [0, 5, 1], [2, 0, 4]]  # both seeds summed


def test_bad_files_are_one_line(tmp_path: Path) -> None:
    (tmp_path / "m.json").write_text('{"params": 1}')
    with pytest.raises(StageError, match="rerun its evaluate stage"):
        evaluation.read_metrics(tmp_path / "m.json")
    (tmp_path / "c.csv").write_text("actual,predicted,seed\nairplane,zebra,0\n")
    with pytest.raises(StageError, match="KeyError"):
        evaluation.read_confusion_csv(tmp_path / "c.csv", CLASSES)


@pytest.mark.parametrize(("key", "text", "shown"), [
    ("val_acc_seed7", "NaN", "nan"),
    ("val_acc", "Infinity", "inf"),
    ("images_per_second", "-Infinity", "-inf"),
    ("gap_std", "1e999", "inf"),
    ("params", '"18123"', "'18123'"),
])
def test_non_finite_or_non_numeric_metrics_are_refused_by_name(tmp_path: Path, key: str, text: str, shown: str) -> None:
    metrics = evaluation.model_metrics({0: evaluation.seed_metrics((Y_TRUE, Y_TRUE), (Y_TRUE, Y_PRED)),
                                        7: evaluation.seed_metrics((Y_TRUE, Y_PRED), (Y_TRUE, Y_TRUE))}, 10, SPEED)
    evaluation.write_metrics(tmp_path / "m.json", metrics)
    raw = json.loads((tmp_path / "m.json").read_text())
    (tmp_path / "m.json").write_text(json.dumps({**raw, key: "PLACEHOLDER"}).replace('"PLACEHOLDER"', text))
    with pytest.raises(StageError, match=re.escape(f"m.json: '{key}' is {shown}, not a finite number")):
        evaluation.read_metrics(tmp_path / "m.json")


def test_an_oversized_metrics_file_is_refused_unread(tmp_path: Path) -> None:
    (tmp_path / "m.json").write_text(json.dumps({"params": 1, "pad": "x" * (2 << 20)}))
    with pytest.raises(StageError, match="more than 1,048,576 bytes"):
        evaluation.read_metrics(tmp_path / "m.json")


def test_holdout_metrics_have_no_val_key_and_say_their_split(tmp_path: Path) -> None:
    per_seed = {0: evaluation.seed_metrics((Y_TRUE, Y_TRUE), (Y_TRUE, Y_PRED), "holdout"),
                7: evaluation.seed_metrics((Y_TRUE, Y_PRED), (Y_TRUE, Y_TRUE), "holdout")}
    assert list(per_seed[0]) == ["train_acc", "holdout_acc", "gap", "holdout_macro_f1"]
    metrics = evaluation.model_metrics(per_seed, 18_123, SPEED, "holdout")
    assert metrics.split == "holdout" and metrics.val_acc is None and metrics.val_macro_f1 is None
    assert metrics.eval_acc == metrics.holdout_acc and metrics.eval_acc.mean == pytest.approx((6 / 9 + 1) / 2)
    assert metrics.eval_macro_f1 == metrics.holdout_macro_f1
    evaluation.write_metrics(tmp_path / "m.json", metrics)
    raw = json.loads((tmp_path / "m.json").read_text())
    assert not [k for k in raw if k.startswith("val_")]
    assert {"holdout_acc", "holdout_acc_std", "holdout_acc_min", "holdout_acc_max", "holdout_acc_n",
            "holdout_acc_ci95_low", "holdout_acc_ci95_high", "holdout_acc_seed0", "holdout_acc_seed7",
            "holdout_macro_f1", "gap", "train_acc"} <= raw.keys()
    assert evaluation.read_metrics(tmp_path / "m.json") == metrics


def test_val_metrics_keep_their_accessors() -> None:
    metrics = evaluation.model_metrics({0: evaluation.seed_metrics((Y_TRUE, Y_TRUE), (Y_TRUE, Y_PRED))}, 10, SPEED)
    assert metrics.split == "val" and metrics.eval_acc is metrics.val_acc and metrics.holdout_acc is None
    assert metrics.val_acc.mean == pytest.approx(6 / 9)

"""The comparison report: mean ± spread per model, and Welch's test of the difference, on known answers."""

from __future__ import annotations

import pytest

from cifar3study.errors import StageError
from cifar3study.reporting.evaluation import model_metrics, spread
from cifar3study.reporting.report import comparison_table, curves_table, differences, to_markdown, welch
from cifar3study.training.history import EpochRecord

SPEED = {"seconds_per_epoch": 1.5, "group_seconds_per_epoch": 4.5, "images_per_second": 3e4}


def group(val: list[float], train: float = 0.9) -> dict[int, dict[str, float]]:
    return {k: {"train_acc": train, "val_acc": v, "gap": train - v, "val_macro_f1": v} for k, v in enumerate(val)}


def test_welch_on_a_textbook_example() -> None:
    """a = 1, 2, 3 and b = 4, 5, 6: difference -3, se sqrt(2/3), 4 degrees of freedom."""
    ci, p = welch(spread({0: 1.0, 1: 2.0, 2: 3.0}), spread({0: 4.0, 1: 5.0, 2: 6.0}))
    half = 2.776445 * (2 / 3) ** 0.5  # t(0.975, 4 df) * se
    assert ci == pytest.approx((-3 - half, -3 + half))
    assert p == pytest.approx(0.02131, abs=1e-4)  # t = -3.674 on 4 df, two-sided


def test_interval_and_p_value_agree_on_significance() -> None:
    for b in ([0.80, 0.81, 0.79], [0.70, 0.90, 0.80], [0.84, 0.86, 0.85]):
        ci, p = welch(spread({0: 0.84, 1: 0.86, 2: 0.85}), spread(dict(enumerate(b))))
        assert (ci[0] > 0 or ci[1] < 0) == (p < 0.05)


def test_one_seed_gives_a_difference_but_no_test() -> None:
    metrics = {"cnn": model_metrics(group([0.87]), 18_123, SPEED), "fc": model_metrics(group([0.75]), 3_737_603, SPEED)}
    (d,) = differences(metrics)
    assert (d.a, d.b, d.ci95, d.p_value) == ("cnn", "fc", None, None) and d.diff == pytest.approx(0.12)
    assert "p n/a (needs 2+ seeds per model)" in to_markdown(comparison_table(metrics), [d])


def test_report_lists_smallest_first_with_mean_std_and_interval() -> None:
    metrics = {"fc": model_metrics(group([0.74, 0.75, 0.76], 1.0), 3_737_603, SPEED),
               "cnn": model_metrics(group([0.86, 0.87, 0.88], 0.93), 18_123, SPEED)}
    table = comparison_table(metrics)
    assert table["model"].tolist() == ["cnn", "fc"] and table["seeds"].tolist() == [3, 3]
    assert table.loc[0, "val_acc"] == pytest.approx(0.87) and table.loc[0, "val_acc_std"] == pytest.approx(0.01)
    md = to_markdown(table, differences(metrics))
    assert "| cnn | 18,123 | 3 | 0.9300 ± 0.0000 | 0.8700 ± 0.0100 | [0.8452, 0.8948] |" in md
    assert "- cnn − fc: +0.1200, 95% CI [" in md and ", p = " in md


def test_curves_table_has_mean_min_max_over_seeds_per_model_and_epoch() -> None:
    fc = [EpochRecord(0, 1, 1.0, 0.4, 1.1, 0.5, 9.0), EpochRecord(0, 2, 0.8, 0.6, 1.0, 0.6, 9.0),
          EpochRecord(1, 1, 0.8, 0.4, 0.9, 0.7, 9.0), EpochRecord(1, 2, 0.6, 0.6, 0.8, 0.8, 9.0)]
    cnn = [EpochRecord(0, 1, 0.9, 0.5, 0.9, 0.55, 3.0)]
    table = curves_table({"fc": fc, "cnn": cnn})
    assert table.columns.tolist()[:5] == ["model", "epoch", "train_loss_mean", "train_loss_min", "train_loss_max"]
    assert table["model"].tolist() == ["fc", "fc", "cnn"] and table["epoch"].tolist() == [1, 2, 1]
    assert table["val_acc_mean"].tolist() == pytest.approx([0.6, 0.7, 0.55])
    assert table["val_acc_min"].tolist() == [0.5, 0.6, 0.55] and table["val_acc_max"].tolist() == [0.7, 0.8, 0.55]


def holdout_group(acc: list[float], train: float = 0.9) -> dict[int, dict[str, float]]:
    return {k: {"train_acc": train, "holdout_acc": v, "gap": train - v, "holdout_macro_f1": v} for k, v in enumerate(acc)}


def test_a_holdout_comparison_labels_its_columns_by_split() -> None:
    metrics = {"fc": model_metrics(holdout_group([0.74, 0.75, 0.76], 1.0), 3_737_603, SPEED, "holdout"),
               "cnn": model_metrics(holdout_group([0.86, 0.87, 0.88], 0.93), 18_123, SPEED, "holdout")}
    table = comparison_table(metrics)
    assert {"holdout_acc", "holdout_acc_std", "holdout_acc_ci95_low", "holdout_macro_f1"} <= set(table.columns)
    assert not [c for c in table.columns if c.startswith("val_")]
    md = to_markdown(table, differences(metrics))
    assert "| holdout acc | holdout acc 95% CI | gap | holdout macro F1 |" in md and "val acc" not in md
    assert "| cnn | 18,123 | 3 | 0.9300 ± 0.0000 | 0.8700 ± 0.0100 | [0.8452, 0.8948] |" in md
    assert "Difference in holdout accuracy" in md and "- cnn − fc: +0.1200, 95% CI [" in md


def test_models_evaluated_on_different_splits_are_not_compared() -> None:
    metrics = {"fc": model_metrics(group([0.75]), 3_737_603, SPEED),
               "cnn": model_metrics(holdout_group([0.87]), 18_123, SPEED, "holdout")}
    with pytest.raises(StageError, match=r"different splits \(fc: val, cnn: holdout\)"):
        comparison_table(metrics)


def test_holdout_curves_are_named_after_the_split() -> None:
    rows = [EpochRecord(0, 1, 1.0, 0.4, 1.1, 0.5, 9.0, "holdout"), EpochRecord(1, 1, 0.8, 0.4, 0.9, 0.7, 9.0, "holdout")]
    table = curves_table({"cnn": rows})
    assert table["holdout_acc_mean"].tolist() == pytest.approx([0.6]) and "val_acc_mean" not in table.columns
    assert table["holdout_loss_max"].tolist() == [1.1]

"""The study report: ranking per model, Welch against the best with Holm's correction, the files and figures."""

from __future__ import annotations

import itertools
from pathlib import Path

import pandas as pd
import pytest
from scipy import stats

from cifar3study.errors import StageError
from cifar3study.reporting.evaluation import ModelMetrics, model_metrics
from cifar3study.reporting.study_report import (
    TrialResult,
    holm,
    rank_model,
    study_figure,
    to_markdown,
    write_study_report,
)

SPEED = {"seconds_per_epoch": 1.0, "group_seconds_per_epoch": 3.0, "images_per_second": 1000.0}


def metrics(val: list[float], n_params: int = 1000) -> ModelMetrics:
    """A seed group as the evaluate stage builds it: one seed per value."""
    per_seed = {seed: {"train_acc": v + 0.1, "val_acc": v, "gap": 0.1, "val_macro_f1": v} for seed, v in enumerate(val)}
    return model_metrics(per_seed, n_params, SPEED)


def trial(name: str, lr: float, fc: list[float], cnn: list[float], momentum: float = 0.0) -> TrialResult:
    return TrialResult(f"key-{name}", name, {"train.lr": lr, "train.momentum": momentum, "train.epochs": 2},
                       {"fc": metrics(fc, 50_000), "cnn": metrics(cnn, 2_000)})


def grid(seeds: int) -> list[TrialResult]:
    """lr x momentum, the CNN ahead of the FC net, a small per-seed spread."""
    spread = [0.0, 0.01, -0.01, 0.005][:seeds]
    settings = itertools.product([0.01, 0.02, 0.04], [0.0, 0.9])
    return [trial(f"t{i}", lr, [0.6 + lr * 5 + mom / 10 + s for s in spread],
                  [0.85 + lr * 2 + mom / 50 + s * 2 for s in spread], mom) for i, (lr, mom) in enumerate(settings)]


def test_holm_matches_a_hand_computed_example() -> None:
    # sorted 0.01, 0.03, 0.04, 0.20 times 4, 3, 2, 1 = 0.04, 0.09, 0.08 -> 0.09 (kept monotone), 0.20
    assert holm([0.01, 0.04, 0.03, 0.20]) == pytest.approx([0.04, 0.09, 0.09, 0.20])
    assert holm([0.5, 0.6]) == pytest.approx([1.0, 1.0])  # capped at 1
    assert holm([]) == []


def test_trials_are_ranked_by_mean_and_tested_against_the_best_with_holm() -> None:
    best = [0.80, 0.81, 0.82]
    close = [0.79, 0.81, 0.82]  # within the noise of the best
    far = [0.60, 0.61, 0.62]
    trials = [trial("close", 0.01, close, best), trial("best", 0.02, best, best), trial("far", 0.03, far, best)]
    ranked = rank_model(trials, "fc")
    assert [r.trial.name for r in ranked] == ["best", "close", "far"]
    p_close = stats.ttest_ind(close, best, equal_var=False).pvalue
    p_far = stats.ttest_ind(far, best, equal_var=False).pvalue
    assert p_far < p_close  # so Holm multiplies p_far by 2 and p_close by 1 (kept at least p_far's)
    assert ranked[2].p_holm == pytest.approx(2 * p_far)
    assert ranked[1].p_holm == pytest.approx(max(p_close, 2 * p_far))
    assert ranked[1].diff == pytest.approx(sum(close) / 3 - sum(best) / 3)
    assert [r.verdict for r in ranked] == ["best", "cannot be told apart from the best", "worse than the best"]


def test_report_states_which_trials_cannot_be_told_apart_from_the_best() -> None:
    text = to_markdown("lr", ["train.lr", "train.momentum"], grid(3), {"train.lr": "a.png"}, base_commit="abcdef1234567890")
    assert text.startswith("# Study `lr`\n\n6 trials × 2 models (fc, cnn), 3 seeds each (seeds 0, 1, 2), "
                           "base commit `abcdef123456`.")
    assert "Set in every trial: `train.epochs=2`" in text
    assert "## fc: trials ranked by validation accuracy" in text and "## cnn: trials ranked" in text
    assert "fc: every other trial is worse than the best at 0.05 (Holm)." in text
    # t2 and t1 differ from the best at 0.05 alone (p 0.024, 0.021), not once corrected for 5 comparisons
    assert "cnn: 4 trials cannot be told apart from the best (t5) at 0.05 (Holm): t4, t3, t2, t1." in text
    assert "Best cnn − best fc:" in text and "Welch p =" in text
    assert "![validation accuracy against train.lr](a.png)" in text


def test_one_seed_says_no_test_is_possible_and_gives_no_p_value(tmp_path: Path) -> None:
    write_study_report(tmp_path, "lr", ["train.lr", "train.momentum"], grid(1))
    text = (tmp_path / "report.md").read_text()
    assert "fc: one seed per trial, so no test is possible" in text
    assert "one seed: no test possible" in text and "p =" not in text
    table = pd.read_csv(tmp_path / "trials.csv")
    assert table["p_holm"].isna().all() and table["val_acc_ci95_low"].isna().all()
    assert set(table["verdict"]) == {"best", "no test possible (one seed)"}


def test_files_are_written_with_a_figure_per_swept_key(tmp_path: Path) -> None:
    out = tmp_path / "reports" / "studies" / "lr"
    files = write_study_report(out, "lr", ["train.lr", "train.momentum"], grid(3))
    names = {p.name for p in files}
    assert names == {"report.md", "trials.csv", "val_acc_vs_train.lr.png", "val_acc_vs_train.momentum.png"}
    assert {p.name for p in out.iterdir()} == names  # no temporary files left behind
    for png in out.glob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = pd.read_csv(out / "trials.csv")
    assert len(table) == 6 * 2 and list(table.groupby("model")["rank"].max()) == [6, 6]
    assert {"trial_key", "train.lr", "train.momentum", "val_acc", "val_acc_std", "n", "p_holm"} <= set(table.columns)


def test_bad_input_leaves_the_previous_report_untouched(tmp_path: Path) -> None:
    write_study_report(tmp_path, "lr", ["train.lr"], grid(2))
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(StageError, match=r"^trial 't0' has no value for swept key 'train\.width'; rerun"):
        write_study_report(tmp_path, "lr", ["train.lr", "train.width"], grid(2))
    with pytest.raises(StageError, match="no finished trial"):
        write_study_report(tmp_path, "lr", ["train.lr"], [])
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_figure_has_a_line_per_model_in_a_panel_per_other_setting() -> None:
    fig = study_figure("lr", "train.lr", ["train.lr", "train.momentum"], grid(3))
    panels = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in panels] == ["train.momentum=0", "train.momentum=0.9"]
    assert [t.get_text() for t in panels[0].get_xticklabels()] == ["0.01", "0.02", "0.04"]
    assert [t.get_text() for t in panels[0].get_legend().get_texts()] == ["fc", "cnn"]
    fc_line = panels[0].get_lines()[0]
    assert list(fc_line.get_ydata()) == pytest.approx([0.6 + lr * 5 for lr in (0.01, 0.02, 0.04)])


def test_figure_averages_over_the_other_keys_when_they_would_make_too_many_panels() -> None:
    swept = ["train.lr", "train.momentum", "train.batch_size"]
    trials = [TrialResult(f"k{i}", f"t{i}", {"train.lr": lr, "train.momentum": mom, "train.batch_size": bs},
                          {"fc": metrics([lr * 10 + mom, lr * 10 + mom + 0.01])})
              for i, (lr, mom, bs) in enumerate(itertools.product([0.01, 0.02], [0.0, 0.3, 0.6, 0.9], [32, 64, 128]))]
    fig = study_figure("big", "train.lr", swept, trials)  # 4 x 3 = 12 settings of the other keys
    panels = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in panels] == ["mean over train.momentum, train.batch_size; bars: std of those trials"]
    assert list(panels[0].get_lines()[0].get_ydata()) == pytest.approx([0.1 + 0.45 + 0.005, 0.2 + 0.45 + 0.005])

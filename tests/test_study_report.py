"""The study report: counts and cost per model, rankings, pruned and failed trials, importances, the final phase with
its optimism, tuned against tuned on the test split, the val warning, the CSVs and figures."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
from scipy import stats

from cifar3study.errors import StageError
from cifar3study.reporting.evaluation import spread
from cifar3study.reporting.study_report import (
    FinalRow,
    ModelSearch,
    StudyInfo,
    TrialRow,
    figures,
    write_study_report,
)

FILES = {"report.md", "trials.csv", "final.csv", "pairs.csv", "history.png", "score_vs_train.lr.png",
         "score_vs_model.widths.png", "score_vs_train.momentum.png", "importances.png", "final_test.png"}


def info(select: str = "holdout") -> StudyInfo:
    return StudyInfo("tune", "0123456789abcdef", select, 0.1 if select == "holdout" else 0.0, "tpe", "asha",
                     frozenset({"train.lr"}))


def trial(model: str, number: int, state: str, overrides: dict, scores: list[float] | None = None,
          last: float | None = None, epochs: int = 10) -> TrialRow:
    score = None if scores is None else spread(dict(enumerate(scores)))
    return TrialRow(model, number, f"{model}-{number}", state, overrides, score, last, epochs, 10, len(scores or [0] * 3))


def final(winner: TrialRow, test: list[float]) -> FinalRow:
    seeds = tuple(range(100, 100 + len(test)))
    return FinalRow(winner, spread(dict(zip(seeds, test))), seeds)


def fc() -> ModelSearch:
    trials = [trial("fc", 0, "COMPLETE", {"train.lr": 0.1, "model.widths": [512, 256]}, [0.60, 0.61, 0.62]),
              trial("fc", 1, "COMPLETE", {"train.lr": 0.01, "model.widths": [256]}, [0.70, 0.71, 0.72]),
              trial("fc", 2, "PRUNED", {"train.lr": 0.001, "model.widths": [256]}, last=0.45, epochs=3),
              trial("fc", 3, "FAIL", {"train.lr": 0.3, "model.widths": [256]}, epochs=1),
              trial("fc", 4, "COMPLETE", {"train.lr": 0.02, "model.widths": [512, 256]}, [0.69, 0.71, 0.70])]
    return ModelSearch("fc", ["train.lr", "model.widths"], trials, {"train.lr": 0.8, "model.widths": 0.2},
                       final(trials[1], [0.66, 0.67, 0.68]))


def cnn() -> ModelSearch:
    trials = [trial("cnn", 0, "COMPLETE", {"train.lr": 0.01, "train.momentum": 0.9}, [0.85, 0.86, 0.87]),
              trial("cnn", 1, "PRUNED", {"train.lr": 0.3, "train.momentum": 0.0}, last=0.5, epochs=2),
              trial("cnn", 2, "COMPLETE", {"train.lr": 0.05, "train.momentum": 0.0}, [0.80, 0.81, 0.82]),
              trial("cnn", 3, "RUNNING", {"train.lr": 0.02, "train.momentum": 0.5}, epochs=4)]
    return ModelSearch("cnn", ["train.lr", "train.momentum"], trials, {}, final(trials[0], [0.83, 0.84, 0.85]))


def tiny() -> ModelSearch:
    """One complete trial and no final phase yet."""
    return ModelSearch("tiny", ["train.lr"], [trial("tiny", 0, "COMPLETE", {"train.lr": 0.01}, [0.5, 0.5, 0.6])],
                       {}, None)


def report(tmp_path: Path, select: str = "holdout") -> str:
    write_study_report(tmp_path, info(select), [fc(), cnn(), tiny()])
    return (tmp_path / "report.md").read_text()


def test_header_states_the_protocol_and_warns_only_when_selected_on_the_test_split(tmp_path: Path) -> None:
    text = report(tmp_path / "holdout")
    assert text.startswith("# Study `tune`\n\nBase commit `0123456789ab`.")
    assert "selected on a holdout of 10% of the training split" in text
    assert "refit on the full training split from 3 new seeds and evaluated once on the untouched test split" in text
    assert "Warning" not in text and "optimistic" not in text
    warned = report(tmp_path / "val", "val")
    assert "**Warning: trials were selected on the test split (`select: val`).**" in warned
    assert "optimistic (selection bias)" in warned and "not an unbiased estimate" in warned
    assert "holdout of" not in warned and "untouched" not in warned


def test_counts_and_epochs_saved_by_pruning(tmp_path: Path) -> None:
    text = report(tmp_path)
    # fc: 3 complete x 10 epochs x 3 seeds, pruned at 3 of 10, failed at 1: spent 90+9+3, unpruned 90+30+3
    assert "| fc | 3 | 1 | 1 | 0 | 0 | 102 | 123 | 17.1% |" in text
    # cnn: the running trial costs what it spent either way: spent 60+6+12, unpruned 60+30+12
    assert "| cnn | 2 | 1 | 0 | 1 | 0 | 78 | 102 | 23.5% |" in text
    assert "| tiny | 1 | 0 | 0 | 0 | 0 | 30 | 30 | 0.0% |" in text


def test_final_phase_gives_test_accuracy_and_optimism(tmp_path: Path) -> None:
    text = report(tmp_path)
    test = spread({100: 0.66, 101: 0.67, 102: 0.68})
    # optimism = selection mean 0.71 - test mean 0.67, the winner chosen from 3 complete trials
    assert (f"| fc | fc-1 (#1) | `train.lr=0.01`, `model.widths=[256]` | 3 trials | 0.7100 ± 0.0100 (n=3) | "
            f"0.6700 ± 0.0100 | [{test.ci95[0]:.4f}, {test.ci95[1]:.4f}] | 3 | +0.0400 |") in text
    assert "| cnn | cnn-0 (#0) | `train.lr=0.01`, `train.momentum=0.9` | 2 trials | 0.8600 ± 0.0100 (n=3) |" in text
    assert "| 3 | +0.0200 |" in text
    assert "tiny: no final phase (none configured, or it has not finished)." in text
    final = pd.read_csv(tmp_path / "final.csv")
    assert list(final["model"]) == ["fc", "cnn"]
    assert list(final["optimism"]) == pytest.approx([0.04, 0.02]) and list(final["n_trials"]) == [3, 2]
    assert final["config"][0] == '{"model.widths": [256], "train.lr": 0.01}'


def test_tuned_against_tuned_covers_only_models_with_a_final(tmp_path: Path) -> None:
    text = report(tmp_path)
    p = stats.ttest_ind([0.83, 0.84, 0.85], [0.66, 0.67, 0.68], equal_var=False).pvalue
    assert p < 0.0001
    assert "| cnn − fc | +0.1700 |" in text and "| < 0.0001 | 1.0000 | [1.0000, 1.0000] |" in text
    assert "tiny −" not in text and "− tiny" not in text
    assert 'Bouthillier et al., MLSys 2021, "Accounting for variance in machine learning benchmarks"' in text
    pairs = pd.read_csv(tmp_path / "pairs.csv")
    assert list(pairs["pair"]) == ["cnn - fc"]
    assert pairs["p_greater"][0] == 1.0 and pairs["welch_p"][0] == pytest.approx(p)
    assert (pairs["p_greater_ci95_low"][0], pairs["p_greater_ci95_high"][0]) == (1.0, 1.0)


def test_trials_are_ranked_then_pruned_then_failed(tmp_path: Path) -> None:
    text = report(tmp_path)
    fc_part = text[text.index("## fc: search"):text.index("## cnn: search")]
    assert fc_part.index("| 1 | 1 | fc-1 | 0.01 | [256] | 0.7100 ± 0.0100 |") < fc_part.index("| 2 | 4 | fc-4 |")
    assert "| 3 | 0 | fc-0 | 0.1 | [512, 256] | 0.6100 ± 0.0100 |" in fc_part
    assert "fc: 1 trial cannot be told apart from the best (fc-1) at 0.05 (Holm): fc-4." in fc_part
    assert "| 2 | fc-2 | PRUNED | 0.001 | [256] | 3 of 10 | 0.4500 |" in fc_part
    assert "| 3 | fc-3 | FAIL | 0.3 | [256] | 1 of 10 | n/a |" in fc_part
    assert fc_part.index("### Pruned") < fc_part.index("### Failed")
    assert "| cnn-3 | RUNNING |" in text
    trials = pd.read_csv(tmp_path / "trials.csv")
    assert len(trials) == 5 + 4 + 1
    assert list(trials[trials.model == "fc"]["state"]) == ["COMPLETE", "COMPLETE", "PRUNED", "FAIL", "COMPLETE"]
    assert {"score_mean", "score_std", "score_n", "last_score", "epochs", "full_epochs", "seeds", "train.lr",
            "model.widths", "train.momentum", "p_holm"} <= set(trials.columns)


def test_importances_or_why_none(tmp_path: Path) -> None:
    text = report(tmp_path)
    assert "| `train.lr` | 0.8000 |\n| `model.widths` | 0.2000 |" in text
    assert "No parameter importances for cnn: they could not be computed" in text
    assert "No parameter importances for tiny: fewer than 2 complete trials." in text


def test_one_seed_gives_no_test_and_no_interval(tmp_path: Path) -> None:
    trials = [trial("fc", i, "COMPLETE", {"train.lr": lr}, [score]) for i, (lr, score) in enumerate([(0.1, 0.6), (0.01, 0.7)])]
    search = ModelSearch("fc", ["train.lr"], trials, {}, final(trials[1], [0.65]))
    write_study_report(tmp_path, info(), [search])
    text = (tmp_path / "report.md").read_text()
    assert "fc: one seed per trial, so no test is possible" in text and "no test possible (one seed)" in text
    assert "| 0.7000 (n=1) | 0.6500 | n/a | 1 | +0.0500 |" in text
    assert "Fewer than two models have a final phase: no comparison." in text


def test_files_exist_are_listed_and_the_same_for_the_same_input(tmp_path: Path) -> None:
    files = write_study_report(tmp_path / "a", info(), [fc(), cnn(), tiny()])
    assert files[0] == tmp_path / "a" / "report.md" and {p.name for p in files} == FILES
    assert {p.name for p in (tmp_path / "a").iterdir()} == FILES  # no temporary files left behind
    for path in files:
        assert path.stat().st_size > 0
        if path.suffix == ".png":
            assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    write_study_report(tmp_path / "b", info(), [fc(), cnn(), tiny()])
    for name in ("report.md", "trials.csv", "final.csv", "pairs.csv"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_bad_input_leaves_the_previous_report_untouched(tmp_path: Path) -> None:
    write_study_report(tmp_path, info(), [fc()])
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    broken = ModelSearch("fc", ["train.lr"], [trial("fc", 0, "COMPLETE", {"train.lr": 0.1})], {}, None)
    with pytest.raises(StageError, match=r"^trial 'fc-0' of model 'fc' is complete but has no score; rerun"):
        write_study_report(tmp_path, info(), [broken])
    with pytest.raises(StageError, match="searched no model"):
        write_study_report(tmp_path, info(), [])
    with pytest.raises(StageError, match="neither 'holdout' nor 'val'"):
        write_study_report(tmp_path, info("test"), [fc()])
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_figures_draw_history_pruned_trials_and_key_scales() -> None:
    drawn = figures(info(), [fc(), cnn()])
    fc_panel = drawn["history.png"][1].axes[0]
    assert fc_panel.get_title() == "fc"
    assert list(fc_panel.get_lines()[0].get_ydata()) == pytest.approx([0.61, 0.71, 0.71])  # best so far
    complete, pruned = fc_panel.collections[:2]
    assert pruned.get_offsets().tolist() == [[2, 0.45]] and len(complete.get_offsets()) == 3
    assert drawn["score_vs_train.lr.png"][1].axes[0].get_xscale() == "log"
    assert drawn["score_vs_train.momentum.png"][1].axes[0].get_xscale() == "linear"
    widths = drawn["score_vs_model.widths.png"][1].axes[0]
    assert [t.get_text() for t in widths.get_xticklabels()] == ["[256]", "[512, 256]"]
    legend = drawn["score_vs_train.lr.png"][1].axes[0].get_legend()
    assert [t.get_text() for t in legend.get_texts()] == ["fc", "cnn"]


def test_a_study_with_no_trial_yet_still_writes_every_file(tmp_path: Path) -> None:
    files = write_study_report(tmp_path, info(), [ModelSearch("fc", ["train.lr"], [], {}, None)])
    text = (tmp_path / "report.md").read_text()
    assert "No complete trial." in text and "No final phase has finished" in text
    assert "fc: no final phase" in text and "Fewer than two models have a final phase" in text
    assert list(pd.read_csv(tmp_path / "trials.csv").columns)[:4] == ["model", "number", "name", "state"]
    assert all(p.stat().st_size > 0 for p in files)

"""The study report's statistics against hand-computed examples: Holm, Welch against the best, P(A > B) and its bootstrap."""

from __future__ import annotations

import pytest
from scipy import stats

from cifar3study.errors import StageError
from cifar3study.reporting.evaluation import spread
from cifar3study.reporting.study_stats import (
    MAX_SEEDS,
    against_best,
    compare,
    holm,
    p_greater,
    p_greater_interval,
    pair_lines,
    tied_sentence,
)


def seeds(values: list[float], first: int = 0) -> dict[int, float]:
    return {first + i: v for i, v in enumerate(values)}


def test_holm_matches_a_hand_computed_example() -> None:
    # sorted 0.01, 0.03, 0.04, 0.20 times 4, 3, 2, 1 = 0.04, 0.09, 0.08 -> 0.09 (kept monotone), 0.20
    assert holm([0.01, 0.04, 0.03, 0.20]) == pytest.approx([0.04, 0.09, 0.09, 0.20])
    assert holm([0.5, 0.6]) == pytest.approx([1.0, 1.0])  # capped at 1
    assert holm([]) == []


def test_p_greater_counts_every_pair_with_ties_as_one_half() -> None:
    # a=1 beats 0 (1); a=2 beats 0, ties 2 (1.5); a=3 beats 0 and 2 (2): 4.5 of 9 pairs
    assert p_greater([1, 2, 3], [0, 2, 4]) == pytest.approx(4.5 / 9)
    # a=1 beats 0, ties 1 twice (2); a=2 and a=3 beat all three (3 + 3): 8 of 9
    assert p_greater([1, 2, 3], [0, 1, 1]) == pytest.approx(8 / 9)
    assert p_greater([0.7, 0.8, 0.9], [0.7, 0.8, 0.9]) == 0.5
    assert p_greater([2, 3], [0, 1]) == 1.0 and p_greater([0, 1], [2, 3]) == 0.0


def test_bootstrap_interval_of_a_complete_dominance_is_one() -> None:
    assert p_greater_interval([0.90, 0.91, 0.92], [0.60, 0.61, 0.62]) == (1.0, 1.0)
    assert p_greater_interval([0.5], [0.5]) == (0.5, 0.5)  # one seed each: every resample is the same pair


def test_bootstrap_interval_matches_an_enumerable_case() -> None:
    # a resamples of [0, 1] hold zero, one or two 1s (1/4, 1/2, 1/4), so P(a > 0.5) is 0, 1/2 or 1: a quarter
    # of the mass at each end, so the 2.5% and 97.5% percentiles are the ends themselves
    assert p_greater_interval([0.0, 1.0], [0.5]) == (0.0, 1.0)


def test_bootstrap_interval_contains_the_estimate_and_is_deterministic() -> None:
    a, b = [0.80, 0.82, 0.85, 0.79, 0.83], [0.78, 0.81, 0.80, 0.77, 0.84]
    low, high = p_greater_interval(a, b)
    assert 0.0 <= low < p_greater(a, b) < high <= 1.0
    assert p_greater_interval(a, b) == (low, high)


def test_sizes_are_checked_before_the_bootstrap_allocates() -> None:
    with pytest.raises(StageError, match="at least one value"):
        p_greater([], [1.0])
    with pytest.raises(StageError, match=f"more than the {MAX_SEEDS}"):
        p_greater_interval([0.5] * (MAX_SEEDS + 1), [0.5])


def test_trials_are_tested_against_the_best_with_holm() -> None:
    best, close, far = [0.80, 0.81, 0.82], [0.79, 0.81, 0.82], [0.60, 0.61, 0.62]
    versus = against_best([spread(seeds(best)), spread(seeds(close)), spread(seeds(far))])
    p_close = stats.ttest_ind(close, best, equal_var=False).pvalue
    p_far = stats.ttest_ind(far, best, equal_var=False).pvalue
    assert p_far < p_close  # so Holm multiplies p_far by 2 and p_close by 1 (kept at least p_far's)
    assert versus[2].p_holm == pytest.approx(2 * p_far)
    assert versus[1].p_holm == pytest.approx(max(p_close, 2 * p_far))
    assert versus[1].diff == pytest.approx(sum(close) / 3 - sum(best) / 3)
    assert [v.verdict for v in versus] == ["best", "cannot be told apart from the best", "worse than the best"]
    assert tied_sentence("fc", ["b", "c", "f"], versus) == ("fc: 1 trial cannot be told apart from the best (b) "
                                                           "at 0.05 (Holm): c.")
    assert against_best([]) == []


def test_one_seed_gives_no_test_and_says_so() -> None:
    versus = against_best([spread({0: 0.8}), spread({0: 0.7})])
    assert versus[1].p_value is None and versus[1].verdict == "no test possible (one seed)"
    assert "one seed per trial, so no test is possible" in tied_sentence("cnn", ["a", "b"], versus)


def test_compare_reports_b_minus_a_with_welch_and_p_greater() -> None:
    fc, cnn = [0.66, 0.67, 0.68], [0.83, 0.84, 0.85]
    pair = compare(spread(seeds(fc, 100)), spread(seeds(cnn, 100)))
    assert pair.diff == pytest.approx(0.17)
    assert pair.p_value == pytest.approx(stats.ttest_ind(cnn, fc, equal_var=False).pvalue)
    assert pair.ci95[0] < 0.17 < pair.ci95[1]
    assert (pair.p_greater, pair.p_greater_ci95) == (1.0, (1.0, 1.0))
    text = "\n".join(pair_lines([("fc", "cnn", pair)]))
    assert "| cnn − fc | +0.1700 |" in text and "| < 0.0001 | 1.0000 | [1.0000, 1.0000] |" in text
    assert "Bouthillier et al., MLSys 2021" in text


def test_compare_does_not_depend_on_the_order_seeds_were_recorded_in() -> None:
    a, b = seeds([0.80, 0.82, 0.85, 0.79]), seeds([0.78, 0.81, 0.80, 0.84])
    backwards = dict(reversed(list(b.items())))
    assert compare(spread(a), spread(b)).p_greater_ci95 == compare(spread(a), spread(backwards)).p_greater_ci95

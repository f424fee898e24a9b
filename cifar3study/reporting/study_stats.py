"""The statistics of a study report: trials against the best (Welch + Holm), and tuned model against tuned model.

P(B > A) is the probability that one run of B beats one run of A, the
measure Bouthillier et al. (MLSys 2021, "Accounting for variance in machine
learning benchmarks") argue for over a bare difference of means: it says how
often the better model wins, not only by how much on average. Its interval
is a percentile bootstrap over each model's seeds with a fixed generator
seed, so the same results always give the same report.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
import pandas as pd

from cifar3study.errors import StageError
from cifar3study.reporting.evaluation import Spread
from cifar3study.reporting.report import welch

ALPHA = 0.05
RESAMPLES = 10_000
CITATION = ('Bouthillier et al., MLSys 2021, "Accounting for variance in machine learning benchmarks": '
            "P(b > a) says how often the better model wins, not only by how much on average.")
BOOTSTRAP_SEED = 20210405  # fixed: the report is a function of the results alone
MAX_SEEDS = 1_000  # per sample: the bootstrap holds RESAMPLES x seeds counts in memory


def holm(p_values: list[float]) -> list[float]:
    """Holm's step-down adjusted p-values, in the order given: the k-th smallest times (m - k + 1), kept monotone."""
    m = len(p_values)
    adjusted = [0.0] * m
    running = 0.0
    for k, i in enumerate(sorted(range(m), key=lambda i: p_values[i])):
        running = max(running, min(1.0, (m - k) * p_values[i]))
        adjusted[i] = running
    return adjusted


def _wins(a: Sequence[float], b: Sequence[float]) -> np.ndarray:
    """wins[i, j]: 1 when a[i] > b[j], 1/2 on a tie, 0 otherwise."""
    x, y = np.asarray(a, dtype=np.float64)[:, None], np.asarray(b, dtype=np.float64)[None, :]
    return (x > y) + 0.5 * (x == y)


def _check_sizes(a: Sequence[float], b: Sequence[float]) -> None:
    if not a or not b:
        raise StageError("P(A > B) needs at least one value on each side; rerun the final phase")
    if max(len(a), len(b)) > MAX_SEEDS:
        raise StageError(f"{max(len(a), len(b))} seeds in one final phase, more than the {MAX_SEEDS} a report "
                         "compares; use fewer final seeds")


def p_greater(a: Sequence[float], b: Sequence[float]) -> float:
    """P(A > B): the share of all pairs (a[i], b[j]) that A wins, ties counting one half."""
    _check_sizes(a, b)
    return float(_wins(a, b).mean())


def p_greater_interval(a: Sequence[float], b: Sequence[float], resamples: int = RESAMPLES,
                       seed: int = BOOTSTRAP_SEED) -> tuple[float, float]:
    """Percentile bootstrap 95% interval of P(A > B), each sample resampled with replacement.

    A resample is drawn as how often each value is picked (a multinomial
    count), so P of every resample is one matrix product, never a copy of
    the samples per resample.
    """
    _check_sizes(a, b)
    rng = np.random.default_rng(seed)
    count_a = rng.multinomial(len(a), [1 / len(a)] * len(a), size=resamples)
    count_b = rng.multinomial(len(b), [1 / len(b)] * len(b), size=resamples)
    p = ((count_a @ _wins(a, b)) * count_b).sum(axis=1) / (len(a) * len(b))
    low, high = np.percentile(p, [2.5, 97.5])
    return float(low), float(high)


def _values(s: Spread) -> list[float]:
    """A spread's values in seed order, so that equal spreads resample alike however their dicts were built."""
    return [s.per_seed[seed] for seed in sorted(s.per_seed)]


@dataclasses.dataclass(frozen=True)
class Versus:
    """One trial against its model's best (diff and p-values None for the best itself)."""

    rank: int
    diff: float | None
    p_value: float | None  # Welch, two-sided; None when either group has one seed
    p_holm: float | None

    @property
    def verdict(self) -> str:
        if self.rank == 1:
            return "best"
        if self.p_holm is None:
            return "no test possible (one seed)"
        return "cannot be told apart from the best" if self.p_holm >= ALPHA else "worse than the best"


def against_best(scores: list[Spread]) -> list[Versus]:
    """`scores` best first: each tested against the first by Welch, Holm-corrected over the tests actually made."""
    if not scores:
        return []
    best = scores[0]
    tests = [welch(s, best)[1] for s in scores[1:]]
    adjusted = iter(holm([p for p in tests if p is not None]))
    rows = [Versus(1, None, None, None)]
    for rank, (s, p) in enumerate(zip(scores[1:], tests), start=2):
        rows.append(Versus(rank, s.mean - best.mean, p, None if p is None else next(adjusted)))
    return rows


@dataclasses.dataclass(frozen=True)
class Pair:
    """Tuned model B against tuned model A on the test split: B − A."""

    diff: float
    ci95: tuple[float, float] | None  # Welch; None unless both have 2+ seeds
    p_value: float | None
    p_greater: float  # P(B > A) over all seed pairs
    p_greater_ci95: tuple[float, float]  # percentile bootstrap


def compare(a: Spread, b: Spread) -> Pair:
    """B − A: difference of means with Welch's interval and p, and P(B > A) with its bootstrap interval."""
    ci, p = welch(b, a)
    va, vb = _values(a), _values(b)
    return Pair(b.mean - a.mean, ci, p, p_greater(vb, va), p_greater_interval(vb, va))


def tied_sentence(model: str, names: list[str], versus: list[Versus]) -> str:
    """What the tests against the best say about a model's complete trials (`names` in rank order)."""
    if len(versus) == 1:
        return f"Only one complete trial of {model}: nothing to compare."
    if all(v.p_holm is None for v in versus[1:]):
        return f"{model}: one seed per trial, so no test is possible; the ranking rests on single runs."
    tied = [n for n, v in zip(names, versus) if v.verdict == "cannot be told apart from the best"]
    if not tied:
        return f"{model}: every other trial is worse than the best at {ALPHA} (Holm)."
    return (f"{model}: {plural(len(tied), 'trial')} cannot be told apart from the best ({names[0]}) at {ALPHA} "
            f"(Holm): {', '.join(tied)}.")


def plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def num(x: float | None, sign: str = "") -> str:
    return "n/a" if x is None else f"{x:{sign}.4f}"


def pm(s: Spread) -> str:
    """mean ± sample std, or the mean alone for one seed."""
    return f"{s.mean:.4f}" if s.std is None else f"{s.mean:.4f} ± {s.std:.4f}"


def interval(ci: tuple[float, float] | None) -> str:
    return "n/a" if ci is None else f"[{ci[0]:.4f}, {ci[1]:.4f}]"


def p_text(p: float | None) -> str:
    return "n/a" if p is None else ("< 0.0001" if p < 0.0001 else f"{p:.4f}")


def pair_lines(found: list[tuple[str, str, Pair]]) -> list[str]:
    """The report's section on tuned models compared pairwise, (a, b, b − a) each."""
    lines = ["## Tuned against tuned on the test split", ""]
    if not found:
        return [*lines, "Fewer than two models have a final phase: no comparison.", ""]
    lines += ["| pair (b − a) | difference of means | 95% CI (Welch) | Welch p | P(b > a) | 95% CI (bootstrap) |",
              "|:--|--:|--:|--:|--:|--:|"]
    for a, b, p in found:
        lines.append(f"| {b} − {a} | {p.diff:+.4f} | {interval(p.ci95)} | {p_text(p.p_value)} | "
                     f"{p.p_greater:.4f} | {interval(p.p_greater_ci95)} |")
    return [*lines, "", "P(b > a): the probability that a refit of b beats a refit of a, over all pairs of their "
            "seeds (ties count one half); its interval is a percentile bootstrap over each model's seeds "
            f"({RESAMPLES} resamples, fixed seed). After {CITATION}", ""]


def pairs_table(found: list[tuple[str, str, Pair]]) -> pd.DataFrame:
    """pairs.csv: one row per pair, b − a, unrounded."""
    rows = [{"pair": f"{b} - {a}", "a": a, "b": b, "diff": p.diff, "ci95_low": p.ci95 and p.ci95[0],
             "ci95_high": p.ci95 and p.ci95[1], "welch_p": p.p_value, "p_greater": p.p_greater,
             "p_greater_ci95_low": p.p_greater_ci95[0], "p_greater_ci95_high": p.p_greater_ci95[1]}
            for a, b, p in found]
    return pd.DataFrame(rows, columns=["pair", "a", "b", "diff", "ci95_low", "ci95_high", "welch_p", "p_greater",
                                       "p_greater_ci95_low", "p_greater_ci95_high"])

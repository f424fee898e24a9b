"""The comparison of every model of one pipeline run: a table of mean ± spread, and how far apart the models are."""

from __future__ import annotations

import dataclasses
import itertools
import math

import pandas as pd
from scipy import stats

from cifar3study.reporting.evaluation import ModelMetrics, Spread
from cifar3study.training.history import EpochRecord

CURVES = ("train_loss", "val_loss", "val_acc")


@dataclasses.dataclass(frozen=True)
class Difference:
    """Validation accuracy of model `a` minus that of model `b`, over their seed groups."""

    a: str
    b: str
    diff: float
    ci95: tuple[float, float] | None  # Welch's 95% interval; None unless both groups have 2+ seeds
    p_value: float | None  # Welch's two-sided t-test


def welch(a: Spread, b: Spread) -> tuple[tuple[float, float] | None, float | None]:
    """(95% interval of mean(a) - mean(b), p-value) without assuming equal variances."""
    if a.n < 2 or b.n < 2:
        return None, None
    va, vb = a.std**2 / a.n, b.std**2 / b.n
    diff = a.mean - b.mean
    if va + vb == 0:  # every seed agrees exactly: no spread to test against
        return (diff, diff), (1.0 if diff == 0 else 0.0)
    df = (va + vb) ** 2 / (va**2 / (a.n - 1) + vb**2 / (b.n - 1))
    half = float(stats.t.ppf(0.975, df)) * math.sqrt(va + vb)
    p = float(stats.ttest_ind(list(a.per_seed.values()), list(b.per_seed.values()), equal_var=False).pvalue)
    return (diff - half, diff + half), p


def differences(metrics: dict[str, ModelMetrics]) -> list[Difference]:
    """Every pair, the smaller model first (as the table lists them)."""
    order = sorted(metrics, key=lambda n: metrics[n].params)
    return [Difference(a, b, metrics[a].val_acc.mean - metrics[b].val_acc.mean, *welch(metrics[a].val_acc, metrics[b].val_acc))
            for a, b in itertools.combinations(order, 2)]


def comparison_table(metrics: dict[str, ModelMetrics]) -> pd.DataFrame:
    """One row per model, smallest first; every number of the report, unformatted (the CSV)."""
    rows = []
    for name, m in metrics.items():
        row = {"model": name, "params": m.params, "seeds": m.val_acc.n}
        for key in ("train_acc", "val_acc", "gap", "val_macro_f1"):
            s: Spread = getattr(m, key)
            row |= {key: s.mean, f"{key}_std": s.std}
        row |= {"val_acc_ci95_low": m.val_acc.ci95[0] if m.val_acc.ci95 else None,
                "val_acc_ci95_high": m.val_acc.ci95[1] if m.val_acc.ci95 else None,
                "seconds_per_epoch": m.seconds_per_epoch, "group_seconds_per_epoch": m.group_seconds_per_epoch}
        rows.append(row)
    return pd.DataFrame(rows).sort_values("params", ignore_index=True)


def _pm(mean: float, std: float | None) -> str:
    return f"{mean:.4f}" if std is None or pd.isna(std) else f"{mean:.4f} ± {std:.4f}"


def _interval(ci: tuple[float, float] | None) -> str:
    return "n/a (one seed)" if ci is None else f"[{ci[0]:.4f}, {ci[1]:.4f}]"


def to_markdown(table: pd.DataFrame, diffs: list[Difference]) -> str:
    lines = ["# CIFAR-3: FC vs CNN", "",
             "Mean ± sample std over the seeds; the interval is Student's t 95% interval of the mean.", "",
             "| model | params | seeds | train acc | val acc | val acc 95% CI | gap | val macro F1 | s / epoch (one seed) |",
             "|:--|--:|--:|--:|--:|--:|--:|--:|--:|"]
    for r in table.itertuples():
        ci = None if pd.isna(r.val_acc_ci95_low) else (r.val_acc_ci95_low, r.val_acc_ci95_high)
        lines.append(f"| {r.model} | {r.params:,} | {r.seeds} | {_pm(r.train_acc, r.train_acc_std)} | "
                     f"{_pm(r.val_acc, r.val_acc_std)} | {_interval(ci)} | {_pm(r.gap, r.gap_std)} | "
                     f"{_pm(r.val_macro_f1, r.val_macro_f1_std)} | {r.seconds_per_epoch:.2f} |")
    lines += ["", "Difference in validation accuracy (Welch's t-test, unequal variances):", ""]
    for d in diffs:
        p = "p n/a (needs 2+ seeds per model)" if d.p_value is None else f"p = {d.p_value:.2g}"
        lines.append(f"- {d.a} − {d.b}: {d.diff:+.4f}, 95% CI {_interval(d.ci95)}, {p}")
    return "\n".join(lines) + "\n"


def to_csv(table: pd.DataFrame) -> str:
    return table.to_csv(index=False)


def curves_table(histories: dict[str, list[EpochRecord]]) -> pd.DataFrame:
    """Per model and epoch, the mean, min and max over seeds of each curve: the long table `dvc plots` draws."""
    rows = [{"model": name, **dataclasses.asdict(row)} for name, history in histories.items() for row in history]
    grouped = pd.DataFrame(rows).groupby(["model", "epoch"], sort=False)[list(CURVES)]
    table = grouped.agg(["mean", "min", "max"])
    table.columns = [f"{metric}_{stat}" for metric, stat in table.columns]
    return table.reset_index()

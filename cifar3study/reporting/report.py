"""The comparison of every model of one pipeline run: a table of mean ± spread, and how far apart the models are.

Accuracy is on the models' evaluation split, "val" or "holdout" (data.holdout): columns and headings say which.
"""

from __future__ import annotations

import dataclasses
import itertools
import math

import pandas as pd
from scipy import stats

from cifar3study.errors import StageError
from cifar3study.reporting.evaluation import ModelMetrics, Spread, spread_keys
from cifar3study.training.history import EpochRecord

CURVES = ("train_loss", "val_loss", "val_acc")  # EpochRecord fields; the last two renamed after the split
SPLIT_NAMES = {"val": "validation", "holdout": "holdout"}  # in headings


def split_of(metrics: dict[str, ModelMetrics]) -> str:
    """The one split every model was evaluated on; a mix compares nothing."""
    splits = {name: m.split for name, m in metrics.items()}
    if len(set(splits.values())) > 1:
        raise StageError(f"the models were evaluated on different splits ({', '.join(f'{n}: {s}' for n, s in splits.items())}); "
                         "rerun `dvc repro` so every model uses the same data.holdout")
    return next(iter(splits.values()), "val")


@dataclasses.dataclass(frozen=True)
class Difference:
    """Accuracy on the evaluation split of model `a` minus that of model `b`, over their seed groups."""

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
    acc = {name: m.eval_acc for name, m in metrics.items()}
    return [Difference(a, b, acc[a].mean - acc[b].mean, *welch(acc[a], acc[b])) for a, b in itertools.combinations(order, 2)]


def comparison_table(metrics: dict[str, ModelMetrics]) -> pd.DataFrame:
    """One row per model, smallest first; every number of the report, unformatted (the CSV), columns named by split."""
    acc = f"{split_of(metrics)}_acc"
    rows = []
    for name, m in metrics.items():
        row = {"model": name, "params": m.params, "seeds": m.eval_acc.n}
        for key in spread_keys(m.split):
            s: Spread = getattr(m, key)
            row |= {key: s.mean, f"{key}_std": s.std}
        row |= {f"{acc}_ci95_low": m.eval_acc.ci95[0] if m.eval_acc.ci95 else None,
                f"{acc}_ci95_high": m.eval_acc.ci95[1] if m.eval_acc.ci95 else None,
                "seconds_per_epoch": m.seconds_per_epoch, "group_seconds_per_epoch": m.group_seconds_per_epoch}
        rows.append(row)
    return pd.DataFrame(rows).sort_values("params", ignore_index=True)


def _pm(mean: float, std: float | None) -> str:
    return f"{mean:.4f}" if std is None or pd.isna(std) else f"{mean:.4f} ± {std:.4f}"


def _interval(ci: tuple[float, float] | None) -> str:
    return "n/a (one seed)" if ci is None else f"[{ci[0]:.4f}, {ci[1]:.4f}]"


def table_split(table: pd.DataFrame) -> str:
    """The split a comparison table's accuracy columns are named after."""
    return "holdout" if "holdout_acc" in table.columns else "val"


def to_markdown(table: pd.DataFrame, diffs: list[Difference]) -> str:
    split = table_split(table)
    lines = ["# CIFAR-3: FC vs CNN", "",
             "Mean ± sample std over the seeds; the interval is Student's t 95% interval of the mean.", "",
             f"| model | params | seeds | train acc | {split} acc | {split} acc 95% CI | gap | {split} macro F1 | "
             "s / epoch (one seed) |",
             "|:--|--:|--:|--:|--:|--:|--:|--:|--:|"]
    for r in table.to_dict("records"):
        low, high = r[f"{split}_acc_ci95_low"], r[f"{split}_acc_ci95_high"]
        ci = None if pd.isna(low) else (low, high)
        lines.append(f"| {r['model']} | {r['params']:,} | {r['seeds']} | {_pm(r['train_acc'], r['train_acc_std'])} | "
                     f"{_pm(r[f'{split}_acc'], r[f'{split}_acc_std'])} | {_interval(ci)} | {_pm(r['gap'], r['gap_std'])} | "
                     f"{_pm(r[f'{split}_macro_f1'], r[f'{split}_macro_f1_std'])} | {r['seconds_per_epoch']:.2f} |")
    lines += ["", f"Difference in {SPLIT_NAMES[split]} accuracy (Welch's t-test, unequal variances):", ""]
    for d in diffs:
        p = "p n/a (needs 2+ seeds per model)" if d.p_value is None else f"p = {d.p_value:.2g}"
        lines.append(f"- {d.a} − {d.b}: {d.diff:+.4f}, 95% CI {_interval(d.ci95)}, {p}")
    return "\n".join(lines) + "\n"


def to_csv(table: pd.DataFrame) -> str:
    return table.to_csv(index=False)


def curves_table(histories: dict[str, list[EpochRecord]]) -> pd.DataFrame:
    """Per model and epoch, the mean, min and max over seeds of each curve: the long table `dvc plots` draws.

    The evaluation split's curves are named after it (`val_acc_mean`, or `holdout_acc_mean` for a holdout run).
    """
    split = next((h[0].split for h in histories.values() if h), "val")
    names = dict(zip(CURVES, ("train_loss", f"{split}_loss", f"{split}_acc"), strict=True))
    rows = [{"model": name, "epoch": row.epoch, **{names[k]: getattr(row, k) for k in CURVES}}
            for name, history in histories.items() for row in history]
    grouped = pd.DataFrame(rows).groupby(["model", "epoch"], sort=False)[list(names.values())]
    table = grouped.agg(["mean", "min", "max"])
    table.columns = [f"{metric}_{stat}" for metric, stat in table.columns]
    return table.reset_index()

"""The comparison of every model of one pipeline run: a table, as markdown and CSV."""

from __future__ import annotations

import dataclasses

import pandas as pd

from cifar3study.evaluation import ModelMetrics
from cifar3study.history import EpochRecord

COLUMNS = ["model", "params", "train_acc", "val_acc", "gap", "seconds_per_epoch"]


def comparison_table(metrics: dict[str, ModelMetrics]) -> pd.DataFrame:
    """One row per model, smallest first."""
    rows = [{"model": name, **dataclasses.asdict(m)} for name, m in metrics.items()]
    return pd.DataFrame(rows, columns=COLUMNS).sort_values("params", ignore_index=True)


def to_markdown(table: pd.DataFrame) -> str:
    shown = table.assign(params=table["params"].map("{:,}".format))
    body = shown.to_markdown(index=False, floatfmt=".4f", colalign=["left"] + ["right"] * (len(COLUMNS) - 1))
    return "# CIFAR-3: FC vs CNN\n\n" + body + "\n"


def to_csv(table: pd.DataFrame) -> str:
    return table.to_csv(index=False)


CURVES = ("train_loss", "val_loss", "val_acc")


def curves_table(histories: dict[str, list[list[EpochRecord]]]) -> pd.DataFrame:
    """Per model and epoch, the mean, min and max over seeds of each curve: the long table `dvc plots` draws."""
    rows = [{"model": name, **dataclasses.asdict(row)} for name, runs in histories.items() for run in runs for row in run]
    grouped = pd.DataFrame(rows).groupby(["model", "epoch"], sort=False)[list(CURVES)]
    table = grouped.agg(["mean", "min", "max"])
    table.columns = [f"{metric}_{stat}" for metric, stat in table.columns]
    return table.reset_index()

"""Matplotlib figures of results: learning curves, confusion matrices, accuracy against size.

Curves show the mean over a model's seeds with a min-max band. Figures are
bare `Figure` objects, not pyplot's: nothing global to leak or close. The
evaluation split is named as it is: "validation", or "holdout" for a run
with data.holdout > 0.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from cifar3study.reporting.evaluation import ModelMetrics
from cifar3study.reporting.report import SPLIT_NAMES
from cifar3study.training.history import EpochRecord


def _split_name(splits: set[str]) -> str:
    """"validation" or "holdout" (a mix, which compare refuses, names both)."""
    return " / ".join(sorted(SPLIT_NAMES[s] for s in splits)) or SPLIT_NAMES["val"]


def _band(ax: Axes, rows: list[EpochRecord], field: str, label: str) -> None:
    """Mean over seeds per epoch as a line, min to max as a shaded band of the same colour."""
    epochs = sorted({r.epoch for r in rows})
    values = np.array([[getattr(r, field) for r in rows if r.epoch == e] for e in epochs])
    (line,) = ax.plot(epochs, values.mean(1), label=label)
    ax.fill_between(epochs, values.min(1), values.max(1), color=line.get_color(), alpha=0.2, linewidth=0)


def learning_curves(history: list[EpochRecord], title: str) -> Figure:
    """One model: loss and accuracy per epoch, train and the evaluation split (validation or holdout)."""
    n, evaluated = len({r.seed for r in history}), _split_name({r.split for r in history})
    fig = Figure(figsize=(10, 4), layout="constrained")
    loss_ax, acc_ax = fig.subplots(1, 2)
    _band(loss_ax, history, "train_loss", "train")
    _band(loss_ax, history, "val_loss", evaluated)
    _band(acc_ax, history, "train_acc_running", "train (running, during the epoch)")
    _band(acc_ax, history, "val_acc", evaluated)
    loss_ax.set(xlabel="epoch", ylabel="cross-entropy", title=f"{title}: loss")
    acc_ax.set(xlabel="epoch", ylabel="accuracy", title=f"{title}: accuracy")
    for ax in (loss_ax, acc_ax):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"mean over {n} seed{'s' if n > 1 else ''}, band: min to max")
    return fig


def compared_curves(histories: dict[str, list[EpochRecord]]) -> Figure:
    """Every model's accuracy on the evaluation split and training loss per epoch, side by side."""
    fig = Figure(figsize=(10, 4), layout="constrained")
    acc_ax, loss_ax = fig.subplots(1, 2)
    for name, history in histories.items():
        _band(acc_ax, history, "val_acc", name)
        _band(loss_ax, history, "train_loss", name)
    evaluated = _split_name({r.split for history in histories.values() for r in history})
    acc_ax.set(xlabel="epoch", ylabel=f"{evaluated} accuracy", title=f"{evaluated} accuracy")
    loss_ax.set(xlabel="epoch", ylabel="cross-entropy", title="training loss")
    for ax in (acc_ax, loss_ax):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("CIFAR-3: mean over seeds, band: min to max")
    return fig


def confusion(matrix: np.ndarray, classes: tuple[str, ...], title: str) -> Figure:
    """Confusion matrix of the evaluation split with counts in the cells: rows actual, columns predicted."""
    fig = Figure(figsize=(5, 4.5), layout="constrained")
    ax = fig.subplots()
    ax.imshow(matrix, cmap="Blues")
    ticks = range(len(classes))
    ax.set(xticks=ticks, yticks=ticks, xticklabels=classes, yticklabels=classes,
           xlabel="predicted", ylabel="actual", title=title)
    for (i, j), count in np.ndenumerate(matrix):
        color = "white" if count > matrix.max() / 2 else "black"
        ax.text(j, i, str(count), ha="center", va="center", color=color)
    return fig


def accuracy_vs_params(metrics: dict[str, ModelMetrics]) -> Figure:
    """Accuracy on the evaluation split against parameter count (log x): each seed as a dot, the mean ± std as a bar."""
    fig = Figure(figsize=(6, 4.5), layout="constrained")
    ax = fig.subplots()
    for name, m in metrics.items():
        acc = m.eval_acc
        bar = ax.errorbar(m.params, acc.mean, yerr=acc.std or 0.0, fmt="o", capsize=5, markersize=7)
        ax.scatter([m.params] * acc.n, list(acc.per_seed.values()), s=12, alpha=0.5, color=bar[0].get_color())
        ax.annotate(f"{name} ({acc.mean:.3f}, n={acc.n})", (m.params, acc.mean), textcoords="offset points",
                    xytext=(8, 6))
    ax.set_xscale("log")
    sizes = [m.params for m in metrics.values()]
    ax.set_xlim(min(sizes) / 3, max(sizes) * 6)  # room for the labels right of each point
    ax.set(xlabel="parameters (log scale)", ylabel=f"{_split_name({m.split for m in metrics.values()})} accuracy",
           title="CIFAR-3: accuracy vs size (mean ± std over seeds)")
    ax.grid(alpha=0.3, which="both")
    return fig


def save_png(fig: Figure, path: Path) -> None:
    """Write a PNG; the format is explicit because atomic temp files have no .png suffix."""
    fig.savefig(path, dpi=110, format="png")

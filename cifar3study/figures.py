"""Matplotlib figures of results: learning curves, confusion matrices, accuracy against size.

Figures are bare `Figure` objects, not pyplot's: nothing global to leak or close.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from cifar3study.evaluation import ModelMetrics
from cifar3study.history import EpochRecord


def learning_curves(history: list[EpochRecord], title: str) -> Figure:
    """Training loss, and train/val accuracy, per epoch."""
    epochs = [row.epoch for row in history]
    fig = Figure(figsize=(10, 4), layout="constrained")
    loss_ax, acc_ax = fig.subplots(1, 2)
    loss_ax.plot(epochs, [r.train_loss for r in history], label="train")
    loss_ax.plot(epochs, [r.val_loss for r in history], label="validation")
    loss_ax.set(xlabel="epoch", ylabel="cross-entropy", title=f"{title}: loss")
    acc_ax.plot(epochs, [r.train_acc_running for r in history], label="train (running, during the epoch)")
    acc_ax.plot(epochs, [r.val_acc for r in history], label="validation")
    acc_ax.set(xlabel="epoch", ylabel="accuracy", title=f"{title}: accuracy")
    for ax in (loss_ax, acc_ax):
        ax.grid(alpha=0.3)
        ax.legend()
    return fig


def confusion(matrix: np.ndarray, classes: tuple[str, ...], title: str) -> Figure:
    """Validation confusion matrix with counts in the cells: rows actual, columns predicted."""
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
    """Validation accuracy against parameter count (log x), one point per model."""
    fig = Figure(figsize=(6, 4.5), layout="constrained")
    ax = fig.subplots()
    for name, m in metrics.items():
        ax.scatter(m.params, m.val_acc, s=60)
        ax.annotate(f"{name} ({m.val_acc:.3f})", (m.params, m.val_acc), textcoords="offset points", xytext=(6, 6))
    ax.set_xscale("log")
    ax.set(xlabel="parameters (log scale)", ylabel="validation accuracy", title="CIFAR-3: accuracy vs size")
    ax.grid(alpha=0.3, which="both")
    return fig


def save_png(fig: Figure, path: Path) -> None:
    """Write a PNG; the format is explicit because atomic temp files have no .png suffix."""
    fig.savefig(path, dpi=110, format="png")

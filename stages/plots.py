"""Figures logged to MLflow (DVC renders its own plots from the CSV files)."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # no screen on CI or GPU boxes

import numpy as np
from matplotlib import pyplot as plt
from matplotlib.figure import Figure


def learning_curves(history: list[dict], title: str) -> Figure:
    """Training loss, and train/val accuracy, per epoch."""
    epochs = [row["epoch"] for row in history]
    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(10, 4), layout="constrained")
    loss_ax.plot(epochs, [r["train_loss"] for r in history], label="train")
    loss_ax.plot(epochs, [r["val_loss"] for r in history], label="validation")
    loss_ax.set(xlabel="epoch", ylabel="cross-entropy", title=f"{title}: loss")
    acc_ax.plot(epochs, [r["train_acc_running"] for r in history], label="train (running, during the epoch)")
    acc_ax.plot(epochs, [r["val_acc"] for r in history], label="validation")
    acc_ax.set(xlabel="epoch", ylabel="accuracy", title=f"{title}: accuracy")
    for ax in (loss_ax, acc_ax):
        ax.grid(alpha=0.3)
        ax.legend()
    return fig


def confusion(matrix: np.ndarray, classes: list[str], title: str) -> Figure:
    """Validation confusion matrix with counts in the cells."""
    fig, ax = plt.subplots(figsize=(5, 4.5), layout="constrained")
    ax.imshow(matrix, cmap="Blues")
    ticks = range(len(classes))
    ax.set(xticks=ticks, yticks=ticks, xticklabels=classes, yticklabels=classes,
           xlabel="predicted", ylabel="actual", title=title)
    for (i, j), count in np.ndenumerate(matrix):
        color = "white" if count > matrix.max() / 2 else "black"
        ax.text(j, i, str(count), ha="center", va="center", color=color)
    return fig


def accuracy_vs_params(rows: list[dict]) -> Figure:
    """Validation accuracy against parameter count (log x), one point per model."""
    fig, ax = plt.subplots(figsize=(6, 4.5), layout="constrained")
    for row in rows:
        ax.scatter(row["params"], row["val_acc"], s=60)
        ax.annotate(f"{row['model']} ({row['val_acc']:.3f})", (row["params"], row["val_acc"]),
                    textcoords="offset points", xytext=(6, 6))
    ax.set_xscale("log")
    ax.set(xlabel="parameters (log scale)", ylabel="validation accuracy", title="CIFAR-3: accuracy vs size")
    ax.grid(alpha=0.3, which="both")
    return fig


def save(fig: Figure, path: object, fmt: str = "png") -> None:
    """Write and close; `fmt` is explicit because atomic temp files have no .png suffix."""
    fig.savefig(path, dpi=110, format=fmt)
    plt.close(fig)


def close_all() -> None:
    plt.close("all")

"""The figures of a study report, drawn from plain numbers: search history, score per key, importances, final refits.

They take points and spreads rather than the report's records, so this
module stays below study_report (which draws them) with no import circle.
Figures are bare `Figure` objects, not pyplot's: nothing global to leak.
"""

from __future__ import annotations

import json
import math
from typing import NamedTuple

from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from cifar3study.reporting.evaluation import Spread

PANEL = (4.6, 3.6)  # inches per panel


class Point(NamedTuple):
    """One trial: x is its number (history) or a searched key's value; y its score (last_score when pruned)."""

    x: object
    y: float
    pruned: bool = False


def label(value: object) -> str:
    """A value as a short tick or cell label: floats to 4 significant digits, lists and the like as JSON."""
    if isinstance(value, float):
        return f"{value:.4g}"
    return value if isinstance(value, str) else json.dumps(value)


def _numeric(values: list[object]) -> bool:
    return all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)


def _panels(count: int, sharey: bool = True) -> tuple[Figure, list[Axes]]:
    cols = min(3, count)
    rows = math.ceil(count / cols)
    fig = Figure(figsize=(0.6 + PANEL[0] * cols, 0.8 + PANEL[1] * rows), layout="constrained")
    axes = list(fig.subplots(rows, cols, sharey=sharey, squeeze=False).ravel())
    for ax in axes[count:]:
        ax.set_visible(False)
    return fig, axes[:count]


def _empty(text: str) -> Figure:
    """A figure that says why it has nothing to draw, so a report always has the same files."""
    fig = Figure(figsize=(6, 2), layout="constrained")
    ax = fig.subplots()
    ax.text(0.5, 0.5, text, ha="center", va="center")
    ax.set_axis_off()
    return fig


def _best_so_far(points: list[Point]) -> tuple[list[object], list[float]]:
    """The running maximum over complete trials, in trial order, as a step line."""
    xs, ys, best = [], [], -math.inf
    for p in sorted((p for p in points if not p.pruned), key=lambda p: p.x):
        best = max(best, p.y)
        xs.append(p.x)
        ys.append(best)
    return xs, ys


def history_figure(histories: dict[str, list[Point]], ylabel: str) -> Figure:
    """Per model, each trial's score by trial number, the best so far as a line, pruned trials as grey crosses."""
    if not histories:
        return _empty("no trial has a score yet")
    fig, axes = _panels(len(histories))
    for ax, (model, points) in zip(axes, histories.items()):
        done = [p for p in points if not p.pruned]
        pruned = [p for p in points if p.pruned]
        ax.scatter([p.x for p in done], [p.y for p in done], s=18, label="complete")
        if pruned:
            ax.scatter([p.x for p in pruned], [p.y for p in pruned], marker="x", color="grey", s=18,
                       label="pruned (score where it stopped)")
        ax.step(*_best_so_far(points), where="post", color="black", linewidth=1, label="best so far")
        ax.set(title=model, xlabel="trial number")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlim(min(p.x for p in points) - 0.5, max(p.x for p in points) + 0.5)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small", loc="best")
    axes[0].set_ylabel(ylabel)
    fig.suptitle("optimisation history", fontsize="medium")
    return fig


def _categories(series: dict[str, list[Point]]) -> dict[str, int]:
    """Position of each distinct value's label on a categorical axis, in label order."""
    labels = sorted({label(p.x) for points in series.values() for p in points})
    return {text: i for i, text in enumerate(labels)}


def key_figure(key: str, series: dict[str, list[Point]], log: bool, ylabel: str) -> Figure:
    """Every model's complete trials: score against one searched key (numbers on a scale, the rest as categories)."""
    fig = Figure(figsize=(7, 4.4), layout="constrained")
    ax = fig.subplots()
    values = [p.x for points in series.values() for p in points]
    places = None if _numeric(values) else _categories(series)
    for i, (model, points) in enumerate(series.items()):
        offset = (i - (len(series) - 1) / 2) * 0.08  # models side by side on categories, not on top of each other
        xs = [p.x if places is None else places[label(p.x)] + offset for p in points]
        ax.scatter(xs, [p.y for p in points], s=20, alpha=0.8, label=model)
    if places is not None:
        ax.set_xticks(list(places.values()), list(places), rotation=30 if len(places) > 4 else 0)
        ax.set_xlim(-0.5, len(places) - 0.5)
    elif log and values and min(values) > 0:
        ax.set_xscale("log")
    ax.set(xlabel=key, ylabel=ylabel, title=f"score against {key}")
    ax.grid(alpha=0.3, which="both")
    ax.legend(title="model")
    return fig


def importance_figure(importances: dict[str, dict[str, float]]) -> Figure:
    """Per model, fANOVA importance of each searched key as horizontal bars, the largest on top."""
    if not importances:
        return _empty("no parameter importances could be computed")
    fig, axes = _panels(len(importances), sharey=False)
    for ax, (model, weights) in zip(axes, importances.items()):
        order = sorted(weights, key=lambda k: (weights[k], k))
        ax.barh(order, [weights[k] for k in order])
        ax.set(title=model, xlabel="importance (fANOVA)", xlim=(0, 1))
        ax.grid(alpha=0.3, axis="x")
    fig.suptitle("parameter importances", fontsize="medium")
    return fig


def final_figure(tests: dict[str, Spread]) -> Figure:
    """Test accuracy of each model's refits: one dot per seed, the mean with its 95% interval."""
    if not tests:
        return _empty("no final phase has finished")
    fig = Figure(figsize=(1.5 + 1.6 * len(tests), 4.2), layout="constrained")
    ax = fig.subplots()
    for i, s in enumerate(tests.values()):
        ax.scatter([i + 0.12] * s.n, list(s.per_seed.values()), s=14, alpha=0.6)
        low, high = s.ci95 or (s.mean, s.mean)
        ax.errorbar([i], [s.mean], yerr=[[s.mean - low], [high - s.mean]], fmt="o", color="black", capsize=5)
    ax.set_xticks(range(len(tests)), list(tests))
    ax.set(xlim=(-0.6, len(tests) - 0.4), ylabel="test accuracy",
           title="final refits on the test split\ndots: seeds, bar: 95% interval of the mean")
    ax.grid(alpha=0.3, axis="y")
    return fig

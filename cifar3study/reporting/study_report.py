"""The report of a study: every trial's seed groups ranked per model, each against the best, with a figure per swept key.

Within a model, each trial is compared with that model's best trial by
Welch's t-test on validation accuracy over their seeds; the p-values are
Holm-corrected over those comparisons, so "cannot be told apart from the
best" holds for the family of trials, not for each pair alone. With a single
seed there is no spread to test against, and the report says so rather than
printing a p-value.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import re
from pathlib import Path

import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from cifar3study.errors import StageError, quote
from cifar3study.files import atomic_path, write_text_atomic
from cifar3study.reporting.evaluation import ModelMetrics, Spread
from cifar3study.reporting.figures import save_png
from cifar3study.reporting.report import welch

ALPHA = 0.05
MAX_PANELS = 9  # beyond this many combinations of the other swept keys, a figure averages over them


@dataclasses.dataclass(frozen=True)
class TrialResult:
    key: str  # trial key: hash of study name, base commit and overrides
    name: str  # the trial's DVC experiment name
    overrides: dict[str, object]  # dotted params key -> value: the swept keys and the `set` keys
    metrics: dict[str, ModelMetrics]  # per model, as reporting.evaluation.read_metrics reads the trial's metrics


@dataclasses.dataclass(frozen=True)
class Ranked:
    """One trial of one model, against that model's best trial (diff and p-values None for the best itself)."""

    trial: TrialResult
    model: str
    rank: int
    diff: float | None
    p_value: float | None  # Welch, two-sided; None when either group has one seed
    p_holm: float | None

    @property
    def val_acc(self) -> Spread:
        return self.trial.metrics[self.model].val_acc

    @property
    def verdict(self) -> str:
        if self.rank == 1:
            return "best"
        if self.p_holm is None:
            return "no test possible (one seed)"
        return "cannot be told apart from the best" if self.p_holm >= ALPHA else "worse than the best"


def holm(p_values: list[float]) -> list[float]:
    """Holm's step-down adjusted p-values, in the order given: the k-th smallest times (m - k + 1), kept monotone."""
    m = len(p_values)
    adjusted = [0.0] * m
    running = 0.0
    for k, i in enumerate(sorted(range(m), key=lambda i: p_values[i])):
        running = max(running, min(1.0, (m - k) * p_values[i]))
        adjusted[i] = running
    return adjusted


def rank_model(trials: list[TrialResult], model: str) -> list[Ranked]:
    """The trials that trained `model`, best mean validation accuracy first, each tested against the best."""
    have = sorted((t for t in trials if model in t.metrics), key=lambda t: (-t.metrics[model].val_acc.mean, t.name))
    best = have[0].metrics[model].val_acc
    tests = [welch(t.metrics[model].val_acc, best)[1] for t in have[1:]]
    done = [p for p in tests if p is not None]
    adjusted = iter(holm(done))  # corrected over the tests actually made
    rows = [Ranked(have[0], model, 1, None, None, None)]
    for rank, (trial, p) in enumerate(zip(have[1:], tests), start=2):
        diff = trial.metrics[model].val_acc.mean - best.mean
        rows.append(Ranked(trial, model, rank, diff, p, None if p is None else next(adjusted)))
    return rows


def _value(value: object) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def _cell(text: object) -> str:
    return str(text).replace("|", "\\|")


def _settings(trial: TrialResult, swept: list[str]) -> str:
    return " | ".join(_cell(_value(trial.overrides[k])) for k in swept)


def _models(trials: list[TrialResult]) -> list[str]:
    return list(dict.fromkeys(m for t in trials for m in t.metrics))


def _check(trials: list[TrialResult], swept: list[str]) -> None:
    if not trials:
        raise StageError("no finished trial to report; rerun the study once a trial has finished")
    for trial in trials:
        missing = [k for k in swept if k not in trial.overrides]
        if missing or not trial.metrics:
            what = f"no value for swept key {quote(missing[0])}" if missing else "no model metrics"
            raise StageError(f"trial {quote(trial.name)} has {what}; rerun that trial")


def trials_table(trials: list[TrialResult], swept: list[str]) -> pd.DataFrame:
    """One row per trial and model, with every number of the report, unformatted (the CSV)."""
    rows = []
    for model in _models(trials):
        for r in rank_model(trials, model):
            m = r.trial.metrics[model]
            row = {"model": model, "rank": r.rank, "trial": r.trial.name, "trial_key": r.trial.key,
                   **{k: _value(v) for k, v in r.trial.overrides.items()}, "n": m.val_acc.n,
                   "seeds": " ".join(str(s) for s in m.val_acc.per_seed)}
            for key in ("val_acc", "train_acc", "gap", "val_macro_f1"):
                s: Spread = getattr(m, key)
                row |= {key: s.mean, f"{key}_std": s.std}
            row |= {"val_acc_ci95_low": m.val_acc.ci95[0] if m.val_acc.ci95 else None,
                    "val_acc_ci95_high": m.val_acc.ci95[1] if m.val_acc.ci95 else None,
                    "diff_vs_best": r.diff, "p_welch": r.p_value, "p_holm": r.p_holm, "verdict": r.verdict,
                    "params": m.params, "seconds_per_epoch": m.seconds_per_epoch}
            rows.append(row)
    return pd.DataFrame(rows)


def _pm(s: Spread) -> str:
    return f"{s.mean:.4f}" if s.std is None else f"{s.mean:.4f} ± {s.std:.4f}"


def _interval(ci: tuple[float, float] | None) -> str:
    return "n/a" if ci is None else f"[{ci[0]:.4f}, {ci[1]:.4f}]"


def _seed_summary(trials: list[TrialResult]) -> str:
    seeds = {tuple(m.val_acc.per_seed) for t in trials for m in t.metrics.values()}
    if len(seeds) == 1:
        (only,) = seeds
        plural = "s" if len(only) > 1 else ""
        return f"{len(only)} seed{plural} each (seed{plural} {', '.join(map(str, only))})"
    sizes = sorted(len(s) for s in seeds)
    return f"{sizes[0]} to {sizes[-1]} seeds each"


def _intro(study: str, swept: list[str], trials: list[TrialResult], base_commit: str) -> list[str]:
    fixed = {k: v for k, v in trials[0].overrides.items() if k not in swept}
    models = _models(trials)
    return [f"# Study `{study}`", "",
             f"{len(trials)} trial{'s' if len(trials) > 1 else ''} × {len(models)} models ({', '.join(models)}), "
             f"{_seed_summary(trials)}" + (f", base commit `{base_commit[:12]}`." if base_commit else "."),
             f"Swept: {', '.join(f'`{k}`' for k in swept)}."
             + (f" Set in every trial: {', '.join(f'`{k}={_value(v)}`' for k, v in fixed.items())}." if fixed else ""),
             "", "Validation accuracy is the mean ± sample std over a trial's seeds, with Student's t 95% interval of "
             "the mean. Within each model, every trial is compared with that model's best trial by Welch's t-test; "
             f"p-values are Holm-corrected over those comparisons and tested at {ALPHA}.", ""]


def _best_lines(rankings: dict[str, list[Ranked]], swept: list[str]) -> list[str]:
    lines = ["## Best trial per model", "", "| model | trial | " + " | ".join(f"`{k}`" for k in swept)
             + " | val acc | 95% CI | n |", "|:--|:--|" + "--:|" * len(swept) + "--:|--:|--:|"]
    for model, rows in rankings.items():
        best = rows[0]
        lines.append(f"| {model} | {_cell(best.trial.name)} | {_settings(best.trial, swept)} | {_pm(best.val_acc)} | "
                     f"{_interval(best.val_acc.ci95)} | {best.val_acc.n} |")
    order = sorted(rankings, key=lambda m: -rankings[m][0].val_acc.mean)
    for a, b in itertools.combinations(order, 2):
        sa, sb = rankings[a][0].val_acc, rankings[b][0].val_acc
        ci, p = welch(sa, sb)
        test = "one seed: no test possible" if p is None else f"95% CI {_interval(ci)}, Welch p = {p:.2g}"
        lines += ["", f"Best {a} − best {b}: {sa.mean - sb.mean:+.4f} ({test})."]
    return [*lines, ""]


def _model_lines(model: str, rows: list[Ranked], swept: list[str]) -> list[str]:
    lines = [f"## {model}: trials ranked by validation accuracy", "",
             "| rank | trial | " + " | ".join(f"`{k}`" for k in swept)
             + " | val acc | 95% CI | n | train acc | vs best | p (Holm) | verdict |",
             "|--:|:--|" + "--:|" * len(swept) + "--:|--:|--:|--:|--:|--:|:--|"]
    for r in rows:
        m = r.trial.metrics[model]
        diff = "" if r.diff is None else f"{r.diff:+.4f}"
        p = "" if r.p_holm is None else f"{r.p_holm:.2g}"
        lines.append(f"| {r.rank} | {_cell(r.trial.name)} | {_settings(r.trial, swept)} | {_pm(m.val_acc)} | "
                     f"{_interval(m.val_acc.ci95)} | {m.val_acc.n} | {_pm(m.train_acc)} | "
                     f"{diff} | {p} | {r.verdict} |")
    return [*lines, "", _tied_sentence(model, rows), ""]


def _tied_sentence(model: str, rows: list[Ranked]) -> str:
    if len(rows) == 1:
        return f"Only one trial trained {model}: nothing to compare."
    if all(r.p_holm is None for r in rows[1:]):
        return f"{model}: one seed per trial, so no test is possible; the ranking rests on single runs."
    tied = [r.trial.name for r in rows[1:] if r.verdict == "cannot be told apart from the best"]
    if not tied:
        return f"{model}: every other trial is worse than the best at {ALPHA} (Holm)."
    return (f"{model}: {len(tied)} trial{'s' if len(tied) > 1 else ''} cannot be told apart from the best "
            f"({_cell(rows[0].trial.name)}) at {ALPHA} (Holm): {', '.join(_cell(t) for t in tied)}.")


def to_markdown(study: str, swept: list[str], trials: list[TrialResult], figures: dict[str, str],
                base_commit: str = "") -> str:
    """The report page; `figures` maps each swept key to its PNG's file name."""
    rankings = {model: rank_model(trials, model) for model in _models(trials)}
    lines = _intro(study, swept, trials, base_commit) + _best_lines(rankings, swept)
    for model, rows in rankings.items():
        lines += _model_lines(model, rows, swept)
    lines += ["## Validation accuracy against each swept parameter", ""]
    lines += [f"![validation accuracy against {key}]({name})\n" for key, name in figures.items()]
    lines += ["Every number, one row per trial and model: [trials.csv](trials.csv)."]
    return "\n".join(lines) + "\n"


def _label(value: object) -> str:
    return f"{value:g}" if isinstance(value, float) else _value(value)


def _x_values(trials: list[TrialResult], key: str) -> list[object]:
    values = list({_value(t.overrides[key]): t.overrides[key] for t in trials}.values())
    numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
    return sorted(values) if numeric else values


def _panels(trials: list[TrialResult], key: str, swept: list[str]) -> dict[str, list[TrialResult]]:
    """Trials grouped by the values of the other swept keys: one panel each, or one panel of all when too many."""
    others = [k for k in swept if k != key]
    groups: dict[str, list[TrialResult]] = {}
    for t in trials:
        groups.setdefault(", ".join(f"{k}={_label(t.overrides[k])}" for k in others), []).append(t)
    return groups if len(groups) <= MAX_PANELS else {f"mean over {', '.join(others)}; bars: std of those trials": trials}


def _point(group: list[Spread]) -> tuple[float, float, float, list[float]]:
    """(mean, bar low, bar high, dots): one trial's 95% interval and seeds, or the spread of several trials' means."""
    if len(group) == 1:
        s = group[0]
        low, high = s.ci95 or (s.mean, s.mean)
        return s.mean, low, high, list(s.per_seed.values())
    means = [s.mean for s in group]
    mean = sum(means) / len(means)
    std = math.sqrt(sum((x - mean) ** 2 for x in means) / (len(means) - 1))
    return mean, mean - std, mean + std, means


def _series(group: list[TrialResult], model: str, key: str, xs: list[object]) -> list[tuple[int, tuple]]:
    """(x position, point) for each value of `key` at which some trial of `group` trained `model`."""
    out = []
    for i, x in enumerate(xs):
        at = [t.metrics[model].val_acc for t in group if model in t.metrics and _value(t.overrides[key]) == _value(x)]
        if at:
            out.append((i, _point(at)))
    return out


def _draw_panel(ax: Axes, group: list[TrialResult], key: str, xs: list[object], models: list[str]) -> None:
    for i, model in enumerate(models):
        offset = (i - (len(models) - 1) / 2) * 0.08  # models side by side, so their bars do not overlap
        series = _series(group, model, key, xs)
        pos = [x + offset for x, _ in series]
        means = [p[0] for _, p in series]
        err = [[p[0] - p[1] for _, p in series], [p[2] - p[0] for _, p in series]]
        bars = err if any(map(any, err)) else None  # one seed: no zero-height caps
        bar = ax.errorbar(pos, means, yerr=bars, fmt="-o", capsize=4, markersize=5, label=model)
        for x, (_, _, _, dots) in zip(pos, (p for _, p in series)):
            if len(dots) > 1:
                ax.scatter([x + 0.03] * len(dots), dots, s=10, alpha=0.4, color=bar[0].get_color(), linewidths=0)
    ax.set_xticks(range(len(xs)), [_label(x) for x in xs])
    ax.set(xlabel=key, xlim=(-0.4, len(xs) - 0.6))
    ax.grid(alpha=0.3)


def study_figure(study: str, key: str, swept: list[str], trials: list[TrialResult]) -> Figure:
    """Validation accuracy against `key`: one line per model with its 95% interval, a panel per other setting."""
    xs = _x_values(trials, key)
    panels = _panels(trials, key, swept)
    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig = Figure(figsize=(1.5 + 4.2 * cols, 0.8 + 3.4 * rows), layout="constrained")
    axes = fig.subplots(rows, cols, sharey=True, squeeze=False).ravel()
    for ax, (title, group) in zip(axes, panels.items()):
        _draw_panel(ax, group, key, xs, _models(trials))
        ax.set_title(title)
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    axes[0].set_ylabel("validation accuracy")
    axes[0].legend(title="model", loc="best")
    n = max(m.val_acc.n for t in trials for m in t.metrics.values())
    note = "one seed per trial: no interval" if n < 2 else "bars: 95% interval of the mean, dots: seeds"
    fig.suptitle(f"{study}: validation accuracy vs {key}\n{note}", fontsize="medium")
    return fig


def _figure_name(key: str) -> str:
    return "val_acc_vs_" + re.sub(r"[^A-Za-z0-9._-]", "_", key) + ".png"


def write_study_report(out_dir: Path, study: str, swept: list[str], trials: list[TrialResult],
                       *, base_commit: str = "") -> list[Path]:
    """reports/studies/<name>/: report.md, trials.csv, one PNG per swept key; atomic; returns the files written.

    Everything is rendered before the first file is written: bad input leaves the folder as it was.
    """
    _check(trials, swept)
    names = {key: _figure_name(key) for key in swept}
    figures = {key: study_figure(study, key, swept, trials) for key in swept}
    markdown = to_markdown(study, swept, trials, names, base_commit)
    csv = trials_table(trials, swept).to_csv(index=False)
    out_dir = Path(out_dir)
    written = []
    for key, fig in figures.items():
        with atomic_path(out_dir / names[key]) as tmp:
            save_png(fig, tmp)
        written.append(out_dir / names[key])
    write_text_atomic(out_dir / "trials.csv", csv)
    write_text_atomic(out_dir / "report.md", markdown)
    return [out_dir / "report.md", out_dir / "trials.csv", *written]

"""The report of a study: each model's search ranked and costed, its winner refit and tested, tuned against tuned.

Trials are chosen on a selection split: a holdout of the training split, or
the test split itself (`val`: optimistic, and the report says so). The
statistics are in study_stats, the figures in study_figures.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import re
from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure

from cifar3study.errors import StageError, quote
from cifar3study.files import atomic_path, write_text_atomic
from cifar3study.reporting import study_stats as stats
from cifar3study.reporting.evaluation import Spread
from cifar3study.reporting.figures import save_png
from cifar3study.reporting.study_figures import Point, final_figure, history_figure, importance_figure, key_figure
from cifar3study.reporting.study_figures import label as _show
from cifar3study.reporting.study_stats import Pair, Versus

STATES = ("COMPLETE", "PRUNED", "FAIL", "RUNNING", "WAITING")
TRIAL_COLUMNS = ["model", "number", "name", "state", "score_mean", "score_std", "score_n", "last_score", "epochs",
                 "full_epochs", "seeds", "rank", "diff_vs_best", "p_welch", "p_holm", "verdict"]
FINAL_COLUMNS = ["model", "winner", "config", "selection_mean", "selection_std", "selection_n", "test_mean", "test_std",
                 "test_ci95_low", "test_ci95_high", "n_seeds", "seeds", "optimism", "n_trials"]
SPLITS = {"holdout": "holdout accuracy", "val": "test-split accuracy (optimistic)"}


@dataclasses.dataclass(frozen=True)
class TrialRow:
    model: str
    number: int  # the trial's number in its model's search
    name: str  # its DVC experiment name
    state: str  # "COMPLETE" | "PRUNED" | "FAIL" | "RUNNING" | "WAITING"
    overrides: dict[str, object]  # the searched keys' values
    score: Spread | None  # selection-split accuracy over the trial's seeds (COMPLETE only)
    last_score: float | None  # mean score at the last epoch it trained (PRUNED: where it stopped); None if unknown
    epochs: int  # epochs it trained (pruned: fewer)
    full_epochs: int  # epochs it would have trained unpruned
    seeds: int  # seeds per trial (cost = epochs * seeds)


@dataclasses.dataclass(frozen=True)
class FinalRow:
    winner: TrialRow  # the chosen configuration (a COMPLETE trial)
    test: Spread  # test-split accuracy of the refits, one value per final seed
    seeds: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class ModelSearch:
    model: str
    keys: list[str]  # searched keys that apply to this model
    trials: list[TrialRow]
    importances: dict[str, float]  # fANOVA importance per key (sums to 1); {} when it could not be computed
    final: FinalRow | None  # None: the study has no final phase, or it has not finished


@dataclasses.dataclass(frozen=True)
class StudyInfo:
    name: str
    base_commit: str
    select: str  # "holdout" | "val"
    holdout: float  # data.holdout fraction during the search (0 with select val)
    sampler: str  # "grid" | "tpe" | "random"
    pruner: str  # "asha" | "median" | "none"
    log_keys: frozenset[str]  # searched keys on a log scale (figures use a log x axis)


def _check_search(s: ModelSearch) -> None:
    for t in s.trials:
        where = f"trial {quote(t.name)} of model {quote(s.model)}"
        if t.state not in STATES:
            raise StageError(f"{where} has state {quote(t.state)}, not one of {', '.join(STATES)}; rerun the report")
        if t.state == "COMPLETE" and t.score is None:
            raise StageError(f"{where} is complete but has no score; rerun that trial")
    if not all(math.isfinite(v) for v in s.importances.values()):
        raise StageError(f"model {quote(s.model)} has a non-finite parameter importance; rerun the report")
    f = s.final
    if f is not None and (f.winner.score is None or f.winner.state != "COMPLETE"):
        raise StageError(f"model {quote(s.model)}: final winner {quote(f.winner.name)} is not a complete trial")
    if f is not None and sorted(f.test.per_seed) != sorted(f.seeds):
        raise StageError(f"model {quote(s.model)}: the final test scores are not one per final seed; rerun its final phase")


def _check(info: StudyInfo, searches: list[ModelSearch]) -> None:
    if not searches:
        raise StageError(f"study {quote(info.name)} searched no model: nothing to report; check its models")
    if info.select not in SPLITS:
        raise StageError(f"select {quote(info.select)} is neither 'holdout' nor 'val'; fix the study file")
    for s in searches:
        _check_search(s)


def ranked(search: ModelSearch) -> list[tuple[TrialRow, Versus]]:
    """The complete trials, best mean score first (ties by trial number), each against the best."""
    done = sorted((t for t in search.trials if t.state == "COMPLETE"), key=lambda t: (-t.score.mean, t.number))
    return list(zip(done, stats.against_best([t.score for t in done])))


def cost(trials: list[TrialRow]) -> tuple[int, int]:
    """(epochs spent, epochs the same trials would have cost unpruned), both times seeds.

    Only pruning is counted as a saving: a failed or unfinished trial would
    have cost the same without a pruner, so it adds what it spent to both.
    """
    spent = sum(t.epochs * t.seeds for t in trials)
    full = sum((t.full_epochs if t.state in ("COMPLETE", "PRUNED") else t.epochs) * t.seeds for t in trials)
    return spent, full


def pairs(searches: list[ModelSearch]) -> list[tuple[str, str, Pair]]:
    """(a, b, b − a) for each pair of models with a final, in the order of `searches`."""
    done = [s for s in searches if s.final is not None]
    return [(a.model, b.model, stats.compare(a.final.test, b.final.test)) for a, b in itertools.combinations(done, 2)]


def _json(value: object) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def _cell(text: object) -> str:
    return str(text).replace("|", "\\|")


def _settings(t: TrialRow, keys: list[str]) -> str:
    return " | ".join(_cell(_show(t.overrides[k])) if k in t.overrides else "" for k in keys)


def _config(t: TrialRow) -> str:
    return ", ".join(f"`{k}={_show(v)}`" for k, v in t.overrides.items()) or "(defaults)"


def _protocol(info: StudyInfo, searches: list[ModelSearch]) -> list[str]:
    sizes = sorted({len(s.final.seeds) for s in searches if s.final is not None})
    refit = ("No final phase has finished: no test-split numbers below." if not sizes else
             f"Each model's winner was refit on the full training split from {'/'.join(map(str, sizes))} new seeds "
             "and evaluated once on the test split.")
    if info.select == "val":
        return ["> **Warning: trials were selected on the test split (`select: val`).** Ranks and the winners' "
                "selection scores come from the data used to choose them, so they are optimistic (selection bias). "
                "The final refits are tested on that same split, so their numbers are not an unbiased estimate "
                "either. Use `select: holdout` for an honest one.", ">", f"> {refit}"]
    return [f"**Protocol.** Trials were selected on a holdout of {info.holdout * 100:g}% of the training split; "
            "the test split played no part in choosing.",
            refit.replace("on the test split", "on the untouched test split")]


def _header(info: StudyInfo, searches: list[ModelSearch]) -> list[str]:
    trials = sum(len(s.trials) for s in searches)
    commit = f"Base commit `{info.base_commit[:12]}`. " if info.base_commit else ""
    return [f"# Study `{info.name}`", "",
            f"{commit}Each model's hyperparameters were searched separately: {stats.plural(trials, 'trial')} over "
            f"{', '.join(s.model for s in searches)} (sampler: {info.sampler}, pruner: {info.pruner}).", "",
            *_protocol(info, searches), "",
            f"A trial's score is its {SPLITS[info.select]}: mean ± sample std over its seeds, with Student's t "
            "95% interval. Within a model, every complete trial is compared with the best by Welch's t-test, "
            f"Holm-corrected over those comparisons at {stats.ALPHA}.", ""]


def _cost_lines(searches: list[ModelSearch]) -> list[str]:
    lines = ["## Search cost", "", "| model | complete | pruned | failed | running | waiting | epochs spent "
             "| unpruned | saved by pruning |", "|:--|--:|--:|--:|--:|--:|--:|--:|--:|"]
    for s in searches:
        counts = [sum(t.state == state for t in s.trials) for state in STATES]
        spent, full = cost(s.trials)
        saved = "n/a" if full == 0 else f"{100 * (full - spent) / full:.1f}%"
        lines.append(f"| {s.model} | {' | '.join(map(str, counts))} | {spent} | {full} | {saved} |")
    return [*lines, "", "Epochs are epochs × seeds. Unpruned: what the same trials would have cost had none been "
            "pruned (a failed or unfinished trial counts what it spent).", ""]


def _final_lines(searches: list[ModelSearch]) -> list[str]:
    lines = ["## Final phase: each winner refit and tested once", "",
             "| model | winner | configuration | chosen from | selection score | test accuracy | 95% CI | seeds "
             "| optimism |", "|:--|:--|:--|--:|--:|--:|--:|--:|--:|"]
    missing = []
    for s in searches:
        if s.final is None:
            missing.append(s.model)
            continue
        f, w = s.final, s.final.winner
        chosen = sum(t.state == "COMPLETE" for t in s.trials)
        lines.append(f"| {s.model} | {_cell(w.name)} (#{w.number}) | {_cell(_config(w))} | "
                     f"{stats.plural(chosen, 'trial')} | {stats.pm(w.score)} (n={w.score.n}) | {stats.pm(f.test)} | "
                     f"{stats.interval(f.test.ci95)} | {len(f.seeds)} | {w.score.mean - f.test.mean:+.4f} |")
    lines += ["", "Optimism: the winner's selection score minus its test accuracy, what choosing the best of "
              "the complete trials on the selection split flattered it by.", ""]
    lines += [f"{m}: no final phase (none configured, or it has not finished)." for m in missing]
    return [*lines, ""] if missing else lines


def _ranked_lines(s: ModelSearch) -> list[str]:
    rows = ranked(s)
    if not rows:
        return ["No complete trial.", ""]
    keys = " | ".join(f"`{k}`" for k in s.keys)
    lines = [f"| rank | # | trial | {keys} | score | 95% CI | n | vs best | p (Holm) | verdict |",
             "|--:|--:|:--|" + "--:|" * len(s.keys) + "--:|--:|--:|--:|--:|:--|"]
    for t, v in rows:
        lines.append(f"| {v.rank} | {t.number} | {_cell(t.name)} | {_settings(t, s.keys)} | {stats.pm(t.score)} | "
                     f"{stats.interval(t.score.ci95)} | {t.score.n} | {stats.num(v.diff, '+') if v.diff is not None else ''} | "
                     f"{stats.p_text(v.p_holm) if v.rank > 1 else ''} | {v.verdict} |")
    return [*lines, "", stats.tied_sentence(s.model, [_cell(t.name) for t, _ in rows], [v for _, v in rows]), ""]


def _other_lines(s: ModelSearch, states: tuple[str, ...], title: str) -> list[str]:
    rows = sorted((t for t in s.trials if t.state in states), key=lambda t: t.number)
    if not rows:
        return []
    keys = " | ".join(f"`{k}`" for k in s.keys)
    lines = [title, "", f"| # | trial | state | {keys} | epochs trained | last score |",
             "|--:|:--|:--|" + "--:|" * len(s.keys) + "--:|--:|"]
    for t in rows:
        lines.append(f"| {t.number} | {_cell(t.name)} | {t.state} | {_settings(t, s.keys)} | "
                     f"{t.epochs} of {t.full_epochs} | {stats.num(t.last_score)} |")
    return [*lines, ""]


def _importance_lines(s: ModelSearch) -> list[str]:
    if not s.importances:
        complete = sum(t.state == "COMPLETE" for t in s.trials)
        why = ("fewer than 2 complete trials" if complete < 2 else
               "they could not be computed (too few distinct settings, or every trial scored alike)")
        return [f"No parameter importances for {s.model}: {why}.", ""]
    order = sorted(s.importances, key=lambda k: (-s.importances[k], k))
    return ["| key | importance (fANOVA) |", "|:--|--:|",
            *(f"| `{_cell(k)}` | {s.importances[k]:.4f} |" for k in order), ""]


def _model_lines(s: ModelSearch) -> list[str]:
    return [f"## {s.model}: search", "", "### Complete trials ranked by score", "", *_ranked_lines(s),
            *_other_lines(s, ("PRUNED",), "### Pruned trials (stopped early; last score where they stopped)"),
            *_other_lines(s, ("FAIL", "RUNNING", "WAITING"), "### Failed or unfinished trials"),
            "### Parameter importances", "", *_importance_lines(s)]


def to_markdown(info: StudyInfo, searches: list[ModelSearch], found: list[tuple[str, str, Pair]],
                figures: dict[str, str]) -> str:
    """The report page; `figures` maps each figure's caption to its PNG's file name."""
    lines = _header(info, searches) + _cost_lines(searches) + _final_lines(searches) + stats.pair_lines(found)
    for s in searches:
        lines += _model_lines(s)
    lines += ["## Figures", "", *(f"![{caption}]({name})\n" for caption, name in figures.items()),
              "Every number, unrounded: [trials.csv](trials.csv), [final.csv](final.csv), [pairs.csv](pairs.csv)."]
    return "\n".join(lines) + "\n"


def _trial_row(t: TrialRow, v: Versus | None, keys: list[str]) -> dict[str, object]:
    s = t.score
    return {"model": t.model, "number": t.number, "name": t.name, "state": t.state, "score_mean": s and s.mean,
            "score_std": s and s.std, "score_n": s and s.n, "last_score": t.last_score, "epochs": t.epochs,
            "full_epochs": t.full_epochs, "seeds": t.seeds, "rank": v and v.rank, "diff_vs_best": v and v.diff,
            "p_welch": v and v.p_value, "p_holm": v and v.p_holm, "verdict": v and v.verdict,
            **{k: _json(t.overrides[k]) if k in t.overrides else None for k in keys}}


def trials_table(searches: list[ModelSearch]) -> pd.DataFrame:
    """trials.csv: one row per trial of every model, the complete ones with their test against the best."""
    keys = list(dict.fromkeys(k for s in searches for k in s.keys))
    rows = []
    for s in searches:
        versus = {t.number: v for t, v in ranked(s)}
        rows += [_trial_row(t, versus.get(t.number), keys) for t in sorted(s.trials, key=lambda t: t.number)]
    return pd.DataFrame(rows, columns=[*TRIAL_COLUMNS, *keys]).astype({"score_n": "Int64", "rank": "Int64"})


def _final_row(s: ModelSearch, f: FinalRow) -> dict[str, object]:
    w, ci = f.winner, f.test.ci95 or (None, None)
    return {"model": s.model, "winner": w.name, "config": json.dumps(w.overrides, sort_keys=True),
            "selection_mean": w.score.mean, "selection_std": w.score.std, "selection_n": w.score.n,
            "test_mean": f.test.mean, "test_std": f.test.std, "test_ci95_low": ci[0], "test_ci95_high": ci[1],
            "n_seeds": len(f.seeds), "seeds": " ".join(map(str, f.seeds)), "optimism": w.score.mean - f.test.mean,
            "n_trials": sum(t.state == "COMPLETE" for t in s.trials)}


def final_table(searches: list[ModelSearch]) -> pd.DataFrame:
    """final.csv: one row per model with a final phase."""
    return pd.DataFrame([_final_row(s, s.final) for s in searches if s.final is not None], columns=FINAL_COLUMNS)


def _history(s: ModelSearch) -> list[Point]:
    return [Point(t.number, t.score.mean) if t.state == "COMPLETE" else Point(t.number, t.last_score, True)
            for t in s.trials if t.state == "COMPLETE" or (t.state == "PRUNED" and t.last_score is not None)]


def figures(info: StudyInfo, searches: list[ModelSearch]) -> dict[str, tuple[str, Figure]]:
    """File name -> (caption, figure), every figure of the report."""
    ylabel = SPLITS[info.select]
    histories = {s.model: _history(s) for s in searches if _history(s)}
    out = {"history.png": ("optimisation history", history_figure(histories, ylabel))}
    for key in dict.fromkeys(k for s in searches for k in s.keys):
        series = {s.model: [Point(t.overrides[key], t.score.mean) for t, _ in ranked(s) if key in t.overrides]
                  for s in searches if key in s.keys}
        name = "score_vs_" + re.sub(r"[^A-Za-z0-9._-]", "_", key) + ".png"
        out[name] = (f"score against {key}", key_figure(key, series, key in info.log_keys, ylabel))
    importances = {s.model: s.importances for s in searches if s.importances}
    out["importances.png"] = ("parameter importances", importance_figure(importances))
    tests = {s.model: s.final.test for s in searches if s.final is not None}
    out["final_test.png"] = ("final refits: test accuracy per seed", final_figure(tests))
    return out


def write_study_report(out_dir: Path, info: StudyInfo, searches: list[ModelSearch]) -> list[Path]:
    """Writes report.md (first in the returned list), CSVs and PNG figures atomically; returns their paths.

    Everything is rendered before the first file is written: bad input leaves the folder as it was.
    """
    _check(info, searches)
    found = pairs(searches)
    drawn = figures(info, searches)
    texts = {"report.md": to_markdown(info, searches, found, {c: n for n, (c, _) in drawn.items()}),
             "trials.csv": trials_table(searches).to_csv(index=False),
             "final.csv": final_table(searches).to_csv(index=False),
             "pairs.csv": stats.pairs_table(found).to_csv(index=False)}
    out_dir = Path(out_dir)
    for name, (_, fig) in drawn.items():
        with atomic_path(out_dir / name) as tmp:
            save_png(fig, tmp)
    for name in [*list(texts)[1:], "report.md"]:  # the page last: it links to everything else
        write_text_atomic(out_dir / name, texts[name])
    return [out_dir / name for name in [*texts, *drawn]]

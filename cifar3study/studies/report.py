"""A study's report: what it found, read back from the ledger and the finished experiments, written and logged.

The ledger says which trials ended how and with which overrides; each
finished experiment's committed metrics give the spread over its seeds. So
the report is the same whichever driver writes it, and a rerun rewrites it
from the same records.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import optuna
from optuna.trial import FrozenTrial, TrialState

from cifar3study.errors import StageError
from cifar3study.reporting.study_report import FinalRow, ModelSearch, StudyInfo, TrialRow
from cifar3study.studies.search import Searches, decode
from cifar3study.studies.spec import Study
from cifar3study.studies.trial import fetch_exp, recorded_metrics, split_accuracy
from cifar3study.tracking import ledger, store
from cifar3study.tracking.study_tracking import ensure_study_views, log_study_run

log = logging.getLogger("study")


def _setting(study: Study, params: dict, overrides: dict[str, object], dotted: str) -> object:
    if dotted in overrides:
        return overrides[dotted]
    if dotted in study.fixed:
        return study.fixed[dotted]
    section, key = dotted.split(".")
    return params[section][key]


class Collector:
    """Turns one study's ledger trials into report rows, fetching experiments it does not have yet."""

    def __init__(self, searches: Searches, params: dict, repo: Path, remote: str, fetch: bool) -> None:
        self.searches, self.params, self.repo, self.remote, self.fetch = searches, params, repo, remote, fetch

    def _metrics(self, trial: FrozenTrial, model: str, name: str) -> object | None:
        commit = trial.user_attrs.get("exp_commit")
        if commit is None:
            return None
        if self.fetch:
            fetch_exp(self.repo, self.remote, self.searches.base, name)
        return recorded_metrics(self.repo, commit, model)

    def row(self, model: str, trial: FrozenTrial, phase: str = "search") -> TrialRow:
        study = self.searches.study
        overrides = {k: decode(study.space[k], trial.params[k]) for k in study.keys_for(model) if k in trial.params}
        name = f"{study.name}-{model}-{'final' if phase == 'final' else ''}{trial.number}"
        metrics = self._metrics(trial, model, name) if trial.state == TrialState.COMPLETE else None
        split = study.select if phase == "search" else "val"
        full = int(_setting(study, self.params, overrides, "train.epochs"))
        steps = trial.intermediate_values
        stopped = int(trial.system_attrs.get(ledger.PRUNED_ATTR, max(steps, default=0)))
        epochs = full if trial.state == TrialState.COMPLETE else stopped
        return TrialRow(model, trial.number, name, trial.state.name, overrides,
                        split_accuracy(metrics, split) if metrics is not None else None,
                        steps[max(steps)] if steps else None, epochs, full,
                        len(_setting(study, self.params, overrides, "train.seeds")))

    def final(self, model: str, best: FrozenTrial | None) -> FinalRow | None:
        if best is None:
            return None
        finals = [t for t in self.searches.trials(model, "final")
                  if t.user_attrs.get("refit_of") == best.number and t.state == TrialState.COMPLETE]
        if not finals:
            return None
        row = self.row(model, finals[-1], "final")
        return FinalRow(self.row(model, best), row.score, self.searches.study.final_seeds)

    def model(self, model: str) -> ModelSearch:
        trials = self.searches.trials(model, "search")
        return ModelSearch(model, self.searches.study.keys_for(model), [self.row(model, t) for t in trials],
                           importances(self.searches, model), self.final(model, self.searches.search_over(model)))


def importances(searches: Searches, model: str) -> dict[str, float]:
    """fANOVA importance of each searched key, from the complete trials; {} when there are too few to tell."""
    study = optuna.load_study(study_name=searches._name(model, "search"), storage=searches.storage)
    complete = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE]
    if len(complete) < 2 or len(searches.study.keys_for(model)) < 1:
        return {}
    try:
        evaluator = optuna.importance.FanovaImportanceEvaluator(seed=0)
        return {k: float(v) for k, v in optuna.importance.get_param_importances(study, evaluator=evaluator).items()}
    except (RuntimeError, ValueError) as err:  # e.g. every complete trial drew the same values
        log.info("no importances for %s: %s", model, err)
        return {}


def study_info(searches: Searches, params: dict) -> StudyInfo:
    study = searches.study
    holdout = float(study.fixed.get("data.holdout", params["data"].get("holdout", 0.0)))
    logs = frozenset(k for k, d in study.space.items() if d.log)
    return StudyInfo(study.name, searches.base, study.select, holdout, study.search.sampler, study.prune.pruner, logs)


def collect(searches: Searches, params: dict, repo: Path, remote: str, fetch: bool) -> list[ModelSearch]:
    collector = Collector(searches, params, repo, remote, fetch)
    try:
        return [collector.model(m) for m in searches.study.models]
    except KeyError as err:
        raise StageError(f"the ledger holds a trial without {err}; was the study file changed under the same name? "
                         "rename the study") from err


def prepare_store(repo: Path, experiment: str) -> str:
    """Create the MLflow experiment from the repository first, so the default store keeps artifacts in <repo>/mlruns."""
    env = dict(os.environ)
    if env.get("MLFLOW_TRACKING_URI") == store.tracking_uri({}, repo):
        del env["MLFLOW_TRACKING_URI"]  # connect then sets the artifact location itself, whatever the cwd
    return store.connect(env, repo, experiment)


def write(searches: Searches, params: dict, repo: Path, remote: str, experiment_id: str, fetch: bool) -> None:
    """The report folder, and the study's one MLflow run and saved views (made under the ledger's lock)."""
    from cifar3study.reporting.study_report import write_study_report

    found = collect(searches, params, repo, remote, fetch)
    study = searches.study
    files = write_study_report(repo / "reports" / "studies" / study.name, study_info(searches, params), found)
    keys = [t.name for m in found for t in m.trials] + [m.final.winner.name for m in found if m.final]
    with ledger.ledger_lock(searches.url, f"report:{study.name}"):
        log_study_run(experiment_id, study.name, list(study.space), keys, files)
        urls = ensure_study_views(experiment_id, study.name, list(study.space), study.select)
    log.info("report: %s", files[0])
    for url in urls:
        log.info("MLflow runs of the study: %s", url)

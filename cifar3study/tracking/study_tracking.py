"""A study in MLflow: one `study` run holding its report, and a saved runs-table view of the study's model runs.

Both are kept one per study name: a rerun of the study updates its run and
its view rather than adding new ones, so the experiment does not fill with
copies that differ only in when they were made.
"""

from __future__ import annotations

import json
import time
import urllib.parse
from pathlib import Path

import mlflow
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from cifar3study.errors import StageError, quote
from cifar3study.tracking.store import process_tags

VIEW_PREFIX = "mlflow.sharedViewState."  # the experiment tag MLflow's UI reads a saved view from
BAD_NAME_CHARS = "'\"`\\\n"  # would break the search filter the view stores


def study_view_key(study: str) -> str:
    """The share key of the study's view: open the runs page with viewStateShareKey=<this>."""
    return f"study-{study}"


def mlflow_param(key: str) -> str:
    """The MLflow param a dotted params.yaml key is logged as: `models.<name>.x` goes under the shared `model.x`."""
    parts = key.split(".")
    return ".".join(["model", *parts[2:]]) if parts[0] == "models" and len(parts) > 2 else key


def _checked(study: str) -> str:
    if not study or any(c in study for c in BAD_NAME_CHARS):
        raise StageError(f"study name {quote(study)} is empty or has a quote, backtick or backslash; rename the study")
    return study


def _find_study_run(client: MlflowClient, experiment_id: str, study: str) -> str | None:
    """The oldest `study` run of this study (a second one can only come from a race; the first one wins)."""
    found = client.search_runs([experiment_id], f"tags.kind = 'study' and tags.study = '{study}'",
                               order_by=["attributes.start_time ASC"], max_results=1)
    return found[0].info.run_id if found else None


def log_study_run(experiment_id: str, study: str, swept: list[str], trial_keys: list[str], files: list[Path]) -> str:
    """One run (tag kind=study, tag study=<name>) holding the report files as artifacts; returns its id.

    Idempotent per study: a rerun reuses the study's run, refreshes its tags and overwrites its artifacts.
    Everything goes in as tags and artifacts, never params, which MLflow refuses to change.
    """
    client = MlflowClient()
    run_id = _find_study_run(client, experiment_id, _checked(study))
    if run_id is None:
        # Process tags let store.close_orphaned_runs end it should this process die before it does.
        run_id = client.create_run(experiment_id, run_name=f"study-{study}",
                                   tags={"kind": "study", "study": study, **process_tags()}).info.run_id
    try:
        tags = {"swept": ", ".join(swept), "trials": str(len(trial_keys)), "view": study_view_key(study),
                "mlflow.note.content": _note(study, swept, len(trial_keys))}
        for key, value in tags.items():
            client.set_tag(run_id, key, value)
        client.log_dict(run_id, {"study": study, "swept": swept, "trial_keys": trial_keys}, "trials.json")
        for path in files:
            client.log_artifact(run_id, str(path))
    except BaseException:
        client.set_terminated(run_id, "FAILED")
        raise
    client.set_terminated(run_id, "FINISHED")
    return run_id


def _note(study: str, swept: list[str], n_trials: int) -> str:
    return (f"Study `{study}`: {n_trials} trials and refits over {', '.join(f'`{k}`' for k in swept)}. The artifacts "
            f"hold its report (report.md, the CSVs, the figures). Its search runs side by side: open the runs page with "
            f"`viewStateShareKey={study_view_key(study)}`; the winners' refits on the test split: "
            f"`viewStateShareKey={study_view_key(study)}-final`.")


def _view_state(study: str, swept: list[str], phase: str, select: str) -> str:
    """A phase's model runs, best first by the split that phase is judged on, with the searched params as columns."""
    params = list(dict.fromkeys(f"params.`{mlflow_param(k)}`" for k in swept))
    score = f"{select}_acc" if phase == "search" else "val_acc"
    columns = ["tags.`model`", "tags.`phase`", *params, f"metrics.`{score}`", f"metrics.`{score}_std`",
               "metrics.`train_acc`", "tags.`pruned_at_epoch`", "tags.`dvc.exp_name`", "tags.`trial`"]
    return json.dumps({"searchFilter": f"tags.study = '{study}' and tags.kind = 'model' and tags.phase = '{phase}'",
                       "selectedColumns": columns, "orderByKey": f"metrics.`{score}`", "orderByAsc": False})


def _view_key(study: str, phase: str) -> str:
    return study_view_key(study) + ("" if phase == "search" else "-final")


def ensure_study_views(experiment_id: str, study: str, swept: list[str], select: str) -> list[str]:
    """Saved runs-table views (experiment tags mlflow.sharedViewState.<key>) of the search and of the final refits.

    Returns the runs-page URLs that open them: the tracking server's when MLflow logs to one, else those of
    `mlflow ui` on its default port. A rerun rewrites each view (its columns follow the study file) and keeps
    its creation time.
    """
    _checked(study)
    client = MlflowClient()
    try:
        tags = client.get_experiment(experiment_id).tags
    except MlflowException as err:
        raise StageError(f"MLflow experiment {quote(experiment_id)} is not in {mlflow.get_tracking_uri()} "
                         f"({err.error_code}); use the store the study logs to (MLFLOW_TRACKING_URI)") from err
    urls = []
    for phase in ("search", "final"):
        key = _view_key(study, phase)
        now = int(time.time() * 1000)
        envelope = {"name": f"study {study} ({phase})", "createdAt": _created(tags.get(VIEW_PREFIX + key)) or now,
                    "updatedAt": now, "state": _view_state(study, swept, phase, select)}
        client.set_experiment_tag(experiment_id, VIEW_PREFIX + key, json.dumps(envelope))
        urls.append(runs_page_url(mlflow.get_tracking_uri(), experiment_id, key))
    return urls


def _created(old: str | None) -> int | None:
    try:
        return json.loads(old)["createdAt"] if old else None
    except (ValueError, KeyError, TypeError):
        return None


def runs_page_url(uri: str, experiment_id: str, key: str) -> str:
    """As store.runs_page, for any share key. MLflow 3.17 needs workflowType=machine_learning to show the runs table."""
    base = uri if uri.startswith(("http://", "https://")) else "http://127.0.0.1:5000"
    return (f"{base.rstrip('/')}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"
            f"&viewStateShareKey={urllib.parse.quote(key, safe='')}")

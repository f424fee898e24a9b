"""A study in a real MLflow SQLite store: one study run per study, kept on reruns, and its saved runs-table view."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import mlflow
import pytest
from mlflow import MlflowClient

from cifar3study.errors import StageError
from cifar3study.tracking.study_tracking import ensure_study_views, log_study_run, mlflow_param

SWEPT = ["train.lr", "models.fc.hidden"]


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One SQLite store for the module: creating its schema is most of these tests' time."""
    return tmp_path_factory.mktemp("store")


@pytest.fixture
def experiment(store_dir: Path, request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh experiment of its own, artifacts beside the store; the global tracking URI is reset afterwards."""
    mlflow.set_tracking_uri(f"sqlite:///{store_dir / 'm.db'}")
    name = request.node.name
    yield MlflowClient().create_experiment(name, artifact_location=(store_dir / name).as_uri())
    mlflow.set_tracking_uri(None)


def report_files(folder: Path, text: str) -> list[Path]:
    folder.mkdir(exist_ok=True)
    files = [folder / "report.md", folder / "trials.csv", folder / "val_acc_vs_train.lr.png"]
    for path in files:
        path.write_text(f"{path.name}: {text}")
    return files


def study_runs(experiment: str) -> list:
    return MlflowClient().search_runs([experiment], "tags.kind = 'study'")


def test_study_run_holds_the_report_and_a_rerun_reuses_it(experiment: str, tmp_path: Path) -> None:
    first = log_study_run(experiment, "lr", SWEPT, ["k1", "k2"], report_files(tmp_path / "r", "first"))
    other = log_study_run(experiment, "other", SWEPT, ["k9"], report_files(tmp_path / "o", "other"))
    again = log_study_run(experiment, "lr", SWEPT, ["k1", "k2", "k3"], report_files(tmp_path / "r", "second"))
    assert again == first != other
    assert len(study_runs(experiment)) == 2
    client = MlflowClient()
    found = client.get_run(first)
    assert found.info.status == "FINISHED"
    assert {k: found.data.tags[k] for k in ("kind", "study", "trials", "swept")} == {
        "kind": "study", "study": "lr", "trials": "3", "swept": "train.lr, models.fc.hidden"}
    names = {a.path for a in client.list_artifacts(first)}
    assert names == {"report.md", "trials.csv", "val_acc_vs_train.lr.png", "trials.json"}
    local = Path(client.download_artifacts(first, "report.md", str(tmp_path / "down")))
    assert local.read_text() == "report.md: second"
    keys = json.loads(Path(client.download_artifacts(first, "trials.json", str(tmp_path / "down"))).read_text())
    assert keys["trial_keys"] == ["k1", "k2", "k3"]


def model_run(experiment: str, study: str, kind: str, phase: str, metric: str, value: float) -> str:
    client = MlflowClient()
    tags = {"study": study, "kind": kind, "model": "cnn", "phase": phase}
    run_id = client.create_run(experiment, tags=tags).info.run_id
    client.log_metric(run_id, metric, value)
    client.set_terminated(run_id)
    return run_id


def view_state(experiment: str, key: str) -> tuple[dict, dict]:
    envelope = json.loads(MlflowClient().get_experiment(experiment).tags[f"mlflow.sharedViewState.{key}"])
    return envelope, json.loads(envelope["state"])


def test_views_open_the_search_and_the_final_refits_apart(experiment: str) -> None:
    search = model_run(experiment, "lr", "model", "search", "holdout_acc", 0.8)
    final = model_run(experiment, "lr", "model", "final", "val_acc", 0.7)
    model_run(experiment, "lr", "seed", "search", "holdout_acc", 0.7)
    model_run(experiment, "other", "model", "search", "holdout_acc", 0.9)
    urls = ensure_study_views(experiment, "lr", SWEPT, "holdout")
    assert urls[0].endswith(f"/#/experiments/{experiment}/runs?workflowType=machine_learning&viewStateShareKey=study-lr")
    assert urls[1].endswith("viewStateShareKey=study-lr-final")
    client = MlflowClient()
    envelope, state = view_state(experiment, "study-lr")
    assert state["selectedColumns"][:4] == ["tags.`model`", "tags.`phase`", "params.`train.lr`", "params.`model.hidden`"]
    assert {"metrics.`holdout_acc`", "metrics.`train_acc`", "tags.`trial`", "tags.`pruned_at_epoch`"} <= set(
        state["selectedColumns"])
    assert [r.info.run_id for r in client.search_runs([experiment], state["searchFilter"])] == [search]
    assert state["orderByKey"] == "metrics.`holdout_acc`" and state["orderByAsc"] is False
    _, final_state = view_state(experiment, "study-lr-final")
    assert [r.info.run_id for r in client.search_runs([experiment], final_state["searchFilter"])] == [final]
    assert final_state["orderByKey"] == "metrics.`val_acc`"

    ensure_study_views(experiment, "lr", ["train.momentum"], "holdout")  # a rerun after the study file changed
    again, again_state = view_state(experiment, "study-lr")
    assert again["createdAt"] == envelope["createdAt"]
    assert "params.`train.momentum`" in again_state["selectedColumns"]


def test_param_names_follow_run_logging_and_bad_names_are_refused() -> None:
    assert mlflow_param("train.lr") == "train.lr"
    assert mlflow_param("models.cnn.channels") == "model.channels"
    with pytest.raises(StageError, match=r"^study name \"it's\" is empty or has a quote"):
        ensure_study_views("0", "it's", SWEPT, "holdout")  # refused before MLflow is asked anything

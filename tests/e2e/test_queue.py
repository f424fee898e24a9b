"""Parallel queued experiments (`dvc queue start -j 2`) on a fresh SQLite store: nothing fails, nothing is lost.

The baseline has its data stages done but no MLflow store yet, so the four
experiments create it and the experiment concurrently, from DVC's temporary
workspaces, where DVC_ROOT points at the real repository. Each experiment
trains the cnn only (`evaluate@cnn`): the race is between experiments, and a
second model would only run after the first inside each of them.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from mlflow import MlflowClient

from tests.e2e.conftest import sh

LRS = ("0.005", "0.02", "0.03", "0.04")


def run_queue(repo: Path, lrs: tuple[str, ...] = LRS, env: dict[str, str] | None = None,
              timeout: float = 900) -> dict[str, str]:
    """Queue one cnn experiment per learning rate, run them two at a time, wait; {name: final status}."""
    for lr in lrs:
        sh(repo, "dvc", "exp", "run", "--queue", "-n", f"lr-{lr}", "-S", f"train.lr={lr}", "evaluate@cnn", env=env)
    sh(repo, "dvc", "queue", "start", "-j", "2", env=env)
    deadline = time.monotonic() + timeout
    while re.search(r" (Queued|Running)\s*$", status := sh(repo, "dvc", "queue", "status", env=env), re.M):
        assert time.monotonic() < deadline, status
        time.sleep(6)  # each `dvc queue status` costs a second of CPU the experiments need
    return dict(re.findall(r"^\w+\s+(lr-[\d.]+)\s+.*?\s(Success|Failed)\s*$", status, re.M))


@pytest.fixture(scope="module")
def queued(make_repo: Callable[..., Path]) -> tuple[Path, dict[str, str]]:
    repo = make_repo(epochs=1)
    sh(repo, "dvc", "repro", "stats")  # data only: the store does not exist yet
    sh(repo, "git", "add", "-A")
    sh(repo, "git", "commit", "-qm", "data")
    assert not (repo / "mlflow.db").exists()
    return repo, run_queue(repo)


def test_every_queued_experiment_succeeds(queued: tuple[Path, dict[str, str]]) -> None:
    repo, statuses = queued
    assert statuses == {f"lr-{lr}": "Success" for lr in LRS}, sh(repo, "dvc", "queue", "logs", "lr-0.02")
    shown = json.loads(sh(repo, "dvc", "exp", "show", "--json"))
    names = {e["name"] for e in shown[1]["experiments"]}
    assert {f"lr-{lr}" for lr in LRS} <= names


def test_every_model_run_is_finished_with_its_artifacts_in_the_repo(queued: tuple[Path, dict[str, str]]) -> None:
    repo, _ = queued
    client = MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("cifar3")
    assert experiment.artifact_location == (repo / "mlruns").as_uri()
    runs = client.search_runs([experiment.experiment_id], "tags.kind = 'model'")
    assert sorted(r.data.tags["dvc.exp_name"] for r in runs) == sorted(f"lr-{lr}" for lr in LRS)
    assert {r.data.tags["model"] for r in runs} == {"cnn"}
    seeds = client.search_runs([experiment.experiment_id], "tags.kind = 'seed'")
    assert len(seeds) == 2 * len(runs) and {r.info.status for r in seeds} == {"FINISHED"}
    assert {r.info.status for r in runs} == {"FINISHED"}
    for found in runs:  # the temporary workspaces are gone; the artifacts are not
        local = Path(found.info.artifact_uri.removeprefix("file://"))
        assert local.is_relative_to(repo / "mlruns") and (local / "parameters.md").is_file()
    assert len({r.info.run_name for r in runs}) == len(runs)  # every run has its own name

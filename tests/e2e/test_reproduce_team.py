"""`reproduce` against the team stack: a teammate's fresh clone reruns a run recorded on the server.

The teammate has only what a team shares: the Git remote, the DVC remote's
settings and MLFLOW_TRACKING_URI. No MLflow store, DVC cache, data or
CIFAR10_URL: the archive server the run downloaded from is emptied before
the reproduction, so its data can only come from the DVC remote.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from mlflow import MlflowClient

from cifar3study.team import postgres as team_postgres
from cifar3study.team import state as team_state
from tests.e2e.conftest import ENV, sh
from tests.helpers import FileServer

RAW = "data/raw/cifar-10-python.tar.gz"
pytestmark = pytest.mark.skipif(not (team_postgres.POSTGRES_BIN / "pg_ctl").is_file(), reason="needs PostgreSQL 15")


@pytest.fixture
def stack(make_repo: Callable[..., Path], tmp_path: Path) -> Iterator[tuple[Path, team_state.Stack, dict[str, str]]]:
    """(project copy, its team stack, the variables `up` exports); the stack is always taken down."""
    repo = make_repo(epochs=1, seeds=[0])
    folder = tmp_path / "stack"
    try:
        output = sh(repo, sys.executable, "-m", "cifar3study.team.stack", "up", "--dir", str(folder))
        exported = dict(line.removeprefix("export ").split("=", 1) for line in output.splitlines())
        yield repo, team_state.open_stack(folder), exported
    finally:
        if folder.exists():
            sh(repo, sys.executable, "-m", "cifar3study.team.stack", "down", "--dir", str(folder))


def snapshot(client: MlflowClient, run_id: str) -> list:
    """Everything a run and its seed runs hold on the server: a reproduction must leave it as it was."""
    parent = client.get_run(run_id)
    runs = [parent, *client.search_runs([parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{run_id}'")]
    return [(r.info.run_id, r.info.status, r.info.end_time, r.data.tags, r.data.params, r.data.metrics,
             sorted(a.path for a in client.list_artifacts(r.info.run_id))) for r in runs]


def share(repo: Path, tmp_path: Path) -> Path:
    """Push the copy's commits to a bare Git remote, as a team's shared repository."""
    bare = tmp_path / "origin.git"
    sh(tmp_path, "git", "init", "-q", "--bare", "-b", "main", str(bare))
    sh(repo, "git", "push", "-q", str(bare), "HEAD:refs/heads/main")
    return bare


def teammate_clone(bare: Path, stack: team_state.Stack, tmp_path: Path) -> Path:
    """A fresh clone with the DVC remote configured from the stack's endpoint and key, and nothing else."""
    clone = tmp_path / "teammate" / "cifar3"
    sh(tmp_path, "git", "clone", "-q", str(bare), str(clone))
    sh(clone, "dvc", "remote", "add", "--local", "-d", "team", "s3://cifar3/dvc")
    for key, value in (("endpointurl", stack.s3_endpoint), ("access_key_id", stack.s3_key),
                       ("secret_access_key", stack.s3_secret), ("region", "us-east-1")):
        sh(clone, "dvc", "remote", "modify", "--local", "team", key, value)
    there = [p for p in ("mlflow.db", ".dvc/cache", RAW, "data/cifar3/train.npz", "data/models/cnn.pt") if (clone / p).exists()]
    assert not there
    return clone


def test_run_on_the_server_is_reproduced_bitwise_from_a_fresh_clone(
        stack: tuple[Path, team_state.Stack, dict[str, str]], archive_mirror: tuple[FileServer, str], tmp_path: Path) -> None:
    repo, team, exported = stack
    sh(repo, "dvc", "repro", "evaluate@cnn", env=exported)
    run_id = json.loads((repo / "data" / "runs" / "cnn.json").read_text())["run_id"]
    sh(repo, "git", "add", "-A")
    sh(repo, "git", "commit", "-qm", "results")
    sh(repo, "dvc", "push")
    clone = teammate_clone(share(repo, tmp_path), team, tmp_path)
    server, _ = archive_mirror
    server.files.clear()  # the archive server is gone: a download would fail
    downloads = len(server.requests)
    client = MlflowClient(exported["MLFLOW_TRACKING_URI"])
    before = snapshot(client, run_id)
    done = subprocess.run([sys.executable, "-m", "cifar3study.reproduction.run", run_id], cwd=clone,
                          env={**ENV, "MLFLOW_TRACKING_URI": exported["MLFLOW_TRACKING_URI"]},
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1].startswith("bitwise: "), done.stdout + done.stderr[-2000:]
    assert len(server.requests) == downloads  # the data came from the DVC remote
    experiments = [e.experiment_id for e in client.search_experiments()]
    [linked] = client.search_runs(experiments, f"tags.reproduces = '{run_id}'")
    assert linked.data.tags["kind"] == "reproduction" and linked.data.tags["verdict"] == "bitwise"
    assert (clone / "reports" / "reproductions" / f"{run_id}.md").is_file()
    assert snapshot(client, run_id) == before

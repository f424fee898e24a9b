"""MLflow plumbing: where runs go, how they end, what they are tagged with; a real store and a real server."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import mlflow
import pytest
from matplotlib.figure import Figure
from mlflow import MlflowClient

from cifar3study.errors import StageError
from cifar3study.tracking import run_logging, store
from tests.helpers import ROOT


@pytest.fixture
def store_uri(tmp_path: Path) -> Iterator[str]:
    """A fresh SQLite store; the global tracking URI is reset afterwards."""
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    yield uri
    mlflow.set_tracking_uri(None)


def test_default_store_follows_dvc_root(tmp_path: Path) -> None:
    root = store.repo_root({"DVC_ROOT": str(tmp_path)}, Path("/elsewhere"))
    assert store.tracking_uri({}, root) == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"
    assert store.tracking_uri({"MLFLOW_TRACKING_URI": "http://team:5000"}, tmp_path) == "http://team:5000"


def test_interrupt_ends_killed_and_error_ends_failed(store_uri: str, tmp_path: Path) -> None:
    experiment = store.connect({"MLFLOW_TRACKING_URI": store_uri}, tmp_path, "x")
    with pytest.raises(KeyboardInterrupt), store.run(experiment) as killed:
        raise KeyboardInterrupt
    with pytest.raises(ValueError), store.run(experiment) as failed:
        raise ValueError
    client = MlflowClient(store_uri)
    assert client.get_run(killed.info.run_id).info.status == "KILLED"
    assert client.get_run(failed.info.run_id).info.status == "FAILED"


def test_missing_run_is_one_line_error(store_uri: str, tmp_path: Path) -> None:
    store.connect({"MLFLOW_TRACKING_URI": store_uri}, tmp_path, "x")
    with pytest.raises(StageError, match="cannot open MLflow run 0123"), store.run(run_id="0123" + "0" * 28):
        pass


def test_provenance_tags_name_code_data_and_device(tmp_path: Path) -> None:
    tags = store.provenance_tags({"DVC_STAGE": "train@cnn", "DVC_EXP_NAME": "e1"}, tmp_path, "f" * 32,
                                    {"device": "cpu (x)"})
    assert tags["mlflow.source.git.commit"] == "unknown" and tags["git.dirty"] == "unknown"  # not a git repo
    assert tags["dvc.stage"] == "train@cnn" and tags["dvc.exp_name"] == "e1" and tags["data.archive_md5"] == "f" * 32


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_server_fails_fast_naming_the_uri() -> None:
    uri = f"http://127.0.0.1:{free_port()}"
    start = time.monotonic()
    with pytest.raises(StageError, match=re.escape(f"'{uri}' is unreachable")):
        store.check_reachable(uri)
    assert time.monotonic() - start < 10


@pytest.fixture
def mlflow_server(tmp_path: Path) -> Iterator[str]:
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}", "--artifacts-destination", str(tmp_path / "art"),
         "--workers", "1"], cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    uri = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while True:
        try:
            store.check_reachable(uri, timeout=1)
            break
        except StageError:
            assert server.poll() is None and time.monotonic() < deadline, "mlflow server did not start"
            time.sleep(0.5)
    yield uri
    server.terminate()
    server.wait(timeout=30)
    mlflow.set_tracking_uri(None)


def test_runs_and_artifacts_reach_a_real_tracking_server(mlflow_server: str, tmp_path: Path) -> None:
    experiment = store.connect({"MLFLOW_TRACKING_URI": mlflow_server}, tmp_path, "cifar3")
    with store.run(experiment, tags={"model": "cnn"}) as active:
        mlflow.log_metric("val_acc", 0.5, step=1)
    run_logging.log_figures(active.info.run_id, {"x.png": Figure()})
    client = MlflowClient(mlflow_server)
    assert client.get_run(active.info.run_id).info.status == "FINISHED"
    assert "x.png" in {a.path for a in client.list_artifacts(active.info.run_id)}


def test_default_store_keeps_artifacts_at_the_root_even_from_os_environ(tmp_path: Path, monkeypatch) -> None:
    """set_tracking_uri writes MLFLOW_TRACKING_URI into os.environ; the repo-root location must survive that."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    elsewhere = tmp_path / "dvc-temp-workspace"
    elsewhere.mkdir()
    try:
        experiment = store.connect(os.environ, elsewhere, "cifar3")
        location = MlflowClient().get_experiment(experiment).artifact_location
    finally:
        mlflow.set_tracking_uri(None)
    assert location == (tmp_path.resolve() / "mlruns").as_uri()


FIRST_USE = """
import sys
from pathlib import Path
import mlflow
from cifar3study.tracking import store
root = Path(sys.argv[1])
experiment = store.connect({"DVC_ROOT": str(root)}, root, "cifar3")
with store.run(experiment, tags={"model": sys.argv[2]}):
    for step in range(20):
        mlflow.log_metric("val_acc", step / 20, step=step)
"""


@pytest.mark.parametrize("trial", range(3))
def test_concurrent_first_use_of_a_fresh_store(tmp_path: Path, trial: int) -> None:
    """Four processes start on a store that does not exist yet: all succeed, one experiment, four runs."""
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    procs = [subprocess.Popen([sys.executable, "-c", FIRST_USE, str(tmp_path), f"m{i}"], cwd=ROOT, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for i in range(4)]
    errors = [p.communicate(timeout=300)[1] for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, "\n".join(e[-800:] for e in errors)
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("cifar3")
    runs = client.search_runs([experiment.experiment_id])
    assert sorted(r.data.tags["model"] for r in runs) == ["m0", "m1", "m2", "m3"]
    assert all(r.info.status == "FINISHED" and len(client.get_metric_history(r.info.run_id, "val_acc")) == 20
               for r in runs)
    assert len(client.search_experiments()) == 2  # Default and cifar3


KILLED_MIDWAY = """
import sys, time
from pathlib import Path
from cifar3study.tracking import store
experiment = store.connect({"MLFLOW_TRACKING_URI": sys.argv[1]}, Path("."), "x")
with store.run(experiment, tags={"model": "cnn", **store.process_tags()}) as active:
    print(active.info.run_id, flush=True)
    time.sleep(600)
"""


def test_run_of_a_killed_process_is_closed_by_the_next_one(store_uri: str, tmp_path: Path) -> None:
    victim = subprocess.Popen([sys.executable, "-c", KILLED_MIDWAY, store_uri], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    run_id = victim.stdout.readline().strip()
    live = store.connect({"MLFLOW_TRACKING_URI": store_uri}, tmp_path, "x")
    assert store.close_orphaned_runs(live) == []  # still alive: left alone
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=30)
    client = MlflowClient(store_uri)
    assert client.get_run(run_id).info.status == "RUNNING"  # what SIGKILL leaves behind
    assert store.close_orphaned_runs(live) == [run_id]
    assert client.get_run(run_id).info.status == "KILLED"
    assert client.get_run(run_id).data.tags["ended_by"].startswith("closed as KILLED")


def test_a_run_of_another_experiment_or_model_is_refused(store_uri: str, tmp_path: Path) -> None:
    mine = store.connect({"MLFLOW_TRACKING_URI": store_uri}, tmp_path, "mine")
    other = store.connect({"MLFLOW_TRACKING_URI": store_uri}, tmp_path, "other")
    with store.run(other, tags={"model": "cnn", "kind": "model"}) as foreign, \
            store.run(mine, tags={"model": "fc", "kind": "model"}, nested=True) as fc_run:
        pass
    with pytest.raises(StageError, match=f"in experiment {other}, not the cnn run of experiment {mine}"):
        store.model_run(foreign.info.run_id, mine, "cnn")
    with pytest.raises(StageError, match=r"'model' run of model 'fc' .*not the cnn run"):
        store.model_run(fc_run.info.run_id, mine, "cnn")
    assert store.model_run(fc_run.info.run_id, mine, "fc").info.run_id == fc_run.info.run_id


def test_experiment_carries_the_comparison_view(store_uri: str, tmp_path: Path) -> None:
    experiment = store.connect({"MLFLOW_TRACKING_URI": store_uri}, tmp_path, "x")
    view = json.loads(MlflowClient(store_uri).get_experiment(experiment).tags["mlflow.sharedViewState.comparison"])
    assert "metrics.`val_acc`" in json.loads(view["state"])["selectedColumns"]
    page = store.runs_page("http://team:5000", experiment)
    assert page == f"http://team:5000/#/experiments/{experiment}/runs?workflowType=machine_learning" \
                   "&viewStateShareKey=comparison"


@pytest.mark.parametrize(("error", "status"), [(None, "FINISHED"), (ValueError, "FAILED"), (KeyboardInterrupt, "KILLED")])
def test_group_runs_nest_every_seed_and_end_together(store_uri: str, tmp_path: Path, error: type | None, status: str) -> None:
    experiment = store.connect({"MLFLOW_TRACKING_URI": store_uri}, tmp_path, "x")
    with pytest.raises(error) if error else contextlib.nullcontext(), \
            store.group_runs(experiment, "cnn-abc", (0, 5), {"model": "cnn"}) as runs:
        if error:
            raise error
    client = MlflowClient(store_uri)
    parent = client.get_run(runs.parent)
    assert parent.info.status == status and parent.data.tags["kind"] == "model" and parent.info.run_name == "cnn-abc"
    for seed, run_id in runs.seeds.items():
        child = client.get_run(run_id)
        assert child.info.status == status and child.info.run_name == f"cnn-abc-seed{seed}"
        assert child.data.tags["mlflow.parentRunId"] == runs.parent and child.data.tags["seed"] == str(seed)
    store.check_group(runs, experiment, "cnn")
    with pytest.raises(StageError, match="is not seed 5"):
        store.check_group(store.GroupRuns(runs.parent, {5: runs.seeds[0]}), experiment, "cnn")
    with pytest.raises(StageError, match="is a 'seed' run of model 'cnn'"):  # a seed run is not the model's run
        store.model_run(runs.seeds[0], experiment, "cnn")

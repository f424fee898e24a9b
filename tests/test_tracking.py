"""MLflow plumbing: where runs go, how they end, what they are tagged with; a real store and a real server."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from mlflow import MlflowClient

from cifar3study import tracking
from cifar3study.errors import StageError
from cifar3study.params import ModelParams
from tests.helpers import CIFAR3_CLASSES


@pytest.fixture
def store(tmp_path: Path) -> Iterator[str]:
    """A fresh SQLite store; the global tracking URI is reset afterwards."""
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    yield uri
    mlflow.set_tracking_uri(None)


def test_default_store_follows_dvc_root(tmp_path: Path) -> None:
    root = tracking.repo_root({"DVC_ROOT": str(tmp_path)}, Path("/elsewhere"))
    assert tracking.tracking_uri({}, root) == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"
    assert tracking.tracking_uri({"MLFLOW_TRACKING_URI": "http://team:5000"}, tmp_path) == "http://team:5000"


def test_interrupt_ends_killed_and_error_ends_failed(store: str, tmp_path: Path) -> None:
    experiment = tracking.connect({"MLFLOW_TRACKING_URI": store}, tmp_path, "x")
    with pytest.raises(KeyboardInterrupt), tracking.run(experiment) as killed:
        raise KeyboardInterrupt
    with pytest.raises(ValueError), tracking.run(experiment) as failed:
        raise ValueError
    client = MlflowClient(store)
    assert client.get_run(killed.info.run_id).info.status == "KILLED"
    assert client.get_run(failed.info.run_id).info.status == "FAILED"


def test_missing_run_is_one_line_error(store: str, tmp_path: Path) -> None:
    tracking.connect({"MLFLOW_TRACKING_URI": store}, tmp_path, "x")
    with pytest.raises(StageError, match="cannot open MLflow run 0123"), tracking.run(run_id="0123" + "0" * 28):
        pass


def test_flatten_names_keys_as_params_yaml_does() -> None:
    cfg = ModelParams(arch="fc", activation="tanh", hidden=(8, 4))
    assert tracking.flatten("models.fc", cfg) == {"models.fc.arch": "fc", "models.fc.activation": "tanh",
                                                  "models.fc.hidden": "[8, 4]"}  # conv keys (None) are left out
    assert tracking.flatten("", list(CIFAR3_CLASSES)) == {"": "[airplane, automobile, ship]"}


def test_provenance_tags_name_code_data_and_device(tmp_path: Path) -> None:
    tags = tracking.provenance_tags({"DVC_STAGE": "train@cnn", "DVC_EXP_NAME": "e1"}, tmp_path, "f" * 32, "cpu (x)")
    assert tags["mlflow.source.git.commit"] == "unknown" and tags["git.dirty"] == "unknown"  # not a git repo
    assert tags["dvc.stage"] == "train@cnn" and tags["dvc.exp_name"] == "e1" and tags["data.archive_md5"] == "f" * 32


def test_logged_model_loads_back_with_the_same_logits(store: str, tmp_path: Path) -> None:
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 3)).eval()
    example = np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)
    experiment = tracking.connect({"MLFLOW_TRACKING_URI": store}, tmp_path, "x")
    with tracking.run(experiment):
        uri = tracking.log_model(model, example)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        np.testing.assert_allclose(mlflow.pytorch.load_model(uri)(x).numpy(), model(x).numpy(), rtol=0, atol=1e-6)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_server_fails_fast_naming_the_uri() -> None:
    uri = f"http://127.0.0.1:{free_port()}"
    start = time.monotonic()
    with pytest.raises(StageError, match=f"{uri} is unreachable"):
        tracking.check_reachable(uri)
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
            tracking.check_reachable(uri, timeout=1)
            break
        except StageError:
            assert server.poll() is None and time.monotonic() < deadline, "mlflow server did not start"
            time.sleep(0.5)
    yield uri
    server.terminate()
    server.wait(timeout=30)
    mlflow.set_tracking_uri(None)


def test_runs_and_artifacts_reach_a_real_tracking_server(mlflow_server: str, tmp_path: Path) -> None:
    experiment = tracking.connect({"MLFLOW_TRACKING_URI": mlflow_server}, tmp_path, "cifar3")
    with tracking.run(experiment, tags={"model": "cnn"}) as active:
        mlflow.log_metric("val_acc", 0.5, step=1)
    tracking.log_figures(active.info.run_id, {"x.png": __import__("matplotlib.figure").figure.Figure()})
    client = MlflowClient(mlflow_server)
    assert client.get_run(active.info.run_id).info.status == "FINISHED"
    assert "x.png" in {a.path for a in client.list_artifacts(active.info.run_id)}

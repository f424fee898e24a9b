"""`python -m stages.train`: a checkpoint, learning curves and an MLflow run that holds everything."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

import mlflow.pytorch
import numpy as np
import pytest
import torch
from mlflow import MlflowClient

from cifar3study.checkpoint import load_checkpoint
from cifar3study.dataset import normalize, read_split
from cifar3study.history import read_history
from tests.helpers import ROOT, last_line, run_stage, tiny_params
from tests.stages.conftest import Outputs, train_args


def cnn_run(outputs: Outputs) -> mlflow.entities.Run:
    run_id = json.loads((outputs.root / "runs" / "cnn.json").read_text())["run_id"]
    return MlflowClient(outputs.uri).get_run(run_id)


def test_run_holds_params_and_param_count(outputs: Outputs) -> None:
    run = cnn_run(outputs)
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert params["param_count"] == "18123" and params["models.cnn.channels"] == "[16, 8]"
    assert params["train.lr"] == "0.01" and params["train.epochs"] == "2" and params["evaluate.batch_size"] == "1000"
    assert params["data.classes"] == "[airplane, automobile, ship]"
    assert run.data.metrics["param_count"] == 18123


def test_run_holds_provenance_tags(outputs: Outputs) -> None:
    tags = cnn_run(outputs).data.tags
    assert tags["model"] == "cnn" and tags["dvc.stage"] == "test"
    assert tags["data.archive_md5"] == "0" * 32
    assert tags["torch.version"] == torch.__version__ and tags["device"].startswith("cpu")
    import subprocess

    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    assert tags["mlflow.source.git.commit"] == (head or "unknown")


def test_history_has_one_row_per_epoch(outputs: Outputs) -> None:
    history = read_history(outputs.root / "history" / "cnn.csv")
    assert [r.epoch for r in history] == [1, 2]
    curve = MlflowClient(outputs.uri).get_metric_history(cnn_run(outputs).info.run_id, "train_loss")
    assert [m.value for m in sorted(curve, key=lambda m: m.step)] == pytest.approx([r.train_loss for r in history])


def test_logged_model_gives_the_checkpoint_logits(outputs: Outputs) -> None:
    mlflow.set_tracking_uri(outputs.uri)
    try:
        logged = mlflow.pytorch.load_model(cnn_run(outputs).data.tags["model_uri"])
    finally:
        mlflow.set_tracking_uri(None)
    model, meta = load_checkpoint(outputs.root / "models" / "cnn.pt")
    x = normalize(read_split(outputs.data / "val.npz").images[:5], meta.stats, torch.device("cpu"))
    with torch.no_grad():
        np.testing.assert_allclose(logged(x).numpy(), model(x).numpy(), rtol=0, atol=1e-6)


def test_failing_training_ends_failed_and_writes_nothing(tmp_path: Path, cifar3_dir: Path) -> None:
    bad = tmp_path / "bad"
    bad.mkdir()
    for name in ("train.npz", "stats.json"):
        (bad / name).write_bytes((cifar3_dir / name).read_bytes())
    with np.load(cifar3_dir / "val.npz") as z:
        np.savez(bad / "val.npz", **{**z, "labels": np.full_like(z["labels"], 7)})  # no class 7: fails in epoch 1
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    done = run_stage("train", *train_args(tmp_path, bad, tiny_params(tmp_path), "cnn"), env={"MLFLOW_TRACKING_URI": uri})
    assert done.returncode != 0
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("cifar3").experiment_id])
    assert [r.info.status for r in runs] == ["FAILED"]
    assert not (tmp_path / "models" / "cnn.pt").exists() and not (tmp_path / "runs").exists()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_server_fails_fast_naming_the_uri(tmp_path: Path, cifar3_dir: Path) -> None:
    uri = f"http://127.0.0.1:{free_port()}"
    start = time.monotonic()
    done = run_stage("train", *train_args(tmp_path, cifar3_dir, tiny_params(tmp_path), "cnn"),
                     env={"MLFLOW_TRACKING_URI": uri})
    assert uri in last_line(done) and time.monotonic() - start < 60

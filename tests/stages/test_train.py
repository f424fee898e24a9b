"""`python -m stages.train`: a checkpoint, learning curves and an MLflow run that holds everything."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import mlflow.pytorch
import numpy as np
import pytest
import torch
from mlflow import MlflowClient

from cifar3study.data.dataset import read_split
from cifar3study.params import load_params, model_params
from cifar3study.training.checkpoint import load_checkpoint
from cifar3study.training.history import read_history
from cifar3study.training.models import normalize
from tests.helpers import ROOT, last_line, run_stage, tiny_params
from tests.stages.conftest import Outputs, train_args


def cnn_run(outputs: Outputs) -> mlflow.entities.Run:
    run_id = json.loads((outputs.root / "runs" / "cnn.json").read_text())["run_id"]
    return MlflowClient(outputs.uri).get_run(run_id)


def test_run_holds_params_and_param_count(outputs: Outputs) -> None:
    run = cnn_run(outputs)
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert params["param_count"] == "18123" and params["model.channels"] == "[16, 8]" and params["model.name"] == "cnn"
    assert params["train.lr"] == "0.01" and params["train.epochs"] == "2" and params["evaluate.batch_size"] == "1000"
    assert params["data.classes"] == "[airplane, automobile, ship]"
    assert run.data.metrics["param_count"] == 18123


def test_run_holds_provenance_tags(outputs: Outputs) -> None:
    tags = cnn_run(outputs).data.tags
    assert tags["model"] == "cnn" and tags["dvc.stage"] == "test"
    assert tags["data.archive_md5"] == "0" * 32
    assert tags["torch.version"] == torch.__version__ and tags["device"].startswith("cpu")
    assert tags["device.type"] == "cpu" and "cuda.version" not in tags  # a CPU run used no CUDA
    import subprocess

    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    assert tags["mlflow.source.git.commit"] == (head or "unknown")


def seed_runs(outputs: Outputs, model: str = "cnn") -> dict[int, mlflow.entities.Run]:
    info = json.loads((outputs.root / "runs" / f"{model}.json").read_text())
    return {int(seed): MlflowClient(outputs.uri).get_run(run_id) for seed, run_id in info["seed_runs"].items()}


def test_each_seed_is_a_nested_run_with_its_own_curves(outputs: Outputs) -> None:
    history, client, parent = read_history(outputs.root / "history" / "cnn.csv"), MlflowClient(outputs.uri), cnn_run(outputs)
    assert [(r.seed, r.epoch) for r in history] == [(0, 1), (0, 2), (1, 1), (1, 2)]
    for seed, child in seed_runs(outputs).items():
        assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id and child.data.params["seed"] == str(seed)
        assert child.info.status == "FINISHED" and child.info.run_name == f"{parent.info.run_name}-seed{seed}"
        curve = sorted(client.get_metric_history(child.info.run_id, "train_loss"), key=lambda m: m.step)
        assert [m.value for m in curve] == pytest.approx([r.train_loss for r in history if r.seed == seed])
    mean = sorted(client.get_metric_history(parent.info.run_id, "train_loss"), key=lambda m: m.step)
    assert mean[0].value == pytest.approx(sum(r.train_loss for r in history if r.epoch == 1) / 2)


def test_each_logged_model_gives_its_checkpoint_logits(outputs: Outputs) -> None:
    models, meta = load_checkpoint(outputs.root / "models" / "cnn.pt", model_params(load_params(outputs.params), "cnn"))
    x = normalize(read_split(outputs.data / "val.npz").images[:5], meta.stats, torch.device("cpu"))
    mlflow.set_tracking_uri(outputs.uri)
    try:
        for seed, child in seed_runs(outputs).items():
            logged = mlflow.pytorch.load_model(child.data.tags["model_uri"])
            with torch.no_grad():
                np.testing.assert_allclose(logged(x).numpy(), models[seed](x).numpy(), rtol=0, atol=1e-6)
    finally:
        mlflow.set_tracking_uri(None)


def test_failing_training_ends_failed_and_writes_nothing(tmp_path: Path, cifar3_dir: Path) -> None:
    """The checkpoint cannot be written (its folder is a file): the run ends FAILED, no later output appears."""
    (tmp_path / "models").write_text("a file where the checkpoint folder should be")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    done = run_stage("train", *train_args(tmp_path, cifar3_dir, tiny_params(tmp_path), "cnn"),
                     env={"MLFLOW_TRACKING_URI": uri})
    assert "models" in last_line(done)
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("cifar3").experiment_id])
    assert [r.info.status for r in runs] == ["FAILED"] * 3  # the model's run and its two seeds
    assert not (tmp_path / "runs").exists() and not (tmp_path / "history").exists()


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


def test_a_sigkilled_training_run_is_closed_by_the_next_one(tmp_path: Path, cifar3_dir: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = [sys.executable, "-m", "stages.train", *map(str, train_args(tmp_path, cifar3_dir,
                                                                      tiny_params(tmp_path, epochs=10_000), "cnn"))]
    victim = subprocess.Popen(args, cwd=ROOT, env={**os.environ, "MLFLOW_TRACKING_URI": uri},
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    client, deadline = MlflowClient(uri), time.monotonic() + 120
    while len(running := client.search_runs([client.get_experiment_by_name("cifar3").experiment_id])
               if client.get_experiment_by_name("cifar3") else []) < 3:
        assert victim.poll() is None and time.monotonic() < deadline, victim.stderr.read()[-2000:]
        time.sleep(0.5)
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=30)
    orphans = [r.info.run_id for r in running]
    assert len(orphans) == 3 and {client.get_run(r).info.status for r in orphans} == {"RUNNING"}  # parent + 2 seeds
    done = run_stage("train", *train_args(tmp_path, cifar3_dir, tiny_params(tmp_path, epochs=1), "cnn"),
                     env={"MLFLOW_TRACKING_URI": uri})
    assert done.returncode == 0, done.stderr[-2000:]
    assert {client.get_run(r).info.status for r in orphans} == {"KILLED"}
    assert done.stderr.count("closed run") == 3


def test_fc_and_cnn_runs_share_param_keys_and_have_distinct_names(outputs: Outputs) -> None:
    client = MlflowClient(outputs.uri)
    runs = {m: client.get_run(json.loads((outputs.root / "runs" / f"{m}.json").read_text())["run_id"])
            for m in ("fc", "cnn")}
    assert runs["fc"].data.params.keys() == runs["cnn"].data.params.keys()
    assert runs["cnn"].info.run_name.startswith("cnn-") and runs["fc"].info.run_name.startswith("fc-")

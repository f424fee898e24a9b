"""MLflow runs written by the real train/evaluate stages, in a real SQLite store and a real server."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import mlflow.pytorch
import numpy as np
import pytest
import torch
from mlflow import MlflowClient

from stages import tracking
from stages.common import StageError
from stages.datasets import load_split, normalize
from stages.models import load_checkpoint

from .conftest import tiny_params

ROOT = Path(__file__).resolve().parents[1]


def stage(module: str, env: dict[str, str], *args: object) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", f"stages.{module}", *map(str, args)], cwd=ROOT,
                          env={**os.environ, "DVC_STAGE": f"{module}@test", **env},
                          capture_output=True, text=True, timeout=300)


def train_and_evaluate(out: Path, data: Path, params: Path, env: dict[str, str], model: str = "cnn") -> None:
    trained = stage("train", env, "--params", params, "--model", model, "--train", data / "train.npz",
                    "--val", data / "val.npz", "--stats", data / "stats.json", "--checkpoint", out / f"{model}.pt",
                    "--history", out / f"{model}.csv", "--run-info", out / f"{model}.run.json")
    assert trained.returncode == 0, trained.stderr[-3000:]
    evaluated = stage("evaluate", env, "--params", params, "--model", model, "--checkpoint", out / f"{model}.pt",
                      "--run-info", out / f"{model}.run.json", "--train", data / "train.npz", "--val", data / "val.npz",
                      "--metrics", out / f"{model}.json", "--per-class", out / "per_class.json",
                      "--confusion", out / "confusion.csv")
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]


@pytest.fixture(scope="module")
def sqlite_run(tmp_path_factory: pytest.TempPathFactory, cifar3_dir: Path) -> dict:
    out = tmp_path_factory.mktemp("sqlite_run")
    uri = f"sqlite:///{out / 'mlflow.db'}"
    train_and_evaluate(out, cifar3_dir, tiny_params(out), {"MLFLOW_TRACKING_URI": uri})
    mlflow.set_tracking_uri(uri)
    run_id = json.loads((out / "cnn.run.json").read_text())["run_id"]
    return {"out": out, "uri": uri, "run": MlflowClient(uri).get_run(run_id), "client": MlflowClient(uri)}


def test_run_holds_params_and_param_count(sqlite_run: dict) -> None:
    run = sqlite_run["run"]
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert params["param_count"] == "18123" and params["models.cnn.channels"] == "[16, 8]"
    assert params["train.lr"] == "0.01" and params["train.epochs"] == "2" and params["evaluate.batch_size"] == "1000"
    assert params["data.classes"] == "[airplane, automobile, ship]"
    assert run.data.metrics["param_count"] == 18123


def test_run_holds_curves_and_final_metrics(sqlite_run: dict) -> None:
    run, client = sqlite_run["run"], sqlite_run["client"]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train_loss")] == [1, 2]
    curve = sorted(client.get_metric_history(run.info.run_id, "val_acc"), key=lambda m: (m.step, m.timestamp))
    metrics = json.loads((sqlite_run["out"] / "cnn.json").read_text())
    assert [m.step for m in curve] == [1, 2, 2]  # per epoch, then the evaluate stage's final value
    assert curve[-1].value == pytest.approx(metrics["val_acc"]) == pytest.approx(curve[-2].value)
    for key in ("train_acc", "val_acc", "gap", "seconds_per_epoch", "images_per_second"):
        assert run.data.metrics[key] == pytest.approx(metrics[key])
    assert metrics["params"] == 18123


def test_run_holds_provenance_tags(sqlite_run: dict) -> None:
    tags = sqlite_run["run"].data.tags
    assert tags["model"] == "cnn" and tags["dvc.stage"] == "train@test"
    assert tags["data.archive_md5"] == "0" * 32
    assert tags["torch.version"] == torch.__version__ and tags["device"].startswith("cpu")
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    assert tags["mlflow.source.git.commit"] == (head or "unknown")
    assert tags["git.dirty"] in (("true", "false") if head else ("unknown",))


def test_run_holds_artifacts(sqlite_run: dict) -> None:
    names = {a.path for a in sqlite_run["client"].list_artifacts(sqlite_run["run"].info.run_id)}
    assert {"learning_curves.png", "confusion_matrix.png", "parameters.md", "per_class.json", "params.yaml"} <= names


def test_logged_model_gives_the_checkpoint_logits(sqlite_run: dict, cifar3_dir: Path) -> None:
    logged = mlflow.pytorch.load_model(sqlite_run["run"].data.tags["model_uri"])
    model, meta = load_checkpoint(sqlite_run["out"] / "cnn.pt")
    x = normalize(load_split(cifar3_dir / "val.npz").images[:5], meta["mean"], meta["std"], torch.device("cpu"))
    with torch.no_grad():
        np.testing.assert_allclose(logged(x).numpy(), model(x).numpy(), rtol=0, atol=1e-6)


def test_failing_training_ends_failed(tmp_path: Path, cifar3_dir: Path) -> None:
    bad = tmp_path / "bad"
    bad.mkdir()
    for name in ("train.npz", "stats.json"):
        (bad / name).write_bytes((cifar3_dir / name).read_bytes())
    with np.load(cifar3_dir / "val.npz") as z:
        np.savez(bad / "val.npz", **{**z, "labels": np.full_like(z["labels"], 7)})  # no class 7: fails in epoch 1
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    done = stage("train", {"MLFLOW_TRACKING_URI": uri}, "--params", tiny_params(tmp_path), "--model", "cnn",
                 "--train", bad / "train.npz", "--val", bad / "val.npz", "--stats", bad / "stats.json",
                 "--checkpoint", tmp_path / "cnn.pt", "--history", tmp_path / "h.csv", "--run-info", tmp_path / "r.json")
    assert done.returncode != 0
    runs = MlflowClient(uri).search_runs([mlflow.set_tracking_uri(uri) or mlflow.get_experiment_by_name("cifar3").experiment_id])
    assert [r.info.status for r in runs] == ["FAILED"]
    assert not (tmp_path / "cnn.pt").exists()


def test_interrupt_ends_killed(tmp_path: Path) -> None:
    experiment = tracking.connect({"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'm.db'}"}, tmp_path, "x")
    with pytest.raises(KeyboardInterrupt), tracking.run(experiment) as active:
        raise KeyboardInterrupt
    assert MlflowClient().get_run(active.info.run_id).info.status == "KILLED"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_server_fails_fast_naming_the_uri(tmp_path: Path, cifar3_dir: Path) -> None:
    uri = f"http://127.0.0.1:{free_port()}"
    start = time.monotonic()
    done = stage("train", {"MLFLOW_TRACKING_URI": uri}, "--params", tiny_params(tmp_path), "--model", "cnn",
                 "--train", cifar3_dir / "train.npz", "--val", cifar3_dir / "val.npz", "--stats", cifar3_dir / "stats.json",
                 "--checkpoint", tmp_path / "cnn.pt", "--history", tmp_path / "h.csv", "--run-info", tmp_path / "r.json")
    assert done.returncode == 1 and time.monotonic() - start < 60
    assert uri in done.stderr.strip().splitlines()[-1]
    with pytest.raises(StageError, match="unreachable"):
        tracking.check_reachable(uri)


def test_default_store_follows_dvc_root(tmp_path: Path) -> None:
    assert tracking.tracking_uri({}, tracking.repo_root({"DVC_ROOT": str(tmp_path)}, Path("/elsewhere"))) == \
        f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"
    assert tracking.tracking_uri({"MLFLOW_TRACKING_URI": "http://team:5000"}, tmp_path) == "http://team:5000"


@pytest.fixture
def mlflow_server(tmp_path: Path):
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


def test_runs_reach_a_real_tracking_server(mlflow_server: str, tmp_path: Path, cifar3_dir: Path) -> None:
    train_and_evaluate(tmp_path, cifar3_dir, tiny_params(tmp_path), {"MLFLOW_TRACKING_URI": mlflow_server}, model="fc")
    run_id = json.loads((tmp_path / "fc.run.json").read_text())["run_id"]
    run = MlflowClient(mlflow_server).get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.params["param_count"] == "3737603"
    assert "val_acc" in run.data.metrics
    assert "confusion_matrix.png" in {a.path for a in MlflowClient(mlflow_server).list_artifacts(run_id)}


def test_missing_run_is_one_line_error(tmp_path: Path) -> None:
    tracking.connect({"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'm.db'}"}, tmp_path, "x")
    with pytest.raises(StageError, match="cannot open MLflow run 0123"), tracking.run(run_id="0123" + "0" * 28):
        pass


def test_compare_refuses_models_its_deps_do_not_name() -> None:
    from stages.compare import check_models

    check_models(["fc", "cnn"], ["cnn", "fc"])
    with pytest.raises(StageError, match="update compare's --models"):
        check_models(["fc", "cnn"], ["fc", "cnn", "wide"])

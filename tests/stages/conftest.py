"""One tiny real run of train and evaluate for every model, into a real SQLite MLflow store."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from tests.helpers import run_stage, tiny_params


@dataclasses.dataclass(frozen=True)
class Outputs:
    root: Path  # holds models/, runs/, history/, metrics/, eval/ as dvc.yaml lays them out
    data: Path  # train.npz, val.npz, stats.json
    params: Path
    uri: str  # the MLflow store

    def env(self) -> dict[str, str]:
        return {"MLFLOW_TRACKING_URI": self.uri, "DVC_STAGE": "test"}


def train_args(out: Path, data: Path, params: Path, model: str) -> list[object]:
    return ["--params", params, "--model", model, "--train", data / "train.npz", "--val", data / "val.npz",
            "--stats", data / "stats.json", "--checkpoint", out / "models" / f"{model}.pt",
            "--history", out / "history" / f"{model}.csv", "--run-info", out / "runs" / f"{model}.json"]


def evaluate_args(out: Path, data: Path, params: Path, model: str) -> list[object]:
    return ["--params", params, "--model", model, "--checkpoint", out / "models" / f"{model}.pt",
            "--run-info", out / "runs" / f"{model}.json", "--train", data / "train.npz", "--val", data / "val.npz",
            "--metrics", out / "metrics" / f"{model}.json", "--per-class", out / "eval" / model / "per_class.json",
            "--confusion", out / "eval" / model / "confusion.csv"]


@pytest.fixture(scope="session")
def outputs(tmp_path_factory: pytest.TempPathFactory, cifar3_dir: Path) -> Outputs:
    root = tmp_path_factory.mktemp("outputs")
    out = Outputs(root, cifar3_dir, tiny_params(root), f"sqlite:///{root / 'mlflow.db'}")
    for model in ("fc", "cnn"):
        for stage, args in (("train", train_args), ("evaluate", evaluate_args)):
            done = run_stage(stage, *args(root, cifar3_dir, out.params, model), env=out.env())
            assert done.returncode == 0, done.stderr[-3000:]
    return out

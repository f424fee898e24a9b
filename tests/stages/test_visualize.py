"""`python -m stages.visualize`: PNGs of the CNN's kernels and feature maps, also in its MLflow run."""

from __future__ import annotations

import json
from pathlib import Path

from mlflow import MlflowClient

from tests.helpers import last_line, run_stage
from tests.stages.conftest import Outputs

FIGURES = ["edge_kernels.png", "feature_maps_airplane.png", "feature_maps_automobile.png", "feature_maps_ship.png",
           "kernels.png"]


def visualize(outputs: Outputs, model: str, out_dir: Path, env: dict[str, str]):
    return run_stage("visualize", "--params", outputs.params, "--checkpoint", outputs.root / "models" / f"{model}.pt",
                     "--val", outputs.data / "val.npz", "--run-info", outputs.root / "runs" / f"{model}.json",
                     "--out-dir", out_dir, env=env)


def test_writes_pngs_and_logs_them_to_the_run(outputs: Outputs, tmp_path: Path) -> None:
    done = visualize(outputs, "cnn", tmp_path / "plots", outputs.env())
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == FIGURES
    assert all((tmp_path / "plots" / n).read_bytes().startswith(b"\x89PNG") for n in FIGURES)
    run_id = json.loads((outputs.root / "runs" / "cnn.json").read_text())["seed_runs"]["0"]  # visualize.seed 0
    logged = MlflowClient(outputs.uri).list_artifacts(run_id, "visualize")
    assert sorted(a.path for a in logged) == [f"visualize/{n}" for n in FIGURES]


def test_fc_checkpoint_is_refused_before_touching_mlflow(outputs: Outputs, tmp_path: Path) -> None:
    # A store that cannot open: reaching MLflow first would fail with another message.
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'missing' / 'mlflow.db'}"}
    line = last_line(visualize(outputs, "fc", tmp_path / "plots", env))
    assert "visualize needs a conv model" in line
    assert not (tmp_path / "plots").exists()

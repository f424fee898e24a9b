"""`python -m stages.visualize`: PNGs of the CNN's kernels and feature maps, also in its MLflow run."""

from __future__ import annotations

import json
from pathlib import Path
from urllib.parse import urlparse

import yaml
from mlflow import MlflowClient

from tests.helpers import last_line, run_stage
from tests.stages.conftest import Outputs

FIGURES = ["edge_kernels.png", "feature_maps_airplane.png", "feature_maps_automobile.png", "feature_maps_ship.png",
           "kernels.png"]


def visualize(outputs: Outputs, model: str, out_dir: Path, env: dict[str, str], params: Path | None = None):
    return run_stage("visualize", "--params", params or outputs.params,
                     "--checkpoint", outputs.root / "models" / f"{model}.pt",
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
    assert "fc.pt holds a model with arch=fc" in line and "models.cnn says arch=cnn" in line and "train@cnn" in line
    assert not (tmp_path / "plots").exists()


def artifact_files(client: MlflowClient, run_id: str) -> dict[str, int]:
    """Each artifact file of a run (local store) with its modification time: what a new log would change."""
    root = Path(urlparse(client.get_run(run_id).info.artifact_uri).path)
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


def test_a_checkpoint_of_other_conv_settings_is_refused_before_drawing(outputs: Outputs, tmp_path: Path) -> None:
    """params.yaml's models.cnn changed since train: the saved CNN is not the one it describes."""
    raw = yaml.safe_load(outputs.params.read_text())
    raw["models"]["cnn"]["channels"] = [4, 4]
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    client = MlflowClient(outputs.uri)
    run_id = json.loads((outputs.root / "runs" / "cnn.json").read_text())["seed_runs"]["0"]
    before = artifact_files(client, run_id)
    line = last_line(visualize(outputs, "cnn", tmp_path / "plots", outputs.env(), tmp_path / "params.yaml"))
    assert "holds a model with channels=[16, 8], but params.yaml's models.cnn says channels=[4, 4]" in line
    assert "train@cnn" in line
    assert artifact_files(client, run_id) == before
    assert not (tmp_path / "plots").exists()

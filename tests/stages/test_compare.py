"""`python -m stages.compare`: every model of params.yaml in the report, figures in each model's run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import yaml
from mlflow import MlflowClient

from tests.helpers import last_line, run_stage
from tests.stages.conftest import Outputs


def compare(outputs: Outputs, out_dir: Path, params: Path | None = None, metrics_dir: Path | None = None):
    root = outputs.root
    return run_stage("compare", "--params", params or outputs.params, "--metrics-dir", metrics_dir or root / "metrics",
                     "--runs-dir", root / "runs", "--history-dir", root / "history", "--eval-dir", root / "eval",
                     "--out-dir", out_dir, env=outputs.env())


def test_report_and_figures(outputs: Outputs, tmp_path: Path) -> None:
    done = compare(outputs, tmp_path / "reports")
    assert done.returncode == 0, done.stderr[-3000:]
    table = (tmp_path / "reports" / "comparison.md").read_text()
    assert table.index("18,123") < table.index("3,737,603") and "| 2 |" in table and " ± " in table
    assert "- cnn − fc: " in table and "95% CI [" in table
    curves = (tmp_path / "reports" / "learning_curves.csv").read_text().splitlines()
    assert curves[0].startswith("model,epoch,train_loss_mean,") and len(curves) == 1 + 2 * 2
    assert (tmp_path / "reports" / "learning_curves.png").read_bytes().startswith(b"\x89PNG")
    client = MlflowClient(outputs.uri)
    for model in ("fc", "cnn"):
        run_id = json.loads((outputs.root / "runs" / f"{model}.json").read_text())["run_id"]
        assert {"learning_curves.png", "confusion_matrix.png"} <= {a.path for a in client.list_artifacts(run_id)}
    experiment = client.get_experiment_by_name("cifar3").experiment_id
    comparison = client.search_runs([experiment], "tags.kind = 'comparison'")
    assert comparison and comparison[0].data.metrics["cnn.params"] == 18_123
    assert "cnn-fc.p_value" in comparison[0].data.metrics and comparison[0].info.status == "FINISHED"


def test_a_model_in_params_without_outputs_is_one_line(outputs: Outputs, tmp_path: Path) -> None:
    raw = yaml.safe_load(outputs.params.read_text())
    raw["models"]["wide"] = {**raw["models"]["fc"], "hidden": [2048]}
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(raw))
    line = last_line(compare(outputs, tmp_path / "reports", params))
    assert "wide.json" in line and "rerun its evaluate stage" in line
    assert not (tmp_path / "reports").exists()


def test_nan_metrics_are_refused_by_file_and_key(outputs: Outputs, tmp_path: Path) -> None:
    """NaN used to be reported as "nan" (json writes and reads it as a number); infinities: tests/test_evaluation.py."""
    metrics = tmp_path / "metrics"
    shutil.copytree(outputs.root / "metrics", metrics)
    raw = json.loads((metrics / "fc.json").read_text())
    (metrics / "fc.json").write_text(json.dumps({**raw, "val_acc_seed0": float("nan")}))
    line = last_line(compare(outputs, tmp_path / "reports", metrics_dir=metrics))
    assert "fc.json: 'val_acc_seed0' is nan, not a finite number; rerun its evaluate stage" in line
    assert not (tmp_path / "reports").exists()

"""`python -m stages.evaluate`: metrics of exactly what was saved, added to the train run."""

from __future__ import annotations

import argparse
import io
import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow import MlflowClient

from cifar3study.reporting.evaluation import read_metrics
from tests.helpers import GIB_IN_KIB, last_line, run_stage, with_peak_rss
from tests.stages.conftest import Outputs


def test_metrics_file_and_runs_agree(outputs: Outputs) -> None:
    client = MlflowClient(outputs.uri)
    for model, params in (("fc", 3_737_603), ("cnn", 18_123)):
        metrics = read_metrics(outputs.root / "metrics" / f"{model}.json")
        assert metrics.params == params and metrics.val_acc.n == 2 and 0 <= metrics.val_acc.mean <= 1
        info = json.loads((outputs.root / "runs" / f"{model}.json").read_text())
        parent = client.get_run(info["run_id"])
        for key in ("train_acc", "val_acc", "gap", "val_macro_f1"):
            spread = getattr(metrics, key)
            assert parent.data.metrics[key] == pytest.approx(spread.mean), key
            assert parent.data.metrics[f"{key}_std"] == pytest.approx(spread.std), key
            for seed, run_id in info["seed_runs"].items():
                assert client.get_run(run_id).data.metrics[key] == pytest.approx(spread.per_seed[int(seed)])
        assert parent.data.metrics["seconds_per_epoch"] == pytest.approx(metrics.seconds_per_epoch)
        assert parent.info.status == "FINISHED"


def test_final_metrics_end_the_learning_curves(outputs: Outputs) -> None:
    run_id = json.loads((outputs.root / "runs" / "cnn.json").read_text())["run_id"]
    curve = sorted(MlflowClient(outputs.uri).get_metric_history(run_id, "val_acc"), key=lambda m: (m.step, m.timestamp))
    assert [m.step for m in curve] == [1, 2, 2]  # per epoch, then the evaluate stage's final value
    assert curve[-1].value == pytest.approx(read_metrics(outputs.root / "metrics" / "cnn.json").val_acc.mean)


def test_per_class_and_confusion_files(outputs: Outputs) -> None:
    per_class = json.loads((outputs.root / "eval" / "cnn" / "per_class.json").read_text())
    assert per_class["pooled_over_seeds"] == [0, 1] and list(per_class["classes"]) == ["airplane", "automobile", "ship"]
    rows = (outputs.root / "eval" / "cnn" / "confusion.csv").read_text().splitlines()
    assert rows[0] == "actual,predicted,seed" and len(rows) == 1 + sum(r["support"] for r in per_class["classes"].values())
    assert {row.rsplit(",", 1)[1] for row in rows[1:]} == {"0", "1"}


def evaluate(outputs: Outputs, run_info: Path, tmp_path: Path, model: str = "cnn", checkpoint: str | None = None,
             env: dict[str, str] | None = None):
    out = tmp_path / "out"
    return run_stage("evaluate", "--params", outputs.params, "--model", model,
                     "--checkpoint", outputs.root / "models" / f"{checkpoint or model}.pt", "--run-info", run_info,
                     "--train", outputs.data / "train.npz", "--val", outputs.data / "val.npz",
                     "--metrics", out / "m.json", "--per-class", out / "pc.json", "--confusion", out / "c.csv",
                     env=env or outputs.env())


def test_a_run_of_another_experiment_is_refused_and_untouched(outputs: Outputs, tmp_path: Path) -> None:
    client = MlflowClient(outputs.uri)
    foreign = client.create_run(client.create_experiment(f"other-{tmp_path.name}"), tags={"model": "cnn"})
    info = json.loads((outputs.root / "runs" / "cnn.json").read_text())
    (tmp_path / "r.json").write_text(json.dumps({**info, "run_id": foreign.info.run_id}))
    assert "not the cnn run of experiment" in last_line(evaluate(outputs, tmp_path / "r.json", tmp_path))
    assert client.get_run(foreign.info.run_id).data.metrics == {}
    assert not (tmp_path / "out").exists()


def test_a_malformed_record_is_one_line_and_leaves_the_run_finished(outputs: Outputs, tmp_path: Path) -> None:
    info = json.loads((outputs.root / "runs" / "cnn.json").read_text())
    (tmp_path / "r.json").write_text(json.dumps({**info, "epochs": "two"}))
    assert "epochs is 'two', not a int" in last_line(evaluate(outputs, tmp_path / "r.json", tmp_path))
    assert MlflowClient(outputs.uri).get_run(info["run_id"]).info.status == "FINISHED"
    assert not (tmp_path / "out").exists()


def test_the_fc_run_is_refused_for_the_cnn(outputs: Outputs, tmp_path: Path) -> None:
    line = last_line(evaluate(outputs, outputs.root / "runs" / "fc.json", tmp_path))
    assert "run of model 'fc'" in line and "not the cnn run" in line


def metric_counts(client: MlflowClient, info: dict) -> dict[tuple[str, str], int]:
    """How many values each metric of a model's parent and seed runs holds."""
    run_ids = [info["run_id"], *info["seed_runs"].values()]
    return {(r, key): len(client.get_metric_history(r, key)) for r in run_ids for key in client.get_run(r).data.metrics}


def test_the_cnn_checkpoint_is_refused_as_fc_before_anything_is_logged(outputs: Outputs, tmp_path: Path) -> None:
    shutil.copy(outputs.root / "mlflow.db", tmp_path / "mlflow.db")  # a store of its own: the fc runs stay clean
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client, info = MlflowClient(uri), json.loads((outputs.root / "runs" / "fc.json").read_text())
    before = metric_counts(client, info)
    done = evaluate(outputs, outputs.root / "runs" / "fc.json", tmp_path, "fc", checkpoint="cnn",
                    env={**outputs.env(), "MLFLOW_TRACKING_URI": uri})
    line = last_line(done)
    assert "cnn.pt holds a model with arch=cnn" in line and "params.yaml's models.fc says arch=fc" in line
    assert "train@fc" in line
    assert metric_counts(client, info) == before
    assert not (tmp_path / "out").exists()


def evaluate_with_peak(outputs: Outputs, tmp_path: Path, **paths: Path) -> tuple[str, int]:
    """Evaluate the cnn with some inputs replaced; its one refusal line (exit 1) and peak resident set in KiB."""
    files = {"checkpoint": outputs.root / "models" / "cnn.pt", "run_info": outputs.root / "runs" / "cnn.json",
             "train": outputs.data / "train.npz", "val": outputs.data / "val.npz", **paths}
    out = tmp_path / "out"
    done, peak_kib = with_peak_rss(
        "evaluate", "--params", outputs.params, "--model", "cnn", *(a for k, v in files.items()
                                                                    for a in (f"--{k.replace('_', '-')}", v)),
        "--metrics", out / "m.json", "--per-class", out / "pc.json", "--confusion", out / "c.csv", env=outputs.env())
    line = last_line(done)
    assert done.returncode == 1 and "unexpected" not in line and not out.exists(), line
    return line, peak_kib


@pytest.fixture(scope="module")
def torch_import_kib() -> int:
    """Peak resident set of a process that imports torch and nothing else."""
    code = "import resource, torch; print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"
    return int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)


# A refusal of params, run-info or a split reads a few files: Python, YAML and numpy. It peaked at 1.05 GiB, the
# stage's whole footprint (torch, MLflow, scikit-learn), before they were imported after the checks (issue 25).
CHEAP_REFUSAL_KIB = 200 << 10
# A checkpoint refusal needs torch to read the file; MLflow and scikit-learn stay unimported.
CHECKPOINT_REFUSAL_KIB = 128 << 10


@pytest.mark.parametrize(("key", "needle"), [
    ("9" * 5000, "seed_runs key '99999"),  # `unexpected ValueError` from int() (issue 25)
    ("²", "seed_runs key '²' is not a seed (0 to 4294967295); rerun its train stage"),
])
def test_a_run_info_seed_key_that_is_no_seed_is_a_named_refusal(outputs: Outputs, tmp_path: Path, key: str,
                                                                needle: str) -> None:
    info = json.loads((outputs.root / "runs" / "cnn.json").read_text())
    (tmp_path / "r.json").write_text(json.dumps({**info, "seed_runs": {key: "a" * 32}}))
    line, peak_kib = evaluate_with_peak(outputs, tmp_path, run_info=tmp_path / "r.json")
    assert needle in line and "r.json: seed_runs key" in line and len(line) < 300
    assert peak_kib < CHEAP_REFUSAL_KIB, f"{peak_kib / GIB_IN_KIB:.2f} GiB"


def test_a_split_declaring_petabytes_is_refused_unread(outputs: Outputs, tmp_path: Path) -> None:
    """Its header declares 3e15 images' bytes: `unexpected MemoryError` before (issue 25)."""
    with zipfile.ZipFile(tmp_path / "val.npz", "w") as z:
        for name, descr, shape in (("images", "|u1", (10**11, 3, 32, 32)), ("labels", "<i8", (10**11,)),
                                   ("classes", "<U10", (3,)), ("source_md5", "<U32", ())):
            header = io.BytesIO()
            np.lib.format.write_array_header_1_0(header, {"descr": descr, "fortran_order": False, "shape": shape})
            z.writestr(f"{name}.npy", header.getvalue())
    line, peak_kib = evaluate_with_peak(outputs, tmp_path, val=tmp_path / "val.npz")
    assert "val.npz is not a usable split (images declared uint8 (100000000000, 3, 32, 32)" in line
    assert "rerun `dvc repro cifar3`" in line
    assert peak_kib < CHEAP_REFUSAL_KIB, f"{peak_kib / GIB_IN_KIB:.2f} GiB"


@pytest.mark.parametrize("damage", ["truncated", "pickle"])
def test_an_unloadable_checkpoint_is_one_short_line_without_unsafe_advice(
        outputs: Outputs, tmp_path: Path, torch_import_kib: int, damage: str) -> None:
    """torch's refusal (373-388 characters) ended advising weights_only=False, the unsafe load (issue 25)."""
    path = tmp_path / "cnn.pt"
    if damage == "truncated":
        path.write_bytes((outputs.root / "models" / "cnn.pt").read_bytes()[:4096])
    else:
        torch.save({"format": 2, "config": argparse.Namespace(arch="cnn")}, path)  # pickles an object
    line, peak_kib = evaluate_with_peak(outputs, tmp_path, checkpoint=path)
    assert f"{path} is not a checkpoint of this project (unreadable: cut short" in line and "train@cnn" in line
    assert "weights_only" not in line and len(line.split("error: ", 1)[1]) - len(str(path)) < 200
    assert peak_kib - torch_import_kib < CHECKPOINT_REFUSAL_KIB, f"{peak_kib / GIB_IN_KIB:.2f} GiB"

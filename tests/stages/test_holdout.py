"""data.holdout: train and evaluate select on a part held out of the training split, never on --val (issue 26).

Without a holdout (the default) every output keeps the names and keys it had before data.holdout existed.
"""

from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path

import pytest
import torch
import yaml
from mlflow import MlflowClient

from tests.helpers import last_line, run_stage, tiny_params
from tests.stages.conftest import Outputs, evaluate_args, train_args

TIMING = ("seconds", "seconds_per_epoch", "group_seconds_per_epoch", "images_per_second")
HELD_PER_CLASS = 8  # 20% of the synthetic split's 40 training images of each class


@dataclasses.dataclass(frozen=True)
class Run:
    root: Path
    uri: str

    def parent(self) -> object:
        info = json.loads((self.root / "runs" / "cnn.json").read_text())
        return MlflowClient(self.uri).get_run(info["run_id"])


def holdout_params(folder: Path, holdout: float) -> Path:
    """Tiny params, the cnn only, batches of 8 (each class keeps 8 held-out images)."""
    path = tiny_params(folder, batch_size=8)
    raw = yaml.safe_load(path.read_text())
    raw["data"].update({"holdout": holdout, "holdout_seed": 1})
    raw["models"] = {"cnn": raw["models"]["cnn"]}
    path.write_text(yaml.safe_dump(raw))
    return path


def train_and_evaluate(root: Path, data: Path, params: Path, val: Path) -> Run:
    run = Run(root, f"sqlite:///{root / 'mlflow.db'}")
    root.mkdir()
    for stage, args in (("train", train_args), ("evaluate", evaluate_args)):
        argv = [str(val) if str(a) == str(data / "val.npz") else a for a in args(root, data, params, "cnn")]
        done = run_stage(stage, *argv, env={"MLFLOW_TRACKING_URI": run.uri})
        assert done.returncode == 0, done.stderr[-3000:]
    return run


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, cifar3_dir: Path) -> dict[str, Run]:
    """The same holdout run twice: with --val a file that does not exist, and with the real validation split."""
    root = tmp_path_factory.mktemp("holdout")
    params = holdout_params(root, 0.2)
    return {"no_val": train_and_evaluate(root / "no_val", cifar3_dir, params, root / "absent" / "val.npz"),
            "val": train_and_evaluate(root / "val", cifar3_dir, params, cifar3_dir / "val.npz")}


def rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_selection_numbers_do_not_depend_on_the_validation_file(runs: dict[str, Run]) -> None:
    """--val missing or real, every number but the timings is the same: the test split is not read during selection."""
    a, b = (runs[k].root for k in ("no_val", "val"))
    history = [[{k: v for k, v in r.items() if k not in TIMING} for r in rows(root / "history" / "cnn.csv")]
               for root in (a, b)]
    assert history[0] == history[1] and len(history[0]) == 4
    metrics = [{k: v for k, v in json.loads((root / "metrics" / "cnn.json").read_text()).items() if k not in TIMING}
               for root in (a, b)]
    assert metrics[0] == metrics[1]
    for name in ("eval/cnn/per_class.json", "eval/cnn/confusion.csv"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_holdout_outputs_are_named_after_the_split(runs: dict[str, Run]) -> None:
    run = runs["no_val"]
    header = (run.root / "history" / "cnn.csv").read_text().splitlines()[0]
    assert header == "seed,epoch,train_loss,train_acc_running,holdout_loss,holdout_acc,seconds"
    metrics = json.loads((run.root / "metrics" / "cnn.json").read_text())
    assert not [k for k in metrics if k.startswith("val_")]
    assert {"holdout_acc", "holdout_acc_std", "holdout_acc_ci95_low", "holdout_acc_seed0", "holdout_macro_f1",
            "gap", "train_acc"} <= metrics.keys()
    confusion = (run.root / "eval" / "cnn" / "confusion.csv").read_text().splitlines()
    assert len(confusion) == 1 + 3 * HELD_PER_CLASS * 2  # the held-out images, two seeds
    per_class = json.loads((run.root / "eval" / "cnn" / "per_class.json").read_text())["classes"]
    assert [c["support"] for c in per_class.values()] == [2 * HELD_PER_CLASS] * 3


def test_mlflow_curves_and_params_say_holdout(runs: dict[str, Run]) -> None:
    run, client = runs["no_val"], MlflowClient(runs["no_val"].uri)
    parent = run.parent()
    assert not [k for k in parent.data.metrics if k.startswith("val_")]
    assert {"holdout_loss", "holdout_acc", "holdout_acc_std", "holdout_macro_f1"} <= parent.data.metrics.keys()
    assert parent.data.params["data.holdout"] == "0.2" and parent.data.params["data.holdout_seed"] == "1"
    curve = sorted(client.get_metric_history(parent.info.run_id, "holdout_acc"), key=lambda m: (m.step, m.timestamp))
    assert [m.step for m in curve] == [1, 2, 2]  # per epoch, then evaluate's final value
    metrics = json.loads((run.root / "metrics" / "cnn.json").read_text())
    assert curve[-1].value == pytest.approx(metrics["holdout_acc"])


def test_compare_labels_holdout_columns(runs: dict[str, Run], tmp_path: Path) -> None:
    root = runs["no_val"].root
    done = run_stage("compare", "--params", root.parent / "params.yaml", "--metrics-dir", root / "metrics",
                     "--runs-dir", root / "runs", "--history-dir", root / "history", "--eval-dir", root / "eval",
                     "--out-dir", tmp_path, env={"MLFLOW_TRACKING_URI": runs["no_val"].uri})
    assert done.returncode == 0, done.stderr[-3000:]
    assert "| holdout acc | holdout acc 95% CI |" in (tmp_path / "comparison.md").read_text()
    assert "holdout_acc_ci95_low" in (tmp_path / "comparison.csv").read_text().splitlines()[0]
    assert "holdout_acc_mean" in (tmp_path / "learning_curves.csv").read_text().splitlines()[0]
    client = MlflowClient(runs["no_val"].uri)
    experiment = client.get_experiment_by_name("cifar3").experiment_id
    (comparison,) = client.search_runs([experiment], "tags.kind = 'comparison'")
    assert "cnn.holdout_acc" in comparison.data.metrics and "cnn.val_acc" not in comparison.data.metrics


def test_evaluate_refuses_a_checkpoint_trained_with_another_holdout(runs: dict[str, Run], cifar3_dir: Path,
                                                                   tmp_path: Path) -> None:
    """Its held-out images would be scored as unseen although the model trained on them, or the other way round."""
    root = runs["no_val"].root
    args = evaluate_args(tmp_path, cifar3_dir, holdout_params(tmp_path, 0.0), "cnn")
    args[args.index("--checkpoint") + 1], args[args.index("--run-info") + 1] = root / "models/cnn.pt", root / "runs/cnn.json"
    line = last_line(run_stage("evaluate", *args, env={"MLFLOW_TRACKING_URI": runs["no_val"].uri}))
    assert "cnn.pt (classes ['airplane', 'automobile', 'ship'], holdout (0.2, 1)) was not trained as params.yaml says" in line
    assert "holdout None" in line and "train@cnn" in line and not (tmp_path / "metrics").exists()


def test_a_holdout_smaller_than_a_batch_is_refused_by_train(tmp_path: Path, cifar3_dir: Path) -> None:
    """params.yaml passes (1,000 of CIFAR-10's 5,000 a class), but this split holds out 8 a class, batches are 32."""
    params = holdout_params(tmp_path, 0.2)
    raw = yaml.safe_load(params.read_text())
    raw["train"]["batch_size"] = 32
    params.write_text(yaml.safe_dump(raw))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    line = last_line(run_stage("train", *train_args(tmp_path, cifar3_dir, params, "cnn"), env={"MLFLOW_TRACKING_URI": uri}))
    assert "data.holdout 0.2 leaves 8 images of class 'airplane' in the held-out part, fewer than one batch" in line
    assert not (tmp_path / "models").exists()
    assert MlflowClient(uri).search_runs([MlflowClient(uri).get_experiment_by_name("cifar3").experiment_id]) == []


# What the outputs of a run without a holdout held before data.holdout existed (two seeds, the cnn).
SPREAD_KEYS = ("train_acc", "val_acc", "gap", "val_macro_f1")
METRICS_KEYS = ["params", *(f"{k}{s}" for k in SPREAD_KEYS for s in (
    "", "_std", "_min", "_max", "_n", "_ci95_low", "_ci95_high", "_seed0", "_seed1")), *TIMING[1:]]
PARENT_METRICS = {"param_count", "train_loss", "train_acc_running", "val_loss", *TIMING[1:],
                  *(f"{k}{s}" for k in SPREAD_KEYS for s in ("", "_std", "_min", "_max", "_n", "_ci95_low", "_ci95_high"))}
SEED_METRICS = {"param_count", "train_loss", "train_acc_running", "val_loss", *SPREAD_KEYS}
PARAM_KEYS = {"data.classes", "evaluate.batch_size", "mlflow.experiment", "param_count",
              *(f"model.{k}" for k in ("activation", "arch", "channels", "hidden", "kernel_size", "name", "padding", "pool")),
              *(f"train.{k}" for k in ("batch_size", "channels_last", "deterministic", "device", "epochs", "lr", "momentum",
                                       "seeds", "tf32", "weight_decay"))}
CHECKPOINT_KEYS = ["format", "config", "classes", "mean", "std", "seeds", "states"]


def test_without_a_holdout_every_output_keeps_its_names_and_keys(outputs: Outputs) -> None:
    header = (outputs.root / "history" / "cnn.csv").read_text().splitlines()[0]
    assert header == "seed,epoch,train_loss,train_acc_running,val_loss,val_acc,seconds"
    assert list(json.loads((outputs.root / "metrics" / "cnn.json").read_text())) == METRICS_KEYS
    info, client = json.loads((outputs.root / "runs" / "cnn.json").read_text()), MlflowClient(outputs.uri)
    parent = client.get_run(info["run_id"])
    assert set(parent.data.metrics) == PARENT_METRICS and set(parent.data.params) == PARAM_KEYS
    for run_id in info["seed_runs"].values():
        assert set(client.get_run(run_id).data.metrics) == SEED_METRICS
    assert list(torch.load(outputs.root / "models" / "cnn.pt", weights_only=True)) == CHECKPOINT_KEYS
    assert (outputs.root / "eval" / "cnn" / "confusion.csv").read_text().startswith("actual,predicted,seed\n")

"""The reproducible record: weights digests, the train stage's code table and digest (as DVC hashes files),
and what a run's record reads back from a real MLflow store."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from dvc_data.hashfile.hash import file_md5 as dvc_file_md5
from mlflow import MlflowClient

from cifar3study.errors import StageError
from cifar3study.params import ModelParams
from cifar3study.tracking.record import UNKNOWN, code_digest, code_table, read_record, weights_digest
from cifar3study.training.models import build_model
from tests.helpers import ROOT

CNN = ModelParams(arch="cnn", hidden=(8,), activation="tanh", channels=(4, 2), kernel_size=3, padding=1, pool=2)


def test_weights_digest_sees_one_changed_value_and_ignores_memory_layout() -> None:
    torch.manual_seed(0)
    model = build_model(CNN, 3)
    digest = weights_digest(model)
    assert digest == weights_digest(model.to(memory_format=torch.channels_last))
    with torch.no_grad():
        first = next(model.parameters())
        first[(0,) * first.dim()] += 1e-6
    assert weights_digest(model) != digest


def test_code_table_lists_the_train_stage_py_deps_with_dvcs_own_md5(tmp_path: Path) -> None:
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "a.py").write_bytes(b"x = 1\r\n")  # CRLF: DVC 3 hashes the bytes as they are
    (tmp_path / "stage.py").write_text("print()\n")
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"train": {"foreach": ["m"], "do": {
        "cmd": "x", "deps": ["stage.py", "pkg/a.py", "data/train.npz"]}}}}))
    table = code_table(tmp_path)
    assert table == {"pkg/a.py": dvc_file_md5(str(tmp_path / "pkg" / "a.py")),
                     "stage.py": dvc_file_md5(str(tmp_path / "stage.py"))}
    digest = code_digest(table)
    (tmp_path / "pkg" / "a.py").write_bytes(b"x = 2\r\n")
    assert code_digest(code_table(tmp_path)) != digest


def test_this_repositorys_train_stage_code_is_its_dvc_yaml_deps() -> None:
    deps = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]["train"]["do"]["deps"]
    assert set(code_table(ROOT)) == {d for d in deps if d.endswith(".py")} and "stages/train.py" in code_table(ROOT)


def test_no_dvc_yaml_gives_an_unknown_digest(tmp_path: Path) -> None:
    assert code_table(tmp_path) == {} and code_digest({}) == UNKNOWN


def logged_run(client: MlflowClient, params: dict[str, str], acc: str) -> str:
    """A parent run and two seed runs as train and evaluate log them: `acc` is the evaluation split's accuracy."""
    experiment = client.create_experiment("cifar3")
    parent = client.create_run(experiment, run_name="cnn-x", tags={"kind": "model", "model": "cnn"}).info.run_id
    for key, value in params.items():
        client.log_param(parent, key, value)
    for key, value in {"train_acc": 0.95, acc: 0.85, f"{acc}_ci95_low": 0.8, f"{acc}_ci95_high": 0.9,
                       "train_acc_ci95_low": 0.9, "train_acc_ci95_high": 0.99}.items():
        client.log_metric(parent, key, value)
    for seed in (0, 1):
        run = client.create_run(experiment, tags={"kind": "seed", "seed": str(seed), "mlflow.parentRunId": parent})
        client.log_metric(run.info.run_id, acc, 0.5, step=1)  # train's curve, then evaluate's final value
        client.log_metric(run.info.run_id, acc, 0.8 + seed / 100, step=2)
        client.log_metric(run.info.run_id, "train_acc", 0.9, step=2)
    return parent


def test_a_holdout_run_is_read_on_its_holdout_accuracy(tmp_path: Path) -> None:
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run_id = logged_run(client, {"data.holdout": "0.25", "data.holdout_seed": "0"}, "holdout_acc")
    record = read_record(client, run_id, tmp_path / "scratch")
    assert record.split == "holdout" and record.accuracies == ("train_acc", "holdout_acc") and record.evaluated
    assert {s: r.eval_acc for s, r in record.seeds.items()} == {0: 0.8, 1: 0.81}
    assert record.ci95 == {"train_acc": (0.9, 0.99), "holdout_acc": (0.8, 0.9)}


def test_a_run_without_a_holdout_is_read_on_val_acc_and_a_bad_holdout_is_refused(tmp_path: Path) -> None:
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run_id = logged_run(client, {"train.lr": "0.01"}, "val_acc")
    record = read_record(client, run_id, tmp_path / "scratch")
    assert record.split == "val" and record.accuracies == ("train_acc", "val_acc") and record.evaluated
    assert record.seeds[1].eval_acc == 0.81 and record.ci95["val_acc"] == (0.8, 0.9)
    client.log_param(run_id, "data.holdout", "lots")
    with pytest.raises(StageError, match=f"run '{run_id}' records data.holdout 'lots', not a number"):
        read_record(client, run_id, tmp_path / "scratch")

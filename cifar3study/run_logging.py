"""What each stage writes into MLflow runs: params under keys both models share, curves, metrics, figures, models."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from collections.abc import Mapping
from pathlib import Path

import mlflow
import mlflow.pytorch
import numpy as np
import torch
from matplotlib.figure import Figure
from mlflow import MlflowClient
from mlflow.entities import Metric
from mlflow.models import infer_signature

from cifar3study.history import EpochRecord
from cifar3study.params import CONV_KEYS, ModelParams, Params

NOT_APPLICABLE = "none"  # the value of a conv-only key on an fc model: the same row compares both models


def flatten(prefix: str, value: object) -> dict[str, str]:
    """Dataclasses and dicts as dotted keys; lists as `[a, b]`."""
    if dataclasses.is_dataclass(value):
        value = dataclasses.asdict(value)
    if isinstance(value, dict):
        out: dict[str, str] = {}
        for key, item in value.items():
            out.update(flatten(f"{prefix}.{key}" if prefix else str(key), item))
        return out
    if isinstance(value, (list, tuple)):
        return {prefix: "[" + ", ".join(str(v) for v in value) + "]"}
    return {prefix: NOT_APPLICABLE if value is None else str(value)}


def model_params(name: str, cfg: ModelParams) -> dict[str, str]:
    """The architecture under `model.*` keys, identical for every model (conv keys `none` for fc)."""
    return {"model.name": name, **flatten("model", cfg), **{f"model.{k}": NOT_APPLICABLE for k in CONV_KEYS
                                                            if getattr(cfg, k) is None}}


def params_digest(name: str, params: Params) -> str:
    """7 hex digits that change with anything that changes this model's training."""
    read = {"model": dataclasses.asdict(params.models[name]), "train": dataclasses.asdict(params.train),
            "classes": params.data.classes}
    return hashlib.sha1(json.dumps(read, sort_keys=True).encode()).hexdigest()[:7]


def run_name(name: str, env: Mapping[str, str], digest: str) -> str:
    """`cnn-<dvc experiment>` under `dvc exp run`, else `cnn-<params digest>`: runs of two setups differ."""
    return f"{name}-{env.get('DVC_EXP_NAME') or digest}"


def log_training_setup(name: str, params: Params, n_params: int, layers: str) -> None:
    """Every value the train stage read, and the model's size (`layers`: a markdown table)."""
    mlflow.log_params({**model_params(name, params.models[name]), **flatten("train", params.train),
                       **flatten("evaluate", params.evaluate), **flatten("mlflow", params.mlflow),
                       "data.classes": flatten("", params.data.classes)[""], "param_count": n_params})
    mlflow.log_metric("param_count", n_params)
    mlflow.log_text(layers, "parameters.md")


def log_epoch(row: EpochRecord) -> None:
    mlflow.log_metrics({"train_loss": row.train_loss, "train_acc_running": row.train_acc_running,
                        "val_loss": row.val_loss, "val_acc": row.val_acc}, step=row.epoch)


def log_evaluation(run_id: str, step: int, metrics: Mapping[str, float], per_class: Mapping[str, Mapping]) -> None:
    """Final metrics at the last epoch's step, so they end the curves they share a name with.

    Through the client: the run stays as its train stage left it, whatever happens here.
    """
    now = int(time.time() * 1000)
    values = {**metrics, **{f"val_f1_{c}": r["f1"] for c, r in per_class.items()}}
    client = MlflowClient()
    client.log_batch(run_id, metrics=[Metric(k, float(v), now, step) for k, v in values.items()])
    client.log_dict(run_id, dict(per_class), "per_class.json")


def log_figures(run_id: str, figures: dict[str, Figure], folder: str = "") -> None:
    """Figures into a run that may have ended (their PNGs overwrite earlier ones of the same name)."""
    client = MlflowClient()
    for name, fig in figures.items():
        client.log_figure(run_id, fig, f"{folder}/{name}" if folder else name)


def log_comparison(experiment_id: str, run_name_: str, rows: list[dict], run_ids: dict[str, str],
                   files: list[Path], tags: Mapping[str, str]) -> str:
    """A `comparison` run: each model's headline numbers as `<model>.<metric>`, and the report files."""
    client = MlflowClient()
    created = client.create_run(experiment_id, run_name=run_name_,
                                tags={"kind": "comparison", **tags, **{f"run.{n}": rid for n, rid in run_ids.items()}})
    run_id = created.info.run_id
    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(f"{row['model']}.{k}", float(v), now, 0)
                                      for row in rows for k, v in row.items() if k != "model"])
    for path in files:
        if path.is_file():
            client.log_artifact(run_id, str(path))
    client.set_terminated(run_id, "FINISHED")
    return run_id


def log_model(model: torch.nn.Module, example: np.ndarray, name: str = "model") -> str:
    """Log a CPU model with an image-tensor signature; returns its model URI.

    Saved as a torch.export program (MLflow's "pt2" format: no pickle, loads
    without this repository's code). The example needs a batch of 2 or more,
    or export fixes the batch size at 1. Requirements are given rather than
    inferred, which would re-import the model in a subprocess.
    """
    with torch.no_grad():
        output = model(torch.from_numpy(example)).numpy()
    info = mlflow.pytorch.log_model(
        model, name=name, signature=infer_signature(example, output), input_example=example,
        pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", f"mlflow=={mlflow.__version__}"],
        serialization_format="pt2",
    )
    mlflow.set_tag("model_uri", info.model_uri)
    return info.model_uri

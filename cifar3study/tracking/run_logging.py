"""What each stage writes into MLflow runs: params under keys both models share, curves, metrics, figures, models.

A model is a parent run (params, param_count, the aggregates over seeds, the
mean curves, provenance, figures) with one nested run per seed (its seed,
its curves, its final metrics, its logged model).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import statistics
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

from cifar3study.params import CONV_KEYS, ModelParams, Params
from cifar3study.tracking.store import GroupRuns
from cifar3study.training.history import EpochRecord

NOT_APPLICABLE = "none"  # the value of a conv-only key on an fc model: the same row compares both models
CURVES = ("train_loss", "train_acc_running", "val_loss", "val_acc")  # EpochRecord fields, logged as `curves` names


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


def shared_model_keys(name: str, cfg: ModelParams) -> dict[str, str]:
    """The architecture under `model.*` keys, identical for every model (conv keys `none` for fc)."""
    return {"model.name": name, **flatten("model", cfg), **{f"model.{k}": NOT_APPLICABLE for k in CONV_KEYS
                                                            if getattr(cfg, k) is None}}


def params_digest(name: str, params: Params) -> str:
    """7 hex digits that change with anything that changes this model's training."""
    read = {"model": dataclasses.asdict(params.models[name]), "train": dataclasses.asdict(params.train),
            "classes": params.data.classes}
    if params.data.holdout:  # only then: a run without a holdout keeps the name it always had
        read["holdout"] = [params.data.holdout, params.data.holdout_seed]
    return hashlib.sha1(json.dumps(read, sort_keys=True).encode()).hexdigest()[:7]


def run_name(name: str, env: Mapping[str, str], digest: str) -> str:
    """`cnn-<dvc experiment>` under `dvc exp run`, else `cnn-<params digest>`: runs of two setups differ."""
    return f"{name}-{env.get('DVC_EXP_NAME') or digest}"


def _metrics(values: Mapping[str, float | None], step: int) -> list[Metric]:
    now = int(time.time() * 1000)
    return [Metric(k, float(v), now, step) for k, v in values.items() if v is not None]


def data_keys(params: Params) -> dict[str, str]:
    """The data settings a model's numbers depend on; the holdout's only when there is one (0 adds no key)."""
    keys = {"data.classes": flatten("", params.data.classes)[""]}
    if params.data.holdout:
        keys |= {"data.holdout": str(params.data.holdout), "data.holdout_seed": str(params.data.holdout_seed)}
    return keys


def log_training_setup(runs: GroupRuns, name: str, params: Params, n_params: int, layers: str) -> None:
    """Every value the train stage read and the model's size (`layers`: a markdown table); each seed's seed."""
    mlflow.log_params({**shared_model_keys(name, params.models[name]), **flatten("train", params.train),
                       **flatten("evaluate", params.evaluate), **flatten("mlflow", params.mlflow),
                       **data_keys(params), "param_count": n_params})
    mlflow.log_metric("param_count", n_params)
    mlflow.log_text(layers, "parameters.md")
    client = MlflowClient()
    for seed, run_id in runs.seeds.items():
        client.log_batch(run_id, params=[mlflow.entities.Param("seed", str(seed))],
                         metrics=_metrics({"param_count": n_params}, 0))


def curve_names(split: str) -> dict[str, str]:
    """{EpochRecord field: MLflow metric}: the evaluation split's curves are named after it (val_acc, holdout_acc)."""
    return dict(zip(CURVES, ("train_loss", "train_acc_running", f"{split}_loss", f"{split}_acc"), strict=True))


def log_epoch(runs: GroupRuns, rows: list[EpochRecord]) -> None:
    """Each seed's curves in its own run; their mean in the parent run."""
    client, names = MlflowClient(), curve_names(rows[0].split)
    for row in rows:
        client.log_batch(runs.seeds[row.seed], metrics=_metrics({names[k]: getattr(row, k) for k in CURVES}, row.epoch))
    means = {names[k]: statistics.fmean(getattr(r, k) for r in rows) for k in CURVES}
    client.log_batch(runs.parent, metrics=_metrics(means, rows[0].epoch))


def log_models(runs: GroupRuns, models: Mapping[int, torch.nn.Module], example: np.ndarray) -> None:
    """Each seed's model into its own run."""
    for seed, model in models.items():
        with mlflow.start_run(run_id=runs.seeds[seed], nested=True):
            log_model(model, example)


def log_evaluation(runs: GroupRuns, step: int, per_seed: Mapping[int, Mapping[str, float]],
                   aggregates: Mapping[str, float | None], per_class: Mapping) -> None:
    """Final metrics at the last epoch's step, so they end the curves they share a name with.

    Through the client: the runs stay as their train stage left them, whatever happens here.
    """
    client = MlflowClient()
    for seed, values in per_seed.items():
        client.log_batch(runs.seeds[seed], metrics=_metrics(values, step))
    client.log_batch(runs.parent, metrics=_metrics(aggregates, step))
    client.log_dict(runs.parent, dict(per_class), "per_class.json")


def log_figures(run_id: str, figures: dict[str, Figure], folder: str = "") -> None:
    """Figures into a run that may have ended (their PNGs overwrite earlier ones of the same name)."""
    client = MlflowClient()
    for name, fig in figures.items():
        client.log_figure(run_id, fig, f"{folder}/{name}" if folder else name)


def log_files(run_id: str, paths: list[Path], folder: str | None = None) -> None:
    """Files already written (figures drawn once, not again for MLflow) into a run that may have ended."""
    client = MlflowClient()
    for path in paths:
        client.log_artifact(run_id, str(path), folder)


def log_comparison(experiment_id: str, run_name_: str, values: Mapping[str, float], run_ids: dict[str, str],
                   files: list[Path], tags: Mapping[str, str]) -> str:
    """A `comparison` run: every model's numbers as `<model>.<metric>`, their differences, and the report files."""
    client = MlflowClient()
    created = client.create_run(experiment_id, run_name=run_name_,
                                tags={"kind": "comparison", **tags, **{f"run.{n}": rid for n, rid in run_ids.items()}})
    run_id = created.info.run_id
    client.log_batch(run_id, metrics=_metrics(values, 0))
    log_files(run_id, [p for p in files if p.is_file()])
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

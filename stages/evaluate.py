"""Stage `evaluate@<model>`: accuracy of every saved seed on both splits, and their spread.

Reads the checkpoint (which carries its own config and normalisation), so it
measures exactly what was saved, and adds to the train stage's runs; a
checkpoint whose architecture is not params.yaml's entry for the model is
refused before anything is logged.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

from cifar3study.cli import run_stage
from cifar3study.data.dataset import Split, read_split
from cifar3study.errors import StageError
from cifar3study.params import load_params, model_params
from cifar3study.reporting import evaluation
from cifar3study.tracking import run_logging, store
from cifar3study.training.checkpoint import CheckpointMeta, load_checkpoint
from cifar3study.training.device import resolve_device, set_numerics
from cifar3study.training.models import count_params, normalize, predict
from cifar3study.training.run_info import read_run_info

log = logging.getLogger("evaluate")


def predictions(model: nn.Module, split: Split, meta: CheckpointMeta, device: torch.device, batch_size: int) \
        -> np.ndarray:
    return predict(model.to(device), normalize(split.images, meta.stats, device), batch_size).argmax(1).cpu().numpy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for flag in ("--params", "--checkpoint", "--run-info", "--train", "--val", "--metrics", "--per-class", "--confusion"):
        parser.add_argument(flag, type=Path, required=True)
    parser.add_argument("--model", required=True)
    args = parser.parse_args()
    params = load_params(args.params)
    expected = model_params(params, args.model)
    experiment_id = store.connect(os.environ, Path.cwd(), params.mlflow.experiment)
    info = read_run_info(args.run_info)
    runs = store.GroupRuns(info.run_id, info.seed_runs)
    store.check_group(runs, experiment_id, args.model)  # before any work: only this model's runs are written
    device = resolve_device(params.train.device)
    set_numerics(params.train.deterministic, params.train.tf32)  # the train stage's numerics: no TF32 convs on CUDA
    models, meta = load_checkpoint(args.checkpoint, expected, args.model)
    train, val = read_split(args.train), read_split(args.val)
    if meta.classes != val.classes or meta.seeds != tuple(info.seed_runs):
        raise StageError(f"{args.checkpoint} (classes {list(meta.classes)}, seeds {list(meta.seeds)}) does not match "
                         f"the splits ({list(val.classes)}) or {args.run_info}; rerun its train stage")
    batch, per_seed, val_pred = params.evaluate.batch_size, {}, {}
    for seed, model in models.items():
        val_pred[seed] = predictions(model, val, meta, device, batch)
        per_seed[seed] = evaluation.seed_metrics((train.labels, predictions(model, train, meta, device, batch)),
                                                 (val.labels, val_pred[seed]))
    speed = {"seconds_per_epoch": info.seconds_per_epoch, "group_seconds_per_epoch": info.group_seconds_per_epoch,
             "images_per_second": info.images_per_second}
    metrics = evaluation.model_metrics(per_seed, count_params(models[meta.seeds[0]]), speed)
    report = evaluation.per_class(np.tile(val.labels, len(models)), np.concatenate(list(val_pred.values())), meta.classes)
    aggregates = {k: v for k, v in evaluation.flat(metrics).items() if "_seed" not in k and k != "params"}
    run_logging.log_evaluation(runs, info.epochs, per_seed, aggregates,
                               {c: dataclasses.asdict(r) for c, r in report.items()})
    evaluation.write_per_class(args.per_class, report, meta.seeds)
    evaluation.write_confusion_csv(args.confusion, {s: val.labels for s in models}, val_pred, meta.classes)
    evaluation.write_metrics(args.metrics, metrics)
    log.info("%s: train %.4f  val %.4f ± %s over %d seeds (%d parameters)", args.model, metrics.train_acc.mean,
             metrics.val_acc.mean, f"{metrics.val_acc.std:.4f}" if metrics.val_acc.std is not None else "n/a",
             metrics.val_acc.n, metrics.params)


if __name__ == "__main__":
    run_stage(main)

"""Stage `evaluate@<model>`: accuracy of the saved model on both splits.

Reads only the checkpoint (which carries its own config and normalisation),
so it measures exactly what was saved, and adds to the train run in MLflow.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
from pathlib import Path

from cifar3study import evaluation, run_logging, tracking
from cifar3study.checkpoint import load_checkpoint
from cifar3study.cli import run_stage
from cifar3study.dataset import read_split
from cifar3study.device import resolve_device
from cifar3study.errors import StageError
from cifar3study.models import count_params, normalize, predict
from cifar3study.params import load_params
from cifar3study.run_info import read_run_info

log = logging.getLogger("evaluate")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for flag in ("--params", "--checkpoint", "--run-info", "--train", "--val", "--metrics", "--per-class", "--confusion"):
        parser.add_argument(flag, type=Path, required=True)
    parser.add_argument("--model", required=True)
    args = parser.parse_args()
    params = load_params(args.params)
    experiment_id = tracking.connect(os.environ, Path.cwd(), params.mlflow.experiment)
    info = read_run_info(args.run_info)
    tracking.model_run(info.run_id, experiment_id, args.model)  # before any work: only this model's run is written
    device = resolve_device(params.train.device)
    model, meta = load_checkpoint(args.checkpoint)
    model.to(device)
    train, val = read_split(args.train), read_split(args.val)
    if meta.classes != val.classes:
        raise StageError(f"{args.checkpoint} was trained on {list(meta.classes)}, the splits hold {list(val.classes)}; "
                         "rerun its train stage")
    train_pred, val_pred = (predict(model, normalize(s.images, meta.stats, device), params.evaluate.batch_size)
                            .argmax(1).cpu().numpy() for s in (train, val))
    metrics = evaluation.model_metrics((train.labels, train_pred), (val.labels, val_pred), count_params(model),
                                       info.seconds_per_epoch, info.images_per_second)
    report = evaluation.per_class(val.labels, val_pred, meta.classes)
    logged = {k: v for k, v in dataclasses.asdict(metrics).items() if k != "params"}
    run_logging.log_evaluation(info.run_id, info.epochs, logged, {c: dataclasses.asdict(r) for c, r in report.items()})
    evaluation.write_per_class(args.per_class, report)
    evaluation.write_confusion_csv(args.confusion, val.labels, val_pred, meta.classes)
    evaluation.write_metrics(args.metrics, metrics)
    log.info("%s: train %.4f  val %.4f  (%d parameters)", args.model, metrics.train_acc, metrics.val_acc, metrics.params)


if __name__ == "__main__":
    run_stage(main)

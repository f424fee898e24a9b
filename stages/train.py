"""Stage `train@<model>`: SGD on the normalised CIFAR-3 training split, logged to MLflow."""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

import mlflow
import torch

from cifar3study import run_logging, tracking
from cifar3study.checkpoint import CheckpointMeta, load_checkpoint, save_checkpoint
from cifar3study.cli import run_stage
from cifar3study.dataset import read_split, read_stats
from cifar3study.device import describe, device_name, resolve_device, seed_everything, set_numerics
from cifar3study.history import EpochRecord, write_history
from cifar3study.models import build_model, count_params, layer_table, normalize
from cifar3study.params import load_params, model_params
from cifar3study.run_info import RunInfo, write_run_info
from cifar3study.training import fit, median_epoch_seconds

log = logging.getLogger("train")


def report_epoch(row: EpochRecord) -> None:
    run_logging.log_epoch(row)
    log.info("epoch %3d  loss %.4f  train %.4f  val %.4f  %.2f s", row.epoch, row.train_loss,
             row.train_acc_running, row.val_acc, row.seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    for flag in ("--params", "--train", "--val", "--stats", "--checkpoint", "--history", "--run-info"):
        parser.add_argument(flag, type=Path, required=True)
    parser.add_argument("--model", required=True, help="a key of the models section")
    args = parser.parse_args()
    params = load_params(args.params)
    cfg = model_params(params, args.model)
    experiment_id = tracking.connect(os.environ, Path.cwd(), params.mlflow.experiment)
    for run_id in tracking.close_orphaned_runs(experiment_id):
        log.warning("closed run %s as KILLED: the process that ran it had died", run_id)
    device = resolve_device(params.train.device)
    seed_everything(params.train.seed)
    set_numerics(params.train.deterministic, params.train.tf32)
    train_split, val_split, stats = read_split(args.train), read_split(args.val), read_stats(args.stats)
    train = normalize(train_split.images, stats, device), torch.from_numpy(train_split.labels).to(device)
    val = normalize(val_split.images, stats, device), torch.from_numpy(val_split.labels).to(device)
    model = build_model(cfg, len(train_split.classes)).to(device)
    tags = {"model": args.model, "kind": "model", **tracking.process_tags(),
            **tracking.provenance_tags(os.environ, Path.cwd(), train_split.source_md5, describe(device))}
    name = run_logging.run_name(args.model, os.environ, run_logging.params_digest(args.model, params))
    with tracking.run(experiment_id, run_name=name, tags=tags) as active:
        run_logging.log_training_setup(args.model, params, count_params(model), layer_table(model))
        mlflow.log_artifact(str(args.params))
        history = fit(model, train, val, params.train, params.evaluate.batch_size, report_epoch)
        save_checkpoint(args.checkpoint, model, CheckpointMeta(cfg, train_split.classes, stats))
        seconds = median_epoch_seconds(history)
        info = RunInfo(active.info.run_id, device_name(device), len(history), seconds, len(train[1]) / seconds)
        mlflow.log_metrics({"seconds_per_epoch": info.seconds_per_epoch, "images_per_second": info.images_per_second})
        saved, _ = load_checkpoint(args.checkpoint)  # log exactly what was saved, on the CPU
        run_logging.log_model(saved, val[0][:2].cpu().numpy())
        write_history(args.history, history)
        write_run_info(args.run_info, info)
    log.info("%s: %.2f s per epoch, %.0f images/s on %s", args.model, info.seconds_per_epoch,
             info.images_per_second, info.device)


if __name__ == "__main__":
    run_stage(main)

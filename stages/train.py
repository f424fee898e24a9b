"""Stage `train@<model>`: the model's seed group trained together by SGD on the CIFAR-3 split, logged to MLflow.

After each epoch the models are evaluated on the validation split, or, with
data.holdout > 0, on the part held out of the training split (they train on
the rest, and --val, the CIFAR-10 test batch, is never opened).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import statistics
from pathlib import Path

import mlflow
import numpy as np
import torch

from cifar3study.cli import run_stage
from cifar3study.data.dataset import Split, read_stats, training_splits
from cifar3study.errors import Pruned, StageError
from cifar3study.params import Params, load_params, model_params
from cifar3study.tracking import ledger, record, run_logging, store
from cifar3study.training import speedups
from cifar3study.training.budget import check_budget
from cifar3study.training.checkpoint import CheckpointMeta, load_checkpoint, save_checkpoint
from cifar3study.training.device import describe, device_name, resolve_device, seed_everything, set_numerics
from cifar3study.training.history import EpochRecord, write_history
from cifar3study.training.models import count_params, layer_table, normalize
from cifar3study.training.run_info import RunInfo, write_run_info
from cifar3study.training.trainer import fit, init_models, median_epoch_seconds, setup_group

log = logging.getLogger("train")


def report_epoch(runs: store.GroupRuns, rows: list[EpochRecord], trial: ledger.EpochReporter | None) -> None:
    """Log the epoch; in a study's trial, also report its mean score and stop when the study's pruner says so."""
    run_logging.log_epoch(runs, rows)
    acc = [r.val_acc for r in rows]
    log.info("epoch %3d  loss %.4f  train %.4f  %s %.4f (%.4f-%.4f over %d seeds)  %.2f s", rows[0].epoch,
             statistics.fmean(r.train_loss for r in rows), statistics.fmean(r.train_acc_running for r in rows),
             rows[0].split, statistics.fmean(acc), min(acc), max(acc), len(rows), rows[0].seconds)
    if trial is not None and trial.report(rows[0].epoch, statistics.fmean(acc)):
        raise Pruned(rows[0].epoch)


def on_split(rows: list[EpochRecord], split: str) -> list[EpochRecord]:
    """The trainer's records, saying which split they were evaluated on."""
    return [dataclasses.replace(row, split=split) for row in rows]


def check_holdout_batches(parts: tuple[Split, Split], params: Params) -> None:
    """Each class keeps a training batch in both parts; params.py checked this against CIFAR-10's counts."""
    batch = params.train.batch_size
    for name, part in zip(("held-out part", "rest"), parts, strict=True):
        counts = np.bincount(part.labels, minlength=len(part.classes))
        if counts.min() < batch:
            raise StageError(f"data.holdout {params.data.holdout:g} leaves {counts.min()} images of class "
                             f"{part.classes[counts.argmin()]!r} in the {name}, fewer than one batch (train.batch_size "
                             f"{batch}); change data.holdout or lower train.batch_size")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    for flag in ("--params", "--train", "--val", "--stats", "--checkpoint", "--history", "--run-info"):
        parser.add_argument(flag, type=Path, required=True)
    parser.add_argument("--model", required=True, help="a key of the models section")
    args = parser.parse_args()
    params = load_params(args.params)
    cfg, seeds = model_params(params, args.model), params.train.seeds
    device = resolve_device(params.train.device)
    check_budget(params, args.model, device)  # before any allocation or run: `dvc repro -s` skips check_params
    trial = ledger.epoch_reporter(os.environ)  # a study's trial reports its epochs; None under plain `dvc repro`
    experiment_id = store.connect(os.environ, Path.cwd(), params.mlflow.experiment)
    for run_id in store.close_orphaned_runs(experiment_id):
        log.warning("closed run %s as KILLED: the process that ran it had died", run_id)
    seed_everything(seeds[0])
    set_numerics(params.train.deterministic, params.train.tf32)
    train_split, split, eval_split = training_splits(args.train, args.val, params.data.holdout, params.data.holdout_seed)
    if split == "holdout":
        check_holdout_batches((eval_split, train_split), params)
    stats = read_stats(args.stats)
    train = normalize(train_split.images, stats, device), torch.from_numpy(train_split.labels).to(device)
    val = normalize(eval_split.images, stats, device), torch.from_numpy(eval_split.labels).to(device)
    models = init_models(cfg, len(train_split.classes), seeds, device)
    group = setup_group(models, seeds, params.train, speedups.batch_seeds(device))
    tags = {"model": args.model, **store.process_tags(),
            **store.provenance_tags(os.environ, Path.cwd(), train_split.source_md5, describe(device))}
    name = run_logging.run_name(args.model, os.environ, run_logging.params_digest(args.model, params))
    with store.group_runs(experiment_id, name, seeds, tags) as runs:
        run_logging.log_training_setup(runs, args.model, params, count_params(models[0]), layer_table(models[0]))
        mlflow.log_artifact(str(args.params))
        history = fit(group, train, val, params.train, params.evaluate.batch_size,
                      lambda rows: report_epoch(runs, on_split(rows, split), trial))
        holdout = (params.data.holdout, params.data.holdout_seed) if split == "holdout" else None
        save_checkpoint(args.checkpoint, models, CheckpointMeta(cfg, train_split.classes, stats, seeds, holdout))
        group_seconds = median_epoch_seconds(history[0])
        info = RunInfo(runs.parent, runs.seeds, device_name(device), len(history[0]), group_seconds,
                       group_seconds / len(seeds), len(train[1]) * len(seeds) / group_seconds)
        mlflow.log_metrics({"seconds_per_epoch": info.seconds_per_epoch, "images_per_second": info.images_per_second,
                            "group_seconds_per_epoch": info.group_seconds_per_epoch})
        saved, _ = load_checkpoint(args.checkpoint, cfg)  # log exactly what was saved, on the CPU
        run_logging.log_models(runs, saved, val[0][:2].cpu().numpy())
        record.log_record(runs, saved, Path.cwd(), os.environ)  # what a later `reproduce` rebuilds and compares
        write_history(args.history, on_split([row for seed_history in history for row in seed_history], split))
        write_run_info(args.run_info, info)
    log.info("%s: %d seeds, %.2f s per epoch of the group (%.2f per seed) on %s", args.model, len(seeds),
             info.group_seconds_per_epoch, info.seconds_per_epoch, info.device)


if __name__ == "__main__":
    run_stage(main)

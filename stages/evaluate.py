"""Stage `evaluate@<model>`: accuracy of every saved seed on both splits, and their spread.

Reads the checkpoint (which carries its own config and normalisation), so it
measures exactly what was saved, and adds to the train stage's runs; a
checkpoint whose architecture is not params.yaml's entry for the model is
refused before anything is logged. The cheap checks (params, run-info, then
the checkpoint's config) come before the heavy imports (MLflow, scikit-learn),
so a refusal costs what it reads, not the stage's whole footprint.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
from pathlib import Path

from cifar3study.cli import run_stage
from cifar3study.data.dataset import Split, read_split
from cifar3study.errors import StageError
from cifar3study.params import Params, load_params, model_params
from cifar3study.training.run_info import RunInfo, read_run_info

log = logging.getLogger("evaluate")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for flag in ("--params", "--checkpoint", "--run-info", "--train", "--val", "--metrics", "--per-class", "--confusion"):
        parser.add_argument(flag, type=Path, required=True)
    parser.add_argument("--model", required=True)
    return parser.parse_args()


@dataclasses.dataclass(frozen=True)
class Inputs:
    params: Params
    info: RunInfo
    splits: dict[str, Split]  # "train" and the split evaluated
    checkpoint: object  # training.checkpoint.Checkpoint (torch)


def read_inputs(args: argparse.Namespace) -> Inputs:
    """Params, run info, splits, then the checkpoint, each checked before the next is read; torch only for the last."""
    params = load_params(args.params)
    expected = model_params(params, args.model)
    info = read_run_info(args.run_info)
    splits = {"train": read_split(args.train), "val": read_split(args.val)}
    from cifar3study.training.checkpoint import read_checkpoint  # torch (0.6 GiB): needed from here on

    checkpoint = read_checkpoint(args.checkpoint, expected, args.model)
    meta = checkpoint.meta
    if meta.seeds != tuple(info.seed_runs):
        raise StageError(f"{args.checkpoint} holds seeds {list(meta.seeds)}, but {args.run_info} records "
                         f"{list(info.seed_runs)}; rerun its train stage (dvc repro -f train@{args.model})")
    if meta.classes != splits["val"].classes:
        raise StageError(f"{args.checkpoint} (classes {list(meta.classes)}) does not match the splits "
                         f"({list(splits['val'].classes)}); rerun its train stage (dvc repro -f train@{args.model})")
    return Inputs(params, info, splits, checkpoint)


def checked_runs(params: Params, info: RunInfo, model: str) -> object:
    """The model's MLflow runs, refused unless they are this experiment's runs of `model`: nothing else is written."""
    from cifar3study.tracking import store  # MLflow: only once the files are known to be usable

    experiment_id = store.connect(os.environ, Path.cwd(), params.mlflow.experiment)
    runs = store.GroupRuns(info.run_id, info.seed_runs)
    store.check_group(runs, experiment_id, model)
    return runs


def predictions(models: dict, meta: object, splits: dict[str, Split], params: Params) -> dict[str, dict]:
    """{split name: {seed: predicted labels}} of every seed's model, on the train stage's device and numerics."""
    from cifar3study.training.device import resolve_device, set_numerics
    from cifar3study.training.models import normalize, predict

    device = resolve_device(params.train.device)
    set_numerics(params.train.deterministic, params.train.tf32)  # the train stage's numerics: no TF32 convs on CUDA
    out: dict[str, dict] = {name: {} for name in splits}
    for seed, model in models.items():
        for name, split in splits.items():
            x = normalize(split.images, meta.stats, device)
            out[name][seed] = predict(model.to(device), x, params.evaluate.batch_size).argmax(1).cpu().numpy()
    return out


def main() -> None:
    args = parse_args()
    inputs = read_inputs(args)
    params, info, splits, meta = inputs.params, inputs.info, inputs.splits, inputs.checkpoint.meta
    runs = checked_runs(params, info, args.model)
    import numpy as np  # scikit-learn and MLflow's model code: only for a run that goes ahead

    from cifar3study.reporting import evaluation
    from cifar3study.tracking import run_logging
    from cifar3study.training.checkpoint import build_models
    from cifar3study.training.models import count_params

    models = build_models(inputs.checkpoint, args.model)
    pred = predictions(models, meta, splits, params)
    train, val = splits["train"].labels, splits["val"].labels
    per_seed = {seed: evaluation.seed_metrics((train, pred["train"][seed]), (val, pred["val"][seed])) for seed in meta.seeds}
    speed = {"seconds_per_epoch": info.seconds_per_epoch, "group_seconds_per_epoch": info.group_seconds_per_epoch,
             "images_per_second": info.images_per_second}
    metrics = evaluation.model_metrics(per_seed, count_params(models[meta.seeds[0]]), speed)
    report = evaluation.per_class(np.tile(val, len(meta.seeds)), np.concatenate(list(pred["val"].values())), meta.classes)
    aggregates = {k: v for k, v in evaluation.flat(metrics).items() if "_seed" not in k and k != "params"}
    run_logging.log_evaluation(runs, info.epochs, per_seed, aggregates,
                               {c: dataclasses.asdict(r) for c, r in report.items()})
    evaluation.write_per_class(args.per_class, report, meta.seeds)
    evaluation.write_confusion_csv(args.confusion, {s: val for s in meta.seeds}, pred["val"], meta.classes)
    evaluation.write_metrics(args.metrics, metrics)
    log.info("%s: train %.4f  val %.4f ± %s over %d seeds (%d parameters)", args.model, metrics.train_acc.mean,
             metrics.val_acc.mean, f"{metrics.val_acc.std:.4f}" if metrics.val_acc.std is not None else "n/a",
             metrics.val_acc.n, metrics.params)


if __name__ == "__main__":
    run_stage(main)

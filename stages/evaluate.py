"""Stage `evaluate@<model>`: accuracy of every saved seed on both splits, and their spread.

The second split is the validation split, or, with data.holdout > 0, the
part held out of the training split (the first is then the rest), and --val
(the CIFAR-10 test batch) is never opened.

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
from cifar3study.data.dataset import Split, training_splits
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
    split: str  # the split evaluated besides "train": "val" or "holdout"
    splits: dict[str, Split]  # by name
    checkpoint: object  # training.checkpoint.Checkpoint (torch)


def read_inputs(args: argparse.Namespace) -> Inputs:
    """Params, run info, splits, then the checkpoint, each checked before the next is read; torch only for the last."""
    params = load_params(args.params)
    expected = model_params(params, args.model)
    info = read_run_info(args.run_info)
    train, split, evaluated = training_splits(args.train, args.val, params.data.holdout, params.data.holdout_seed)
    splits = {"train": train, split: evaluated}
    from cifar3study.training.checkpoint import read_checkpoint  # torch (0.6 GiB): needed from here on

    checkpoint = read_checkpoint(args.checkpoint, expected, args.model)
    meta = checkpoint.meta
    if meta.seeds != tuple(info.seed_runs):
        raise StageError(f"{args.checkpoint} holds seeds {list(meta.seeds)}, but {args.run_info} records "
                         f"{list(info.seed_runs)}; rerun its train stage (dvc repro -f train@{args.model})")
    holdout = (params.data.holdout, params.data.holdout_seed) if split == "holdout" else None
    if meta.classes != evaluated.classes or meta.holdout != holdout:
        raise StageError(f"{args.checkpoint} (classes {list(meta.classes)}, holdout {meta.holdout}) was not trained "
                         f"as params.yaml says (classes {list(evaluated.classes)}, holdout {holdout}); rerun its "
                         f"train stage (dvc repro -f train@{args.model})")
    return Inputs(params, info, split, splits, checkpoint)


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


def score(inputs: Inputs, model: str) -> tuple[dict[str, dict], object]:
    """({split: {seed: predictions}}, the model's metrics on the train and evaluated splits)."""
    from cifar3study.reporting import evaluation  # scikit-learn: only for a run that goes ahead
    from cifar3study.training.checkpoint import build_models
    from cifar3study.training.models import count_params

    meta, info, split = inputs.checkpoint.meta, inputs.info, inputs.split
    models = build_models(inputs.checkpoint, model)
    pred = predictions(models, meta, inputs.splits, inputs.params)
    train = inputs.splits["train"].labels
    labels = inputs.splits[split].labels
    per_seed = {seed: evaluation.seed_metrics((train, pred["train"][seed]), (labels, pred[split][seed]), split)
                for seed in meta.seeds}
    speed = {"seconds_per_epoch": info.seconds_per_epoch, "group_seconds_per_epoch": info.group_seconds_per_epoch,
             "images_per_second": info.images_per_second}
    return pred, evaluation.model_metrics(per_seed, count_params(models[meta.seeds[0]]), speed, split)


def publish(args: argparse.Namespace, inputs: Inputs, runs: object, pred: dict[str, dict], metrics: object) -> None:
    """Final metrics into the runs, then the per-class report, the confusion rows and the metrics file."""
    import numpy as np

    from cifar3study.reporting import evaluation
    from cifar3study.tracking import run_logging  # MLflow's model code

    meta, split, labels = inputs.checkpoint.meta, metrics.split, inputs.splits[metrics.split].labels
    report = evaluation.per_class(np.tile(labels, len(meta.seeds)), np.concatenate(list(pred[split].values())),
                                  meta.classes)
    per_seed = {seed: {k: getattr(metrics, k).per_seed[seed] for k in evaluation.spread_keys(split)}
                for seed in meta.seeds}
    aggregates = {k: v for k, v in evaluation.flat(metrics).items() if "_seed" not in k and k != "params"}
    run_logging.log_evaluation(runs, inputs.info.epochs, per_seed, aggregates,
                               {c: dataclasses.asdict(r) for c, r in report.items()})
    evaluation.write_per_class(args.per_class, report, meta.seeds)
    evaluation.write_confusion_csv(args.confusion, {s: labels for s in meta.seeds}, pred[split], meta.classes)
    evaluation.write_metrics(args.metrics, metrics)


def main() -> None:
    args = parse_args()
    inputs = read_inputs(args)
    runs = checked_runs(inputs.params, inputs.info, args.model)
    pred, metrics = score(inputs, args.model)
    publish(args, inputs, runs, pred, metrics)
    acc = metrics.eval_acc
    log.info("%s: train %.4f  %s %.4f ± %s over %d seeds (%d parameters)", args.model, metrics.train_acc.mean,
             metrics.split, acc.mean, f"{acc.std:.4f}" if acc.std is not None else "n/a", acc.n, metrics.params)


if __name__ == "__main__":
    run_stage(main)

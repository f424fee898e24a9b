"""Stage `evaluate@<model>`: accuracy of the saved model on both splits.

Reads only the checkpoint (which carries its own config and normalisation),
so it measures exactly what was saved, and appends to the train run in MLflow.
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

import mlflow
import numpy as np
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_recall_fscore_support

from stages import plots, tracking
from stages.common import StageError, run_stage, write_json_atomic, write_text_atomic
from stages.datasets import Split, load_split, normalize
from stages.models import count_params, load_checkpoint, predict
from stages.params import load_params, model_params
from stages.runtime import resolve_device

log = logging.getLogger(__name__)


def per_class(y_true: np.ndarray, y_pred: np.ndarray, classes: list[str]) -> dict[str, dict[str, float]]:
    labels = list(range(len(classes)))
    precision, recall, f1, support = precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    return {name: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]),
                   "support": int(support[i])} for i, name in enumerate(classes)}


def summarize(train: tuple[np.ndarray, np.ndarray], val: tuple[np.ndarray, np.ndarray], n_params: int,
              speed: dict[str, float]) -> dict[str, float]:
    """The headline metrics; `train`/`val` are (labels, predictions)."""
    train_acc, val_acc = accuracy_score(*train), accuracy_score(*val)
    return {"params": n_params, "train_acc": float(train_acc), "val_acc": float(val_acc),
            "gap": float(train_acc - val_acc), "val_macro_f1": float(f1_score(*val, average="macro")),
            "seconds_per_epoch": speed["seconds_per_epoch"], "images_per_second": speed["images_per_second"]}


def confusion_csv(y_true: np.ndarray, y_pred: np.ndarray, classes: list[str]) -> str:
    """One row per validation image, the shape DVC's confusion template reads."""
    lines = ["actual,predicted"] + [f"{classes[a]},{classes[p]}" for a, p in zip(y_true, y_pred)]
    return "\n".join(lines) + "\n"


def predictions(model: object, split: Split, meta: dict, device: object, batch_size: int) -> np.ndarray:
    x = normalize(split.images, meta["mean"], meta["std"], device)
    return predict(model, x, batch_size).argmax(1).cpu().numpy()


def log_to_run(run_info: dict, metrics: dict, classes_report: dict, matrix: np.ndarray, classes: list[str],
               name: str, extra_files: list[Path]) -> None:
    """Final metrics at the last epoch's step, so they end the learning curves they share a name with."""
    step = run_info.get("epochs", 0)
    with tracking.run(run_id=run_info["run_id"]):
        mlflow.log_metrics({k: v for k, v in metrics.items() if k != "params"}, step=step)
        mlflow.log_metrics({f"val_f1_{c}": r["f1"] for c, r in classes_report.items()}, step=step)
        mlflow.log_dict(classes_report, "per_class.json")
        mlflow.log_figure(plots.confusion(matrix, classes, f"{name}: validation"), "confusion_matrix.png")
        plots.close_all()
        for path in extra_files:
            if path.is_file():
                mlflow.log_artifact(str(path))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for flag in ("--params", "--checkpoint", "--run-info", "--train", "--val", "--metrics", "--per-class", "--confusion"):
        parser.add_argument(flag, type=Path, required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--lock", type=Path, help="dvc.lock, logged to the run when present")
    args = parser.parse_args()
    params = load_params(args.params)
    model_params(params, args.model)
    tracking.connect(os.environ, Path.cwd(), params.mlflow.experiment)
    run_info = tracking.read_run_info(args.run_info, ("run_id", "seconds_per_epoch", "images_per_second"))
    device = resolve_device(params.train.device)
    model, meta = load_checkpoint(args.checkpoint)
    model.to(device)
    classes, batch = meta["classes"], params.evaluate.batch_size
    train, val = load_split(args.train), load_split(args.val)
    if tuple(classes) != val.classes:
        raise StageError(f"{args.checkpoint} was trained on {classes}, the splits hold {list(val.classes)}; "
                         "rerun its train stage")
    train_pred, val_pred = (predictions(model, s, meta, device, batch) for s in (train, val))
    metrics = summarize((train.labels, train_pred), (val.labels, val_pred), count_params(model), run_info)
    report = per_class(val.labels, val_pred, classes)
    matrix = confusion_matrix(val.labels, val_pred, labels=list(range(len(classes))))
    log_to_run(run_info, metrics, report, matrix, classes, args.model,
               [args.params] + ([args.lock] if args.lock else []))
    write_json_atomic(args.per_class, report)
    write_text_atomic(args.confusion, confusion_csv(val.labels, val_pred, classes))
    write_json_atomic(args.metrics, metrics)
    log.info("%s: train %.4f  val %.4f  (%d parameters)", args.model, metrics["train_acc"], metrics["val_acc"],
             metrics["params"])


if __name__ == "__main__":
    run_stage(main)

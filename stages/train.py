"""Stage `train@<model>`: SGD on the normalised CIFAR-3 training split.

The whole split sits on the training device as one tensor for the run; each
epoch indexes it with a seeded permutation, and losses are summed on the
device and read once per epoch, so no step waits on the host.
"""

from __future__ import annotations

import argparse
import csv
import io
import logging
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import mlflow
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from stages import plots, tracking
from stages.common import run_stage, write_json_atomic, write_text_atomic
from stages.datasets import load_split, load_stats, normalize
from stages.models import build_model, count_params, layer_table, load_checkpoint, predict, save_checkpoint
from stages.params import Params, TrainParams, load_params, model_params
from stages.runtime import device_name, keep_freed_memory, resolve_device, set_seed, synchronize

log = logging.getLogger(__name__)


def train_epoch(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
                batch_size: int, generator: torch.Generator, channels_last: bool) -> tuple[float, float]:
    """One pass in a fresh seeded order; returns (mean loss, running accuracy)."""
    model.train()
    order = torch.randperm(len(y), generator=generator).to(x.device)
    loss_sum = torch.zeros((), device=x.device)
    correct = torch.zeros((), dtype=torch.long, device=x.device)
    for start in range(0, len(y), batch_size):
        idx = order[start:start + batch_size]
        xb, yb = x[idx], y[idx]
        if channels_last:
            xb = xb.contiguous(memory_format=torch.channels_last)
        logits = model(xb)
        loss = F.cross_entropy(logits, yb)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss_sum += loss.detach() * len(idx)
        correct += (logits.detach().argmax(1) == yb).sum()
    return loss_sum.item() / len(y), correct.item() / len(y)


def setup_training(model: nn.Module, cfg: TrainParams) -> tuple[torch.optim.Optimizer, torch.Generator, bool]:
    """(SGD optimizer, seeded shuffle generator, channels_last) for `model`, as `fit` trains it.

    Conv models move to channels_last when cfg.channels_last is set; glibc is
    told to keep freed gradient buffers mapped (see runtime.keep_freed_memory).
    """
    keep_freed_memory()
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    generator = torch.Generator().manual_seed(cfg.seed)
    channels_last = cfg.channels_last and any(p.dim() == 4 for p in model.parameters())
    if channels_last:
        model.to(memory_format=torch.channels_last)
    return optimizer, generator, channels_last


def fit(model: nn.Module, train: tuple[torch.Tensor, torch.Tensor], val: tuple[torch.Tensor, torch.Tensor],
        cfg: TrainParams, eval_batch: int, on_epoch: Callable[[dict], None] = lambda row: None) -> list[dict]:
    """Train for cfg.epochs; one history row per epoch (losses, accuracies, seconds)."""
    optimizer, generator, channels_last = setup_training(model, cfg)
    history = []
    for epoch in range(1, cfg.epochs + 1):
        synchronize(train[0].device)
        start = time.perf_counter()
        train_loss, train_acc = train_epoch(model, optimizer, *train, cfg.batch_size, generator, channels_last)
        seconds = time.perf_counter() - start
        logits = predict(model, val[0], eval_batch)
        val_loss = F.cross_entropy(logits, val[1]).item()
        val_acc = (logits.argmax(1) == val[1]).float().mean().item()
        row = {"epoch": epoch, "train_loss": train_loss, "train_acc_running": train_acc,
               "val_loss": val_loss, "val_acc": val_acc, "seconds": seconds}
        history.append(row)
        on_epoch(row)
    return history


def history_csv(history: list[dict]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(history[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(history)
    return out.getvalue()


def timing(history: list[dict], n_images: int) -> dict[str, float]:
    """Median epoch time: the first epoch pays one-off warm-up costs."""
    seconds = statistics.median(row["seconds"] for row in history)
    return {"seconds_per_epoch": seconds, "images_per_second": n_images / seconds}


def log_epoch(row: dict) -> None:
    metrics = {k: v for k, v in row.items() if k not in ("epoch", "seconds")}
    mlflow.log_metrics(metrics, step=row["epoch"])
    log.info("epoch %3d  loss %.4f  train %.4f  val %.4f  %.2f s", row["epoch"], row["train_loss"],
             row["train_acc_running"], row["val_acc"], row["seconds"])


def load_tensors(args: argparse.Namespace, device: torch.device) -> dict:
    train_split, val_split = load_split(args.train), load_split(args.val)
    mean, std = load_stats(args.stats)
    return {
        "train": (normalize(train_split.images, mean, std, device), torch.from_numpy(train_split.labels).to(device)),
        "val": (normalize(val_split.images, mean, std, device), torch.from_numpy(val_split.labels).to(device)),
        "classes": train_split.classes, "source_md5": train_split.source_md5, "mean": mean, "std": std,
    }


def log_setup(name: str, params: Params, model: nn.Module) -> None:
    """Every value this stage read, and the model's size, before training starts."""
    n_params = count_params(model)
    mlflow.log_params({**tracking.flatten(f"models.{name}", params.models[name]), **tracking.flatten("train", params.train),
                       **tracking.flatten("evaluate", params.evaluate), **tracking.flatten("mlflow", params.mlflow),
                       "data.classes": tracking.flatten("", params.data.classes)[""], "param_count": n_params})
    mlflow.log_metric("param_count", n_params)
    mlflow.log_text(layer_table(model), "parameters.md")
    log.info("%s: %d parameters", name, n_params)


def log_results(name: str, history: list[dict], speed: dict, checkpoint: Path, example: np.ndarray) -> None:
    mlflow.log_metrics(speed)
    mlflow.log_figure(plots.learning_curves(history, name), "learning_curves.png")
    plots.close_all()
    model, _ = load_checkpoint(checkpoint)  # log exactly what was saved, on the CPU
    tracking.log_model(model, example)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for flag in ("--params", "--train", "--val", "--stats", "--checkpoint", "--history", "--run-info"):
        parser.add_argument(flag, type=Path, required=True)
    parser.add_argument("--model", required=True, help="a key of the models section")
    args = parser.parse_args()
    params = load_params(args.params)
    cfg = model_params(params, args.model)
    experiment_id = tracking.connect(os.environ, Path.cwd(), params.mlflow.experiment)
    device = resolve_device(params.train.device)
    set_seed(params.train.seed, params.train.deterministic, params.train.tf32)
    data = load_tensors(args, device)
    model = build_model(cfg, len(data["classes"])).to(device)
    tags = {"model": args.model, "kind": "model",
            **tracking.provenance_tags(os.environ, Path.cwd(), data["source_md5"], device_name(device))}
    with tracking.run(experiment_id, run_name=args.model, tags=tags) as active:
        log_setup(args.model, params, model)
        history = fit(model, data["train"], data["val"], params.train, params.evaluate.batch_size, log_epoch)
        save_checkpoint(args.checkpoint, model, cfg, data["classes"], data["mean"], data["std"])
        speed = timing(history, len(data["train"][1]))
        log_results(args.model, history, speed, args.checkpoint, data["val"][0][:2].cpu().numpy())
        write_text_atomic(args.history, history_csv(history))
        write_json_atomic(args.run_info, {"run_id": active.info.run_id, "device": device_name(device),
                                           "epochs": len(history), **speed})
    log.info("%s: %.2f s per epoch, %.0f images/s on %s", args.model, speed["seconds_per_epoch"],
             speed["images_per_second"], device_name(device))


if __name__ == "__main__":
    run_stage(main)

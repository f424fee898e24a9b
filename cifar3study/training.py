"""SGD on a normalised split held on the training device.

The whole split sits on the device as one tensor for the run; each epoch
indexes it with a seeded permutation, and losses are summed on the device
and read once per epoch, so no step waits on the host.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from cifar3study import speedups
from cifar3study.device import synchronize
from cifar3study.history import EpochRecord
from cifar3study.models import predict
from cifar3study.params import TrainParams

Tensors = tuple[torch.Tensor, torch.Tensor]  # (normalised images, labels) on the training device


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
    """(SGD optimizer, seeded shuffle generator, channels_last) for `model`, as `fit` trains it."""
    speedups.keep_freed_memory()
    speedups.skip_nan_fill()
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    generator = torch.Generator().manual_seed(cfg.seed)
    channels_last = speedups.use_channels_last(model, cfg.channels_last)
    return optimizer, generator, channels_last


def fit(model: nn.Module, train: Tensors, val: Tensors, cfg: TrainParams, eval_batch: int,
        on_epoch: Callable[[EpochRecord], None] = lambda row: None) -> list[EpochRecord]:
    """Train for cfg.epochs; one record per epoch (losses, accuracies, seconds)."""
    optimizer, generator, channels_last = setup_training(model, cfg)
    history = []
    for epoch in range(1, cfg.epochs + 1):
        synchronize(train[0].device)
        start = time.perf_counter()
        train_loss, train_acc = train_epoch(model, optimizer, *train, cfg.batch_size, generator, channels_last)
        seconds = time.perf_counter() - start
        logits = predict(model, val[0], eval_batch)
        row = EpochRecord(epoch, train_loss, train_acc, F.cross_entropy(logits, val[1]).item(),
                          (logits.argmax(1) == val[1]).float().mean().item(), seconds)
        history.append(row)
        on_epoch(row)
    return history


def median_epoch_seconds(history: list[EpochRecord]) -> float:
    """Median, not mean: the first epoch pays one-off warm-up costs."""
    return statistics.median(row.seconds for row in history)

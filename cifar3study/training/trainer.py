"""SGD on a normalised split held on the training device, for a group of seeds at once.

Each seed has its own initialisation and its own shuffle order, exactly as a
run with that seed alone; one SGD optimizer steps every seed's parameters
(SGD, momentum and weight decay are elementwise, so seeds stay independent).
A step is either batched, one vmap over the seeds' stacked parameters (for
accelerators), or seed by seed through the plain modules (for the CPU); see
`speedups.batch_seeds`. The whole split sits on the device as one tensor;
losses are summed on the device and read once per epoch.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, stack_module_state, vmap

from cifar3study.params import ModelParams, TrainParams
from cifar3study.training import speedups
from cifar3study.training.device import synchronize
from cifar3study.training.history import EpochRecord
from cifar3study.training.models import build_model, predict

Tensors = tuple[torch.Tensor, torch.Tensor]  # (normalised images, labels) on the training device


def init_models(cfg: ModelParams, num_classes: int, seeds: tuple[int, ...], device: torch.device) -> list[nn.Module]:
    """One model per seed, initialised as a run with that seed alone initialises it."""
    models = []
    for seed in seeds:
        torch.manual_seed(seed)
        models.append(build_model(cfg, num_classes).to(device))
    return models


class Stacked:
    """The seeds' parameters stacked along a new first dimension, run through one module with vmap."""

    def __init__(self, models: list[nn.Module]) -> None:
        params, self.buffers = stack_module_state(models)
        self.params = {name: speedups.stacked_leaf(value) for name, value in params.items()}
        self.base = speedups.plain_copy(models[0]).to("meta")

    def _loss(self, params: dict, buffers: dict, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = functional_call(self.base, (params, buffers), (x,))
        return F.cross_entropy(logits, y), (logits.argmax(1) == y).sum()

    def step(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-seed (losses, correct) of one step on [S, B, ...] inputs; gradients left in the stacked leaves."""
        losses, correct = vmap(self._loss)(self.params, self.buffers, x, y)
        losses.sum().backward()
        return losses.detach(), correct

    @torch.no_grad()
    def logits(self, x: torch.Tensor, batch_size: int) -> torch.Tensor:
        """[S, N, classes] logits of every seed on the same images."""
        run = vmap(lambda p, b, xb: functional_call(self.base, (p, b), (xb,)), in_dims=(0, 0, None))
        return torch.cat([run(self.params, self.buffers, x[i:i + batch_size]) for i in range(0, len(x), batch_size)], 1)

    def write_back(self, models: list[nn.Module]) -> None:
        with torch.no_grad():
            for s, model in enumerate(models):
                for name, value in model.named_parameters():
                    value.copy_(self.params[name][s])


class SeedBySeed:
    """The same group through the plain modules, one seed after another within each step."""

    def __init__(self, models: list[nn.Module], channels_last: bool) -> None:
        self.models = models
        self.channels_last = [speedups.use_channels_last(m, channels_last) for m in models]
        self.params = {f"{s}.{name}": p for s, m in enumerate(models) for name, p in m.named_parameters()}

    def step(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        losses, correct = [], []
        for s, model in enumerate(self.models):
            xb = x[s].contiguous(memory_format=torch.channels_last) if self.channels_last[s] else x[s]
            logits = model(xb)
            loss = F.cross_entropy(logits, y[s])
            loss.backward()
            losses.append(loss.detach())
            correct.append((logits.detach().argmax(1) == y[s]).sum())
        return torch.stack(losses), torch.stack(correct)

    def logits(self, x: torch.Tensor, batch_size: int) -> torch.Tensor:
        return torch.stack([predict(m, x, batch_size) for m in self.models])

    def write_back(self, models: list[nn.Module]) -> None:
        pass  # the modules are the parameters


@dataclasses.dataclass
class Group:
    """A seed group being trained: the modules, how a step runs, the optimizer and the shuffles."""

    seeds: tuple[int, ...]
    models: list[nn.Module]
    runner: Stacked | SeedBySeed
    optimizer: torch.optim.Optimizer
    shuffles: list[torch.Generator]


def setup_group(models: list[nn.Module], seeds: tuple[int, ...], cfg: TrainParams, batched: bool) -> Group:
    speedups.keep_freed_memory()
    speedups.skip_nan_fill()
    for model in models:
        model.train()
    runner = Stacked(models) if batched else SeedBySeed(models, cfg.channels_last)
    optimizer = torch.optim.SGD(list(runner.params.values()), lr=cfg.lr, momentum=cfg.momentum,
                                weight_decay=cfg.weight_decay)
    return Group(seeds, models, runner, optimizer, [torch.Generator().manual_seed(s) for s in seeds])


def train_epoch(group: Group, x: torch.Tensor, y: torch.Tensor, batch_size: int) -> tuple[list[float], list[float]]:
    """One pass, each seed in its own fresh order; per-seed (mean loss, running accuracy)."""
    order = torch.stack([torch.randperm(len(y), generator=g) for g in group.shuffles]).to(x.device)
    loss_sum = torch.zeros(len(group.seeds), device=x.device)
    correct = torch.zeros(len(group.seeds), dtype=torch.long, device=x.device)
    for start in range(0, len(y), batch_size):
        idx = order[:, start:start + batch_size]
        group.optimizer.zero_grad(set_to_none=True)
        losses, right = group.runner.step(x[idx], y[idx])
        group.optimizer.step()
        loss_sum += losses * idx.shape[1]
        correct += right
    return (loss_sum / len(y)).tolist(), (correct.double() / len(y)).tolist()


def evaluate_group(group: Group, val: Tensors, batch_size: int) -> tuple[list[float], list[float]]:
    """Per-seed (validation loss, validation accuracy)."""
    logits = group.runner.logits(val[0], batch_size)
    losses = [F.cross_entropy(lg, val[1]).item() for lg in logits]
    return losses, (logits.argmax(2) == val[1]).double().mean(1).tolist()


def fit(group: Group, train: Tensors, val: Tensors, cfg: TrainParams, eval_batch: int,
        on_epoch: Callable[[list[EpochRecord]], None] = lambda rows: None) -> list[list[EpochRecord]]:
    """Train for cfg.epochs; per seed, one record per epoch. `seconds` is the whole group's epoch."""
    history: list[list[EpochRecord]] = [[] for _ in group.seeds]
    for epoch in range(1, cfg.epochs + 1):
        synchronize(train[0].device)
        start = time.perf_counter()
        train_loss, train_acc = train_epoch(group, *train, cfg.batch_size)
        seconds = time.perf_counter() - start
        val_loss, val_acc = evaluate_group(group, val, eval_batch)
        rows = [EpochRecord(seed, epoch, train_loss[k], train_acc[k], val_loss[k], val_acc[k], seconds)
                for k, seed in enumerate(group.seeds)]
        for k, row in enumerate(rows):
            history[k].append(row)
        on_epoch(rows)
    group.runner.write_back(group.models)
    return history


def median_epoch_seconds(history: list[EpochRecord]) -> float:
    """Median, not mean: the first epoch pays one-off warm-up costs."""
    return statistics.median(row.seconds for row in history)

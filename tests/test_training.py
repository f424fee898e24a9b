"""The training loop: it learns, its history is complete, and a CPU rerun is bitwise identical."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from cifar3study.device import seed_everything, set_numerics
from cifar3study.history import EpochRecord
from cifar3study.models import build_model
from cifar3study.params import ModelParams, TrainParams
from cifar3study.training import fit, median_epoch_seconds
from tests.helpers import separable

FC = ModelParams(arch="fc", activation="tanh", hidden=(64,))
CNN = ModelParams(arch="cnn", activation="tanh", hidden=(32,), channels=(16, 8), kernel_size=3, padding=1, pool=2)
TRAIN = TrainParams(device="cpu", epochs=3, batch_size=16, lr=0.05, momentum=0.0, weight_decay=0.0, seed=0,
                    deterministic=True, channels_last=True, tf32=False)


def trained(cfg: ModelParams, train: TrainParams = TRAIN) -> tuple[torch.nn.Module, list]:
    seed_everything(train.seed)
    set_numerics(train.deterministic, train.tf32)
    model = build_model(cfg, 3)
    return model, fit(model, separable(96, 1), separable(48, 2), train, eval_batch=32)


@pytest.mark.parametrize("cfg", [FC, CNN])
def test_loss_falls_on_separable_data(cfg: ModelParams) -> None:
    _, history = trained(cfg)
    assert history[-1].train_loss < 0.7 * history[0].train_loss
    assert history[-1].val_acc > 0.8
    assert [row.epoch for row in history] == [1, 2, 3]
    assert all(row.seconds > 0 for row in history)


@pytest.mark.parametrize("cfg", [CNN, FC])
def test_two_cpu_runs_are_bitwise_identical(cfg: ModelParams) -> None:
    short = dataclasses.replace(TRAIN, epochs=2)
    (first, h1), (second, h2) = trained(cfg, short), trained(cfg, short)
    for (key, a), b in zip(first.state_dict().items(), second.state_dict().values(), strict=True):
        assert torch.equal(a, b), key
    assert [dataclasses.replace(r, seconds=0) for r in h1] == [dataclasses.replace(r, seconds=0) for r in h2]


def test_another_seed_gives_other_weights() -> None:
    a, _ = trained(CNN, dataclasses.replace(TRAIN, epochs=1))
    b, _ = trained(CNN, dataclasses.replace(TRAIN, epochs=1, seed=1))
    assert not torch.equal(a.convs[0].weight, b.convs[0].weight)


def test_median_epoch_seconds_ignores_a_slow_first_epoch() -> None:
    rows = [EpochRecord(e, 1.0, 0.5, 1.0, 0.5, s) for e, s in enumerate([100.0, 1.0, 2.0], start=1)]
    assert median_epoch_seconds(rows) == 2.0

"""The seed-group trainer: it learns; a seed in a group ends where it would alone; the vmap and seed-by-seed
paths agree; a CPU rerun is bitwise identical.

Tolerances: the seed-by-seed path runs exactly the ops of a lone run, so it
is compared bitwise. The vmap path runs the same arithmetic through batched
kernels (grouped convolutions) whose float32 summation order differs, and
momentum 0.9 amplifies that: after 3 epochs (18 steps, lr 0.05) the CNN's
weights (up to 0.34) agree to 1e-3 absolute (measured 3.5e-4); the FC net's
batched path is bitwise equal to its lone run.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from cifar3study.params import ModelParams, TrainParams
from cifar3study.training.device import seed_everything, set_numerics
from cifar3study.training.history import EpochRecord
from cifar3study.training.trainer import fit, init_models, median_epoch_seconds, setup_group
from tests.helpers import separable

FC = ModelParams(arch="fc", activation="tanh", hidden=(64,))
CNN = ModelParams(arch="cnn", activation="tanh", hidden=(32,), channels=(16, 8), kernel_size=3, padding=1, pool=2)
TRAIN = TrainParams(device="cpu", epochs=3, batch_size=16, lr=0.05, momentum=0.9, weight_decay=1e-4, seeds=(0,),
                    deterministic=True, channels_last=True, tf32=False)
WEIGHT_TOL = {"rtol": 0.0, "atol": 1e-3}


def trained(cfg: ModelParams, seeds: tuple[int, ...], batched: bool, epochs: int = 3) -> tuple[list, list]:
    """(models, history) of a group trained on separable data, as the train stage does it."""
    train = dataclasses.replace(TRAIN, seeds=seeds, epochs=epochs)
    seed_everything(seeds[0])
    set_numerics(True, False)
    models = init_models(cfg, 3, seeds, torch.device("cpu"))
    history = fit(setup_group(models, seeds, train, batched), separable(96, 1), separable(48, 2), train, eval_batch=32)
    return models, history


def weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.contiguous() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("batched", [False, True], ids=["seed-by-seed", "vmap"])
@pytest.mark.parametrize("cfg", [FC, CNN], ids=["fc", "cnn"])
def test_every_seed_learns_separable_data(cfg: ModelParams, batched: bool) -> None:
    _, history = trained(cfg, (0, 1, 2), batched)
    for seed, rows in zip((0, 1, 2), history, strict=True):
        assert [(r.seed, r.epoch) for r in rows] == [(seed, 1), (seed, 2), (seed, 3)]
        assert rows[-1].train_loss < 0.7 * rows[0].train_loss and rows[-1].val_acc > 0.8


@pytest.mark.parametrize("batched", [False, True], ids=["seed-by-seed", "vmap"])
@pytest.mark.parametrize("cfg", [FC, CNN], ids=["fc", "cnn"])
def test_a_seed_in_a_group_of_three_ends_where_it_would_alone(cfg: ModelParams, batched: bool) -> None:
    group, group_history = trained(cfg, (0, 1, 2), batched)
    alone, alone_history = trained(cfg, (1,), batched)
    for key, value in weights(alone[0]).items():
        if batched:
            torch.testing.assert_close(weights(group[1])[key], value, **WEIGHT_TOL)
        else:
            assert torch.equal(weights(group[1])[key], value), key
    ends = [(r.val_acc, r.train_acc_running) for r in (group_history[1][-1], alone_history[0][-1])]
    assert ends[0] == ends[1] if not batched else ends[0] == pytest.approx(ends[1], abs=1 / 48)


@pytest.mark.parametrize("cfg", [FC, CNN], ids=["fc", "cnn"])
def test_vmap_and_seed_by_seed_train_the_same_weights(cfg: ModelParams) -> None:
    (batched, _), (looped, _) = trained(cfg, (0, 3), True), trained(cfg, (0, 3), False)
    for a, b in zip(batched, looped, strict=True):
        for key, value in weights(b).items():
            torch.testing.assert_close(weights(a)[key], value, **WEIGHT_TOL)


@pytest.mark.parametrize("batched", [False, True], ids=["seed-by-seed", "vmap"])
@pytest.mark.parametrize("cfg", [FC, CNN], ids=["fc", "cnn"])
def test_a_cpu_rerun_of_the_group_is_bitwise_identical(cfg: ModelParams, batched: bool) -> None:
    (first, h1), (second, h2) = trained(cfg, (0, 1), batched, epochs=2), trained(cfg, (0, 1), batched, epochs=2)
    for a, b in zip(first, second, strict=True):
        for key, value in weights(a).items():
            assert torch.equal(weights(b)[key], value), key
    strip = [[dataclasses.replace(r, seconds=0) for r in rows] for rows in (*h1, *h2)]
    assert strip[:2] == strip[2:]


def test_seeds_differ_from_each_other() -> None:
    models, _ = trained(CNN, (0, 1), False, epochs=1)
    assert not torch.equal(models[0].convs[0].weight, models[1].convs[0].weight)


def test_median_epoch_seconds_ignores_a_slow_first_epoch() -> None:
    rows = [EpochRecord(0, e, 1.0, 0.5, 1.0, 0.5, s) for e, s in enumerate([100.0, 1.0, 2.0], start=1)]
    assert median_epoch_seconds(rows) == 2.0

"""The memory estimate follows the real models, and a group that cannot fit is refused naming the key."""

from __future__ import annotations

import dataclasses
import itertools

import pytest
import torch
import torch.nn.functional as F
import yaml

from cifar3study.errors import StageError
from cifar3study.params import ModelParams, ParamError, Params, parse_params
from cifar3study.training.budget import (
    FLOAT,
    available_bytes,
    check_budget,
    dominant_key,
    estimate,
    layer_outputs,
    parameter_count,
)
from cifar3study.training.models import ConvNet, build_model, count_params
from tests.helpers import ROOT

PARAMS = parse_params(yaml.safe_load((ROOT / "params.yaml").read_text()))
CPU = torch.device("cpu")


def cnn(channels: tuple[int, ...], kernel: int, padding: int, pool: int, hidden: tuple[int, ...] = (7,)) -> ModelParams:
    return ModelParams("cnn", "relu", hidden, channels, kernel, padding, pool)


def with_model(cfg: ModelParams, **train: object) -> Params:
    return dataclasses.replace(PARAMS, models={**PARAMS.models, "m": cfg},
                               train=dataclasses.replace(PARAMS.train, **train))


@pytest.mark.parametrize("cfg", [*PARAMS.models.values(), ModelParams("fc", "tanh", ()),
                                 ModelParams("fc", "relu", (5, 3, 9)), cnn((5, 3, 9), 5, 2, 3),
                                 cnn((7, 9), 32, 31, 1, (4, 4)), cnn((4,) * 5, 3, 1, 2, (3,))])
def test_parameter_count_matches_the_built_model(cfg: ModelParams) -> None:
    assert parameter_count(cfg, 4) == count_params(build_model(cfg, 4))


def test_the_conv_size_check_agrees_with_the_built_convnet() -> None:
    """params refuses exactly the conv stacks that training.models cannot build."""
    for kernel, pool, layers in itertools.product(range(1, 8), range(1, 5), range(1, 7)):
        for padding in range(kernel):
            cfg = cnn((1,) * layers, kernel, padding, pool)
            try:
                cfg.validate("m")
                valid = True
            except ParamError:
                valid = False
            try:
                ConvNet(cfg, 3)
                built = True
            except (StageError, RuntimeError):
                built = False
            assert valid == built, cfg


@pytest.mark.parametrize("cfg", list(PARAMS.models.values()))
def test_training_batch_estimate_covers_what_autograd_saves(cfg: ModelParams) -> None:
    """Bytes that backward keeps, counted by torch itself, stay within the per-image estimate."""
    saved: dict[int, int] = {}  # storage address -> bytes: a tensor saved by two layers is held once

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        saved[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    model, batch = build_model(cfg, 3), 16
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        F.cross_entropy(model(torch.randn(batch, 3, 32, 32)), torch.zeros(batch, dtype=torch.long)).backward()
    weights = count_params(model) * FLOAT
    activations = sum(saved.values()) - weights  # Linear and conv layers save their weights too
    assert 0 < activations <= sum(layer_outputs(cfg, 3)) * batch


def test_estimate_counts_every_seed_and_the_momentum_buffer() -> None:
    one = estimate(with_model(PARAMS.models["fc"], seeds=(0,)), "m")
    three = estimate(with_model(PARAMS.models["fc"], seeds=(0, 1, 2)), "m")
    momentum = estimate(with_model(PARAMS.models["fc"], seeds=(0,), momentum=0.9), "m")
    assert three.weights == 3 * one.weights and three.train_batch == 3 * one.train_batch
    assert momentum.weights == one.weights * 4 // 3
    assert one.weights == count_params(build_model(PARAMS.models["fc"], 3)) * FLOAT * 3
    assert three.data == one.data == 6_000 * 3 * 3072 * 5


@pytest.mark.parametrize(("cfg", "train", "evaluate", "key"), [
    (ModelParams("fc", "tanh", (65_536,) * 3), {}, 1000, "models.m.hidden"),
    (cnn((4_096, 4_096), 3, 1, 2), {}, 1000, "models.m.channels"),
    (cnn((16,), 31, 30, 1), {}, 1000, "models.m.padding"),
    (PARAMS.models["fc"], {"seeds": tuple(range(64))}, 1000, "train.seeds"),
    (PARAMS.models["cnn"], {"batch_size": 60_000}, 1000, "train.batch_size"),
    (PARAMS.models["cnn"], {}, 60_000, "evaluate.batch_size"),
])
def test_the_dominant_key_is_the_one_that_grew(cfg: ModelParams, train: dict, evaluate: int, key: str) -> None:
    params = dataclasses.replace(with_model(cfg, **train), evaluate=dataclasses.replace(PARAMS.evaluate,
                                                                                        batch_size=evaluate))
    assert dominant_key(params, "m") == key


def test_a_group_larger_than_free_memory_is_refused_in_one_line() -> None:
    """Three 65,536-wide layers pass every cap but need about 300 GiB for three seeds."""
    params = with_model(ModelParams("fc", "tanh", (65_536,) * 3))
    assert estimate(params, "m").total > available_bytes(CPU)
    with pytest.raises(ParamError) as err:
        check_budget(params, "m", CPU)
    message = str(err.value)
    assert message.startswith("params.yaml: models.m.hidden makes m need about") and "cpu has" in message
    assert "\n" not in message and len(message) < 400


def test_the_default_models_fit() -> None:
    for model in PARAMS.models:
        check_budget(PARAMS, model, CPU)
        assert estimate(PARAMS, model).total < 1 << 30

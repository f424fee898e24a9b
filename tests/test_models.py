"""The two architectures: reference parameter counts, shapes, and the conv arithmetic."""

from __future__ import annotations

import random

import pytest
import torch
from torch import nn

from cifar3study.errors import StageError
from cifar3study.params import ModelParams
from cifar3study.training.models import build_model, conv_output_size, count_params, layer_table, predict

FC = ModelParams(arch="fc", activation="tanh", hidden=(1024, 512, 128))
CNN = ModelParams(arch="cnn", activation="tanh", hidden=(32,), channels=(16, 8), kernel_size=3, padding=1, pool=2)


@pytest.mark.parametrize(("cfg", "classes", "expected"), [
    (FC, 3, 3_737_603), (CNN, 3, 18_123), (FC, 10, 3_738_506), (CNN, 10, 18_354),
])
def test_reference_parameter_counts(cfg: ModelParams, classes: int, expected: int) -> None:
    assert count_params(build_model(cfg, classes)) == expected


@pytest.mark.parametrize("cfg", [FC, CNN])
@pytest.mark.parametrize("batch", [1, 64])
def test_forward_shapes(cfg: ModelParams, batch: int) -> None:
    assert build_model(cfg, 3)(torch.randn(batch, 3, 32, 32)).shape == (batch, 3)


def test_conv_stack_that_shrinks_images_to_nothing_is_refused() -> None:
    deep = ModelParams(arch="cnn", activation="relu", hidden=(4,), channels=(4,) * 6, kernel_size=3, padding=0, pool=2)
    with pytest.raises(StageError, match="shrinks 32 px images to nothing"):
        build_model(deep, 3)


def test_layer_table_lists_every_tensor_and_the_total() -> None:
    table = layer_table(build_model(CNN, 3))
    assert table.count("\n") == 2 + len(list(build_model(CNN, 3).parameters())) + 1
    assert "| convs.0.weight | (16, 3, 3, 3) | 432 |" in table and "**18,123**" in table


def test_predict_batches_like_one_pass_and_restores_train_mode() -> None:
    model = build_model(CNN, 3).train()
    x = torch.randn(10, 3, 32, 32)
    torch.testing.assert_close(predict(model, x, batch_size=3), model.eval()(x), rtol=0, atol=1e-6)
    model.train()
    predict(model, x, 4)
    assert model.training


def test_conv_output_size_matches_torch_on_random_configs() -> None:
    rng = random.Random(0)
    checked = 0
    while checked < 300:
        n, k, s, p, d = rng.randint(1, 40), rng.randint(1, 7), rng.randint(1, 4), rng.randint(0, 3), rng.randint(1, 3)
        pool_pad = min(p, k // 2)  # max-pool only accepts padding up to half its window
        if n + 2 * pool_pad < d * (k - 1) + 1:  # torch refuses windows wider than the padded input
            continue
        x = torch.zeros(1, 1, n, n)
        assert nn.Conv2d(1, 1, k, s, p, d)(x).shape[-1] == conv_output_size(n, k, s, p, d), (n, k, s, p, d)
        pooled = nn.MaxPool2d(k, s, pool_pad, d)(x).shape[-1]
        assert pooled == conv_output_size(n, k, s, pool_pad, d), (n, k, s, pool_pad, d)
        checked += 1

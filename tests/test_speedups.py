"""Every speed trick computes what the plain computation does (pool first, channels_last, oneDNN Linear)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cifar3study import speedups
from cifar3study.device import seed_everything, set_numerics
from cifar3study.models import ConvNet, build_model
from cifar3study.params import ModelParams, TrainParams
from cifar3study.training import setup_training, train_epoch

ACTIVATIONS = ("tanh", "relu", "leaky_relu")


def cnn_cfg(activation: str) -> ModelParams:
    return ModelParams(arch="cnn", activation=activation, hidden=(32,), channels=(16, 8), kernel_size=3, padding=1, pool=2)


def train_cfg(channels_last: bool) -> TrainParams:
    return TrainParams(device="cpu", epochs=1, batch_size=16, lr=0.01, momentum=0.0, weight_decay=0.0, seed=0,
                       deterministic=True, channels_last=channels_last, tf32=False)


def plain_linears(model: nn.Module) -> nn.Module:
    """A copy whose Linear layers are torch's own nn.Linear: the unoptimised reference."""
    plain = copy.deepcopy(model)
    for module in plain.modules():
        if isinstance(module, speedups.OneDnnLinear):
            module.__class__ = nn.Linear
    return plain


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("training", [False, True])
def test_fast_cnn_gives_plain_logits(activation: str, training: bool) -> None:
    torch.manual_seed(0)
    plain = ConvNet(cnn_cfg(activation), 3, pool_first=False).train(training)
    fast = ConvNet(cnn_cfg(activation), 3, pool_first=True).train(training)
    assert list(fast.state_dict()) == list(plain.state_dict())
    fast.load_state_dict(plain.state_dict())
    fast.to(memory_format=torch.channels_last)
    x = torch.randn(32, 3, 32, 32)
    expected = plain(x)
    got = fast(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


def test_fast_fc_matches_plain_linear() -> None:
    torch.manual_seed(0)
    fast = build_model(ModelParams(arch="fc", activation="tanh", hidden=(256, 64)), 3)
    plain = plain_linears(fast)
    assert any(isinstance(m, speedups.OneDnnLinear) for m in fast.modules())
    assert not any(isinstance(m, speedups.OneDnnLinear) for m in plain.modules())
    assert list(fast.state_dict()) == list(plain.state_dict())
    x, y = torch.randn(16, 3, 32, 32), torch.randint(0, 3, (16,))
    for model in (fast, plain):
        F.cross_entropy(model(x), y).backward()
    torch.testing.assert_close(fast(x), plain(x), rtol=0, atol=1e-5)
    for a, b in zip(fast.parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6)


def set_seed(seed: int) -> None:
    seed_everything(seed)
    set_numerics(deterministic=True, tf32=False)


def trained_step(channels_last: bool) -> dict[str, torch.Tensor]:
    """Weights after one SGD epoch of a single batch, the way `fit` trains."""
    set_seed(0)
    model = build_model(cnn_cfg("tanh"), 3)
    optimizer, generator, _ = setup_training(model, train_cfg(channels_last))
    x, y = torch.randn(16, 3, 32, 32), torch.randint(0, 3, (16,))
    train_epoch(model, optimizer, x, y, 16, generator, channels_last)
    return {k: v.contiguous() for k, v in model.state_dict().items()}


def test_channels_last_step_matches_nchw_step() -> None:
    nchw, nhwc = trained_step(False), trained_step(True)
    assert list(nchw) == list(nhwc)
    for key in nchw:
        torch.testing.assert_close(nhwc[key], nchw[key], rtol=0, atol=1e-5)


@pytest.mark.parametrize("arch", ["fc", "cnn"])
def test_cpu_training_is_bitwise_repeatable(arch: str) -> None:
    cfg = cnn_cfg("tanh") if arch == "cnn" else ModelParams(arch="fc", activation="tanh", hidden=(256, 64))

    def run() -> list[torch.Tensor]:
        set_seed(0)
        model = build_model(cfg, 3)
        optimizer, generator, channels_last = setup_training(model, train_cfg(True))
        x, y = torch.randn(64, 3, 32, 32), torch.randint(0, 3, (64,))
        train_epoch(model, optimizer, x, y, 16, generator, channels_last)
        return [p.detach().clone() for p in model.parameters()]

    for a, b in zip(run(), run(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fast_cnn_on_cuda_gives_plain_logits() -> None:
    torch.manual_seed(0)
    plain = ConvNet(cnn_cfg("tanh"), 3, pool_first=False).cuda().eval()
    fast = ConvNet(cnn_cfg("tanh"), 3).cuda().eval()
    fast.load_state_dict(plain.state_dict())
    x = torch.randn(8, 3, 32, 32, device="cuda")
    fast.to(memory_format=torch.channels_last)
    torch.testing.assert_close(fast(x.contiguous(memory_format=torch.channels_last)), plain(x), rtol=0, atol=1e-5)


def test_use_channels_last_moves_conv_models_only() -> None:
    cnn, fc = build_model(cnn_cfg("tanh"), 3), build_model(ModelParams(arch="fc", activation="tanh", hidden=(8,)), 3)
    assert speedups.use_channels_last(cnn, True) is True
    assert cnn.convs[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert speedups.use_channels_last(fc, True) is False
    assert speedups.use_channels_last(build_model(cnn_cfg("tanh"), 3), False) is False

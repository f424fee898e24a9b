"""Every speed trick computes what the plain computation does (pool first, channels_last, oneDNN Linear)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cifar3study.params import ModelParams
from cifar3study.training import speedups
from cifar3study.training.models import ConvNet, build_model

ACTIVATIONS = ("tanh", "relu", "leaky_relu")


def cnn_cfg(activation: str) -> ModelParams:
    return ModelParams(arch="cnn", activation=activation, hidden=(32,), channels=(16, 8), kernel_size=3, padding=1, pool=2)


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


def test_use_channels_last_moves_conv_models_only() -> None:
    cnn, fc = build_model(cnn_cfg("tanh"), 3), build_model(ModelParams(arch="fc", activation="tanh", hidden=(8,)), 3)
    assert speedups.use_channels_last(cnn, True) is True
    assert cnn.convs[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert speedups.use_channels_last(fc, True) is False
    assert speedups.use_channels_last(build_model(cnn_cfg("tanh"), 3), False) is False


def test_stacked_linear_weights_are_stored_transposed_with_the_same_values() -> None:
    stacked = torch.randn(3, 8, 5)
    leaf = speedups.stacked_leaf(stacked)
    assert torch.equal(leaf, stacked) and leaf.is_leaf and leaf.requires_grad
    assert leaf.stride() == (40, 1, 8)  # [S, in, out] in memory: the layout vmap's weight gradient comes in
    x = torch.randn(3, 4, 5)
    torch.vmap(lambda w, xb: torch.nn.functional.linear(xb, w))(leaf, x).sum().backward()
    assert leaf.grad.stride() == leaf.stride()  # kept as produced: no copy into another layout
    assert speedups.stacked_leaf(torch.randn(3, 8)).stride() == (8, 1)  # biases stay as they are


def test_plain_copy_has_no_onednn_layers_and_the_same_weights() -> None:
    fast = build_model(ModelParams(arch="fc", activation="tanh", hidden=(16,)), 3)
    plain = speedups.plain_copy(fast)
    assert not any(isinstance(m, speedups.OneDnnLinear) for m in plain.modules())
    assert any(isinstance(m, speedups.OneDnnLinear) for m in fast.modules())
    for a, b in zip(fast.state_dict().values(), plain.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_seed_groups_are_batched_off_the_cpu_only() -> None:
    assert speedups.batch_seeds(torch.device("cpu")) is False
    assert speedups.batch_seeds(torch.device("cuda")) is True


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fast_cnn_on_cuda_gives_plain_logits() -> None:
    torch.manual_seed(0)
    plain = ConvNet(cnn_cfg("tanh"), 3, pool_first=False).cuda().eval()
    fast = ConvNet(cnn_cfg("tanh"), 3).cuda().eval()
    fast.load_state_dict(plain.state_dict())
    x = torch.randn(8, 3, 32, 32, device="cuda")
    fast.to(memory_format=torch.channels_last)
    torch.testing.assert_close(fast(x.contiguous(memory_format=torch.channels_last)), plain(x), rtol=0, atol=1e-5)

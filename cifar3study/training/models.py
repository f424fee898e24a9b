"""The two architectures, built from params. Models never pick a device: callers move them."""

from __future__ import annotations

import itertools

import numpy as np
import torch
from torch import nn

from cifar3study.data.dataset import ChannelStats
from cifar3study.errors import StageError
from cifar3study.params import ModelParams
from cifar3study.training.speedups import OneDnnLinear, pool_then_activate

IMAGE_SHAPE = (3, 32, 32)
ACTIVATION_LAYERS = {"tanh": nn.Tanh, "relu": nn.ReLU, "leaky_relu": nn.LeakyReLU}


def normalize(images: np.ndarray, stats: ChannelStats, device: torch.device) -> torch.Tensor:
    """uint8 N x C x H x W -> float32 on `device`, scaled to [0, 1] then standardised.

    Same arithmetic as torchvision's ToTensor + Normalize, done once for the
    whole split instead of once per image per epoch.
    """
    x = torch.from_numpy(images).to(device).float().div_(255.0)
    m = torch.tensor(stats.mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)
    s = torch.tensor(stats.std, dtype=torch.float32, device=device).view(1, -1, 1, 1)
    return x.sub_(m).div_(s)


def conv_output_size(n: int, kernel: int, stride: int, padding: int, dilation: int = 1) -> int:
    """Output length of a conv or pool along one axis: floor((n + 2p - d(k-1) - 1) / s) + 1."""
    return (n + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def _mlp(widths: list[int], activation: str, linear: type[nn.Linear] = nn.Linear) -> list[nn.Module]:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(itertools.pairwise(widths)):
        layers.append(linear(a, b))
        if i < len(widths) - 2:
            layers.append(ACTIVATION_LAYERS[activation]())
    return layers


def build_fc(cfg: ModelParams, num_classes: int, linear: type[nn.Linear] = OneDnnLinear) -> nn.Sequential:
    """Flatten, then Linear + activation per hidden width, then Linear to the classes.

    `linear=nn.Linear` gives the plain reference; the default trains through oneDNN (see speedups).
    """
    inputs = IMAGE_SHAPE[0] * IMAGE_SHAPE[1] * IMAGE_SHAPE[2]
    return nn.Sequential(nn.Flatten(), *_mlp([inputs, *cfg.hidden, num_classes], cfg.activation, linear))


class ConvNet(nn.Module):
    """Per channel count: conv, activation, max-pool; then a small MLP.

    With `pool_first` (the default) each block pools before the activation,
    an exact rewrite for the activations offered (see speedups.pool_then_activate).
    """

    def __init__(self, cfg: ModelParams, num_classes: int, pool_first: bool = True) -> None:
        super().__init__()
        self.pool_first = pool_first
        self.activation = ACTIVATION_LAYERS[cfg.activation]()
        self.pool = nn.MaxPool2d(cfg.pool)
        self.convs = nn.ModuleList()
        channels, side = IMAGE_SHAPE[0], IMAGE_SHAPE[1]
        for out_channels in cfg.channels:
            self.convs.append(nn.Conv2d(channels, out_channels, cfg.kernel_size, padding=cfg.padding))
            side = conv_output_size(side, cfg.kernel_size, 1, cfg.padding)
            side = conv_output_size(side, cfg.pool, cfg.pool, 0)
            channels = out_channels
        if side < 1:
            raise StageError(f"conv stack of {list(cfg.channels)} shrinks 32 px images to nothing; "
                             "use fewer layers or more padding")
        self.classifier = nn.Sequential(*_mlp([channels * side * side, *cfg.hidden, num_classes], cfg.activation))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv in self.convs:
            x = conv(x)
            x = pool_then_activate(x, self.pool, self.activation) if self.pool_first else self.pool(self.activation(x))
        return self.classifier(x.flatten(1))


def build_model(cfg: ModelParams, num_classes: int) -> nn.Module:
    return build_fc(cfg, num_classes) if cfg.arch == "fc" else ConvNet(cfg, num_classes)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def layer_table(model: nn.Module) -> str:
    """Markdown table of every parameter tensor: name, shape, count."""
    rows = ["| parameter | shape | count |", "|---|---|---:|"]
    rows += [f"| {name} | {tuple(p.shape)} | {p.numel():,} |" for name, p in model.named_parameters()]
    rows.append(f"| **total** | | **{count_params(model):,}** |")
    return "\n".join(rows) + "\n"


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Logits for `x`, in eval mode, `batch_size` images at a time."""
    was_training = model.training
    model.eval()
    logits = torch.cat([model(x[i:i + batch_size]) for i in range(0, len(x), batch_size)])
    model.train(was_training)
    return logits

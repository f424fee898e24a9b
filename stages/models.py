"""The two architectures, built from params, and their checkpoint format.

Models never pick a device: callers resolve it once and move them.
"""

from __future__ import annotations

import dataclasses
import itertools
from pathlib import Path

import torch
from torch import nn

from stages.common import StageError, atomic_path
from stages.params import ModelParams

IMAGE_SHAPE = (3, 32, 32)
ACTIVATION_LAYERS = {"tanh": nn.Tanh, "relu": nn.ReLU, "leaky_relu": nn.LeakyReLU}


def conv_output_size(n: int, kernel: int, stride: int, padding: int, dilation: int = 1) -> int:
    """Output length of a conv or pool along one axis: floor((n + 2p - d(k-1) - 1) / s) + 1."""
    return (n + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def _onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ weight.T + bias through oneDNN, which uses AVX-512 on CPUs where MKL's sgemm does not."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


class _OneDnnLinearFn(torch.autograd.Function):
    """F.linear for 2-D float32 CPU inputs with all three GEMMs in oneDNN (the FC net's hot spot)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return _onednn_linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad
        grad_x = _onednn_linear(grad, weight.t()) if need_x else None
        grad_w = _onednn_linear(grad.t().contiguous(), x.t()) if need_w else None  # fastest layout pair
        grad_b = grad.sum(0) if need_b and ctx.has_bias else None
        return grad_x, grad_w, grad_b


class Linear(nn.Linear):
    """nn.Linear (same parameters and state_dict keys) that trains through oneDNN on the CPU.

    Only in training mode: eval, export and every other device or dtype take F.linear.
    Results agree with F.linear to float32 rounding; runs are bitwise repeatable.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and _ONEDNN and x.dim() == 2 and x.device.type == "cpu" and x.dtype == torch.float32 \
                and not torch.compiler.is_compiling():
            return _OneDnnLinearFn.apply(x, self.weight, self.bias)
        return super().forward(x)


_ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def _mlp(widths: list[int], activation: str, linear: type[nn.Linear] = nn.Linear) -> list[nn.Module]:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(itertools.pairwise(widths)):
        layers.append(linear(a, b))
        if i < len(widths) - 2:
            layers.append(ACTIVATION_LAYERS[activation]())
    return layers


def build_fc(cfg: ModelParams, num_classes: int, linear: type[nn.Linear] = Linear) -> nn.Sequential:
    """Flatten, then Linear + activation per hidden width, then Linear to the classes.

    The Linear layers train through oneDNN (see `Linear`; pass `linear=nn.Linear`
    for the plain reference); the CNN's small head keeps nn.Linear.
    """
    inputs = IMAGE_SHAPE[0] * IMAGE_SHAPE[1] * IMAGE_SHAPE[2]
    return nn.Sequential(nn.Flatten(), *_mlp([inputs, *cfg.hidden, num_classes], cfg.activation, linear))


class ConvNet(nn.Module):
    """Per channel count: conv, activation, max-pool; then a small MLP.

    With `pool_first` (the default) each block max-pools before the
    activation. For a non-decreasing activation (tanh, ReLU, LeakyReLU) this
    gives exactly the same output, since max commutes with it, while the
    activation runs on a quarter of the values: the CNN's CPU hot spot.
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
            x = self.activation(self.pool(x)) if self.pool_first else self.pool(self.activation(x))
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


def save_checkpoint(path: Path, model: nn.Module, cfg: ModelParams, classes: tuple[str, ...],
                    mean: list[float], std: list[float]) -> None:
    """state_dict plus everything needed to rebuild and feed the model; atomic."""
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    payload = {"state_dict": state, "config": dataclasses.asdict(cfg), "classes": list(classes), "mean": mean, "std": std}
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def load_checkpoint(path: Path) -> tuple[nn.Module, dict]:
    """(model on the CPU in eval mode, the checkpoint's metadata), from the file alone."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
        raw = payload["config"]
        cfg = ModelParams(**{k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()})
        model = build_model(cfg, len(payload["classes"]))
        model.load_state_dict(payload["state_dict"])
    except StageError:
        raise
    except Exception as err:  # any unreadable or foreign file: one line, not a traceback
        raise StageError(f"{path} is not a checkpoint of this project ({type(err).__name__}: {err}); "
                         "rerun its train stage (dvc repro -f train@<model>)") from err
    return model.eval(), payload


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Logits for `x`, in eval mode, `batch_size` images at a time."""
    was_training = model.training
    model.eval()
    logits = torch.cat([model(x[i:i + batch_size]) for i in range(0, len(x), batch_size)])
    model.train(was_training)
    return logits

"""What the CNN's convolutions learned, and what they do to real images: the visualize stage's figures.

The first conv layer's kernels, one validation image per class through every
conv block, and the same kind of image through hand-made edge and blur
kernels for comparison.
"""

from __future__ import annotations

import math
import re

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from cifar3study.data.dataset import Split
from cifar3study.errors import StageError
from cifar3study.training.checkpoint import CheckpointMeta
from cifar3study.training.models import ConvNet, normalize

MAX_COLUMNS = 16  # wider layers wrap onto more rows rather than shrinking every map to a dot
LUMA = (0.299, 0.587, 0.114)  # ITU-R BT.601, the usual RGB -> grey weights


def edge_kernels() -> dict[str, np.ndarray]:
    """Classic hand-made 3x3 filters: four oriented edge detectors and a box blur."""
    horizontal = np.array([[-1, -1, -1], [0, 0, 0], [1, 1, 1]], dtype=np.float32)
    diagonal = np.array([[0, 1, 1], [-1, 0, 1], [-1, -1, 0]], dtype=np.float32)
    return {"horizontal edge": horizontal, "vertical edge": horizontal.T.copy(),
            "diagonal edge \\": diagonal, "diagonal edge /": np.fliplr(diagonal).copy(),
            "blur": np.full((3, 3), 1 / 9, dtype=np.float32)}


def apply_kernel(gray_image: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """H x W image correlated with an odd square kernel, zero padded to keep H x W (as nn.Conv2d does)."""
    x = torch.as_tensor(gray_image, dtype=torch.float32)[None, None]
    w = torch.as_tensor(kernel, dtype=torch.float32)[None, None]
    return F.conv2d(x, w, padding=kernel.shape[-1] // 2)[0, 0].numpy()


def grayscale(image: np.ndarray) -> np.ndarray:
    """uint8 3 x H x W -> float32 H x W in [0, 1]."""
    return np.tensordot(np.asarray(LUMA, dtype=np.float32), image.astype(np.float32) / 255.0, axes=1)


def require_convnet(model: torch.nn.Module, meta: CheckpointMeta, source: str) -> ConvNet:
    if not isinstance(model, ConvNet):
        raise StageError(f"visualize needs a conv model; {source} holds arch={meta.config.arch}; "
                         "set visualize.model to a model with arch: cnn")
    return model


def first_of_each_class(split: Split, classes: tuple[str, ...]) -> dict[str, int]:
    """Index of the first validation image of each class: the same images on every run."""
    if split.classes != tuple(classes):
        raise StageError(f"validation classes {list(split.classes)} differ from the checkpoint's {classes}; "
                         "rerun cifar3 and train")
    missing = [c for i, c in enumerate(classes) if not (split.labels == i).any()]
    if missing:
        raise StageError(f"validation split has no image of class {', '.join(missing)}; rerun `dvc repro cifar3`")
    return {c: int(np.argmax(split.labels == i)) for i, c in enumerate(classes)}


@torch.no_grad()
def feature_maps(model: ConvNet, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Maps of one normalised 1 x C x H x W image after each conv + activation and each pool, in order.

    Runs conv -> activation -> pool; ConvNet's default pool_first order is an
    exact rewrite of this, so the last map is what the classifier sees.
    """
    act = type(model.activation).__name__.lower()
    maps: dict[str, torch.Tensor] = {}
    for i, conv in enumerate(model.convs, start=1):
        x = model.activation(conv(x))
        maps[f"conv{i} + {act}"] = x[0]
        x = model.pool(x)
        maps[f"pool{i}"] = x[0]
    return maps


def _grid(rows: int, cols: int, size: float, title: str) -> tuple[Figure, np.ndarray]:
    # A bare Figure, not pyplot's: nothing global to leak or close, whatever the backend.
    fig = Figure(figsize=(cols * size + 0.6, rows * size + 0.8), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax in axes.flat:
        ax.set_axis_off()
    fig.suptitle(title)
    return fig, axes


def _show(ax: Axes, img: np.ndarray, label: str = "", **style: object) -> None:
    ax.imshow(img, interpolation="nearest", **style)
    ax.set_title(label, fontsize=7, pad=2)


def _minmax(a: np.ndarray) -> np.ndarray:
    span = a.max() - a.min()
    return (a - a.min()) / span if span > 0 else np.zeros_like(a)


def first_conv(model: ConvNet) -> tuple[str, torch.nn.Conv2d]:
    return next((name, m) for name, m in model.named_modules() if isinstance(m, torch.nn.Conv2d))


def kernel_figure(model: ConvNet) -> Figure:
    """First-layer kernels as RGB tiles, each min-max scaled on its own (only its pattern is shown)."""
    name, conv = first_conv(model)
    weights = conv.weight.detach().cpu().numpy()  # out x in x k x k
    n, channels, k = weights.shape[0], weights.shape[1], weights.shape[-1]
    cols = math.ceil(math.sqrt(n))
    title = f"{name}: {n} learned kernels\n{k}×{k} × {channels} input channels (RGB), each min-max scaled"
    fig, axes = _grid(math.ceil(n / cols), cols, 1.3, title)
    for i, w in enumerate(weights):
        # More than 3 input channels has no colour picture; show their mean as grey instead.
        tile = _minmax(w.transpose(1, 2, 0)) if channels == 3 else _minmax(w.mean(0))
        _show(axes.flat[i], tile, f"#{i}", cmap="gray")
    return fig


def _stage_rows(maps: dict[str, torch.Tensor]) -> list[tuple[str, np.ndarray]]:
    """(label, maps) per grid row, a wide stage split over several rows of MAX_COLUMNS."""
    rows = []
    for name, m in maps.items():
        m = m.cpu().numpy()
        label = f"{name}\n{m.shape[0]} × {m.shape[1]}×{m.shape[2]}\ncolour ±{np.abs(m).max():.2f}"
        rows += [(label if s == 0 else "", m[s:s + MAX_COLUMNS]) for s in range(0, len(m), MAX_COLUMNS)]
    return rows


def _row_label(ax: Axes, label: str) -> None:
    ax.set_axis_on()  # an axis that is off draws no ylabel; keep it on but bare
    ax.set(xticks=[], yticks=[])
    ax.spines[:].set_visible(False)
    ax.set_ylabel(label, fontsize=7, rotation=0, ha="right", va="center")


def feature_map_figure(image: np.ndarray, maps: dict[str, torch.Tensor], title: str) -> Figure:
    """The input, then one row per stage; a stage's maps share one colour scale centred on 0."""
    rows = _stage_rows(maps)
    cols = max(len(m) for _, m in rows)
    fig, axes = _grid(len(rows) + 1, cols, 0.9, title)
    _show(axes[0, 0], image.transpose(1, 2, 0), "input (raw RGB)")
    for r, (label, stage) in enumerate(rows, start=1):
        limit = float(np.abs(stage).max()) or 1.0
        for c, m in enumerate(stage):
            _show(axes[r, c], m, str(c), cmap="RdBu_r", vmin=-limit, vmax=limit)
        _row_label(axes[r, 0], label)
    return fig


def edge_figure(image: np.ndarray, kernels: dict[str, np.ndarray], title: str) -> Figure:
    """Top row: the input and each kernel (values written in); bottom: grey input and each response."""
    gray = grayscale(image)
    fig, axes = _grid(2, len(kernels) + 1, 1.6, title)
    _show(axes[0, 0], image.transpose(1, 2, 0), "input")
    _show(axes[1, 0], gray, "grayscale", cmap="gray", vmin=0, vmax=1)
    for c, (name, kernel) in enumerate(kernels.items(), start=1):
        _show(axes[0, c], kernel, name, cmap="RdBu_r", vmin=-1, vmax=1)
        for (i, j), v in np.ndenumerate(kernel):
            axes[0, c].text(j, i, f"{v:.2g}", ha="center", va="center", fontsize=8,
                            color="white" if abs(v) > 0.5 else "black")
        response = apply_kernel(gray, kernel)
        signed = response.min() < 0
        # The zero-padded border is a fake edge as strong as any real one; scale to the interior so real edges show.
        limit = float(np.abs(response[1:-1, 1:-1]).max()) or 1.0
        style = {"cmap": "RdBu_r", "vmin": -limit, "vmax": limit} if signed else {"cmap": "gray"}
        _show(axes[1, c], response, f"response ±{limit:.2f}" if signed else "response", **style)
    return fig


def safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "_", name)


def figures(model: ConvNet, meta: CheckpointMeta, split: Split) -> dict[str, Figure]:
    """Every figure of the stage, by file name."""
    picks = first_of_each_class(split, meta.classes)
    out = {"kernels.png": kernel_figure(model)}
    for cls, i in picks.items():
        x = normalize(split.images[i:i + 1], meta.stats, torch.device("cpu"))
        title = f"Feature maps of validation image {i} ({cls})"
        out[f"feature_maps_{safe_name(cls)}.png"] = feature_map_figure(split.images[i], feature_maps(model, x), title)
    cls, i = next(iter(picks.items()))
    title = (f"Hand-made kernels on validation image {i} ({cls}), grayscale\n"
             "zero padding 1; colours scaled to the interior, so the padded border clips")
    out["edge_kernels.png"] = edge_figure(split.images[i], edge_kernels(), title)
    return out


"""The visualize stage's figures: hand-made kernels, feature maps, and learned-kernel grids."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from matplotlib.figure import Figure
from torch import nn

from cifar3study.data.dataset import ChannelStats, Split
from cifar3study.errors import StageError
from cifar3study.params import ModelParams
from cifar3study.reporting import conv_views
from cifar3study.training.checkpoint import CheckpointMeta
from cifar3study.training.models import build_model
from tests.helpers import CIFAR3_CLASSES as CLASSES

CNN = ModelParams(arch="cnn", activation="tanh", hidden=(32,), channels=(16, 8), kernel_size=3, padding=1, pool=2)
WIDE = ModelParams(arch="cnn", activation="relu", hidden=(16,), channels=(4, 6, 5), kernel_size=5, padding=2, pool=2)
FC = ModelParams(arch="fc", activation="tanh", hidden=(8,))
STATS = ChannelStats((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))


def image_axes(fig: Figure) -> int:
    return sum(1 for ax in fig.axes if ax.images)


def synthetic_split(n: int = 12, seed: int = 0) -> Split:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, 3, 32, 32), dtype=np.uint8)
    labels = np.array([2, 0, 2, 1] + [i % 3 for i in range(n - 4)], dtype=np.int64)
    return Split(images, labels, CLASSES, "0" * 32)


def model(cfg: ModelParams, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build_model(cfg, len(CLASSES)).eval()


def meta() -> CheckpointMeta:
    return CheckpointMeta(CNN, CLASSES, STATS, (0,))


# --- hand-made kernels -------------------------------------------------------------------------------------------

def step_image(side: int = 16) -> np.ndarray:
    img = np.zeros((side, side), dtype=np.float32)
    img[:, side // 2:] = 1.0
    return img


def test_vertical_edge_responds_only_along_a_vertical_step() -> None:
    response = conv_views.apply_kernel(step_image(), conv_views.edge_kernels()["vertical edge"])
    inner = response[:, 1:-1]  # the zero-padded border columns see a fake edge
    active = sorted({int(c) + 1 for c in np.nonzero(inner)[1]})
    assert active == [7, 8]  # the columns either side of the step at 7|8
    assert (response[:, 7:9] > 0).all()  # dark-to-bright left to right is positive


def test_horizontal_edge_ignores_a_vertical_step_and_finds_a_horizontal_one() -> None:
    kernel = conv_views.edge_kernels()["horizontal edge"]
    assert not conv_views.apply_kernel(step_image(), kernel)[1:-1, 1:-1].any()
    active = sorted({int(r) + 1 for r in np.nonzero(conv_views.apply_kernel(step_image().T, kernel)[1:-1, :])[0]})
    assert active == [7, 8]


def test_blur_keeps_a_flat_image_flat_and_kernel_set_is_as_documented() -> None:
    kernels = conv_views.edge_kernels()
    out = conv_views.apply_kernel(np.full((8, 8), 0.7, dtype=np.float32), kernels["blur"])
    assert out.shape == (8, 8)
    np.testing.assert_allclose(out[1:-1, 1:-1], 0.7, rtol=1e-6)
    np.testing.assert_array_equal(kernels["vertical edge"], kernels["horizontal edge"].T)
    assert all(k.shape == (3, 3) for k in kernels.values())
    assert all(abs(k.sum()) < 1e-6 for name, k in kernels.items() if name != "blur")


# --- feature maps and figures ------------------------------------------------------------------------------------

@pytest.mark.parametrize("cfg", [CNN, WIDE])
def test_feature_maps_end_where_the_classifier_starts(cfg: ModelParams) -> None:
    net = model(cfg)
    x = torch.randn(1, 3, 32, 32)
    maps = conv_views.feature_maps(net, x)
    assert len(maps) == 2 * len(cfg.channels)
    assert [m.shape[0] for m in maps.values()] == [c for c in cfg.channels for _ in range(2)]
    last = next(reversed(maps.values()))
    with torch.no_grad():  # conv -> act -> pool must give exactly what the model's pool_first forward feeds on
        torch.testing.assert_close(net.classifier(last.flatten()[None]), net(x), rtol=0, atol=1e-6)


@pytest.mark.parametrize("cfg", [CNN, WIDE])
def test_figure_grids_have_one_image_per_map(cfg: ModelParams) -> None:
    net, split = model(cfg), synthetic_split()
    figs = conv_views.figures(net, meta(), split)
    assert sorted(figs) == ["edge_kernels.png", "feature_maps_airplane.png", "feature_maps_automobile.png",
                            "feature_maps_ship.png", "kernels.png"]
    assert image_axes(figs["kernels.png"]) == cfg.channels[0]
    assert image_axes(figs["feature_maps_ship.png"]) == 1 + 2 * sum(cfg.channels)
    assert image_axes(figs["edge_kernels.png"]) == 2 * (1 + len(conv_views.edge_kernels()))
    assert "convs.0" in figs["kernels.png"].get_suptitle()
    assert f"{cfg.channels[0]} learned kernels" in figs["kernels.png"].get_suptitle()
    assert "image 0 (ship)" in figs["feature_maps_ship.png"].get_suptitle()  # the first ship, not any ship


def test_wide_layers_wrap_onto_more_rows() -> None:
    net = model(ModelParams(arch="cnn", activation="tanh", hidden=(4,), channels=(20,), kernel_size=3, padding=1, pool=2))
    maps = conv_views.feature_maps(net, torch.zeros(1, 3, 32, 32))
    fig = conv_views.feature_map_figure(np.zeros((3, 32, 32), np.uint8), maps, "t")
    assert image_axes(fig) == 1 + 40
    assert len(fig.axes) == 5 * 16  # input row + two rows for each 20-map stage, 16 wide


def test_changed_channels_still_visualize() -> None:
    net = model(WIDE)
    figs = conv_views.figures(net, meta(), synthetic_split())
    assert image_axes(figs["kernels.png"]) == 4
    assert image_axes(figs["feature_maps_airplane.png"]) == 1 + 2 * (4 + 6 + 5)


# --- bad inputs --------------------------------------------------------------------------------------------------

def test_fc_checkpoint_is_refused_with_one_line() -> None:
    fc_meta = CheckpointMeta(FC, CLASSES, STATS, (0,))
    with pytest.raises(StageError, match=r"visualize needs a conv model; fc.pt holds arch=fc"):
        conv_views.require_convnet(model(FC), fc_meta, "fc.pt")


def test_missing_class_and_mismatched_classes_are_refused() -> None:
    split = synthetic_split()
    no_cars = Split(split.images, np.where(split.labels == 1, 0, split.labels), CLASSES, "0" * 32)
    with pytest.raises(StageError, match="no image of class automobile"):
        conv_views.first_of_each_class(no_cars, CLASSES)
    with pytest.raises(StageError, match="differ from the checkpoint"):
        conv_views.first_of_each_class(split, ("cat", "dog", "ship"))
    assert conv_views.first_of_each_class(split, CLASSES) == {"airplane": 1, "automobile": 3, "ship": 0}

"""The visualize stage: kernels, feature maps, hand-made filters, and its MLflow logging."""

from __future__ import annotations

import json
import random
import sys
from collections.abc import Iterator
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from matplotlib.figure import Figure
from mlflow.tracking import MlflowClient
from torch import nn

from stages import tracking, visualize
from stages.common import StageError
from stages.datasets import Split
from stages.models import build_model, conv_output_size, save_checkpoint
from stages.params import ModelParams

REPO = Path(__file__).resolve().parents[1]
CLASSES = ("airplane", "automobile", "ship")
CNN = ModelParams(arch="cnn", activation="tanh", hidden=(32,), channels=(16, 8), kernel_size=3, padding=1, pool=2)
WIDE = ModelParams(arch="cnn", activation="relu", hidden=(16,), channels=(4, 6, 5), kernel_size=5, padding=2, pool=2)
FC = ModelParams(arch="fc", activation="tanh", hidden=(8,))
MEAN, STD = [0.5, 0.5, 0.5], [0.25, 0.25, 0.25]


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


def meta() -> dict:
    return {"classes": list(CLASSES), "mean": MEAN, "std": STD, "config": {"arch": "cnn"}}


# --- conv arithmetic ---------------------------------------------------------------------------------------------

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


# --- hand-made kernels -------------------------------------------------------------------------------------------

def step_image(side: int = 16) -> np.ndarray:
    img = np.zeros((side, side), dtype=np.float32)
    img[:, side // 2:] = 1.0
    return img


def test_vertical_edge_responds_only_along_a_vertical_step() -> None:
    response = visualize.apply_kernel(step_image(), visualize.edge_kernels()["vertical edge"])
    inner = response[:, 1:-1]  # the zero-padded border columns see a fake edge
    active = sorted({int(c) + 1 for c in np.nonzero(inner)[1]})
    assert active == [7, 8]  # the columns either side of the step at 7|8
    assert (response[:, 7:9] > 0).all()  # dark-to-bright left to right is positive


def test_horizontal_edge_ignores_a_vertical_step_and_finds_a_horizontal_one() -> None:
    kernel = visualize.edge_kernels()["horizontal edge"]
    assert not visualize.apply_kernel(step_image(), kernel)[1:-1, 1:-1].any()
    active = sorted({int(r) + 1 for r in np.nonzero(visualize.apply_kernel(step_image().T, kernel)[1:-1, :])[0]})
    assert active == [7, 8]


def test_blur_keeps_a_flat_image_flat_and_kernel_set_is_as_documented() -> None:
    kernels = visualize.edge_kernels()
    out = visualize.apply_kernel(np.full((8, 8), 0.7, dtype=np.float32), kernels["blur"])
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
    maps = visualize.feature_maps(net, x)
    assert len(maps) == 2 * len(cfg.channels)
    assert [m.shape[0] for m in maps.values()] == [c for c in cfg.channels for _ in range(2)]
    last = next(reversed(maps.values()))
    with torch.no_grad():  # conv -> act -> pool must give exactly what the model's pool_first forward feeds on
        torch.testing.assert_close(net.classifier(last.flatten()[None]), net(x), rtol=0, atol=1e-6)


@pytest.mark.parametrize("cfg", [CNN, WIDE])
def test_figure_grids_have_one_image_per_map(cfg: ModelParams) -> None:
    net, split = model(cfg), synthetic_split()
    figs = visualize.figures(net, meta(), split)
    assert sorted(figs) == ["edge_kernels.png", "feature_maps_airplane.png", "feature_maps_automobile.png",
                            "feature_maps_ship.png", "kernels.png"]
    assert image_axes(figs["kernels.png"]) == cfg.channels[0]
    assert image_axes(figs["feature_maps_ship.png"]) == 1 + 2 * sum(cfg.channels)
    assert image_axes(figs["edge_kernels.png"]) == 2 * (1 + len(visualize.edge_kernels()))
    assert "convs.0" in figs["kernels.png"].get_suptitle()
    assert f"{cfg.channels[0]} learned kernels" in figs["kernels.png"].get_suptitle()
    assert "image 0 (ship)" in figs["feature_maps_ship.png"].get_suptitle()  # the first ship, not any ship


def test_wide_layers_wrap_onto_more_rows() -> None:
    net = model(ModelParams(arch="cnn", activation="tanh", hidden=(4,), channels=(20,), kernel_size=3, padding=1, pool=2))
    maps = visualize.feature_maps(net, torch.zeros(1, 3, 32, 32))
    fig = visualize.feature_map_figure(np.zeros((3, 32, 32), np.uint8), maps, "t")
    assert image_axes(fig) == 1 + 40
    assert len(fig.axes) == 5 * 16  # input row + two rows for each 20-map stage, 16 wide


def test_changed_channels_train_one_step_and_still_visualize() -> None:
    net = model(WIDE).train()
    before = [p.detach().clone() for p in net.parameters()]
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    loss = nn.functional.cross_entropy(net(torch.randn(8, 3, 32, 32)), torch.randint(0, 3, (8,)))
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss)
    assert all(not torch.equal(a, b) for a, b in zip(before, net.parameters(), strict=True))
    figs = visualize.figures(net.eval(), meta(), synthetic_split())
    assert image_axes(figs["kernels.png"]) == 4
    assert image_axes(figs["feature_maps_airplane.png"]) == 1 + 2 * (4 + 6 + 5)


# --- bad inputs --------------------------------------------------------------------------------------------------

def test_fc_checkpoint_is_refused_with_one_line() -> None:
    with pytest.raises(StageError, match=r"visualize needs a conv model; .*arch=fc"):
        visualize.require_convnet(model(FC), {"config": {"arch": "fc"}}, Path("fc.pt"))


def test_missing_class_and_mismatched_classes_are_refused() -> None:
    split = synthetic_split()
    no_cars = Split(split.images, np.where(split.labels == 1, 0, split.labels), CLASSES, "0" * 32)
    with pytest.raises(StageError, match="no image of class automobile"):
        visualize.first_of_each_class(no_cars, list(CLASSES))
    with pytest.raises(StageError, match="differ from the checkpoint"):
        visualize.first_of_each_class(split, ["cat", "dog", "ship"])
    assert visualize.first_of_each_class(split, list(CLASSES)) == {"airplane": 1, "automobile": 3, "ship": 0}


def test_run_info_without_run_id_is_refused(tmp_path: Path) -> None:
    (tmp_path / "run.json").write_text("{}")
    with pytest.raises(StageError, match="lacks run_id"):
        tracking.read_run_info(tmp_path / "run.json")


# --- the stage end to end ----------------------------------------------------------------------------------------

@pytest.fixture
def mlflow_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A throwaway SQLite store; cwd is tmp_path so its ./mlruns artifacts land there too."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    yield tracking.connect({"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}, tmp_path, "cifar3")
    mlflow.set_tracking_uri(None)  # the module-level URI would otherwise outlive this store


def write_inputs(tmp_path: Path, cfg: ModelParams, run_id: str) -> list[str]:
    split = synthetic_split()
    np.savez(tmp_path / "val.npz", images=split.images, labels=split.labels, classes=np.array(CLASSES),
             source_md5=np.array("0" * 32))
    save_checkpoint(tmp_path / "net.pt", model(cfg), cfg, CLASSES, MEAN, STD)
    (tmp_path / "run.json").write_text(json.dumps({"run_id": run_id}))
    return ["visualize", "--checkpoint", str(tmp_path / "net.pt"), "--val", str(tmp_path / "val.npz"),
            "--run-info", str(tmp_path / "run.json"), "--params", str(REPO / "params.yaml"),
            "--out-dir", str(tmp_path / "plots")]


def test_main_writes_pngs_and_logs_them_to_the_run(tmp_path: Path, mlflow_store: str,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    with tracking.run(mlflow_store) as active:
        run_id = active.info.run_id
    monkeypatch.setattr(sys, "argv", write_inputs(tmp_path, CNN, run_id))
    visualize.main()
    names = sorted(p.name for p in (tmp_path / "plots").iterdir())
    assert names == ["edge_kernels.png", "feature_maps_airplane.png", "feature_maps_automobile.png",
                     "feature_maps_ship.png", "kernels.png"]
    assert all((tmp_path / "plots" / n).read_bytes().startswith(b"\x89PNG") for n in names)
    logged = MlflowClient().list_artifacts(run_id, "visualize")
    assert sorted(a.path for a in logged) == [f"visualize/{n}" for n in names]
    assert MlflowClient().get_run(run_id).info.status == "FINISHED"


def test_main_refuses_an_fc_checkpoint_before_touching_mlflow(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    # A store that cannot open: reaching MLflow first would fail with another message.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'missing' / 'mlflow.db'}")
    monkeypatch.setattr(sys, "argv", write_inputs(tmp_path, FC, "0" * 32))
    with pytest.raises(StageError, match="visualize needs a conv model"):
        visualize.main()
    assert not (tmp_path / "plots").exists()

"""Architectures, the training loop and checkpoints, on small in-memory data."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from sklearn.metrics import accuracy_score

from stages.common import StageError
from stages.evaluate import summarize
from stages.models import build_model, count_params, load_checkpoint, predict, save_checkpoint
from stages.params import ModelParams, TrainParams
from stages.runtime import set_seed
from stages.train import fit

FC = ModelParams(arch="fc", activation="tanh", hidden=(1024, 512, 128))
CNN = ModelParams(arch="cnn", activation="tanh", hidden=(32,), channels=(16, 8), kernel_size=3, padding=1, pool=2)
TRAIN = TrainParams(device="cpu", epochs=3, batch_size=16, lr=0.05, momentum=0.0, weight_decay=0.0, seed=0,
                    deterministic=True, channels_last=True, tf32=False)


@pytest.mark.parametrize(("cfg", "classes", "expected"), [
    (FC, 3, 3_737_603), (CNN, 3, 18_123), (FC, 10, 3_738_506), (CNN, 10, 18_354),
])
def test_reference_parameter_counts(cfg: ModelParams, classes: int, expected: int) -> None:
    assert count_params(build_model(cfg, classes)) == expected


@pytest.mark.parametrize("cfg", [FC, CNN])
@pytest.mark.parametrize("batch", [1, 64])
def test_forward_shapes(cfg: ModelParams, batch: int) -> None:
    assert build_model(cfg, 3)(torch.randn(batch, 3, 32, 32)).shape == (batch, 3)


def separable(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Three classes told apart by which channel is bright."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 3, (n,), generator=g)
    x = torch.randn(n, 3, 32, 32, generator=g) * 0.5
    x[torch.arange(n), y] += 1.0
    return x, y


@pytest.mark.parametrize("cfg", [FC, CNN])
def test_loss_falls_on_separable_data(cfg: ModelParams) -> None:
    set_seed(0, True)
    model = build_model(cfg, 3)
    history = fit(model, separable(96, 1), separable(48, 2), TRAIN, eval_batch=32)
    assert history[-1]["train_loss"] < 0.7 * history[0]["train_loss"]
    assert history[-1]["val_acc"] > 0.8
    assert [row["epoch"] for row in history] == [1, 2, 3]


def train_once(cfg: ModelParams) -> dict[str, torch.Tensor]:
    set_seed(TRAIN.seed, True)
    model = build_model(cfg, 3)
    fit(model, separable(64, 1), separable(32, 2), dataclasses.replace(TRAIN, epochs=2), eval_batch=32)
    return model.state_dict()


@pytest.mark.parametrize("cfg", [CNN, dataclasses.replace(FC, hidden=(64,))])
def test_two_cpu_runs_are_bitwise_identical(cfg: ModelParams) -> None:
    first, second = train_once(cfg), train_once(cfg)
    assert first.keys() == second.keys()
    for key in first:
        assert torch.equal(first[key], second[key]), key


def test_checkpoint_round_trip(tmp_path: Path) -> None:
    model = build_model(CNN, 3)
    model.to(memory_format=torch.channels_last)  # as trained: still loads into a plain model
    path = tmp_path / "cnn.pt"
    save_checkpoint(path, model, CNN, ("airplane", "automobile", "ship"), [0.5] * 3, [0.25] * 3)
    rebuilt, meta = load_checkpoint(path)
    x = torch.randn(5, 3, 32, 32)
    assert torch.equal(rebuilt(x), model.eval()(x))
    assert meta["classes"] == ["airplane", "automobile", "ship"] and meta["mean"] == [0.5] * 3
    assert list(torch.load(path, weights_only=True)["config"]["channels"]) == [16, 8]
    assert [p.name for p in tmp_path.iterdir()] == ["cnn.pt"]  # no temp file left


def test_interrupted_save_leaves_no_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_save = torch.save

    def save_then_interrupt(obj: object, f: object) -> None:
        real_save(obj, f)  # the temp file is complete on disk when Ctrl-C lands
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", save_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path / "x.pt", build_model(CNN, 3), CNN, ("a", "b", "c"), [0.0] * 3, [1.0] * 3)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("content", [b"not a checkpoint", None])
def test_foreign_checkpoint_is_one_line_error(tmp_path: Path, content: bytes | None) -> None:
    path = tmp_path / "x.pt"
    if content is None:
        torch.save({"state_dict": {}, "config": {"arch": "fc"}}, path)  # loads, but is not ours
    else:
        path.write_bytes(content)
    with pytest.raises(StageError, match="is not a checkpoint of this project"):
        load_checkpoint(path)


def test_accuracy_matches_sklearn() -> None:
    x, y = separable(50, 3)
    model = build_model(CNN, 3)
    pred = predict(model, x, 7).argmax(1).numpy()
    metrics = summarize((y.numpy(), pred), (y.numpy()[:20], pred[:20]), 18_123,
                        {"seconds_per_epoch": 1.0, "images_per_second": 50.0})
    assert metrics["train_acc"] == pytest.approx(accuracy_score(y.numpy(), pred))
    assert metrics["val_acc"] == pytest.approx(accuracy_score(y.numpy()[:20], pred[:20]))
    assert metrics["gap"] == pytest.approx(metrics["train_acc"] - metrics["val_acc"])

"""Checkpoints: what is saved is what loads, typed; foreign or interrupted files fail cleanly."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import pytest
import torch

from cifar3study.data.dataset import ChannelStats
from cifar3study.errors import StageError
from cifar3study.params import ModelParams
from cifar3study.training.checkpoint import (
    CheckpointMeta,
    build_models,
    load_checkpoint,
    read_checkpoint,
    save_checkpoint,
)
from cifar3study.training.models import build_model
from tests.helpers import CIFAR3_CLASSES

CNN = ModelParams(arch="cnn", activation="tanh", hidden=(32,), channels=(16, 8), kernel_size=3, padding=1, pool=2)
META = CheckpointMeta(CNN, CIFAR3_CLASSES, ChannelStats((0.5,) * 3, (0.25,) * 3), (0, 7))


def group() -> list[torch.nn.Module]:
    models = []
    for seed in META.seeds:
        torch.manual_seed(seed)
        models.append(build_model(CNN, 3).to(memory_format=torch.channels_last))  # as trained
    return models


def test_round_trip_of_a_channels_last_seed_group(tmp_path: Path) -> None:
    """Each seed's weights come back bitwise, by seed; logits agree to float rounding (NCHW and NHWC kernels differ)."""
    models = group()
    path = tmp_path / "cnn.pt"
    save_checkpoint(path, models, META)
    rebuilt, meta = load_checkpoint(path, CNN)
    assert meta == META and list(rebuilt) == [0, 7]
    for model, seed in zip(models, META.seeds, strict=True):
        for (key, saved), loaded in zip(model.state_dict().items(), rebuilt[seed].state_dict().values(), strict=True):
            assert torch.equal(saved, loaded), key
        x = torch.randn(5, 3, 32, 32)
        torch.testing.assert_close(rebuilt[seed](x), model.eval()(x), rtol=0, atol=1e-6)
        assert not rebuilt[seed].training
    assert [p.name for p in tmp_path.iterdir()] == ["cnn.pt"]  # no temp file left


def test_interrupted_save_leaves_no_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_save = torch.save

    def save_then_interrupt(obj: object, f: object) -> None:
        real_save(obj, f)  # the temp file is complete on disk when Ctrl-C lands
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", save_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path / "x.pt", group(), META)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("content", [b"not a checkpoint", {"state_dict": {}, "config": {"arch": "fc"}},
                                     {"format": 1, "state_dict": {}}])
def test_foreign_or_old_checkpoint_is_one_line_error(tmp_path: Path, content: object) -> None:
    path = tmp_path / "x.pt"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        torch.save(content, path)  # loads, but is not a seed-group checkpoint of ours
    with pytest.raises(StageError, match="is not a checkpoint of this project"):
        load_checkpoint(path, CNN)


@pytest.mark.parametrize("expected", [dataclasses.replace(CNN, channels=(8, 8)),
                                      ModelParams(arch="fc", activation="tanh", hidden=(1024, 512, 128))])
def test_another_architecture_is_refused_in_one_line(tmp_path: Path, expected: ModelParams) -> None:
    """A checkpoint read as some other models entry: the file, both settings and the fix, before any model is built."""
    path = tmp_path / "cnn.pt"
    save_checkpoint(path, group(), META)
    with pytest.raises(StageError) as err:
        load_checkpoint(path, expected, "fc")
    message = str(err.value)
    assert message.startswith(f"{path} holds a model with ") and "channels=[16, 8]" in message
    assert "params.yaml's models.fc says" in message and "train@fc" in message and "\n" not in message
    assert "activation" not in message  # only what differs


def test_name_defaults_to_the_file_stem(tmp_path: Path) -> None:
    path = tmp_path / "cnn.pt"
    save_checkpoint(path, group(), META)
    with pytest.raises(StageError, match=r"models\.cnn says channels=\[4, 4\]; .*train@cnn"):
        load_checkpoint(path, dataclasses.replace(CNN, channels=(4, 4)))


@pytest.mark.parametrize("damage", ["truncated", "pickle"])
def test_an_unloadable_file_is_refused_in_our_words(tmp_path: Path, damage: str) -> None:
    """torch's own refusal ran to 373-388 characters ending in advice to load with weights_only=False, the unsafe
    action for exactly these files (issue 25): one short line, no such advice."""
    path = tmp_path / "cnn.pt"
    if damage == "truncated":
        save_checkpoint(path, group(), META)
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    else:
        torch.save({"format": 2, "config": argparse.Namespace(arch="cnn")}, path)  # an object beyond tensors
    with pytest.raises(StageError) as refused:
        load_checkpoint(path, CNN)
    message = str(refused.value)
    assert message.startswith(f"{path} is not a checkpoint of this project (unreadable: cut short, ")
    assert "weights_only" not in message and "trust" not in message and "train@cnn" in message
    assert len(message) - len(str(path)) < 200 and "\n" not in message


def test_read_checkpoint_checks_the_config_without_building_models(tmp_path: Path) -> None:
    path = tmp_path / "cnn.pt"
    save_checkpoint(path, group(), META)
    checkpoint = read_checkpoint(path, CNN)
    assert checkpoint.meta == META and len(checkpoint.states) == 2
    assert list(build_models(checkpoint)) == [0, 7]
    with pytest.raises(StageError, match=r"params\.yaml's models\.fc says"):
        read_checkpoint(path, ModelParams(arch="fc", activation="tanh", hidden=(8,)), "fc")


def test_the_holdout_is_saved_only_when_there_is_one(tmp_path: Path) -> None:
    """Without one the payload holds exactly the keys it always held; with one, (fraction, seed) come back."""
    save_checkpoint(tmp_path / "plain.pt", group(), META)
    assert list(torch.load(tmp_path / "plain.pt", weights_only=True)) == [
        "format", "config", "classes", "mean", "std", "seeds", "states"]
    held = dataclasses.replace(META, holdout=(0.2, 3))
    save_checkpoint(tmp_path / "held.pt", group(), held)
    assert read_checkpoint(tmp_path / "held.pt", CNN).meta == held and load_checkpoint(tmp_path / "plain.pt", CNN)[1] == META

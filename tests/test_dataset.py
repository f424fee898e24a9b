"""The split and stats files: what is written is what is read, and bad files fail in one line."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch

from cifar3study.data.dataset import ChannelStats, Split, channel_stats, read_split, read_stats, write_split, write_stats
from cifar3study.errors import StageError
from cifar3study.training.models import normalize
from tests.helpers import CIFAR3_CLASSES


def random_images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, 3, 32, 32), dtype=np.uint8)


def test_split_round_trip_loads_without_pickle(tmp_path: Path) -> None:
    split = Split(random_images(12), np.arange(12, dtype=np.int64) % 3, CIFAR3_CLASSES, "a" * 32)
    write_split(tmp_path / "val.npz", split)
    with np.load(tmp_path / "val.npz", allow_pickle=False) as z:
        assert sorted(z.files) == ["classes", "images", "labels", "source_md5"]
    back = read_split(tmp_path / "val.npz")
    assert np.array_equal(back.images, split.images) and back.images.dtype == np.uint8
    assert np.array_equal(back.labels, split.labels) and back.labels.dtype == np.int64
    assert back.classes == CIFAR3_CLASSES and back.source_md5 == "a" * 32
    assert [p.name for p in tmp_path.iterdir()] == ["val.npz"]  # no temporary left


@pytest.mark.parametrize("content", [b"not a zip", None])
def test_unreadable_split_is_one_line(tmp_path: Path, content: bytes | None) -> None:
    path = tmp_path / "train.npz"
    if content is None:
        np.savez(path, images=random_images(2))  # a valid npz without labels
    else:
        path.write_bytes(content)
    with pytest.raises(StageError, match="rerun `dvc repro cifar3`"):
        read_split(path)


def test_channel_stats_match_numpy() -> None:
    images = random_images(50)
    images[:, 1] //= 2  # channels must differ, so a channel mix-up shows
    images[:, 2] = images[:, 2] // 4 + 128
    stats = channel_stats(images)
    x = images / 255.0
    np.testing.assert_allclose(stats.mean, x.mean(axis=(0, 2, 3)), rtol=0, atol=1e-9)
    np.testing.assert_allclose(stats.std, x.std(axis=(0, 2, 3), ddof=1), rtol=0, atol=1e-9)


def test_constant_images_have_zero_std_and_exact_mean() -> None:
    stats = channel_stats(np.full((4, 3, 8, 8), 51, dtype=np.uint8))
    np.testing.assert_allclose(stats.mean, [0.2] * 3, atol=1e-12)
    np.testing.assert_allclose(stats.std, [0.0] * 3, atol=1e-12)


def test_stats_round_trip_and_bad_file(tmp_path: Path) -> None:
    stats = ChannelStats((0.1, 0.2, 0.3), (0.4, 0.5, 0.6))
    write_stats(tmp_path / "stats.json", stats)
    assert read_stats(tmp_path / "stats.json") == stats
    (tmp_path / "bad.json").write_text('{"mean": [1, 2, 3]}')
    with pytest.raises(StageError, match="rerun `dvc repro stats`"):
        read_stats(tmp_path / "bad.json")


def test_normalize_is_totensor_then_normalize() -> None:
    images = random_images(3)
    stats = ChannelStats((0.5, 0.4, 0.3), (0.2, 0.25, 0.3))
    x = normalize(images, stats, torch.device("cpu"))
    ref = (images / 255.0 - np.array(stats.mean)[:, None, None]) / np.array(stats.std)[:, None, None]
    assert x.dtype == torch.float32
    np.testing.assert_allclose(x.numpy(), ref, rtol=0, atol=1e-6)


@pytest.mark.parametrize(("labels", "needle"), [
    (np.array([0, 1, 0, 1]), "no image of class 'ship'"),
    (np.array([0, 1, 2, 3]), "labels span 0..3, not 0..2"),
    (np.array([0, 1, 2], dtype=np.int64), "not int64 of length 4"),
])
def test_split_that_cannot_train_is_refused(tmp_path: Path, labels: np.ndarray, needle: str) -> None:
    split = Split(random_images(4), labels.astype(np.int64), CIFAR3_CLASSES, "0" * 32)
    write_split(tmp_path / "train.npz", split)
    with pytest.raises(StageError, match=re.escape(needle)):
        read_split(tmp_path / "train.npz")

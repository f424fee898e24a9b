"""The split and stats files: what is written is what is read, and bad files fail in one line."""

from __future__ import annotations

import io
import re
import tracemalloc
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from cifar3study.data.dataset import (
    ChannelStats,
    Split,
    carve_holdout,
    channel_stats,
    holdout_count,
    read_split,
    read_stats,
    training_splits,
    write_split,
    write_stats,
)
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


def npz_with_headers(path: Path, headers: dict[str, tuple[str, tuple[int, ...]]]) -> Path:
    """An .npz whose members hold only an .npy header (dtype, shape) and a few bytes: what a hostile file can claim."""
    with zipfile.ZipFile(path, "w") as z:
        for name, (descr, shape) in headers.items():
            header = io.BytesIO()
            np.lib.format.write_array_header_1_0(header, {"descr": descr, "fortran_order": False, "shape": shape})
            z.writestr(f"{name}.npy", header.getvalue() + b"\0" * 64)
    return path


VALID_HEADERS = {"images": ("|u1", (4, 3, 32, 32)), "labels": ("<i8", (4,)), "classes": ("<U10", (3,)),
                 "source_md5": ("<U32", ())}


@pytest.mark.parametrize(("change", "needle"), [
    # 3e15 images' worth of bytes: np.load died allocating them, `unexpected MemoryError` (issue 25)
    ({"images": ("|u1", (100_000_000_000, 3, 32, 32))}, "images declared uint8 (100000000000, 3, 32, 32), not uint8"),
    ({"images": ("|u1", (60_001, 3, 32, 32))}, "with N 1 to 60,000"),
    ({"images": ("<f8", (4, 3, 32, 32))}, "images declared float64"),
    ({"labels": ("<i8", (10**15,))}, "labels declared int64 (1000000000000000,), not int64 of length 4"),
    ({"classes": ("<U10", (10**12,))}, "classes declared <U10 (1000000000000,), not 1 to 10 short names"),
    ({"classes": ("<U1000000", (3,))}, "classes declared <U1000000 (3,), not 1 to 10 short names"),
    ({"source_md5": ("<U32", (10**9,))}, "source_md5 declared <U32 (1000000000,), not one MD5"),
])
def test_a_split_declaring_what_no_split_holds_is_refused_unread(tmp_path: Path, change: dict, needle: str) -> None:
    path = npz_with_headers(tmp_path / "train.npz", {**VALID_HEADERS, **change})
    tracemalloc.start()
    try:
        with pytest.raises(StageError, match=re.escape(needle)) as refused:
            read_split(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20 and len(str(refused.value)) < 400 and "rerun `dvc repro cifar3`" in str(refused.value)


def test_a_split_with_other_members_is_refused(tmp_path: Path) -> None:
    path = npz_with_headers(tmp_path / "train.npz", {**VALID_HEADERS, "extra": ("|u1", (1,))})
    with pytest.raises(StageError, match=r"cannot read split .*members .*expected images\.npy"):
        read_split(path)


def numbered_split(per_class: tuple[int, ...]) -> Split:
    """Images that carry their own index (pixel [0, 0, 0] and [0, 0, 1]), labels shuffled across classes."""
    labels = np.random.default_rng(5).permutation(np.repeat(np.arange(len(per_class)), per_class)).astype(np.int64)
    images = np.zeros((len(labels), 3, 32, 32), dtype=np.uint8)
    images[:, 0, 0, 0], images[:, 0, 0, 1] = np.arange(len(labels)) // 256, np.arange(len(labels)) % 256
    return Split(images, labels, CIFAR3_CLASSES, "a" * 32)


def ids(split: Split) -> np.ndarray:
    return split.images[:, 0, 0, 0].astype(int) * 256 + split.images[:, 0, 0, 1]


def test_carve_holdout_is_stratified_disjoint_and_covers_the_split() -> None:
    split = numbered_split((40, 41, 19))
    rest, held = carve_holdout(split, 0.2, seed=3)
    assert np.bincount(held.labels).tolist() == [8, 8, 4] and np.bincount(rest.labels).tolist() == [32, 33, 15]
    assert not set(ids(rest)) & set(ids(held))
    assert sorted([*ids(rest), *ids(held)]) == list(range(100))
    for part in (rest, held):  # each image keeps its label, each part the split's order
        assert np.array_equal(part.labels, split.labels[ids(part)]) and (np.diff(ids(part)) > 0).all()
        assert part.classes == split.classes and part.source_md5 == split.source_md5


def test_carve_holdout_is_deterministic_in_fraction_and_seed() -> None:
    split = numbered_split((40, 40, 40))
    first, again = carve_holdout(split, 0.25, 7)[1], carve_holdout(split, 0.25, 7)[1]
    assert np.array_equal(ids(first), ids(again)) and np.array_equal(first.images, again.images)
    assert not np.array_equal(ids(first), ids(carve_holdout(split, 0.25, 8)[1]))
    assert len(carve_holdout(split, 0.5, 7)[1].labels) == 60 and holdout_count(40, 0.25) == 10


def test_with_a_holdout_the_validation_file_is_never_opened(tmp_path: Path) -> None:
    write_split(tmp_path / "train.npz", numbered_split((10, 10, 10)))
    train, name, evaluated = training_splits(tmp_path / "train.npz", tmp_path / "no such val.npz", 0.2, 0)
    assert name == "holdout" and len(train.labels) == 24 and len(evaluated.labels) == 6
    with pytest.raises(StageError, match=r"cannot read split .*no such val\.npz"):
        training_splits(tmp_path / "train.npz", tmp_path / "no such val.npz", 0.0, 0)

"""The CIFAR-10 archive: unsafe members refused, batches read safely, kept classes relabelled in order."""

from __future__ import annotations

import io
import pickle
import re
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest

from cifar3study.data.archive import build_splits, read_batches, unpickle, verify
from cifar3study.errors import StageError
from tests.helpers import CIFAR10_CLASSES, archive_files, write_archive
from tests.test_safe_pickle import evil_pickles

TRAIN = [f"data_batch_{i}" for i in range(1, 6)]


def test_code_payload_in_archive_is_refused_unrun(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "archive.tar.gz"
    md5 = write_archive(path, {**archive_files(), "data_batch_3": evil_pickles(marker)[0]})
    with pytest.raises(StageError, match="data_batch_3 is not a valid CIFAR batch"):
        build_splits(read_batches(path), ("airplane", "ship"), md5)
    assert not marker.exists()


def test_verify_refuses_a_wrong_md5_and_a_missing_file(archive, tmp_path: Path) -> None:
    verify(archive[0], archive[1])
    with pytest.raises(StageError, match="expected " + "0" * 32):
        verify(archive[0], "0" * 32)
    with pytest.raises(StageError, match="does not exist"):
        verify(tmp_path / "nope.tar.gz", archive[1])


def member(name: str, kind: bytes = tarfile.REGTYPE, size: int = 3, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.size, info.linkname = kind, size if kind == tarfile.REGTYPE else 0, link
    return info


@pytest.mark.parametrize("extra", [
    member("../evil"),
    member("cifar-10-batches-py/../../evil"),
    member("/tmp/evil"),
    member("cifar-10-batches-py/link", tarfile.SYMTYPE, link="/etc/passwd"),
    member("cifar-10-batches-py/hard", tarfile.LNKTYPE, link="cifar-10-batches-py/batches.meta"),
    member("cifar-10-batches-py/dev", tarfile.CHRTYPE),
    member("cifar-10-batches-py/fifo", tarfile.FIFOTYPE),
], ids=["dotdot", "nested-dotdot", "absolute", "symlink", "hardlink", "device", "fifo"])
def test_unsafe_members_are_refused(tmp_path: Path, extra: tarfile.TarInfo) -> None:
    path = tmp_path / "archive.tar.gz"
    write_archive(path, archive_files(), extra=[extra])
    with pytest.raises(StageError, match="refusing the archive"):
        read_batches(path)
    assert not (tmp_path / "evil").exists()


def test_missing_batch_is_refused(tmp_path: Path) -> None:
    files = archive_files()
    del files["data_batch_4"]
    path = tmp_path / "archive.tar.gz"
    write_archive(path, files)
    with pytest.raises(StageError, match="lacks cifar-10-batches-py/data_batch_4"):
        read_batches(path)


def expected_split(batches: list[str], classes: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Reference selection straight from the source batches, with plain pickle (they are ours)."""
    files = archive_files()
    parts = [pickle.loads(files[name], encoding="latin1") for name in batches]
    data = np.concatenate([p["data"] for p in parts]).reshape(-1, 3, 32, 32)
    labels = np.concatenate([p["labels"] for p in parts])
    originals = [CIFAR10_CLASSES.index(c) for c in classes]
    keep = np.isin(labels, originals)
    return data[keep], np.array([originals.index(label) for label in labels[keep]])


def test_classes_selected_by_name_and_relabelled_in_order(archive) -> None:
    classes = ("ship", "airplane")
    splits = build_splits(read_batches(archive[0]), classes, archive[1])
    for split, batches in (("train", TRAIN), ("val", ["test_batch"])):
        images, labels = splits[split].images, splits[split].labels
        assert splits[split].classes == classes and splits[split].source_md5 == archive[1]
        ref_images, ref_labels = expected_split(batches, classes)
        assert np.bincount(labels).tolist() == [4 * len(batches)] * 2  # 4 images per class per batch
        assert np.array_equal(labels, ref_labels) and np.array_equal(images, ref_images)
        assert images.dtype == np.uint8 and images.shape == (8 * len(batches), 3, 32, 32) and labels.dtype == np.int64


def test_unknown_class_is_named(archive) -> None:
    with pytest.raises(StageError, match="unknown class 'zebra'"):
        build_splits(read_batches(archive[0]), ("airplane", "zebra"), archive[1])


class Zeros(io.RawIOBase):
    """`size` zero bytes, streamed: a bomb's payload without holding it in memory."""

    def __init__(self, size: int) -> None:
        self.left = size

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:
        n = min(len(buffer), self.left)
        buffer[:n] = b"\0" * n
        self.left -= n
        return n


def bomb(path: Path, member_size: int) -> None:
    """A valid archive whose data_batch_1 is `member_size` zero bytes; compresses ~1000:1."""
    files = archive_files()
    with tarfile.open(path, "w:gz", compresslevel=1) as tar:
        for name, blob in files.items():
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = member_size if name == "data_batch_1" else len(blob)
            tar.addfile(info, Zeros(member_size) if name == "data_batch_1" else io.BytesIO(blob))


def test_compression_bomb_is_refused_before_it_is_read(tmp_path: Path) -> None:
    path = tmp_path / "bomb.tar.gz"
    bomb(path, 1 << 30)  # 1 GiB of zeros in a file of about 1 MB
    assert path.stat().st_size < 8 << 20
    start = time.monotonic()
    with pytest.raises(StageError, match="declares 1,073,741,824 bytes, more than a CIFAR batch"):
        read_batches(path)
    assert time.monotonic() - start < 10  # refused from the header, not after inflating the gigabyte


def test_archive_with_too_many_members_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "many.tar.gz"
    write_archive(path, archive_files(), extra=[member(f"cifar-10-batches-py/x{i}") for i in range(20)])
    with pytest.raises(StageError, match="more than 16 members"):
        read_batches(path)


def test_pickle_that_expands_by_reference_is_refused_unbuilt() -> None:
    """20 MB of memo references would become a list of 10 million items: refused by its opcode count."""
    shared = [0]
    blob = pickle.dumps({"data": np.zeros((1, 3072), np.uint8), "labels": [shared] * 10_000_000}, protocol=2)
    assert len(blob) < 32 << 20
    with pytest.raises(StageError, match="more than 100,000 pickle operations"):
        unpickle(blob, "data_batch_1")


def meta_with(names: list[str]) -> bytes:
    return pickle.dumps({"label_names": names}, protocol=2)


def batch_with_labels(labels: list[int]) -> bytes:
    return pickle.dumps({"data": np.zeros((len(labels), 3072), np.uint8), "labels": labels}, protocol=2)


@pytest.mark.parametrize(("replace", "needle"), [
    ({"batches.meta": meta_with(["airplane", "automobile", "ship", "ship", *CIFAR10_CLASSES[3:8]])},
     "names class 'ship' more than once"),
    ({"data_batch_2": batch_with_labels([0, 1, 10])}, "label 10 is outside 0..9"),
    ({"data_batch_2": batch_with_labels([0, -1])}, "label -1 is outside 0..9"),
    ({"test_batch": batch_with_labels([0, 1, 3, 4])}, "the val batches hold no image of class 'ship'"),
    ({"data_batch_2": batch_with_labels([0] * 10_001)}, "at most 10,000 each"),
    ({"data_batch_2": pickle.dumps({"data": np.zeros((2, 3072), np.uint8), "labels": [0, "1"]}, protocol=2)},
     "'labels' are not integers"),
])
def test_well_formed_but_wrong_data_is_one_line(replace: dict, needle: str) -> None:
    with pytest.raises(StageError, match=re.escape(needle)):
        build_splits({**archive_files(), **replace}, ("airplane", "automobile", "ship"), "0" * 32)

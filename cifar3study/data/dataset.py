"""The CIFAR-3 split files and their channel statistics: one writer and one reader each.

A split is an .npz of uint8 images (N x 3 x 32 x 32), int64 labels 0..k-1,
the class names in label order, and the MD5 of the archive it came from;
it loads with allow_pickle=False, once each member's .npy header has shown
shapes and types a CIFAR-10 split can have (a header may claim petabytes). The stats file is JSON: per-channel mean
and sample std of the training images scaled to [0, 1].
"""

from __future__ import annotations

import dataclasses
import json
import zipfile
from pathlib import Path

import numpy as np

from cifar3study.data.cifar10_format import IMAGES_PER_BATCH, MAX_CLASS_NAME, NUM_CLASSES, TRAIN_BATCHES
from cifar3study.errors import StageError, one_line, quote
from cifar3study.files import atomic_path, write_json_atomic

MAX_IMAGES = IMAGES_PER_BATCH * (len(TRAIN_BATCHES) + 1)  # all of CIFAR-10, training and test batches
MEMBERS = ("images.npy", "labels.npy", "classes.npy", "source_md5.npy")
NPY_HEADERS = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}


@dataclasses.dataclass(frozen=True)
class Split:
    images: np.ndarray  # uint8, N x 3 x 32 x 32
    labels: np.ndarray  # int64, N
    classes: tuple[str, ...]
    source_md5: str  # MD5 of the CIFAR-10 archive the split came from


def write_split(path: Path, split: Split) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, images=split.images, labels=split.labels, classes=np.array(split.classes),
                 source_md5=np.array(split.source_md5))


def _problem(split: Split) -> str | None:
    """What makes `split` unusable for training, if anything."""
    images, labels, k = split.images, split.labels, len(split.classes)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != (3, 32, 32) or len(images) == 0:
        return f"images are {images.dtype} {images.shape}, not uint8 N x 3 x 32 x 32"
    if labels.dtype != np.int64 or labels.shape != (len(images),):
        return f"labels are {labels.dtype} {labels.shape}, not int64 of length {len(images)}"
    if k == 0 or labels.min() < 0 or labels.max() >= k:
        return f"labels span {labels.min()}..{labels.max()}, not 0..{k - 1}"
    empty = [c for i, c in enumerate(split.classes) if not (labels == i).any()]
    return f"no image of class {empty[0]!r}" if empty else None


def _header(z: zipfile.ZipFile, member: str) -> tuple[tuple[int, ...], np.dtype]:
    """(shape, dtype) of an .npy member, from its header alone (bounded by numpy's max_header_size)."""
    with z.open(member) as f:
        version = np.lib.format.read_magic(f)
        if version not in NPY_HEADERS:
            raise ValueError(f"{member} is .npy format {version}, not 1.0 or 2.0")
        shape, _, dtype = NPY_HEADERS[version](f)
    return shape, dtype


def _declared_problem(headers: dict[str, tuple[tuple[int, ...], np.dtype]]) -> str | None:
    """What the headers declare that no CIFAR-3 split holds, if anything: checked before numpy allocates it."""
    (images, images_type), (labels, labels_type) = headers["images.npy"], headers["labels.npy"]
    (classes, classes_type), (md5, md5_type) = headers["classes.npy"], headers["source_md5.npy"]
    if images_type != np.uint8 or len(images) != 4 or images[1:] != (3, 32, 32) or not 0 < images[0] <= MAX_IMAGES:
        return f"images declared {images_type} {quote(images)}, not uint8 N x 3 x 32 x 32 with N 1 to {MAX_IMAGES:,}"
    if labels_type != np.int64 or labels != images[:1]:
        return f"labels declared {labels_type} {quote(labels)}, not int64 of length {images[0]}"
    names_ok = classes_type.kind == "U" and classes_type.itemsize <= 4 * MAX_CLASS_NAME  # 4 bytes a character
    if not (names_ok and len(classes) == 1 and 1 <= classes[0] <= NUM_CLASSES):
        return f"classes declared {classes_type} {quote(classes)}, not 1 to {NUM_CLASSES} short names"
    if md5_type.kind != "U" or md5_type.itemsize > 4 * 32 or md5 != ():
        return f"source_md5 declared {md5_type} {quote(md5)}, not one MD5"
    return None


def _check_declared(path: Path) -> None:
    """Refuse a split whose members are not the four a split has, or declare shapes no split has, unread."""
    with zipfile.ZipFile(path) as z:
        if sorted(z.namelist()) != sorted(MEMBERS):
            raise ValueError(f"members {quote(z.namelist())}, expected {', '.join(MEMBERS)}")
        problem = _declared_problem({member: _header(z, member) for member in MEMBERS})
    if problem:
        raise StageError(f"{path} is not a usable split ({problem}); rerun `dvc repro cifar3`")


def read_split(path: Path) -> Split:
    """A split, checked: uint8 images, int64 labels in range, every class present."""
    try:
        _check_declared(path)
        with np.load(path, allow_pickle=False) as z:
            split = Split(z["images"], z["labels"], tuple(str(c) for c in z["classes"]), str(z["source_md5"]))
    except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile) as err:
        raise StageError(f"cannot read split {path} ({one_line(err, 160)}); rerun `dvc repro cifar3`") from err
    problem = _problem(split)
    if problem:
        raise StageError(f"{path} is not a usable split ({problem}); rerun `dvc repro cifar3`")
    return split


def holdout_count(n: int, fraction: float) -> int:
    """How many of a class's `n` images `carve_holdout` holds out (params.py's check rounds the same way)."""
    return round(n * fraction)


def _subset(split: Split, keep: np.ndarray) -> Split:
    return Split(split.images[keep], split.labels[keep], split.classes, split.source_md5)


def carve_holdout(split: Split, fraction: float, seed: int) -> tuple[Split, Split]:
    """(rest, held out): `fraction` of each class's images drawn from `seed`, each part in the split's order.

    Stratified, so both parts keep the class balance; the same split, fraction and seed give the same parts.
    """
    if not 0 < fraction < 1:
        raise ValueError(f"holdout fraction {fraction} is not between 0 and 1")
    rng = np.random.default_rng(seed)
    held = np.zeros(len(split.labels), dtype=bool)
    for label in range(len(split.classes)):
        members = np.flatnonzero(split.labels == label)
        held[rng.choice(members, holdout_count(len(members), fraction), replace=False)] = True
    return _subset(split, ~held), _subset(split, held)


def training_splits(train: Path, val: Path, holdout: float, seed: int) -> tuple[Split, str, Split]:
    """(what trains, the name of the split it is evaluated on, that split).

    With `holdout` > 0 the evaluation split is carved from `train` and `val` (the CIFAR-10 test batch) is never
    opened: selection must not see it.
    """
    if holdout > 0:
        rest, held = carve_holdout(read_split(train), holdout, seed)
        return rest, "holdout", held
    return read_split(train), "val", read_split(val)


@dataclasses.dataclass(frozen=True)
class ChannelStats:
    mean: tuple[float, ...]
    std: tuple[float, ...]


def channel_stats(images: np.ndarray) -> ChannelStats:
    """Mean and sample std per channel of uint8 N x C x H x W images scaled to [0, 1].

    Sums run in float64 one channel at a time, so 15,000 images need no
    float copy of the whole split.
    """
    n = images.shape[0] * images.shape[2] * images.shape[3]
    mean, std = [], []
    for c in range(images.shape[1]):
        x = images[:, c].astype(np.float64) / 255.0
        m = x.sum() / n
        mean.append(float(m))
        std.append(float(np.sqrt(((x - m) ** 2).sum() / (n - 1))))
    return ChannelStats(tuple(mean), tuple(std))


def write_stats(path: Path, stats: ChannelStats) -> None:
    write_json_atomic(path, {"mean": list(stats.mean), "std": list(stats.std)})


def read_stats(path: Path) -> ChannelStats:
    try:
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
        return ChannelStats(tuple(float(v) for v in raw["mean"]), tuple(float(v) for v in raw["std"]))
    except (OSError, KeyError, ValueError, TypeError) as err:
        raise StageError(f"cannot read channel stats {path} ({err}); rerun `dvc repro stats`") from err


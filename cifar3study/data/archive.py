"""The CIFAR-10 python archive: checked before it is read, read without extracting, cut to the kept classes.

Its size and MD5 are checked before anything in it is opened; the tar stream
is walked by `tar_headers`, which bounds every header before reading it;
every member is checked (no links, devices, sparse files, absolute or `..`
paths, nothing larger than a batch) before it is read; the batches go through
`safe_pickle`, never `pickle.load`; and the decoded data must look like CIFAR-10 (distinct class
names, labels in range, every kept class present) before a split is written.
"""

from __future__ import annotations

import gzip
import tarfile
import zlib
from collections import Counter
from pathlib import Path, PurePosixPath

import numpy as np

from cifar3study.data import safe_pickle, tar_headers
from cifar3study.data.cifar10_format import (
    BATCH_DIR,
    IMAGE_BYTES,
    IMAGES_PER_BATCH,
    MAX_ARCHIVE_BYTES,
    MAX_EXTENSION_BYTES,
    MAX_MEMBER_BYTES,
    MAX_MEMBERS,
    MAX_PICKLE_OPCODES,
    MAX_TAR_BYTES,
    META,
    TRAIN_BATCHES,
    VAL_BATCH,
)
from cifar3study.data.dataset import Split
from cifar3study.errors import StageError, one_line, quote
from cifar3study.files import file_md5

NOT_CIFAR = "the archive is not CIFAR-10 python format"
LIMITS = tar_headers.Limits(members=MAX_MEMBERS, extension_bytes=MAX_EXTENSION_BYTES, total_bytes=MAX_TAR_BYTES)


def verify(archive: Path, md5: str) -> None:
    """Refuse to read an archive that is too large or whose MD5 is not the expected one."""
    if not archive.is_file():
        raise StageError(f"{archive} does not exist; run `dvc repro download` first")
    if archive.stat().st_size > MAX_ARCHIVE_BYTES:
        raise StageError(f"{archive} is {archive.stat().st_size:,} bytes, more than any CIFAR-10 archive "
                         f"({MAX_ARCHIVE_BYTES:,}); delete it and download again")
    got = file_md5(archive)
    if got != md5:
        raise StageError(f"{archive} has MD5 {got}, expected {md5}; "
                         "set CIFAR10_MD5 as for its download (mirrors), or rerun `dvc repro -f download`")


def check_member(member: tarfile.TarInfo) -> None:
    """Refuse absolute paths, `..`, links, devices, sparse files (stricter than tarfile's data filter), oversized files."""
    name = quote(member.name)
    if not (member.isfile() or member.isdir()):
        raise StageError(f"archive member {name} is a link or device; refusing the archive")
    if member.type == tarfile.GNUTYPE_SPARSE:
        raise StageError(f"archive member {name} is a sparse file; refusing the archive")
    path = PurePosixPath(member.name)
    if path.is_absolute() or ".." in path.parts:
        raise StageError(f"archive member {name} has an absolute path or '..'; refusing the archive")
    if member.size > MAX_MEMBER_BYTES:
        raise StageError(f"archive member {name} declares {member.size:,} bytes, more than a CIFAR batch "
                         f"({MAX_MEMBER_BYTES:,}); refusing the archive")
    try:
        tarfile.data_filter(member, "/nonexistent-destination")
    except tarfile.FilterError as err:
        raise StageError(f"archive member {name} refused ({err.__class__.__name__}); refusing the archive") from err


def read_batches(archive: Path) -> dict[str, bytes]:
    """The raw bytes of the meta and batch files, every header bounded and every member checked before it is read."""
    wanted = {f"{BATCH_DIR}/{name}" for name in (*TRAIN_BATCHES, VAL_BATCH, META)}
    try:
        with gzip.open(archive, "rb") as stream:
            files = tar_headers.read_members(stream, LIMITS, check_member, wanted)
    except (tarfile.TarError, OSError, EOFError, zlib.error) as err:
        raise StageError(f"{archive} is not a readable .tar.gz ({one_line(err, 160)}); delete it and download again") \
            from err
    missing = sorted(wanted - files.keys())
    if missing:
        raise StageError(f"{archive} lacks {', '.join(missing)}; it is not the CIFAR-10 python archive")
    return {name.split("/", 1)[1]: blob for name, blob in files.items()}


def unpickle(data: bytes, what: str) -> dict:
    try:
        return safe_pickle.load_dict(data, MAX_PICKLE_OPCODES)
    except Exception as err:
        raise StageError(
            f"{what} is not a valid CIFAR batch ({one_line(err, 200)}); the archive is corrupt or malicious, "
            "delete it and download again"
        ) from err


def batch_arrays(batch: dict, what: str, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 N x 3 x 32 x 32, labels int64) of one unpickled batch; sizes checked before conversion."""
    data, labels = batch.get("data"), batch.get("labels")
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != IMAGE_BYTES:
        raise StageError(f"{what}: 'data' is not a uint8 N x {IMAGE_BYTES} array; {NOT_CIFAR}")
    if not isinstance(labels, (list, np.ndarray)) or len(labels) != len(data) or len(data) > IMAGES_PER_BATCH:
        raise StageError(f"{what}: 'labels' do not match 'data' (at most {IMAGES_PER_BATCH:,} each); {NOT_CIFAR}")
    integers = all(type(v) is int for v in labels) if isinstance(labels, list) else labels.dtype.kind in "iu"
    if not integers:
        raise StageError(f"{what}: 'labels' are not integers; {NOT_CIFAR}")
    labels = np.asarray(labels, dtype=np.int64)
    if len(labels) and (labels.min() < 0 or labels.max() >= n_classes):
        raise StageError(f"{what}: label {labels.min() if labels.min() < 0 else labels.max()} is outside "
                         f"0..{n_classes - 1}; {NOT_CIFAR}")
    return data.reshape(-1, 3, 32, 32), labels


def label_names(meta: dict) -> list[str]:
    names = meta.get("label_names")
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise StageError(f"{META} has no list of label_names; {NOT_CIFAR}")
    if len(set(names)) != len(names):
        twice = sorted(n for n, count in Counter(names).items() if count > 1)  # not names.count: quadratic
        raise StageError(f"{META} names class {quote(twice[0])} more than once; {NOT_CIFAR}")
    return names


def class_indices(names: list[str], classes: tuple[str, ...]) -> list[int]:
    unknown = [c for c in classes if c not in names]
    if unknown:
        raise StageError(f"data.classes names unknown class {quote(unknown[0])}; "
                         f"the archive has {quote(', '.join(names))}")
    return [names.index(c) for c in classes]


def select(images: np.ndarray, labels: np.ndarray, keep: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Images of the kept original labels, relabelled to their position in `keep`."""
    new = np.full(len(labels), -1, dtype=np.int64)
    for position, original in enumerate(keep):
        new[labels == original] = position
    mask = new >= 0
    return np.ascontiguousarray(images[mask]), new[mask]


def build_splits(files: dict[str, bytes], classes: tuple[str, ...], source_md5: str) -> dict[str, Split]:
    """{'train': Split, 'val': Split} of `classes`, relabelled 0..k-1 in their order."""
    names = label_names(unpickle(files[META], META))
    keep = class_indices(names, classes)
    splits = {}
    for split, batches in (("train", TRAIN_BATCHES), ("val", (VAL_BATCH,))):
        parts = [batch_arrays(unpickle(files[n], n), n, len(names)) for n in batches]
        images, labels = select(np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]), keep)
        empty = [c for i, c in enumerate(classes) if not (labels == i).any()]
        if empty:
            raise StageError(f"the {split} batches hold no image of class {quote(empty[0])}; {NOT_CIFAR}")
        splits[split] = Split(images, labels, classes, source_md5)
    return splits

"""The CIFAR-10 python archive: checked before it is read, read without extracting, cut to the kept classes.

Its MD5 is verified before anything in it is opened, every tar member is
checked (no links, devices, absolute or `..` paths) before any is read, and
the batches go through `safe_pickle`, never `pickle.load`.
"""

from __future__ import annotations

import tarfile
from pathlib import Path, PurePosixPath

import numpy as np

from cifar3study import safe_pickle
from cifar3study.dataset import Split
from cifar3study.errors import StageError
from cifar3study.files import file_md5

BATCH_DIR = "cifar-10-batches-py"
TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
VAL_BATCH = "test_batch"
META = "batches.meta"


def verify(archive: Path, md5: str) -> None:
    """Refuse to read an archive whose MD5 is not the expected one."""
    if not archive.is_file():
        raise StageError(f"{archive} does not exist; run `dvc repro download` first")
    got = file_md5(archive)
    if got != md5:
        raise StageError(f"{archive} has MD5 {got}, expected {md5}; "
                         "set CIFAR10_MD5 as for its download (mirrors), or rerun `dvc repro -f download`")


def check_member(member: tarfile.TarInfo) -> None:
    """Refuse absolute paths, `..`, links and devices (stricter than tarfile's data filter)."""
    if not (member.isfile() or member.isdir()):
        raise StageError(f"archive member {member.name!r} is a link or device; refusing the archive")
    path = PurePosixPath(member.name)
    if path.is_absolute() or ".." in path.parts:
        raise StageError(f"archive member {member.name!r} has an absolute path or '..'; refusing the archive")
    try:
        tarfile.data_filter(member, "/nonexistent-destination")
    except tarfile.FilterError as err:
        raise StageError(f"archive member {member.name!r} refused ({err.__class__.__name__}); refusing the archive") from err


def read_batches(archive: Path) -> dict[str, bytes]:
    """The raw bytes of the meta and batch files, every member checked first."""
    wanted = {f"{BATCH_DIR}/{name}" for name in (*TRAIN_BATCHES, VAL_BATCH, META)}
    try:
        with tarfile.open(archive, "r:gz") as tar:
            members = tar.getmembers()
            for member in members:
                check_member(member)
            files = {m.name: tar.extractfile(m).read() for m in members if m.name in wanted and m.isfile()}
    except (tarfile.TarError, OSError, EOFError) as err:
        raise StageError(f"{archive} is not a readable .tar.gz ({err}); delete it and download again") from err
    missing = sorted(wanted - files.keys())
    if missing:
        raise StageError(f"{archive} lacks {', '.join(missing)}; it is not the CIFAR-10 python archive")
    return {name.split("/", 1)[1]: blob for name, blob in files.items()}


def unpickle(data: bytes, what: str) -> dict:
    try:
        return safe_pickle.load_dict(data)
    except Exception as err:
        raise StageError(
            f"{what} is not a valid CIFAR batch ({err}); the archive is corrupt or malicious, delete it and download again"
        ) from err


def batch_arrays(batch: dict, what: str) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 N x 3 x 32 x 32, labels int64) of one unpickled batch."""
    data, labels = batch.get("data"), batch.get("labels")
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise StageError(f"{what}: 'data' is not a uint8 N x 3072 array; the archive is not CIFAR-10 python format")
    labels = np.asarray(labels)
    if labels.shape != (len(data),) or labels.dtype.kind not in "iu":
        raise StageError(f"{what}: 'labels' does not match 'data'; the archive is not CIFAR-10 python format")
    return data.reshape(-1, 3, 32, 32), labels.astype(np.int64)


def class_indices(label_names: list[str], classes: tuple[str, ...]) -> list[int]:
    unknown = [c for c in classes if c not in label_names]
    if unknown:
        raise StageError(f"data.classes names unknown class {', '.join(unknown)}; CIFAR-10 has {', '.join(label_names)}")
    return [label_names.index(c) for c in classes]


def select(images: np.ndarray, labels: np.ndarray, keep: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Images of the kept original labels, relabelled to their position in `keep`."""
    new = np.full(len(labels), -1, dtype=np.int64)
    for position, original in enumerate(keep):
        new[labels == original] = position
    mask = new >= 0
    return np.ascontiguousarray(images[mask]), new[mask]


def build_splits(files: dict[str, bytes], classes: tuple[str, ...], source_md5: str) -> dict[str, Split]:
    """{'train': Split, 'val': Split} of `classes`, relabelled 0..k-1 in their order."""
    names = unpickle(files[META], META).get("label_names")
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise StageError(f"{META} has no list of label_names; the archive is not CIFAR-10 python format")
    keep = class_indices(names, classes)
    splits = {}
    for split, batches in (("train", TRAIN_BATCHES), ("val", (VAL_BATCH,))):
        parts = [batch_arrays(unpickle(files[n], n), n) for n in batches]
        images = np.concatenate([p[0] for p in parts])
        labels = np.concatenate([p[1] for p in parts])
        splits[split] = Split(*select(images, labels, keep), classes, source_md5)
    return splits

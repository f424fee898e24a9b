"""Stage `cifar3`: keep the chosen CIFAR-10 classes, relabelled 0..k-1.

CIFAR's python batches are pickles, and an unchecked `pickle.load` of a
downloaded file runs whatever code it names. So the archive's MD5 is
verified before anything is read, tar members are checked before any is
opened (nothing is extracted to disk), and the batches are read with an
unpickler that can only rebuild plain integer numpy arrays.
"""

from __future__ import annotations

import argparse
import io
import logging
import os
import pickle
import tarfile
from pathlib import Path, PurePosixPath
from typing import ClassVar

import numpy as np

from stages.common import StageError, atomic_path, file_md5, run_stage
from stages.download import resolve_source
from stages.params import load_params

log = logging.getLogger(__name__)
BATCH_DIR = "cifar-10-batches-py"
TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
VAL_BATCH = "test_batch"
META = "batches.meta"
INT_DTYPES = frozenset({"u1", "i1", "u2", "i2", "u4", "i4", "u8", "i8"})


_NDARRAY = object()  # what the global `numpy.ndarray` resolves to: a marker for _Array, never called


class _Dtype:
    """Stands in for `numpy.dtype` while unpickling: a plain integer dtype, default state only."""

    def __init__(self, spec: object, align: object = False, copy: object = True) -> None:
        if not isinstance(spec, str) or spec not in INT_DTYPES:
            raise pickle.UnpicklingError(f"refused dtype {spec!r} (only plain integers are expected)")
        self.dtype = np.dtype(spec)

    def __setstate__(self, state: object) -> None:
        # numpy's state: (3, byte order, subarray, names, fields, itemsize, alignment, flags)
        if not (isinstance(state, tuple) and len(state) == 8 and state[0] == 3 and state[1] in ("<", ">", "|", "=")
                and state[2:] == (None, None, None, -1, -1, 0)):
            raise pickle.UnpicklingError(f"refused dtype state {state!r}")
        if state[1] in ("<", ">"):
            self.dtype = self.dtype.newbyteorder(state[1])


class _Array:
    """Stands in for numpy's `_reconstruct`: the array is built by np.frombuffer from raw bytes, nothing else."""

    def __init__(self, subtype: object, shape: object, dtype: object) -> None:
        if subtype is not _NDARRAY:
            raise pickle.UnpicklingError(f"refused array subtype {subtype!r}")
        self.array: np.ndarray | None = None

    def __setstate__(self, state: object) -> None:
        # numpy's state: (version 1, shape, dtype, Fortran order, raw bytes), version omitted by old numpy
        state = state[1:] if isinstance(state, tuple) and len(state) == 5 else state
        shape, dtype, fortran, raw = state
        if not (isinstance(shape, tuple) and all(type(n) is int for n in shape) and isinstance(dtype, _Dtype)
                and isinstance(raw, (bytes, str))):
            raise pickle.UnpicklingError("refused array state (not a plain integer array)")
        raw = raw.encode("latin1") if isinstance(raw, str) else raw  # Python 2 str read as latin1
        self.array = np.frombuffer(raw, dtype.dtype).reshape(shape, order="F" if fortran else "C").copy()


def _encode(text: object, encoding: str = "utf-8") -> bytes:
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(f"refused codec call encode(..., {encoding!r})")
    return text.encode("latin1")


class RestrictedUnpickler(pickle.Unpickler):
    """Resolves only the globals the official batches use, to stand-ins; anything else is refused unrun."""

    ALLOWED: ClassVar[dict[tuple[str, str], object]] = {
        ("numpy.core.multiarray", "_reconstruct"): _Array,
        ("numpy._core.multiarray", "_reconstruct"): _Array,
        ("numpy", "ndarray"): _NDARRAY,
        ("numpy", "dtype"): _Dtype,
        ("_codecs", "encode"): _encode,
    }

    def find_class(self, module: str, name: str) -> object:
        try:
            return self.ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refused global {module}.{name}") from None


def _resolve(value: object) -> object:
    if isinstance(value, _Array):
        if value.array is None:
            raise pickle.UnpicklingError("array without data")
        return value.array
    if isinstance(value, _Dtype):
        raise pickle.UnpicklingError("bare dtype where data was expected")
    return value


def safe_unpickle(data: bytes, what: str) -> dict:
    """Load one batch (Python 2 pickle, hence latin1) with `RestrictedUnpickler`."""
    try:
        obj = RestrictedUnpickler(io.BytesIO(data), encoding="latin1").load()
        if not isinstance(obj, dict):
            raise pickle.UnpicklingError(f"it holds a {type(obj).__name__}, not a dict")
        return {key: _resolve(value) for key, value in obj.items()}
    except Exception as err:
        raise StageError(
            f"{what} is not a valid CIFAR batch ({err}); the archive is corrupt or malicious, delete it and download again"
        ) from err


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


def build_splits(files: dict[str, bytes], classes: tuple[str, ...]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{'train': (images, labels), 'val': (images, labels)} for `classes`."""
    names = safe_unpickle(files[META], META).get("label_names")
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise StageError(f"{META} has no list of label_names; the archive is not CIFAR-10 python format")
    keep = class_indices(names, classes)
    splits = {}
    for split, names in (("train", TRAIN_BATCHES), ("val", (VAL_BATCH,))):
        parts = [batch_arrays(safe_unpickle(files[n], n), n) for n in names]
        images = np.concatenate([p[0] for p in parts])
        labels = np.concatenate([p[1] for p in parts])
        splits[split] = select(images, labels, keep)
    return splits


def write_split(path: Path, images: np.ndarray, labels: np.ndarray, classes: tuple[str, ...], md5: str) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, images=images, labels=labels, classes=np.array(classes), source_md5=np.array(md5))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=Path, required=True)
    parser.add_argument("--archive", type=Path, required=True)
    parser.add_argument("--out-dir", type=Path, required=True)
    args = parser.parse_args()
    data = load_params(args.params).data
    _, md5 = resolve_source(data.url, data.md5, os.environ)
    if not args.archive.is_file():
        raise StageError(f"{args.archive} does not exist; run `dvc repro download` first")
    got = file_md5(args.archive)
    if got != md5:
        raise StageError(f"{args.archive} has MD5 {got}, expected {md5}; "
                         "set CIFAR10_MD5 as for its download (mirrors), or rerun `dvc repro -f download`")
    splits = build_splits(read_batches(args.archive), data.classes)
    for split, (images, labels) in splits.items():
        write_split(args.out_dir / f"{split}.npz", images, labels, data.classes, md5)
        log.info("%s: %d images, per class %s", split, len(labels), np.bincount(labels).tolist())


if __name__ == "__main__":
    run_stage(main)

"""Stage `cifar3`: a hostile archive is refused unrun; the kept classes are relabelled in order."""

from __future__ import annotations

import os
import pickle
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import yaml

from stages.cifar3 import build_splits, read_batches, safe_unpickle, write_split
from stages.common import StageError
from tests.conftest import CLASSES, archive_files, synthetic_batch, write_archive

ROOT = Path(__file__).resolve().parents[1]
TRAIN = [f"data_batch_{i}" for i in range(1, 6)]


class SystemCall:
    """Pickles as `os.system(cmd)`: what a malicious batch would run on an unchecked pickle.load."""

    def __init__(self, cmd: str) -> None:
        self.cmd = cmd

    def __reduce__(self) -> tuple:
        return os.system, (self.cmd,)


def evil_pickles(marker: Path) -> list[bytes]:
    cmd = f"touch {marker}"
    literal = b"cos\nsystem\n(X" + len(cmd).to_bytes(4, "little") + cmd.encode() + b"tR."  # GLOBAL os system
    nested = pickle.dumps({"data": SystemCall(cmd), "labels": [0]}, protocol=2)  # GLOBAL posix system
    return [literal, nested]


def archive_with(tmp_path: Path, **replace: bytes) -> Path:
    path = tmp_path / "archive.tar.gz"
    write_archive(path, {**archive_files(), **replace})
    return path


def test_code_payload_is_refused_unrun(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    for payload in evil_pickles(marker):
        with pytest.raises(StageError, match=r"refused global (os|posix)\.system"):
            safe_unpickle(payload, "data_batch_1")
    assert not marker.exists()


def test_code_payload_in_archive_is_refused_unrun(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = archive_with(tmp_path, data_batch_3=evil_pickles(marker)[0])
    with pytest.raises(StageError, match="data_batch_3 is not a valid CIFAR batch"):
        build_splits(read_batches(path), ("airplane", "ship"))
    assert not marker.exists()


class SubArray(np.ndarray):
    """An ndarray subtype: unpickling one would run its module's code."""


def object_dtype_pickle() -> bytes:
    return pickle.dumps({"data": np.array([1, 2], dtype=object), "labels": [0, 1]}, protocol=2)


def ndarray_called_with_object_dtype() -> bytes:
    # {'data': numpy.ndarray((3,), 'O')}: calls the class itself instead of _reconstruct
    return b"\x80\x02}X\x04\x00\x00\x00datacnumpy\nndarray\nK\x03\x85X\x01\x00\x00\x00O\x86Rs."


def dtype_with_object_flag() -> bytes:
    # a uint8 array whose dtype state sets NPY_ITEM_HASOBJECT (flags 0x3f)
    blob = pickle.dumps({"data": np.zeros((1, 3072), np.uint8), "labels": [0]}, protocol=2)
    assert blob.count(b"J\xff\xff\xff\xffK\x00t") == 1
    return blob.replace(b"J\xff\xff\xff\xffK\x00t", b"J\xff\xff\xff\xffK\x3ft")


@pytest.mark.parametrize(("blob", "why"), [
    (object_dtype_pickle(), "refused dtype"),
    (pickle.dumps({"data": np.zeros(3, np.uint8).view(SubArray)}, protocol=2), "refused global tests.test_cifar3.SubArray"),
    (pickle.dumps({"data": np.ma.masked_array([1, 2])}, protocol=2), "refused global numpy.ma"),
    (ndarray_called_with_object_dtype(), "not callable"),
    (dtype_with_object_flag(), "refused dtype state"),
    (pickle.dumps({"data": np.float32(1.5)}, protocol=2), "refused global numpy"),
    (pickle.dumps([1, 2], protocol=2), "not a dict"),
])
def test_unpickler_refuses_anything_but_plain_integer_arrays(blob: bytes, why: str) -> None:
    with pytest.raises(StageError, match=why):
        safe_unpickle(blob, "data_batch_1")


def test_non_ndarray_subtype_is_refused() -> None:
    # numpy._core.multiarray._reconstruct(numpy.dtype, (0,), b'b'): an allowed global as the subtype
    blob = b"\x80\x02cnumpy._core.multiarray\n_reconstruct\ncnumpy\ndtype\nK\x00\x85C\x01b\x87R."
    with pytest.raises(StageError, match="refused array subtype"):
        safe_unpickle(blob, "data_batch_1")


def test_unpickler_reads_plain_arrays_exactly() -> None:
    batch = synthetic_batch(3, seed=7)
    batch["big_endian"] = np.arange(6, dtype=">i4").reshape(2, 3)
    batch["fortran"] = np.asfortranarray(np.arange(6, dtype=np.int64).reshape(2, 3))
    got = safe_unpickle(pickle.dumps(batch, protocol=2), "data_batch_1")
    assert got["labels"] == batch["labels"] and got["filenames"] == batch["filenames"]
    for key in ("data", "big_endian", "fortran"):
        assert got[key].dtype == batch[key].dtype and np.array_equal(got[key], batch[key])


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
    originals = [CLASSES.index(c) for c in classes]
    keep = np.isin(labels, originals)
    return data[keep], np.array([originals.index(label) for label in labels[keep]])


def test_classes_selected_by_name_and_relabelled_in_order(archive) -> None:
    classes = ("ship", "airplane")
    splits = build_splits(read_batches(archive[0]), classes)
    for split, batches in (("train", TRAIN), ("val", ["test_batch"])):
        images, labels = splits[split]
        ref_images, ref_labels = expected_split(batches, classes)
        assert np.bincount(labels).tolist() == [4 * len(batches)] * 2  # 4 images per class per batch
        assert np.array_equal(labels, ref_labels) and np.array_equal(images, ref_images)
        assert images.dtype == np.uint8 and images.shape == (8 * len(batches), 3, 32, 32) and labels.dtype == np.int64


def test_unknown_class_is_named(archive) -> None:
    with pytest.raises(StageError, match="unknown class zebra"):
        build_splits(read_batches(archive[0]), ("airplane", "zebra"))


def test_npz_outputs_load_without_pickle(archive, tmp_path: Path) -> None:
    images, labels = build_splits(read_batches(archive[0]), ("airplane", "automobile", "ship"))["val"]
    out = tmp_path / "cifar3"
    write_split(out / "val.npz", images, labels, ("airplane", "automobile", "ship"), archive[1])
    with np.load(out / "val.npz", allow_pickle=False) as z:
        assert sorted(z.files) == ["classes", "images", "labels", "source_md5"]
        assert z["images"].dtype == np.uint8 and z["images"].shape == (12, 3, 32, 32)
        assert z["labels"].dtype == np.int64 and z["labels"].tolist() == labels.tolist()
        assert z["classes"].tolist() == ["airplane", "automobile", "ship"] and str(z["source_md5"]) == archive[1]
    assert sorted(p.name for p in out.iterdir()) == ["val.npz"]  # no temporary left


def run_cli(tmp_path: Path, archive_path: Path, md5: str, classes: list[str]) -> subprocess.CompletedProcess:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["data"]["classes"] = classes
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    cmd = [sys.executable, "-m", "stages.cifar3", "--params", str(tmp_path / "params.yaml"),
           "--archive", str(archive_path), "--out-dir", str(tmp_path / "cifar3")]
    env = {**os.environ, "CIFAR10_MD5": md5}
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)


def test_cli_writes_train_and_val(archive, tmp_path: Path) -> None:
    result = run_cli(tmp_path, *archive, ["automobile", "airplane", "ship"])
    assert result.returncode == 0, result.stderr
    with np.load(tmp_path / "cifar3" / "train.npz", allow_pickle=False) as z:
        assert z["images"].shape == (60, 3, 32, 32) and np.bincount(z["labels"]).tolist() == [20, 20, 20]
        assert z["classes"].tolist() == ["automobile", "airplane", "ship"]
    with np.load(tmp_path / "cifar3" / "val.npz", allow_pickle=False) as z:
        assert z["images"].shape == (12, 3, 32, 32) and str(z["source_md5"]) == archive[1]


def test_cli_refuses_md5_mismatch_before_reading(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = archive_with(tmp_path, data_batch_1=evil_pickles(marker)[0], **{"batches.meta": b"not a pickle"})
    result = run_cli(tmp_path, path, "0" * 32, ["airplane", "ship"])
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert "error: " in last and "expected " + "0" * 32 in last
    assert "not a valid CIFAR batch" not in result.stderr  # stopped before reading any batch
    assert not marker.exists() and not (tmp_path / "cifar3").exists()


def test_md5_check_comes_before_tar_is_opened(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import stages.cifar3 as cifar3

    path = tmp_path / "archive.tar.gz"
    path.write_bytes(b"garbage")
    params = tmp_path / "params.yaml"
    shutil.copy(ROOT / "params.yaml", params)
    monkeypatch.setattr(cifar3, "read_batches", lambda _: pytest.fail("archive read before its MD5 was checked"))
    monkeypatch.setattr(sys, "argv", ["cifar3", "--params", str(params), "--archive", str(path), "--out-dir", str(tmp_path)])
    monkeypatch.delenv("CIFAR10_MD5", raising=False)
    with pytest.raises(StageError, match="has MD5"):
        cifar3.main()

"""The CIFAR-10 archive: unsafe members refused, batches read safely, kept classes relabelled in order."""

from __future__ import annotations

import gzip
import io
import pickle
import re
import tarfile
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from cifar3study.data import tar_headers
from cifar3study.data.archive import build_splits, read_batches, unpickle, verify
from cifar3study.errors import StageError
from cifar3study.files import file_md5
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


ZEROS = 16 << 20  # zeros per gzip member of a giant member or header; gzip readers join concatenated members


def tar_bytes(files: dict[str, bytes]) -> bytes:
    """`files` under cifar-10-batches-py/, as an uncompressed GNU tar with its end-of-archive blocks."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for name, blob in files.items():
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    return buf.getvalue()


def zeros_between(path: Path, head: bytes, size: int, tail: bytes) -> str:
    """Write gzip(head + `size` zero bytes + tail); returns the file's MD5.

    The zeros are one small gzip member written size / 16 MiB times: a GiB takes 1 MB on disk and no time to build.
    """
    assert size % ZEROS == 0
    zeros = gzip.compress(bytes(ZEROS), compresslevel=9)
    with open(path, "wb") as f:
        f.write(gzip.compress(head))
        for _ in range(size // ZEROS):
            f.write(zeros)
        f.write(gzip.compress(tail))
    return file_md5(path)


def bomb(path: Path, member_size: int) -> str:
    """A valid archive whose data_batch_1 is `member_size` zero bytes; compresses ~1000:1."""
    files = archive_files()
    del files["data_batch_1"]
    header = tarfile.TarInfo("cifar-10-batches-py/data_batch_1")
    header.size = member_size
    return zeros_between(path, header.tobuf(tarfile.GNU_FORMAT), member_size, tar_bytes(files))


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


def giant_extension(path: Path, kind: bytes, size: int) -> str:
    """The synthetic archive behind one extension header ('x', 'g', 'L', 'K') of `size` zero bytes; returns its MD5."""
    header = tarfile.TarInfo("././@LongLink" if kind in (tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK) else "pax")
    header.type, header.size = kind, size
    return zeros_between(path, header.tobuf(tarfile.GNU_FORMAT), size, tar_bytes(archive_files()))


@pytest.mark.parametrize(("kind", "what"), [(tarfile.XHDTYPE, "PAX extended"), (tarfile.XGLTYPE, "PAX global"),
                                            (tarfile.GNUTYPE_LONGNAME, "GNU long-name"),
                                            (tarfile.GNUTYPE_LONGLINK, "GNU long-link")])
def test_a_giant_extension_header_is_refused_unread(tmp_path: Path, kind: bytes, what: str) -> None:
    path = tmp_path / "archive.tar.gz"
    giant_extension(path, kind, 64 << 20)
    tracemalloc.start()
    try:
        with pytest.raises(StageError, match=f"a {what} header of 67,108,864 bytes, more than 65,536"):
            read_batches(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20


def tar_gz(path: Path, members: list[tuple[tarfile.TarInfo, bytes]], fmt: int = tarfile.PAX_FORMAT) -> None:
    with tarfile.open(path, "w:gz", format=fmt) as tar:
        for info, blob in members:
            info.size = len(blob) if info.isreg() else 0
            tar.addfile(info, io.BytesIO(blob) if info.isreg() else None)


def named(name: str, pax: dict[str, str] | None = None, kind: bytes = tarfile.REGTYPE, link: str = "") \
        -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.pax_headers = kind, link, pax or {}
    return info


def test_extension_headers_name_the_members_they_precede(tmp_path: Path) -> None:
    """PAX paths (the ustar name field says otherwise), PAX comments and GNU long names, as repacking tools write them."""
    pax = tmp_path / "pax.tar.gz"
    tar_gz(pax, [(named(f"x{i}", {"path": f"cifar-10-batches-py/{name}", "comment": "repacked"}), blob)
                 for i, (name, blob) in enumerate(archive_files().items())])
    assert read_batches(pax) == archive_files()
    gnu = tmp_path / "gnu.tar.gz"
    long = "cifar-10-batches-py/" + "long" * 40
    tar_gz(gnu, [(named(long), b"readme"), *[(named(f"cifar-10-batches-py/{n}"), b) for n, b in archive_files().items()]],
           tarfile.GNU_FORMAT)
    assert read_batches(gnu) == archive_files()


@pytest.mark.parametrize(("extra", "fmt", "needle"), [
    (named("cifar-10-batches-py/" + "a/" * 60 + "../" * 70 + "evil"), tarfile.GNU_FORMAT, "absolute path or '..'"),
    (named("ok", {"path": "../evil"}), tarfile.PAX_FORMAT, "'../evil' has an absolute path or '..'"),
    (named("ok", {"linkpath": "/etc/passwd"}, tarfile.SYMTYPE, "x"), tarfile.PAX_FORMAT, "'ok' is a link or device"),
    (named("ok", {"GNU.sparse.major": "1"}), tarfile.PAX_FORMAT, "sparse member"),
    (named("cifar-10-batches-py/s", kind=tarfile.GNUTYPE_SPARSE), tarfile.GNU_FORMAT, "is a sparse file"),
], ids=["gnu-long-dotdot", "pax-path-dotdot", "pax-link", "pax-sparse", "gnu-sparse"])
def test_names_from_extension_headers_are_checked_too(tmp_path: Path, extra: tarfile.TarInfo, fmt: int,
                                                      needle: str) -> None:
    path = tmp_path / "archive.tar.gz"
    tar_gz(path, [(extra, b"x"), *[(named(f"cifar-10-batches-py/{n}"), b) for n, b in archive_files().items()]], fmt)
    with pytest.raises(StageError, match=re.escape(needle)):
        read_batches(path)


def test_a_global_header_that_renames_members_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "archive.tar.gz"
    with tarfile.open(path, "w:gz", format=tarfile.PAX_FORMAT, pax_headers={"path": "cifar-10-batches-py/x"}) as tar:
        tar.addfile(named("a"), io.BytesIO(b""))
    with pytest.raises(StageError, match="global PAX header setting path"):
        read_batches(path)


def raw_tar(*blocks: bytes) -> io.BytesIO:
    return io.BytesIO(b"".join(blocks))


def header(name: str, size: int, kind: bytes = tarfile.REGTYPE) -> bytes:
    info = tarfile.TarInfo(name)
    info.size, info.type = size, kind
    return info.tobuf(tarfile.GNU_FORMAT)


def test_the_stream_is_capped_and_read_no_further_than_its_end() -> None:
    limits = tar_headers.Limits(members=16, extension_bytes=1024, total_bytes=8 * 512)
    ok = raw_tar(header("a", 3), b"abc".ljust(512, b"\0"), bytes(1024), b"not read: after the end")
    assert tar_headers.read_members(ok, limits, lambda m: None, {"a"}) == {"a": b"abc"}
    big = raw_tar(header("a", 4000), bytes(4096), bytes(1024))
    with pytest.raises(StageError, match="unpacks to more than 4,096 bytes"):
        tar_headers.read_members(big, limits, lambda m: None, set())
    with pytest.raises(tarfile.ReadError, match="unexpected end of data"):
        tar_headers.read_members(raw_tar(header("a", 600), bytes(512)), limits, lambda m: None, {"a"})


def test_malformed_headers_are_unreadable(tmp_path: Path) -> None:
    negative = bytearray(header("a", 0))
    negative[124:136] = b"\xff" * 12  # GNU base-256: -1
    negative[148:156] = b"%06o\0 " % (sum(negative[:148]) + 8 * 32 + sum(negative[156:]))
    pax = header("pax", 20, tarfile.XHDTYPE) + b"99 path=x\n".ljust(512, b"\0")
    bad_checksum = bytearray(header("a", 0))
    bad_checksum[0:1] = b"b"
    for blocks, needle in ((bytes(negative), "negative member size"), (pax, "malformed PAX header"),
                           (bytes(bad_checksum), "bad checksum")):
        path = tmp_path / "bad.tar.gz"
        path.write_bytes(gzip.compress(blocks + bytes(1024)))
        with pytest.raises(StageError, match=f"is not a readable .tar.gz .*{needle}"):
            read_batches(path)

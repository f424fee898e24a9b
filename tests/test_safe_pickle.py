"""The restricted unpickler builds plain integer arrays and refuses everything else, unrun."""

from __future__ import annotations

import codecs
import os
import pickle
from pathlib import Path

import numpy as np
import pytest

from cifar3study.data.safe_pickle import load_dict
from tests.helpers import synthetic_batch

LIMIT = 100_000


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


def test_code_payload_is_refused_unrun(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    for payload in evil_pickles(marker):
        with pytest.raises(pickle.UnpicklingError, match=r"refused global (os|posix)\.system"):
            load_dict(payload, LIMIT)
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
    (pickle.dumps({"data": np.zeros(3, np.uint8).view(SubArray)}, protocol=2), "refused global tests.test_safe_pickle.SubArray"),
    (pickle.dumps({"data": np.ma.masked_array([1, 2])}, protocol=2), "refused global numpy.ma"),
    (ndarray_called_with_object_dtype(), "not callable"),
    (dtype_with_object_flag(), "refused dtype state"),
    (pickle.dumps({"data": np.float32(1.5)}, protocol=2), "refused global numpy"),
    (pickle.dumps([1, 2], protocol=2), "not a dict"),
])
def test_unpickler_refuses_anything_but_plain_integer_arrays(blob: bytes, why: str) -> None:
    with pytest.raises((pickle.UnpicklingError, TypeError), match=why):
        load_dict(blob, LIMIT)


def test_non_ndarray_subtype_is_refused() -> None:
    # numpy._core.multiarray._reconstruct(numpy.dtype, (0,), b'b'): an allowed global as the subtype
    blob = b"\x80\x02cnumpy._core.multiarray\n_reconstruct\ncnumpy\ndtype\nK\x00\x85C\x01b\x87R."
    with pytest.raises(pickle.UnpicklingError, match="refused array subtype"):
        load_dict(blob, LIMIT)


def test_unpickler_reads_plain_arrays_exactly() -> None:
    batch = synthetic_batch(3, seed=7)
    batch["big_endian"] = np.arange(6, dtype=">i4").reshape(2, 3)
    batch["fortran"] = np.asfortranarray(np.arange(6, dtype=np.int64).reshape(2, 3))
    got = load_dict(pickle.dumps(batch, protocol=2), LIMIT)
    assert got["labels"] == batch["labels"] and got["filenames"] == batch["filenames"]
    for key in ("data", "big_endian", "fortran"):
        assert got[key].dtype == batch[key].dtype and np.array_equal(got[key], batch[key])


def test_opcode_limit_is_checked_before_anything_is_built() -> None:
    blob = pickle.dumps({"labels": list(range(200))}, protocol=2)
    assert load_dict(blob, 1000)["labels"] == list(range(200))
    with pytest.raises(pickle.UnpicklingError, match="more than 50 pickle operations"):
        load_dict(blob, 50)


class Reduces:
    """Pickles as `call(*args)`, then `__setstate__(state)` when a state is given."""

    def __init__(self, call: object, args: tuple, state: object = None) -> None:
        self.reduced = (call, args) if state is None else (call, args, state)

    def __reduce__(self) -> tuple:
        return self.reduced


def memo_shared(width: int = 4, depth: int = 11) -> list:
    """A few hundred pickle bytes whose repr is width**depth leaves (17 MB here): memo references, not copies."""
    value: list = ["leaf"]
    for _ in range(depth):
        value = [value] * width
    return value


@pytest.mark.parametrize(("reduced", "why"), [
    (Reduces(np.dtype, (memo_shared(),)), "refused dtype [[[...]"),
    (Reduces(np.dtype, ("u1",), memo_shared()), "refused dtype state [[[...]"),
    (Reduces(np._core.multiarray._reconstruct, (memo_shared(), (0,), b"b")), "refused array subtype [[[...]"),
    (Reduces(codecs.encode, ("x", memo_shared())), "refused codec call encode(..., [[[...]"),
], ids=["dtype", "dtype-state", "array-subtype", "codec"])
def test_refusals_quote_a_huge_argument_elided(reduced: Reduces, why: str) -> None:
    blob = pickle.dumps({"data": reduced, "labels": [0]}, protocol=2)
    assert len(blob) < 1000
    with pytest.raises(pickle.UnpicklingError) as refused:
        load_dict(blob, LIMIT)
    assert str(refused.value).startswith(why) and len(str(refused.value)) < 200

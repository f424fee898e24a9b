"""An unpickler for CIFAR's python batches that can build plain integer numpy arrays and nothing else.

An unchecked `pickle.load` of a downloaded file runs whatever code it names.
This one resolves only the globals the official batches use, each to a
stand-in that rebuilds a plain integer array from raw bytes; any other
global, dtype or array subtype is refused before it runs. Refusals quote what
they were handed through `errors.quote`, which elides before formatting: a
memo-shared nested list would otherwise print as gigabytes.
"""

from __future__ import annotations

import io
import pickle
import pickletools
from typing import ClassVar

import numpy as np

from cifar3study.errors import quote

INT_DTYPES = frozenset({"u1", "i1", "u2", "i2", "u4", "i4", "u8", "i8"})
_NDARRAY = object()  # what the global `numpy.ndarray` resolves to: a marker for _Array, never called


class _Dtype:
    """Stands in for `numpy.dtype` while unpickling: a plain integer dtype, default state only."""

    def __init__(self, spec: object, align: object = False, copy: object = True) -> None:
        if not isinstance(spec, str) or spec not in INT_DTYPES:
            raise pickle.UnpicklingError(f"refused dtype {quote(spec)} (only plain integers are expected)")
        self.dtype = np.dtype(spec)

    def __setstate__(self, state: object) -> None:
        # numpy's state: (3, byte order, subarray, names, fields, itemsize, alignment, flags)
        if not (isinstance(state, tuple) and len(state) == 8 and state[0] == 3 and state[1] in ("<", ">", "|", "=")
                and state[2:] == (None, None, None, -1, -1, 0)):
            raise pickle.UnpicklingError(f"refused dtype state {quote(state)}")
        if state[1] in ("<", ">"):
            self.dtype = self.dtype.newbyteorder(state[1])


class _Array:
    """Stands in for numpy's `_reconstruct`: the array is built by np.frombuffer from raw bytes, nothing else."""

    def __init__(self, subtype: object, shape: object, dtype: object) -> None:
        if subtype is not _NDARRAY:
            raise pickle.UnpicklingError(f"refused array subtype {quote(subtype)}")
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
        raise pickle.UnpicklingError(f"refused codec call encode(..., {quote(encoding)})")
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


def check_opcode_count(data: bytes, limit: int) -> None:
    """Refuse a pickle of more than `limit` opcodes before anything is built.

    Unpickled objects grow with the opcode count (each memo reference adds an
    element for two bytes of input), while large data come as single opcodes.
    """
    for count, _ in enumerate(pickletools.genops(data), start=1):
        if count > limit:
            raise pickle.UnpicklingError(f"more than {limit:,} pickle operations; no CIFAR batch has that many")


def load_dict(data: bytes, max_opcodes: int) -> dict:
    """A pickled dict (Python 2 pickle, hence latin1) whose arrays are plain integer numpy arrays.

    Raises pickle.UnpicklingError (or whatever a malformed stream raises) on anything else.
    """
    check_opcode_count(data, max_opcodes)
    obj = RestrictedUnpickler(io.BytesIO(data), encoding="latin1").load()
    if not isinstance(obj, dict):
        raise pickle.UnpicklingError(f"it holds a {type(obj).__name__}, not a dict")
    return {key: _resolve(value) for key, value in obj.items()}

"""The one error type a user sees, and how its message is kept to one short line.

Input-derived values can be huge (a 30 MB field, a pickle whose memo-shared
lists would print as gigabytes), so nothing here formats, flattens or splits
more than a few times the limit, whatever it is given.
"""

from __future__ import annotations

import reprlib

MAX_QUOTE = 80  # characters of input-derived text quoted in a message
MAX_MESSAGE = 400  # characters of a whole message


class StageError(Exception):
    """A failure the user can fix; shown as one line, exit status 1."""


class Pruned(StageError):
    """A study's pruner stopped this trial's training after `epoch`: an expected end, recorded as KILLED, not failed."""

    def __init__(self, epoch: int) -> None:
        super().__init__(f"pruned after epoch {epoch}: the study's pruner stopped this trial (its ledger says so)")
        self.epoch = epoch


class _BoundedRepr(reprlib.Repr):
    """reprlib's elided repr, also for bytes and for integers too long for str() (which raises for them)."""

    def __init__(self) -> None:
        super().__init__()
        self.maxlevel, self.maxlist, self.maxtuple, self.maxdict, self.maxset, self.maxfrozenset = 2, 4, 4, 4, 4, 4
        self.maxstring = self.maxother = MAX_QUOTE

    def repr_int(self, x: int, level: int) -> str:
        return f"<{x.bit_length()}-bit int>" if x.bit_length() > 128 else super().repr_int(x, level)

    def repr_bytes(self, x: bytes, level: int) -> str:
        return self.repr_str(x, level)  # cuts before repr() as for str

    repr_bytearray = repr_bytes


_REPR = _BoundedRepr()
_CONTAINERS = (list, tuple, dict, set, frozenset, bytes, bytearray, int)  # whose str() grows with their size


def bounded_repr(value: object) -> str:
    """repr() of `value` with long strings and deep or long containers elided before anything is formatted."""
    return _REPR.repr(value)


def _text(value: object, limit: int) -> str:
    """str(value) cut to its head and tail, a few times `limit` characters, before anyone splits it."""
    text = bounded_repr(value) if isinstance(value, _CONTAINERS) else str(value)
    window = 4 * limit
    return text if len(text) <= 2 * window else f"{text[:window]} ... {text[-window:]}"


def one_line(text: object, limit: int = MAX_MESSAGE) -> str:
    """`text` on one line; when too long, its middle is cut so the advice at the end survives."""
    flat = " ".join(_text(text, limit).split())
    if len(flat) <= limit:
        return flat
    keep = (limit - 5) // 2
    return f"{flat[:keep]} ... {flat[-keep:]}"


def quote(value: object, limit: int = MAX_QUOTE) -> str:
    """repr() of input-derived text, on one line and at most `limit` characters."""
    text = repr(value[: limit + 1]) if isinstance(value, str) else one_line(value, limit * 4)
    return text if len(text) <= limit else text[: limit - 3] + "..."

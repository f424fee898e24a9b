"""The one error type a user sees, and how its message is kept to one short line."""

from __future__ import annotations

MAX_QUOTE = 80  # characters of input-derived text quoted in a message
MAX_MESSAGE = 400  # characters of a whole message


class StageError(Exception):
    """A failure the user can fix; shown as one line, exit status 1."""


def one_line(text: object, limit: int = MAX_MESSAGE) -> str:
    """`text` on one line; when too long, its middle is cut so the advice at the end survives."""
    flat = " ".join(str(text).split())
    if len(flat) <= limit:
        return flat
    keep = (limit - 5) // 2
    return f"{flat[:keep]} ... {flat[-keep:]}"


def quote(value: object, limit: int = MAX_QUOTE) -> str:
    """repr() of input-derived text, on one line and at most `limit` characters."""
    text = repr(value) if isinstance(value, str) else one_line(value, limit * 4)
    return text if len(text) <= limit else text[: limit - 3] + "..."

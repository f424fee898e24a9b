"""Messages stay one short line, and the advice at their end survives truncation."""

from __future__ import annotations

import tracemalloc
from collections.abc import Callable

import pytest

from cifar3study.errors import MAX_MESSAGE, bounded_repr, one_line, quote


def test_one_line_joins_lines_and_keeps_the_advice_at_the_end() -> None:
    text = "bad value " + "x\n" * 5000 + "; fix it in params.yaml"
    line = one_line(text)
    assert "\n" not in line and len(line) <= MAX_MESSAGE
    assert line.startswith("bad value x x") and line.endswith("fix it in params.yaml")


def test_short_text_is_unchanged_but_flattened() -> None:
    assert one_line("a\n  b\tc") == "a b c"


def test_quote_bounds_input_derived_text() -> None:
    assert quote("short") == "'short'"
    long = quote("y" * 10_000)
    assert len(long) <= 80 and long.endswith("...")
    assert "\n" not in quote(["a\nb"] * 1000)


def nested(width: int, depth: int) -> list:
    """A list whose str() has width**depth leaves, built from depth lists: what a memo-shared pickle hands over."""
    value: list = ["leaf"]
    for _ in range(depth):
        value = [value] * width
    return value


def peak_bytes(call: Callable[[], object]) -> int:
    tracemalloc.start()
    try:
        call()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("value", [
    "ab " * 1_000_000,  # 3 MB of words: splitting it whole makes a million strings
    ValueError("refused " + "x\n" * 2_000_000 + "; delete it"),
    nested(4, 10),  # str() of it is 9 MB
    10**5000,  # str() of it raises
], ids=["words", "exception", "nested-list", "huge-int"])
def test_huge_input_is_cut_before_it_is_formatted_or_split(value: object) -> None:
    assert len(one_line(value)) <= MAX_MESSAGE and len(quote(value)) <= 80
    assert peak_bytes(lambda: (one_line(value), quote(value))) < 256 << 10


def test_quote_of_a_long_string_copies_no_more_than_it_shows() -> None:
    text = "y" * 10_000_000
    assert peak_bytes(lambda: quote(text)) < 64 << 10
    assert quote(text) == "'" + "y" * 76 + "..."


def test_bounded_repr_elides_deep_and_long_containers() -> None:
    shown = bounded_repr({"data": nested(1000, 50), "b": b"\0" * 10_000_000})
    assert len(shown) < 2000 and "..." in shown and shown.startswith("{'b': b'\\x00")

"""Messages stay one short line, and the advice at their end survives truncation."""

from __future__ import annotations

from cifar3study.errors import MAX_MESSAGE, one_line, quote


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

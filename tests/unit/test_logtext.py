"""logtext.printable: text from outside as one line of printable ASCII (pure, no sockets)."""

import pytest

from logtext import MAX_CHARS, printable


def test_plain_ascii_is_left_as_it_is():
    assert printable("token expired") == "token expired"


@pytest.mark.parametrize(("text", "shown"), [
    ("a\nforged line", "a\\nforged line"),
    ("bell\x07", "bell\\x07"),
    ("caf\u00e9", "caf\\xe9"),
    ("lone \ud800", "lone \\ud800"),
])
def test_control_non_ascii_and_lone_surrogates_are_written_as_escapes(text, shown):
    line = printable(text)
    assert line == shown
    assert line.isascii() and line.isprintable()
    line.encode("utf-8")  # a lone surrogate would raise here


def test_text_shown_once_is_left_as_it_is_when_shown_again():
    once = printable("x\ny\u2028z")
    assert printable(once) == once


def test_long_text_is_cut_to_the_limit_with_an_ellipsis():
    assert printable("a" * (MAX_CHARS + 1)) == "a" * (MAX_CHARS - 3) + "..."
    assert printable("a" * MAX_CHARS) == "a" * MAX_CHARS
    assert printable("abcdefgh", limit=6) == "abc..."


def test_escapes_count_towards_the_limit():
    assert printable("\n" * 10, limit=8) == "\\n\\n\\..."

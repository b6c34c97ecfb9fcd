"""Pure tests of ``wsnode.wire``: the header of a final, unmasked text frame (RFC 6455 5.2)."""

from __future__ import annotations

import pytest

from wsnode.wire import text_frame_header


@pytest.mark.parametrize(("length", "header"), [
    (0, b"\x81\x00"),
    (5, b"\x81\x05"),
    (125, b"\x81\x7d"),  # the largest length that fits the 7-bit form
    (126, b"\x81\x7e\x00\x7e"),  # 126 means: a 16-bit length follows
    (65_535, b"\x81\x7e\xff\xff"),
    (65_536, b"\x81\x7f\x00\x00\x00\x00\x00\x01\x00\x00"),  # 127 means: a 64-bit length follows
])
def test_the_length_takes_the_shortest_form_that_holds_it(length, header):
    assert text_frame_header(length) == header


def test_a_compressed_frame_sets_rsv1():
    assert text_frame_header(5, compressed=True) == b"\xc1\x05"
    assert text_frame_header(300, compressed=True)[0] == 0xC1


def test_the_mask_bit_is_never_set():
    for length in (0, 125, 126, 70_000):
        assert not text_frame_header(length)[1] & 0x80


def test_a_negative_length_is_refused():
    with pytest.raises(ValueError, match="negative"):
        text_frame_header(-1)

"""Pure tests of ``wsnode.wire``: the header of a final, unmasked text frame (RFC 6455 5.2)."""

from __future__ import annotations

import struct

import pytest

from wsnode import wire
from wsnode.closecodes import CloseCode
from wsnode.wire import FrameHeader, read_header, text_frame_header


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


# --- read_header ---------------------------------------------------------------------------

MASK = b"\x01\x02\x03\x04"


@pytest.mark.parametrize(("data", "length", "start"), [
    (b"\x81\x85" + MASK, 5, 6),
    (b"\x81\xfe\x01\x2c" + MASK, 300, 8),
    (b"\x81\xff" + (70_000).to_bytes(8, "big") + MASK, 70_000, 14),
])
def test_a_masked_header_gives_first_byte_length_mask_and_payload_start(data, length, start):
    assert read_header(data) == FrameHeader(0x81, length, MASK, start)


def test_an_unmasked_header_has_no_mask():
    assert read_header(b"\x81\x05hello") == FrameHeader(0x81, 5, None, 2)


def test_a_header_is_read_where_the_frame_starts():
    data = b"\x81\x05hello" + b"\x89\x80" + MASK
    assert read_header(data, 7) == FrameHeader(0x89, 0, MASK, 13)


@pytest.mark.parametrize("data", [b"", b"\x81", b"\x81\xfe\x01", b"\x81\xff" + bytes(7), b"\x81\x85\x01\x02\x03"])
def test_an_incomplete_header_gives_none(data):
    assert read_header(data) is None
    assert read_header(b"xx" + data, 2) is None


def test_the_header_does_not_wait_for_the_payload():
    assert read_header(b"\x81\x85" + MASK + b"he") == FrameHeader(0x81, 5, MASK, 6)


@pytest.mark.parametrize("code", [1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014, 3000, 4000, 4500, 4999])
def test_a_close_code_a_peer_may_send_is_no_problem(code):
    assert wire.close_problem(struct.pack("!H", code) + "fin \u00e9".encode()) is None


@pytest.mark.parametrize("code", [0, 999, 1004, 1005, 1006, 1015, 1016, 2999, 5000, 65535])
def test_a_close_code_no_peer_may_send_is_answered_with_1002(code):
    assert wire.close_problem(struct.pack("!H", code)) == (CloseCode.PROTOCOL_ERROR, f"close code {code} may not be sent")


def test_an_empty_close_is_no_problem_and_one_byte_or_a_reason_not_utf8_is():
    assert wire.close_problem(b"") is None
    assert wire.close_problem(b"\x03") == (CloseCode.PROTOCOL_ERROR, "close frame of one byte")
    assert wire.close_problem(struct.pack("!H", 1000) + b"\xff") == (CloseCode.INVALID_PAYLOAD, "close reason is not UTF-8")

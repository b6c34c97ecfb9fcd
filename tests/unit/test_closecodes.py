"""Pure tests of ``wsnode.closecodes``: the one close-code table."""

from __future__ import annotations

import pytest

from wsnode.closecodes import MAX_REASON_BYTES, CloseCode, short_reason


def test_unauthorized_is_4401_as_the_contract_says():
    assert CloseCode.UNAUTHORIZED == 4401


def test_bad_request_is_in_the_terminal_range():
    assert 4500 <= CloseCode.BAD_REQUEST <= 4999


@pytest.mark.parametrize(
    "code, value",
    [(CloseCode.GOING_AWAY, 1001), (CloseCode.MESSAGE_TOO_BIG, 1009), (CloseCode.INTERNAL_ERROR, 1011), (CloseCode.TRY_AGAIN_LATER, 1013)],
)
def test_standard_codes_keep_their_rfc_6455_values(code, value):
    assert code == value


@pytest.mark.parametrize("code", [CloseCode.GOING_AWAY, CloseCode.INTERNAL_ERROR, CloseCode.TRY_AGAIN_LATER])
def test_standard_transient_codes_tell_the_client_to_reconnect(code):
    assert code.reconnect is True


def test_unauthorized_tells_the_client_to_reconnect_with_a_new_token():
    assert CloseCode.UNAUTHORIZED.reconnect is True


def test_bad_request_tells_the_client_not_to_reconnect():
    assert CloseCode.BAD_REQUEST.reconnect is False


def test_every_code_in_4000_to_4499_means_reconnect():
    assert all(code.reconnect for code in CloseCode if 4000 <= code <= 4499)


def test_every_code_in_4500_to_4999_means_do_not_reconnect():
    assert not any(code.reconnect for code in CloseCode if 4500 <= code <= 4999)


def test_our_own_codes_stay_within_4000_to_4999():
    assert all(4000 <= code <= 4999 for code in CloseCode if code >= 4000)


@pytest.mark.parametrize("code", list(CloseCode), ids=lambda code: code.name)
def test_every_code_has_a_non_empty_reason(code):
    assert isinstance(code.reason, str) and code.reason.strip()


@pytest.mark.parametrize("code", list(CloseCode), ids=lambda code: code.name)
def test_every_reason_fits_in_a_close_frame(code):
    assert len(code.reason.encode()) <= 123


def test_the_reason_limit_is_123_bytes():
    assert MAX_REASON_BYTES == 123


def test_a_short_reason_is_returned_unchanged():
    assert short_reason("bad request") == "bad request"


def test_an_ascii_reason_is_cut_to_123_bytes():
    assert short_reason("x" * 200) == "x" * 123


def test_a_reason_of_exactly_123_bytes_is_kept_whole():
    assert short_reason("y" * 123) == "y" * 123


def test_a_cut_between_the_bytes_of_a_character_drops_that_character():
    # "é" is two bytes: 61 of them fill 122 bytes and the 62nd would straddle byte 123.
    assert short_reason("é" * 100) == "é" * 61


def test_a_cut_reason_is_a_prefix_of_the_original():
    text = "a" + "€" * 60  # "€" is three bytes

    assert text.startswith(short_reason(text))


@pytest.mark.parametrize("text", ["é" * 100, "a" + "€" * 60, "ab" + "😀" * 40, "ok " * 60], ids=["2-byte", "3-byte", "4-byte", "ascii"])
def test_a_cut_reason_always_fits_in_123_bytes(text):
    assert len(short_reason(text).encode()) <= 123


def test_a_cut_keeps_as_many_whole_four_byte_characters_as_fit():
    # 2 + 30 * 4 = 122 bytes; the 31st emoji would need bytes 123 to 126.
    assert short_reason("ab" + "😀" * 40) == "ab" + "😀" * 30


def test_too_many_connections_is_4429_and_means_reconnect_with_backoff():
    assert CloseCode.TOO_MANY_CONNECTIONS == 4429
    assert CloseCode.TOO_MANY_CONNECTIONS.reconnect is True
    assert len(CloseCode.TOO_MANY_CONNECTIONS.reason.encode()) <= MAX_REASON_BYTES

"""Pure tests of ``wsnode.protocol``: client frames in, Acks or ProtocolErrors out; envelopes in, frames out."""

from __future__ import annotations

import json

import pytest

from wsnode import protocol
from wsnode.closecodes import CloseCode
from wsnode.protocol import (PONG_FRAME, Ack, Ping, ProtocolError, Refresh, hello_frame, message_frame, parse_client_frame, parse_since, refresh_error_frame,
                             refreshed_frame, resumed_frame)

ID = "018bcfe56800" "000001" "a1b2c3"  # 24 hex: milliseconds, counter, tag


def refusal(frame) -> ProtocolError:
    with pytest.raises(ProtocolError) as caught:
        parse_client_frame(frame)
    return caught.value


# --- client frames ----------------------------------------------------------------------------


def test_an_ack_frame_parses_to_an_ack_with_its_id():
    assert parse_client_frame(json.dumps({"type": "ack", "id": ID})) == Ack((ID,))


def test_an_ack_frame_with_extra_fields_still_parses():
    assert parse_client_frame(json.dumps({"type": "ack", "id": ID, "extra": [1]})) == Ack((ID,))


def test_an_ack_frame_with_ids_parses_to_an_ack_of_those_ids_in_their_order():
    other = ID[:-1] + "4"
    assert parse_client_frame(json.dumps({"type": "ack", "ids": [other, ID]})) == Ack((other, ID))
    assert parse_client_frame(json.dumps({"type": "ack", "ids": [ID] * protocol.MAX_ACK_IDS})) == Ack((ID,) * protocol.MAX_ACK_IDS)


@pytest.mark.parametrize(
    ("ids", "says"),
    [
        ([], "ack ids must be a non-empty list of message ids"),
        (ID, "ack ids must be a non-empty list of message ids"),
        ({"0": ID}, "ack ids must be a non-empty list of message ids"),
        (None, "ack ids must be a non-empty list of message ids"),
        ([ID, "nope"], "ack ids must all be ids of message frames"),
        ([ID, ID.upper()], "ack ids must all be ids of message frames"),
        ([ID, [ID]], "ack ids must all be ids of message frames"),
        ([ID] * (protocol.MAX_ACK_IDS + 1), f"ack has {protocol.MAX_ACK_IDS + 1} ids: send at most hello's ack_ids ({protocol.MAX_ACK_IDS}) in one frame"),
    ],
    ids=["empty", "a string", "an object", "null", "a word", "uppercase", "a nested list", "too many"],
)
def test_an_ack_with_bad_ids_is_refused_saying_what_is_wrong(ids, says):
    error = refusal(json.dumps({"type": "ack", "ids": ids}))

    assert says in str(error) and error.code == CloseCode.BAD_REQUEST


def test_an_ack_of_more_ids_than_the_node_said_is_refused_and_one_of_as_many_is_taken():
    assert parse_client_frame(json.dumps({"type": "ack", "ids": [ID] * 145}), max_ack_ids=145) == Ack((ID,) * 145)

    with pytest.raises(ProtocolError) as refused:
        parse_client_frame(json.dumps({"type": "ack", "ids": [ID] * 146}), max_ack_ids=145)

    assert str(refused.value) == "ack has 146 ids: send at most hello's ack_ids (145) in one frame"
    assert refused.value.code == CloseCode.BAD_REQUEST


@pytest.mark.parametrize("max_frame_bytes", [2560, 4096, 10_000, 27_999, 28_026, 1 << 20])
def test_hello_says_as_many_ack_ids_as_fit_in_the_largest_frame_a_node_takes_at_most_the_cap(max_frame_bytes):
    most = protocol.ack_ids_limit(max_frame_bytes)
    widest = json.dumps({"type": "ack", "ids": [ID] * most})  # json.dumps's spaces: more than JSON.stringify writes

    assert len(widest.encode()) <= max_frame_bytes
    assert most == protocol.MAX_ACK_IDS or len(json.dumps({"type": "ack", "ids": [ID] * (most + 1)}).encode()) > max_frame_bytes


def test_hello_says_145_ack_ids_at_the_default_max_frame_bytes():
    assert protocol.ack_ids_limit(4096) == 145


def test_an_ack_with_both_id_and_ids_is_refused():
    assert "ack has both id and ids" in str(refusal(json.dumps({"type": "ack", "id": ID, "ids": [ID]})))


def test_a_binary_frame_is_refused():
    assert "binary frames are not accepted" in str(refusal(json.dumps({"type": "ack", "id": ID}).encode()))


def test_a_frame_that_is_not_json_is_refused():
    assert "not JSON" in str(refusal("{type: ack"))


def test_an_empty_frame_is_refused():
    assert "not JSON" in str(refusal(""))


@pytest.mark.parametrize("frame", ["[]", '["ack"]', '"ack"', "42", "null", "true"], ids=["empty array", "array", "string", "number", "null", "bool"])
def test_a_json_value_that_is_not_an_object_is_refused(frame):
    assert "must be a JSON object" in str(refusal(frame))


def test_an_unknown_frame_type_is_refused_naming_the_type():
    text = str(refusal(json.dumps({"type": "subscribe", "channel": "x"})))

    assert "'subscribe'" in text and "expected ack, refresh or ping" in text


def test_a_frame_without_a_type_is_refused():
    assert "no type" in str(refusal(json.dumps({"id": ID})))


def test_an_unknown_type_is_shortened_in_the_error():
    assert "x" * 41 not in str(refusal(json.dumps({"type": "x" * 500})))


@pytest.mark.parametrize(
    "bad_id",
    [None, "", "nope", ID.upper(), ID + "0", 12345, [ID]],
    ids=["missing", "empty", "word", "uppercase", "too long", "number", "list"],
)
def test_an_ack_with_a_bad_id_is_refused(bad_id):
    frame = {"type": "ack"} if bad_id is None else {"type": "ack", "id": bad_id}

    assert "ack needs the id of a message frame" in str(refusal(json.dumps(frame)))


@pytest.mark.parametrize(
    "frame",
    [b"\x00", "not json", "[1]", '{"type": "nope"}', '{"type": "ack", "id": "x"}'],
    ids=["binary", "not json", "array", "unknown type", "bad ack id"],
)
def test_every_refusal_carries_the_bad_request_close_code(frame):
    assert refusal(frame).code is CloseCode.BAD_REQUEST


def test_a_deeply_nested_frame_is_refused_as_a_bad_request():
    assert refusal("[" * 1500).code is CloseCode.BAD_REQUEST


def test_a_protocol_error_reason_fits_in_a_close_frame():
    assert len(ProtocolError("é" * 200).reason.encode()) <= 123


def test_a_protocol_error_can_carry_another_close_code():
    assert ProtocolError("later", CloseCode.TRY_AGAIN_LATER).code is CloseCode.TRY_AGAIN_LATER


def test_protocol_error_is_a_value_error():
    assert issubclass(ProtocolError, ValueError)


# --- since ------------------------------------------------------------------------------------


def test_an_absent_since_means_no_resume():
    assert parse_since(None) is None


def test_an_empty_since_means_no_resume():
    assert parse_since("") is None


def test_a_valid_since_is_returned_unchanged():
    assert parse_since(ID) == ID


@pytest.mark.parametrize("since", ["garbage", ID.upper(), ID[:-1], ID + "a", " " + ID[1:]], ids=["word", "uppercase", "short", "long", "space"])
def test_a_since_that_is_not_a_message_id_is_refused(since):
    with pytest.raises(ProtocolError, match="since must be the id of a message frame"):
        parse_since(since)


def test_a_bad_since_carries_the_bad_request_close_code():
    with pytest.raises(ProtocolError) as caught:
        parse_since("garbage")

    assert caught.value.code is CloseCode.BAD_REQUEST


# --- server frames ----------------------------------------------------------------------------


def test_a_message_frame_is_json_with_type_id_and_data():
    frame = message_frame({"id": ID, "data": {"text": "hi", "n": [1, None]}, "to": ["alice"], "ts": 1.0})

    assert json.loads(frame) == {"type": "message", "id": ID, "data": {"text": "hi", "n": [1, None]}}


def test_a_message_frame_keeps_unicode_characters_unescaped():
    frame = message_frame({"id": ID, "data": {"text": "héllo ✓ 😀"}})

    assert "héllo ✓ 😀" in frame


def test_a_message_frame_round_trips_unicode_data():
    data = {"text": "héllo ✓ 😀", "quote": 'say "hi"\n'}

    assert json.loads(message_frame({"id": ID, "data": data}))["data"] == data


@pytest.mark.parametrize("data", [None, 0, "", [], "plain"], ids=["null", "zero", "empty string", "empty list", "string"])
def test_a_message_frame_carries_non_object_data_unchanged(data):
    assert json.loads(message_frame({"id": ID, "data": data}))["data"] == data


def test_a_message_frame_leaves_out_routing_fields():
    frame = json.loads(message_frame({"id": ID, "data": 1, "to": ["alice"], "ts": 5.0}))

    assert set(frame) == {"type", "id", "data"}


def test_a_hello_frame_names_node_user_and_connection_and_when_the_token_expires():
    assert json.loads(hello_frame("10.0.0.1:8001", "alice", "c1", 1_700_003_600, 1_700_000_000.04, 145)) == {
        "type": "hello", "node": "10.0.0.1:8001", "user": "alice", "conn": "c1", "expires_at": 1_700_003_600, "expires_in": 3600.0, "ping": True,
        "ack_ids": 145}


def test_a_hello_frame_of_a_token_without_expiry_says_null():
    frame = json.loads(hello_frame("10.0.0.1:8001", "alice", "c1"))

    assert frame["expires_at"] is None and frame["expires_in"] is None


def test_expires_in_counts_from_the_nodes_clock_and_never_goes_below_zero():
    assert json.loads(refreshed_frame(1_000, 990.25)) == {"type": "refreshed", "expires_at": 1_000, "expires_in": 9.8}
    assert json.loads(refreshed_frame(1_000, 1_005.0))["expires_in"] == 0.0


def test_a_refresh_error_frame_carries_its_reason():
    assert json.loads(refresh_error_frame("auth unavailable, try again")) == {"type": "refresh_error", "reason": "auth unavailable, try again"}


# --- refresh ----------------------------------------------------------------------------------


def test_a_refresh_frame_parses_to_a_refresh_with_its_token():
    assert parse_client_frame(json.dumps({"type": "refresh", "token": "eyJ.a.b"})) == Refresh("eyJ.a.b")


@pytest.mark.parametrize("body", [{"type": "refresh"}, {"type": "refresh", "token": ""}, {"type": "refresh", "token": 12},
                                  {"type": "refresh", "token": ["eyJ"]}, {"type": "refresh", "token": None}])
def test_a_refresh_without_a_token_string_is_a_bad_request(body):
    error = refusal(json.dumps(body))

    assert error.code == CloseCode.BAD_REQUEST and "refresh needs a token" in str(error)


def test_a_resumed_frame_reports_since_count_and_truncation():
    assert json.loads(resumed_frame(ID, 12, True)) == {"type": "resumed", "since": ID, "replayed": 12, "truncated": True}


def test_a_resumed_frame_without_truncation_says_false():
    assert json.loads(resumed_frame(ID, 0, False))["truncated"] is False


# --- ping ---------------------------------------------------------------------------------------


def test_a_ping_frame_parses_to_a_ping_whatever_else_it_carries():
    assert parse_client_frame('{"type": "ping"}') == Ping()
    assert parse_client_frame(json.dumps({"type": "ping", "t": 12})) == Ping()


def test_the_pong_frame_is_a_json_object_of_type_pong():
    assert json.loads(PONG_FRAME) == {"type": "pong"}


@pytest.mark.parametrize("origin, allowed, expected", [
    ("https://app.example.com", ("https://app.example.com",), True),
    ("https://app.example.com/", ("https://app.example.com",), True),
    ("HTTPS://App.Example.COM", ("https://app.example.com",), True),  # scheme and host are case-insensitive
    ("https://app.example.com:8443", ("https://app.example.com",), False),
    ("http://app.example.com", ("https://app.example.com",), False),
    ("https://evil.example", ("https://app.example.com", "http://localhost:3000"), False),
    ("null", ("null",), True),
    ("https://anything.example", ("*",), True),
])
def test_an_origin_is_allowed_as_browsers_compare_origins(origin, allowed, expected):
    assert protocol.origin_allowed(origin, allowed) is expected

"""Pure tests of ``wsnode.consumer.parse_delivery``: decoded Celery protocol-2 headers and body in."""

from __future__ import annotations

import pytest

from wsnode.consumer import BadDelivery, Delivery, parse_delivery

HEADERS = {"task": "wsnode.deliver", "id": "task-1"}
LIVE = {"id": "018bcfe56800000001a1b2c3", "to": ["alice", "bob"], "data": {"text": "hi"}, "ts": 1.0}
BROADCAST = {"id": "018bcfe56800000002a1b2c3", "to": "*", "data": 1, "ts": 2.0}
REPLAYED = {"id": "018bcfe56800000003a1b2c3", "data": [1, 2]}


def body(envelopes, kwargs=None, embed=None) -> list:
    return [[envelopes], {} if kwargs is None else kwargs, {} if embed is None else embed]


def test_a_live_batch_parses_to_its_envelopes():
    assert parse_delivery(HEADERS, body([LIVE, BROADCAST])).envelopes == [LIVE, BROADCAST]


def test_a_live_batch_has_no_connection_or_replay_info():
    delivery = parse_delivery(HEADERS, body([LIVE]))

    assert (delivery.conn, delivery.replay) == (None, None)


def test_an_empty_batch_is_accepted():
    assert parse_delivery(HEADERS, body([])).envelopes == []


def test_a_tuple_body_is_accepted_like_a_list():
    assert parse_delivery(HEADERS, ([[LIVE]], {}, {})).envelopes == [LIVE]


def test_a_body_with_null_kwargs_is_accepted():
    assert parse_delivery(HEADERS, [[[LIVE]], None, {}]).envelopes == [LIVE]


def test_replay_kwargs_conn_and_replay_are_passed_through():
    replay = {"last": True, "truncated": False, "count": 1}

    delivery = parse_delivery(HEADERS, body([REPLAYED], {"conn": "c1", "replay": replay}))

    assert delivery == Delivery([REPLAYED], "c1", replay)


def test_a_replay_envelope_does_not_need_to():
    assert parse_delivery(HEADERS, body([REPLAYED], {"conn": "c1", "replay": {"last": False}})).envelopes == [REPLAYED]


def test_a_wrong_task_name_is_a_bad_delivery():
    with pytest.raises(BadDelivery, match="'tasks.collect' on a node queue"):
        parse_delivery({"task": "tasks.collect"}, body([LIVE]))


def test_the_wrong_task_error_names_the_task_that_belongs_there():
    with pytest.raises(BadDelivery, match="only wsnode.deliver belongs here"):
        parse_delivery({"task": "other"}, body([LIVE]))


@pytest.mark.parametrize("headers", [{}, None], ids=["no task header", "no headers"])
def test_missing_headers_are_a_bad_delivery(headers):
    with pytest.raises(BadDelivery):
        parse_delivery(headers, body([LIVE]))


@pytest.mark.parametrize(
    "bad_body",
    [
        None,
        "text",
        {"envelopes": [LIVE]},
        [],
        [[[LIVE]]],
        [[LIVE], {}, {}],
        [[[LIVE], [LIVE]], {}, {}],
        [[], {}, {}],
        ["envelopes", {}, {}],
    ],
    ids=["None", "string", "dict", "empty list", "one item", "args not nested", "two args", "no args", "args a string"],
)
def test_a_body_of_the_wrong_shape_is_a_bad_delivery(bad_body):
    with pytest.raises(BadDelivery):
        parse_delivery(HEADERS, bad_body)


@pytest.mark.parametrize("kwargs", [["c1"], "c1", 5], ids=["list", "string", "int"])
def test_kwargs_that_are_not_an_object_are_a_bad_delivery(kwargs):
    with pytest.raises(BadDelivery):
        parse_delivery(HEADERS, [[[LIVE]], kwargs, {}])


@pytest.mark.parametrize(
    "envelopes",
    [{"id": "x", "data": 1}, "envelopes", None],
    ids=["an object", "a string", "null"],
)
def test_envelopes_that_are_not_a_list_are_a_bad_delivery(envelopes):
    with pytest.raises(BadDelivery, match="envelopes must be a list"):
        parse_delivery(HEADERS, body(envelopes))


@pytest.mark.parametrize(
    "envelope",
    [{"to": ["alice"], "data": 1}, {"id": "x", "to": ["alice"]}, "not an object", ["id", "data"], {"id": 7, "to": ["alice"], "data": 1},
     {"id": None, "to": ["alice"], "data": 1}],
    ids=["no id", "no data", "a string", "a list", "a number id", "a null id"],
)
def test_an_envelope_without_id_and_data_is_a_bad_delivery(envelope):
    with pytest.raises(BadDelivery, match="objects with a string id and data"):
        parse_delivery(HEADERS, body([LIVE, envelope]))


def test_an_envelope_without_id_is_a_bad_delivery_even_in_a_replay():
    with pytest.raises(BadDelivery):
        parse_delivery(HEADERS, body([{"data": 1}], {"conn": "c1", "replay": {"last": True}}))


def test_an_envelope_with_null_data_is_accepted():
    envelope = {"id": "x", "to": ["alice"], "data": None}

    assert parse_delivery(HEADERS, body([envelope])).envelopes == [envelope]


@pytest.mark.parametrize(
    "to",
    [None, "alice", {"alice": 1}, [["bob"]], ["alice", 7], [None]],
    ids=["missing", "a single user string", "an object", "a nested list", "a number among users", "a null user"],
)
def test_a_live_envelope_without_a_list_or_star_to_is_a_bad_delivery(to):
    envelope = {"id": "x", "data": 1} if to is None else {"id": "x", "data": 1, "to": to}

    with pytest.raises(BadDelivery, match="a live envelope needs to"):
        parse_delivery(HEADERS, body([LIVE, envelope]))


def test_a_live_envelope_without_to_is_a_bad_delivery_even_with_replay_info_but_no_conn():
    with pytest.raises(BadDelivery):
        parse_delivery(HEADERS, body([REPLAYED], {"replay": {"last": True}}))


def test_bad_delivery_is_a_value_error():
    assert issubclass(BadDelivery, ValueError)


@pytest.mark.parametrize("conn", [7, ["c1"], {"id": "c1"}], ids=["a number", "a list", "an object"])
def test_a_replay_whose_conn_is_not_a_string_is_a_bad_delivery(conn):
    with pytest.raises(BadDelivery, match="conn must be a connection id"):
        parse_delivery(HEADERS, body([REPLAYED], {"conn": conn, "replay": {"last": True}}))


@pytest.mark.parametrize("replay", [{"count": None}, {"count": "3"}, {"count": 1.5}, {"count": True}, ["last"], "last"],
                         ids=["null count", "string count", "fractional count", "bool count", "a list", "a string"])
def test_replay_info_that_the_node_cannot_read_is_a_bad_delivery(replay):
    """The node writes a batch's deliveries in one pass: such a value found there stopped the pass,
    and the batch's good deliveries were not written."""
    with pytest.raises(BadDelivery, match="replay must be an object whose count is a whole number"):
        parse_delivery(HEADERS, body([REPLAYED], {"conn": "c1", "replay": replay}))


def test_replay_info_without_a_count_is_accepted():
    assert parse_delivery(HEADERS, body([REPLAYED], {"conn": "c1", "replay": {"last": True}})).replay == {"last": True}

"""Pure tests of how one ``tasks.collect`` request of a batch is read: kwargs in, a Message and an
idempotency key (or InvalidMessage) out."""

from __future__ import annotations

import pytest
from celery_batches import SimpleRequest

from tasks.collect import _parse_collect
from tasks.messages import InvalidMessage


def request(kwargs: dict | None = None, args: tuple = (), task_id: str = "t-1") -> SimpleRequest:
    return SimpleRequest(task_id, "tasks.collect", args, kwargs or {}, {}, "worker@host", False, None, None, {})


def test_a_request_without_a_key_is_keyed_by_its_task_id():
    message, key = _parse_collect(request({"to": "alice", "data": {"n": 1}}, task_id="abc"))
    assert key == "task:abc"
    assert message.to == ("alice",) and message.data == {"n": 1}


def test_a_request_with_a_key_is_keyed_by_it_whatever_its_task_id():
    _, key = _parse_collect(request({"to": ["a", "b"], "data": 1, "key": "order-17"}, task_id="abc"))
    assert key == "key:order-17"


@pytest.mark.parametrize("key", ["", 17, "k" * 201])
def test_a_key_that_is_not_a_short_string_is_refused(key):
    with pytest.raises(InvalidMessage, match='"key" must be a non-empty string of at most 200 characters'):
        _parse_collect(request({"to": "alice", "data": 1, "key": key}))


def test_positional_arguments_are_refused_with_the_form_to_use():
    with pytest.raises(InvalidMessage, match="keyword arguments only"):
        _parse_collect(request(args=("alice", 1)))


def test_a_request_without_to_is_refused_as_a_plain_collect_would_be():
    with pytest.raises(InvalidMessage, match="to"):
        _parse_collect(request({"data": 1}))


def test_an_unexpected_argument_is_named():
    with pytest.raises(InvalidMessage, match="colour"):
        _parse_collect(request({"to": "alice", "data": 1, "colour": "red"}))

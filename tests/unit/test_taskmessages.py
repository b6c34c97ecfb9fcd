"""What a worker refuses before Celery handles a message on its task queues
(``tasks.envelopes``, ``tasks.jsondecoder``, ``tasks.taskrequest``'s eta and ``tasks.taskmessages``'s consumer)."""

from __future__ import annotations

import json

import pytest

from tasks.envelopes import MAX_TIME_LIMIT, arguments_problem, depth_problem, envelope_problem, not_a_task_message, task_id_of

TASK_ID = "4f1e1d5c-0000-4000-8000-000000000000"
HEADERS = {"task": "tasks.collect", "id": TASK_ID}


def test_a_protocol_2_message_passes():
    assert envelope_problem(HEADERS, [[], {"to": "ann", "data": 1}, {"callbacks": None}]) is None
    assert envelope_problem(HEADERS, ((), {}, None)) is None


def test_a_protocol_1_message_and_a_protocol_1_body_under_protocol_2_headers_pass():
    assert envelope_problem({}, {"args": [], "kwargs": {}, "id": "x", "task": "tasks.collect"}) is None
    assert envelope_problem({}, {"id": "x", "task": "tasks.collect"}) is None  # Celery fills in no arguments
    assert envelope_problem(HEADERS, {"args": [], "kwargs": {}}) is None


@pytest.mark.parametrize("limits", [None, [None, None], [10, 5], (1.5, None), [None, 0], 0, [], "", [MAX_TIME_LIMIT, MAX_TIME_LIMIT]])
def test_time_limits_that_apply_async_sends_pass(limits):
    assert envelope_problem({**HEADERS, "timelimit": limits}, [[], {}, {}]) is None


@pytest.mark.parametrize("limits", [5, "5", [1, 2, 3], [1], ["a", None], [True, None], [-1, None], [float("inf"), None], [float("nan"), None],
                                    [10**400, None], [None, 10**10], {"hard": 1}])
def test_a_time_limit_celery_cannot_unpack_or_use_is_refused_in_either_protocol(limits):
    says = "its timelimit header is "
    assert envelope_problem({**HEADERS, "timelimit": limits}, [[], {}, {}]).startswith(says)
    assert envelope_problem({}, {"args": [], "kwargs": {}, "id": "x", "task": "tasks.status", "timelimit": limits}).startswith(says)
    assert envelope_problem(HEADERS, {"args": [], "kwargs": {}, "timelimit": limits}).startswith(says)  # protocol 2 headers, protocol 1 body


def test_a_message_that_names_no_task_is_left_to_celery():
    # Celery logs it as an unknown message and discards it, which is safe
    assert envelope_problem({}, [[], {}, {}]) is None
    assert envelope_problem({"id": TASK_ID}, "hello") is None


@pytest.mark.parametrize(("headers", "body", "says"), [
    (HEADERS, "just a string", "its body is of type str"),
    (HEADERS, [1, 2], "its body is of type list with 2 items"),
    (HEADERS, {"a": 1}, "its body is of type dict"),
    (HEADERS, 5, "its body is of type int"),
    (HEADERS, [[], ["to", "x"], {}], "its args, kwargs and embed are of types list, list and dict"),
    (HEADERS, {"args": "x", "kwargs": {}}, "its args, kwargs and embed are of types str, dict and NoneType"),
    ({"task": "tasks.collect"}, [[], {}, {}], "it has no task id"),
    ({"task": "tasks.nope", "id": ["a"]}, [[], {}, {}], "it has no task id"),
    ({"task": "tasks.collect", "id": "bad-\ud800"}, [[], {}, {}], "its id is not valid Unicode: it holds a lone surrogate '\\ud800' at position 4"),
    ({"task": "tasks.collect", "id": TASK_ID, "root_id": "\udfff"}, [[], {}, {}], "its root_id is not valid Unicode: it holds a lone surrogate '\\udfff' at position 0"),
    ({}, {"task": "tasks.collect", "id": TASK_ID, "group": "g\ud800", "args": [], "kwargs": {}}, "its group is not valid Unicode: it holds a lone surrogate '\\ud800' at position 1"),
    ({"task": "tasks.collect", "id": "req-1\n[2026-12-06 22:00:00,000: ERROR/MainProcess] forged"}, [[], {}, {}],
     "its id holds the control character '\\n': ids are written into log lines"),
    ({"task": "tasks.collect", "id": TASK_ID, "parent_id": "p\u2028q"}, [[], {}, {}],
     "its parent_id holds the control character '\\u2028': ids are written into log lines"),
    ({"task": ["tasks.collect"], "id": TASK_ID}, [[], {}, {}], "its task name is of type list"),
    ({"task": "", "id": TASK_ID}, [[], {}, {}], "its task name is of type str"),
    (["task"], [[], {}, {}], "its headers are of type list"),
    ({}, {"task": "tasks.nope", "args": []}, "it has no task id"),
    ({}, {"task": {"a": 1}, "id": TASK_ID}, "its task name is of type dict"),
    ({}, {"task": "tasks.collect", "id": TASK_ID, "args": [], "kwargs": []}, "its args, kwargs and embed are of types list, list and NoneType"),
])
def test_an_envelope_celery_cannot_read_is_named(headers, body, says):
    assert envelope_problem(headers, body) == says


def test_the_task_id_comes_from_the_headers_or_a_protocol_1_body():
    assert task_id_of(HEADERS, [[], {}, {}]) == TASK_ID
    assert task_id_of({}, {"id": "p1", "task": "t"}) == "p1"
    assert task_id_of({"id": ["x"]}, None) is None
    assert task_id_of(None, "x") is None


def test_arguments_must_be_a_list_an_object_and_an_object_or_null():
    assert arguments_problem([], {}, None) is None
    assert arguments_problem((), {"to": "ann"}, {}) is None
    assert arguments_problem([], ["to", "ann"], {}) == "its args, kwargs and embed are of types list, list and dict"
    assert arguments_problem(5, {}, {}) == "its args, kwargs and embed are of types int, dict and dict"
    assert arguments_problem([], {}, "x") == "its args, kwargs and embed are of types list, dict and str"


def test_the_error_says_what_was_expected_and_how_to_send_a_task():
    text = str(not_a_task_message("its body is of type str"))
    assert text.startswith("not a Celery task message: its body is of type str;")
    assert "[args (a list), kwargs (an object), embed (an object)]" in text and "send_task" in text


def _deep(levels: int) -> object:
    value: object = 1
    for _ in range(levels):
        value = [value]
    return value


def test_a_request_nested_deeper_than_the_bound_is_named_and_a_shallow_body_is_not_walked():
    body = [[], {"to": "ann", "data": _deep(300)}, {}]
    raw = json.dumps(body)
    assert depth_problem(raw, False, body, 200) == "its arguments nest lists and objects more than 200 levels deep (data may nest at most 64)"
    assert depth_problem(raw.encode(), False, body, 200) is not None
    assert depth_problem(raw, False, body, 400) is None
    # few openers in the raw body: no walk (the payload given here would fail one)
    assert depth_problem(b'[[], {"to": "ann", "data": 1}, {}]', False, body, 200) is None
    # a compressed body's bytes say nothing of its depth
    assert depth_problem(b"x\x9c", True, body, 200) is not None


def nested(levels: int) -> list:
    value: list = []
    for _ in range(levels):
        value = [value]
    return value


def test_headers_nested_deeper_than_the_pool_can_take_are_refused_for_any_task():
    """This process pickles every request's headers for its pool: nested near Python's recursion
    limit, that raised out of the worker's loop and stopped the worker, for any task."""
    assert envelope_problem({**HEADERS, "deep": nested(600)}, [[], {}, {}]) == "its headers nest lists and objects more than 200 levels deep"
    assert envelope_problem({"task": "tasks.status", "id": TASK_ID, "deep": {"a": nested(201)}}, [[], {}, {}]) is not None
    assert envelope_problem({**HEADERS, "fine": nested(150)}, [[], {}, {}]) is None


def test_a_protocol_1_body_nested_deeper_than_the_pool_can_take_is_refused():
    """Celery converts a protocol 1 body in this process and pickles it for the pool."""
    assert envelope_problem(HEADERS, {"args": [nested(600)], "kwargs": {}}).startswith("its protocol 1 body nests lists and objects more than 350 levels deep")
    assert envelope_problem({}, {"args": [], "kwargs": {"x": nested(400)}, "id": "x", "task": "tasks.status"}).startswith("its protocol 1 body nests")
    # An older client's chain of 100 tasks nests about 300 levels: it runs.
    assert envelope_problem({}, {"args": [nested(300)], "kwargs": {}, "id": "x", "task": "tasks.status"}) is None


@pytest.mark.parametrize(("fields", "says"), [
    ({"stamped_headers": 5}, "its stamped_headers header is 5, not a list of header names"),
    ({"stamped_headers": [["a"]]}, "its stamped_headers header is [['a']], not a list of header names"),
    ({"stamped_headers": ["a"], "stamps": "a"}, "its stamps header is 'a', not an object"),
    ({"shadow": ["tasks.collect"]}, "its shadow (the task name to show) is of type list"),
    ({"shadow": {"a": 1}}, "its shadow (the task name to show) is of type dict"),
])
def test_a_shadow_or_stamps_celery_cannot_count_or_look_up_is_refused_in_either_protocol(fields, says):
    # Each raised out of the worker's loop as Celery read the request, and stopped the worker.
    assert envelope_problem({**HEADERS, **fields}, [[], {}, {}]) == says
    assert envelope_problem({}, {"args": [], "kwargs": {}, "id": "x", "task": "tasks.status", **fields}) == says
    assert envelope_problem(HEADERS, {"args": [], "kwargs": {}, **fields}) == says  # protocol 2 headers, protocol 1 body


@pytest.mark.parametrize(("headers", "says"), [
    ({"timelimit": 5}, "its timelimit header is 5, not [hard, soft]"),
    ({"shadow": ["x"]}, "its shadow (the task name to show) is of type list"),
    ({"stamps": "a"}, "its stamps header is 'a', not an object"),
    ({"retries": "x"}, "its retries header is 'x', not a whole number of retries made (0 or more)"),
    ({"id": ["x"]}, "it has no task id"),
])
def test_the_headers_of_a_protocol_1_message_are_checked_as_the_fields_they_override(headers, says):
    # Celery lets them override the body's fields; each of these raised out of the worker's loop
    # (or, for retries, failed every request of its batch).
    body = {"args": [], "kwargs": {"to": "ann", "data": 1}, "id": TASK_ID, "task": "tasks.collect"}

    assert envelope_problem(headers, body).startswith(says)
    assert envelope_problem({"retries": 2, "timelimit": [None, None]}, body) is None


@pytest.mark.parametrize("fields", [{"shadow": None}, {"shadow": ""}, {"shadow": "my.name"}, {"stamped_headers": None, "stamps": None},
                                    {"stamped_headers": [], "stamps": {}}, {"stamped_headers": ["mark"], "stamps": {"mark": ["a", 1]}}])
def test_the_shadow_and_stamps_celery_sends_pass(fields):
    assert envelope_problem({**HEADERS, **fields}, [[], {}, {}]) is None


class _Backend:
    def __init__(self) -> None:
        self.failed: list[tuple[str, Exception]] = []

    def mark_as_failure(self, task_id, exc, request=None) -> None:
        self.failed.append((task_id, exc))


def _refused_by_celery(exc: Exception, connection_lost: bool = False) -> str:
    """The error the worker's consumer stores for a message Celery refused with ``exc``, and that
    it rejects the message only once that error is written (the failure writer's thread, then the
    loop: here ``call_soon`` runs what it is given at once) on the channel it came on; or, with
    ``connection_lost`` (the consumer reads another channel by then), that it does not reject it."""
    import threading
    from types import SimpleNamespace

    from tasks.taskmessages import Consumer

    rejected, handed_back = threading.Event(), threading.Event()
    consumer = Consumer.__new__(Consumer)
    consumer.app = SimpleNamespace(backend=_Backend())
    consumer.connection_errors = ()
    consumer.call_soon = lambda then: (then(), handed_back.set())
    channel = object()
    consumer.task_consumer = SimpleNamespace(channel=object() if connection_lost else channel)
    message = SimpleNamespace(headers={"id": "t-1", "task": "tasks.collect"}, properties={}, body=b"[[], {}, {}]", channel=channel,
                              reject_log_error=lambda logger, errors: rejected.set())
    consumer.on_invalid_task(None, message, exc)
    assert handed_back.wait(10), "what follows the failure's write was not handed back to the loop"
    assert rejected.is_set() != connection_lost, "rejected on a channel that is gone" if connection_lost else "not rejected"
    ((task_id, error),) = consumer.app.backend.failed
    assert task_id == "t-1"
    return str(error)


def test_a_refused_message_whose_broker_connection_was_lost_while_its_failure_waited_is_written_and_left_to_the_broker():
    """Its channel is gone: the broker gives it back, and the next read refuses it again."""
    from celery.exceptions import InvalidTaskError

    assert _refused_by_celery(InvalidTaskError("invalid ETA value 'garbage'"), connection_lost=True) == "not run: invalid ETA value 'garbage'"


def test_a_refused_message_without_a_task_id_is_rejected_at_once_with_nothing_written():
    """Nobody waits for its result: no failure write, no thread, no events (none can name it)."""
    from types import SimpleNamespace

    from tasks.envelopes import not_a_task_message
    from tasks.taskmessages import Consumer

    rejected = []
    consumer = Consumer.__new__(Consumer)
    consumer.app = SimpleNamespace(backend=_Backend())
    consumer.connection_errors = ()
    consumer.event_dispatcher = SimpleNamespace(enabled=True, send=lambda *args, **kwargs: pytest.fail("an event sent for no task id"))
    message = SimpleNamespace(headers={"task": "tasks.collect"}, properties={}, delivery_info={"routing_key": "collect"},
                              reject_log_error=lambda logger, errors: rejected.append(True))
    consumer.refuse(message, [[], {}, {}], not_a_task_message("it has no task id"))
    assert rejected == [True]
    assert consumer.app.backend.failed == [] and consumer._failure_writer is None


def test_a_message_of_a_serializer_the_worker_refuses_is_told_to_send_json():
    """A sender with task_serializer="pickle" (or yaml, msgpack) got "not run: Refusing to
    deserialize untrusted content of type pickle (...)": what was refused, not what to send."""
    from kombu.exceptions import ContentDisallowed

    text = _refused_by_celery(ContentDisallowed("Refusing to deserialize untrusted content of type pickle (application/x-python-serialize)"))
    assert text.startswith("not run: Refusing to deserialize untrusted content of type pickle")
    assert "accepts JSON only" in text and 'task_serializer="json"' in text


def test_other_messages_celery_refuses_keep_their_reason_alone():
    from celery.exceptions import InvalidTaskError

    assert _refused_by_celery(InvalidTaskError("invalid ETA value 'garbage'")) == "not run: invalid ETA value 'garbage'"


@pytest.mark.parametrize("retries", ["abc", [1], -1, 1.5, True])
def test_a_retries_header_that_is_not_a_count_is_refused(retries):
    assert envelope_problem({**HEADERS, "retries": retries}, [[], {}, {}]) == (
        f"its retries header is {retries!r}, not a whole number of retries made (0 or more)")


@pytest.mark.parametrize("retries", [None, 0, 3])
def test_the_retries_celery_sends_pass(retries):
    assert envelope_problem({**HEADERS, "retries": retries}, [[], {}, {}]) is None


def test_the_workers_json_decoder_gives_kombus_hook_only_the_objects_shaped_like_its_typed_values(monkeypatch):
    """Every object of every message the worker reads goes through the decoder's object hook: an
    ordinary one is returned at once, without a second call to kombu's hook (a tenth of the time
    decoding a node's receipts took); one shaped like kombu's typed values is read as kombu reads
    it, or kept as sent when it is none."""
    import datetime

    from kombu.utils import json as kombu_json

    from tasks.jsondecoder import json_loads

    given = []
    kombus = kombu_json.object_hook
    monkeypatch.setattr(kombu_json, "object_hook", lambda obj: given.append(obj) or kombus(obj))
    receipts = [{"id": f"{n:024x}", "user": "ann", "state": "acked", "at": 1.5} for n in range(100)]
    assert json_loads(json.dumps([[], {"receipts": receipts}, {"callbacks": None}]).encode()) == [[], {"receipts": receipts}, {"callbacks": None}]
    assert given == []
    typed = [{"__type__": "datetime", "__value__": "2020-01-01T00:00:00"}, {"__type__": "no-such-type", "__value__": 1}]
    assert json_loads(json.dumps(typed)) == [datetime.datetime(2020, 1, 1), typed[1]]
    assert given == typed


def test_an_eta_no_clock_holds_raises_where_one_a_second_ahead_gives_a_time_a_second_ahead():
    import datetime
    import time
    from zoneinfo import ZoneInfo

    from tasks.taskrequest import eta_timestamp

    year_1_east = datetime.datetime(1, 1, 1, tzinfo=datetime.timezone(datetime.timedelta(hours=5)))
    with pytest.raises((OverflowError, ValueError)):  # read as UTC (what Celery's clients send), it is before the year 1
        eta_timestamp(year_1_east, True, ZoneInfo("UTC"))
    for utc in (True, False):
        soon = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(seconds=1)
        assert eta_timestamp(soon, utc, ZoneInfo("UTC")) - time.monotonic() == pytest.approx(1, abs=0.2)


def _consumer_that_records(handed_back=None):
    import threading
    from types import SimpleNamespace

    from tasks.taskmessages import Consumer

    handed_back = handed_back or threading.Event()
    consumer = Consumer.__new__(Consumer)
    consumer.app = SimpleNamespace(backend=_Backend())
    consumer.connection_errors = ()
    consumer.call_soon = lambda then: (then(), handed_back.set())
    return consumer, handed_back


PROTOCOL_1_BODY = json.dumps({"id": TASK_ID, "task": "tasks.collect", "args": [], "kwargs": {"to": "alice", "data": 1}}).encode()


@pytest.mark.parametrize("content_type", ["application/json; charset=utf-8", "Application/JSON", "text/plain"])
def test_a_protocol_1_message_of_a_content_type_kombu_refuses_fails_under_the_task_id_of_its_body(content_type):
    """Another client's protocol 1 message (gocelery, PHP, pika by hand) keeps its task id in its
    body: Celery's decode error of it stored nothing, and its caller waited for ever."""
    from types import SimpleNamespace

    from kombu.exceptions import ContentDisallowed

    consumer, handed_back = _consumer_that_records()
    channel = object()
    consumer.task_consumer = SimpleNamespace(channel=channel)
    message = SimpleNamespace(headers={}, properties={}, body=PROTOCOL_1_BODY, channel=channel, content_type=content_type,
                              content_encoding="utf-8", ack_log_error=lambda logger, errors: None)
    consumer.on_decode_error(message, ContentDisallowed(f"Refusing to deserialize untrusted content of type {content_type}"))
    assert handed_back.wait(10)
    ((task_id, error),) = consumer.app.backend.failed
    assert task_id == TASK_ID
    assert str(error).startswith("not run: Refusing to deserialize untrusted content") and "accepts JSON only" in str(error)


@pytest.mark.parametrize("content_type, says", [(None, "it has no content type"), ("", "it has no content type"),
                                                ("application/data", "its content type is 'application/data'")])
def test_a_message_whose_body_kombu_left_undecoded_is_refused_for_its_content_type(content_type, says):
    """Without a content type kombu hands the body over as it came: Celery called a protocol 1 one
    "unknown message" and dropped it with no result, and refused a protocol 2 one as "its body is
    of type bytes"."""
    from tasks.envelopes import content_type_problem

    assert content_type_problem(content_type, PROTOCOL_1_BODY) == (
        f"{says}, so its body was not decoded: send it as application/json (content-encoding utf-8)")
    assert content_type_problem("application/json", {"id": TASK_ID}) is None
    assert content_type_problem("application/json", "a JSON string") is None


def test_an_undecoded_protocol_1_message_is_refused_under_the_task_id_of_its_body():
    from types import SimpleNamespace

    from tasks.envelopes import content_type_problem
    from tasks.messages import InvalidMessage

    consumer, handed_back = _consumer_that_records()
    channel = object()
    consumer.task_consumer = SimpleNamespace(channel=channel)
    rejected = []
    message = SimpleNamespace(headers={}, properties={}, delivery_info={"routing_key": "collect"}, channel=channel,
                              reject_log_error=lambda logger, errors: rejected.append(True))
    consumer.refuse(message, PROTOCOL_1_BODY, InvalidMessage(f"not run: {content_type_problem(None, PROTOCOL_1_BODY)}"))
    assert handed_back.wait(10) and rejected == [True]
    ((task_id, error),) = consumer.app.backend.failed
    assert task_id == TASK_ID and "it has no content type" in str(error)


@pytest.mark.parametrize("body", [b"not json", b"[1, 2]", json.dumps({"id": "a\nb"}).encode(), json.dumps({"id": "\ud800"}).encode(), b"x" * (2 << 20)])
def test_no_task_id_is_read_from_an_undecoded_body_without_one_envelope_problem_would_accept(body):
    from tasks.envelopes import raw_task_id

    assert raw_task_id(body) is None

"""What a worker refuses before Celery builds a request from a task message
(``tasks.taskmessages``).  Pure."""

from __future__ import annotations

import pytest

from tasks.taskmessages import arguments_problem, body_problem, not_a_task_message

HEADERS = {"task": "tasks.collect", "id": "4f1e1d5c-0000-4000-8000-000000000000"}


def test_a_protocol_2_message_passes():
    assert body_problem(HEADERS, [[], {"to": "ann", "data": 1}, {"callbacks": None}]) is None
    assert body_problem(HEADERS, ((), {}, None)) is None


def test_a_protocol_1_body_is_left_to_celery():
    assert body_problem({}, {"args": [], "kwargs": {}, "id": "x", "task": "tasks.collect"}) is None


@pytest.mark.parametrize(("headers", "body", "says"), [
    (HEADERS, "just a string", "its body is of type str"),
    (HEADERS, [1, 2], "its body is of type list with 2 items"),
    (HEADERS, {"a": 1}, "its body is of type dict"),
    (HEADERS, 5, "its body is of type int"),
    ({"task": "tasks.collect"}, [[], {}, {}], "its headers have no task id"),
    (None, [[], {}, {}], "its headers have no task id"),
])
def test_a_body_celery_cannot_unpack_or_a_message_without_an_id_is_named(headers, body, says):
    assert body_problem(headers, body) == says


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

"""Pure tests of how one ``tasks.collect`` request of a batch is read: kwargs in, a Message and an
idempotency key (or InvalidMessage) out."""

from __future__ import annotations

import pytest
from celery_batches import SimpleRequest

from tasks.collect import key_reused, key_reused_for_another, same_message
from tasks.collectrequests import _parse_collect
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



def test_a_collect_many_item_with_a_key_is_refused_without_being_told_that_a_key_is_accepted():
    """The item's error said "collect takes to, data and optionally key": the very argument it
    refused.  A collect_many request is keyed by its task id; a key per message is tasks.collect's."""
    from tasks.collectrequests import _parse_collect_many

    many = SimpleRequest("t-1", "tasks.collect_many", (), {"messages": [{"to": "alice", "data": 1, "key": "k-1"}]}, {}, "worker@host", False, None, None, {})
    valid, _, result = _parse_collect_many(many)
    (error,) = result([])
    assert valid == [] and error["index"] == 0
    assert "unexpected argument(s) 'key'" in error["error"] and "optionally key" not in error["error"]
    assert "tasks.collect" in error["error"]

# --- the results of a batch ----------------------------------------------------------------------

def _celery_meta(backend, req, message_id) -> dict:
    meta = backend._get_result_meta(result=message_id, state="SUCCESS", traceback=None, request=req)
    return dict(meta, task_id=req.id)


def test_each_request_of_a_batch_gets_the_result_meta_celery_would_store():
    from tasks.batchresults import success_metas
    from worker import app

    done = [(request(task_id="t-1"), "id-1"), (request(task_id="t-2"), "id-2")]
    metas = success_metas(app.backend, done)

    expected = [_celery_meta(app.backend, req, mid) for req, mid in done]
    assert [{k: v for k, v in m.items() if k != "date_done"} for m in metas] == [{k: v for k, v in m.items() if k != "date_done"} for m in expected]
    assert all(m["date_done"] for m in metas) and metas[0] is not metas[1]


def test_a_request_in_a_group_keeps_its_group_id_in_its_result():
    from tasks.batchresults import success_metas
    from worker import app

    grouped = request(task_id="t-2")
    grouped.group = "g-1"
    metas = success_metas(app.backend, [(request(task_id="t-1"), "id-1"), (grouped, "id-2")])

    assert "group_id" not in metas[0] and metas[1]["group_id"] == "g-1" and metas[1]["result"] == "id-2"


def test_a_request_whose_key_was_bound_to_another_number_of_messages_is_logged_as_rejected(monkeypatch, caplog):
    """A collect_many request sent again under a task id of its own choosing with other messages
    (or a key reused so) fails with InvalidMessage, and Celery's backend keeps the first request's
    SUCCESS as the result: the worker's log was the only place to say why, and it said nothing."""
    import logging

    import tasks.collect as collect_module
    from tasks import batchresults
    from tasks.collect import _run_batch
    from tasks.collectrequests import _parse_collect_many

    refusal = InvalidMessage("idempotency key 'task:t-1' was used before for 1 message(s), not 2: use a new key per task")
    monkeypatch.setattr(collect_module, "_persist_and_dispatch_groups", lambda groups, patient=True, retried=frozenset(): [refusal])
    stored = []
    monkeypatch.setattr(batchresults, "store_result", lambda req, value, failed=False: stored.append((req.id, value, failed)))
    many = SimpleRequest("t-1", "tasks.collect_many", (), {"messages": [{"to": "alice", "data": 1}, {"to": "bob", "data": 2}]}, {}, "worker@host", False, None, None, {})
    task = type("Task", (), {"name": "tasks.collect_many"})()

    with caplog.at_level(logging.WARNING, logger="tasks.collect"):
        outcomes = _run_batch(task, [many], _parse_collect_many)

    assert outcomes == {"t-1": ("failed", refusal)} and stored == [("t-1", refusal, True)]
    assert "tasks.collect_many t-1 rejected: idempotency key 'task:t-1' was used before for 1 message(s), not 2" in caplog.text


def test_collect_many_takes_its_list_as_a_keyword_or_as_its_one_positional_argument():
    """What the README promises: collect_many.delay([...]) and a chain that hands it a list work;
    tasks.collect itself takes keyword arguments only (above)."""
    from tasks.collectrequests import _parse_collect_many

    items = [{"to": "alice", "data": 1}]
    for args, kwargs in (((items,), {}), ((), {"messages": items})):
        valid, key, _ = _parse_collect_many(SimpleRequest("t-1", "tasks.collect_many", args, kwargs, {}, "worker@host", False, None, None, {}))
        assert [m.to for m in valid] == [("alice",)] and key == "task:t-1"
    with pytest.raises(InvalidMessage, match="takes one argument, messages"):
        _parse_collect_many(SimpleRequest("t-1", "tasks.collect_many", (items,), {"messages": items}, {}, "worker@host", False, None, None, {}))


def test_a_collect_many_list_longer_than_its_bound_fails_whole_telling_to_split_it():
    from tasks.collectrequests import COLLECT_MANY_MAX_ITEMS, _parse_collect_many

    def parse(count: int):
        items = [{"to": f"user-{n}", "data": n} for n in range(count)]
        return _parse_collect_many(SimpleRequest("t-1", "tasks.collect_many", (), {"messages": items}, {}, "worker@host", False, None, None, {}))

    valid, _, _ = parse(COLLECT_MANY_MAX_ITEMS)
    assert len(valid) == COLLECT_MANY_MAX_ITEMS
    with pytest.raises(InvalidMessage, match=f'"messages" has {COLLECT_MANY_MAX_ITEMS + 1} items; at most {COLLECT_MANY_MAX_ITEMS} .*split the list'):
        parse(COLLECT_MANY_MAX_ITEMS + 1)


def test_a_collect_many_request_of_more_deliveries_than_its_bound_fails_whole_telling_to_split_it():
    from tasks.collectrequests import COLLECT_MANY_MAX_DELIVERIES, _parse_collect_many

    users = [f"user-{n}" for n in range(10_000)]
    per_item = len(users)

    def parse(items: list):
        return _parse_collect_many(SimpleRequest("t-1", "tasks.collect_many", (), {"messages": items}, {}, "worker@host", False, None, None, {}))

    fits = [{"to": users, "data": n} for n in range(COLLECT_MANY_MAX_DELIVERIES // per_item)] + [{"to": "*", "data": "all"}]
    valid, _, _ = parse(fits)
    assert len(valid) == len(fits)
    over = COLLECT_MANY_MAX_DELIVERIES + 1
    with pytest.raises(InvalidMessage, match=f'"messages" name {over} deliveries .*; at most {COLLECT_MANY_MAX_DELIVERIES} .*split the list'):
        parse(fits + [{"to": "one-more", "data": 0}])


def test_a_reused_key_is_told_to_use_a_new_key_and_a_reused_task_id_a_new_task_id():
    assert str(key_reused("key:order-1", 1, 2)) == "idempotency key 'key:order-1' was used before for 1 message(s), not 2: use a new key per task"
    assert str(key_reused("task:t-1", 1, 2)).endswith("not 2: send each new request with a new task id (Celery's default: leave task_id unset)")


def test_a_stored_message_is_the_same_whatever_the_order_of_its_recipients():
    message, _ = _parse_collect(request({"to": ["b", "a"], "data": {"n": 1}}))
    assert same_message({"to": ["a", "b"], "data": {"n": 1}}, message)


@pytest.mark.parametrize("stored", [{"to": ["a"], "data": {"n": 1}}, {"to": ["a", "b"], "data": {"n": 2}}, {"to": "*", "data": {"n": 1}}],
                         ids=["fewer recipients", "other data", "a broadcast"])
def test_a_stored_message_with_other_recipients_or_data_is_another(stored):
    message, _ = _parse_collect(request({"to": ["a", "b"], "data": {"n": 1}}))
    assert not same_message(stored, message)


@pytest.mark.parametrize(("first", "again"), [({"n": 1}, {"n": True}), (1, 1.0), (0.0, -0.0), ([0], [False]), ({"a": None}, {"a": 0})],
                         ids=["int and bool", "int and float", "zero and minus zero", "in a list", "null and zero"])
def test_a_stored_message_whose_data_python_calls_equal_but_json_does_not_is_another(first, again):
    message, _ = _parse_collect(request({"to": "a", "data": again}))
    assert not same_message({"to": ["a"], "data": first}, message)


def test_a_retry_of_a_stored_message_is_the_same_as_the_store_gives_it_back():
    data = {"$ref": "x", "$id": 1, "$db": None, "big": 2**40, "keys": {"b": 1, "a": [1.5, "s", None]}}
    message, _ = _parse_collect(request({"to": "a", "data": data}))
    from tasks.storedocs import as_stored
    assert same_message({"to": ["a"], "data": as_stored(data)}, message)


def test_the_warning_for_a_reused_key_names_the_key_or_the_task_id_and_the_fix():
    assert key_reused_for_another("key:order-17", "01").startswith("key 'order-17' was used before for message 01")
    assert "give each message a key of its own" in key_reused_for_another("key:order-17", "01")
    assert key_reused_for_another("task:abc", "01").startswith("task id 'abc' was used before")
    assert "leave task_id unset" in key_reused_for_another("task:abc", "01")


def test_a_batch_may_hold_requests_of_both_tasks_each_read_as_its_own_tasks_even_under_a_shadow_name():
    """A flush of one collect task takes the other's requests that may run into the same batch
    (tasks.collectbatches), which one task's batch function runs: each request is read by the task
    it is of, which the worker records apart from its (possibly ``shadow``) name."""
    from tasks.collect import _other_task_part
    from tasks.collectrequests import _parse_request
    from tasks.links import CollectRequest

    def simple(task_id, name, kwargs, task_name=None):
        req = CollectRequest(task_id, name, (), kwargs, {}, "worker@host", False, None, None, {})
        req.task_name = task_name
        return req

    many = simple("m-1", "tasks.collect_many", {"messages": [{"to": "alice", "data": 1}, {"to": "bob", "data": 2}]})
    one = simple("c-1", "tasks.collect", {"to": "alice", "data": 3, "key": "k-3"})
    shadowed = simple("m-2", "nightly report", {"messages": [{"to": "carol", "data": 4}]}, task_name="tasks.collect_many")

    valid, key, result = _parse_request(many)
    assert [m.to for m in valid] == [("alice",), ("bob",)] and key == "task:m-1" and result(["i1", "i2"]) == ["i1", "i2"]
    valid, key, result = _parse_request(one)
    assert [m.to for m in valid] == [("alice",)] and key == "key:k-3" and result(["i3"]) == "i3"
    valid, key, _ = _parse_request(shadowed)
    assert [m.to for m in valid] == [("carol",)] and key == "task:m-2"
    # a tasks.collect shadowed as "tasks.collect_many": read as a collect_many, it would be refused
    valid, key, _ = _parse_request(simple("c-2", "tasks.collect_many", {"to": "dan", "data": 5}, task_name="tasks.collect"))
    assert [m.to for m in valid] == [("dan",)] and key == "task:c-2"

    collect_task = type("Task", (), {"name": "tasks.collect"})()
    storing = [(one, [object()], "key:k-3", None), (many, [object(), object()], "task:m-1", None)]
    assert _other_task_part(collect_task, [one, many], storing) == " (of them tasks.collect_many: 1 requests, 2 messages)"
    assert _other_task_part(collect_task, [one], storing[:1]) == ""

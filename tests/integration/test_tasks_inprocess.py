"""Collect and Dispatch run by an in-process Celery worker (pytest-celery's Docker-free fixtures)
against the real private Redis: what the tasks publish, checked queue by queue.

The worker consumes a private queue, ``inprocess``, so these tests never race the subprocess worker
of the end-to-end tests; the nodes here are fake addresses whose queues the tests read directly.
"""

from __future__ import annotations

import gc
import json
import logging
import time
import tracemalloc
import uuid

import pytest
import redis as redis_lib
from celery.contrib import pytest as celery_pytest

import settings
from tasks import collectrequests, pending
from tasks.collect import collect
from tasks.dispatch import dispatch
from tasks.ids import IdGenerator, is_message_id
from tasks.replay import replay, replay_many
from tasks.store import get_store
from tests.conftest import redis_now
from wsnode.registry import NODES_KEY, route_key

#: Celery's own worker fixture (pytest-celery 1.x's needs Docker).
celery_worker = celery_pytest.celery_worker

QUEUE = "inprocess"


@pytest.fixture
def celery_app(redis_server):
    from worker import app

    return app


@pytest.fixture
def celery_worker_pool():
    return "solo"


@pytest.fixture
def celery_worker_parameters():
    return {"queues": [QUEUE], "perform_ping_check": False}


@pytest.fixture
def routes(redis_server):
    return redis_lib.Redis.from_url(settings.REDIS_URL, decode_responses=True)


@pytest.fixture
def broker(redis_server):
    return redis_lib.Redis.from_url(settings.BROKER_URL)


def lease(routes, node: str, users: list[str], ttl: float = 30) -> None:
    """Leases for ``users`` and ``node``'s own, ending ``ttl`` seconds from now by Redis's clock."""
    until = redis_now(routes) + ttl
    routes.zadd(NODES_KEY, {node: until})
    for user in users:
        routes.zadd(route_key(user), {node: until})


def drain(broker, node: str, expect: int = 0, timeout: float = 10.0) -> list[dict]:
    """Every wsnode.deliver message on ``node``'s queue, decoded (Celery protocol 2 over Redis),
    once at least ``expect`` are there (dispatch ignores results, so there is nothing to wait on)."""
    deadline = time.monotonic() + timeout
    while broker.llen(node) < expect and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.2)  # anything published after the expected ones would be a defect: let it show
    out = []
    while (raw := broker.rpop(node)) is not None:
        message = json.loads(raw)
        assert message["headers"]["task"] == "wsnode.deliver"
        args, kwargs, _ = json.loads(message["body"]) if message.get("properties", {}).get("body_encoding") != "base64" else json.loads(__import__("base64").b64decode(message["body"]))
        out.append({"envelopes": args[0], "kwargs": kwargs, "argsrepr": message["headers"].get("argsrepr")})
    return out


def fake_node() -> str:
    return f"fake-{uuid.uuid4().hex[:8]}:1"


def test_dispatch_publishes_one_queue_message_per_node_never_one_per_recipient(celery_worker, routes, broker):
    a, b = fake_node(), fake_node()
    users_a = [f"{a}-u{i}" for i in range(50)]
    users_b = [f"{b}-u{i}" for i in range(50)]
    lease(routes, a, users_a)
    lease(routes, b, users_b)
    messages = [{"id": f"{n:024x}", "to": users_a + users_b, "data": {"n": n}, "ts": time.time()} for n in range(3)]

    dispatch.apply_async(args=[messages], queue=QUEUE)

    for node, users in ((a, users_a), (b, users_b)):
        (published,) = drain(broker, node, expect=1)
        assert [e["id"] for e in published["envelopes"]] == [m["id"] for m in messages]
        assert all(e["to"] == users for e in published["envelopes"])
        # both node messages went in one publish batch; Flower shows a summary, not every envelope
        assert published["argsrepr"] == f"[<3 envelopes: {messages[0]['id']}, {messages[1]['id']}, {messages[2]['id']}>]"


def test_dispatch_skips_users_without_a_lease_and_nodes_whose_own_lease_expired(celery_worker, routes, broker):
    live, dead = fake_node(), fake_node()
    lease(routes, live, ["skip-live-user"])
    lease(routes, dead, ["skip-dead-user"])
    routes.zadd(NODES_KEY, {dead: redis_now(routes) - 1})  # the node stopped renewing
    message = {"id": "0" * 24, "to": ["skip-live-user", "skip-dead-user", "skip-offline-user"], "data": 1, "ts": None}

    dispatch.apply_async(args=[[message]], queue=QUEUE)

    assert [p["envelopes"][0]["to"] for p in drain(broker, live, expect=1)] == [["skip-live-user"]]
    assert drain(broker, dead) == []


@pytest.fixture
def own_routes(redis_server, monkeypatch):
    """A routing registry of this test's own (a Redis database no node uses), for Dispatch in this
    process: a broadcast routed here reaches the fake nodes only, never the real nodes of the
    end-to-end tests that share the Redis server."""
    from tasks import dispatch as dispatch_module
    from wsnode.registry import RouteTable

    client = redis_lib.Redis.from_url(redis_server.url(7), socket_timeout=5)
    client.flushdb()
    monkeypatch.setattr(dispatch_module, "_redis", client)
    monkeypatch.setattr(dispatch_module, "routes", RouteTable(client))
    yield redis_lib.Redis.from_url(redis_server.url(7), decode_responses=True)
    client.flushdb()


def test_dispatch_records_as_pending_the_deliveries_it_routed_and_no_others(celery_worker, own_routes, broker):
    """The redelivery candidates: what went to a live node, recorded by the lookup's script call."""
    live, dead = fake_node(), fake_node()
    lease(own_routes, live, ["p-live-1", "p-live-2"])
    lease(own_routes, dead, ["p-dead"])
    own_routes.zadd(NODES_KEY, {dead: redis_now(own_routes) - 1})
    gen = IdGenerator()
    first, second, everyone = gen.next_id(), gen.next_id(), gen.next_id()
    messages = [
        {"id": first, "to": ["p-live-1", "p-dead", "p-offline"], "data": 1, "ts": None},
        {"id": second, "to": ["p-live-2"], "data": 2, "ts": None},
        {"id": everyone, "to": "*", "data": 3, "ts": None},
    ]

    dispatch.apply_async(args=[messages], queue=QUEUE)

    (published,) = drain(broker, live, expect=1)
    assert [e["id"] for e in published["envelopes"]] == [first, second, everyone]
    assert sorted(pending.between(own_routes, 0, time.time() + 60)) == sorted([(first, "p-live-1"), (second, "p-live-2")])


def test_a_broadcast_goes_once_to_every_live_node(celery_worker, own_routes, broker):
    nodes = [fake_node() for _ in range(3)]
    for node in nodes:
        lease(own_routes, node, [])
    dispatch.apply_async(args=[[{"id": "1" * 24, "to": "*", "data": "all", "ts": None}]], queue=QUEUE)
    for node in nodes:
        (published,) = drain(broker, node, expect=1)
        assert published["envelopes"][0]["to"] == "*"


def test_collect_stores_the_message_before_it_is_dispatched(celery_worker):
    user = f"stored-{uuid.uuid4().hex[:6]}"
    message_id = collect.apply_async(kwargs={"to": user, "data": {"kept": True}}, queue=QUEUE).get(timeout=10)
    envelopes, _ = get_store().replay(user, "0" * 24, 1000)
    # Broadcasts of other tests are in every user's replay too; this user's own message is there once.
    assert [e["data"] for e in envelopes if e["id"] == message_id] == [{"kept": True}]


def test_replay_many_answers_each_connection_with_its_own_pages_and_drops_malformed_requests(celery_worker, broker):
    node = fake_node()
    users = [f"replay-many-{uuid.uuid4().hex[:6]}-{n}" for n in range(3)]
    # stored, and not routed: no user has a lease
    stored = [collect.apply_async(kwargs={"to": user, "data": {"for": user}}, queue=QUEUE).get(timeout=10) for user in users]
    requests = [{"conn": f"c{n}", "user": user, "since": None} for n, user in enumerate(users)] + [{"conn": "bad", "user": 7}, "junk"]

    replay_many.apply_async(kwargs={"node": node, "requests": requests}, queue=QUEUE)

    published = {p["kwargs"]["conn"]: p for p in drain(broker, node, expect=3)}
    assert sorted(published) == ["c0", "c1", "c2"]
    for n, message_id in enumerate(stored):
        assert [(e["id"], e["data"]) for e in published[f"c{n}"]["envelopes"]] == [(message_id, {"for": users[n]})]
        info = dict(published[f"c{n}"]["kwargs"]["replay"])
        cursor = info.pop("cursor")
        assert info == {"last": True, "truncated": False, "count": 1}
        assert is_message_id(cursor) and cursor[:12] >= message_id[:12], cursor  # the read came after the message
    gc.collect()  # finalise the AsyncResults while Redis is up (Celery 5.6's __del__, see conftest)


def test_tasks_replay_still_answers_one_connection_as_before_for_nodes_of_earlier_versions(celery_worker, broker):
    node, user = fake_node(), f"replay-one-{uuid.uuid4().hex[:6]}"
    message_id = collect.apply_async(kwargs={"to": user, "data": 1}, queue=QUEUE).get(timeout=10)

    replay.apply_async(kwargs={"node": node, "conn": "c", "user": user}, queue=QUEUE)

    (published,) = drain(broker, node, expect=1)
    assert [e["id"] for e in published["envelopes"]] == [message_id]
    cursor = published["kwargs"]["replay"].pop("cursor")  # nodes of earlier versions ignore it
    assert published["kwargs"] == {"conn": "c", "replay": {"last": True, "truncated": False, "count": 1}}
    assert is_message_id(cursor) and cursor[:12] >= message_id[:12], cursor
    gc.collect()


def test_a_batch_that_cannot_reach_the_store_is_sent_again_request_by_request_under_the_same_ids(broker, monkeypatch):
    """``tasks.collect_many`` requests run as a batch; when the store is unavailable (MongoDB
    down: the store is the one part replaced here), each valid request is published again, with
    its own task id (so the same idempotency key) and one more retry, and an invalid one fails."""
    from celery_batches import SimpleRequest

    from tasks import collect as collect_module
    from tasks.store import StoreUnavailable

    def unavailable():
        raise StoreUnavailable("MongoDB is down (test)")

    retry_queue = f"retries-{uuid.uuid4().hex[:8]}"
    monkeypatch.setattr(collect_module, "get_store", unavailable)
    monkeypatch.setattr(collect_module, "COLLECT_QUEUE", retry_queue)

    def request(task_id: str, kwargs: dict, retries: int = 0) -> SimpleRequest:
        return SimpleRequest(task_id, "tasks.collect_many", (), kwargs, {}, "worker@host", True, None, None, {"retries": retries})

    requests = [request("first", {"messages": [{"to": "a", "data": 1}]}), request("second", {"messages": [{"to": "b", "data": 2}]}, retries=2),
                request("bad", {"messages": "not a list"})]
    outcomes = collect_module._run_batch(collect_module.collect_many, requests, collectrequests._parse_collect_many)

    assert outcomes["first"][0] == "retry" and outcomes["second"][0] == "retry"
    assert outcomes["bad"][0] == "failed" and '"messages" must be a list' in str(outcomes["bad"][1])
    sent = [json.loads(raw) for raw in broker.lrange(retry_queue, 0, -1)]
    broker.delete(retry_queue)
    assert sorted((m["headers"]["id"], m["headers"]["retries"]) for m in sent) == [("first", 1), ("second", 3)]
    assert all(m["headers"]["task"] == "tasks.collect_many" for m in sent)  # after a backoff (full jitter: may be 0)


def test_a_request_sent_again_keeps_its_link_errback_chain_and_chord(broker, monkeypatch):
    """A collect request whose batch could not reach the store is published again with what was
    to follow it (``tasks/links.py``): its ``link``, ``link_error``, the rest of its chain and its
    chord's body, and the ids that tie it to its caller and its group."""
    import base64

    from tasks import collect as collect_module
    from tasks.links import CollectRequest
    from tasks.store import StoreUnavailable

    def unavailable():
        raise StoreUnavailable("MongoDB is down (test)")

    retry_queue = f"retries-{uuid.uuid4().hex[:8]}"
    monkeypatch.setattr(collect_module, "get_store", unavailable)
    monkeypatch.setattr(collect_module, "COLLECT_QUEUE", retry_queue)
    link, errback, rest, body = ({"task": name, "args": [], "kwargs": {}, "options": {}, "subtask_type": None, "immutable": False}
                                 for name in ("celery.accumulate", "tasks.status", "tasks.status", "celery.accumulate"))
    req = CollectRequest("linked", "tasks.collect", (), {"to": "a", "data": 1}, {}, "worker@host", False, None, None, {"retries": 0})
    req.callbacks, req.errbacks, req.chain, req.root_id, req.parent_id = [link], [errback], [rest], "root-1", "parent-1"
    req.chord, req.group, req.group_index = body, "group-1", 0

    outcomes = collect_module._run_batch(collect_module.collect, [req], collectrequests._parse_collect_request)

    assert outcomes["linked"][0] == "retry"
    (raw,) = broker.lrange(retry_queue, 0, -1)
    broker.delete(retry_queue)
    sent = json.loads(raw)
    _, _, embed = json.loads(base64.b64decode(sent["body"]))
    assert [s["task"] for s in embed["callbacks"]] == ["celery.accumulate"]
    assert [s["task"] for s in embed["errbacks"]] == ["tasks.status"]
    assert [s["task"] for s in embed["chain"]] == ["tasks.status"]
    assert embed["chord"]["task"] == "celery.accumulate"
    assert (sent["headers"]["root_id"], sent["headers"]["parent_id"]) == ("root-1", "parent-1")
    assert (sent["headers"]["group"], sent["headers"]["group_index"]) == ("group-1", 0)



def test_a_request_sent_again_keeps_the_reply_queue_its_caller_waits_on_and_its_ignore_result(broker, monkeypatch):
    """With ``RESULT_BACKEND=rpc://`` a result goes to the queue the caller named in the message's
    ``reply_to``.  A request published again (its store was down) named the worker's own instead,
    so the caller's ``.get()`` never got its ids; and one sent with ``ignore_result`` stored a
    result once sent again."""
    from celery_batches import SimpleRequest

    from tasks import collect as collect_module
    from tasks.store import StoreUnavailable

    def unavailable():
        raise StoreUnavailable("MongoDB is down (test)")

    retry_queue = f"retries-{uuid.uuid4().hex[:8]}"
    monkeypatch.setattr(collect_module, "get_store", unavailable)
    monkeypatch.setattr(collect_module, "COLLECT_QUEUE", retry_queue)
    waited = SimpleRequest("waited", "tasks.collect", (), {"to": "a", "data": 1}, {}, "worker@host", False, "callers-reply-queue", "waited", {"retries": 0})
    ignored = SimpleRequest("ignored", "tasks.collect", (), {"to": "b", "data": 2}, {}, "worker@host", True, None, None, {"retries": 0})

    outcomes = collect_module._run_batch(collect_module.collect, [waited, ignored], collectrequests._parse_collect_request)

    assert outcomes["waited"][0] == "retry" and outcomes["ignored"][0] == "retry"
    sent = {m["headers"]["id"]: m for m in (json.loads(raw) for raw in broker.lrange(retry_queue, 0, -1))}
    broker.delete(retry_queue)
    assert sent["waited"]["properties"]["reply_to"] == "callers-reply-queue"
    assert sent["waited"]["properties"]["correlation_id"] == "waited"
    assert sent["ignored"]["headers"]["ignore_result"] is True
    assert sent["waited"]["headers"]["ignore_result"] is False

def test_a_request_whose_reading_raises_an_unexpected_error_fails_alone(broker, monkeypatch):
    """A bug of validation (an error other than InvalidMessage while a request is read) fails that
    request, with the error as its outcome; the rest of the batch goes on (here: to a retry, the
    store being unavailable).  It used to fail the whole batch, with no result stored."""
    from celery_batches import SimpleRequest

    from tasks import collect as collect_module
    from tasks.store import StoreUnavailable

    def unavailable():
        raise StoreUnavailable("MongoDB is down (test)")

    def parse(req):
        if req.id == "buggy":
            raise UnicodeEncodeError("utf-8", "\ud800", 0, 1, "surrogates not allowed")
        return collectrequests._parse_collect_request(req)

    retry_queue = f"retries-{uuid.uuid4().hex[:8]}"
    monkeypatch.setattr(collect_module, "get_store", unavailable)
    monkeypatch.setattr(collect_module, "COLLECT_QUEUE", retry_queue)
    requests = [SimpleRequest(task_id, "tasks.collect", (), {"to": "a", "data": 1}, {}, "worker@host", True, None, None, {"retries": 0})
                for task_id in ("buggy", "fine")]
    outcomes = collect_module._run_batch(collect_module.collect, requests, parse)
    broker.delete(retry_queue)

    assert outcomes["buggy"][0] == "failed" and isinstance(outcomes["buggy"][1], UnicodeEncodeError)
    assert outcomes["fine"][0] == "retry" and isinstance(outcomes["fine"][1], StoreUnavailable)


def test_a_batch_answers_the_worker_in_one_pipe_write_whatever_its_size(broker):
    """What a batch sends back to the worker's main process (``tasks.collectbatches._apply_batch``) stays
    under Linux's PIPE_BUF (4 KB), so it is written and read at once: nothing, with task events on
    or off (the pool process sends the events itself; each request's result is in the backend).  A batch's own
    result, every id of up to 1,000 messages, came to tens of KB, and a warm shutdown between two
    reads of it left the worker blocked for ever (tests/integration/test_faults.py)."""
    import pickle

    from tasks import collect as collect_module
    from tasks.collectbatches import _apply_batch
    from tasks.links import CollectRequest

    def request(task_id, kwargs):
        return CollectRequest(task_id, "tasks.collect_many", (), kwargs, {}, "worker@host", False, None, None, {"retries": 0})

    messages = [{"to": f"nobody-{i}", "data": i} for i in range(1000)]
    for events in (False, True):
        requests = [request(f"big-{uuid.uuid4().hex}", {"messages": messages}), request(f"bad-{uuid.uuid4().hex}", {"messages": "not a list"})]
        answer = _apply_batch(collect_module.collect_many, (requests,), events)
        assert answer is None and len(pickle.dumps(answer)) < 4096
        assert len(collect_module.collect_many.AsyncResult(requests[0].id).get(timeout=10)) == 1000
        with pytest.raises(Exception, match='"messages" must be a list'):
            collect_module.collect_many.AsyncResult(requests[1].id).get(timeout=10)


def test_collect_run_eagerly_returns_its_message_id_and_delivers_like_a_worker(own_routes, broker, monkeypatch):
    """``collect.apply()``, and ``delay()`` under ``task_always_eager`` (business code's tests), as
    Celery runs any task eagerly: the result is the message id, stored and routed to the user's
    node as from a worker.  celery-batches' own ``apply`` returned its batch's outcome table
    ``{task id: ("ok", id)}`` as the result."""
    from celery.result import EagerResult

    from tasks.collect import collect_many
    from tasks.ids import is_message_id

    node, user = fake_node(), f"eager-{uuid.uuid4().hex[:6]}"
    lease(own_routes, node, [user])

    result = collect.apply(kwargs={"to": user, "data": {"eager": 1}})
    assert isinstance(result, EagerResult) and result.state == "SUCCESS"
    message_id = result.get()
    assert is_message_id(message_id)
    assert [[e["id"] for e in p["envelopes"]] for p in drain(broker, node, expect=1)] == [[message_id]]
    assert get_store().messages([message_id])[message_id]["data"] == {"eager": 1}

    many = collect_many.apply(kwargs={"messages": [{"to": user, "data": 2}, {"to": [], "data": 3}]}).get()
    assert is_message_id(many[0]) and many[1]["index"] == 1 and "empty list" in many[1]["error"]

    monkeypatch.setitem(collect.app.conf, "task_always_eager", True)
    delayed = collect.delay(to=user, data={"eager": 3})
    assert isinstance(delayed, EagerResult) and is_message_id(delayed.get())
    delivered = [e["id"] for p in drain(broker, node, expect=2) for e in p["envelopes"]]
    assert delivered == [many[0], delayed.get()]
    # As Celery keeps any eager result out of the backend (task_store_eager_result is off).
    assert redis_lib.Redis.from_url(settings.RESULT_BACKEND).exists(f"celery-task-meta-{result.id}") == 0


def test_an_invalid_collect_run_eagerly_fails_with_its_reason_and_a_store_outage_fails_at_once(broker, monkeypatch):
    """An eager request fails as a task fails: FAILURE, ``get()`` raises its error, and ``apply``
    raises it itself with ``throw=True``.  Eagerly, an unavailable store fails the request at once
    (a worker would send it again after a backoff): nothing is sent anywhere."""
    from tasks import collect as collect_module
    from tasks.messages import InvalidMessage
    from tasks.store import StoreUnavailable

    result = collect.apply(kwargs={"to": [], "data": 1})
    assert result.state == "FAILURE" and isinstance(result.result, InvalidMessage) and "InvalidMessage" in result.traceback
    with pytest.raises(InvalidMessage, match="empty list"):
        result.get()
    with pytest.raises(InvalidMessage, match="unexpected"):
        collect.apply(kwargs={"to": "a", "data": 1, "colour": "red"}, throw=True)

    def unavailable():
        raise StoreUnavailable("MongoDB is down (test)")

    retry_queue = f"retries-{uuid.uuid4().hex[:8]}"
    monkeypatch.setattr(collect_module, "get_store", unavailable)
    monkeypatch.setattr(collect_module, "COLLECT_QUEUE", retry_queue)
    with pytest.raises(StoreUnavailable, match="down"):
        collect.apply(kwargs={"to": "a", "data": 1}).get()
    assert broker.llen(retry_queue) == 0


def test_collect_run_eagerly_applies_its_link_errback_and_chain_with_its_own_result(own_routes, monkeypatch):
    """Under ``task_always_eager`` a ``link`` gets the message id (celery-batches passed the batch's
    outcome table), a ``link_error`` the failed request's id, and a chain's next task the id, all
    run eagerly as Celery runs them."""
    from celery import chain

    from tasks.collect import collect_many
    from tasks.ids import is_message_id
    from worker import app

    seen: list[tuple[str, object]] = []

    @app.task(name=f"tests.record-{uuid.uuid4().hex[:6]}", shared=False)
    def record(value, label="link"):
        seen.append((label, value))
        return value

    @app.task(name=f"tests.errback-{uuid.uuid4().hex[:6]}", shared=False)
    def errback(task_id):  # one argument: Celery calls it with the failed task's id
        seen.append(("errback", task_id))

    monkeypatch.setitem(app.conf, "task_always_eager", True)
    user = f"eager-links-{uuid.uuid4().hex[:6]}"

    linked = collect.apply_async(kwargs={"to": user, "data": 1}, link=record.s())
    assert seen == [("link", linked.get())] and is_message_id(linked.get())

    seen.clear()
    failed = collect.apply_async(kwargs={"to": [], "data": 1}, link=record.s(), link_error=errback.s())
    assert failed.state == "FAILURE"
    assert seen == [("errback", failed.id)]

    seen.clear()
    ids = chain(collect_many.s(messages=[{"to": user, "data": 2}, {"to": user, "data": 3}]), record.s(label="chain")).apply().get()
    assert len(ids) == 2 and all(is_message_id(i) for i in ids) and seen == [("chain", ids)]


def test_calling_collect_directly_runs_it_here_and_returns_its_id_or_raises(own_routes, broker):
    """``collect(to=..., data=...)``, as Celery runs any task object called directly: the message
    is stored and routed here, and the call returns its id (``collect_many``: the list) or raises
    the request's error.  celery-batches' task took only its list of requests."""
    from tasks.collect import collect_many
    from tasks.ids import is_message_id
    from tasks.messages import InvalidMessage

    node, user = fake_node(), f"direct-{uuid.uuid4().hex[:6]}"
    lease(own_routes, node, [user])
    message_id = collect(to=user, data={"direct": 1})
    ids = collect_many([{"to": user, "data": 2}, {"to": user, "data": 3}])
    assert is_message_id(message_id) and len(ids) == 2 and all(is_message_id(i) for i in ids)
    assert [e["id"] for p in drain(broker, node, expect=2) for e in p["envelopes"]] == [message_id, *ids]
    with pytest.raises(InvalidMessage, match="empty list"):
        collect(to=[], data=1)


class WarningsOf(logging.Handler):
    """The warnings ``logger`` logs while this is entered, whatever the process's logging setup."""

    def __init__(self, logger: logging.Logger) -> None:
        super().__init__(logging.WARNING)
        self.logger, self.lines = logger, []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())

    def __enter__(self) -> WarningsOf:
        self._was = self.logger.disabled, self.logger.level
        self.logger.disabled = False
        self.logger.setLevel(logging.WARNING)
        self.logger.addHandler(self)
        return self

    def __exit__(self, *exc) -> None:
        self.logger.removeHandler(self)
        self.logger.disabled = self._was[0]
        self.logger.setLevel(self._was[1])


def test_a_key_reused_for_another_message_while_its_first_run_stores_sends_only_what_was_stored(own_routes, broker, monkeypatch):
    """Two requests with one key and other messages, the second run between the first's claim and
    its insert (two pool processes or workers): each sends what the store holds under the key's
    id, never its own copy that the store did not take, and the loser's warning is logged."""
    import tasks.collect as collect_module

    node, key = fake_node(), f"order-{uuid.uuid4().hex[:6]}"
    first_user, second_user = f"race-a-{uuid.uuid4().hex[:6]}", f"race-b-{uuid.uuid4().hex[:6]}"
    lease(own_routes, node, [first_user, second_user])
    store_and_route, second = collect_module._store_and_route, []

    def second_run_first(*args, **kwargs):
        if not second:  # the first run has claimed the key: the second runs to its end now
            second.append(None)
            second[0] = collect(to=second_user, data="second", key=key)
        return store_and_route(*args, **kwargs)

    monkeypatch.setattr(collect_module, "_store_and_route", second_run_first)
    warnings = WarningsOf(collect_module.log)  # the in-process worker's logging setup leaves caplog nothing here
    with warnings:
        first = collect(to=first_user, data="first", key=key)

    assert second == [first]
    sent = [(e["id"], e["to"], e["data"]) for p in drain(broker, node, expect=2) for e in p["envelopes"]]
    assert sent == [(first, [second_user], "second")] * 2
    assert get_store().messages([first])[first]["data"] == "second"
    assert any(f"key {key!r} was used before for message {first}" in line for line in warnings.lines)


def test_a_batch_bigger_than_one_broker_message_should_carry_goes_to_its_node_in_several_in_order(own_routes, broker):
    """A node's share of a batch was one ``wsnode.deliver`` message whatever its size: 1,000
    messages of ``MAX_MESSAGE_BYTES`` (64 KiB, up to 2 MB) made one of 64 MiB (up to 2 GB), over
    RabbitMQ's ``max_message_size`` (128 MiB in 3.x, 16 MiB from 4.0), which refused it: the
    requests failed after their messages were stored, and a redelivery run of such a batch failed
    at every housekeeping run."""
    from tasks.dispatch import route
    from tasks.queues import MAX_PUBLISH_BYTES

    node, user = fake_node(), f"big-{uuid.uuid4().hex[:6]}"
    lease(own_routes, node, [user])
    gen, data = IdGenerator(), "x" * (settings.MAX_MESSAGE_BYTES - 10)
    messages = [{"id": gen.next_id(), "to": [user], "data": data, "ts": time.time()} for _ in range(3 * MAX_PUBLISH_BYTES // len(data))]

    route(messages)

    published = drain(broker, node, expect=3)
    assert len(published) >= 3
    assert all(len(json.dumps(p["envelopes"])) <= MAX_PUBLISH_BYTES for p in published)
    assert [e["id"] for p in published for e in p["envelopes"]] == [m["id"] for m in messages]


def test_a_hand_off_too_big_for_one_broker_message_is_one_task_naming_the_messages_whose_data_dispatch_reads(own_routes, broker, monkeypatch):
    """Collect could not route (the routing Redis down) a batch bigger than one broker message
    should be: handed to tasks.dispatch in several tasks, it arrived out of order (each retries on
    its own), so it goes as one task naming the messages, and Dispatch reads their data from the
    store.  (Non-ASCII data: kombu's json would have escaped it to up to three times its size.)"""
    import base64

    import tasks.collect as collect_module
    from tasks.dispatch import dispatch as dispatch_task
    from tasks.queues import MAX_PUBLISH_BYTES

    node, user = fake_node(), f"handed-{uuid.uuid4().hex[:6]}"
    lease(own_routes, node, [user])
    gen, data = IdGenerator(), "é" * (settings.MAX_MESSAGE_BYTES // 2 - 10)
    docs = [{"id": gen.next_id(), "to": [user], "data": data, "ts": time.time()} for _ in range(2 * MAX_PUBLISH_BYTES // settings.MAX_MESSAGE_BYTES)]
    get_store().insert_messages(docs)
    queue = f"handed-off-{uuid.uuid4().hex[:6]}"
    monkeypatch.setattr(collect_module, "DISPATCH_QUEUE", queue)

    def routing_redis_down(_docs):
        raise redis_lib.ConnectionError("the routing Redis does not answer")

    monkeypatch.setattr(collect_module, "route", routing_redis_down)
    collect_module._hand_off(docs)

    [raw] = broker.lrange(queue, 0, -1)
    broker.delete(queue)
    message = json.loads(raw)
    body = base64.b64decode(message["body"]) if message["properties"].get("body_encoding") == "base64" else message["body"]
    assert len(body) < MAX_PUBLISH_BYTES
    [handed], _, _ = json.loads(body)
    assert handed == [{"id": doc["id"], "to": doc["to"]} for doc in docs]
    dispatch_task.run(handed)
    published = drain(broker, node, expect=2)
    assert [(e["id"], e["data"]) for p in published for e in p["envelopes"]] == [(doc["id"], data) for doc in docs]


def test_the_soft_time_limit_while_routing_stored_messages_queues_them_for_dispatch_instead_of_failing_their_requests(broker, monkeypatch):
    """``--soft-time-limit`` raised in the routing of stored messages failed their requests: the
    messages were delivered anyway (the sweep), and business code that sent them again stored
    them twice, under new ids."""
    from celery.exceptions import SoftTimeLimitExceeded

    import tasks.collect as collect_module

    queue = f"soft-limit-{uuid.uuid4().hex[:6]}"
    monkeypatch.setattr(collect_module, "DISPATCH_QUEUE", queue)

    def soft_limit(_docs):
        raise SoftTimeLimitExceeded()

    monkeypatch.setattr(collect_module, "route", soft_limit)
    docs = [{"id": IdGenerator().next_id(), "to": ["soft"], "data": 1, "ts": time.time()}]
    collect_module._hand_off(docs)

    [raw] = broker.lrange(queue, 0, -1)
    broker.delete(queue)
    assert json.loads(raw)["headers"]["task"] == "tasks.dispatch"


def test_handing_back_a_dead_nodes_queue_longer_than_one_round_takes_all_of_it_before_deleting_it(broker):
    """``tasks.reclaim.hand_back`` reads a queue ``limit`` messages at a time; it used to read one
    round only and then delete the queue with the rest in it."""
    from tasks.dispatch import publish
    from tasks.reclaim import hand_back
    from worker import app

    node = f"10.77.{uuid.uuid4().int % 250}.1:{8000 + uuid.uuid4().int % 1000}"
    gen = IdGenerator()
    for n in range(7):
        publish(node, [{"id": gen.next_id(), "to": ["handed-back"], "data": n, "ts": None}])
    assert broker.llen(node) == 7
    assert hand_back(app, node, delete=True, limit=3) == 7
    assert not broker.exists(node)


def test_handing_back_stops_at_the_next_round_once_a_node_holds_the_address_again_and_leaves_it_the_queue(broker):
    """A node started again on the address (a rolling restart, while the old one drains or
    housekeeping reclaims it) reads the same queue: what stands there is now its own.  The
    hand-back counted the queue once and took that many, the new node's live messages (handed
    back behind later ones), broadcasts (not handed back: lost) and replay pages too."""
    from tasks.dispatch import publish
    from tasks.reclaim import CHUNK, hand_back
    from worker import app

    node = f"10.76.{uuid.uuid4().int % 250}.1:{8000 + uuid.uuid4().int % 1000}"
    gen = IdGenerator()
    for n in range(CHUNK + 200):
        publish(node, [{"id": gen.next_id(), "to": ["handed-back"], "data": n, "ts": None}])
    asked = []

    def node_back() -> bool:
        asked.append(None)
        return len(asked) > 1  # back once the first round is handed back

    assert hand_back(app, node, delete=True, node_back=node_back) == CHUNK
    assert broker.llen(node) == 200, "the rest is the node's that came back"
    assert len(asked) == 2


def test_handing_back_a_queue_with_an_undecodable_message_drops_it_and_hands_back_the_others(broker):
    """kombu's DecodeError and ContentDisallowed are not ValueErrors: such a message stopped the
    hand-back, came back to the queue, and stopped it again at every housekeeping run."""
    from kombu import Connection

    from tasks.dispatch import publish
    from tasks.queues import node_queue
    from tasks.reclaim import hand_back
    from worker import app

    node = f"10.78.{uuid.uuid4().int % 250}.1:{8000 + uuid.uuid4().int % 1000}"
    gen = IdGenerator()
    publish(node, [{"id": gen.next_id(), "to": ["handed-back"], "data": 0, "ts": None}])
    queue = node_queue(node)
    with Connection(settings.BROKER_URL) as conn:
        producer = conn.Producer()
        producer.publish("{not json", exchange=queue.exchange, routing_key=queue.routing_key, declare=[queue],
                         content_type="application/json", content_encoding="utf-8")
        producer.publish(b"\x80\x04K\x01.", exchange=queue.exchange, routing_key=queue.routing_key, declare=[queue],
                         content_type="application/x-python-serialize", content_encoding="binary")
    publish(node, [{"id": gen.next_id(), "to": ["handed-back"], "data": 1, "ts": None}])
    assert broker.llen(node) == 4
    assert hand_back(app, node, delete=True) == 2
    assert not broker.exists(node)


def test_an_empty_queue_hands_back_nothing_and_is_deleted(broker):
    from tasks.reclaim import hand_back
    from worker import app

    node = f"10.79.{uuid.uuid4().int % 250}.1:{8000 + uuid.uuid4().int % 1000}"
    assert hand_back(app, node, delete=True) == 0
    assert not broker.exists(node)


def test_an_eager_collect_whose_messages_can_be_neither_routed_nor_queued_fails_with_the_brokers_error(tmp_path):
    """Under ``task_always_eager`` the fallback ``dispatch.apply_async`` ran tasks.dispatch in
    place, which failed the same way and returned a failed result without raising: the request
    succeeded though its messages were neither routed nor queued.  (Its own process: Redis and
    the broker on a port nothing listens on.)"""
    import os
    import subprocess
    import sys

    import launcher

    closed = f"redis://127.0.0.1:{launcher.free_port()}"
    env = {**os.environ, "REDIS_URL": f"{closed}/1", "BROKER_URL": f"{closed}/0", "DATA_DIR": str(tmp_path), "LOG_LEVEL": "ERROR"}
    code = ("from worker import app\n"
            "app.conf.task_always_eager = True\n"
            "from tasks.collect import collect\n"
            "result = collect.delay(to='alice', data=2)\n"
            "print('RESULT', result.state, type(result.result).__name__)\n")
    ran = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120,
                         cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    line = next((line for line in ran.stdout.splitlines() if line.startswith("RESULT")), ran.stdout + ran.stderr[-2000:])
    assert line == "RESULT FAILURE OperationalError", line


def test_a_malformed_receipt_is_left_out_and_the_good_acks_of_its_batch_are_recorded(broker):
    from tasks.receipts import receipts

    user = f"acker-{uuid.uuid4().hex[:6]}"
    mid = IdGenerator().next_id()
    get_store().insert_messages([{"id": mid, "to": [user], "data": 1}])
    now = time.time()
    recorded = receipts.run([{"id": mid, "user": user, "state": "acked", "at": now}, {"id": mid, "user": user, "state": "acked", "at": None},
                             {"id": mid, "user": user, "state": "acked", "at": 4e9}])
    assert recorded == 1
    assert get_store().not_acked([(mid, user)]) == []


def test_routing_whose_receipts_the_store_refuses_publishes_once_and_does_not_route_again(own_routes, broker, tmp_path, monkeypatch):
    """The ``routed`` receipts are recorded after the publish: a store that refused them (a full
    disk) made route() raise, so Collect handed the published messages to tasks.dispatch, which
    published them again at each of its retries (ten copies in all)."""
    from tasks import dispatch as dispatch_module
    from tasks import storesql
    from tasks.store import Store

    monkeypatch.setattr(settings, "DATA_DIR", str(tmp_path))
    store = Store.open()
    try:
        storesql.table_of(store.database["receipts"])._connection.execute("PRAGMA max_page_count=1")  # as if the disk were full
        monkeypatch.setattr(dispatch_module, "get_store", lambda: store)
        node = fake_node()
        users = [f"full-{uuid.uuid4().hex[:6]}-{n}" for n in range(200)]  # receipts over a page
        lease(own_routes, node, users)
        message = {"id": IdGenerator().next_id(), "to": users, "data": 1, "ts": None}

        assert list(dispatch_module.route([message])) == [node]

        assert [[e["id"] for e in p["envelopes"]] for p in drain(broker, node, expect=1)] == [[message["id"]]]
        assert store.status(message["id"]) is None  # nothing stored: only the routing was asked for
    finally:
        store.close()


def test_replay_many_publishes_its_replays_as_it_reads_them_so_it_holds_as_much_for_16_connections_as_for_2(broker, monkeypatch):
    """A tasks.replay_many held every connection's replay (up to REPLAY_MAX_BYTES each) until it
    published them all in one batch, so what it held grew with its connections (up to 100).  It
    publishes them in batches of about REPLAY_MAX_BYTES as it reads them: the peak of 16
    connections' inboxes of 250 KB is about that of 2 (the batch, the replay being read, the
    store's read of its data and the publish's encodings); each connection still gets its own
    pages, once."""
    budget = 256 * 1024
    monkeypatch.setattr(settings, "REPLAY_MAX_BYTES", budget)
    node, gen, data = fake_node(), IdGenerator(), "x" * 50_000
    users = [f"held-{uuid.uuid4().hex[:6]}-{n}" for n in range(16)]
    get_store().insert_messages([{"id": mid, "to": [user], "data": data} for user in users for mid in gen.next_ids(7)])
    requests = [{"conn": f"c{n}", "user": user, "since": None} for n, user in enumerate(users)]

    def peak(some: list[dict]) -> int:
        gc.collect()
        tracemalloc.start()
        try:
            replay_many(node, some)
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    peak(requests[:1])  # warm up: imports, the store's connection, the producer pool
    drain(broker, node, expect=1)
    two = peak(requests[:2])
    drain(broker, node, expect=2)
    sixteen = peak(requests)

    published = drain(broker, node, expect=len(users))
    assert sorted(p["kwargs"]["conn"] for p in published) == sorted(f"c{n}" for n in range(len(users)))
    for p in published:
        assert len(p["envelopes"]) == 5 and p["kwargs"]["replay"]["truncated"] is True  # 5 frames of 50 KB fit in 256 KiB
    assert sixteen < 1.5 * two, f"16 connections held {sixteen / budget:.1f} budgets at the peak, 2 held {two / budget:.1f}"

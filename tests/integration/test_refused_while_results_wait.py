"""A message the worker refuses before it runs, while the Redis of the results refuses writes for a
moment (here a replica: ``READONLY``, as a failover's demotion makes it; a Redis over ``maxmemory``
or answering ``MASTERDOWN`` refuses so too: ``tasks.resultbackend.REFUSED_FOR_NOW``).

Its failure is written again until Redis takes it (up to about 100 s).  The worker's main process
wrote it itself and read no other task meanwhile: one bad message and a results Redis refusing for
a moment held every collect of that worker.  Now the failure waits on a thread of its own
(``tasks.failurewriter``) while the worker reads and runs other tasks; the message is acknowledged
only once its failure is written, and the caller waiting on it gets it then, as Flower gets its
``task-received`` and ``task-failed``.

A private cluster on each broker (Redis, RabbitMQ) whose routing Redis (``REDIS_URL``) and results
Redis (``RESULT_BACKEND``) are servers of their own (a third one the Redis broker), so that only the
results refuse.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid

import pytest
import redis as redis_lib
from kombu import Connection

import launcher
from tests.integration.conftest import BrokerHolds, Cluster, broker_url_for, business_app, start_or_explain
from tests.integration.taskevents import TaskEvents
from tests.integration.tcpproxy import FreezableProxy


def _results_apart(request, tmp_path, proxied: bool = False, worker_kw: dict | None = None, broker: str | None = None, **env):
    """A private cluster on the broker ``broker`` (else ``request.param``) names, one node, with the
    events on (``-E``), whose results Redis is a server of its own; yields it, that server and,
    ``proxied``, the proxy the worker and the node reach the broker through (else None)."""
    broker = broker or request.param
    servers = {}
    for role in ("broker", "routing", "results") if broker == "redis" else ("routing", "results"):
        servers[role] = launcher.RedisServer(data_dir=tmp_path / role).start()
        request.addfinalizer(servers[role].stop)
    broker_url = broker_url_for(broker, servers.get("broker"), request)
    proxy = None
    if proxied:
        proxy, broker_url = FreezableProxy.to_url(broker_url)
        request.addfinalizer(proxy.close)
    cluster = Cluster(servers["routing"], tmp_path, broker_url=broker_url, auth_port=launcher.free_port(),
                      RESULT_BACKEND=servers["results"].url(1), **env)
    cluster.business = business_app(broker_url, servers["results"].url(1))
    cluster.broker = broker
    start_or_explain(cluster, nodes=1, events=True, **(worker_kw or {}))
    yield cluster, servers["results"], proxy
    cluster.stop(at_once=True)


@pytest.fixture(scope="module", params=["redis", "amqp"])
def results_apart_cluster(request, tmp_path_factory):
    """A private cluster on the broker the parameter names, one node, with the events on (``-E``),
    whose results Redis is a server of its own; yields it and that server.  One per broker for the
    module: each test leaves its results Redis a primary again."""
    for cluster, results_server, _ in _results_apart(request, tmp_path_factory.mktemp(f"results-apart-{request.param}")):
        yield cluster, results_server


@pytest.fixture(params=["redis", "amqp"])
def proxied_results_apart_cluster(request, tmp_path):
    """:func:`results_apart_cluster` whose worker and node reach the broker through a proxy that
    the test may reset (``tests.integration.tcpproxy``); yields it, its results server and the
    proxy.  A message held unacknowledged on the Redis broker comes back 8 s after it was read."""
    yield from _results_apart(request, tmp_path, proxied=True, VISIBILITY_TIMEOUT=8)


@pytest.fixture
def redis_proxied_results_apart_cluster(request, tmp_path):
    """:func:`proxied_results_apart_cluster` on the Redis broker alone."""
    yield from _results_apart(request, tmp_path, proxied=True, broker="redis", VISIBILITY_TIMEOUT=8)


@pytest.fixture(params=["redis", "amqp"])
def narrow_results_apart_cluster(request, tmp_path):
    """:func:`results_apart_cluster` whose worker holds at most :data:`NARROW_WINDOW` messages
    unacknowledged (its prefetch window: one process, a multiplier of 4); yields it and its results
    server."""
    for cluster, results_server, _ in _results_apart(request, tmp_path, worker_kw={"concurrency": 1}, COLLECT_BATCH=2):
        yield cluster, results_server


#: The prefetch window of :func:`narrow_results_apart_cluster`'s worker (``worker.py``:
#: ``max(4, COLLECT_BATCH)`` a process).
NARROW_WINDOW = 4


def _headers(task_id: str, **more) -> dict:
    return {"task": "tasks.collect", "id": task_id, "lang": "py", **more}


#: Messages the worker's main process refuses, one per way it refuses them: how each is
#: published (body, headers), the line the worker logs as it reads it, what the caller's ``.get()``
#: raises with, and the task events Flower gets for it.
RECEIVED_AND_FAILED = ["task-received", "task-failed"]
REFUSED = {
    # tasks.taskmessages.Consumer.refuse: an envelope Celery cannot run
    "malformed": (lambda task_id: ('"not [args, kwargs, embed]"', _headers(task_id)), "refused a message of queue 'collect' (task id '{task_id}')",
                  "not a Celery task message: its body is of type str", RECEIVED_AND_FAILED),
    # Celery's on_invalid_task
    "unreadable-eta": (lambda task_id: ('[[], {"to": "nobody", "data": 1}, {}]', _headers(task_id, eta="tomorrow")),
                       "Received invalid task message: invalid ETA value 'tomorrow'", "not run: invalid ETA value 'tomorrow'", RECEIVED_AND_FAILED),
    # Celery's on_decode_error
    "undecodable": (lambda task_id: ('[[], {"to": ', _headers(task_id)), "Can't decode message body",
                    "not run: its body could not be decoded as application/json", RECEIVED_AND_FAILED),
    # Celery's on_unknown_task, which sends task-failed alone
    "unknown-task": (lambda task_id: ('[[], {}, {}]', _headers(task_id, task="tasks.no_such_task")),
                     "Received unregistered task of type 'tasks.no_such_task'", "tasks.no_such_task", ["task-failed"]),
}


def _unacked(cluster, task_id: str) -> bool:
    """Whether the worker holds the refused message ``task_id`` unacknowledged (on RabbitMQ: the
    one unacknowledged message of the collect queue; the test has no other there when it asks)."""
    return BrokerHolds(cluster.env["BROKER_URL"], "collect").unacked(task_id)


def _held_by_broker(cluster, task_id: str) -> bool:
    """Whether the broker still holds the message ``task_id``, queued or unacknowledged (on
    RabbitMQ: any message of the collect queue, the test's only one there)."""
    return BrokerHolds(cluster.env["BROKER_URL"], "collect").holds(task_id)


def _publish(cluster, kind: str, task_id: str) -> None:
    body, headers = REFUSED[kind][0](task_id)
    with Connection(cluster.env["BROKER_URL"]) as conn:
        conn.Producer().publish(body.encode(), exchange="", routing_key="collect", headers=headers,
                                content_type="application/json", content_encoding="utf-8")


@contextlib.asynccontextmanager
async def _an_unreadable_eta_while_results_refuse(cluster, results_server):
    """Makes the results Redis a replica of a primary that does not answer (it refuses writes:
    ``READONLY``), publishes a message with an unreadable eta, waits until the worker read it and
    yields its task id and a client of the results Redis; promotes the results Redis at the end."""
    results = redis_lib.Redis.from_url(results_server.url(1), socket_timeout=5)
    task_id = str(uuid.uuid4())
    results.execute_command("REPLICAOF", "127.0.0.1", str(launcher.free_port()))
    try:
        _publish(cluster, "unreadable-eta", task_id)
        await asyncio.to_thread(cluster.worker.wait_log, REFUSED["unreadable-eta"][1], 20)
        yield task_id, results
    finally:
        results.execute_command("REPLICAOF", "NO", "ONE")  # promoted


@pytest.mark.parametrize("kind", REFUSED)
async def test_a_refused_messages_failure_waits_for_the_results_redis_while_the_worker_runs_other_tasks(results_apart_cluster, kind):
    cluster, results_server = results_apart_cluster
    _, read_line, says, told = REFUSED[kind]
    user = f"overtaken-{kind}"
    client = await cluster.connect(user)
    assert await cluster.collect(user, "before", timeout=20)
    assert [f["data"] for f in await client.messages(1)] == ["before"]
    events = await asyncio.to_thread(TaskEvents(cluster).start)
    results = redis_lib.Redis.from_url(results_server.url(1), socket_timeout=5)
    task_id = str(uuid.uuid4())
    results.execute_command("REPLICAOF", "127.0.0.1", str(launcher.free_port()))  # a primary that does not answer: READONLY
    try:
        _publish(cluster, kind, task_id)
        await asyncio.to_thread(cluster.worker.wait_log, read_line.format(task_id=task_id), 20)
        # Not acknowledged while its failure waits: a worker that stopped now would have it back.
        assert await asyncio.to_thread(_unacked, cluster, task_id)
        waiting = asyncio.create_task(cluster.result(cluster.business.AsyncResult(task_id), 90))  # a caller waiting on it
        sent = cluster.send(to=user, data="while a failure waits")
        # Delivered while the refused message's failure waits: the worker read and ran it.
        assert [f["data"] for f in await client.messages(1, timeout=30)] == ["while a failure waits"]
        assert results.get(f"celery-task-meta-{task_id}") is None, "the failure was written while the results Redis was a replica"
        if cluster.broker == "redis":  # by its id (RabbitMQ counts the collect's batch, unacknowledged too, with it)
            assert await asyncio.to_thread(_unacked, cluster, task_id)
    finally:
        results.execute_command("REPLICAOF", "NO", "ONE")  # promoted
    with pytest.raises(Exception, match=says):
        await waiting
    assert await cluster.result(sent, 60)  # its batch's result waited for the results Redis too
    deadline = time.monotonic() + 20
    while await asyncio.to_thread(_unacked, cluster, task_id) and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
    assert not await asyncio.to_thread(_unacked, cluster, task_id), "the refused message was not acknowledged once its failure was written"
    while "task-failed" not in events.types(task_id) and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
    assert events.types(task_id)[:len(told)] == told
    (failed,) = [event for event in events.by_task[task_id] if event["type"] == "task-failed"]
    assert says in failed["exception"]
    assert cluster.worker.alive
    events.stop()
    client.close()


async def test_a_worker_stopped_while_a_refused_messages_failure_waits_leaves_the_message_to_the_broker_and_the_next_writes_it(
        results_apart_cluster):
    """A message Celery refuses itself (here an unreadable eta) was acknowledged before its failure
    was written, on the loop: a worker stopped while the write waited lost both, and its caller
    waited for ever.  Now it is acknowledged only once written: the stopped worker (a warm
    shutdown, which does not wait for the write) leaves it to the broker, and the next worker
    refuses it again and writes its failure."""
    cluster, results_server = results_apart_cluster
    says = REFUSED["unreadable-eta"][2]
    async with _an_unreadable_eta_while_results_refuse(cluster, results_server) as (task_id, results):
        await asyncio.sleep(1.0)  # its write refused at least once
        # A clean stop, not a quick one: the worker finishes what its pool runs (README, "Stopping
        # a worker"); with Celery's own pool, 30 s more when the SIGTERM landed just after a task
        # (here the housekeeping run, every second) went to a pool process (tests/integration/test_worker_stop.py).
        assert await asyncio.to_thread(cluster.worker.terminate, 30) == 0
        assert results.get(f"celery-task-meta-{task_id}") is None
        assert await asyncio.to_thread(_held_by_broker, cluster, task_id), "the broker no longer holds the refused message"
    cluster.worker = await asyncio.to_thread(cluster.start_worker, "worker2")
    with pytest.raises(Exception, match=says):
        await cluster.result(cluster.business.AsyncResult(task_id), 60)
    deadline = time.monotonic() + 20
    while await asyncio.to_thread(_held_by_broker, cluster, task_id) and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
    assert not await asyncio.to_thread(_held_by_broker, cluster, task_id)


async def test_a_broker_connection_lost_while_a_refused_messages_failure_waits_loses_nothing_and_the_worker_reads_on(
        proxied_results_apart_cluster):
    """The worker's broker connection is reset while a refused message's failure waits: the
    acknowledgement that would follow the write is for a channel that is gone: it is left to the
    broker, in one line.  The failure is written once the results Redis takes writes (the write does not need
    the broker), the caller gets it, the broker keeps nothing of the message, and the worker, on
    its new connection, runs the next collect; it reconnects once, not in a loop.

    The broker gives the message back meanwhile (RabbitMQ when the connection drops; the Redis
    transport restores it as the channel closes), and the worker refuses it again and writes its
    failure a second time, which is harmless.  (On the Redis broker the copy pushed back was lost
    about once in seven runs under load: Redis had not yet seen the reset of the dropped
    connection, whose blocked ``BRPOP`` took it; the NAT test below makes that happen every time.)"""
    cluster, results_server, proxy = proxied_results_apart_cluster
    says = REFUSED["unreadable-eta"][2]
    async with _an_unreadable_eta_while_results_refuse(cluster, results_server) as (task_id, results):
        await asyncio.sleep(1.0)  # its write refused at least once
        proxy.reset()  # the worker's (and the node's) broker connections
        await asyncio.to_thread(cluster.worker.wait_log, "Connection to broker lost", 20)
        await asyncio.sleep(3.0)  # the worker reconnects; the write still waits
        assert results.get(f"celery-task-meta-{task_id}") is None
    with pytest.raises(Exception, match=says):
        await cluster.result(cluster.business.AsyncResult(task_id), 60)
    deadline = time.monotonic() + 40  # a copy restored late (VISIBILITY_TIMEOUT 8 s) is refused and written again
    while await asyncio.to_thread(_held_by_broker, cluster, task_id) and time.monotonic() < deadline:
        await asyncio.sleep(0.5)
    assert not await asyncio.to_thread(_held_by_broker, cluster, task_id), "the broker still holds the refused message"
    assert await cluster.collect("after", "after the reset", timeout=30)  # the worker reads on
    assert cluster.worker.alive
    log = cluster._log("worker").read_text(errors="replace")
    assert log.count("Connection to broker lost") == 1, "the worker lost its broker connection again"
    assert "Unrecoverable error" not in log
    # The message's channel is gone: it is not settled there (kombu logged that failure as CRITICAL,
    # with a traceback, for a message the broker gives back anyway).
    assert "Couldn't reject" not in log and "Couldn't ack" not in log
    assert "after the broker connection it came on was lost" in log


async def test_more_refused_messages_than_the_prefetch_window_stall_the_worker_until_their_failures_are_written_and_none_is_lost(
        narrow_results_apart_cluster):
    """Each refused message whose failure waits holds a place of the worker's prefetch window:
    twice as many as the window, while the results Redis refuses, fill it, and the worker reads
    nothing more (a collect waits, as documented).  Once the results Redis takes writes again, every
    failure is written, every refused message acknowledged, and the collect runs."""
    cluster, results_server = narrow_results_apart_cluster
    _, read_line, says, _ = REFUSED["malformed"]
    results = redis_lib.Redis.from_url(results_server.url(1), socket_timeout=5)
    client = await cluster.connect("stalled")
    task_ids = [str(uuid.uuid4()) for _ in range(2 * NARROW_WINDOW)]
    results.execute_command("REPLICAOF", "127.0.0.1", str(launcher.free_port()))  # a primary that does not answer: READONLY
    try:
        for task_id in task_ids:
            _publish(cluster, "malformed", task_id)
        await asyncio.to_thread(cluster.worker.wait_log, read_line.format(task_id=task_ids[NARROW_WINDOW - 1]), 20)
        sent = cluster.send(to="stalled", data="behind a full window")
        await asyncio.sleep(3.0)
        log = cluster._log("worker").read_text(errors="replace")
        assert not any(read_line.format(task_id=task_id) in log for task_id in task_ids[NARROW_WINDOW:]), "read past its window"
        with pytest.raises(TimeoutError):  # the collect did not run while the window was full
            await client.messages(1, timeout=1)
    finally:
        results.execute_command("REPLICAOF", "NO", "ONE")  # promoted
    for task_id in task_ids:
        with pytest.raises(Exception, match=says):
            await cluster.result(cluster.business.AsyncResult(task_id), 90)
    assert [f["data"] for f in await client.messages(1, timeout=30)] == ["behind a full window"]
    assert await cluster.result(sent, 60)
    deadline = time.monotonic() + 20
    held = lambda: any(_held_by_broker(cluster, task_id) for task_id in task_ids)  # noqa: E731
    while await asyncio.to_thread(held) and time.monotonic() < deadline:
        await asyncio.sleep(0.5)
    assert not await asyncio.to_thread(held), "the broker still holds refused messages"
    assert cluster.worker.alive
    client.close()


async def test_a_worker_killed_while_several_refused_messages_failures_wait_leaves_each_to_the_next_worker(proxied_results_apart_cluster):
    """One refused message of each kind waits for its failure's write when the worker is killed
    (SIGKILL: nothing runs at exit): none is written, the broker keeps every message (RabbitMQ
    requeues them with the connection; Redis restores them after the visibility timeout, 8 s here),
    and the next worker writes each failure and leaves nothing on the broker.  Stock Celery
    acknowledged three of these kinds before their failure was written: a worker killed then lost
    them, and their callers waited for ever.  (A warm shutdown: the unreadable-eta test above.)"""
    cluster, results_server, _ = proxied_results_apart_cluster
    results = redis_lib.Redis.from_url(results_server.url(1), socket_timeout=5)
    task_ids = {kind: str(uuid.uuid4()) for kind in REFUSED}
    results.execute_command("REPLICAOF", "127.0.0.1", str(launcher.free_port()))  # a primary that does not answer: READONLY
    try:
        for kind, task_id in task_ids.items():
            _publish(cluster, kind, task_id)
            await asyncio.to_thread(cluster.worker.wait_log, REFUSED[kind][1].format(task_id=task_id), 20)
        await asyncio.sleep(1.0)  # each write refused at least once
        await asyncio.to_thread(cluster.worker.kill)
        assert not any(results.get(f"celery-task-meta-{task_id}") for task_id in task_ids.values())
    finally:
        results.execute_command("REPLICAOF", "NO", "ONE")  # promoted
    cluster.worker = await asyncio.to_thread(cluster.start_worker, "worker2")
    for kind, task_id in task_ids.items():
        with pytest.raises(Exception, match=REFUSED[kind][2]):
            await cluster.result(cluster.business.AsyncResult(task_id), 60)
    deadline = time.monotonic() + 40
    held = lambda: any(_held_by_broker(cluster, task_id) for task_id in task_ids.values())  # noqa: E731
    while await asyncio.to_thread(held) and time.monotonic() < deadline:
        await asyncio.sleep(0.5)
    assert not await asyncio.to_thread(held), "the broker still holds refused messages"


async def test_a_message_unacknowledged_when_a_nat_forgets_the_workers_redis_connections_is_given_back(redis_proxied_results_apart_cluster):
    """A NAT or load balancer between the worker and the Redis broker drops its state: the worker's
    connections are reset, but Redis never learns, and still holds the dropped connection's blocked
    ``BRPOP`` until its timeout (1 s).  The worker reconnects and, as the old channel closes, pushes
    back what it held unacknowledged (here a refused message whose failure waits): pushed then, the
    message went to that ``BRPOP``, whose answer nobody reads, and was lost to the broker for good
    (no queue, no unacked record).  The close now ends the dropped connection's client in Redis
    first (``CLIENT KILL``; where Redis refuses it, it waits for the ``BRPOP`` to time out, as
    ``test_redis_transport.py`` checks): the message is back on the broker, read again and refused
    again."""
    cluster, results_server, proxy = redis_proxied_results_apart_cluster
    says = REFUSED["unreadable-eta"][2]
    async with _an_unreadable_eta_while_results_refuse(cluster, results_server) as (task_id, results):
        proxy.cut_clients()
        # Then kombu's "Restoring N unacknowledged message(s)": the refused one, and whatever else
        # the reset caught unacknowledged (a housekeeping run whose ack it cut, say).
        await asyncio.to_thread(cluster.worker.wait_log, "ended the BRPOP of a lost broker connection in Redis", 20)
        await asyncio.sleep(3.0)
        assert await asyncio.to_thread(_held_by_broker, cluster, task_id), "the message unacknowledged at the reconnection is lost"
    with pytest.raises(Exception, match=says):
        await cluster.result(cluster.business.AsyncResult(task_id), 60)

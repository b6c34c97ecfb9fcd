"""Requests the worker holds back, on both brokers: a collect sent with a ``countdown`` (or
``eta``) waits on the worker's timer as any Celery task does (``CollectBatches._do_flush``), so
requests waiting for their time neither hold the worker's prefetch window nor run early, and
``celery inspect scheduled`` (Flower's worker page, Tasks, Scheduled) lists them; a rate limit
spaces requests out as for any task; a request that finds the store unavailable is sent again
with a countdown.  Business code here knows the tasks by name only."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import re
import socket
import time

import psutil
import pytest
from celery.canvas import StampingVisitor

import launcher
from tests.integration.conftest import Cluster, broker_url_for, start_or_explain
from tests.integration.taskevents import TaskEvents

#: More requests than the worker's prefetch window holds (its 2 pool processes times
#: COLLECT_BATCH, 100): celery-batches kept each in the window until it ran, so this many waiting
#: stopped the worker from reading anything else.
WAITING = 500


async def scheduled_on_worker(cluster, expected: set[str], within: float) -> set[str]:
    """The task ids `celery inspect scheduled` lists on the worker (not the nodes, which answer
    too), once they include ``expected`` or after ``within`` seconds."""
    inspect = cluster.business.control.inspect(timeout=3, limit=1 + len(cluster.node_ports))
    listed: set[str] = set()
    deadline = time.monotonic() + within
    while not expected <= listed and time.monotonic() < deadline:
        answers = await asyncio.to_thread(inspect.scheduled)
        listed = {entry["request"]["id"] for name, entries in (answers or {}).items() if name.startswith("worker@") for entry in entries}
        if not expected <= listed:
            await asyncio.sleep(0.2)
    return listed


@pytest.fixture(params=["redis", "amqp"])
def held_cluster(request, tmp_path):
    """A private cluster with one node, so that the requests left waiting go with it; its Redis
    broker gives a task back to the queue only after 900 s, longer than their countdown.  Task
    events on (``-E``), as an operator watching in Flower runs it."""
    redis_server = launcher.RedisServer(data_dir=tmp_path / "redis").start()
    request.addfinalizer(redis_server.stop)
    cluster = Cluster(redis_server, tmp_path, broker_url=broker_url_for(request.param, redis_server, request), auth_port=launcher.free_port(),
                      VISIBILITY_TIMEOUT=900)
    cluster.broker = request.param
    start_or_explain(cluster, nodes=1, concurrency=2, events=True)
    yield cluster
    cluster.stop(at_once=True)


async def test_requests_waiting_for_their_countdown_leave_the_worker_free_and_are_listed_as_scheduled(held_cluster):
    cluster = held_cluster
    now_client = await cluster.connect("now")
    soon_client = await cluster.connect("soon")
    events = await asyncio.to_thread(TaskEvents(cluster).start)
    waiting = [cluster.business.send_task("tasks.collect", kwargs={"to": "later", "data": n}, queue="collect", countdown=600)
               for n in range(WAITING)]
    sent = time.time()  # the clock of the events' timestamps
    soon = cluster.business.send_task("tasks.collect", kwargs={"to": "soon", "data": "soon"}, queue="collect", countdown=3)

    # A task sent after them runs at once.
    now_id = await cluster.collect("now", "now", timeout=30)
    assert [(f["id"], f["data"]) for f in await now_client.messages(1)] == [(now_id, "now")]

    # All of them wait on the worker's timer, where `celery inspect scheduled` finds them.
    expected = {result.id for result in waiting}
    listed = await scheduled_on_worker(cluster, expected, within=30)
    assert expected <= listed, f"{len(expected - listed)} of {WAITING} waiting requests not listed as scheduled"

    # The one with a short countdown ran when it was due, not before.
    soon_id = await cluster.result(soon, 30)
    frames = await soon_client.messages(1, timeout=30)
    assert [(f["id"], f["data"]) for f in frames] == [(soon_id, "soon")]
    assert all(result.state == "PENDING" for result in waiting[:20])

    # Flower lists each as received, with its eta, from when the worker took it (as Celery's
    # worker announces a task it holds for its eta); the one that ran, as started and succeeded.
    deadline = time.monotonic() + 15
    while "task-succeeded" not in events.types(soon.id) and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
    kinds = events.types(soon.id)
    assert kinds[0] == "task-received" and sorted(kinds[1:]) == ["task-started", "task-succeeded"], kinds
    (started,) = events.timestamps(soon.id, "task-started")
    assert started - sent >= 2.9, f"started {started - sent:.2f} s after it was sent, before its countdown of 3 s"
    assert events.by_task[soon.id][0]["eta"]
    for result in waiting[:20]:
        assert events.types(result.id) == ["task-received"]
        assert events.by_task[result.id][0]["eta"]
    events.stop()
    now_client.close()
    soon_client.close()


#: The tasks business code calls (README, Business API), each with a request it could run.
BUSINESS_TASKS = [
    ("tasks.collect", "collect", [], {"to": "never", "data": 1}),
    ("tasks.collect_many", "collect", [], {"messages": [{"to": "never", "data": 1}]}),
    ("tasks.status", "dispatch", ["0" * 24], {}),
    ("tasks.presence", "dispatch", [["never"]], {}),
]


async def test_a_request_whose_eta_is_no_time_the_worker_holds_shows_as_failed_with_its_reason(held_cluster):
    """An eta that parses but that the worker's clock cannot hold (the year 1, east of UTC) fails
    its request with ``not run: ...`` as its result, and shows as failed, with that reason, where
    an operator watches (Flower, from the task events), as every message the worker refuses
    before it runs does.  A collect sent no event at all, and Flower never listed it; a status or
    presence request ran at once, its eta ignored, after Celery logged the eta with a traceback
    as an ERROR and sent task-rejected.  Each business task in turn, on one cluster."""
    cluster = held_cluster
    events = await asyncio.to_thread(TaskEvents(cluster).start)
    eta = datetime.datetime(1, 1, 1, tzinfo=datetime.timezone(datetime.timedelta(hours=5)))
    for task, queue, args, kwargs in BUSINESS_TASKS:
        result = cluster.business.send_task(task, args=args, kwargs=kwargs, queue=queue, eta=eta)
        with pytest.raises(Exception, match="not run: its eta .* cannot be read as a time"):
            await cluster.result(result, 30)
        deadline = time.monotonic() + 15
        while "task-failed" not in events.types(result.id) and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        assert events.types(result.id)[:2] == ["task-received", "task-failed"], task  # then Celery's task-rejected, as it drops the message
        (failed,) = [event for event in events.by_task[result.id] if event["type"] == "task-failed"]
        assert failed["exception"].startswith("InvalidMessage: not run: its eta 0001-01-01T00:00:00+05:00 cannot be read as a time"), task
    events.stop()


async def test_a_collect_that_finds_the_store_locked_is_retried_after_a_countdown_and_delivered_once(held_cluster):
    """The store unavailable (here the embedded store's messages file locked by another process,
    as a long write or a full disk would): the request is sent again with a countdown, waits on
    the worker's timer, and once the store is back is stored and delivered once, under the id it returns."""
    cluster = held_cluster
    client = await cluster.connect("patient")
    first = await cluster.collect("patient", "first")  # the store's files exist
    assert [f["id"] for f in await client.messages(1)] == [first]
    with cluster.store_locked():
        result = cluster.send(to="patient", data="second")
        await asyncio.to_thread(cluster.worker.wait_log, f"tasks.collect {result.id}: store unavailable", 30)
    second = await cluster.result(result, 60)
    frames = await client.messages(1, timeout=30) + await client.quiet(1.0)
    assert [(f["id"], f["data"]) for f in frames] == [(second, "second")]
    client.close()


async def test_a_collect_retried_while_the_store_is_locked_shows_retry_and_still_expires_when_it_was_to(held_cluster):
    """The worker's own retry (the store unavailable) is what Celery's retry is to a caller: the
    state is ``RETRY`` with the error, not ``PENDING``, and the request sent again keeps its
    ``expires``.  Without it, a message whose ``expires`` passed while the store was down was
    stored and delivered once the store was back."""
    cluster = held_cluster
    client = await cluster.connect("late")
    first = await cluster.collect("late", "first")  # the store's files exist
    assert [f["id"] for f in await client.messages(1)] == [first]
    with cluster.store_locked():
        # Far enough for the first run's wait on the lock (its busy timeout, 5 s) to end before it.
        expires = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(seconds=10)
        result = cluster.business.send_task("tasks.collect", kwargs={"to": "late", "data": "stale"}, queue="collect", expires=expires)
        await asyncio.to_thread(cluster.worker.wait_log, f"tasks.collect {result.id}: store unavailable", 30)
        waiting = cluster.business.AsyncResult(result.id)
        state, info = waiting.state, waiting.info
        # Past it, and past the wait on the lock (5 s) of a run that began just before it: that
        # run may still store the message (Celery checks expires as a request starts, not after).
        await asyncio.sleep(max(0.0, (expires - datetime.datetime.now(datetime.timezone.utc)).total_seconds()) + 7)
    deadline = time.monotonic() + 60
    while cluster.business.AsyncResult(result.id).state in ("PENDING", "RETRY") and time.monotonic() < deadline:
        await asyncio.sleep(0.2)

    assert state == "RETRY" and "store" in str(info), (state, info)
    assert cluster.business.AsyncResult(result.id).state == "REVOKED"
    assert await client.quiet(1.0) == [], "an expired request was stored and delivered"
    client.close()


class _Tenant(StampingVisitor):
    def on_signature(self, sig, **headers):
        return {"tenant": "held-t1"}


async def test_a_stamped_collect_retried_while_the_store_is_locked_is_still_revoked_by_its_stamp(held_cluster):
    """The request the worker sends again (the store unavailable) keeps its stamps, as Celery's
    own retry does: without them ``revoke_by_stamped_headers`` no longer stopped it, and it was
    stored and delivered once the store was back."""
    cluster = held_cluster
    client = await cluster.connect("stamped")
    first = await cluster.collect("stamped", "first")  # the store's files exist
    assert [f["id"] for f in await client.messages(1)] == [first]
    events = await asyncio.to_thread(TaskEvents(cluster).start)
    with cluster.store_locked():
        stamped = cluster.business.signature("tasks.collect", kwargs={"to": "stamped", "data": "revoked"}, queue="collect")
        stamped.stamp(visitor=_Tenant())
        result = stamped.apply_async()
        # Revoked while its first run waits for the store (5 s): that run goes on, and the request
        # it sends again is what the stamp must stop (a request not yet started is stopped anyway).
        deadline = time.monotonic() + 30
        while "task-started" not in events.types(result.id) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert "task-started" in events.types(result.id), events.types(result.id)
        replies = await asyncio.to_thread(cluster.business.control.revoke_by_stamped_headers, {"tenant": "held-t1"},
                                          destination=[f"worker@{socket.gethostname()}"], reply=True, timeout=10)
        assert replies, "the worker did not answer revoke_by_stamped_headers"
        await asyncio.to_thread(cluster.worker.wait_log, f"tasks.collect {result.id}: store unavailable", 30)
        await asyncio.sleep(1.0)
    deadline = time.monotonic() + 60
    while cluster.business.AsyncResult(result.id).state in ("PENDING", "RETRY") and time.monotonic() < deadline:
        await asyncio.sleep(0.2)

    assert cluster.business.AsyncResult(result.id).state == "REVOKED"
    assert await client.quiet(2.0) == [], "a request revoked by its stamp was stored and delivered"
    events.stop()
    client.close()


async def test_a_collect_whose_first_run_stored_nothing_gets_ids_from_when_it_is_stored_so_a_later_resume_replays_it(held_cluster):
    """A request whose first run claimed its key (its ids) and found the messages file locked is
    sent again; a message stored before that retry runs reaches a device, which then goes
    offline.  The retry stored the request's message under the first run's ids, seconds older
    than that device's ``since``, and its resume skipped it.  Now the retry binds its key to ids
    of its own time, and the resume replays the message."""
    cluster = held_cluster
    device = await cluster.connect("roamer")
    first = await cluster.collect("roamer", "first")  # the store's files exist
    assert [f["id"] for f in await device.messages(1)] == [first]
    with cluster.store_locked():
        result = cluster.send(to="roamer", data="late")
        sent = time.monotonic()
        pattern = re.compile(rf"tasks\.collect {result.id}: store unavailable .*; retry (\d+) in ([\d.]+) s")
        # Held until a retry waits long enough for the message below to be stored first, and the
        # first run's ids are older than the resume's overlap (RESUME_OVERLAP_MS, 2 s).  Each
        # retry's countdown is drawn in [0, 2^(n-1)] s (full jitter): that none of the five waits
        # a second or more has a chance of about 1 in 1,000.
        seen = 0
        while True:
            retries = [(int(n), float(wait)) for n, wait in pattern.findall(cluster.worker.log_tail(2000))]
            if len(retries) > seen:
                seen = len(retries)
                retry, countdown = retries[-1]
                if countdown >= 1.0 and time.monotonic() - sent > 2.5:
                    break
                assert retry < 5, f"no retry waited a second or more: {retries}"
            await asyncio.sleep(0.05)
    later = await cluster.collect("roamer", "later")
    assert [f["id"] for f in await device.messages(1)] == [later]
    device.close()
    late = await cluster.result(result, 60)
    assert late > later, f"stored under its first run's id {late}, before the message stored meanwhile ({later})"
    resumed = await cluster.connect("roamer", since=later)
    frames = await resumed.messages(1, timeout=30)
    if frames[0]["id"] == later:  # the replay reaches RESUME_OVERLAP_MS back: clients drop what they had by id
        frames = await resumed.messages(1, timeout=30)
    frames += [f for f in await resumed.quiet(0.5) if f["type"] == "message"]
    assert [(f["id"], f["data"]) for f in frames] == [(late, "late")]
    resumed.close()


@contextlib.asynccontextmanager
async def collect_rate_limited(cluster, rate: str):
    """``celery control rate_limit tasks.collect <rate>`` on the cluster's worker (checked answered
    ``ok``) for the body, the limit taken off again after it."""
    control = cluster.business.control
    worker = [f"worker@{socket.gethostname()}"]
    replies = await asyncio.to_thread(control.rate_limit, "tasks.collect", rate, destination=worker, reply=True, timeout=5)
    assert any("ok" in answer for reply in replies for answer in reply.values()), replies
    try:
        yield
    finally:
        await asyncio.to_thread(control.rate_limit, "tasks.collect", None, destination=worker, reply=True, timeout=5)


async def test_a_rate_limit_set_while_the_worker_runs_spaces_the_requests_out_in_order(held_cluster):
    """``celery control rate_limit tasks.collect 4/s`` (or Flower's worker page, or ``rate_limit``
    on the task): the worker runs at most that many requests a second, in the order it read them,
    as for any Celery task; celery-batches ran them all at once."""
    cluster = held_cluster
    client = await cluster.connect("limited")
    async with collect_rate_limited(cluster, "4/s"):
        started = time.monotonic()
        sent = [cluster.send(to="limited", data=n) for n in range(12)]
        # Read (and so ack) the frames as they come: one left unread REDELIVER_AFTER (4 s here)
        # is sent again by housekeeping, and the results below take 3 s at the least.
        arriving = asyncio.create_task(client.messages(12, timeout=60))
        ids = [await cluster.result(result, 60) for result in sent]
        elapsed = time.monotonic() - started
        frames = await arriving
        assert [(f["id"], f["data"]) for f in frames] == list(zip(ids, range(12)))
        # One token a quarter of a second, the first at once: 11 quarters at the least.
        assert elapsed >= 11 / 4 - 0.25, f"12 requests at 4/s took only {elapsed:.2f} s"
    more = [cluster.send(to="limited", data=n) for n in range(12, 24)]
    arriving = asyncio.create_task(client.messages(12, timeout=60))
    more_ids = [await cluster.result(result, 60) for result in more]
    # Unlimited, they may run at the same moment on the two pool processes, which gives them no
    # order between them (README, "Ids and order"): each arrives, once.
    assert sorted(f["id"] for f in await arriving) == sorted(more_ids)
    client.close()


async def test_a_collect_held_by_its_rate_limit_holds_the_later_collect_many_of_its_user_though_they_could_share_a_batch(held_cluster):
    """One sender alternating ``tasks.collect`` (rate limited) and ``tasks.collect_many`` to one
    user: each ``collect_many`` waits for the ``collect`` read before it that waits for its token,
    though a flush of either task takes the other's requests along into one batch, so the user
    gets every message in the order sent."""
    cluster = held_cluster
    client = await cluster.connect("limited-mixed")
    async with collect_rate_limited(cluster, "4/s"):
        sent = [cluster.send(to="limited-mixed", data=n) if n % 2 == 0 else
                cluster.send("tasks.collect_many", messages=[{"to": "limited-mixed", "data": n}]) for n in range(16)]
        arriving = asyncio.create_task(client.messages(16, timeout=60))  # read as they come (see above)
        for result in sent:
            await cluster.result(result, 60)
        assert [f["data"] for f in await arriving] == list(range(16))
    client.close()


async def test_requests_held_for_their_countdown_by_a_worker_that_stops_run_on_the_next_when_due(held_cluster):
    """A worker stopped (SIGTERM, Celery's warm shutdown) while it holds requests for their
    countdown stops cleanly without running them: they go back to the broker, and the next
    worker runs each once, when due."""
    cluster = held_cluster
    client = await cluster.connect("handed-on")
    events = await asyncio.to_thread(TaskEvents(cluster).start)
    sent = time.time()  # the clock of the events' timestamps
    # 12 s: time for the listing below (up to 5 s and a 3 s inspect under load) before the SIGTERM.
    held = [cluster.business.send_task("tasks.collect", kwargs={"to": "handed-on", "data": n}, queue="collect", countdown=12) for n in range(20)]
    assert await scheduled_on_worker(cluster, {result.id for result in held}, within=5) == {result.id for result in held}
    assert time.time() - sent < 11, "too slow to list the requests before their countdown (12 s) ran out"
    # A clean stop, not a quick one: the worker finishes what its pool runs (README, "Stopping a worker").
    assert await asyncio.to_thread(cluster.worker.terminate, 60) == 0
    assert all(result.state == "PENDING" for result in held), "run by the worker that stopped"
    ids, started, frames = await _run_by_the_next_worker(cluster, client, events, held)
    assert all(len(times) == 1 for times in started), started  # each started once, by the next worker
    early = [times[0] - sent for times in started if times[0] - sent < 11.9]
    assert not early, f"started {early} s after they were sent, before their countdown of 12 s"
    assert sorted((f["id"], f["data"]) for f in frames) == sorted(zip(ids, range(20)))
    client.close()


async def _run_by_the_next_worker(cluster, client, events, held: list, settle: float = 0.0) -> tuple[list, list, list]:
    """Start the next worker (``worker-2``, task events on) and wait for it to run ``held``:
    ``(ids, task-started times per request, the frames client got)``, once every request has a
    ``task-started`` (or 15 s passed) and ``settle`` seconds more; ``events`` stopped."""
    cluster.worker = cluster.start_worker(name="worker-2", events=True)
    # Read (and so ack) the frames as they come, as a browser does, while the results and events
    # are awaited: a frame left unread REDELIVER_AFTER (4 s here) is sent again under its id by
    # housekeeping, which under load the waits below outlasted (each frame came twice).
    arriving = asyncio.create_task(client.messages(len(held), timeout=60))
    ids = [await cluster.result(result, 30) for result in held]
    deadline = time.monotonic() + 15
    while not all(events.timestamps(result.id, "task-started") for result in held) and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
    await asyncio.sleep(settle)
    started = [events.timestamps(result.id, "task-started") for result in held]
    events.stop()
    return ids, started, await arriving + await client.quiet(1.0)


async def test_requests_that_come_due_while_their_worker_stops_are_not_started_there(held_cluster):
    """A worker's warm shutdown that outlasts the countdown of requests it holds (its pool slow to
    drain: here its pool processes stopped with SIGSTOP until after the countdown) fires their
    timers while the pool drains (Celery 5.6 fires the event loop's timers on a thread then).
    They are left to the broker, not started: the stopping worker announced each as started
    (task-started, counted as active) and handed it to a pool that no longer runs anything, so
    Flower showed each request started twice, once by a worker that never ran it."""
    cluster = held_cluster
    client = await cluster.connect("handed-on")
    events = await asyncio.to_thread(TaskEvents(cluster).start)
    sent = time.time()
    held = [cluster.business.send_task("tasks.collect", kwargs={"to": "handed-on", "data": n}, queue="collect", countdown=10) for n in range(10)]
    assert await scheduled_on_worker(cluster, {result.id for result in held}, within=5) == {result.id for result in held}
    assert time.time() - sent < 9, "too slow to stop the pool before the countdown (10 s) ran out"
    pool = psutil.Process(cluster.worker.pid).children()  # as test_collect_batching's pool_stopped
    assert pool, "the worker's pool processes"
    for process in pool:
        process.suspend()  # SIGSTOP
    stopping = asyncio.create_task(asyncio.to_thread(cluster.worker.terminate, 60))
    try:
        await asyncio.sleep(max(0.0, sent + 10 + 3 - time.time()))  # 3 s past the countdown, while the pool drains
    finally:
        for process in pool:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.resume()  # SIGCONT
    assert await stopping == 0
    assert all(result.state == "PENDING" for result in held), "run by the worker that stopped"
    # settle: a second task-started of any would be in by then
    ids, started, frames = await _run_by_the_next_worker(cluster, client, events, held, settle=1.0)
    assert all(len(times) == 1 for times in started), started
    assert sorted((f["id"], f["data"]) for f in frames) == sorted(zip(ids, range(10)))
    client.close()


@pytest.fixture(params=["redis", "amqp"])
def restartable_cluster(request, tmp_path):
    """A private cluster whose worker has ``worker_pool_restarts`` on (Flower's Restart pool),
    one pool process, and a Redis broker that gives a task back only after 900 s."""
    redis_server = launcher.RedisServer(data_dir=tmp_path / "redis").start()
    request.addfinalizer(redis_server.stop)
    cluster = Cluster(redis_server, tmp_path, broker_url=broker_url_for(request.param, redis_server, request), auth_port=launcher.free_port(),
                      VISIBILITY_TIMEOUT=900)
    cluster.broker = request.param
    start_or_explain(cluster, nodes=1, concurrency=1, app="tests.integration.poolrestart_app")
    yield cluster
    cluster.stop(at_once=True)


async def test_a_pool_restart_runs_the_collect_requests_the_worker_held_in_its_new_pool_in_order(restartable_cluster):
    """Flower's Restart pool (``pool_restart``) remade the strategy as on a reconnection, which
    drops what the worker held for the broker to give back: the channel lived on, so the messages
    stayed unacknowledged, back on Redis only after the visibility timeout (out of order), and
    never on RabbitMQ, whose prefetch window they filled."""
    cluster = restartable_cluster
    client = await cluster.connect("restarted")
    worker = [f"worker@{socket.gethostname()}"]
    async with collect_rate_limited(cluster, "5/s"):
        sent = [cluster.send(to="restarted", data=n) for n in range(20)]
        arriving = asyncio.create_task(client.messages(20, timeout=40))
        await asyncio.sleep(1.5)  # the worker read them; most of them wait for their token now
        replies = await asyncio.to_thread(cluster.business.control.pool_restart, destination=worker, reply=True, timeout=10)
        assert any("ok" in answer for reply in replies for answer in reply.values()), replies
        ids = [await cluster.result(result, 40) for result in sent]
        frames = await arriving
    assert [(f["id"], f["data"]) for f in frames] == list(zip(ids, range(20)))
    assert "buffered requests left to the broker" not in cluster.worker.log_tail(400)
    client.close()

"""How the worker batches ``tasks.collect`` and ``tasks.collect_many`` requests (``tasks.batching``),
on a real worker whose flush timer and batch size are set so high that neither ever fires: a lone
request runs at once, and requests that come while a batch runs gather and run together once it
returns, ``collect_many`` up to ``COLLECT_MANY_MESSAGES`` messages a batch."""

from __future__ import annotations

import asyncio
import datetime
import re
import time
import uuid
from contextlib import contextmanager

import psutil
import pytest
import redis as redis_lib
from celery import Celery
from kombu import Connection

import launcher
from tasks.collect import COLLECT_MANY_MESSAGES
from tests.integration.conftest import Cluster, start_or_explain
from tests.unit.test_taskmessages import nested

NEVER = 600  # seconds: COLLECT_FLUSH_SECONDS of this cluster, longer than any test waits


@pytest.fixture
def lazy_timer_cluster(request, tmp_path):
    redis_server = launcher.RedisServer(data_dir=tmp_path / "redis").start()
    request.addfinalizer(redis_server.stop)  # also when the cluster cannot even be set up
    cluster = Cluster(redis_server, tmp_path, auth_port=launcher.free_port(), COLLECT_FLUSH_SECONDS=NEVER, COLLECT_BATCH=1000,
                      LOG_LEVEL="DEBUG")
    start_or_explain(cluster, nodes=1)
    yield cluster
    cluster.stop(at_once=True)


def batch_sizes(cluster: Cluster, task: str = "tasks.collect", requests: int = 0) -> list[tuple[int, int]]:
    """(requests, messages) of every batch of ``task`` the worker ran, from its (DEBUG) log, once
    its lines add up to at least ``requests`` requests (or after 10 s).  The worker logs a batch
    before it stores or sends anything, but a thread of this process copies its output to the
    file, and may not have yet when the test has seen the batch's results."""
    deadline = time.monotonic() + 10
    while True:
        text = cluster._log("worker").read_text(errors="replace")
        sizes = [(int(r), int(m)) for r, m in re.findall(re.escape(task) + r": (\d+) requests, (\d+) messages in one batch", text)]
        if sum(r for r, _ in sizes) >= requests or time.monotonic() > deadline:
            return sizes
        time.sleep(0.05)


@contextmanager
def pool_stopped(cluster: Cluster):
    """Every pool process stopped until the worker has read everything on the collect queue.  First
    the worker's main process has seen every earlier batch return (:func:`batches_returned`)."""
    batches_returned(cluster)
    pool = psutil.Process(cluster.worker.pid).children()
    assert pool, "the worker has no pool processes"
    for process in pool:
        process.suspend()
    try:
        yield
        broker = redis_lib.Redis.from_url(cluster.env["BROKER_URL"])
        deadline = time.monotonic() + 20
        while broker.llen("collect") and time.monotonic() < deadline:
            time.sleep(0.05)
        assert broker.llen("collect") == 0, "the worker did not read the burst"
    finally:
        for process in pool:
            process.resume()


def worker_inspect(cluster: Cluster):
    """``celery inspect`` of the cluster, which waits no longer once the worker and every node answered."""
    return cluster.business.control.inspect(timeout=3, limit=1 + len(cluster.node_ports))


def worker_answer(inspect, method: str):
    """The worker's answer to ``inspect``'s ``method`` (the push nodes answer these commands too,
    for their own queue), or None when it did not answer."""
    return next((answer for name, answer in (getattr(inspect, method)() or {}).items() if name.startswith("worker@")), None)


def batches_returned(cluster: Cluster, timeout: float = 20) -> None:
    """Wait until the worker's main process has seen every batch of ``tasks.collect`` and
    ``tasks.collect_many`` return: none of their requests active, as ``celery inspect active``
    lists them.  A batch's results are stored before its pool process tells the main process that
    it returned; a pool stopped in between (a test's earlier request, its result in hand) left that
    batch running for the main process, which then handed nothing more to the pool (one batch at a
    time: :class:`tasks.batching.FlushGate`), and the test waited for a batch that never came
    (seen once under load, in ``test_a_retries_header_that_is_not_a_count...``)."""
    inspect = worker_inspect(cluster)
    deadline = time.monotonic() + timeout
    while True:
        active = worker_answer(inspect, "active")
        running = [task for task in active or () if task.get("name") in ("tasks.collect", "tasks.collect_many")]
        if active is not None and not running:
            return
        assert time.monotonic() < deadline, f"the worker's batches did not return within {timeout:g} s: still active {running}"
        time.sleep(0.05)


def applied_batches(cluster: Cluster) -> int:
    """How many batches the worker's main process has handed to its pool so far (its DEBUG log's
    ``TaskPool: Apply <function _apply_batch``), which it logs even while the pool is stopped."""
    return cluster._log("worker").read_text(errors="replace").count("TaskPool: Apply <function _apply_batch")


def send_ahead(cluster: Cluster, **kwargs):
    """Send one request while the pool is stopped, and wait until the worker has handed it to the
    pool as a batch of its own: that batch then holds the pool, and what is sent next gathers.  (A
    fixed half-second sleep was not enough on a loaded machine: the request reached the worker
    with the next ones, and all went in one batch.)"""
    before = applied_batches(cluster)
    result = cluster.send(**kwargs)
    cluster.worker.wait_ready(lambda: applied_batches(cluster) > before, timeout=20, what="handing the request ahead to its pool")
    return result


async def test_a_lone_request_runs_at_once_and_a_burst_on_a_busy_pool_gathers_into_few_batches(lazy_timer_cluster):
    cluster = lazy_timer_cluster
    client = await cluster.connect("lone")
    message_id = await cluster.collect("lone", {"n": 0}, timeout=30)  # not after NEVER seconds
    (frame,) = await client.messages(1)
    assert frame["id"] == message_id
    assert batch_sizes(cluster, requests=1) == [(1, 1)]

    # The first request's batch never returns while the pool is stopped; the rest gather.
    total = 40
    with pool_stopped(cluster):
        results = [cluster.send(to="lone", data={"n": n}) for n in range(1, total + 1)]
    frames = await client.messages(total, timeout=30)
    ids = [await cluster.result(r, timeout=30) for r in results]
    assert sorted(f["id"] for f in frames) == sorted(ids) and len(set(ids)) == total  # each once
    sizes = [requests for requests, _ in batch_sizes(cluster, requests=1 + total)[1:]]
    assert sum(sizes) == total
    # one batch went before anything gathered, the rest gathered into one more; or, when the
    # worker's read took the whole burst at once (it came before the worker's BRPOP returned, as
    # on a loaded machine: seen once in CI), all of it went as one batch
    assert len(sizes) in (1, 2), sizes
    client.close()


@pytest.mark.parametrize("positional", [False, True], ids=["kwargs", "args"])
async def test_collect_many_requests_that_gather_run_together_up_to_the_messages_a_batch_holds(lazy_timer_cluster, positional):
    """Also with the list as the one positional argument (``collect_many.delay([...])``, or from
    the task before it in a chain): such a request counted as one message, and thirty of them,
    more messages than a batch holds, went to the store and the route lookup as one batch."""
    cluster = lazy_timer_cluster
    clients = {user: await cluster.connect(user) for user in ("many-a", "many-b")}
    tasks, per_task = 30, COLLECT_MANY_MESSAGES * 3 // 2 // 30  # more messages than one batch may hold

    def send(messages):
        if positional:
            return cluster.business.send_task("tasks.collect_many", args=[messages], queue="collect")
        return cluster.send("tasks.collect_many", messages=messages)

    with pool_stopped(cluster):
        invalid = send("not a list")
        results = [send([{"to": f"many-{'ab'[(t + n) % 2]}", "data": [t, n]} for n in range(per_task)]) for t in range(tasks)]
    answers = [await cluster.result(r, timeout=30) for r in results]
    assert all(len(a) == per_task and all(isinstance(i, str) for i in a) for a in answers)
    assert len({i for a in answers for i in a}) == tasks * per_task
    with pytest.raises(Exception, match='"messages" must be a list'):
        await cluster.result(invalid, timeout=30)
    for user, client in clients.items():
        frames = await client.messages(tasks * per_task // 2, timeout=30)
        expected = {i for t, a in enumerate(answers) for n, i in enumerate(a) if "ab"[(t + n) % 2] == user[-1]}
        assert {f["id"] for f in frames} == expected
        client.close()
    batches = batch_sizes(cluster, "tasks.collect_many", requests=1 + tasks)
    assert sum(m for _, m in batches) == tasks * per_task
    assert all(m <= COLLECT_MANY_MESSAGES for _, m in batches), batches
    assert len(batches) <= 4 and max(r for r, _ in batches) >= 10, batches  # gathered, not one per task


MALFORMED = [  # (body, what the failure says)
    ([[], ["to", "x"], {}], "not a Celery task message: its args, kwargs and embed are of types list, list and dict"),
    ([5, {}, {}], "not a Celery task message: its args, kwargs and embed are of types int, dict and dict"),
    ([[], {"to": "lone", "data": 1}, "embed"], "not a Celery task message: its args, kwargs and embed are of types list, dict and str"),
    ("just a string", "not a Celery task message: its body is of type str"),
    ([1, 2], "not a Celery task message: its body is of type list with 2 items"),
    ({"a": 1}, "not a Celery task message: its body is of type dict"),
]
#: (body, headers beyond the task's name and id, what the failure says): messages Celery's own
#: consumer refuses, and only logged; a caller waiting on one waited for ever.
REFUSED_BY_CELERY = [
    ([[], {"to": "lone", "data": 1}, {}], {"eta": "tomorrow"}, "not run: invalid ETA value 'tomorrow'"),
    ([[], {"to": "lone", "data": 1}, {}], {"expires": "never"}, "not run: invalid expires value 'never'"),
    # read, but no time the worker's clock holds (year 0 in UTC): rejected, logged, and its failure stored
    ([[], {"to": "lone", "data": 1}, {}], {"eta": "0001-01-01T00:00:00+05:00"}, "not run: its eta 0001-01-01T00:00:00+05:00 cannot be read as a time"),
]
#: ``timelimit`` headers that are not ``[hard, soft]`` (seconds or null each): a plain task's request
#: raised out of the worker's loop with them.
BAD_TIME_LIMITS = [5, [1, 2, 3], ["a", None], [-1, None], [10**400, None]]  # (an int no float holds raised in the check itself)
#: Envelopes that stopped the worker in Celery's consumer, before any task's code (a task name
#: Celery looks up and cannot hash; an unknown task whose id Celery reads and does not find).
STOPPED_THE_WORKER = [
    ({"task": ["tasks.collect"], "id": "x"}, [[], {}, {}]),
    ({"task": "tasks.nope"}, [[], {}, {}]),
    ({}, {"task": "tasks.nope", "args": [], "kwargs": {}}),
]


def _publish_raw(cluster: Cluster, queue: str, task: str, bodies: list, headers: dict | None = None, serializer: str = "json") -> list[str]:
    """Task messages made by hand (as another client might): the headers right, the bodies not."""
    ids = []
    with Connection(cluster.env["BROKER_URL"]) as conn:
        producer = conn.Producer()
        for body in bodies:
            ids.append(str(uuid.uuid4()))
            producer.publish(body, exchange="", routing_key=queue, serializer=serializer, headers={"task": task, "id": ids[-1], "lang": "py", **(headers or {})})
    return ids


async def test_malformed_task_messages_fail_alone_with_their_reason_and_the_worker_goes_on(lazy_timer_cluster):
    # Each once stopped the worker ("Unrecoverable error"), with the batch it was in.
    cluster = lazy_timer_cluster
    client = await cluster.connect("lone")
    await cluster.collect("lone", {"n": 0}, timeout=30)
    with pool_stopped(cluster):  # the malformed requests come between good ones, in one batch
        before = cluster.send(to="lone", data={"n": 1})
        bad = _publish_raw(cluster, "collect", "tasks.collect", [body for body, _ in MALFORMED])
        after = cluster.send(to="lone", data={"n": 2})
    bad += _publish_raw(cluster, "dispatch", "tasks.receipts", ["just a string", [1, 2]])  # a task of Celery's own kind
    says = [s for _, s in MALFORMED] + ["not a Celery task message: its body is of type str", "not a Celery task message: its body is of type list with 2 items"]
    for limits in BAD_TIME_LIMITS:  # Celery unpacks them as the request goes to the pool
        bad += _publish_raw(cluster, "dispatch", "tasks.status", [[["0" * 24], {}, {}]], {"timelimit": limits})
        says.append("not a Celery task message: its timelimit header is ")
    for body, headers, said in REFUSED_BY_CELERY:
        bad += _publish_raw(cluster, "collect", "tasks.collect", [body], headers)
        says.append(said)
    bad += _publish_raw(cluster, "collect", "tasks.collect", [[[], {}, {}]], serializer="pickle")
    says.append("not run: Refusing to deserialize untrusted content of type pickle")
    # What this process pickles for the pool, nested near Python's recursion limit: any task's
    # headers, and a protocol 1 body (Celery converts it here).
    for queue, task in (("collect", "tasks.collect"), ("dispatch", "tasks.status")):
        bad += _publish_raw(cluster, queue, task, [[[], {"to": "lone", "data": 1}, {}]], {"deep": nested(600)})
        says.append("not a Celery task message: its headers nest lists and objects more than 200 levels deep")
    bad += _publish_raw(cluster, "dispatch", "tasks.status", [{"args": [nested(600)], "kwargs": {}}])
    says.append("not a Celery task message: its protocol 1 body nests lists and objects more than 350 levels deep")
    with Connection(cluster.env["BROKER_URL"]) as conn:
        for headers, body in STOPPED_THE_WORKER:
            conn.Producer().publish(body, exchange="", routing_key="collect", serializer="json", headers=headers)
    ids = [await cluster.result(r, timeout=30) for r in (before, after)]
    frames = await client.messages(3, timeout=30)
    assert [f["id"] for f in frames][1:] == ids

    results = [cluster.business.AsyncResult(task_id) for task_id in bad]
    for result, said in zip(results, says, strict=True):
        with pytest.raises(Exception, match=re.escape(said)):
            await cluster.result(result, timeout=30)
    assert await cluster.collect("lone", {"n": 3}, timeout=30)  # still up
    assert cluster.worker.alive
    log = cluster._log("worker").read_text(errors="replace")
    assert "Unrecoverable error" not in log
    assert "its task name is of type list" in log and "it has no task id" in log
    client.close()


async def test_data_mongodb_cannot_store_fails_alone_and_the_rest_of_its_batch_is_delivered(lazy_timer_cluster):
    # An integer beyond 64 bits or an object key with NUL failed the store's write of the
    # whole batch: every request of it failed with the one message's StoreError.
    cluster = lazy_timer_cluster
    client = await cluster.connect("lone")
    await cluster.collect("lone", {"n": 0}, timeout=30)
    with pool_stopped(cluster):
        sent = [cluster.send(to="lone", data=data) for data in ({"n": 1}, {"n": 2**64}, {"bad\x00key": 1}, {"n": 2})]
    good = [await cluster.result(sent[i], timeout=30) for i in (0, 3)]
    for result, says in ((sent[1], "holds an integer outside MongoDB's 64-bit range"), (sent[2], "has the object key")):
        with pytest.raises(Exception, match=re.escape(says)):
            await cluster.result(result, timeout=30)
    frames = await client.messages(3, timeout=30)
    assert [f["id"] for f in frames][1:] == good
    # What the worker read in its first turn ran at once, the rest as one batch once it returned:
    # whatever the split, a batch held a bad request beside a good one.
    sizes = batch_sizes(cluster, requests=5)
    assert any(requests > messages >= 1 for requests, messages in sizes), sizes
    client.close()


async def test_batched_requests_show_as_reserved_then_active_tasks_and_count_in_the_workers_stats(lazy_timer_cluster):
    """What ``celery inspect active``, ``reserved`` and ``stats`` (Flower's worker page, its Tasks
    and Stats tabs) show of batched requests, as of any Celery task: reserved while they wait for
    a batch, active while their batch runs, gone once it returned, and counted in the worker's
    total per task name.  celery-batches kept them out of all three."""
    cluster = lazy_timer_cluster
    inspect = worker_inspect(cluster)

    def active_ids() -> set[str]:
        return {task["id"] for task in worker_answer(inspect, "active") or []}

    def queried(task_ids: set[str]) -> dict:
        """``celery inspect query_task``: what the worker holds of these ids, and in which state."""
        answers = inspect.query_task(*task_ids) or {}
        return next((answer for name, answer in answers.items() if name.startswith("worker@")), {})

    pool = psutil.Process(cluster.worker.pid).children()
    for process in pool:
        process.suspend()
    try:
        result = cluster.send(to="watched-active", data={"n": 1})
        deadline = time.monotonic() + 20
        while result.id not in (seen := active_ids()) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert result.id in seen, f"{result.id} not among the active tasks {seen}"
        (listed,) = [task for task in worker_answer(inspect, "active") if task["id"] == result.id]
        assert listed["name"] == "tasks.collect" and listed["kwargs"]["to"] == "watched-active"
        # Those read while it runs wait in the worker for the next batch: reserved, not active.
        waiting = [cluster.send(to=f"watched-reserved-{n}", data={"n": n}) for n in range(3)]
        ids = {w.id for w in waiting}
        deadline = time.monotonic() + 20
        while not ids <= (reserved := {task["id"] for task in worker_answer(inspect, "reserved") or []}) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert ids <= reserved, f"{ids} not among the reserved tasks {reserved}"
        assert not ids & active_ids()
        assert {i: state for i, (state, _) in queried(ids).items()} == {i: "reserved" for i in ids}
    finally:
        for process in pool:
            process.resume()
    await cluster.result(result, 30)
    for w in waiting:
        await cluster.result(w, 30)
    # Once they returned the worker forgets them, as any task: neither reserved nor active.
    deadline = time.monotonic() + 10
    while (left := queried(ids | {result.id})) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not left, left
    # The pool process stores the result before the main process hears that the batch returned
    # (so with any Celery task): it leaves the active list a moment after.
    deadline = time.monotonic() + 10
    while result.id in (seen := active_ids()) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert result.id not in seen
    stats = worker_answer(inspect, "stats")
    assert stats["total"].get("tasks.collect", 0) >= 1, stats["total"]


async def test_a_key_reused_for_other_data_within_one_batch_is_logged_as_across_batches(lazy_timer_cluster):
    """Two requests with one ``key`` and different data in one batch: the second's message is
    never stored or sent (both return the first's id), and the worker said nothing of it, where it
    warns when the reuse comes in a later batch."""
    cluster = lazy_timer_cluster
    client = await cluster.connect("keyed-in-batch")
    await cluster.collect("keyed-in-batch", {"n": 0}, timeout=30)
    with pool_stopped(cluster):
        ahead = send_ahead(cluster, to="keyed-in-batch", data={"n": 1})  # its batch holds the pool; the next three gather
        sent = [cluster.send(to="keyed-in-batch", data={"n": n}, key="same-key-in-batch") for n in (2, 2, 3)]
    await cluster.result(ahead, timeout=30)
    first, retry, other = [await cluster.result(r, timeout=30) for r in sent]
    assert first == retry == other
    assert [f["data"] for f in await client.messages(3, timeout=30)] == [{"n": 0}, {"n": 1}, {"n": 2}]
    assert batch_sizes(cluster, requests=5)[-1] == (3, 3)  # the three went together
    warning = f"key 'same-key-in-batch' was used before for message {first}, to other recipients or with other data"
    deadline = time.monotonic() + 10
    while warning not in (log := cluster._log("worker").read_text(errors="replace")) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert log.count(warning) == 1  # the request with the same data logged nothing
    client.close()


@pytest.fixture
def rpc_cluster(request, tmp_path):
    """A private cluster whose results go back through the broker (``RESULT_BACKEND=rpc://``), and
    business code that reads them so."""
    redis_server = launcher.RedisServer(data_dir=tmp_path / "redis").start()
    request.addfinalizer(redis_server.stop)
    cluster = Cluster(redis_server, tmp_path, auth_port=launcher.free_port(), RESULT_BACKEND="rpc://")
    start_or_explain(cluster, nodes=1)
    cluster.business = Celery(broker=cluster.env["BROKER_URL"], backend="rpc://")
    yield cluster
    cluster.stop(at_once=True)


async def test_with_rpc_results_a_message_the_worker_refuses_still_tells_its_caller_why(rpc_cluster):
    """The ``rpc://`` backend sends a result to the queue its caller named (``reply_to``): a
    message the worker refused before running it (another serializer, an unreadable eta) had its
    failure stored with no request, which that backend cannot send ("RPC backend missing task
    request"), and the caller waited for ever."""
    cluster = rpc_cluster
    kwargs = {"to": "rpc-user", "data": 1}
    refused = [
        (cluster.business.send_task("tasks.collect", kwargs=kwargs, queue="collect", serializer="pickle"), "the worker accepts JSON only"),
        (cluster.business.send_task("tasks.collect", kwargs=kwargs, queue="collect",
                                    eta=datetime.datetime(1, 1, 1, tzinfo=datetime.timezone(datetime.timedelta(hours=5)))),
         "cannot be read as a time"),
    ]
    for result, says in refused:
        with pytest.raises(Exception, match=re.escape(says)):
            await cluster.result(result, timeout=20)
    assert isinstance(await cluster.collect("rpc-user", 2, timeout=20), str)  # the backend works
    assert "result not stored" not in cluster._log("worker").read_text(errors="replace")


async def test_a_retries_header_that_is_not_a_count_fails_its_request_and_the_batch_beside_it_is_sent_again(lazy_timer_cluster):
    """A request made by hand or by another client with ``retries`` that is not a whole number
    ran as long as the store took its message; but a batch that found the store unavailable
    raised on it as it sent its requests again, and every request of the batch was acked
    without being stored or sent again (the good one beside it was lost, its caller waited for
    ever).  Now the worker refuses it as it reads it, saying why."""
    cluster = lazy_timer_cluster
    client = await cluster.connect("beside-bad-retries")
    await cluster.collect("beside-bad-retries", "first", timeout=30)  # the store's files exist
    await client.messages(1, timeout=30)
    with cluster.store_locked():
        with pool_stopped(cluster):
            ahead = send_ahead(cluster, to="beside-bad-retries", data="ahead")  # its batch holds the pool; the next two gather
            (bad,) = _publish_raw(cluster, "collect", "tasks.collect", [[[], {"to": "beside-bad-retries", "data": "bad"}, {}]], {"retries": "abc"})
            good = cluster.send(to="beside-bad-retries", data="good")
        await asyncio.to_thread(cluster.worker.wait_log, f"tasks.collect {good.id}: store unavailable", 30)
    with pytest.raises(Exception, match=re.escape("not a Celery task message: its retries header is 'abc', not a whole number")):
        await cluster.result(cluster.business.AsyncResult(bad), timeout=30)
    ids = [await cluster.result(r, timeout=60) for r in (ahead, good)]
    frames = await client.messages(2, timeout=30) + await client.quiet(1.0)
    assert sorted((f["id"], f["data"]) for f in frames) == sorted(zip(ids, ["ahead", "good"]))
    client.close()


@pytest.fixture(params=["user", "none"])
def count_cluster(request, tmp_path):
    """A worker whose flush timer never fires and whose count fires every 3 requests: celery-batches
    then flushes what the worker read beside a batch that runs (COLLECT_BATCH is also the most
    messages of a ``tasks.collect`` batch; a ``tasks.collect_many`` batch holds up to ``COLLECT_MANY_MESSAGES``); with
    ``COLLECT_ORDER`` user (the default) and none."""
    redis_server = launcher.RedisServer(data_dir=tmp_path / "redis").start()
    request.addfinalizer(redis_server.stop)
    cluster = Cluster(redis_server, tmp_path, auth_port=launcher.free_port(), COLLECT_FLUSH_SECONDS=NEVER, COLLECT_BATCH=3, LOG_LEVEL="DEBUG",
                      COLLECT_ORDER=request.param)
    start_or_explain(cluster, nodes=1)
    yield cluster
    cluster.stop(at_once=True)


async def test_a_request_waits_for_the_running_batch_of_its_user_while_other_users_go_beside_it(count_cluster):
    """Two batches beside each other run on two pool processes, in no order: a user's messages in
    both could reach the user in either order (``bench/e2e.py``'s batch row had thousands of
    deliveries out of send order).  So the third request here, of the first one's user, waits for
    the first one's batch to return, and the second, of another user, goes beside it.  With
    ``COLLECT_ORDER=none`` the third goes beside the first too, as before that rule."""
    cluster = count_cluster
    ordered = cluster.env["COLLECT_ORDER"] == "user"
    users = ("order-x", "order-y")
    clients = {user: await cluster.connect(user) for user in users}
    per_task = COLLECT_MANY_MESSAGES * 6 // 10  # two of them are more than one collect_many batch holds

    def items(user: str, start: int) -> list[dict]:
        return [{"to": user, "data": start + n} for n in range(per_task)]

    with pool_stopped(cluster):
        # a batch of tasks.collect_many (each task has its own gate) that holds the gate from here on
        send_ahead(cluster, task="tasks.collect_many", messages=[{"to": "order-z", "data": "holds the pool"}])
        before = applied_batches(cluster)
        first = cluster.send("tasks.collect_many", messages=items("order-x", 0))
        other = cluster.send("tasks.collect_many", messages=items("order-y", 0))
        third = cluster.send("tasks.collect_many", messages=items("order-x", per_task))
        # the count's flush (every 3 requests) ran beside the held batch: the first and the
        # second went to the pool, each a batch of its own; the third waits for the first
        # (without the order, it went too, in the same turn of the loop)
        cluster.worker.wait_ready(lambda: applied_batches(cluster) >= before + 2, timeout=20, what="the count's flush")
        time.sleep(1)
        assert applied_batches(cluster) == before + (2 if ordered else 3)
    answers = [await cluster.result(r, timeout=30) for r in (first, other, third)]
    assert [len(a) for a in answers] == [per_task] * 3
    frames = await clients["order-x"].messages(2 * per_task, timeout=30)
    if ordered:
        assert [f["data"] for f in frames] == list(range(2 * per_task))  # in the order sent
        assert [f["id"] for f in frames] == answers[0] + answers[2]
    else:
        assert sorted(f["data"] for f in frames) == list(range(2 * per_task))
    assert [f["data"] for f in await clients["order-y"].messages(per_task, timeout=30)] == list(range(per_task))
    for client in clients.values():
        client.close()


async def test_a_collect_and_the_collect_many_of_its_user_read_before_it_go_in_one_batch_in_read_order(lazy_timer_cluster):
    """A user's messages keep the order the worker read their requests across the two tasks, and
    a flush of one task takes the other's requests that may run into the same batch: here a
    ``tasks.collect_many`` to the user waits behind a running batch of its task (of another user),
    and the ``tasks.collect`` read after it, whose task runs nothing, takes it along in one batch,
    in the order read.  (Before, the collect waited for the collect_many to run first, in a batch
    of its own: the two tasks' batches took turns.)"""
    cluster = lazy_timer_cluster
    user = "across-x"
    client = await cluster.connect(user)
    inspect = worker_inspect(cluster)
    with pool_stopped(cluster):
        # a tasks.collect_many batch that holds its task's gate; the next one, to the user, waits behind it
        send_ahead(cluster, task="tasks.collect_many", messages=[{"to": "across-z", "data": "holds the pool"}])
        first = cluster.send("tasks.collect_many", messages=[{"to": user, "data": n} for n in range(50)])
        second = cluster.send(to=user, data=50)  # tasks.collect: its gate is open
        deadline = time.monotonic() + 20
        wanted = {first.id, second.id}
        while not wanted <= (active := {task["id"] for task in worker_answer(inspect, "active") or []}) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert wanted <= active, f"the two requests did not go to the pool: active {active}"
    first_ids = await cluster.result(first, timeout=30)
    second_id = await cluster.result(second, timeout=30)
    frames = await client.messages(51, timeout=30)
    assert [f["data"] for f in frames] == list(range(51))
    assert [f["id"] for f in frames] == [*first_ids, second_id]
    # one batch of tasks.collect (the task that flushed) holding the collect_many: 2 requests, 51 messages
    assert (2, 51) in batch_sizes(cluster, "tasks.collect", requests=2)
    assert "(of them tasks.collect_many: 1 requests, 50 messages)" in cluster._log("worker").read_text(errors="replace")
    client.close()


async def test_a_collect_waits_for_a_running_collect_many_of_its_user_and_then_goes_with_the_next_one(lazy_timer_cluster):
    """A ``tasks.collect`` read while a ``tasks.collect_many`` batch naming its user runs waits for
    that batch, though its own task runs nothing, as does the ``tasks.collect_many`` to the user
    read before it; a request of another user goes at once.  Once the batch returns, the two that
    waited go together, in the order read."""
    cluster = lazy_timer_cluster
    user, other_user = "running-x", "running-y"
    client = await cluster.connect(user)
    other = await cluster.connect(other_user)
    inspect = worker_inspect(cluster)
    with pool_stopped(cluster):
        ahead = send_ahead(cluster, task="tasks.collect_many", messages=[{"to": user, "data": "ahead"}])  # runs, and names the user
        first = cluster.send("tasks.collect_many", messages=[{"to": user, "data": n} for n in range(20)])
        second = cluster.send(to=user, data=20)
        beside = cluster.send(to=other_user, data="beside")
        deadline = time.monotonic() + 20
        while beside.id not in (active := {task["id"] for task in worker_answer(inspect, "active") or []}) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert beside.id in active, f"the request of another user did not go to the pool: active {active}"
        assert ahead.id in active and first.id not in active and second.id not in active
        reserved = {task["id"] for task in worker_answer(inspect, "reserved") or []}
        assert {first.id, second.id} <= reserved, reserved
    ahead_ids = await cluster.result(ahead, timeout=30)
    first_ids = await cluster.result(first, timeout=30)
    second_id = await cluster.result(second, timeout=30)
    frames = await client.messages(22, timeout=30)
    assert [f["data"] for f in frames] == ["ahead", *range(21)]
    assert [f["id"] for f in frames] == [*ahead_ids, *first_ids, second_id]
    assert [f["data"] for f in await other.messages(1, timeout=30)] == ["beside"]
    sizes = batch_sizes(cluster, "tasks.collect", requests=3) + batch_sizes(cluster, "tasks.collect_many", requests=1)
    assert (2, 21) in sizes, sizes  # the two that waited, in one batch of either task
    client.close()
    other.close()

"""The worker under Celery's other execution pools: ``-P threads`` (its batches of ``tasks.collect``
and ``tasks.collect_many`` run at once on two threads of one process, and share its event sender)
and ``-P solo`` (a batch runs in the worker's main process, on its event loop), both with task
events on (``-E``), as an operator watching in Flower runs them.  The other tests run the default,
prefork."""

from __future__ import annotations

import asyncio
import os
import signal
import time
import uuid

import psutil
import pytest
import redis as redis_lib
from kombu import Connection

import launcher
from tests.integration.conftest import Cluster, lone_worker, start_or_explain, unacked_task_ids
from tests.integration.taskevents import TaskEvents

USERS = ["pool-a", "pool-b", "pool-c"]


@pytest.fixture(params=["threads", "solo"])
def pool_cluster(request, tmp_path):
    redis_server = launcher.RedisServer(data_dir=tmp_path / "redis").start()
    request.addfinalizer(redis_server.stop)
    cluster = Cluster(redis_server, tmp_path, auth_port=launcher.free_port())
    cluster.pool = request.param
    start_or_explain(cluster, nodes=1, pool=request.param, concurrency=4, events=True, options=["--include=tests.integration.poison"])
    yield cluster
    cluster.stop(at_once=True)


async def test_collect_and_collect_many_deliver_and_report_each_request_under_the_threads_and_solo_pools(pool_cluster):
    cluster = pool_cluster
    clients = {user: await cluster.connect(user) for user in USERS}
    events = await asyncio.to_thread(TaskEvents(cluster).start)
    try:
        run = uuid.uuid4().hex[:8]
        singles = [(cluster.send(to=USERS[i % 3], data={"run": run, "single": i}), USERS[i % 3]) for i in range(40)]
        manys = [cluster.send("tasks.collect_many", messages=[{"to": user, "data": {"run": run, "many": i, "to": user}} for user in USERS])
                 for i in range(40)]
        invalid = cluster.send(to=[], data={"run": run})
        # Each client reads (and so acks, as a browser does) while the results are awaited: read
        # only after them, the first messages stayed unacked for longer than REDELIVER_AFTER (4 s)
        # under load, and their redelivered copies came after them (failed in a CI run).
        counts = {user: sum(to == user for _, to in singles) + len(manys) for user in USERS}
        reading = {user: asyncio.create_task(client.messages(counts[user], timeout=60)) for user, client in clients.items()}

        expected: dict[str, set[str]] = {user: set() for user in USERS}
        for result, user in singles:
            expected[user].add(await cluster.result(result, 30))
        for result in manys:
            ids = await cluster.result(result, 30)
            assert len(ids) == 3, ids
            for user, message_id in zip(USERS, ids):
                expected[user].add(message_id)
        with pytest.raises(Exception, match="empty list"):
            await cluster.result(invalid, 30)

        for user, client in clients.items():
            frames = await reading[user]
            assert {frame["id"] for frame in frames} == expected[user], user
            assert all(frame["data"]["run"] == run for frame in frames)
            # in the order sent, across the two tasks: under -P threads a batch returns on a pool
            # thread, which lets the other task's requests that waited for it go
            sent = [("single", i) for i in range(40) if USERS[i % 3] == user] + [("many", i) for i in range(40)]
            assert [("single", f["data"]["single"]) if "single" in f["data"] else ("many", f["data"]["many"]) for f in frames] == sent, user
            assert await client.quiet() == [], f"{user} got more than its messages"

        # Flower's view: every request a task of its own, received, started and succeeded (or
        # failed, with its reason), sent by whichever thread or process ran its batch.
        want = {result.id: "task-succeeded" for result, _ in singles} | {result.id: "task-succeeded" for result in manys}
        want[invalid.id] = "task-failed"
        deadline = asyncio.get_running_loop().time() + 15
        while (missing := [task_id for task_id, kind in want.items() if kind not in events.types(task_id)]) and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.2)
        assert not missing, f"{len(missing)} of {len(want)} requests have no outcome event under -P {cluster.pool}, e.g. {missing[0]}: {events.types(missing[0])}"
        for task_id in want:
            # In any order: the main process buffers its task events until its loop's next turn,
            # which under -P solo comes after the batch (Celery's event state, as Flower keeps it,
            # merges a task-received that comes after the outcome without undoing the outcome).
            assert {"task-received", "task-started"} <= set(events.types(task_id)), events.types(task_id)
        assert "empty list" in next(e["exception"] for e in events.by_task[invalid.id] if e["type"] == "task-failed")
    finally:
        events.stop()
        for client in clients.values():
            client.close()
    assert "Traceback" not in cluster._log("worker").read_text(errors="replace")


async def test_a_batch_whose_store_and_retry_both_fail_goes_back_to_the_queue_under_the_threads_and_solo_pools(pool_cluster):
    """A request whose store is down and whose retry cannot be sent ends its pool process
    (SystemExit) so that the broker gives it back; the threads and solo pools hand that to the
    batch's return callback instead, which acked the batch: the request was lost, and no result
    ever came.  (``tests.integration.poison`` makes the store and the broker fail once.)"""
    cluster = pool_cluster
    client = await cluster.connect("pool-a")
    data = {"poison": "store-and-broker-down", "n": 1}
    message_id = await cluster.collect("pool-a", data, timeout=60)
    (frame,) = await client.messages(1, timeout=30)
    assert frame["id"] == message_id and frame["data"] == data
    assert "retry not sent" in cluster._log("worker").read_text(errors="replace")
    client.close()


async def test_a_refused_message_gets_its_failure_and_is_acknowledged_under_the_threads_and_solo_pools(pool_cluster):
    """The failure of a message the main process refuses is written on the failure writer's thread,
    and what follows (the acknowledgement, the events) is handed back to the consumer's loop.
    These pools run Celery's loop without kombu's Hub (``synloop``): the hand-back goes through
    the consumer's pending operations, which that loop runs between its reads."""
    cluster = pool_cluster
    events = await asyncio.to_thread(TaskEvents(cluster).start)
    broker = redis_lib.Redis.from_url(cluster.env["BROKER_URL"], socket_timeout=5)
    try:
        task_id = str(uuid.uuid4())
        with Connection(cluster.env["BROKER_URL"]) as conn:
            conn.Producer().publish(b'"not [args, kwargs, embed]"', exchange="", routing_key="collect",
                                    headers={"task": "tasks.collect", "id": task_id, "lang": "py"},
                                    content_type="application/json", content_encoding="utf-8")
        with pytest.raises(Exception, match="not a Celery task message"):
            await cluster.result(cluster.business.AsyncResult(task_id), 30)
        deadline = asyncio.get_running_loop().time() + 15
        while (task_id in unacked_task_ids(broker) or "task-failed" not in events.types(task_id)) and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.2)
        assert task_id not in unacked_task_ids(broker), f"the refused message is still unacknowledged under -P {cluster.pool}"
        assert events.types(task_id) == ["task-received", "task-failed"], events.types(task_id)
        # and the worker reads on
        client = await cluster.connect("pool-a")
        assert await cluster.collect("pool-a", "after the refused one", timeout=30)
        assert [frame["data"] for frame in await client.messages(1, timeout=30)] == ["after the refused one"]
        client.close()
    finally:
        events.stop()


def test_a_pool_process_started_while_mongodb_is_unreachable_comes_up_and_runs_what_needs_no_store(tmp_path):
    """A pool process opens the store before it reports up, and Celery killed one not up within 4 s:
    with MongoDB unreachable (each round trip of the open waits 5 s), the process that replaced
    one that died was killed, and replaced, every 5 s, and the worker ran nothing meanwhile."""
    with lone_worker(tmp_path, "dispatch", MONGO_URL=f"mongodb://127.0.0.1:{launcher.free_port()}/") as lone:
        (first,) = psutil.Process(lone.worker.pid).children()
        os.kill(first.pid, signal.SIGKILL)

        # tasks.presence reads Redis only; it runs once the new process is up, after its store's open gave up.
        assert lone.business.send_task("tasks.presence", args=[["nobody"]], queue="dispatch").get(timeout=40) == {"nobody": []}
        time.sleep(1)
        log = (tmp_path / "worker.log").read_text(errors="replace")
        assert "Timed out waiting for UP message" not in log, log[-3000:]
        assert "message store not available at start" in log, log[-3000:]

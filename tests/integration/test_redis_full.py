"""A Redis over ``maxmemory`` (``noeviction``): every write that may use memory is refused with
``OOM command not allowed when used memory > 'maxmemory'`` while reads still work.

The tests share one private cluster on the Redis broker, whose Redis (broker and ``REDIS_URL``
alike) they fill and then free again: the session's cluster would see its leases lapse.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time

import pytest
import redis as redis_lib

import launcher
from redisfull import HINT
from tests.conftest import skip_before_redis_7
from tests.integration.conftest import ADMIN_KEY, HOUSEKEEPING_SECONDS, LEASE_TTL, Cluster, http_json, start_or_explain
from tests.conftest import redis_now
from wsnode.registry import NODES_KEY


@pytest.fixture(scope="module")
def full_cluster(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("redis-full")
    redis_server = launcher.RedisServer(data_dir=workdir / "redis").start()
    cluster = Cluster(redis_server, workdir, broker_url=redis_server.url(0), auth_port=launcher.free_port())
    start_or_explain(cluster, nodes=1)
    yield cluster
    cluster.stop(at_once=True)
    redis_server.stop()


@contextlib.contextmanager
def redis_full(cluster: Cluster):
    """The cluster's Redis over ``maxmemory`` until the block ends (:func:`over_maxmemory`)."""
    with over_maxmemory(redis_lib.Redis.from_url(cluster.env["REDIS_URL"])):
        yield


@contextlib.contextmanager
def over_maxmemory(admin: redis_lib.Redis):
    """``admin``'s Redis over ``maxmemory`` (by a 2 MB key over a limit 1 MB above what it used) until the block ends."""
    used = int(admin.info("memory")["used_memory"])
    admin.set("test:filler", b"x" * 2_000_000)
    admin.config_set("maxmemory", used + 1_000_000)
    try:
        with pytest.raises(redis_lib.exceptions.OutOfMemoryError):
            admin.set("test:probe", 1)
        yield
    finally:
        admin.config_set("maxmemory", 0)
        admin.delete("test:filler")


def post(cluster: Cluster, path: str, body: dict) -> tuple[int, dict]:
    return http_json(f"http://127.0.0.1:{cluster.auth_port}{path}", body,
                     headers={"Authorization": f"Bearer {ADMIN_KEY}", "Content-Type": "application/json"})


async def test_a_collect_queued_before_redis_filled_up_is_stored_and_delivered_once_it_has_room(full_cluster):
    cluster = full_cluster
    broker = redis_lib.Redis.from_url(cluster.env["BROKER_URL"])
    # test_redis_transport.py shows such a task lost on Redis 6.2.
    skip_before_redis_7(broker, "the worker's read cannot pass maxmemory (script flag allow-oom), so a collect it takes while Redis is full is lost")
    os.kill(cluster.worker.pid, signal.SIGSTOP)  # the task waits for the worker, as in a backlog
    try:
        queued = cluster.send(to="dora", data="queued before Redis filled up")
        # A task that runs and is acknowledged while Redis is full (its result is not stored).
        cluster.business.send_task("tasks.presence", args=[["dora"]], queue="dispatch", ignore_result=True)
    finally:
        with redis_full(cluster):
            os.kill(cluster.worker.pid, signal.SIGCONT)
            # The worker takes them while Redis is full: it must record them as unacknowledged
            # (else they are lost), and the collect must store its message and wait to write its result.
            deadline = time.monotonic() + 10
            while broker.llen("collect") and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
            await asyncio.sleep(1.5)
            assert broker.hlen("unacked") >= 1, "the collect the worker took while Redis was full is neither recorded as unacknowledged nor waiting to store its result"
    message_id = await cluster.result(queued, timeout=30)
    client = await cluster.connect("dora")
    try:
        assert [(m["id"], m["data"]) for m in client.inbox] == [(message_id, "queued before Redis filled up")]
    finally:
        client.close()
    assert "Connection to broker lost" not in (cluster.logs / "worker.log").read_text(), "the worker reconnected to its broker while Redis was full"


def node_health(port: int) -> tuple[int, dict]:
    return http_json(f"http://127.0.0.1:{port}/healthz", timeout=5)


async def test_a_full_redis_is_named_by_auth_revoke_and_node_healthz(full_cluster):
    cluster = full_cluster
    token = await asyncio.to_thread(cluster.token, "erin")
    client = await cluster.connect("erin")  # its lease renewals fail while Redis is full
    try:
        with redis_full(cluster):
            status, body = await asyncio.to_thread(post, cluster, "/revoke", {"token": token})
            assert status == 503 and "Redis is full" in body["error"] and "maxmemory" in body["error"], body
            assert (await asyncio.to_thread(post, cluster, "/verify", {"token": token}))[0] == 200  # reads still work
            deadline = time.monotonic() + 5
            while (health := await asyncio.to_thread(node_health, cluster.node_ports[0]))[0] == 200:
                assert time.monotonic() < deadline, "the node stayed ready while Redis refused its lease renewals"
                await asyncio.sleep(0.2)
            assert health[0] == 503 and health[1]["reason"].startswith("Redis is out of memory (maxmemory)"), health
        assert await asyncio.to_thread(post, cluster, "/revoke", {"token": token}) == (200, {"revoked": "token"})
    finally:
        client.close()


@contextlib.asynccontextmanager
async def paused_node(cluster: Cluster):
    """A node of its own, paused (SIGSTOP: it writes no lease) once housekeeping may judge nodes
    (Redis up ``2 x LEASE_TTL``); yields its address and a Redis client, and resumes and stops it."""
    node = cluster.start_node()
    admin = redis_lib.Redis.from_url(cluster.env["REDIS_URL"])
    while admin.info("server")["uptime_in_seconds"] < 2 * LEASE_TTL:  # else housekeeping waits for a restarted Redis
        await asyncio.sleep(0.5)
    os.kill(node.pid, signal.SIGSTOP)
    try:
        yield f"127.0.0.1:{node.port}", admin
    finally:
        os.kill(node.pid, signal.SIGCONT)
    await asyncio.to_thread(node.terminate, 15)


def ended_lease(admin, address: str) -> None:
    """The node's own lease as after an outage of ``2 x LEASE_TTL``: ended ``2 x LEASE_TTL`` ago
    (by Redis's clock, as every lease)."""
    admin.zadd(NODES_KEY, {address: redis_now(admin) - 3 * LEASE_TTL})


async def assert_not_taken_for_gone(cluster: Cluster, admin, address: str, why: str) -> None:
    """Three housekeeping runs later, the node is still listed and its queue was not reclaimed,
    and the worker logged ``why``."""
    await asyncio.sleep(3 * HOUSEKEEPING_SECONDS + 0.5)
    worker_log = (cluster.logs / "worker.log").read_text()
    assert f"node {address} is gone" not in worker_log, f"housekeeping took a node for gone; expected: {why}"
    assert admin.zscore(NODES_KEY, address) is not None
    assert why in worker_log


async def test_housekeeping_takes_no_node_for_gone_right_after_redis_refused_writes(full_cluster):
    """After a fullness longer than ``LEASE_TTL`` every node's lease looks ended until the node
    writes it again, within ``LEASE_TTL / 3`` of Redis having room; housekeeping's first run then
    took a live node for gone and handed back and deleted its queue.  Ordered here: Redis refuses a
    write, then the node, paused, is given the lease it would have after such a fullness, and
    housekeeping runs (every second) while the node cannot write it again."""
    async with paused_node(full_cluster) as (address, admin):
        with redis_full(full_cluster):
            pass  # one write refused
        await asyncio.sleep(0.3)  # a run that read Redis's refusals before them has read the node list too
        ended_lease(admin, address)
        await assert_not_taken_for_gone(full_cluster, admin, address, "Redis refused writes for lack of memory (maxmemory) since the last run")


async def test_housekeeping_takes_no_node_for_gone_right_after_its_runs_resumed_from_a_gap(full_cluster):
    """Housekeeping holds its lock in Redis, so it does not run while Redis does not answer (an
    outage without a restart, a failover to a replica that was up all along), when the nodes
    cannot renew their leases either: its first run after took every node cut off that long for
    gone.  Here the worker is paused (as if its runs were refused) longer than ``LEASE_TTL`` while
    the node, paused too, has the lease it would have after such an outage."""
    cluster = full_cluster
    async with paused_node(cluster) as (address, admin):
        os.kill(cluster.worker.pid, signal.SIGSTOP)
        try:
            ended_lease(admin, address)
            await asyncio.sleep(LEASE_TTL + 0.5)
        finally:
            os.kill(cluster.worker.pid, signal.SIGCONT)
        await assert_not_taken_for_gone(cluster, admin, address, "housekeeping did not run for")


async def test_a_worker_started_while_redis_is_full_says_so_waits_calmly_for_room_and_then_consumes(full_cluster):
    """A worker (re)started while Redis is full: its connection's first write (the lock of kombu's
    look for unacknowledged tasks to restore, as the transport joins the event loop) is refused, a
    channel error before Celery holds a connection.  Celery connected again at once, several times
    a second, each time logging "Cannot connect to ...", with its RestartFreqExceeded traceback
    every second.  It connects again at once, then after 1 s, 2 s ... (tasks.channelerrors), each
    time with one line naming the full Redis, and consumes once Redis has room; it does not stop,
    as for a channel error before its first consume (the README's "every process goes on by itself")."""
    cluster = full_cluster
    argv = [sys.executable, "-m", "celery", "-A", "worker", "worker", "-n", "started-full@%h", "--loglevel=INFO", "--without-gossip",
            "--without-mingle", "-c", "1", "-Q", "dispatch"]
    worker = launcher.Service("started-full", argv, cluster.env, log_path=cluster.logs / "started-full.log")
    cluster.services.append(worker)
    with redis_full(cluster):
        worker.start()
        await asyncio.to_thread(worker.wait_log, "maxmemory", 30)
        # Tries at 0, 0, 1 s, then 3 s: 2.5 s of a full Redis are three of them (Celery's: about fifteen).
        assert await asyncio.to_thread(worker.wait, 2.5) is None, "the worker stopped while Redis was full:\n" + worker.log_tail(15)
        while_full = worker.log_tail(200)
    refusals = [line for line in while_full.splitlines() if "maxmemory" in line]
    assert all(HINT in line for line in refusals), "the worker did not say what to do about the full Redis:\n" + while_full
    assert len(refusals) <= 4, f"the worker connected again {len(refusals)} times in 2.5 s of a full Redis:\n" + while_full
    assert "RestartFreqExceeded" not in while_full and "Cannot connect to" not in while_full, while_full
    await asyncio.to_thread(worker.wait_log, "ready.", 30)
    assert "not retried" not in worker.log_tail(200)
    await asyncio.to_thread(worker.terminate, 15)

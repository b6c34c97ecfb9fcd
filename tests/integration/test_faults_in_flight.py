"""Faults that land while something is in flight: token checks, a resume's replay, a drain, a
batch, a queue read.

The single-fault tests (``test_faults.py``, ``test_node_faults.py``) break one thing while messages
stream; these break it at a moment when something is half done, or break two things at once, and
check what each client then gets, by id and in order, and the close codes on the way.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import shutil
import signal

import psutil
import pytest

import launcher
from tests.integration.conftest import HOUSEKEEPING_SECONDS, LEASE_TTL, REDELIVER_AFTER
from tests.integration.browser import Browser, check_exactly_once, confirm, stream, wait_complete
from tests.integration.test_faults import run_with_fault, supervise
from tests.integration.tcpproxy import FreezableProxy
from tests.integration.test_guarantees import unique, wait_for
from tests.integration.test_metrics import health
from tests.integration.wsclient import Client, dedup
from wsnode.closecodes import CloseCode
from wsnode.registry import NODES_KEY

CHECKS = 60  # handshakes held in their token check at once


async def _outcome(client: Client) -> tuple:
    """``("hello", user)``, or ``(code, reason)`` when the node closed instead."""
    try:
        frame = await client.next_frame(20)
    except ConnectionError:
        return client.ws.close_code, client.ws.close_reason
    return frame["type"], frame["user"]


async def test_auth_killed_while_many_token_checks_wait_closes_each_with_1013_and_all_connect_once_it_is_back(cluster, tmp_path):
    """Auth stopped (SIGSTOP) while a node holds ``CHECKS`` handshakes in their token check (one
    request in flight, the others coalesced behind it), then killed: every handshake is closed
    with 1013 and the documented reason, none hangs or gets 1011, and once auth is started again on
    its port each connects and gets its message once; the node stays ready throughout."""
    auth_port = launcher.free_port()
    auth = launcher.start_auth(cluster.env, auth_port, name="auth-killed", log_path=tmp_path / "auth.log")
    node_port = launcher.free_port()
    node_log = tmp_path / "node.log"
    node = launcher.start_node({**cluster.env, "AUTH_URL": f"http://127.0.0.1:{auth_port}", "AUTH_CACHE_SECONDS": "0"}, node_port, log_path=node_log)
    clients: list[Client] = []
    try:
        users = [unique(f"auth-killed-{n}") for n in range(CHECKS)]
        tokens = [await asyncio.to_thread(cluster.token, user) for user in users]
        warm = await Client.connect(cluster.ws_url(node_port, tokens[0]))  # the node holds a kept connection to auth
        warm.close()
        os.kill(auth.pid, signal.SIGSTOP)
        pending = [asyncio.ensure_future(Client.connect(cluster.ws_url(node_port, token), expect_hello=False, timeout=30)) for token in tokens]
        # Every handshake reached the node's token check (the node counts nothing until it ends).
        await asyncio.sleep(1.5)
        assert not any(future.done() for future in pending), "a handshake ended while auth was stopped, before it was killed"
        await asyncio.to_thread(auth.kill)
        clients = list(await asyncio.gather(*pending))
        outcomes = [await _outcome(client) for client in clients]
        assert outcomes == [(CloseCode.TRY_AGAIN_LATER, CloseCode.TRY_AGAIN_LATER.reason)] * CHECKS, sorted(set(map(str, outcomes)))
        for client in clients:
            client.close()

        auth = launcher.start_auth(cluster.env, auth_port, name="auth-killed", log_path=tmp_path / "auth.log")
        clients = list(await asyncio.gather(*(Client.connect(cluster.ws_url(node_port, token), wait_resumed=True, timeout=30) for token in tokens)))
        assert [client.hello["user"] for client in clients] == users
        ids = await cluster.collect_many([{"to": user, "data": {"n": n}} for n, user in enumerate(users)])
        for n, client in enumerate(clients):
            got = await client.messages(1, timeout=20)
            assert [(f["id"], f["data"]) for f in got] == [(ids[n], {"n": n})]
        extra = await asyncio.gather(*(client.quiet(0.5) for client in clients))
        assert [f for frames in extra for f in frames if f["type"] == "message"] == []
        text = node_log.read_text(errors="replace")
        assert "refused, auth unavailable" in text
        assert "Traceback" not in text and "Uncaught exception" not in text, text[-3000:]
        assert node.alive
    finally:
        for client in clients:
            client.close()
        node.terminate()
        auth.terminate()


async def test_a_node_killed_holding_undelivered_messages_and_a_resumes_replay_gets_the_user_everything_once_in_order_elsewhere(cluster):
    """A node stopped (SIGSTOP, so that it reads nothing more) right after a second device of the
    user opened there with ``since`` (its replay requested or on its way back through the node's
    queue), while Dispatch still routes the user's next messages there (its lease holds for
    ``LEASE_TTL``), then killed.  The user resuming on the other node with the ``since`` of the last
    message it saw gets each message once, in id order, then ``resumed``; what housekeeping later
    hands back from the dead node's queue (and redelivery) brings only repeats of those ids, which
    the client drops; nothing else comes."""
    user = unique("killed-mid-resume")
    victim = cluster.start_node()
    first_device = await cluster.connect(user, victim.port)
    first = await cluster.collect(user, {"n": 0})
    assert [f["id"] for f in await first_device.messages(1)] == [first]
    second_device = await Client.connect(cluster.ws_url(victim.port, await asyncio.to_thread(cluster.token, user), since=first))
    os.kill(victim.pid, signal.SIGSTOP)
    try:
        # One batch (its ids in order), routed at once, while the stopped node's lease still holds
        # (a lease write less than LEASE_TTL ago): the four go to its queue, which no one reads.
        during = await cluster.collect_many([{"to": user, "data": {"n": n}} for n in range(1, 5)])
        assert (await asyncio.to_thread(cluster.routes.zscore, NODES_KEY, f"127.0.0.1:{victim.port}")) is not None
    finally:
        await asyncio.to_thread(victim.kill)
    first_device.close()
    second_device.close()

    back = await cluster.connect(user, cluster.node_ports[0], since=first)
    replayed, resumed = await back.until("resumed")
    assert [f["id"] for f in dedup(replayed) if f["id"] != first] == during
    assert (resumed["since"], resumed["truncated"]) == (first, False), resumed  # (until() returns only a "resumed" frame)
    # Housekeeping takes the node for gone LEASE_TTL after its lease ended and hands its queue back.
    await wait_for(lambda: cluster.routes.zscore(NODES_KEY, f"127.0.0.1:{victim.port}") is None, 3 * LEASE_TTL + 20,
                   "housekeeping forgot the killed node")
    after = await back.quiet(2.0)
    later = [f["id"] for f in after if f["type"] == "message"]
    assert set(later) <= set(during) | {first}, f"after the resume, messages other than repeats came: {later}"
    seen = [f["id"] for f in dedup(replayed + after) if f["id"] != first]
    assert seen == during == sorted(during)
    back.close()


async def test_a_node_drained_while_redis_restarts_loses_nothing(fault_cluster):
    """SIGTERM of a node mid-stream while Redis (leases, results and, on the Redis broker, the
    queues) is down for a second: the drain cannot release its leases nor (on Redis) hand its
    queue back at once; it still exits 0, its clients resume on the other node, and every user gets
    every message once (housekeeping hands the queue back once its lease ended)."""
    victim = fault_cluster.services[-1]

    async def fault():
        await asyncio.to_thread(fault_cluster.redis_server.stop)
        stopping = asyncio.ensure_future(asyncio.to_thread(victim.terminate, 60))
        await asyncio.sleep(1.0)
        await asyncio.to_thread(fault_cluster.redis_server.start)
        assert await stopping == 0, f"the node did not exit cleanly within 60 s of SIGTERM:\n{victim.log_tail(40)}"

    await run_with_fault(fault_cluster, fault)
    drained = fault_cluster._log(f"node-{victim.port}").read_text(errors="replace")
    assert "could not release leases" in drained, "the drain ran after Redis was back: the test did not make its case"


async def answers_sending_again_the_lost(cluster, sent: list, kwargs: list[dict], wait: float) -> tuple[list, list[str]]:
    """What business code that needs every answer does (README, **Delivery**): wait up to ``wait``
    seconds for all of ``sent`` (``tasks.collect_many`` results, sent with ``kwargs``), then send
    each that has no answer yet again under its task id, which gives the same ids and stores
    nothing twice, and wait for those.  Returns every request's ids, and the task ids sent again."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait
    while not all(await asyncio.to_thread(lambda: [result.ready() for result in sent])) and loop.time() < deadline:
        await asyncio.sleep(0.5)
    again = []
    for n, result in enumerate(sent):
        if not await asyncio.to_thread(result.ready):
            again.append(result.id)
            sent[n] = cluster.business.send_task("tasks.collect_many", kwargs=kwargs[n], queue="collect", task_id=result.id)
    return [await cluster.result(result, 60) for result in sent], again


@pytest.mark.timeout(240)  # the wait for the rerun (78 s), and for a batch the Redis broker lost, sent again
async def test_a_worker_killed_whole_mid_batch_answers_each_waiting_caller_on_the_rerun_and_delivers_each_message_once(fault_cluster):
    """The worker's main process and its pool (the whole group, as a host crash would) SIGKILLed
    once the first of eight ``tasks.collect_many`` batches of 1,000 messages reached users online,
    with some of them not done yet (taken by the worker, running or waiting in its prefetch); a new
    worker starts.  Business code that waits on ``.get()`` (long enough for the broker to give the
    killed worker's tasks back: at once on RabbitMQ, after ``VISIBILITY_TIMEOUT`` plus the restore
    scan on Redis) gets every request's ids, and each user gets each of its messages under exactly
    one id: what the first run stored and routed before the kill comes again under the same ids
    (the task id is the key), never under new ones.

    On the Redis broker the batch the killed worker had just taken with ``BRPOP``, and not yet
    recorded as unacknowledged, is lost with it (the README's window: in a run under two CPU-bound
    processes, the broker's log showed the eighth batch popped and never recorded): business code
    that needs every answer sends a batch without one again under its task id, as the README
    says, and gets the same ids.  On RabbitMQ no batch is sent again."""
    cluster = fault_cluster
    users = [f"{cluster.broker}-killed-worker-{n}" for n in range(20)]
    browsers = [Browser(cluster, user, cluster.node_ports, first=n) for n, user in enumerate(users)]
    for browser in browsers:
        browser.start()
    await asyncio.gather(*(b.connected() for b in browsers))
    batches, per_batch = 8, 1000
    per_user = batches * per_batch // len(users)
    kwargs = [{"messages": [{"to": users[i % len(users)], "data": {"u": users[i % len(users)], "n": b * (per_batch // len(users)) + i // len(users)}}
                            for i in range(per_batch)]} for b in range(batches)]
    sent = [cluster.send("tasks.collect_many", **batch) for batch in kwargs]
    # Mid-stream: some messages reached a browser, not every request has its ids yet.
    await wait_for(lambda: any(b.messages for b in browsers), 30, "a first message reached a browser")
    ready = sum(result.ready() for result in sent)
    await asyncio.to_thread(cluster.worker.kill)
    assert ready < batches, "every batch was done before the kill: the test did not make its case"
    cluster.worker = await asyncio.to_thread(cluster.start_worker, "worker2")
    results, again = await answers_sending_again_the_lost(cluster, sent, kwargs, 8 + 10 + 60)  # VISIBILITY_TIMEOUT, UNACKED_RESTORE_SECONDS, the rerun
    assert cluster.broker == "redis" or again == [], f"RabbitMQ gave back every task of the killed worker, yet {again} had no answer"
    assert len(again) <= 1, f"more than the one task a BRPOP can take had no answer: {again}"
    assert all(len(ids) == per_batch and len(set(ids)) == per_batch for ids in results)
    await wait_complete(browsers, per_user, 60)
    await asyncio.gather(*(b.stop() for b in browsers))
    check_exactly_once(browsers, per_user)
    delivered = {frame["id"] for b in browsers for frame in b.messages}
    assert delivered == {message_id for ids in results for message_id in ids}, "a browser got an id that no caller was given"


@pytest.mark.parametrize("fault_cluster", ["amqp"], indirect=True)  # a Redis broker restarted without its data loses its queues: the README says so
async def test_a_redis_restarted_without_its_data_mid_stream_loses_no_message(fault_cluster):
    """``REDIS_URL``'s Redis (leases, redelivery candidates, results) restarted without its data
    mid-stream, the broker (RabbitMQ) untouched: every node finds its leases gone at its next
    renewal and closes its connections with 1013 (``routes lost``), which resume with ``since``;
    results not read yet are lost, and business code sends those collects again with their keys,
    which gives the same ids.  Every user gets every message once."""
    cluster = fault_cluster
    data_dir = cluster.redis_server.data_dir

    async def fault():
        await asyncio.to_thread(cluster.redis_server.stop)
        for leftover in (data_dir / "appendonlydir", data_dir / "dump.rdb"):
            if leftover.is_dir():
                shutil.rmtree(leftover)
            elif leftover.exists():
                leftover.unlink()
        await asyncio.to_thread(cluster.redis_server.start)

    await run_with_fault(cluster, fault)
    logs = "".join(cluster._log(f"node-{port}").read_text(errors="replace") for port in cluster.node_ports)
    assert "lease write found the node's own lease" in logs, "no node found its leases gone: Redis kept its data, the test did not make its case"


async def a_message_lost_on_its_way_reaches_the_cut_off_device(cluster, name: str, end_the_cut, fallback: bool = True,
                                                              **node_settings) -> str:
    """The case of the broker-path tests below: one user with a device on another node ("here",
    which acks) and one ("there") on a node started with ``node_settings`` whose connection to the
    broker alone goes through a :class:`FreezableProxy` (its Redis, so its leases, keep working;
    ``fallback``: that device may move to the other node).  A first message reaches both; the
    proxy is frozen and a second message is routed, which "here" acks, so redelivery never sends
    it again; ``end_the_cut(proxy, cut node, its log path)`` ends the cut the test's way; once a
    redelivery had its time, a third message.  Checks that "there" holds the three once, in
    order, and was closed with 1013 on the way (resuming with ``since``); returns the cut node's
    log."""
    proxy, url = FreezableProxy.to_url(cluster.env["BROKER_URL"])
    try:
        cut = cluster.start_node(BROKER_URL=url, **node_settings)
        log = cluster._log(f"node-{cut.port}")
        user = unique(name)
        here = await cluster.connect(user, cluster.node_ports[0])
        there = Browser(cluster, user, [cut.port, cluster.node_ports[0]] if fallback else [cut.port])
        there.start()
        await there.connected()
        first = await cluster.collect(user, {"n": 0})
        assert [f["id"] for f in await here.messages(1)] == [first]
        await wait_for(lambda: [m["id"] for m in there.messages] == [first], 10, "the first message on the cut-off node")
        proxy.freeze()
        lost = await cluster.collect(user, {"n": 1})
        assert [f["id"] for f in await here.messages(1)] == [lost]  # acked here
        await end_the_cut(proxy, cut, log)
        await asyncio.sleep(REDELIVER_AFTER * 2 + HOUSEKEEPING_SECONDS * 2)  # a redelivery, if any, had its time
        after = await cluster.collect(user, {"n": 2})
        assert [f["id"] for f in await here.messages(1)] == [after]
        await wait_for(lambda: after in [m["id"] for m in there.messages], 30, "the next message on the cut-off device")
        await there.stop()
        assert [f["id"] for f in dedup(there.messages)] == [first, lost, after], f"closes: {there.closes}"
        assert CloseCode.TRY_AGAIN_LATER in there.closes, there.closes
        here.close()
        return log.read_text(errors="replace")
    finally:
        proxy.close()


async def test_a_message_a_node_lost_with_its_broker_connection_reaches_its_device_though_another_device_acked_it(cluster):
    """One user, two devices: one on a node whose connection to the broker alone is cut (a proxy
    frozen; its Redis, so its leases, keep working), one on another node.  A message routed to both
    right after the cut reaches the node's socket (RabbitMQ pushes it to the ``no_ack`` consumer;
    the Redis broker's ``BRPOP`` pops it) but never the node, which gives up on the connection
    and consumes again once the cut ends.  The other device acks the message, so redelivery does
    not send it again.  The cut-off device used to stay open without it for good: it got the next
    message, and would have resumed after that one.  The node now closes its connections with 1013
    once it lost a connection that consumed, before it writes anything the next one reads, and
    the device resumes with ``since`` and is replayed the message."""
    async def end_the_cut(proxy, cut, log):
        await wait_for(lambda: health(cut.port)[1]["queue"] is False, 60, "the node gave up on its broker connection")
        proxy.thaw()
        await wait_for(lambda: health(cut.port)[0] == 200, 60, "the node consumes again")

    log = await a_message_lost_on_its_way_reaches_the_cut_off_device(
        cluster, "broker-cut", end_the_cut, BROKER_TIMEOUT=2, BROKER_HEALTH_CHECK_SECONDS=2)
    assert "gave up on its queue connection to the broker, which stopped answering" in log and "closing 1 connections with 1013" in log


async def test_a_redis_restart_while_many_inbox_replays_are_in_flight_loses_nothing(fault_cluster):
    """Redis (leases, results and, on the Redis broker, the queues the replay requests and pages go
    through) stopped (SIGSTOP, at once) as soon as the first of 40 users with three messages each in
    their inbox got its hello, then restarted with its data: the lease writes, replay requests and
    replay pages in flight wait or fail (on the Redis broker 38 of the 40 connections were closed
    with 1013 and opened again in a run here; on RabbitMQ they waited for their lease writes);
    every user gets each of its messages once."""
    cluster = fault_cluster
    asyncio.get_running_loop().set_default_executor(concurrent.futures.ThreadPoolExecutor(32))
    users = [f"{cluster.broker}-inbox-{n}" for n in range(40)]
    await confirm(cluster, await stream(cluster, users, 3, 250.0))
    browsers = [Browser(cluster, user, cluster.node_ports, first=n) for n, user in enumerate(users)]
    for browser in browsers:
        browser.start()
    # The first connections have their hello (lease written, replay requested), most not yet.
    for _ in range(6000):
        if any(b.connections for b in browsers):
            break
        await asyncio.sleep(0.005)
    redis_process = psutil.Process(cluster.redis_server.service.pid)
    redis_process.suspend()  # at once: a stop takes longer than a replay
    opening = sum(not b.messages for b in browsers)
    redis_process.resume()
    await asyncio.to_thread(cluster.redis_server.stop)
    await asyncio.sleep(1.0)
    await asyncio.to_thread(cluster.redis_server.start)
    supervisor = asyncio.create_task(supervise(cluster))
    await wait_complete(browsers, 3, 90)
    supervisor.cancel()
    await asyncio.gather(*(b.stop() for b in browsers))
    check_exactly_once(browsers, 3)
    assert opening, "every inbox was replayed before Redis stopped: the test did not make its case"


@pytest.mark.parametrize("cluster", ["redis"], indirect=True)  # kombu's Redis transport's own check
async def test_a_message_lost_when_kombu_drops_a_stale_brpop_connection_and_reads_on_reaches_its_device(cluster):
    """As the test above, but the cut ends right after kombu's Redis transport dropped the
    connection whose ``BRPOP`` got no reply (``Redis BRPOP got no reply ...; dropping stale
    connection``): kombu reads on, on a new connection, and no error reaches the node's consumer.
    The popped message on its way was lost without a word, and the cut-off device, whose user
    acked it on another device, never got it.  The channel now counts such a dropped read
    (``tasks.redis_transport.Channel.abandoned_reads``), and the node closes its connections with
    1013 for it, as for a connection it gave up on."""
    async def end_the_cut(proxy, cut, log):
        await wait_for(lambda: "dropping stale connection" in log.read_text(errors="replace"), 60, "kombu dropped the stale BRPOP connection")
        proxy.thaw()

    # BROKER_TIMEOUT stays above kombu's check (brpop_timeout + BROKER_HEALTH_CHECK_SECONDS), so the
    # read's own socket timeout does not come first.
    log = await a_message_lost_on_its_way_reaches_the_cut_off_device(
        cluster, "stale-brpop", end_the_cut, BROKER_TIMEOUT=10, BROKER_HEALTH_CHECK_SECONDS=2)
    assert "the Redis broker's BRPOP got no reply" in log


async def test_a_broker_cut_on_a_node_with_many_connections_while_messages_flow_gets_every_device_everything_once_in_order(cluster):
    """30 users, each with a device on a node whose broker connection alone is cut (a frozen
    proxy) while messages stream, and one on another node that acks them all: once the node gave
    up on its queue connection and consumes again, every device on it holds each of its messages
    once, in order (repeats dropped by id), after resuming with ``since``."""
    proxy, url = FreezableProxy.to_url(cluster.env["BROKER_URL"])
    try:
        cut = cluster.start_node(BROKER_URL=url, BROKER_TIMEOUT=2, BROKER_HEALTH_CHECK_SECONDS=2)
        users = [unique("cut-many") for _ in range(30)]
        acking = [Browser(cluster, user, [cluster.node_ports[0]]) for user in users]
        devices = [Browser(cluster, user, [cut.port]) for user in users]
        for browser in acking + devices:
            browser.start()
        for browser in acking + devices:
            await browser.connected()
        per_user = 8
        streaming = asyncio.ensure_future(stream(cluster, users, per_user, 40.0))
        await asyncio.sleep(1.0)
        proxy.freeze()
        await wait_for(lambda: health(cut.port)[1]["queue"] is False, 60, "the node gave up on its broker connection")
        proxy.thaw()
        await confirm(cluster, await streaming)
        await wait_complete(acking + devices, per_user, 90)
        await asyncio.gather(*(b.stop() for b in acking + devices))
        check_exactly_once(acking + devices, per_user)
        for device in devices:
            order = [m["data"]["n"] for m in dedup(device.messages)]
            assert order == sorted(order), (device.user, order, device.closes)
        assert any(CloseCode.TRY_AGAIN_LATER in d.closes for d in devices), "no device was closed with 1013: the cut lost nothing"
    finally:
        proxy.close()


async def test_a_message_lost_when_the_broker_path_resets_mid_delivery_reaches_its_device_though_another_device_acked_it(cluster):
    """As the cut above, but the path to the broker resets (RST, a middlebox that restarts) while
    the broker's reply with the message is held in it, well before ``BROKER_TIMEOUT``: the node
    reads ``connection reset by peer`` rather than a timeout, and consumes again at once.  The
    message was gone with the reset, and the device, whose user acked it on another device, stayed
    open without it (closes: [None] on both brokers): it would resume after the next one."""
    async def reset_the_path(proxy, cut, log):
        await asyncio.sleep(0.5)  # the broker handed it over: it waits in the frozen path
        proxy.reset()

    await a_message_lost_on_its_way_reaches_the_cut_off_device(
        cluster, "broker-reset", reset_the_path, fallback=False, BROKER_TIMEOUT=10, BROKER_HEALTH_CHECK_SECONDS=5)

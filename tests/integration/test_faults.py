"""Fault tests: 100 users over two nodes receive a stream of messages while one thing breaks.

Each test streams ``PER_USER`` messages to each of ``USERS`` users (one ``tasks.collect`` each,
with an idempotency key; like business code that needs the guarantee, it waits for each id and
sends again, with the same key, what returned none), injects one fault mid-stream, lets the clients reconnect the way the browser client does (backoff,
then ``since``, or the inbox before the first message), and checks that every user received every
one of its messages exactly once after dropping repeats by id, and nothing addressed to anyone
else.  Each runs on a private cluster, once with Redis and once with RabbitMQ as the broker.
"""

from __future__ import annotations

import asyncio
import concurrent.futures

from tests.integration.browser import Browser, check_exactly_once, confirm, stream, wait_complete

USERS = 100
PER_USER = 8
RATE = 250.0  # messages/s: the stream lasts about 3 s
SETTLE = 60.0  # the longest a test waits for the stragglers


async def run_with_fault(cluster, fault, online: bool = True) -> dict:
    # Room for 100 browsers' token requests, the stream and the fault at once (the default is 6).
    asyncio.get_running_loop().set_default_executor(concurrent.futures.ThreadPoolExecutor(32))
    users = [f"{cluster.broker}-u{i}" for i in range(USERS)]
    browsers = [Browser(cluster, user, cluster.node_ports, first=i) for i, user in enumerate(users)]
    if online:
        for browser in browsers:
            browser.start()
        await asyncio.gather(*(b.connected() for b in browsers))
    sending = asyncio.create_task(stream(cluster, users, PER_USER, RATE))
    await asyncio.sleep(USERS * PER_USER / RATE / 3)  # a third of the way through
    await fault()
    supervisor = asyncio.create_task(supervise(cluster))
    await confirm(cluster, await sending)
    if not online:
        for browser in browsers:
            browser.start()
    await wait_complete(browsers, PER_USER, SETTLE)
    supervisor.cancel()
    await asyncio.gather(*(b.stop() for b in browsers))
    return check_exactly_once(browsers, PER_USER)


async def supervise(cluster) -> None:
    """What systemd's Restart=always does for the worker: kombu's Redis transport can end the
    worker with "Unrecoverable error" when the broker drops at an unlucky moment (its tasks are
    acks_late, so nothing is lost: the restarted worker runs them)."""
    restarts = 0
    while True:
        await asyncio.sleep(0.5)
        if not cluster.worker.alive:
            restarts += 1
            cluster.worker = await asyncio.to_thread(cluster.start_worker, f"worker-restart{restarts}")


async def test_sigkill_of_a_node_mid_stream_loses_nothing(fault_cluster):
    victim = fault_cluster.services[-1]  # the second node

    async def fault():
        await asyncio.to_thread(victim.kill)

    await run_with_fault(fault_cluster, fault)


async def test_sigterm_of_a_node_mid_stream_loses_nothing(fault_cluster):
    victim = fault_cluster.services[-1]

    async def fault():
        assert await asyncio.to_thread(victim.terminate, 20) == 0

    await run_with_fault(fault_cluster, fault)


async def test_sigkill_of_the_worker_mid_stream_loses_nothing(fault_cluster):
    async def fault():
        await asyncio.to_thread(fault_cluster.worker.kill)
        await asyncio.sleep(0.5)
        fault_cluster.worker = await asyncio.to_thread(fault_cluster.start_worker, "worker2")

    await run_with_fault(fault_cluster, fault)


async def test_a_redis_restart_mid_stream_loses_nothing(fault_cluster):
    async def fault():
        await asyncio.to_thread(fault_cluster.redis_server.stop)
        await asyncio.sleep(1.0)
        await asyncio.to_thread(fault_cluster.redis_server.start)

    await run_with_fault(fault_cluster, fault)


async def test_a_user_offline_for_the_whole_stream_gets_everything_on_connecting(fault_cluster):
    async def nothing():
        return None

    await run_with_fault(fault_cluster, nothing, online=False)


async def test_a_rolling_restart_of_both_nodes_under_load_loses_nothing(fault_cluster):
    async def fault():
        for index, port in enumerate(fault_cluster.node_ports):
            node = fault_cluster.services[2 + index]
            assert await asyncio.to_thread(node.terminate, 20) == 0
            await asyncio.to_thread(fault_cluster.start_node, port)

    await run_with_fault(fault_cluster, fault)


async def test_sigterm_of_the_worker_under_load_stops_it_and_loses_nothing(fault_cluster):
    """A warm shutdown while batches of 1,000 messages are stored and routed.  A batch used to send
    its pool's answer (every message id) back to the main process in pieces; when SIGTERM stopped
    the main process's loop between two pieces, the worker never exited: it blocked for ever
    reading the rest (``tasks.collect._apply_batch``).  It now stops in 2-3 s here, or after
    about 30 s when a pool process waits for billiard's count of its results (stock Celery's
    prefork pool does the same)."""
    cluster = fault_cluster
    sent = [cluster.send("tasks.collect_many", messages=[{"to": f"{cluster.broker}-u{i % 50}", "data": {"n": n, "i": i}} for i in range(1000)])
            for n in range(40)]
    for _ in range(300):
        if sum(result.ready() for result in sent) >= 5:
            break
        await asyncio.sleep(0.1)
    assert not all(result.ready() for result in sent), "the worker ran everything before the test could stop it mid-stream"
    # After 45 s it gets SIGKILL, and its exit code is -9.
    assert await asyncio.to_thread(cluster.worker.terminate, 45) == 0, "the worker did not stop within 45 s of SIGTERM"
    cluster.worker = await asyncio.to_thread(cluster.start_worker, "worker2")
    results = [await cluster.result(result, 60) for result in sent]
    assert all(len(ids) == 1000 and all(isinstance(i, str) for i in ids) for ids in results)

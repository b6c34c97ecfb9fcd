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
import socket
import uuid

import psutil
import pytest
import redis as redis_lib
from kombu import Connection

import launcher
from tests.integration.browser import Browser, check_exactly_once, confirm, stream, wait_complete
from tasks.ids import IdGenerator
from tasks.store import get_store
from tests.integration.conftest import HOUSEKEEPING_SECONDS, REDELIVER_AFTER, Cluster, broker_url_for, business_app, start_or_explain, unacked_task_ids
from tests.integration.wsclient import Client
from wsnode.registry import route_key

USERS = 100
PER_USER = 8
RATE = 250.0  # messages/s: the stream lasts about 3 s
SETTLE = 60.0  # the longest a test waits for the stragglers


async def run_with_fault(cluster, fault, online: bool = True, patience: float = 30.0) -> dict:
    """``patience``: how long the business code waits for its collects' ids before it sends again
    the ones that gave none (with their keys: resending is safe, only slower)."""
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
    resent = await confirm(cluster, await sending, timeout=patience)
    if not online:
        for browser in browsers:
            browser.start()
    await wait_complete(browsers, PER_USER, SETTLE)
    supervisor.cancel()
    await asyncio.gather(*(b.stop() for b in browsers))
    return {**check_exactly_once(browsers, PER_USER), "resent": resent}


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

    # On the Redis broker the collects the killed worker had taken come back only after
    # VISIBILITY_TIMEOUT: they are sent again after 12 s rather than 30 (it saves CI 18 s).
    await run_with_fault(fault_cluster, fault, patience=12.0)


async def test_a_redis_restart_mid_stream_loses_nothing(fault_cluster):
    """Redis holds the leases, the results and (on the Redis broker) the queues.  With RabbitMQ as
    the broker, business code waiting for its ids gets every one once Redis is back: a batch whose
    results could not be written waits for Redis, as Celery's backend does for any task
    (``result_backend_always_retry``); it used to drop them, and those collects timed out and were
    sent again.  On the Redis broker a request read just before the restart can come back only
    after ``VISIBILITY_TIMEOUT`` (kombu's restore), past the business code's patience: it is sent
    again with its key, and stored once."""
    async def fault():
        await asyncio.to_thread(fault_cluster.redis_server.stop)
        await asyncio.sleep(1.0)
        await asyncio.to_thread(fault_cluster.redis_server.start)

    report = await run_with_fault(fault_cluster, fault)
    if fault_cluster.broker == "amqp":
        assert report["resent"] == 0, report


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


#: Seconds a worker under load may take to stop on SIGTERM (the test below says why).
STOP_SECONDS = 45


async def test_sigterm_of_the_worker_under_load_stops_it_and_loses_nothing(fault_cluster):
    """A warm shutdown while requests of 1,000 messages are stored and routed (rounds of 15
    requests, another round while the worker ran every one before the test looked, at most five:
    some done, some running, the rest queued; the next worker stores what is left).  A batch used
    to send its pool's answer (every message id) back to the main process in pieces; when SIGTERM
    stopped the main process's loop between two pieces, the worker never exited: it blocked for
    ever reading the rest (``tasks.collectbatches._apply_batch``).  It now stops in 2-3 s here.

    With Celery's own prefork pool, a SIGTERM that landed just after a batch went to a pool process
    made the stop take 30 s more (four stops in 137 here), or never end (the batch half written to
    the process's pipe); the worker's pool (``tasks.prefork``) mends both, and
    ``test_worker_stop.py`` makes each case happen every time.  The wait here, 45 s as before those
    were found, leaves room for the stop to finish the batches running, each up to
    ``COLLECT_MANY_MESSAGES`` messages, with the cores shared by the other test processes."""
    cluster = fault_cluster
    sent = []
    # A round of 15 batches can run whole before this process polls again (it shares the cores with
    # the worker, and with another test process under ``pytest -n``): then another round goes.
    for _ in range(5):
        sent += [cluster.send("tasks.collect_many", messages=[{"to": f"{cluster.broker}-u{i % 50}", "data": {"n": len(sent) + n, "i": i}} for i in range(1000)])
                 for n in range(15)]
        for _ in range(300):
            if sum(result.ready() for result in sent) >= len(sent) - 10:
                break
            await asyncio.sleep(0.1)
        if not all(result.ready() for result in sent):
            break
    assert not all(result.ready() for result in sent), "the worker ran everything before the test could stop it mid-stream, five times"
    # After STOP_SECONDS it gets SIGKILL, and its exit code is -9.
    assert await asyncio.to_thread(cluster.worker.terminate, STOP_SECONDS) == 0, f"the worker did not stop within {STOP_SECONDS} s of SIGTERM"
    cluster.worker = await asyncio.to_thread(cluster.start_worker, "worker2")
    results = [await cluster.result(result, 60) for result in sent]
    assert all(len(ids) == 1000 and all(isinstance(i, str) for i in ids) for ids in results)


#: Seconds: the worker's --time-limit in patient_broker_cluster for a test marked
#: ``worker_time_limit``, far above a batch's time here (about 0.2 s; 3 s and more when the test
#: shares the cores with another test process and a benchmark, so the other tests run without it).
TIME_LIMIT = 3


@pytest.fixture(params=["redis", "amqp"])
def patient_broker_cluster(request, tmp_path):
    """A private worker (no nodes) whose Redis broker gives a task taken by a dead worker back
    only after 300 s: longer than the tests wait, so what they get back came back otherwise.  Its
    hard time limit is TIME_LIMIT for a test marked ``worker_time_limit``; none otherwise."""
    redis_server = launcher.RedisServer(data_dir=tmp_path / "redis").start()
    request.addfinalizer(redis_server.stop)
    cluster = Cluster(redis_server, tmp_path, broker_url=broker_url_for(request.param, redis_server, request), auth_port=launcher.free_port(),
                      VISIBILITY_TIMEOUT=300, LOG_LEVEL="DEBUG")
    cluster.broker = request.param
    limited = request.node.get_closest_marker("worker_time_limit") is not None
    start_or_explain(cluster, nodes=0, options=[f"--time-limit={TIME_LIMIT}"] if limited else [])
    yield cluster
    cluster.stop(at_once=True)


async def load_then_hit_running_batches(cluster, hit, landed: str, tasks: int = 40, process_stops: bool = False) -> list:
    """Send ``tasks`` ``tasks.collect_many`` of 1,000 messages while the pool is stopped (so that
    it is then never idle), then ``hit(process)`` every pool process right after a batch starts,
    until the worker log shows ``landed`` (a pool process may be between two batches), then
    resume any process stopped (``process_stops``: the hit is a SIGSTOP); returns the sent
    tasks' AsyncResults."""
    log = cluster._log("worker")
    pool = psutil.Process(cluster.worker.pid).children()
    for process in pool:
        process.suspend()
    sent = [cluster.send("tasks.collect_many", messages=[{"to": f"pool-fault-u{i % 50}", "data": {"n": n, "i": i}} for i in range(1000)])
            for n in range(tasks)]
    for process in pool:
        process.resume()
    for _ in range(5):
        seen = log.read_text(errors="replace").count("messages in one batch")
        for _ in range(300):
            if log.read_text(errors="replace").count("messages in one batch") > seen:
                break
            await asyncio.sleep(0.01)
        for process in psutil.Process(cluster.worker.pid).children():
            hit(process)
        for _ in range(TIME_LIMIT * 20):
            if landed in log.read_text(errors="replace"):
                # A process stopped mid-batch is killed by its time limit within a second or so of
                # the first: resume only what is left after that, the ones hit between two batches.
                # (One resumed just before its limit killed it could die writing to its pipe, which
                # can leave Celery's prefork pool stuck, as celery/celery#4789 reports.)
                await asyncio.sleep(TIME_LIMIT if process_stops else 0)
                for process in psutil.Process(cluster.worker.pid).children():
                    process.resume()
                return sent
            await asyncio.sleep(0.1)
    pytest.fail(f"no hit on a running batch showed ({landed!r}) in 5 tries:\n{cluster.log_tails(40)}")


async def results_within(sent: list, seconds: float) -> list:
    """Every result of ``sent``, all of which must be ready within ``seconds`` (polled: each
    get() of a result that is ready already can wait for Celery's 1 s polling)."""
    for _ in range(int(seconds * 10)):
        if all(result.ready() for result in sent):
            break
        await asyncio.sleep(0.1)
    missing = [result.id for result in sent if not result.ready()]
    assert not missing, f"{len(missing)} of {len(sent)} requests got no result within {seconds:g} s"
    return [result.get(timeout=1, propagate=False) for result in sent]


async def test_a_pool_process_killed_mid_batch_has_its_requests_run_again_at_once(patient_broker_cluster):
    """The OOM killer (here SIGKILL) ends a pool process while it stores and routes a batch: the
    worker puts the batch's requests back on the queue at once, as Celery does for any task with
    ``task_reject_on_worker_lost``, and runs them again under the same ids.  They used to stay
    unacknowledged: on Redis until VISIBILITY_TIMEOUT, on RabbitMQ until the worker's connection
    closed (never, while it ran)."""
    cluster = patient_broker_cluster
    sent = await load_then_hit_running_batches(cluster, lambda process: process.kill(), "was lost with its pool process")
    assert "they go back to the queue" in cluster._log("worker").read_text(errors="replace")
    results = await results_within(sent, 60)
    assert all(len(ids) == 1000 and all(isinstance(i, str) for i in ids) for ids in results)
    assert len({i for ids in results for i in ids}) == 40 * 1000
    assert cluster.worker.alive


@pytest.mark.worker_time_limit
async def test_a_batch_past_the_workers_hard_time_limit_fails_its_requests_and_the_worker_goes_on(patient_broker_cluster):
    """``celery worker --time-limit`` (or ``celery control time_limit``) holds for a batch as for
    any task: a pool process stuck in a batch (here stopped with SIGSTOP) is killed after the
    limit, and the batch's requests fail with ``TimeLimitExceeded`` (acked, not run again); the
    worker goes on with the rest.  celery-batches ran batches with no time limit."""
    cluster = patient_broker_cluster
    sent = await load_then_hit_running_batches(cluster, lambda process: process.suspend(), "Hard time limit", process_stops=True)
    results = await results_within(sent, 60)
    failed = [result for result in sent if result.state == "FAILURE"]
    assert failed and all(type(result.result).__name__ == "TimeLimitExceeded" for result in failed), [r.result for r in failed]
    assert all(len(ids) == 1000 for ids in results if isinstance(ids, list))
    assert len(failed) < len(sent)  # the others ran, on the pool processes that replaced the stopped ones
    assert cluster.worker.alive


@pytest.fixture(params=["redis", "amqp"])
def poisoned_cluster(request, tmp_path):
    """A private worker (no nodes) whose pool processes die on a ``tasks.collect`` request with
    data ``{"poison": "kill"}`` and on ``tasks.presence`` asked about ``poison-kill``
    (``tests/integration/poison.py``); its Redis broker gives a task taken
    by a dead worker back only after 300 s, so what comes back came back at once."""
    redis_server = launcher.RedisServer(data_dir=tmp_path / "redis").start()
    request.addfinalizer(redis_server.stop)
    cluster = Cluster(redis_server, tmp_path, broker_url=broker_url_for(request.param, redis_server, request), auth_port=launcher.free_port(),
                      VISIBILITY_TIMEOUT=300)
    cluster.broker = request.param
    start_or_explain(cluster, nodes=0, options=["--include=tests.integration.poison"])
    yield cluster
    cluster.stop(at_once=True)


async def test_a_request_that_kills_its_pool_process_is_failed_alone_and_the_requests_beside_it_run(poisoned_cluster):
    """A request that kills the pool process running it (out of memory, say) took its whole batch
    with it each time, and the batch went back to the queue: the requests beside it went round
    with it for ever.  Now the requests of a lost batch come back one per batch, and one lost
    three times, the last two alone, fails with ``LostWithItsProcess``."""
    cluster = poisoned_cluster
    pool = psutil.Process(cluster.worker.pid).children()
    for process in pool:
        process.suspend()  # the first request waits in the pool; those after it gather into one batch
    first = cluster.send(to="bystander-first", data={"n": -1})
    await asyncio.sleep(0.3)
    poison = cluster.send(to="poison-victim", data={"poison": "kill"})
    beside = [cluster.send(to=f"bystander-{n}", data={"n": n}) for n in range(20)]
    await asyncio.sleep(0.3)
    for process in pool:
        process.resume()

    ids = [await cluster.result(result, 60) for result in [first, *beside]]
    assert all(isinstance(i, str) for i in ids) and len(set(ids)) == 21
    failure = await asyncio.to_thread(_failure_of, cluster, poison, 60)
    assert type(failure).__name__ == "LostWithItsProcess" and "not run again" in str(failure)
    lost = "requests was lost with its pool process"
    log = "\n".join(await worker_log_lines(cluster, lambda lines: sum(lost in line for line in lines) >= 3))
    losses = [line for line in log.splitlines() if lost in line]
    assert len(losses) == 3, "the poison's batch, then the poison alone twice"
    assert "a batch of 1 requests" not in losses[0], "the poison was not in a batch with others: nothing shows they were spared"
    assert "a batch of 1 requests" in losses[1] and "a batch of 1 requests" in losses[2] and "not run again" in losses[2]
    # The requests beside it ran alone, once each, and are not suspects any more.
    alone = [line for line in log.splitlines() if "it runs alone" in line]
    assert any(result.id in line for line in alone for result in beside)
    assert cluster.worker.alive


async def test_a_plain_task_that_kills_its_pool_process_fails_after_three_losses_and_the_worker_goes_on(poisoned_cluster):
    """Every task goes back to its queue when its pool process dies (``task_reject_on_worker_lost``),
    which on its own is Celery's message loop: a request that kills its process every time came
    back for ever, killing a pool process each time.  Now its third loss fails it with
    ``LostWithItsProcess`` (``tasks/lost.py``), and it is not run again."""
    cluster = poisoned_cluster
    poison = cluster.business.send_task("tasks.presence", args=["poison-kill"], queue="dispatch")
    failure = await asyncio.to_thread(_failure_of, cluster, poison, 60)
    assert type(failure).__name__ == "LostWithItsProcess" and "died 3 times" in str(failure), failure
    # The worker goes on, and the poison does not come back: no fourth pool process dies.
    assert await cluster.result(cluster.business.send_task("tasks.presence", args=[["nobody"]], queue="dispatch"), 20) == {"nobody": []}
    await asyncio.sleep(1)
    log = await worker_log_lines(cluster, lambda lines: sum(poison.id in line and "it goes back to the queue" in line for line in lines) >= 2
                                 and sum("exited with 'signal 9 (SIGKILL)'" in line for line in lines) >= 3)
    back = [line for line in log if poison.id in line and "it goes back to the queue" in line]
    assert len(back) == 2 and "(1 of 3 times)" in back[0] and "(2 of 3 times)" in back[1], back
    assert len([line for line in log if "exited with 'signal 9 (SIGKILL)'" in line]) == 3
    assert cluster.worker.alive
    # It was acked: a message still unacked goes back to its queue when the worker stops.  (A
    # clean stop, not a quick one: it can take about 30 s under load, README "Stopping a worker".)
    assert cluster.worker.terminate(60) == 0
    assert poison.id not in cluster.take_task_ids("dispatch")


async def worker_log_lines(cluster, enough, timeout: float = 10.0) -> list[str]:
    """The lines of the worker's log once ``enough(lines)`` is true, or after ``timeout``: the
    worker logs a loss as it happens, but a thread of this process copies its output to the file,
    and under load may not have yet when the test has the failure the loss led to."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not enough(lines := cluster._log("worker").read_text(errors="replace").splitlines()) and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.1)
    return lines


def _failure_of(cluster, result, timeout: float) -> BaseException:
    with cluster._results_lock:  # as Cluster.result: Celery's result consumer is not thread-safe
        result.get(timeout=timeout, propagate=False)
    assert result.state == "FAILURE", (result.state, result.result)
    return result.result


@pytest.fixture
def outage_cluster(request, tmp_path):
    """A private cluster on the Redis broker with one node, whose Redis (persistent, so the queues
    survive) is shut down by the worker itself when it first routes a message with data
    ``{"poison": "redis-down"}`` (``tests/integration/poison.py``).  A task taken by a dead worker
    comes back only after 300 s: what arrives in time was not run again.  Leases of 15 s: the
    outage lasts seconds, and on a loaded machine it outlasted the tests' 3 s, after which the node
    closed the user's connection with 1013 (as it should: routes lost) before the message came."""
    redis_server = launcher.RedisServer(persistent=True, data_dir=tmp_path / "redis").start()
    request.addfinalizer(redis_server.stop)
    cluster = Cluster(redis_server, tmp_path, broker_url=redis_server.url(0), auth_port=launcher.free_port(), VISIBILITY_TIMEOUT=300,
                      LEASE_TTL=15)
    cluster.broker = "redis"
    start_or_explain(cluster, nodes=1, options=["--include=tests.integration.poison"])
    yield cluster
    cluster.stop(at_once=True)


async def test_a_collect_whose_messages_are_stored_when_redis_and_the_broker_go_down_waits_and_delivers(outage_cluster):
    """Redis goes down (here it is also the broker) between storing a batch's messages and routing
    them: neither the node's queue nor ``tasks.dispatch``'s can take them.  The batch waits for
    Redis, with the policy its results are written with, and routes them once it is back; the
    request returns the message's id and the user gets it.  It used to fail with the broker's
    ``OperationalError`` though its message was stored, and business code sending it again
    without a key stored it twice."""
    cluster = outage_cluster
    client = await cluster.connect("outage-user")
    sent = cluster.send(to="outage-user", data={"poison": "redis-down"})
    for _ in range(200):
        if not await asyncio.to_thread(cluster.redis_server.ping):
            break
        await asyncio.sleep(0.05)
    else:
        pytest.fail("the worker did not shut Redis down")
    log = cluster._log("worker")
    for _ in range(100):
        if "1 stored messages not routed or queued for tasks.dispatch yet" in log.read_text(errors="replace"):
            break
        await asyncio.sleep(0.05)
    else:
        pytest.fail(f"the batch did not wait for Redis:\n{cluster.log_tails(20)}")
    await asyncio.sleep(1.0)  # a few more tries fail
    await asyncio.to_thread(cluster.redis_server.start)

    message_id = await cluster.result(sent, 60)
    frames = await client.messages(1, timeout=30)
    assert [(f["id"], f["data"]) for f in frames] == [(message_id, {"poison": "redis-down"})]
    text = log.read_text(errors="replace")
    assert "1 stored messages routed or queued for tasks.dispatch after" in text
    assert cluster.worker.alive
    # The lost broker connection in one line: Celery's came with a traceback and a CPendingDeprecationWarning.
    assert "consumer: Connection to broker lost (ConnectionError: " in text, text[-3000:]
    assert "Traceback" not in text and "CPendingDeprecationWarning" not in text, text[-5000:]
    client.close()


@pytest.fixture(params=["broker", "routing"], ids=["results-on-the-broker", "results-on-redis-url"])
def routing_redis_cluster(request, tmp_path):
    """A private cluster on the Redis broker with one node, whose routing Redis (``REDIS_URL``) is
    a server of its own; results go to the broker's, or (the default) to ``REDIS_URL``'s."""
    routing = launcher.RedisServer(data_dir=tmp_path / "routing").start()
    request.addfinalizer(routing.stop)
    broker = launcher.RedisServer(data_dir=tmp_path / "broker").start()
    request.addfinalizer(broker.stop)
    results = {"RESULT_BACKEND": broker.url(1)} if request.param == "broker" else {}
    cluster = Cluster(routing, tmp_path, broker_url=broker.url(0), auth_port=launcher.free_port(), **results)
    if results:
        cluster.business = business_app(broker.url(0), broker.url(1))
    cluster.broker = "redis"
    start_or_explain(cluster, nodes=1)
    yield cluster
    cluster.stop(at_once=True)


#: How a demoted Redis refuses Dispatch's lookup: a replica refuses its writes (READONLY), one set
#: to serve no stale data while its primary is down refuses even its reads (MASTERDOWN), first.
REPLICA_REFUSALS = {"yes": "You can't write against a read only replica", "no": "Link with MASTER is down"}


@pytest.mark.parametrize("serve_stale", REPLICA_REFUSALS, ids=["readonly", "masterdown"])
async def test_a_collect_while_the_routing_redis_is_a_replica_for_a_moment_is_queued_and_delivered(routing_redis_cluster, serve_stale):
    """A failover demotes the routing Redis to a replica for a moment (it refuses writes with
    READONLY; here its primary is unreachable, so it keeps its data): Dispatch's lookup, which
    records the pending deliveries, is refused.  Collect stored the message, then failed the
    request with ReadOnlyError, where a Redis that does not answer has the batch queue its
    messages for ``tasks.dispatch``, which retries: now so does a refusal of a replica.  Results
    kept there (the default) were not stored (only published, which a replica does): now they
    are written again until it is a primary, as after a restart.  A replica with
    ``replica-serve-stale-data no`` refuses the lookup with MASTERDOWN, which redis-py raises as a
    ``ResponseError`` (``MasterDownError``) that nothing retried: the request failed with it and
    the stored message reached no one."""
    cluster = routing_redis_cluster
    client = await cluster.connect("failover-user")
    first = await cluster.collect("failover-user", "before", timeout=20)
    assert [f["id"] for f in await client.messages(1)] == [first]
    routing = redis_lib.Redis.from_url(cluster.env["REDIS_URL"])
    routing.config_set("replica-serve-stale-data", serve_stale)
    routing.execute_command("REPLICAOF", "127.0.0.1", str(launcher.free_port()))  # a primary that does not answer
    try:
        sent = cluster.send(to="failover-user", data="during")
        await asyncio.to_thread(cluster.worker.wait_log, f"dispatching 1 stored messages inline failed ({REPLICA_REFUSALS[serve_stale]}", 20)
        await asyncio.sleep(1.0)
    finally:
        routing.execute_command("REPLICAOF", "NO", "ONE")  # promoted
    message_id = await cluster.result(sent, 20)
    frames = await client.messages(1, timeout=60)
    assert [(f["id"], f["data"]) for f in frames] == [(message_id, "during")]
    # Stored, not only published to the callers waiting then (Redis publishes on a replica too).
    for _ in range(100):
        if (stored := cluster.business.backend.get_task_meta(sent.id, cache=False)["result"]) is not None:
            break
        await asyncio.sleep(0.2)
    assert stored == message_id
    client.close()


@pytest.mark.parametrize("routing_redis_cluster", ["broker"], indirect=True, ids=["results-on-the-broker"])
async def test_a_message_routed_late_is_replayed_to_a_browser_that_resumes_from_a_later_id(routing_redis_cluster):
    """Collect cannot route ``late`` (the routing Redis demoted for a moment) and queues it for
    ``tasks.dispatch``; ``later``, sent once Redis is back, is routed at once.  The browser sees
    ``later``, leaves, and ``tasks.dispatch`` routes ``late`` while it is away (here its queue is
    held until then, so the order is certain).  The browser resumes from ``later``, as push.js
    does (its greatest id), which is more than ``RESUME_OVERLAP_MS`` after ``late``'s id: the
    replay did not reach back to ``late``, which that browser then never got (its inbox would
    have it, but a resume reads after ``since``)."""
    cluster = routing_redis_cluster
    user = "late-routed"
    client = await cluster.connect(user)
    first = await cluster.collect(user, "first")
    assert [f["id"] for f in await client.messages(1)] == [first]
    worker = [f"worker@{socket.gethostname()}"]
    replies = await asyncio.to_thread(cluster.business.control.cancel_consumer, "dispatch", destination=worker, reply=True, timeout=10)
    assert replies and "ok" in replies[0][worker[0]], replies
    routing = redis_lib.Redis.from_url(cluster.env["REDIS_URL"])
    routing.execute_command("REPLICAOF", "127.0.0.1", str(launcher.free_port()))  # a primary that does not answer
    try:
        sent = cluster.send(to=user, data="late")
        await asyncio.to_thread(cluster.worker.wait_log, "dispatching 1 stored messages inline failed", 20)
    finally:
        # Promoted at once: the node's lease renewals fail meanwhile, and past LEASE_TTL (3 s
        # here) it closes its connections (1013 "routes lost"), as it did on a loaded machine.
        routing.execute_command("REPLICAOF", "NO", "ONE")
    late = await cluster.result(sent, 20)
    await asyncio.sleep(2.5)  # RESUME_OVERLAP_MS (2 s) and more between the two ids
    later = await cluster.collect(user, "later")
    assert [(f["id"], f["data"]) for f in await client.messages(1)] == [(later, "later")]
    client.close()
    for _ in range(100):
        if not cluster.routes.exists(route_key(user)):
            break
        await asyncio.sleep(0.1)
    assert not cluster.routes.exists(route_key(user)), "the browser's lease outlived its connection"
    broker = redis_lib.Redis.from_url(cluster.env["BROKER_URL"])
    assert broker.llen("dispatch") >= 1  # late's routing (and the acks' receipts), held
    replies = await asyncio.to_thread(cluster.business.control.add_consumer, "dispatch", destination=worker, reply=True, timeout=10)
    assert replies and "ok" in replies[0][worker[0]], replies
    for _ in range(100):
        if broker.llen("dispatch") == 0 and not unacked_task_ids(broker):
            break
        await asyncio.sleep(0.1)
    assert broker.llen("dispatch") == 0 and not unacked_task_ids(broker), "tasks.dispatch did not run"
    back = await Client.connect(cluster.ws_url(cluster.node_ports[0], await asyncio.to_thread(cluster.token, user), since=later))
    replayed, resumed = await back.until("resumed", 20)
    assert [f["id"] for f in replayed if f["type"] == "message" and f["id"] != first] == [late, later], (resumed, replayed)
    back.close()


@pytest.mark.parametrize("cluster", ["redis"], indirect=True)
async def test_a_message_stored_but_never_routed_that_redelivery_sends_is_replayed_to_a_device_that_resumes_from_a_later_id(cluster):
    """A message stored and never routed (tasks.dispatch gave up after its retries, or its worker
    was killed between storing and routing) reaches the devices online only when housekeeping's
    sweep finds it and redelivery sends it.  A second device that saw a later message and left
    before that resumed from the later id and never got it; with the first device's ack, not even
    its inbox had it."""
    user = f"swept-{uuid.uuid4().hex[:8]}"
    online = await cluster.connect(user)
    first = await cluster.collect(user, "first")
    assert [f["id"] for f in await online.messages(1)] == [first]
    leaving = await cluster.connect(user, since=first)
    await leaving.until("resumed")
    never_routed = IdGenerator().next_id()
    get_store().insert_messages([{"id": never_routed, "to": [user], "data": "never routed"}])
    await asyncio.sleep(2.5)  # more than RESUME_OVERLAP_MS
    later = await cluster.collect(user, "later")
    assert [f["id"] for f in await leaving.messages(1)] == [later]
    leaving.close()
    frames = await online.messages(2, timeout=3 * REDELIVER_AFTER + 10 * HOUSEKEEPING_SECONDS)
    assert never_routed in [f["id"] for f in frames], frames  # swept, redelivered, acked
    await asyncio.sleep(1.0)

    back = await cluster.connect(user, since=later)
    replayed, _ = await back.until("resumed", 20)
    assert never_routed in [f["id"] for f in replayed if f["type"] == "message"], replayed
    online.close()
    back.close()


@pytest.mark.parametrize("routing_redis_cluster", ["routing"], indirect=True, ids=["results-on-redis-url"])
async def test_failures_written_one_at_a_time_while_the_results_redis_is_a_replica_are_stored_once_it_is_a_primary(routing_redis_cluster):
    """The failures the worker writes one at a time (a collect request that is invalid; a message
    the worker refuses before it runs, here an unreadable eta; a plain task's error) while the
    Redis of the results is a replica for a moment (a failover's demotion: READONLY) are written
    again until it is a primary, as a batch's results are (100be48) and as after a restart:
    Celery's backend retried only a Redis that does not answer, so each was given up at once
    ('result not stored'), and a caller that asked for it afterwards waited for ever."""
    cluster = routing_redis_cluster
    assert await cluster.collect("replica-user", "before", timeout=20)
    routing = redis_lib.Redis.from_url(cluster.env["REDIS_URL"])
    routing.execute_command("REPLICAOF", "127.0.0.1", str(launcher.free_port()))  # a primary that does not answer
    try:
        # Each read by the worker before the results Redis is promoted (a refused message's
        # failure waits on the worker's failure writer, while the worker reads on).
        plain = cluster.business.send_task("tasks.status", args=[], queue="dispatch")
        await asyncio.to_thread(cluster.worker.wait_log, f"Task tasks.status[{plain.id}] received", 20)
        invalid = cluster.send(to=5, data=1)
        await asyncio.to_thread(cluster.worker.wait_log, f"tasks.collect {invalid.id} rejected", 20)
        with Connection(cluster.env["BROKER_URL"]) as conn:
            unreadable = str(uuid.uuid4())
            conn.Producer().publish([[], {"to": "replica-user", "data": 1}, {}], exchange="", routing_key="collect", serializer="json",
                                    headers={"task": "tasks.collect", "id": unreadable, "lang": "py", "eta": "tomorrow"})
        await asyncio.to_thread(cluster.worker.wait_log, "Received invalid task message: invalid ETA value 'tomorrow'", 20)
        await asyncio.sleep(1.5)  # each write refused at least once
    finally:
        routing.execute_command("REPLICAOF", "NO", "ONE")  # promoted
    expected = {invalid.id: "InvalidMessage", unreadable: "not run: invalid ETA value 'tomorrow'", plain.id: "InvalidMessage"}
    stored: dict = {}
    for _ in range(150):  # read as a caller asking afterwards does, not from what was published meanwhile
        stored = {task_id: cluster.business.backend.get_task_meta(task_id, cache=False) for task_id in expected}
        if all(meta["status"] == "FAILURE" for meta in stored.values()):
            break
        await asyncio.sleep(0.2)
    for task_id, says in expected.items():
        assert stored[task_id]["status"] == "FAILURE", (task_id, stored[task_id])
        assert says in repr(stored[task_id]["result"]), stored[task_id]
    assert cluster.worker.alive

"""Stock Flower and Celery's remote control see each push node as a worker that consumes its own
queue (``wsnode/presence.py``), on real processes: the shared cluster and a stock Flower.

Flower turns task events on in every worker and node (its ``enable_events`` broadcast, every 5 s);
the ``flower`` fixture turns them off again afterwards, so the other tests find the cluster as it was.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
from celery import Celery

import launcher

#: How long a probe may keep asking before the test fails (a deadline, not an expectation).
DEADLINE = 30.0


def node_name(port: int) -> str:
    return f"wsnode@127.0.0.1:{port}"


def queue_name(port: int) -> str:
    return f"127.0.0.1:{port}"


def get(url: str, as_json: bool = True):
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(url, timeout=10) as response:
        body = response.read()
    return json.loads(body) if as_json else body.decode()


async def eventually(probe, what: str):
    """``probe()`` (run in a thread) until it returns something true; fails with ``what`` and the
    last answer after :data:`DEADLINE` seconds."""
    deadline = time.monotonic() + DEADLINE
    last = None
    while True:
        try:
            last = await asyncio.to_thread(probe)
            if last:
                return last
        except (OSError, urllib.error.URLError, KeyError) as exc:
            last = exc
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: still not true after {DEADLINE:g} s; last answer: {last!r}")
        await asyncio.sleep(0.5)


async def until_flower_shows(attempt, shown, what: str):
    """``await attempt()`` (which sends a request, and returns what Flower lists of it) again until
    ``shown(answer)``: Flower turns task events on within 5 s of starting, and a request sent
    before that shows nowhere.  Returns that answer; fails saying ``what`` is missing, with the
    last answer, after :data:`DEADLINE` seconds."""
    deadline = time.monotonic() + DEADLINE
    while not shown(answer := await attempt()):
        if time.monotonic() > deadline:
            pytest.fail(f"{what} in Flower after {DEADLINE:g} s (last seen: {answer})")
    return answer


async def failed_collect_in_flower(cluster, flower: str, send, says: str) -> dict:
    """What Flower lists of a ``tasks.collect`` request that ``send()`` sends and that fails with
    ``says`` in its error, once Flower lists it as failed (sent again until it does)."""
    async def failed_task():
        result = send()
        with pytest.raises(Exception, match=says):
            await cluster.result(result, 20)
        await asyncio.sleep(1.0)
        tasks = await asyncio.to_thread(get, f"{flower}/api/tasks?taskname=tasks.collect")
        return tasks.get(result.id)

    return await until_flower_shows(failed_task, lambda task: task and task["state"] == "FAILURE", "no failed tasks.collect task")


def rabbitmq_management_answers(broker_url: str) -> bool:
    """Flower reads RabbitMQ's queue lengths from the management plugin (port 15672)."""
    try:
        get("http://127.0.0.1:15672/api/overview", as_json=False)
        return True
    except urllib.error.HTTPError:
        return True  # it answers (401 without credentials)
    except OSError:
        return False


@pytest.fixture(scope="module")
def control(cluster):
    return Celery(broker=cluster.env["BROKER_URL"])


@pytest.fixture(scope="module")
def flower(cluster, control):
    port = launcher.free_port()
    service = launcher.start_flower({**cluster.env, "FLOWER_UNAUTHENTICATED_API": "true"}, port,
                                    log_path=cluster.logs / f"flower-{port}.log")
    cluster.services.append(service)  # its log tail is shown when a test fails
    yield f"http://127.0.0.1:{port}"
    service.terminate()
    cluster.services.remove(service)
    control.control.disable_events()


async def test_each_push_node_answers_celery_ping_and_lists_its_own_queue(cluster, control):
    names = {node_name(port): queue_name(port) for port in cluster.node_ports}

    def answers():
        inspect = control.control.inspect(timeout=2, destination=list(names))
        pings, queues = inspect.ping() or {}, inspect.active_queues() or {}
        return (pings, queues) if set(pings) == set(names) == set(queues) else None

    pings, queues = await eventually(answers, "every push node answering ping and active_queues")
    for name, queue in names.items():
        assert pings[name] == {"ok": "pong"}
        assert [q["name"] for q in queues[name]] == [queue]
        assert queues[name][0]["routing_key"] == queue


def test_the_readmes_worker_health_check_exits_0_while_the_worker_answers_and_69_when_none_does(cluster):
    """``celery -A worker inspect ping -d NAME``, the worker's health check in the README."""
    def ping(name: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "celery", "-A", "worker", "inspect", "ping", "-d", name, "--timeout", "2"],
                              env={**os.environ, **cluster.env}, capture_output=True, text=True, timeout=60)

    live = ping(f"worker@{socket.gethostname()}")
    assert live.returncode == 0 and "pong" in live.stdout, live.stdout + live.stderr
    gone = ping("worker@no-such-host")
    assert gone.returncode == 69 and "No nodes replied" in gone.stdout + gone.stderr, gone.stdout + gone.stderr


async def test_flower_lists_each_push_node_as_an_online_worker_consuming_its_queue(cluster, flower):
    names = {node_name(port): queue_name(port) for port in cluster.node_ports}

    def listed():
        workers = get(f"{flower}/api/workers?refresh=1")
        return workers if all(name in workers and workers[name].get("active_queues") for name in names) else None

    workers = await eventually(listed, "Flower listing every push node with its queue")
    for name, queue in names.items():
        assert [q["name"] for q in workers[name]["active_queues"]] == [queue]
        assert workers[name]["registered"] == ["wsnode.deliver"]
        assert workers[name]["stats"]["total"].keys() == {"wsnode.deliver"}
        page = get(f"{flower}/worker/{name}", as_json=False)  # the node's own page renders, with its queue
        assert f"<td>{queue}</td>" in page
    # Online means Flower receives the nodes' heartbeat events.
    await eventually(lambda: all(get(f"{flower}/api/workers?status=1").get(name) for name in names),
                     "Flower seeing every push node online (worker heartbeats)")


async def test_flower_broker_page_lists_a_node_queue_with_its_backlog_while_the_node_is_stuck(cluster, flower):
    if cluster.broker == "amqp" and not rabbitmq_management_answers(cluster.env["BROKER_URL"]):
        pytest.skip("Flower reads RabbitMQ queue lengths from the management plugin, which does not answer on "
                    "127.0.0.1:15672: run `rabbitmq-plugins enable rabbitmq_management` to test this on RabbitMQ")
    # A node of its own, with a long lease so that Dispatch keeps routing to it while it is stopped.
    port = launcher.free_port()
    node = launcher.start_node({**cluster.env, "LEASE_TTL": "60"}, port, log_path=cluster.logs / f"node-{port}.log")
    try:
        # With its queue: Flower's refresh fills a worker's fields one inspect reply at a time, and a
        # node stopped before its active_queues reply came would never get its queue listed.
        await eventually(lambda: get(f"{flower}/api/workers?refresh=1").get(node_name(port), {}).get("active_queues"),
                         "Flower listing the new node with its queue")
        client = await cluster.connect("stuck-node-user", port)
        os.kill(node.pid, signal.SIGSTOP)  # the node stops reading its queue: a backlog builds up
        try:
            sent = [await cluster.collect("stuck-node-user", {"n": n}) for n in range(3)]

            def backlog():
                lengths = {q["name"]: q["messages"] for q in get(f"{flower}/api/queues/length")["active_queues"]}
                return lengths if lengths.get(queue_name(port), 0) >= 2 else None

            # 3 wsnode.deliver messages wait; a stopped Redis consumer may hold one that it popped.
            lengths = await eventually(backlog, "Flower showing the stopped node's backlog")
            assert {"collect", "dispatch"} <= lengths.keys()
            page = get(f"{flower}/broker", as_json=False)
            assert f"<td>{queue_name(port)}</td>" in page
        finally:
            os.kill(node.pid, signal.SIGCONT)
        assert [f["id"] for f in await client.messages(3, timeout=DEADLINE)] == sent
        await eventually(lambda: {q["name"]: q["messages"] for q in get(f"{flower}/api/queues/length")["active_queues"]}
                         .get(queue_name(port)) == 0, "the backlog draining once the node runs again")
        client.close()
    finally:
        if node.alive:
            os.kill(node.pid, signal.SIGCONT)
        node.terminate()


async def test_a_delivered_message_shows_in_flower_as_a_wsnode_deliver_task_of_its_node(cluster, flower):
    port = cluster.node_ports[0]
    client = await cluster.connect("flower-watched", port)

    async def delivered_task():
        # Flower turns task events on within 5 s of starting: send until one delivery shows.
        message_id = await cluster.collect("flower-watched", {"watched": True})
        (frame,) = await client.messages(1)
        assert frame["id"] == message_id
        await asyncio.sleep(1.0)
        tasks = await asyncio.to_thread(get, f"{flower}/api/tasks?taskname=wsnode.deliver&workername={node_name(port)}")
        return next((task for task in tasks.values() if message_id in (task.get("args") or "")), None)

    task = await until_flower_shows(delivered_task, bool, f"no wsnode.deliver task of {node_name(port)}")
    assert task["name"] == "wsnode.deliver"
    assert task["state"] == "SUCCESS"
    assert task["worker"] == node_name(port)
    assert task["received"] <= task["started"] <= task["succeeded"]
    client.close()


async def test_a_nodes_batch_of_acks_shows_in_flower_as_its_count_per_state(cluster, flower):
    client = await cluster.connect("flower-acks", cluster.node_ports[0])

    async def receipts_tasks():
        # Flower turns task events on within 5 s of starting: deliver (the client acks) until one shows.
        await cluster.collect("flower-acks", {"watched": "acks"})
        await client.messages(1)
        await asyncio.sleep(1.0)  # the node flushes its acks every RECEIPT_FLUSH_SECONDS (0.2 s here)
        return await asyncio.to_thread(get, f"{flower}/api/tasks?taskname=tasks.receipts")

    tasks = await until_flower_shows(receipts_tasks, bool, "no tasks.receipts task")
    for task in tasks.values():  # every node's batch, not a repr of its first receipts
        assert re.fullmatch(r"\[<\d+ receipts?: \d+ [a-z]+(, \d+ [a-z]+)*>\]", task["args"]), task["args"]
    assert any(re.search(r"[:,] \d+ acked\b", task["args"]) for task in tasks.values())  # acks among them
    client.close()


async def test_each_batched_collect_request_shows_in_flower_as_a_succeeded_task_with_its_message_id(cluster, flower):
    client = await cluster.connect("flower-collect", cluster.node_ports[0])

    async def collect_task():
        # Flower turns task events on within 5 s of starting: send until one collect shows.
        result = cluster.send(to="flower-collect", data={"watched": "collect"})
        message_id = await cluster.result(result, 20)
        await client.messages(1)
        await asyncio.sleep(1.0)
        tasks = await asyncio.to_thread(get, f"{flower}/api/tasks?taskname=tasks.collect")
        return message_id, tasks.get(result.id)

    message_id, task = await until_flower_shows(collect_task, lambda found: found[1], "no tasks.collect task")
    assert task["name"] == "tasks.collect"
    assert task["state"] == "SUCCESS"
    assert message_id in task["result"]
    client.close()


async def test_an_invalid_collect_request_shows_in_flower_as_a_failed_task_with_its_reason(cluster, flower):
    # The pool process that ran its batch sends its task-failed event (tasks.batchevents.send_outcomes).
    task = await failed_collect_in_flower(cluster, flower, lambda: cluster.send(to=[], data={"watched": "failure"}), "empty list")
    assert "empty list" in task["exception"]
    assert task["worker"].startswith("worker")


async def test_a_collect_the_worker_refuses_unread_shows_in_flower_as_a_failed_task_with_its_reason(cluster, flower):
    """A message the worker refuses before it runs (here sent with another serializer) fails with
    its reason as its result, and showed nowhere in Flower: it sent no task event, where Celery
    sends task-failed for a task it does not know."""
    task = await failed_collect_in_flower(cluster, flower, lambda: cluster.business.send_task(
        "tasks.collect", kwargs={"to": "flower-refused", "data": 1}, queue="collect", serializer="pickle"), "accepts JSON only")
    assert "accepts JSON only" in task["exception"] and task["exception"].startswith("InvalidMessage")
    assert task["worker"].startswith("worker")

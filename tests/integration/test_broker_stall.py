"""A Redis broker that stops answering without closing its connections (a failover, a network
partition; here its server stopped with SIGSTOP): the node's broker connections time out
(``socket_timeout`` in ``worker.py``) instead of waiting for ever.  The broker is a Redis of its
own, apart from the routing Redis (which stays up), so that ``/healthz`` can only turn on the
queue consumer."""

from __future__ import annotations

import os
import signal
import time

import psutil
import pytest

import launcher
from tests.integration.conftest import Cluster
from tests.integration.test_metrics import health

#: The node's ``BROKER_TIMEOUT`` and ``BROKER_HEALTH_CHECK_SECONDS`` (production: 10 and 25): its
#: commands to the stopped broker and its BRPOP give up after seconds, not half a minute, on the
#: same code path.
BROKER_TIMEOUTS = {"BROKER_TIMEOUT": 2, "BROKER_HEALTH_CHECK_SECONDS": 2}


@pytest.fixture
def stalled_broker_node(tmp_path):
    """A node whose broker Redis is stopped (SIGSTOP) once the node is ready; ``(node, broker)``."""
    routing = launcher.RedisServer(data_dir=tmp_path / "routing").start()
    broker = launcher.RedisServer(data_dir=tmp_path / "broker").start()
    cluster = Cluster(routing, tmp_path, broker_url=broker.url(0), auth_port=launcher.free_port(), **BROKER_TIMEOUTS)
    process = psutil.Process(broker.service.pid)
    try:
        node = cluster.start_node()
        assert health(node.port)[0] == 200
        process.suspend()
        yield node, process
    finally:
        process.resume()
        cluster.stop(at_once=True)
        broker.stop()
        routing.stop()


def not_ready_then_ready(port: int, answer_again) -> None:
    """The node at ``port`` turns not ready (503, its queue consumer down, Redis fine) while its
    broker does not answer, and ready again once ``answer_again()`` made the broker answer."""
    deadline = time.monotonic() + 120
    while (status := health(port))[0] == 200 and time.monotonic() < deadline:
        time.sleep(1)
    assert status[0] == 503 and status[1]["queue"] is False and status[1]["redis"] is True, status
    answer_again()
    deadline = time.monotonic() + 120
    while (status := health(port))[0] != 200 and time.monotonic() < deadline:
        time.sleep(1)
    assert status[0] == 200, status


def test_a_node_whose_broker_stops_answering_is_not_ready_and_is_again_once_it_answers(stalled_broker_node):
    """The consumer thread waited for ever on a command to the stopped broker (kombu's restore
    scan, then the BRPOP it re-sent), still counted as connected: ``/healthz`` answered 200 while
    nothing was read from the queue."""
    node, broker = stalled_broker_node
    not_ready_then_ready(node.port, broker.resume)


def test_a_node_whose_broker_stops_answering_still_exits_on_sigterm(stalled_broker_node):
    """The drain's hand-back of the node's queue waited for ever on the stopped broker; the drain
    gave up on it, but the process's exit waited for its thread, for ever."""
    node, _ = stalled_broker_node
    os.kill(node.pid, signal.SIGTERM)
    assert node.wait(120) == 0, "the node did not exit after SIGTERM"
    assert "drained and stopped" in node.log_tail(20)

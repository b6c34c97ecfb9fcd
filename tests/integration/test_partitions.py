"""A RabbitMQ broker that stops answering without closing its connections (a network partition):
here a :class:`~tests.integration.tcpproxy.FreezableProxy` between one process and the broker (a
private vhost of the shared RabbitMQ, which itself is never stopped) stops moving bytes while
every socket stays open.  The routing Redis, and the other processes' broker connections, stay up.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time

import pytest

import launcher
from tests.integration.conftest import Cluster, RabbitVhost
from tests.integration.tcpproxy import BlackholeProxy, FreezableProxy
from tests.integration.test_broker_stall import not_ready_then_ready
from tests.integration.test_metrics import health

#: ``BROKER_TIMEOUT`` of the processes these tests cut off (production: 10): a node's AMQP heartbeat
#: and a worker's waits for RabbitMQ's reply (half of it), so that each test waits seconds, not
#: its production half-minute, for the same code path to give up on the frozen broker.
BROKER_TIMEOUT = 2


@contextlib.contextmanager
def private_rabbit_cluster(tmp_path, proxy_type: type[FreezableProxy] = FreezableProxy):
    """A cluster (no process started) on a routing Redis of its own and a private RabbitMQ vhost,
    and a ``proxy_type`` proxy to that vhost's broker: ``(cluster, proxy, broker URL through the
    proxy)``; everything stopped and deleted on leaving."""
    routing = launcher.RedisServer(data_dir=tmp_path / "routing").start()
    vhost = RabbitVhost()
    try:
        vhost.create()
        cluster = Cluster(routing, tmp_path, broker_url=vhost.url, auth_port=launcher.free_port())
        proxy, url = proxy_type.to_url(vhost.url)
        try:
            yield cluster, proxy, url
        finally:
            proxy.close()
            cluster.stop(at_once=True)
    finally:
        vhost.delete()
        routing.stop()


@pytest.fixture
def rabbit_cluster(tmp_path):
    with private_rabbit_cluster(tmp_path) as parts:
        yield parts


def test_a_node_whose_rabbitmq_stops_answering_is_not_ready_and_is_again_once_it_answers(rabbit_cluster):
    """The consumer's connection had no heartbeat: it polled a broker that no longer answered,
    every half second for ever, still counted as connected (``/healthz`` 200, nothing read)."""
    cluster, proxy, url = rabbit_cluster
    node = cluster.start_node(BROKER_URL=url, BROKER_TIMEOUT=BROKER_TIMEOUT)
    assert health(node.port)[0] == 200
    proxy.freeze()
    not_ready_then_ready(node.port, proxy.thaw)


def test_a_nodes_presence_whose_rabbitmq_connection_went_silent_connects_again_and_answers_remote_control(tmp_path):
    """The presence's connection had no heartbeat, and its replies to remote control went out on
    the app's pooled connection, which had none either: a path that silently dropped them (a NAT
    forgetting its flows) left the node out of Flower and ``celery inspect`` for the quarter of an
    hour TCP takes to give up, while its queue consumer had reconnected within seconds."""
    with private_rabbit_cluster(tmp_path, BlackholeProxy) as (cluster, proxy, url):
        node = cluster.start_node(BROKER_URL=url, BROKER_TIMEOUT=BROKER_TIMEOUT)
        name = f"wsnode@127.0.0.1:{node.port}"
        ping = lambda: cluster.business.control.ping(destination=[name], timeout=2.0) or []  # noqa: E731
        # Its presence consumes remote control once it has connected, which on a loaded machine
        # can come after /healthz says the node is ready (CI: no answer to the first ping).
        deadline = time.monotonic() + 30
        while not ping() and time.monotonic() < deadline:
            pass
        assert ping(), "not visible before the cut"
        proxy.blackhole()
        deadline = time.monotonic() + 60
        while not (answered := ping()) and time.monotonic() < deadline:
            pass
        assert answered, f"no answer to ping within 60 s of the cut:\n{node.log_tail(40)}"
        assert "not visible to Celery monitoring" in node.log_tail(200)


def test_a_worker_whose_rabbitmq_stops_answering_still_exits_on_sigterm(rabbit_cluster):
    """Celery's warm shutdown closed the worker's channels waiting, for ever, for the broker's
    answer (py-amqp reads had no timeout)."""
    cluster, proxy, url = rabbit_cluster
    worker = launcher.start_worker({**cluster.env, "BROKER_URL": url, "BROKER_TIMEOUT": str(BROKER_TIMEOUT)}, log_path=cluster.logs / "worker.log", concurrency=1)
    cluster.services.append(worker)
    assert cluster.status("0" * 24)["found"] is False  # it reads tasks through the proxy
    proxy.freeze()
    os.kill(worker.pid, signal.SIGTERM)
    assert worker.wait(120) is not None, "the worker did not exit after SIGTERM:\n" + worker.log_tail(20)

"""A RabbitMQ connection that dies right after a publish was written to it: the publisher's write
succeeded (the bytes left its socket), the broker never got them.  Without publisher confirms
py-amqp's ``basic_publish`` returns once the bytes are written, so the publisher took the message
for sent: Dispatch's ``wsnode.deliver`` batch reached no node (its user, online, got it only from
redelivery, ``REDELIVER_AFTER`` later; a broadcast never), and a node's ``tasks.receipts`` batch
reached no worker (its acks recorded only once redelivery sent the messages again and the browser
acked them again).  With confirms (``confirm_publish``, ``worker.py``) a publish waits for the
broker's ``basic.ack``; the cut connection fails it, and kombu publishes it again on a new one.

A :class:`PublishCuttingProxy` between each process and a private vhost drops the first
``basic.publish`` to a given routing key, and everything after it on that connection, and closes
the connection both ways.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import threading

import pytest

import launcher
from tests.integration.tcpproxy import FreezableProxy, shut_both
from tests.integration.test_channel_errors import FRAME_END, METHOD
from tests.integration.test_partitions import private_rabbit_cluster

BASIC_PUBLISH = (60, 40)
#: Redelivery far beyond the test's waits: what arrives came through the publish itself.
REDELIVER_AFTER = 120


class PublishCuttingProxy(FreezableProxy):
    """A proxy to RabbitMQ that reads the frames its clients send, and once :meth:`cut_publish`
    was called, drops the first ``basic.publish`` to ``routing_key`` and everything after it on
    that connection, then closes the connection to both sides: the publisher wrote the message,
    the broker never saw it, and the connection died a moment later."""

    def __init__(self, *args) -> None:
        super().__init__(*args)
        self._armed: str | None = None
        self._arming = threading.Lock()
        self.cut = threading.Event()

    def cut_publish(self, routing_key: str) -> None:
        with self._arming:
            self._armed = routing_key
            self.cut.clear()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        if source.getpeername()[1] == self.target[1]:
            return super()._pump(source, sink)  # broker to client: as it is
        buffer, started = b"", False
        try:
            for data in self._received(source):
                buffer += data
                out = bytearray()
                if not started:  # the protocol header, "AMQP" 0 0 9 1
                    if len(buffer) < 8:
                        continue
                    out += buffer[:8]
                    buffer, started = buffer[8:], True
                while len(buffer) >= 7:  # whole frames only
                    kind, channel, size = struct.unpack(">BHI", buffer[:7])
                    if len(buffer) < 8 + size:
                        break
                    frame, payload, buffer = buffer[: 8 + size], buffer[7 : 7 + size], buffer[8 + size :]
                    if kind == METHOD and struct.unpack(">HH", payload[:4]) == BASIC_PUBLISH:
                        rest = payload[6:]  # class, method, reserved short
                        rest = rest[1 + rest[0] :]  # exchange
                        routing_key = rest[1 : 1 + rest[0]].decode()
                        with self._arming:
                            if self._armed == routing_key:
                                self._armed = None
                                if out:
                                    sink.sendall(out)
                                self.cut.set()
                                return  # the rest is dropped; finally closes both sides
                    out += frame
                    assert frame[-1] == FRAME_END
                if out:
                    sink.sendall(out)
        except (OSError, ValueError, AssertionError):
            pass
        finally:
            shut_both(source, sink)


@pytest.fixture
def cluster_behind_proxies(tmp_path):
    """Auth, a worker and a node on a private vhost, the worker and the node each through a
    :class:`PublishCuttingProxy` of its own; ``(cluster, worker proxy, node proxy, node)``."""
    with private_rabbit_cluster(tmp_path, PublishCuttingProxy) as (cluster, worker_proxy, worker_url):
        node_proxy, node_url = PublishCuttingProxy.to_url(cluster.env["BROKER_URL"])
        try:
            cluster.env["REDELIVER_AFTER"] = str(REDELIVER_AFTER)
            cluster.auth = launcher.start_auth(cluster.env, cluster.auth_port, log_path=cluster.logs / "auth.log")
            cluster.services.append(cluster.auth)
            worker = launcher.start_worker({**cluster.env, "BROKER_URL": worker_url}, log_path=cluster.logs / "worker.log", concurrency=1)
            cluster.services.append(worker)
            node = cluster.start_node(BROKER_URL=node_url)
            cluster.node_ports.append(node.port)
            yield cluster, worker_proxy, node_proxy, node
        finally:
            node_proxy.close()


async def test_a_publish_whose_connection_dies_right_after_it_is_sent_again(cluster_behind_proxies):
    cluster, worker_proxy, node_proxy, node = cluster_behind_proxies
    client = await cluster.connect("alice", node.port)
    first = await cluster.collect("alice", "first")
    assert [m["id"] for m in await client.messages(1)] == [first]

    # Dispatch's wsnode.deliver batch to the node's queue
    worker_proxy.cut_publish(f"127.0.0.1:{node.port}")
    second = await cluster.collect("alice", "second")
    assert worker_proxy.cut.is_set()
    try:
        got = await client.messages(1, timeout=8)
    except TimeoutError:
        pytest.fail("the batch published on a connection that died right after was lost (redelivery would send it "
                    f"{REDELIVER_AFTER} s later):\n" + cluster.log_tails(15))
    assert [m["id"] for m in got] == [second]

    # the node's tasks.receipts batch (the written and acked receipts of a third message)
    node_proxy.cut_publish("dispatch")
    third = await cluster.collect("alice", "third")
    assert [m["id"] for m in await client.messages(1)] == [third]
    assert node_proxy.cut.wait(5)
    for _ in range(40):
        states = (await asyncio.to_thread(cluster.status, third))["recipients"]["alice"]
        if "written" in states and "acked" in states:
            break
        await asyncio.sleep(0.2)
    assert "written" in states and "acked" in states, f"receipts lost with the node's connection: {states}\n" + cluster.log_tails(15)
    client.close()

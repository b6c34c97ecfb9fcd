"""A RabbitMQ broker that closes the channel a worker consumes on, with an error, while the
connection stays up: what RabbitMQ does (``406 PRECONDITION_FAILED - delivery acknowledgement on
channel 1 timed out``) when a task stays unacknowledged longer than its ``consumer_timeout`` (30
minutes by default), which a ``tasks.collect`` with a countdown or eta, held by the worker until its
time, does.  Celery's worker took such a channel error for an unrecoverable one: it logged
"Unrecoverable error: PreconditionFailed" and exited, and each worker restarted after it read the
request again, held it, and exited again.

The shared RabbitMQ cannot be given a short ``consumer_timeout`` (it is broker-wide), so a proxy
between the worker and a private vhost sends the worker that very ``channel.close`` frame.

Also: RabbitMQ cancelling the worker's consumer of a queue deleted while it consumes it.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import sys
import threading
import time

import pytest
from kombu import Connection

import launcher
from tests.integration.tcpproxy import FreezableProxy, shut_both
from tests.integration.test_partitions import private_rabbit_cluster

#: AMQP 0-9-1 frame types, and the frame's last octet.
METHOD, HEADER, BODY, FRAME_END = 1, 2, 3, 0xCE
#: (class, method) of basic.deliver and of the methods that carry content.
BASIC_DELIVER = (60, 60)
WITH_CONTENT = {(60, 40), (60, 50), (60, 60), (60, 71)}  # publish, return, deliver, get-ok


def channel_close_frame(channel: int, code: int, text: str) -> bytes:
    payload = struct.pack(">HHH", 20, 40, code) + bytes([len(text)]) + text.encode() + struct.pack(">HH", 0, 0)
    return struct.pack(">BHI", METHOD, channel, len(payload)) + payload + bytes([FRAME_END])


class ChannelClosingProxy(FreezableProxy):
    """A proxy to RabbitMQ that reads the frames the broker sends, and on :meth:`close_channel`
    sends the client, between two frames, a ``channel.close`` of the channel the broker last
    delivered a message of ``queue`` (its routing key) on, as RabbitMQ does at a consumer timeout."""

    def __init__(self, *args) -> None:
        super().__init__(*args)
        self._armed: tuple[str, bytes] | None = None
        self._arming = threading.Lock()  # one connection's pump sends it
        self.closed_channel = threading.Event()

    def close_channel(self, queue: str, text: str) -> None:
        with self._arming:
            self._armed = (queue, channel_close_frame(0, 406, text))

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        if source.getpeername()[1] != self.target[1]:
            return super()._pump(source, sink)  # client to broker: as it is
        buffer, content_left, channels = b"", 0, {}  # routing key -> channel it was last delivered on
        try:
            for data in self._received(source):
                buffer += data
                out = bytearray()
                while len(buffer) >= 7:  # whole frames only
                    kind, channel, size = struct.unpack(">BHI", buffer[:7])
                    if len(buffer) < 8 + size:
                        break
                    payload, buffer = buffer[7 : 7 + size], buffer[8 + size :]
                    out += struct.pack(">BHI", kind, channel, size) + payload + bytes([FRAME_END])
                    if kind == METHOD:
                        method = struct.unpack(">HH", payload[:4])
                        content_left = None if method in WITH_CONTENT else 0  # None: its header is to come
                        if method == BASIC_DELIVER:
                            rest = payload[4:]
                            rest = rest[1 + rest[0] + 8 + 1 :]  # consumer tag, delivery tag, redelivered
                            rest = rest[1 + rest[0] :]  # exchange (Celery publishes to the default one)
                            channels[rest[1 : 1 + rest[0]].decode()] = channel
                    elif kind == HEADER:
                        content_left = struct.unpack(">Q", payload[4:12])[0]
                    elif kind == BODY:
                        content_left -= size
                with self._arming:
                    armed = self._armed
                    if armed and content_left == 0 and not buffer and armed[0] in channels:
                        # between two frames, no content in progress: the broker's channel.close
                        frame = bytearray(armed[1])
                        frame[1:3] = struct.pack(">H", channels[armed[0]])
                        out += frame
                        self._armed = None
                        self.closed_channel.set()
                if out:
                    sink.sendall(out)
        except (OSError, ValueError):
            pass
        finally:
            shut_both(source, sink)


@pytest.fixture
def worker_behind_proxy(tmp_path):
    """A worker (no nodes, no auth: collect stores for users offline) on a private vhost through a
    :class:`ChannelClosingProxy`; ``(cluster, proxy, worker)``."""
    with private_rabbit_cluster(tmp_path, ChannelClosingProxy) as (cluster, proxy, url):
        worker = launcher.start_worker({**cluster.env, "BROKER_URL": url}, log_path=cluster.logs / "worker.log", concurrency=1)
        cluster.services.append(worker)
        yield cluster, proxy, worker


async def test_a_worker_goes_on_after_rabbitmq_closes_its_channel_at_a_consumer_timeout(worker_behind_proxy):
    cluster, proxy, worker = worker_behind_proxy
    assert len(await cluster.collect("offline-user", 1)) == 24  # read through the proxy
    proxy.close_channel("collect", "PRECONDITION_FAILED - delivery acknowledgement on channel 1 timed out. Timeout value used: 1800000 ms")
    assert proxy.closed_channel.wait(10)
    time.sleep(2)
    assert worker.alive, "the worker exited after RabbitMQ closed its channel:\n" + worker.log_tail(15)
    # and it reads again: a new channel on a new connection
    assert len(await cluster.collect("offline-user", 2, timeout=30)) == 24


def test_a_worker_whose_queue_the_broker_refuses_at_start_exits_saying_so(tmp_path):
    """A channel error before the worker consumes (its queue declared earlier with other arguments,
    a vhost that refuses it access) is no broker hiccup: it comes back at every connection.  Retried
    as a lost connection (broker_channel_error_retry), it made the worker reconnect five times a
    second for ever, logging "Connection to broker lost" with the error's traceback each time, and
    never become ready; it now exits, saying why, as it did before that setting."""
    with private_rabbit_cluster(tmp_path) as (cluster, _, _):
        with Connection(cluster.env["BROKER_URL"]) as conn:  # as if task_queue_max_priority had been set once
            conn.default_channel.queue_declare("collect", durable=True, auto_delete=False, arguments={"x-max-priority": 10})
        argv = [sys.executable, "-m", "celery", "-A", "worker", "worker", "-n", "refused@%h", "--loglevel=INFO", "--without-gossip", "--without-mingle", "-c", "1"]
        worker = launcher.Service("worker", argv, cluster.env, log_path=tmp_path / "worker.log")
        cluster.services.append(worker)  # stopped with the cluster
        worker.start()
        code = worker.wait(60)
        log = (tmp_path / "worker.log").read_text(errors="replace")
        assert code is not None, f"the worker still runs, {log.count('Connection to broker lost')} reconnections later:\n" + worker.log_tail(15)
        assert code != 0 and "inequivalent arg 'x-max-priority'" in log, log[-3000:]
        assert "queue 'collect' exists on the broker with other arguments" in log, log[-3000:]  # and what to do
        assert log.count("Connection to broker lost") == 0, log[-3000:]


@contextlib.contextmanager
def worker_on_private_redis(tmp_path, name: str):
    """A worker of ``dispatch`` alone (``name``) on a Redis broker of its own, with its cluster's
    routing Redis beside it; yields the cluster, the worker and a client of the broker, and
    stops them all."""
    import redis as redis_lib

    from tests.integration.conftest import Cluster

    routing = launcher.RedisServer(data_dir=tmp_path / "routing").start()
    broker = launcher.RedisServer(data_dir=tmp_path / "broker").start()
    client = redis_lib.Redis(port=broker.port)
    cluster = Cluster(routing, tmp_path, broker_url=broker.url(), auth_port=launcher.free_port(), HOUSEKEEPING_SECONDS=3600)
    try:
        yield cluster, cluster.start_worker(name, queues="dispatch", concurrency=1), client
    finally:
        client.close()
        cluster.stop(at_once=True)
        for server in (broker, routing):
            server.stop()


def assert_reads_dispatch_again(cluster, worker, client, timeout: float) -> None:
    """A task sent to ``dispatch`` is read by the worker within ``timeout`` seconds."""
    cluster.business.send_task("tasks.status", args=["not-an-id"], queue="dispatch", ignore_result=True)
    deadline = time.monotonic() + timeout
    while client.llen("dispatch") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert worker.alive and client.llen("dispatch") == 0, "the worker did not read again:\n" + worker.log_tail(15)


def test_a_worker_goes_on_after_its_redis_broker_was_a_replica_for_a_while(tmp_path):
    """A failover: the Redis broker is demoted to a replica and comes back as master.  Redis ends
    the worker's pending BRPOP (``UNBLOCKED``, while it consumes: retried) and answers the first
    write of its reconnection with ``READONLY``, a channel error before the worker consumes again.
    Taken for a queue the broker refuses at start, it stopped the worker ("Unrecoverable error:
    ReadOnlyError"); a worker that consumed before retries it, and reads again once the broker is
    a master."""
    other = launcher.RedisServer(data_dir=tmp_path / "other").start()
    try:
        with worker_on_private_redis(tmp_path, "failover") as (cluster, worker, client):
            client.execute_command("REPLICAOF", "127.0.0.1", other.port)
            time.sleep(4)
            assert worker.alive, "the worker exited while its broker was a replica:\n" + worker.log_tail(15)
            client.execute_command("REPLICAOF", "NO", "ONE")
            assert_reads_dispatch_again(cluster, worker, client, 20)
    finally:
        other.stop()


def test_a_worker_whose_channel_error_keeps_coming_back_reconnects_less_and_less_often(tmp_path):
    """Once the worker consumed, a channel error is retried as a lost connection; one that comes
    back at every connection (here the ``dispatch`` queue's key set to a string: ``WRONGTYPE``)
    made it reconnect five times a second until fixed (25 times in 5 s), each time with Celery's
    warning and traceback.  The delay now doubles from the second retry on (0, 1, 2, 4 s ...), the
    log says once per retry what is wrong, and the worker reads again once the key is gone."""
    with worker_on_private_redis(tmp_path, "wrongtype") as (cluster, worker, client):
        before = worker.log_path.read_text(errors="replace")
        client.set("dispatch", "not a list")

        def since_set() -> str:
            return worker.log_path.read_text(errors="replace")[len(before):]
        deadline = time.monotonic() + 15  # a loaded machine may be slow to retry: waited for, not timed
        while since_set().count("Connected to redis") < 2:
            assert worker.alive and time.monotonic() < deadline, "the worker did not connect again:\n" + worker.log_tail(15)
            time.sleep(0.1)
        time.sleep(2.5)
        log = since_set()
        assert worker.alive, "the worker exited:\n" + worker.log_tail(15)
        # the first retry at once, then after 1 s and 2 s: by then two or three connections (the old code: about 17 in 3.5 s)
        assert 2 <= log.count("Connected to redis") <= 4, log[-3000:]
        assert "holds another type than the list the worker reads as a queue" in log, log[-3000:]
        assert log.count("Connection to broker lost") == 1 and log.count("Traceback") == 1, log[-3000:]
        client.delete("dispatch")
        assert_reads_dispatch_again(cluster, worker, client, 10)  # the next retry is due 4 s after the last


def consumers_of(conn: Connection, queue: str) -> int | None:
    """Consumers of ``queue`` on the broker, or None when it does not exist."""
    channel = conn.channel()
    try:
        return channel.queue_declare(queue, passive=True).consumer_count
    except conn.channel_errors:
        return None
    finally:
        channel.close()  # a 404 closed it already: a no-op then


def wait_for_consumer(conn: Connection, queue: str, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if consumers_of(conn, queue):
            return True
        time.sleep(0.002)
    return False


async def test_a_worker_whose_queue_is_deleted_while_it_consumes_declares_and_consumes_it_again(tmp_path):
    """RabbitMQ cancels the consumers of a queue deleted (to purge it, to declare it with other
    arguments) or whose leader moved.  py-amqp raises ConsumerCancelled, which Celery took for a
    lost connection (a reconnection, with Celery's warning and traceback), except in the first
    tenth of a second on a connection, where Celery's first drain swallows it: the worker then
    consumed nothing from the queue, said nothing, and nobody declared it again (business code's
    tasks sent to it were dropped).  A queue deleted twice, the second time right after the worker
    came back, hit that.  The worker now declares and consumes the queue again each time, with one
    warning, on the same connection."""
    with private_rabbit_cluster(tmp_path) as (cluster, _, _):
        worker = launcher.start_worker({**cluster.env, "HOUSEKEEPING_SECONDS": "3600"}, log_path=cluster.logs / "worker.log", concurrency=1)
        cluster.services.append(worker)
        started = len(worker.log_path.read_text(errors="replace"))
        with Connection(cluster.env["BROKER_URL"]) as conn:
            for _ in range(2):
                conn.default_channel.queue_delete("collect")
                assert wait_for_consumer(conn, "collect", 5), "nothing consumes collect again:\n" + worker.log_tail(15)
        assert len(await cluster.collect("offline-user", 1, timeout=10)) == 24
        log = worker.log_path.read_text(errors="replace")[started:]
        assert log.count("queue 'collect' was deleted on the broker") == 2, log[-3000:]
        assert "Connection to broker lost" not in log and "Traceback" not in log, log[-3000:]

"""Reads this node's own queue on a thread and hands each batch to the IOLoop.

Threading: :class:`NodeQueueConsumer` runs its kombu connection on one dedicated thread (kombu
channels are not thread-safe).  The only way into the loop is ``IOLoop.add_callback`` on the loop
captured at construction.  The thread reads on while the loop writes, up to :data:`IN_FLIGHT`
batches ahead of it (:class:`InFlight`: backpressure).  It does not wait for each write: every
wake-up of a waiting thread is a futex call and, on a virtual machine, often a wake-up of another
virtual CPU; waiting for each batch cost a node about 8% of its CPU per delivery in the 2-node
batch benchmark (bench/HISTORY.md, 2026-12-06 16:05).  The broker connection is re-opened with
a doubling delay (0.5 s up to 30 s) when it drops; what was read before the drop is still
delivered.  A connection it gave up on while it consumed may have taken messages with it (below):
the consumer then tells the loop (``on_lost``) before it delivers anything read on the next
connection.

Messages are consumed without acknowledgements (``no_ack``): the broker forgets a message once
the node has read it.  On the Redis broker an acknowledged message costs two more round trips
(recording it as unacknowledged, then the ack), about a fifth of a node's CPU, and a
``wsnode.deliver`` batch needs no broker-side safety net: its messages are in the store, a node
that dies drops its clients, who resume elsewhere with ``since``, and a message lost on its way to
a client that stays connected is redelivered by housekeeping (``REDELIVER_AFTER``).  The broker also
forgets what it handed to a connection that the node then gives up on because the broker stopped
answering (a read timed out, AMQP heartbeats missed, the Redis broker's channel gave up on a
read: a network cut, a stalled broker), or that was reset (:func:`reset`: a proxy or load balancer
in the path that restarts drops what it held): RabbitMQ's deliveries pushed to the socket, the Redis
broker's reply to the ``BRPOP`` in flight, on their way when the connection was dropped.  Redelivery brings such a message back only while
no other device of its user acked it; so the node closes its connections (``on_lost``), before
anything newer reaches them and moves their ``since`` past it, and they resume with ``since``.  A
broker that closes the connection itself (a restart: an EOF) sends what it handed over first: the node
reads it, and closes nothing for it.

Having no unacknowledged messages of its own, the node's connection also skips kombu's scan that
puts back the messages other consumers took and never acknowledged (:data:`TRANSPORT_OPTIONS`):
on the Redis broker kombu runs it from every tenth empty poll, and a node polls empty after
nearly every batch, so the scan (a new Redis client, a lock, a sorted-set read) cost about a
sixth of the node's CPU per queue message at a few hundred messages a second.  The Celery
workers run that scan every 10 s (``worker.py``), which is what brings back a dead worker's tasks.

A batch is what the queue held when the first message came, and, when the node is busy, what
arrives within the next 2 ms (:class:`GatherWindow`): one hand-over to the loop for many messages
under load, none of that wait for a message that comes alone.

Given a Celery node name (``hostname``), the consumer also keeps the node present in Celery's
monitoring (:mod:`wsnode.presence`: Flower lists it as a worker consuming this queue, and each
delivered batch as ``wsnode.deliver`` tasks while task events are on).  That runs on a thread and
connection of its own, started and stopped with the consumer; this thread only reports each batch
to it, which never blocks.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable

import redis.exceptions
from amqp.exceptions import ConsumerCancelled

import redislogin
import settings
from tasks import wirejson
from tasks.queues import BadDelivery, Delivery, node_queue, parse_delivery  # noqa: F401 - re-exported
from wsnode.presence import Presence

log = logging.getLogger(__name__)

#: kombu transport options of the node's queue connection, on top of the app's
#: ``broker_transport_options``: ``unacked_restore_throttle`` makes kombu's Redis transport run its
#: restore scan on one empty poll in that many (see the module docstring).  Other transports
#: ignore it.
TRANSPORT_OPTIONS = {"unacked_restore_throttle": 1_000_000_000}

#: AMQP heartbeat of the node's queue connection, in seconds: with none, a RabbitMQ broker that
#: stopped answering without closing the connection (a network partition) left the consumer
#: waiting for ever while it still counted as connected (``/healthz`` 200, nothing read).  The
#: consumer takes the connection for lost once nothing came from the broker for two of these
#: (py-amqp's rule), and connects again.  The Redis transport ignores it (its commands time out:
#: ``socket_timeout`` in ``worker.py``).  ``BROKER_TIMEOUT``: 10 s by default.
HEARTBEAT_SECONDS = settings.BROKER_TIMEOUT


#: Batches the queue thread may have handed to the loop that the loop has not written yet.
IN_FLIGHT = 2

#: Seconds the queue thread waits for the loop to write a batch before it logs the loop as stuck
#: (and hands it the next batch all the same, as before it waited).
STUCK_AFTER = 30.0


class InFlight:
    """The batches handed to the loop and not yet written: the queue thread takes a place before
    it hands one over, waiting while ``limit`` are out, and the loop gives it back once the batch
    is written.  ``take`` is the queue thread's, ``give_back`` the loop's (it never waits),
    ``drained`` any thread's but the loop's."""

    def __init__(self, limit: int = IN_FLIGHT) -> None:
        self.limit = limit
        self._out = 0
        self._changed = threading.Condition()

    def take(self, timeout: float) -> bool:
        """Take a place, waiting up to ``timeout`` seconds for one.  False when that timed out: the
        place is taken all the same (one more is out), so that a loop that is stuck is reported, not
        waited for without end."""
        with self._changed:
            free = self._changed.wait_for(lambda: self._out < self.limit, timeout)
            self._out += 1
            return free

    def give_back(self) -> None:
        with self._changed:
            self._out -= 1
            self._changed.notify_all()  # no futex call unless the queue thread waits

    def drained(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds until every batch handed over was written."""
        with self._changed:
            return self._changed.wait_for(lambda: self._out == 0, timeout)

    @property
    def out(self) -> int:
        return self._out


class GatherWindow:
    """How long the queue thread waits for more messages once a batch has its first.  Pure; the
    consumer thread only.

    It waits ``seconds`` only when the first message came less than ``seconds`` after the previous
    batch was handed over: messages queued while the loop wrote that batch (a busy node) are
    gathered into the next, while a message that comes alone after a quiet spell (1,000 msg/s in
    batches of 10 is one queue message per node every 10 ms) goes to the loop at once, not 2 ms
    later.  Waiting after a lone message gathered nothing in either case.
    """

    def __init__(self, seconds: float = 0.002) -> None:
        self.seconds = seconds
        self._handed_over = float("-inf")

    def handed_over(self, at: float) -> None:
        """A batch went to the loop at monotonic time ``at``."""
        self._handed_over = at

    def wait(self, first_at: float) -> float:
        """Seconds to wait for more, given the monotonic time the batch's first message came."""
        return self.seconds if first_at - self._handed_over < self.seconds else 0.0


def timed_out(exc: BaseException) -> bool:
    """Whether ``exc`` is a read (or connect) of the broker connection that timed out: the
    broker stopped answering, and what it had sent may still be on its way.  redis-py raises its
    own ``TimeoutError`` (not Python's); py-amqp and sockets raise Python's.  Pure."""
    return isinstance(exc, (TimeoutError, redis.exceptions.TimeoutError))


def reset(exc: BaseException | None) -> bool:
    """Whether ``exc`` is, or was raised while handling, a connection reset (RST): the path to
    the broker (a proxy, a load balancer, a NAT that restarts) or the broker dropped the
    connection without delivering what was on its way, unlike a close (EOF), after which every
    byte sent first was read.  redis-py raises its own ``ConnectionError`` inside the handler of
    the socket's ``ConnectionResetError``; py-amqp lets it through.  Pure."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, ConnectionResetError):
            return True
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return False


class NodeQueueConsumer:
    def __init__(self, app, address: str, loop, deliver: Callable[[list[Delivery]], None], batch_max: int = 256,
                 hostname: str | None = None, on_lost: Callable[[str], None] | None = None) -> None:
        self._app = app
        self._queue = node_queue(address)
        self._loop = loop
        self._deliver = deliver
        #: Called on the loop, with what broke it, once a connection that consumed was lost (see the module).
        self._on_lost = on_lost
        self._batch_max = batch_max
        self._stopping = threading.Event()
        self._pending: list[Delivery] = []
        #: The consumer thread's: this connection's AMQP heartbeat check failed.
        self._heartbeats_missed = False
        self._thread = threading.Thread(target=self._run, name=f"queue-{address}", daemon=True)
        self._received_at = 0.0
        self._window = GatherWindow()
        self._in_flight = InFlight()
        #: True while the consumer holds a working broker connection (read from any thread).
        self.connected = False
        #: What to fix when the broker's Redis refused the last connection's login, rights or
        #: certificate (:func:`redislogin.refused`, for BROKER_URL), else None (read from any thread).
        self.refused: str | None = None
        #: The node's presence in Celery's monitoring, when started with a ``hostname``.
        self.presence = (Presence(app, hostname, self._queue, consuming=lambda: self.connected, prefetch=batch_max)
                         if hostname else None)

    def start(self) -> None:
        self._thread.start()
        if self.presence is not None:
            self.presence.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop after the batch in hand, wait until the loop has written what it was handed, then
        stop the presence (its last events and ``worker-offline``); any thread but the loop's (it
        waits on the loop)."""
        self._stopping.set()
        self._thread.join(timeout)
        self._in_flight.drained(timeout)
        if self.presence is not None:
            self.presence.stop()

    def _on_raw(self, message) -> None:
        """Consumer thread.  Decodes the body itself, with orjson (:mod:`tasks.wirejson`): kombu's
        ``json`` decoder runs a Python hook on every object (about 1.45 µs per envelope here,
        0.32 with orjson).  Anything but uncompressed JSON goes through kombu's decoding,
        which accepts only JSON (``accept``), as before."""
        try:
            if message.content_type == wirejson.CONTENT_TYPE and not message.headers.get("compression"):
                body = wirejson.loads(message.body)
            else:
                body = message.decode()
        except Exception as exc:  # noqa: BLE001 - anything undecodable is dropped and logged, the thread goes on
            self._on_decode_error(message, exc)
            return
        self._on_message(body, message)

    def _on_message(self, body, message) -> None:
        try:
            delivery = parse_delivery(message.headers, body)
        except BadDelivery as exc:
            log.error("dropped a malformed message from %s: %s", self._queue.name, exc)
            return
        delivery.message = message  # its headers name the task in Flower
        if not self._pending:
            self._received_at = time.time()
        self._pending.append(delivery)

    def _on_decode_error(self, message, exc: Exception) -> None:
        log.error("dropped an undecodable message from %s: %s", self._queue.name, exc)

    def _run(self) -> None:
        delay = 0.5
        while not self._stopping.is_set():
            lost: str | None = None  # what broke a connection that consumed
            try:
                with self._app.connection_for_read(transport_options=TRANSPORT_OPTIONS, heartbeat=HEARTBEAT_SECONDS) as conn:
                    conn.ensure_connection(max_retries=1)
                    try:
                        with conn.Consumer([self._queue], on_message=self._on_raw, accept=["json"], no_ack=True):
                            self.connected, delay, self.refused, self._heartbeats_missed = True, 0.5, None, False
                            log.info("consuming queue %s", self._queue.name)
                            self._consume(conn)
                    except Exception as exc:
                        # Drop the connection without a word to the broker: closing it politely
                        # waits, without a timeout on AMQP, for an answer that a broker that
                        # stopped answering never sends.
                        if self.connected and (self._heartbeats_missed or timed_out(exc) or reset(exc)):
                            lost = str(exc) or type(exc).__name__
                        self.connected = False
                        conn.collect()
                        raise
            except Exception as exc:  # noqa: BLE001 - the loop must survive any broker failure
                if self._stopping.is_set():
                    break
                if isinstance(exc, ConsumerCancelled):
                    log.warning("queue %s: RabbitMQ cancelled this node's consumer: the queue was deleted (housekeeping deletes the queue "
                                "of a node whose lease lapsed: was this node cut off from Redis?); declaring and consuming it again in %.1f s",
                                self._queue.name, delay)
                else:
                    self.refused = redislogin.refused(exc, ("BROKER_URL",))
                    if self.refused is not None:  # the password, the rights or the certificate changed: waiting alone does not end it
                        log.warning("queue %s: %s; retrying in %.1f s", self._queue.name, self.refused, delay)
                    else:
                        log.warning("queue %s: broker connection lost (%s); retrying in %.1f s", self._queue.name, exc, delay)
            finally:
                self.connected = False
                if self._pending:  # read already: the broker no longer has them
                    self._flush()
                # After what was read, before what the next connection reads (add_callback keeps the order).
                if lost is not None and self._on_lost is not None and not self._stopping.is_set():
                    self._loop.add_callback(self._on_lost, lost)
            self._stopping.wait(delay)
            delay = min(delay * 2, 30.0)

    def _consume(self, conn) -> None:
        channel = conn.default_channel
        abandoned = getattr(channel, "abandoned_reads", 0)
        while not self._stopping.is_set():
            try:
                conn.drain_events(timeout=0.5)
            except socket.timeout:
                self._heartbeat(conn)  # after the read: a frame read counts as a heartbeat
                abandoned = self._check_abandoned(channel, abandoned)
                continue
            self._heartbeat(conn)  # sends ours when due: a no_ack consumer sends nothing else
            abandoned = self._check_abandoned(channel, abandoned)
            wait = self._window.wait(time.monotonic())
            while wait and len(self._pending) < self._batch_max:
                try:
                    conn.drain_events(timeout=wait)
                except socket.timeout:
                    break
            if self._pending:
                self._flush()
                self._window.handed_over(time.monotonic())

    def _check_abandoned(self, channel, seen: int) -> int:
        """The Redis broker's channel gave up on a read's reply without a word to this thread
        (``tasks.redis_transport.Channel.abandoned_reads``: kombu dropped a connection whose
        ``BRPOP`` got no reply, and read on, on a new one): tell the loop, as for a connection
        given up on, before the batch in hand is written.  Returns the count seen now."""
        now = getattr(channel, "abandoned_reads", 0)
        if now > seen and self._on_lost is not None:
            self._loop.add_callback(self._on_lost, "the Redis broker's BRPOP got no reply; kombu dropped its connection and read on")
        return now

    def _heartbeat(self, conn) -> None:
        """kombu's ``heartbeat_check`` (AMQP; other transports do nothing), noting when it raises:
        the broker's heartbeats stopped coming (or ours could not be sent), so the connection is
        given up on as one that stopped answering."""
        try:
            conn.heartbeat_check()
        except Exception:
            self._heartbeats_missed = True
            raise

    def _flush(self) -> None:
        batch, self._pending = self._pending, []
        if not self._in_flight.take(timeout=STUCK_AFTER):
            log.error("the IOLoop has not written a batch of queue %s in %.0f s: it is blocked (py-spy dump --pid %d shows where); "
                      "handing it the next %d messages all the same", self._queue.name, STUCK_AFTER, os.getpid(), len(batch))
        self._loop.add_callback(self._deliver_on_loop, batch, self._received_at, time.time())

    def _deliver_on_loop(self, batch: list[Delivery], received: float, started: float) -> None:
        """Loop thread: write ``batch``, give its place back, report it to the presence."""
        error = None
        try:
            self._deliver(batch)
        except Exception as exc:  # noqa: BLE001 - logged; housekeeping redelivers what no client acked
            log.exception("delivering a batch of %d messages failed", len(batch))
            error = repr(exc)
        finally:
            self._in_flight.give_back()
        if self.presence is not None:
            self.presence.delivered(batch, received, started, time.time(), error)

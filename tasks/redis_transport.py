"""kombu's Redis transport, with fewer round trips and client objects per message.

Three changes to kombu's Redis channel, each for a cost a worker's main process paid per task:
one client object per channel, a backlog read in one round trip, a batch acked in one round trip;
and a fourth, so that an item of a queue that is not a message cannot stop the process.

kombu's Redis channel builds a new ``redis.Redis`` object every time it sends a group of
commands (``Channel.conn_or_acquire``): to record a task it delivered as unacknowledged, to
acknowledge it, for every publish batch, for every queue declaration.  The object is only a handle
on the channel's connection pool, but redis-py 8 fills a table of about 170 response callbacks in
each one, which costs about 0.15 ms of CPU on a fast machine (0.16 ms measured on the 2-core VM of
``bench/HISTORY.md``).  A worker's main process builds two of them per task it receives, and in
single-message mode that was about 30% of its CPU per message (``bench/HISTORY.md``).

:class:`Channel` builds that handle once, on first use, and hands the same one out ever after;
everything else is kombu's.  It is safe because kombu only calls commands and makes pipelines on
it (each takes a connection from the pool and gives it back) and never changes it; the channel's
own long-lived clients (``client`` for ``BRPOP``, ``subclient`` for pub/sub) are untouched.

kombu also spends two round trips per message a worker receives, one after the other: the
``BRPOP`` that takes it, then a transaction recording it as unacknowledged.  When a queue holds a
backlog, :class:`Channel` takes the messages waiting behind the one ``BRPOP`` brought in the same
round trip as that record (:mod:`tasks.backlogread`).

An item of a queue's list that is not a kombu message is logged and dropped
(:func:`tasks.queueitems.kombu_message`): kombu's channel raised on it, out of the worker's event
loop, which stopped the worker; a push node's consumer took it for a lost broker connection.  One
that lacks only kombu's bookkeeping (a delivery tag, a ``delivery_info``: a producer that is not
Celery) has it supplied as it is read (:func:`tasks.queueitems.with_bookkeeping`), by ``BRPOP``
and by ``basic_get`` (the hand-back of a node's queue, ``tasks.reclaim``) alike, and one dropped
that names a task id is handed to the worker's consumer, which stores that task's failure
(``BacklogRead.on_dropped``).

And a fifth, for a push node: :attr:`Channel.abandoned_reads` counts the ``BRPOP`` replies the
channel gave up on without reading them: kombu drops the connection of a ``BRPOP`` that got no reply
for ``brpop_timeout + health_check_interval`` seconds (a network cut, a stalled Redis) and reads
on, on a new connection, without a word to its caller.  A reply on its way then held a message
Redis had already popped; the node reads its queue without acknowledgements, so that message is
gone, and the node's consumer (``wsnode.consumer``) closes its connections for it.

And a sixth, for a connection lost while its ``BRPOP`` waited, on a reset Redis never saw (a NAT
or load balancer dropping its state): :meth:`Channel.close` ends that client in Redis, or waits
its ``BRPOP`` out, before it pushes back what it held unacknowledged (:mod:`tasks.lostbrpop`).

And a seventh: a publish on a channel kombu closed meanwhile raises a connection error, which
kombu's publish retry takes, instead of ``AttributeError`` (:meth:`Channel.basic_publish`).

kombu acknowledges one message per round trip too (a pipeline removing it from the unacked index
and hash).  :func:`acknowledge` acknowledges a group of Celery requests with one such pipeline per
channel: ``tasks.collect`` acks each batch of requests with it once the batch ran.

``worker.py`` installs it (:func:`install`) as kombu's transport for ``redis://`` and ``rediss://``
(TLS) URLs, in every process that imports the app: workers, push nodes, Flower (``celery -A worker
flower``).  It replaces the ``redis`` and ``rediss`` entries of kombu's alias table
(``kombu.transport.TRANSPORT_ALIASES``), not Celery's ``broker_transport`` setting: with the alias,
connection URLs keep their scheme, which is what Flower's Broker page reads to find the queues (a
class path there became the URL's scheme, and the page answered 404).  Over TLS, kombu's channel
connects with redis-py's ``SSLConnection`` and the URL's ``ssl_*`` options, as it does for its own
transport (this one only adds to kombu's channel).  ``amqp://`` keeps kombu's own transport.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from queue import Empty

import kombu.transport
import redis
from kombu.transport import redis as kombu_redis
from kombu.transport import virtual
from kombu.utils.encoding import bytes_to_str
from kombu.utils.json import dumps, loads
from kombu.utils.url import parse_url

from tasks.backlogread import BacklogRead, record
from tasks.queueitems import kombu_message, route_back, with_bookkeeping
from tasks.lostbrpop import LostBrpop

log = logging.getLogger(__name__)

#: kombu's aliases that :func:`install` points at :class:`Transport`: plain and TLS.  Until
#: 2026-12-05 only ``redis``: a ``rediss://`` broker ran on kombu's stock transport, without any
#: of this module's changes.
ALIASES = ("redis", "rediss")


class QoS(kombu_redis.QoS):
    """kombu's Redis QoS (acks emulated with an unacked index and hash), plus :meth:`forget`, and
    no second record of the messages the channel's read recorded already (:attr:`recorded`).

    Like every kombu channel object, used from the thread that owns the connection only (the
    worker's main process loop)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        #: Delivery tags already removed from Redis by :meth:`forget`, whose ack is local only.
        self._forgotten: set = set()
        #: Delivery tags the channel's read already recorded as unacknowledged in Redis.
        self.recorded: set = set()

    #: The queue the channel's read is delivering from (set around its delivery), or None.
    read_from: str | None = None

    def append(self, message, delivery_tag) -> None:
        if delivery_tag in self.recorded:
            self.recorded.discard(delivery_tag)
            virtual.QoS.append(self, message, delivery_tag)  # the local bookkeeping kombu's append ends with
            return
        if self.read_from is None:
            super().append(message, delivery_tag)
            return
        # kombu's append, recording the queue the message was read from (tasks.backlogread.record)
        with self.pipe_or_acquire() as pipe:
            pipe.zadd(self.unacked_index_key, {delivery_tag: time.time()}).hset(self.unacked_key, delivery_tag, record(dumps(message._raw), self.read_from)).execute()
            virtual.QoS.append(self, message, delivery_tag)

    def restore_unacked(self, client=None):
        """kombu 5.7's ``QoS.restore_unacked`` (what a channel's close calls: a worker's warm
        shutdown, a consumer collecting its connection), except that it puts the messages back
        newest first.  Each goes to the end of the queue that reads take from, so kombu's oldest
        first put the oldest deepest: the next worker ran what this one had read and not started in
        reverse, and one user's requests, sent in order by one business process, got their ids
        (and arrived) in reverse order.  ``restore_visible`` (a dead worker's, after the
        visibility timeout) already reads its records newest first."""
        with self.channel.conn_or_acquire(client) as client:
            for tag in reversed(list(self._delivered)):
                self.restore_by_tag(tag, client=client)
        self._delivered.clear()

    def restore_by_tag(self, tag, client=None, leftmost=False) -> None:
        """kombu 5.7's ``QoS.restore_by_tag``, except that a record it cannot read as [message,
        exchange, routing key] is logged and removed instead of raising.  kombu's raised out of
        ``restore_visible`` (and ``restore_unacked``) on such a record every time it reached it, so
        no message recorded before it was ever restored again, by any worker; the read of this
        transport left such records before it checked items as Python reads them."""

        def restore_transaction(pipe):
            p = pipe.hget(self.unacked_key, tag)
            pipe.multi()
            self._remove_from_indices(tag, pipe)
            if p:
                try:
                    M, EX, RK = loads(bytes_to_str(p))  # json is unicode
                except Exception as exc:  # noqa: BLE001 - whatever kombu's decoder raises on it: removed above
                    log.error("removed the unacked record of delivery tag %r: it is not [message, exchange, routing key] "
                              "as kombu writes it (%r), so what it recorded cannot be restored: %.200r", bytes_to_str(tag), exc, p)
                    return
                self.channel._do_restore_message(M, EX, RK, pipe, leftmost)

        with self.channel.conn_or_acquire(client) as client:
            client.transaction(restore_transaction, self.unacked_key)

    def _remove_from_indices(self, delivery_tag, pipe=None):
        """kombu's, on a pipeline without MULTI when none is given (an ack, a reject): see :meth:`unrecord`."""
        return self.unrecord(delivery_tag, pipe=pipe)

    def unrecord(self, *tags, pipe=None):
        """``pipe`` with the removal of ``tags`` from the unacked index and hash queued, for the
        caller to execute; without ``pipe``, a pipeline without MULTI on the channel's command
        client: Redis 7 refuses every command queued in a MULTI while it is over ``maxmemory``,
        even ZREM and HDEL, which free memory, so kombu's ack raised out of the worker's loop, which
        reconnected to the broker (five times a second) for as long as Redis was full.  Sent
        alone, they are allowed."""
        if pipe is None:
            pipe = self.channel._command_client_now().pipeline(transaction=False)
        return pipe.zrem(self.unacked_index_key, *tags).hdel(self.unacked_key, *tags)

    def forget(self, tags: Iterable) -> None:
        """Remove the delivered messages ``tags`` from the unacked index and hash in one round
        trip, so that their :meth:`ack` right after needs none.  Call it only right before acking
        them: a message forgotten and then rejected or restored is not in Redis any more."""
        tags = [tag for tag in tags if tag in self._delivered and tag not in self._forgotten]
        if not tags:
            return
        self.unrecord(*tags).execute()
        self._forgotten.update(tags)

    def ack(self, delivery_tag) -> None:
        if delivery_tag in self._forgotten:
            self._forgotten.discard(delivery_tag)
            virtual.QoS.ack(self, delivery_tag)  # the local bookkeeping kombu's ack ends with
            return
        super().ack(delivery_tag)


class Channel(BacklogRead, LostBrpop, kombu_redis.Channel):
    """kombu's Redis channel with this module's changes; its parts are :class:`BacklogRead` (the
    backlog read) and :class:`LostBrpop` (a ``BRPOP`` whose connection was lost)."""

    QoS = QoS
    _command_client = None
    #: ``BRPOP`` replies given up on unread: the connection that awaited one was dropped other than by
    #: reading it (kombu's stale-connection check).  Read by the node's consumer thread.
    abandoned_reads = 0
    #: True while :meth:`_brpop_read` reads a reply: a failure there reaches the caller as an error.
    _reading_brpop = False

    def __init__(self, *args, **kwargs) -> None:
        #: Queues whose consumer acknowledges (the others are read one message per BRPOP).
        self._acked_queues: set[str] = set()
        super().__init__(*args, **kwargs)

    def basic_consume(self, queue, no_ack, *args, **kwargs):
        # kombu keeps one callback per queue, the last consumer's: so does this.
        (self._acked_queues.discard if no_ack else self._acked_queues.add)(queue)
        return super().basic_consume(queue, no_ack, *args, **kwargs)

    def basic_publish(self, message, exchange, routing_key, **kwargs):
        """kombu's, on an open channel.  On one kombu closed meanwhile it raises a connection
        error, which the publish's retry (``Connection.ensure``) answers by publishing again on
        a new channel: kombu's ``Producer._publish`` takes its channel, then declares the queue
        with retries of its own, and when Redis fails that declaration (a restart: refused, or
        ``LOADING``) that retry reconnects and closes the very channel ``_publish`` then
        publishes on.  kombu's raised ``AttributeError`` (the closed channel has no connection),
        which no retry takes: a Collect batch handing its stored messages to ``tasks.dispatch``
        during a Redis restart failed its requests at once instead of waiting for Redis."""
        if self.connection is None:
            raise redis.ConnectionError(f"the broker channel was closed while it published to {routing_key or exchange!r} "
                                        "(its connection was lost and made again): publishing on a new channel")
        return super().basic_publish(message, exchange, routing_key, **kwargs)

    def basic_cancel(self, consumer_tag):
        queue = self._tag_to_queue.get(consumer_tag)
        result = super().basic_cancel(consumer_tag)
        if queue is not None and queue not in self._tag_to_queue.values():
            self._acked_queues.discard(queue)
        return result

    def _on_connection_disconnect(self, connection):
        if connection is not None and self._in_poll is connection and not self._reading_brpop:
            self.abandoned_reads += 1
        super()._on_connection_disconnect(connection)

    def _brpop_start(self, timeout=None):
        self._identify_brpop_connection()
        super()._brpop_start(timeout)

    def _brpop_read(self, **options):
        """kombu 5.7's ``Channel._brpop_read``, delivering with the message ``BRPOP`` brought
        those :meth:`_take_more` took behind it."""
        try:
            try:
                self._reading_brpop = True
                dest__item = self.client.parse_response(self.client.connection, "BRPOP", **options)
            except self.connection_errors:
                # if there's a ConnectionError, disconnect so the next iteration reconnects
                # (redis-py dropped the socket already: the BRPOP went on the one identified last)
                if self._brpop_client:
                    self._lost_brpop_client = self._brpop_client[1:]
                self.client.connection.disconnect()
                self._brpop_lost_at = getattr(self, "_brpop_sent_at", None)
                raise
            finally:
                self._reading_brpop = False
            if not dest__item:
                raise Empty()
            key, item = dest__item
            dest = bytes_to_str(key).rsplit(self.sep, 1)[0]
            self._queue_cycle.rotate(dest)
            payload, raw = self._read_item(bytes_to_str(item), dest)
            if payload is None:
                return True
            payloads = [payload, *self._take_more(key, dest, raw, payload)]
            delivered = 0
            qos = self.qos
            try:
                qos.read_from = dest
                for payload in payloads:
                    route_back(payload, dest)
                    self.connection._deliver(payload, dest)
                    delivered += 1
            except BaseException:
                # The one whose callback raised is in kombu's unacked list (restored at close, as
                # kombu's own); the ones behind it were recorded by the read but never delivered.
                self._put_back(payloads[delivered + 1:])
                raise
            finally:
                qos.read_from = None
                # a message recorded and not delivered comes back after the visibility timeout;
                # kombu's own QoS (ack_emulation off) has no record of them
                recorded = getattr(self.qos, "recorded", None)
                if recorded is not None:
                    recorded.clear()
            return True
        finally:
            self._in_poll = None
            self._flush_brpop_reauth()

    def _read_item(self, raw: str, queue: str) -> tuple[dict | None, str]:
        """``(payload, raw)``: the item ``raw`` of ``queue``'s list decoded as a kombu message,
        with the bookkeeping a producer that is not Celery left out supplied, before the message
        is recorded, so that its record holds them too (``raw`` then is the item with them); or
        ``(None, raw)`` for an item that is no message, which is dropped (:meth:`_drop`)."""
        payload = kombu_message(raw)
        if payload is not None:
            return payload, raw
        amended = with_bookkeeping(raw, queue, self._next_delivery_tag())
        payload = None if amended is None else kombu_message(amended)
        if payload is None:
            self._drop(queue, raw, amended)
            return None, raw
        return payload, amended

    def _get(self, queue):
        """kombu 5.7's ``Channel._get`` (what ``basic_get`` reads: the hand-back of a node's
        queue, ``tasks.reclaim``), reading each item as :meth:`_brpop_read` does
        (:meth:`_read_item`); one that is no message is dropped and the next one read.  kombu's
        decoded what it popped, and raised on an item that is no message (its decoder) or lacks
        kombu's bookkeeping (its Message: KeyError ``delivery_tag``): out of the hand-back, with
        the item lost and nothing behind it handed back in that run.  An empty item is one too
        (kombu's took it for the end of the list: the hand-back stopped with messages behind it,
        and deleted a dead node's queue with them on it)."""
        with self.conn_or_acquire() as client:
            for pri in self.priority_steps:
                while (item := client.rpop(self._q_for_pri(queue, pri))) is not None:
                    self._maybe_update_queues_expire(client, queue)
                    payload, _ = self._read_item(bytes_to_str(item), queue)
                    if payload is not None:
                        route_back(payload, queue)
                        return payload
            self._maybe_update_queues_expire(client, queue)
            raise Empty()

    def _do_restore_message(self, payload, exchange, routing_key, pipe, leftmost=False):
        """kombu 5.7's, for a message whose headers are empty but not an object too (``null``,
        as gocelery pushes every message; ``[]``, ``""``: :func:`tasks.queueitems.item_problem`
        lets those through, and kombu's ``Message`` reads them as ``{}``).  kombu's marks the
        message it puts back with ``headers["redelivered"]``, which raised on them ("Could not
        restore message", a TypeError it only logs), after its record was removed: the message was
        lost when the worker stopped or died holding it.  Those headers are restored as ``{}``."""
        if isinstance(payload, dict) and "headers" in payload and not isinstance(payload["headers"], dict) and not payload["headers"]:
            payload["headers"] = {}
        return super()._do_restore_message(payload, exchange, routing_key, pipe, leftmost)

    def _put_back(self, payloads: list) -> None:
        """Push the messages ``payloads``, recorded as unacknowledged and never delivered, back
        where the next read takes them, in their order: when a callback raised on a message of a
        read, those behind it stayed recorded, and came back only after the visibility timeout
        (a minute), out of order, not even when the channel closed."""
        for payload in reversed(payloads):
            try:
                self.qos.restore_by_tag(payload["properties"]["delivery_tag"])
            except Exception as exc:  # noqa: BLE001 - it comes back after the visibility timeout, as before
                log.warning("could not put back a message read and not delivered (%s): it comes back after the visibility timeout", exc)

    @contextmanager
    def conn_or_acquire(self, client=None) -> Iterator:
        if client:
            yield client
            return
        if self._command_client is None:
            self._command_client = self._create_client()
        yield self._command_client

    def _command_client_now(self):
        """The channel's command client (:meth:`conn_or_acquire`'s)."""
        with self.conn_or_acquire() as client:
            return client

    def _disconnect_pools(self) -> None:
        # The command client is a handle on the pool being dropped: a later command gets a new one
        # on the channel's next pool, as kombu's per-command clients do.
        self._command_client = None
        super()._disconnect_pools()

    def close(self) -> None:
        """kombu 5.7's ``Channel.close``, which also completes when the ``BRPOP`` it reads first
        (the one in flight, so that a message it took is delivered rather than lost) fails on a
        connection the server closed.  kombu's raised there, before anything was released: the
        worker's consumer, reconnecting after Redis restarted, ignores that error, and the channel
        stayed open for good (its QoS is referenced by a ``multiprocessing.util.Finalize`` until
        the channel closes), with its command connection, in CLOSE_WAIT: one more socket in the
        worker's main process per Redis restart.  The lost ``BRPOP`` is ended in Redis, or else
        waited out before what the channel held unacknowledged is pushed back
        (:meth:`_wait_out_lost_brpop`)."""
        if self._in_poll and not self.closed:
            # Its one message, not a backlog: the consumer is still registered here, and what
            # the read delivered now would be pushed back by the restore below, and run twice.
            self._closing_read = True
            try:
                self._brpop_read()
            except Empty:
                pass
            except self.connection_errors as exc:
                log.info("closing a broker channel whose connection was lost: its pending BRPOP failed (%s)", exc)
            self._in_poll = None
        self._wait_out_lost_brpop()
        super().close()



class Transport(kombu_redis.Transport):
    """kombu's Redis transport with :class:`Channel`, whose poller is closed with its connection.

    kombu's transport makes an epoll object (``kombu.utils.eventio.poll``) for its
    ``MultiChannelPoller`` when it is made, one per broker connection, and never closes it: its
    file descriptor is freed only when the garbage collector frees the transport, which sits in
    reference cycles.  With ``gcpolicy`` (full collections rare) a push node, whose consumer
    drops its connection (``Connection.collect``) and opens a new one each time Redis restarts,
    held one more ``anon_inode:[eventpoll]`` per restart until a full collection ran.
    :meth:`close_connection` (what both ``Connection.release`` and ``Connection.collect`` call,
    right before kombu drops the transport) closes that epoll.  Only the transport's own: in a
    worker, ``register_with_event_loop`` points the poller at the event loop's, which is not
    the transport's to close."""

    Channel = Channel

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._own_poller = self.cycle.poller

    def close_connection(self, connection) -> None:
        try:
            super().close_connection(connection)
        finally:
            poller, self._own_poller = self._own_poller, None
            if poller is not None:
                poller.close()


def acknowledge(requests: Iterable) -> None:
    """``request.acknowledge()`` for each Celery request (``celery.worker.request.Request``), with
    the Redis side of those that came on this transport done in one round trip per channel rather
    than one each.  Worker main process (where requests are acked), from its event loop.  If that
    round trip fails, each request's own ack tries again and fails or logs as it always did."""
    requests = [req for req in requests if not req.acknowledged]
    tags_of: dict[QoS, list] = {}
    for req in requests:
        message = req.message
        qos = getattr(getattr(message, "channel", None), "qos", None)
        if isinstance(qos, QoS):
            tags_of.setdefault(qos, []).append(message.delivery_tag)
    for qos, tags in tags_of.items():
        try:
            qos.forget(tags)
        except Exception as exc:  # noqa: BLE001 - each ack below sends its own removal instead
            log.warning("acking %d messages in one round trip failed (%s); acking them one by one", len(tags), exc)
    for req in requests:
        req.acknowledge()


def ssl_options(url: str) -> dict | None:
    """The ``ssl_*`` options of a ``rediss://`` broker URL's query (the first of a failover list),
    as kombu reads them (``ssl_cert_reqs`` as an ``ssl`` constant), or None for any other URL.
    For Celery's ``broker_use_ssl``: kombu's connections take them from the URL themselves, but
    Flower's Broker page reads them from that setting alone (without it, its client checked the
    server's certificate against the system's CAs, not ``ssl_ca_certs``).  Pure."""
    first = url.split(";", 1)[0].strip()
    if not first.startswith("rediss://"):
        return None
    return parse_url(first).get("ssl") or None


def install() -> None:
    """Make ``redis://`` and ``rediss://`` connections of this process use :class:`Transport`;
    idempotent.  Call it before the first broker connection: kombu caches the class of each alias
    on first use, so the cached entries are dropped too."""
    for alias in ALIASES:
        kombu.transport.TRANSPORT_ALIASES[alias] = f"{__name__}:Transport"
        kombu.transport._transport_cache.pop(alias, None)

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
``BRPOP`` that takes it, then a transaction recording it as unacknowledged (a sorted set and a hash,
what brings it back if the worker dies).  When a queue holds a backlog, :class:`Channel` takes the
messages waiting behind the one ``BRPOP`` brought in the same round trip as that record: a Lua
script records the first message, pops up to the free part of the prefetch window more (``RPOP``
with a count, Redis 6.2 or later) and records them too, atomically, so no message is ever out of
the list without being recorded.  Without a backlog a message still costs its two round trips;
with one, a read of up to the window costs two.  Only queues consumed with acknowledgements
take part (a push node's queue is read with ``no_ack`` and keeps kombu's one message per ``BRPOP``).

An item of a queue's list that is not a kombu message (not JSON, without the properties kombu
reads, or with a body its encoding does not decode) is logged and dropped: kombu's channel raised
on it, out of the worker's event loop, which stopped the worker ("Unrecoverable error"); a push
node's consumer took it for a lost broker connection and connected again.

And a fifth, for a push node: :attr:`Channel.abandoned_reads` counts the ``BRPOP`` replies the
channel gave up on without reading them: kombu drops the connection of a ``BRPOP`` that got no reply
for ``brpop_timeout + health_check_interval`` seconds (a network cut, a stalled Redis) and reads
on, on a new connection, without a word to its caller.  A reply on its way then held a message
Redis had already popped; the node reads its queue without acknowledgements, so that message is
gone, and the node's consumer (``wsnode.consumer``) closes its connections for it.

And a sixth, for a connection lost while its ``BRPOP`` waited, on a reset Redis never saw (a NAT
or load balancer dropping its state): Redis holds that ``BRPOP`` until its timeout, and a message
pushed to its queues meanwhile goes into it, whose answer nobody reads.  The channel asks Redis,
once per ``BRPOP`` connection, which client it is (``CLIENT INFO``), and :meth:`Channel.close`
ends that client (``CLIENT KILL``) before it pushes back what it held unacknowledged; where
Redis refuses, it waits the ``BRPOP`` out.  Messages pushed between the cut and the close can
still go into it: only a transport that does not pop before it holds could close that gap.

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
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from base64 import b64decode
from queue import Empty
from time import monotonic, sleep, time

import kombu.transport
from kombu.transport import redis as kombu_redis
from kombu.transport import virtual
from kombu.utils.encoding import bytes_to_str
from kombu.utils.json import dumps, loads
from kombu.utils.url import parse_url
from redis.exceptions import ResponseError

log = logging.getLogger(__name__)

#: Most messages one read takes beyond the one ``BRPOP`` brought (and never more than the free
#: part of the consumer's prefetch window).
TAKE_MAX = 100

#: Seconds :meth:`Channel.close` allows, beyond ``brpop_timeout``, for a ``BRPOP`` whose connection
#: was lost to have reached Redis and timed out there, before it pushes back what it held.
BRPOP_ANSWER_MARGIN = 0.5

# KEYS: the queue's list, kombu's unacked index (sorted set) and unacked hash.  ARGV: the time,
# how many more to pop, then the tag and unacked record of the message BRPOP brought.  Records it,
# pops up to that many more and records each (tag and record built from the message's own JSON as
# kombu's QoS.append builds them: [message, exchange, routing key]); a message that does not parse
# as kombu's, or whose tag is recorded already, goes back to the list, with all after it, for a
# BRPOP of its own.  Returns the popped as tag, item, tag, item...: Lua's cjson takes JSON that
# Python's json refuses (0x10, inf, nan, a tab inside a string), so an item recorded here may be one
# Python cannot read, and its tag is what removes its record again.  A record never replaces one
# already there, so that removal removes nothing but that item's own.  Exchange and routing key
# must be strings: cjson.encode raises on some numbers (inf), and a script that raises stops
# there, keeping what it did (the items it popped and had not recorded would be lost).
#
# It runs with the flag allow-oom (Redis 7 and later): over ``maxmemory`` (a full Redis with
# ``noeviction`` refuses every write that may use memory) the message BRPOP took is out of its
# list already, and a record refused then lost it, with every message each reconnection's BRPOP
# took after it.  The record moves what the list held into the unacked hash (what it adds beyond
# that is bounded by the prefetch window), so it is allowed to pass the limit.
_TAKE_MORE = """#!lua flags=allow-oom
local now, more = ARGV[1], tonumber(ARGV[2])
redis.call('ZADD', KEYS[2], now, ARGV[3])
redis.call('HSET', KEYS[3], ARGV[3], ARGV[4])
if more < 1 then return {} end
local items = redis.call('RPOP', KEYS[1], more)
if not items then return {} end
local taken = {}
for i, raw in ipairs(items) do
  local ok, message = pcall(cjson.decode, raw)
  local props = ok and type(message) == 'table' and message['properties']
  local info = type(props) == 'table' and props['delivery_info']
  local tag = type(props) == 'table' and props['delivery_tag']
  if type(info) ~= 'table' or type(tag) ~= 'string' or type(info['exchange']) ~= 'string' or type(info['routing_key']) ~= 'string'
      or redis.call('HEXISTS', KEYS[3], tag) == 1 then
    for j = #items, i, -1 do redis.call('RPUSH', KEYS[1], items[j]) end
    break
  end
  redis.call('ZADD', KEYS[2], now, tag)
  redis.call('HSET', KEYS[3], tag, '[' .. raw .. ',' .. cjson.encode(info['exchange']) .. ',' .. cjson.encode(info['routing_key']) .. ']')
  taken[#taken + 1] = tag
  taken[#taken + 1] = raw
end
return taken
"""

#: :data:`_TAKE_MORE` without its first line (the flags), for a Redis older than 7.
_TAKE_MORE_NO_FLAGS = _TAKE_MORE.split("\n", 1)[1]
#: Whether this process logged that its Redis takes no script flags (once per process, not per
#: channel: a worker opens a channel at each broker reconnection, a node one per consumer).
_warned_no_flags = False


def _warn_no_script_flags(exc: Exception) -> None:
    global _warned_no_flags
    if not _warned_no_flags:
        _warned_no_flags = True
        log.warning("this Redis takes no script flags (Redis 7 and later do): a task read while Redis is over maxmemory "
                    "cannot be recorded as unacknowledged, and is lost (%s)", exc)


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

    def append(self, message, delivery_tag) -> None:
        if delivery_tag in self.recorded:
            self.recorded.discard(delivery_tag)
            virtual.QoS.append(self, message, delivery_tag)  # the local bookkeeping kombu's append ends with
            return
        super().append(message, delivery_tag)

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


class Channel(kombu_redis.Channel):
    QoS = QoS
    #: When the ``BRPOP`` whose connection was lost unread was sent (``monotonic``), until
    #: :meth:`close` waited it out.
    _brpop_lost_at: float | None = None
    _command_client = None
    _take_script = None
    #: The read's script: :data:`_TAKE_MORE`, or without its flags on a Redis older than 7.
    _take_script_text = _TAKE_MORE
    #: False once the server refused the read of several messages (Redis older than 6.2).
    _take_more_ok = True
    #: ``BRPOP`` replies given up on unread: the connection that awaited one was dropped other than by
    #: reading it (kombu's stale-connection check).  Read by the node's consumer thread.
    abandoned_reads = 0
    #: True while :meth:`_brpop_read` reads a reply: a failure there reaches the caller as an error.
    _reading_brpop = False
    #: ``(socket, id, addr)``: the connection the ``BRPOP`` goes on, as Redis names it (``CLIENT INFO``).
    _brpop_client: tuple | None = None
    #: ``(id, addr)`` of the connection whose ``BRPOP`` was lost unread, until :meth:`close` ended it.
    _lost_brpop_client: tuple | None = None
    #: False once the server refused ``CLIENT INFO`` (older than 6.2, or an ACL): a lost ``BRPOP`` is then waited out.
    _client_info_ok = True

    def __init__(self, *args, **kwargs) -> None:
        #: Queues whose consumer acknowledges (the others are read one message per BRPOP).
        self._acked_queues: set[str] = set()
        super().__init__(*args, **kwargs)

    def basic_consume(self, queue, no_ack, *args, **kwargs):
        # kombu keeps one callback per queue, the last consumer's: so does this.
        (self._acked_queues.discard if no_ack else self._acked_queues.add)(queue)
        return super().basic_consume(queue, no_ack, *args, **kwargs)

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

    def _identify_brpop_connection(self) -> None:
        """Ask Redis, once per connection, which client the ``BRPOP`` connection is (its id and the
        address Redis sees): what :meth:`close` ends in Redis if that connection is lost unread.
        One round trip on a connection that has just connected, before its first ``BRPOP``."""
        connection = self.client.connection
        sock = getattr(connection, "_sock", None)
        if self._brpop_client and self._brpop_client[0] is sock:
            return
        self._brpop_client = None
        if sock is None or not self._client_info_ok:
            return
        try:
            connection.send_command("CLIENT", "INFO")
            info = bytes_to_str(connection.read_response())
        except ResponseError as exc:  # Redis older than 6.2, or an ACL without CLIENT INFO
            self._client_info_ok = False
            log.info("Redis refused CLIENT INFO (%s): a broker connection lost while its BRPOP waits will be waited out, "
                     "not ended", exc)
            return
        fields = dict(part.split("=", 1) for part in info.split() if "=" in part)
        if fields.get("id") and fields.get("addr"):
            self._brpop_client = (sock, fields["id"], fields["addr"])

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
            raw = bytes_to_str(item)
            payload = kombu_message(raw)
            if payload is None:
                _log_dropped(dest, raw)
                return True
            payloads = [payload, *self._take_more(key, dest, raw, payload)]
            try:
                for payload in payloads:
                    self.connection._deliver(payload, dest)
            finally:
                # a message recorded and not delivered comes back after the visibility timeout;
                # kombu's own QoS (ack_emulation off) has no record of them
                recorded = getattr(self.qos, "recorded", None)
                if recorded is not None:
                    recorded.clear()
            return True
        finally:
            self._in_poll = None
            self._flush_brpop_reauth()

    def _take_more(self, key, queue: str, raw: str, payload) -> list:
        """Record the message ``raw`` (decoded: ``payload``) as unacknowledged and pop (and
        record) the messages waiting behind it, in one round trip; returns the popped ones,
        decoded.  Returns nothing and records nothing when the queue's consumer does not ack, or
        where it cannot be done (kombu's own append then records the message)."""
        if not (self._take_more_ok and queue in self._acked_queues and self.ack_emulation and not self.global_keyprefix):
            return []
        try:
            tag = payload["properties"]["delivery_tag"]
            info = payload["properties"]["delivery_info"]
            # kombu's record, dumps([message, exchange, routing key]), around the message's own JSON
            record = f'[{raw},{dumps(info["exchange"])},{dumps(info["routing_key"])}]'
        except (KeyError, TypeError):
            return []  # not kombu's message format: the consumer rejects it the usual way
        room = self.qos.can_consume_max_estimate()
        more = TAKE_MAX if room is None else max(0, min(TAKE_MAX, room - 1))
        if "can_consume" in vars(self.qos):
            # Celery's worker_disable_prefetch (--disable-prefetch) replaces can_consume on the
            # QoS object with one that also says no while the worker holds a reserved task per
            # pool process.  kombu asks it before each BRPOP; the estimate above knows nothing of
            # that limit, and whether it has room after this message is known only once this
            # message is delivered.  So the read takes this message only, as kombu's does (it
            # took the whole prefetch window).
            more = 0
        with self.conn_or_acquire() as client:
            if self._take_script is None:
                self._take_script = client.register_script(self._take_script_text)
            try:
                try:
                    taken = self._take_script(keys=[key, self.unacked_index_key, self.unacked_key], args=[time(), more, tag, record], client=client)
                except ResponseError as exc:
                    if not (flags_unsupported(str(exc)) and self._take_script_text == _TAKE_MORE):
                        raise
                    # Redis before 7 reads no script flags, and refused to compile the script (it
                    # ran nothing): the same script without them, at once, for this read and the
                    # channel's next ones.  A Redis over maxmemory refuses its record (as it
                    # refuses kombu's append), which loses a task read then.
                    _warn_no_script_flags(exc)
                    self._take_script_text = _TAKE_MORE_NO_FLAGS
                    self._take_script = client.register_script(self._take_script_text)
                    taken = self._take_script(keys=[key, self.unacked_index_key, self.unacked_key], args=[time(), more, tag, record], client=client)
            except ResponseError as exc:
                # A script stops at the command that fails: here RPOP (before it took anything)
                # or the first record.  kombu's append then records the message BRPOP brought
                # (again, or fails the same way).
                if count_unsupported(str(exc)):
                    self._take_more_ok = False
                    log.warning("reading several messages per round trip is off for this connection: %s (RPOP with a count needs Redis 6.2 or later)", exc)
                return []
        payloads, dropped = [], []
        taken = taken or []
        for item_tag, item in zip(taken[::2], taken[1::2]):
            item = bytes_to_str(item)
            message = kombu_message(item)
            # The script checked its properties, not its body, and with a JSON parser more lenient
            # than Python's; and a tag Python reads differently (bytes that are not UTF-8) is not
            # the one the script recorded, so no ack would remove that record.  Either is removed
            # by the tag the script recorded.
            if message is None or message["properties"]["delivery_tag"].encode(errors="surrogatepass") != item_tag:
                _log_dropped(queue, item)
                dropped.append(item_tag)
            else:
                payloads.append(message)
        if dropped:
            self.qos.unrecord(*dropped).execute()  # without MULTI, which a Redis over maxmemory refuses
        self.qos.recorded.add(tag)
        self.qos.recorded.update(p["properties"]["delivery_tag"] for p in payloads)
        return payloads

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
            try:
                self._brpop_read()
            except Empty:
                pass
            except self.connection_errors as exc:
                log.info("closing a broker channel whose connection was lost: its pending BRPOP failed (%s)", exc)
            self._in_poll = None
        self._wait_out_lost_brpop()
        super().close()

    def _wait_out_lost_brpop(self) -> None:
        """Before kombu's close pushes back what the channel holds unacknowledged: if the
        connection of a ``BRPOP`` it sent was lost unread, end that client in Redis
        (:meth:`_end_lost_brpop`), or else wait until Redis has answered it (its timeout,
        ``brpop_timeout``, from when it was sent, and a margin for its way there).  A reset that
        Redis never saw (a NAT or load balancer dropping its state, a half-open connection) leaves
        the ``BRPOP`` blocked in Redis: a message pushed meanwhile, pushed back by this close or sent
        by anyone, went to it, whose answer nobody reads, and was gone from the broker (seen: a
        refused message whose failure waited, ``tests/integration/test_refused_while_results_wait.py``;
        a message sent during the close, ``tests/integration/test_redis_transport.py``).  A worker
        reconnecting closes its channels, and so does a push node's consumer dropping a lost
        connection (kombu's ``collect``).  The wait only with something to push back (a push node
        reads without acknowledgements: never); at most ``brpop_timeout`` and the margin, on a
        reconnection."""
        lost_at, self._brpop_lost_at = self._brpop_lost_at, None
        lost_client, self._lost_brpop_client = self._lost_brpop_client, None
        if lost_at is None or self.closed or (lost_client is not None and self._end_lost_brpop(*lost_client)):
            return
        qos = getattr(self, "_qos", None)
        if qos is None or not qos._delivered:
            return
        wait = lost_at + (self.brpop_timeout or 0) + BRPOP_ANSWER_MARGIN - monotonic()
        if wait > 0:
            log.info("waiting %.1f s for the lost connection's BRPOP to time out in Redis before pushing back %d unacknowledged "
                     "message(s)", wait, len(qos._delivered))
            sleep(wait)  # at most brpop_timeout and the margin: lost_at is in the past

    def _end_lost_brpop(self, client_id: str, addr: str) -> bool:
        """End, in Redis, the client of a connection lost while its ``BRPOP`` waited (``CLIENT
        KILL`` by its id and address, which together name no other client, even on a Redis that
        restarted and numbers its clients from 1 again): from then on nothing pushed goes to that
        ``BRPOP``.  True once Redis answered (the client ended, or gone already: Redis saw the
        connection close); False where it refused (an ACL or a managed Redis without ``CLIENT
        KILL``) or cannot be reached, and the caller waits the ``BRPOP`` out instead."""
        for attempt in (1, 2):
            try:
                with self.conn_or_acquire() as client:
                    ended = client.client_kill_filter(_id=client_id, addr=addr, skipme=True)
                break
            except self.connection_errors as exc:
                if attempt == 1:
                    continue  # a pooled connection the same cut reset (now dropped): once more, on a new one
                error = exc
            except ResponseError as exc:
                error = exc
            log.info("could not end the BRPOP of a lost broker connection in Redis (CLIENT KILL ID %s ADDR %s: %s)",
                     client_id, addr, error)
            return False
        if ended:
            log.info("ended the BRPOP of a lost broker connection in Redis (client id %s, %s): nothing pushed from now "
                     "on goes to it", client_id, addr)
        return True


def kombu_message(raw: str) -> dict | None:
    """``raw`` decoded, if it is a message as kombu's Redis channel stores one, with everything
    its ``Message`` and QoS read before a consumer sees it: ``properties`` with a string
    ``delivery_tag`` and a ``delivery_info`` naming the exchange and routing key, ``headers`` that
    are an object, a ``content-type`` and ``content-encoding`` that are strings (each may be
    absent), and a body its ``body_encoding`` decodes (none, utf-8 or base64); else None.  Pure."""
    try:
        payload = loads(raw)
    except Exception:  # noqa: BLE001 - kombu's decoder also rebuilds tagged values ({"__type__": "decimal", ...}),
        return None    # with hooks that raise what they raise; and deep nesting raises RecursionError
    properties = payload.get("properties") if isinstance(payload, dict) else None
    if not isinstance(properties, dict) or not isinstance(properties.get("delivery_tag"), str):
        return None
    info = properties.get("delivery_info")
    if not isinstance(info, dict) or "exchange" not in info or "routing_key" not in info:
        return None
    if payload.get("headers") and not isinstance(payload["headers"], dict):
        return None  # kombu's Message reads headers.get("compression") as it is made
    if not all(isinstance(payload.get(name) or "", str) for name in ("content-type", "content-encoding")):
        return None  # kombu's decoder looks the type up in a set and lowercases the encoding
    body, encoding = payload.get("body"), properties.get("body_encoding")
    if body and encoding and not (isinstance(encoding, str) and encoding.lower() == "utf-8"):
        if encoding != "base64" or not isinstance(body, str):
            return None
        try:
            b64decode(body)  # as kombu's codec decodes it
        except ValueError:  # binascii.Error, and non-ASCII text
            return None
    return payload


def flags_unsupported(error: str) -> bool:
    """Whether ``error``, the message of an error of the read script, is a Redis older than 7
    refusing its first line, the ``#!lua flags=...`` it does not know (Lua reads ``#`` as an
    unexpected symbol).  Pure."""
    return "compiling script" in error.lower() and "'#'" in error


def count_unsupported(error: str) -> bool:
    """Whether ``error``, the message of an error of the read script, is the server refusing the
    count of ``RPOP`` (Redis older than 6.2), an arity error.  A command sent by a client gets
    "wrong number of arguments for 'rpop' command"; inside a script, Redis 3 to 6.0 say "Wrong
    number of args calling Redis command From Lua script", and 7 "... from script".  Pure."""
    return "wrong number of arg" in error.lower()


def _log_dropped(queue: str, raw: str) -> None:
    log.error("dropped an item of queue %r that is not a kombu message (%d bytes): %.200r", queue, len(raw), raw)


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

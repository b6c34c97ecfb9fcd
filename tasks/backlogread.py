"""How a worker's broker channel reads a queue's backlog: the message ``BRPOP`` brought, and those
waiting behind it, recorded as unacknowledged in one round trip.  Part of
:class:`tasks.redis_transport.Channel` (:class:`BacklogRead`).

kombu spends two round trips per message a worker receives, one after the other: the
``BRPOP`` that takes it, then a transaction recording it as unacknowledged (a sorted set and a hash,
what brings it back if the worker dies).  When a queue holds a backlog, the channel takes the
messages waiting behind the one ``BRPOP`` brought in the same round trip as that record: a Lua
script records the first message, pops up to the free part of the prefetch window more (``RPOP``
with a count, Redis 6.2 or later) and records them too, atomically, so no message is ever out of
the list without being recorded.  Without a backlog a message still costs its two round trips;
with one, a read of up to the window costs two.  Only queues consumed with acknowledgements
take part (a push node's queue is read with ``no_ack`` and keeps kombu's one message per ``BRPOP``).

An item of a queue's list that is not a kombu message (not JSON, without the properties kombu
reads, or with a body its encoding does not decode) is logged and dropped (:meth:`BacklogRead._drop`):
kombu's channel raised on it, out of the worker's event loop, which stopped the worker
("Unrecoverable error"); a push node's consumer took it for a lost broker connection and connected
again.  One that lacks only kombu's bookkeeping (a delivery tag, a ``delivery_info``) is not
dropped: the channel's ``BRPOP`` read supplies it (:func:`tasks.queueitems.with_bookkeeping`), and
the script below, which reads items as Lua, leaves such an item in the list for a ``BRPOP`` of its
own.  A
dropped item that names a task id is handed to :attr:`BacklogRead.on_dropped` (the worker's
consumer stores that task's failure), so that its caller is told why rather than waiting for ever.

Like every kombu channel object, used from the thread that owns the connection only (the worker's
main process loop, a push node's queue thread).  Logs as ``tasks.redis_transport``, the channel's
logger, so that operators' filters match what they matched before it was a module of its own.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from time import time

from kombu.utils.encoding import bytes_to_str
from kombu.utils.json import dumps
from redis.exceptions import ResponseError

from tasks.queueitems import item_task_id, kombu_message, why_dropped

log = logging.getLogger("tasks.redis_transport")

#: Most messages one read takes beyond the one ``BRPOP`` brought (and never more than the free
#: part of the consumer's prefetch window).
TAKE_MAX = 100

# KEYS: the queue's list, kombu's unacked index (sorted set) and unacked hash.  ARGV: the time,
# how many more to pop, the tag and unacked record of the message BRPOP brought, then the queue's
# name.  Records it, pops up to that many more and records each (tag and record built from the
# message's own JSON as kombu's QoS.append builds them, [message, exchange, routing key], but with
# the default exchange and the queue it was read from: :func:`record`).  It looks at the items
# before it pops them (LINDEX, then LRANGE) and pops only those before the first it cannot take,
# which stays in the list, with all after it, for a BRPOP of its own: a message that does not parse
# as kombu's, or whose tag is recorded already (or taken in this read), and one without a delivery
# tag or delivery_info, which Python supplies as it reads it (tasks.queueitems.with_bookkeeping)
# and records with them, so that a restore gives back the message with its tag.  (It popped them
# and pushed back the rest: up to 100 list writes per read, each replicated and written to the
# AOF, for every message of a backlog of such messages.)  Supplied here, the record would be
# written by cjson.encode, which does not give back what it read (an empty list becomes an
# object, a large integer a float).  Returns the popped as tag, item, tag, item...: Lua's cjson takes JSON that
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
local seen = {[ARGV[3]] = true}
local function tag_of(raw)
  local ok, message = pcall(cjson.decode, raw)
  local props = ok and type(message) == 'table' and message['properties']
  local info = type(props) == 'table' and props['delivery_info']
  local tag = type(props) == 'table' and props['delivery_tag']
  if type(info) ~= 'table' or type(tag) ~= 'string' or type(info['exchange']) ~= 'string' or type(info['routing_key']) ~= 'string'
      or seen[tag] or redis.call('HEXISTS', KEYS[3], tag) == 1 then
    return nil
  end
  seen[tag] = true
  return tag
end
local tags = {}
local first = redis.call('LINDEX', KEYS[1], -1)
if first then tags[1] = tag_of(first) end
if #tags == 0 then return {} end
if more > 1 then
  local items = redis.call('LRANGE', KEYS[1], -more, -2)
  for i = #items, 1, -1 do
    local tag = tag_of(items[i])
    if not tag then break end
    tags[#tags + 1] = tag
  end
end
local popped = redis.call('RPOP', KEYS[1], #tags)
local taken = {}
for i, raw in ipairs(popped) do
  redis.call('ZADD', KEYS[2], now, tags[i])
  redis.call('HSET', KEYS[3], tags[i], '[' .. raw .. ',"",' .. cjson.encode(ARGV[5]) .. ']')
  taken[#taken + 1] = tags[i]
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


class BacklogRead:
    """The part of :class:`tasks.redis_transport.Channel` that records the message ``BRPOP``
    brought and takes those waiting behind it (:meth:`_take_more`)."""

    #: True while the channel's close reads the ``BRPOP`` in flight: that read takes no backlog
    #: (its consumer is still registered, and the close's restore would push it back: run twice).
    _closing_read = False

    _take_script = None
    #: The read's script: :data:`_TAKE_MORE`, or without its flags on a Redis older than 7.
    _take_script_text = _TAKE_MORE
    #: False once the server refused the read of several messages (Redis older than 6.2).
    _take_more_ok = True

    #: Called as ``on_dropped(queue, task_id, problem, properties)`` for each item dropped that
    #: names a task id (:meth:`_drop`), or None (a push node's channel).  The worker's consumer sets
    #: it (``tasks.taskmessages``) on the channel that reads its task queues, to store the failure.
    #: It runs in the thread that reads, within the read: it must not read or write the channel.
    on_dropped: Callable[[str, str, str, dict | None], None] | None = None

    def _drop(self, queue: str, raw: str, amended: str | None = None) -> None:
        """Logs the item ``raw`` of ``queue``, which is not a message kombu's channel can deliver
        and is out of the list for good, and hands it to :attr:`on_dropped` when it names a task
        id; ``amended``: the item with the bookkeeping the read supplied, what the problem is told
        of.  An error there is logged: it never stops the read."""
        log_dropped(queue, raw)
        if self.on_dropped is None or (task_id := item_task_id(raw)) is None:
            return
        problem, properties = why_dropped(amended or raw)
        try:
            self.on_dropped(queue, task_id, problem, properties)
        except Exception:  # noqa: BLE001 - the item is dropped anyway; only its caller's answer is lost
            log.exception("task %r: the failure of its dropped item of queue %r could not be handed on", task_id, queue)

    def _take_more(self, key, queue: str, raw: str, payload) -> list:
        """Record the message ``raw`` (decoded: ``payload``) as unacknowledged and pop (and
        record) the messages waiting behind it, in one round trip; returns the popped ones,
        decoded.  Returns nothing and records nothing when the queue's consumer does not ack, or
        where it cannot be done (kombu's own append then records the message)."""
        if not (self._take_more_ok and queue in self._acked_queues and self.ack_emulation and not self.global_keyprefix) or self._closing_read:
            return []
        try:
            tag = payload["properties"]["delivery_tag"]
        except (KeyError, TypeError):
            return []  # not kombu's message format: the consumer rejects it the usual way
        recorded = record(raw, queue)
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
                    taken = self._take_script(keys=[key, self.unacked_index_key, self.unacked_key], args=[time(), more, tag, recorded, queue], client=client)
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
                    taken = self._take_script(keys=[key, self.unacked_index_key, self.unacked_key], args=[time(), more, tag, recorded, queue], client=client)
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
                self._drop(queue, item)
                dropped.append(item_tag)
            else:
                payloads.append(message)
        if dropped:
            self.qos.unrecord(*dropped).execute()  # without MULTI, which a Redis over maxmemory refuses
        self.qos.recorded.add(tag)
        self.qos.recorded.update(p["properties"]["delivery_tag"] for p in payloads)
        return payloads


def record(raw: str, queue: str) -> str:
    """The unacknowledged record of the message ``raw`` read from ``queue``: kombu's,
    ``dumps([message, exchange, routing key])`` around the message's own JSON, but with the default
    exchange and the queue's name, which a restore pushes it back to.  kombu records the exchange
    and routing key the message names, and a restore looks up the queues bound to them: a message
    whose ``delivery_info`` names an exchange that routes nowhere here (gocelery writes
    ``"celery"`` whatever queue it pushes to) was read, then lost when the worker stopped or died
    holding it ("Restoring 1 unacknowledged message(s)", and nothing came back).  Pure."""
    return f'[{raw},"",{dumps(queue)}]'


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


def log_dropped(queue: str, raw: str) -> None:
    log.error("dropped an item of queue %r that is not a kombu message (%d bytes): %.200r", queue, len(raw), raw)

"""Route leases in Redis: which push node holds a connection of which user.

Schema (all keys in the ``REDIS_URL`` database):

- ``push:route:<user>``: a sorted set; member = node address, score = the unix time the lease
  ends, by Redis's clock.  One user may be on several nodes (several devices).  The key itself
  expires a little after its newest lease, so a user whose nodes all died leaves nothing behind.
- ``push:nodes``: a sorted set of every node's own lease, same scoring (0: ended by the node's
  drain).  Dispatch only routes to a node whose own lease is current, so a killed node stops
  receiving within ``LEASE_TTL``.
- ``push:connects:<user>``: with ``MAX_USER_CONNECTS`` only, the user's connects of the last
  window: a sorted set, score = when a node admitted one, by Redis's clock
  (:mod:`wsnode.connectrate`).  It expires a window after the newest.

**One clock.**  Every lease is written and judged by Redis's clock: the scripts below read it
(``TIME``) and are given the lease's length, never a time, and housekeeping reads it (``TIME``)
to judge nodes' leases.  No process's own clock is compared with a score, so a node or worker
host whose clock is off (by any amount) changes no lease's end.  ``TIME`` is allowed before a
write in a script that replicates its effects (every script from Redis 7, and by default from 5).

Leases are written by the node that holds the connections (:class:`Leases`, asyncio, loop thread
only, a script call per 250 users) and renewed every third of ``LEASE_TTL``.  A renewal extends only
the leases it finds current: one that is gone or ended (Redis restarted without them, failed over
to a replica that lacked them, evicted them, or was flushed; or the node could not write for
``LEASE_TTL``) is reported instead, and the node closes that user's connections (they missed what
Dispatch routed meanwhile) before it writes the lease again.  Dispatch reads them
(:class:`RouteTable`, synchronous, worker process) and tolerates stale entries: a score in the
past (by Redis's clock) is ignored.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from typing import NamedTuple

from wsnode import connectrate

ROUTE_PREFIX = "push:route:"
NODES_KEY = "push:nodes"


def route_key(user: str) -> str:
    return ROUTE_PREFIX + user


#: The leases of many users, a script call per ``_SCRIPT_USERS``: as a pipeline of three commands
#: per user they cost the node 73-82 us of CPU per user (redis-py's Python around each command and
#: reply), 0.7-0.8 s every renewal of 10,000 users, against 2-3 us per user as script calls.  A
#: call holds Redis for about 1.5 ms on the 2-core VM of bench/README.md, so other clients (the
#: broker, the workers' lookups) never wait long behind one.
#:
#: Each script's first lines: ``now``, Redis's clock in seconds (``TIME``: seconds and
#: microseconds), which every lease's end is counted from and judged by.  Effects replication,
#: which a script that reads ``TIME`` before it writes needs, is the default from Redis 5 and the
#: only kind from 7; ``redis.replicate_commands()`` asks for it where a Redis 5 or 6 was set
#: otherwise (``lua-replicate-commands no``), and does nothing on 7.  ``seconds`` makes the text of a
#: time once per call: a Lua number given to ``redis.call`` is formatted again at every command
#: (``%.17g``, as here), which at two commands per user cost Redis a quarter more per renewal.
_NOW = """
redis.replicate_commands()
local time = redis.call('time')
local now = tonumber(time[1]) + tonumber(time[2]) / 1000000
local function seconds(t) return string.format('%.17g', t) end
"""

#: KEYS: route keys.  ARGV: the node, the lease's length in seconds, the keys' expiry in seconds.
_REGISTER = _NOW + """
local ends, ended = seconds(now + tonumber(ARGV[2])), seconds(now)
for i = 1, #KEYS do
  redis.call('zadd', KEYS[i], ends, ARGV[1])
  redis.call('zremrangebyscore', KEYS[i], '-inf', ended)
  redis.call('expire', KEYS[i], ARGV[3])
end
return #KEYS
"""

#: A renewal: extends this node's lease on each route key where it is still current, and returns
#: the positions (from 1) of the keys where it is gone or ended, leaving those alone.  ``ZADD XX``
#: extends only a lease that is there (an ended one was just trimmed) and, with ``CH``, answers 1
#: when it did; a ZSCORE follows only an answer of 0 (the lease gone, or the same end written
#: again: the same user twice in one call).  So three commands per user, as :data:`_REGISTER`:
#: on a private redis-server here, renewing 10,000 users cost Redis 24-27 ms (580-660 us per call)
#: and the node 8.8-9.5 ms of CPU, against 23-26 ms and 8.3-8.8 ms when the renewal was
#: :data:`_REGISTER` and reported nothing; a ZSCORE before each ZADD cost Redis 33 ms.  Reading
#: Redis's clock in each call (``TIME``) instead of being given the node's changed neither
#: (``bench/leasecost.py``, three alternated runs each on a slower, shared state of the machine:
#: Redis at least 37.3 ms and medians 39.4-74.6 with the node's clock, at least 37.9 and medians
#: 39.1-39.9 with Redis's; the node at least 13.1 ms, medians 14.6-23.6 and 13.6-14.0).
#:
#: KEYS: route keys.  ARGV: the node, the lease's length in seconds, the keys' expiry in seconds.
_RENEW = _NOW + """
local ends, ended = seconds(now + tonumber(ARGV[2])), seconds(now)
local lapsed = {}
for i = 1, #KEYS do
  redis.call('zremrangebyscore', KEYS[i], '-inf', ended)
  if redis.call('zadd', KEYS[i], 'XX', 'CH', ends, ARGV[1]) == 1 or redis.call('zscore', KEYS[i], ARGV[1]) then
    redis.call('expire', KEYS[i], ARGV[3])
  else
    lapsed[#lapsed + 1] = i
  end
end
return lapsed
"""

#: The node's own lease, renewed the same way: extended when current, or whatever it was when
#: ARGV[3] is 1 (the node's first lease); 1 when gone or ended (left as it is), else 0.
#: KEYS: the node list.  ARGV: the node, the lease's length in seconds, 1 to write it whatever it was.
_RENEW_NODE = _NOW + """
local score = redis.call('zscore', KEYS[1], ARGV[1])
if ARGV[3] == '1' or (score and tonumber(score) > now) then
  redis.call('zadd', KEYS[1], seconds(now + tonumber(ARGV[2])), ARGV[1])
  return 0
end
return 1
"""

#: New connections under ``MAX_USER_CONNECTS`` (:mod:`wsnode.connectrate`): per user, its connects
#: are counted in its log of the window (the entries older than the window trimmed first), those
#: that fit are admitted and recorded, and its lease is written as :data:`_REGISTER` does when one
#: was admitted and the node asked for it.  Answers, per user, ``{connects admitted, milliseconds
#: until the next would be}`` (0 when all were admitted): until all but limit - 1 of the log's
#: entries left the window, which is the oldest's leaving unless the log holds more than the limit.  A member is the time and the entry's
#: place in the log, unique: entries of one microsecond are all in the log when the next is added.
#:
#: KEYS: per user, its log then its route key.  ARGV: the node, the lease's length in seconds, the
#: route keys' expiry in seconds, the most connects per window, the window in seconds, then per
#: user its connects and 1 to write its lease (else 0).
_ADMIT = _NOW + """
local limit, window = tonumber(ARGV[4]), tonumber(ARGV[5])
local at, since = seconds(now), seconds(now - window)
local ends = seconds(now + tonumber(ARGV[2]))
local answers = {}
for i = 1, #KEYS / 2 do
  local log, route = KEYS[2 * i - 1], KEYS[2 * i]
  local connects = tonumber(ARGV[4 + 2 * i])
  redis.call('zremrangebyscore', log, '-inf', since)
  local held = redis.call('zcard', log)
  local admitted = math.max(0, math.min(connects, limit - held))
  for n = 1, admitted do redis.call('zadd', log, at, at .. '/' .. (held + n)) end
  local retry = 0
  if admitted < connects then
    -- The next fits once all but limit - 1 entries left: the log may hold more than the limit
    -- (admitted under a higher one, before a change or by a node not yet changed).
    local oldest = redis.call('zrange', log, held + admitted - limit, held + admitted - limit, 'WITHSCORES')
    retry = math.max(1, math.ceil((tonumber(oldest[2]) + window - now) * 1000))
  end
  if admitted > 0 then
    redis.call('expire', log, window + 1)
    if ARGV[5 + 2 * i] == '1' then
      redis.call('zadd', route, ends, ARGV[1])
      redis.call('zremrangebyscore', route, '-inf', at)
      redis.call('expire', route, ARGV[3])
    end
  end
  answers[i] = {admitted, retry}
end
return answers
"""

#: KEYS: route keys.  ARGV: the node.
_RELEASE = """
for i = 1, #KEYS do redis.call('zrem', KEYS[i], ARGV[1]) end
return #KEYS
"""

_SCRIPT_USERS = 250


class Lapsed(NamedTuple):
    """What a lease write found gone or ended (so not written: the node first closes the
    connections that were unroutable, then writes them again with :meth:`Leases.register`)."""

    #: The node's own lease in ``push:nodes``: Dispatch routed to none of the node's users.
    node: bool
    #: Users whose lease on this node was gone or ended.
    users: list[str]

    def __bool__(self) -> bool:
        return self.node or bool(self.users)


def lapsed_from(chunks: list[list[str]], node_reply, chunk_replies: list) -> Lapsed:
    """The :class:`Lapsed` of a renewal from its replies: :data:`_RENEW_NODE`'s, and one list of
    positions (from 1) per :data:`_RENEW` call, the call for ``chunks[n]`` the ``n``-th."""
    if len(chunks) != len(chunk_replies):
        raise ValueError(f"{len(chunk_replies)} replies for {len(chunks)} script calls")
    return Lapsed(bool(int(node_reply)), [chunk[int(position) - 1] for chunk, positions in zip(chunks, chunk_replies) for position in positions])


class Leases:
    """Writes this node's leases.  Loop thread only; ``redis`` is a ``redis.asyncio.Redis``."""

    def __init__(self, redis, node: str, ttl: float) -> None:
        self._redis = redis
        self.node = node
        self.ttl = ttl
        self._register = redis.register_script(_REGISTER)  # EVALSHA; the pipeline loads them again after a Redis restart
        self._renew = redis.register_script(_RENEW)
        self._renew_node = redis.register_script(_RENEW_NODE)
        self._release = redis.register_script(_RELEASE)
        self._admit = redis.register_script(_ADMIT)

    def _key_ttl(self) -> int:
        return int(self.ttl * 2) + 1

    async def register(self, users: Iterable[str], node: bool = False) -> bool:
        """Lease ``users`` to this node, whatever their leases were (their first lease here), in
        one round trip.  The node's own lease is extended when it is current, and written whatever
        it was with ``node``.  Returns whether it was gone or ended and left so (without ``node``):
        then Dispatch routed to none of the node's users, and a lease written now would route to
        connections that missed what came meanwhile; the node closes them first.  Each lease
        ends ``ttl`` seconds from now by Redis's clock."""
        async with _pipeline(self._redis) as pipe:
            await self._renew_node(keys=[NODES_KEY], args=[self.node, self.ttl, int(node)], client=pipe)  # queued in the pipeline
            args = [self.node, self.ttl, self._key_ttl()]
            for keys in _chunks([route_key(user) for user in users]):
                await self._register(keys=keys, args=args, client=pipe)
            replies = await pipe.execute()
        return bool(int(replies[0]))

    async def admit(self, connects: Mapping[str, int], lease: Collection[str], most: int, window: int) -> tuple[bool, dict[str, tuple[int, int]]]:
        """Count ``connects`` (user: how many connections of theirs opened) against ``most``
        connects per user in any ``window`` seconds, and write the leases of the users of ``lease``
        that had one admitted, in one round trip (:data:`_ADMIT`; the node's own lease is
        extended with them, as by :meth:`register`).  Returns whether the node's own lease was gone
        or ended and left so (only when a lease was to be written: see :meth:`register`), and per
        user ``(connects admitted, milliseconds until the next would be)``.  Both by Redis's clock."""
        users = list(connects)
        async with _pipeline(self._redis) as pipe:
            if lease:
                await self._renew_node(keys=[NODES_KEY], args=[self.node, self.ttl, 0], client=pipe)
            for chunk in _chunks(users):
                keys: list[str] = []
                args: list = [self.node, self.ttl, self._key_ttl(), most, window]
                for user in chunk:
                    keys += (connectrate.log_key(user), route_key(user))
                    args += (connects[user], int(user in lease))
                await self._admit(keys=keys, args=args, client=pipe)
            replies = await pipe.execute()
        node_lapsed = bool(int(replies[0])) if lease else False
        answers = [answer for reply in replies[1 if lease else 0 :] for answer in reply]
        return node_lapsed, {user: (int(admitted), int(retry)) for user, (admitted, retry) in zip(users, answers)}

    async def renew(self, users: Iterable[str]) -> Lapsed:
        """Extend every lease this node holds (the node's own and ``users'``) that is current, in
        one round trip, to ``ttl`` seconds from now; returns those gone or ended, which are left so
        (:class:`Lapsed`).  Both by Redis's clock."""
        chunks = _chunks(list(users))
        async with _pipeline(self._redis) as pipe:
            await self._renew_node(keys=[NODES_KEY], args=[self.node, self.ttl, 0], client=pipe)
            args = [self.node, self.ttl, self._key_ttl()]
            for chunk in chunks:
                await self._renew(keys=[route_key(user) for user in chunk], args=args, client=pipe)
            replies = await pipe.execute()
        return lapsed_from(chunks, replies[0], replies[1:])

    async def release(self, users: Iterable[str]) -> None:
        """Give up ``users``' leases on this node (their last connection here closed)."""
        async with _pipeline(self._redis) as pipe:
            await self._release_in(pipe, users)
            await pipe.execute()  # an empty pipeline sends nothing

    async def _release_in(self, pipe, users: Iterable[str]) -> None:
        for keys in _chunks([route_key(user) for user in users]):
            await self._release(keys=keys, args=[self.node], client=pipe)  # queued in the pipeline

    async def release_node(self, users: Iterable[str]) -> None:
        """Shut-down: give up ``users``' leases and end the node's own, so nothing routes here any
        more.  The node stays listed with an ended lease, so housekeeping hands back whatever a
        dispatcher still published to its queue after the node left."""
        async with _pipeline(self._redis) as pipe:
            pipe.zadd(NODES_KEY, {self.node: 0})
            await self._release_in(pipe, users)
            await pipe.execute()


def _pipeline(redis):
    """A pipeline without MULTI, to be entered (``async with``): leaving gives its connection back
    to the pool whatever happened.  redis-py's ``execute`` does so only once it has begun sending:
    a pipeline of script calls first checks its scripts (``SCRIPT EXISTS``) on the connection it
    takes, and when that check fails (Redis restarted, or stopped answering) the connection stayed
    taken for good.  The node's pool holds ``REDIS_MAX_CONNECTIONS``: a partition from Redis took
    one per lease write, and once they were all taken, the node could write no lease and answer
    no PING again, Redis back or not, until it was restarted."""
    return redis.pipeline(transaction=False)


def _chunks(items: list[str]) -> list[list[str]]:
    return [items[start : start + _SCRIPT_USERS] for start in range(0, len(items), _SCRIPT_USERS)]


#: The current leases of the node list and of each route key, in one command: a pipeline of a
#: ZRANGEBYSCORE per recipient cost the worker 6.3 us of CPU per recipient (redis-py's Python
#: around each command and reply), against about 1 us as one script call.
#:
#: A lease is current while its end is after Redis's clock (``TIME``).
#:
#: KEYS: the node list, the marks' sorted set, then one route key per user.  ARGV: (user's position
#: among the route keys, member, score) triples: the script adds each member whose user has a
#: lease on a node with a current lease of its own (the rule of ``tasks.routing.plan``, which
#: routes exactly those users) with ZADD NX, in the same call.
_LOOKUP = _NOW + """
now = seconds(now)  -- as text, made once for every ZRANGEBYSCORE
local found = {redis.call('zrangebyscore', KEYS[1], now, '+inf')}
local live = {}
for _, node in ipairs(found[1]) do live[node] = true end
local routed = {}
for i = 3, #KEYS do
  local nodes = redis.call('zrangebyscore', KEYS[i], now, '+inf')
  found[i - 1] = nodes
  for _, node in ipairs(nodes) do
    if live[node] then routed[i - 2] = true; break end
  end
end
local marks = {}
for j = 1, #ARGV, 3 do
  if routed[tonumber(ARGV[j])] then
    marks[#marks + 1] = ARGV[j + 2]
    marks[#marks + 1] = ARGV[j + 1]
    if #marks >= 2000 then redis.call('zadd', KEYS[2], 'NX', unpack(marks)); marks = {} end
  end
end
if #marks > 0 then redis.call('zadd', KEYS[2], 'NX', unpack(marks)) end
return found
"""


#: Most users one lookup script reads (:meth:`RouteTable.lookup` makes several calls for more):
#: about 50 ms of Redis's time each on the 2-core VM of bench/HISTORY.md.
LOOKUP_CHUNK = 5000
#: And about this many deliveries to mark (a user's marks are never split between calls).
LOOKUP_MARKS = 20000


class RouteTable:
    """Reads the leases.  Any thread; ``redis`` is a synchronous ``redis.Redis``."""

    def __init__(self, redis) -> None:
        self._redis = redis
        self._lookup = redis.register_script(_LOOKUP)  # EVALSHA, loaded again after a Redis restart

    def lookup(self, users: Iterable[str], marks_key: str = "", marks=()) -> tuple[dict[str, list[str]], list[str]]:
        """``({user: [node, ...]}, live_nodes)`` for ``users``, in one round trip per
        :data:`LOOKUP_CHUNK` users or :data:`LOOKUP_MARKS` marks.

        Users with no current lease (by Redis's clock) are absent from the first value.  In the
        same round trip, each ``(user, member, score)`` of ``marks`` whose user has a lease on a
        live node (one that ``tasks.routing.plan`` routes) is added to the sorted set
        ``marks_key`` unless there already: Dispatch records its pending deliveries that way.  A
        user of ``marks`` missing from ``users`` is never routed, so never marked.  ``marks`` are
        ``(user, member, score)`` triples, or what gives them one user at a time (``of(user)``
        and ``len``: :class:`tasks.pending.Marks`, which makes them only as each call needs them).
        """
        users = list(dict.fromkeys(users))
        if not hasattr(marks, "of"):  # triples: by user
            marks = _ByUser(marks)
        if len(marks) and not marks_key:
            raise ValueError("marks given without the key of the sorted set to add them to")
        if len(users) <= LOOKUP_CHUNK and len(marks) <= LOOKUP_MARKS:
            return self._lookup_some(users, marks_key, [mark for user in users for mark in marks.of(user)])
        # A script blocks Redis while it runs: one over a batch of 100 messages of 10,000
        # recipients each read a million keys and held every client of that Redis (nodes, auth,
        # the broker) for 8 s, past its busy-script limit.  Calls of LOOKUP_CHUNK users let the
        # others in between; the users of one chunk are marked with that chunk's view.
        routes: dict[str, list[str]] = {}
        live: dict[str, None] = {}
        chunk: list[str] = []
        chunk_marks: list[tuple[str, str, float]] = []
        for index, user in enumerate(users):
            chunk.append(user)
            chunk_marks += marks.of(user)
            if len(chunk) >= LOOKUP_CHUNK or len(chunk_marks) >= LOOKUP_MARKS or index == len(users) - 1:
                found, nodes = self._lookup_some(chunk, marks_key, chunk_marks)
                # Only the routes to nodes this call saw live: this call marked its users by them,
                # and a node whose lease ended (or came back) between two calls would otherwise
                # be routed users this call did not mark pending.
                here = set(nodes)
                routes.update((user, kept) for user, held in found.items() if (kept := [node for node in held if node in here]))
                live.update(dict.fromkeys(nodes))
                chunk, chunk_marks = [], []
        return routes, list(live)

    def _lookup_some(self, users: list[str], marks_key: str, marks: list[tuple[str, str, float]]) -> tuple[dict[str, list[str]], list[str]]:
        """One script call for ``users``; ``marks`` are of these users only."""
        position = {user: index for index, user in enumerate(users, start=1)}
        args: list = []
        for user, member, score in marks:
            args += (position[user], member, repr(float(score)))
        # Without marks the script writes nothing: the node list only fills KEYS[2]'s place.
        replies = self._lookup(keys=[NODES_KEY, marks_key or NODES_KEY, *map(route_key, users)], args=args)
        live = [_text(node) for node in replies[0]]
        routes = {user: [_text(node) for node in nodes] for user, nodes in zip(users, replies[1:]) if nodes}
        return routes, live

    def lease_ends_after(self, node: str, when: float) -> bool:
        """Whether ``node``'s own lease ends after ``when``, a time by Redis's clock (read with
        :func:`redisclock.redis_time`): housekeeping, having found the lease of the node at an address ended
        before ``when``, asks whether a node holds that address again (one restarted on it, or
        the same node back from a cut-off from Redis)."""
        score = self._redis.zscore(NODES_KEY, node)
        return score is not None and score > when


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class _ByUser:
    """Marks given as ``(user, member, score)`` triples, by user, as :class:`tasks.pending.Marks`
    gives them (``of``).  A user not looked up is never marked."""

    def __init__(self, marks: Iterable[tuple[str, str, float]]) -> None:
        self._by_user: dict[str, list[tuple[str, str, float]]] = {}
        for mark in marks:
            self._by_user.setdefault(mark[0], []).append(mark)
        self._count = sum(map(len, self._by_user.values()))

    def __len__(self) -> int:
        return self._count

    def of(self, user: str) -> list[tuple[str, str, float]]:
        return self._by_user.get(user, [])

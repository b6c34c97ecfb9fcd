"""Redis's clock, for the times that processes on different hosts compare with each other.

A message id carries the time its worker made it, and a resume compares it with ids other workers
made (it replays from ``RESUME_OVERLAP_MS``, 2 s, before its ``since``); the ``resumed`` cursor is
a time of the worker that read the replay; housekeeping's redelivery window, read by whichever
worker runs it, is a range of ids; a revocation cutoff one auth process writes is compared with
the ``iat`` another one stamped.  On each host's own clock, a worker 5 s ahead of another lost 3 s
of the other's messages to every resume, and a revocation through an auth process 5 s behind
missed the tokens another issued in the 5 s before it (reproduced with faketime).  So these read
Redis's clock (``TIME`` on ``REDIS_URL``), as leases already do: every process of a cluster shares
that Redis, so they agree to within a round trip, whatever their hosts' clocks say.

A reading costs no round trip.  The clock is anchored to one ``TIME`` reply (taken at the middle
of its round trip) and runs on from there with the host's monotonic clock, which steps of the
wall clock (an NTP correction, a VM resumed) do not move.  Auth anchors again every
:data:`RESYNC_SECONDS`; a worker anchors once, before its pool forks, and its pool processes keep
that anchor (``tasks.dispatch.clock``).  Until its first anchor (Redis not reachable yet) a
process reads the host's clock, and an anchor that fails keeps the previous one; a Redis whose
``TIME`` never comes back within :data:`MAX_ROUND_TRIP_SECONDS` is anchored to roughly after
:data:`ROUGH_AFTER_ATTEMPTS` slow readings (a worker's one sync before its pool forks reads
:data:`SAMPLES`: its pool processes share that anchor).  A host whose clock is more than
:data:`WARN_SECONDS` off Redis's is logged once (and again when it comes back): the platform no
longer depends on it, but logs, receipts' times and the latency metric still do.

Threading: :meth:`RedisClock.now` from any thread; an anchor replaces one tuple, which readers see
whole.  :class:`SyncRedisClock` anchors itself inside ``now()`` when due (a few ``TIME`` round
trips, on the calling thread); the auth service, on an IOLoop, anchors with :func:`anchor_async`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

import redis

log = logging.getLogger(__name__)

#: Seconds between two anchors to Redis's clock (auth's; a worker keeps its first: ``tasks.dispatch``).
RESYNC_SECONDS = 60.0
#: ``TIME`` readings per anchor of :class:`SyncRedisClock`, of which the one with the shortest
#: round trip is taken.
SAMPLES = 5
#: A host clock further than this from Redis's, in seconds, is logged.
WARN_SECONDS = 1.0
#: A ``TIME`` whose round trip took longer than this, in seconds, is not anchored to (Redis stalled
#: by a long script or a fork, or the caller's loop busy: the reading could be off by half of it),
#: and is read again after :data:`RETRY_SECONDS`.
MAX_ROUND_TRIP_SECONDS = 0.25
#: Readings too slow, one after another, after which a clock with no anchor yet takes the
#: best of them anyway (a Redis further than half of :data:`MAX_ROUND_TRIP_SECONDS` away, over a
#: WAN link, never answered within it, and its processes kept their hosts' clocks for good): off
#: by at most half its round trip, where a host's clock may be off by any amount.
ROUGH_AFTER_ATTEMPTS = 3
#: Seconds before another attempt after one that failed or was too slow, doubling up to
#: :data:`RESYNC_SECONDS` while Redis does not answer (a process started before its Redis anchors
#: within about a second of it answering, not a minute later).
RETRY_SECONDS = 1.0


def redis_time(reply) -> float:
    """Redis's clock in unix seconds, from the reply of redis-py's ``time()`` (``(seconds,
    microseconds)``): also what lease scores are compared with outside the scripts
    (``wsnode.registry``; housekeeping reads ``TIME`` in a pipeline it sends anyway).  Pure."""
    seconds, micros = reply
    return seconds + micros / 1_000_000


class RedisClock:
    """Redis's clock as this process reads it (see the module docstring)."""

    def __init__(self, name: str, wall: Callable[[], float] = time.time, monotonic: Callable[[], float] = time.monotonic,
                 resync: float | None = RESYNC_SECONDS, host_within: float | None = None) -> None:
        self.name = name
        self._resync = resync
        # With host_within, the host's own clock while it is at most that far from Redis's (auth's:
        # two processes of one host then read one clock, as before, where two anchors differ by
        # up to half a round trip, and a revocation a moment after another process issued a token
        # missed it).
        self._host_within = host_within
        self._wall, self._monotonic = wall, monotonic
        self._anchor: tuple[float, float] | None = None  # (Redis's unix seconds, this monotonic time then)
        self._next = float("-inf")  # monotonic time of the next anchor attempt
        self._failures = 0
        self._slow = 0  # readings not taken for their round trip, before the first anchor counts
        #: This host's clock minus Redis's, in seconds, at the last anchor (None before it).
        self.offset: float | None = None

    def now(self) -> float:
        """Unix seconds by Redis's clock (by this host's until the first anchor)."""
        anchor = self._anchor
        if anchor is None or (self._host_within is not None and abs(self.offset) <= self._host_within):
            return self._wall()
        return anchor[0] + (self._monotonic() - anchor[1])

    def due(self) -> bool:
        """Whether the next anchor attempt is due: :data:`RESYNC_SECONDS` after the last anchor,
        sooner after an attempt that failed (:meth:`tried`)."""
        return self._monotonic() >= self._next

    def anchor(self, before: float, reply, after: float, wall_after: float, readings: int = 1) -> bool:
        """Anchor to ``reply``, a ``TIME`` read between the monotonic times ``before`` and
        ``after``; ``wall_after`` is this host's clock read just after it (for :attr:`offset`).
        False, and nothing changed, when the round trip took over :data:`MAX_ROUND_TRIP_SECONDS`,
        unless the clock has no anchor after :data:`ROUGH_AFTER_ATTEMPTS` slow readings (then it
        is taken, and logged: off by at most half the round trip).  ``readings``: how many
        readings ``reply`` is the quickest of (:meth:`SyncRedisClock.sync`'s :data:`SAMPLES`),
        each counted: a worker's one sync before its pool forks anchors it there, where each
        pool process took a rough anchor of its own, off by up to half a round trip each."""
        if after - before > MAX_ROUND_TRIP_SECONDS:
            if self._anchor is not None or self._slow + readings <= ROUGH_AFTER_ATTEMPTS:
                self._slow += readings
                log.debug("%s: Redis's TIME took %.3f s to come back; not anchored to it", self.name, after - before)
                return False
            log.warning("%s: Redis's TIME took %.3f s to come back, over %.2f s at each of %d readings: anchored to it anyway, "
                        "within %.3f s (a Redis that far away slows every request; keep it near the platform's processes)",
                        self.name, after - before, MAX_ROUND_TRIP_SECONDS, self._slow + readings, (after - before) / 2)
        redis_now, middle = redis_time(reply), (before + after) / 2
        self._anchor = (redis_now, middle)
        offset = wall_after - (after - middle) - redis_now
        was_off = self.offset is not None and abs(self.offset) > WARN_SECONDS
        self.offset = offset
        if abs(offset) > WARN_SECONDS and not was_off:
            log.warning("%s: this host's clock is %.1f s %s Redis's (REDIS_URL): the platform keeps to Redis's clock, but "
                        "logs and receipt times follow this host's; keep the hosts' clocks in sync (NTP, chrony)",
                        self.name, abs(offset), "ahead of" if offset > 0 else "behind")
        elif was_off and abs(offset) <= WARN_SECONDS:
            log.info("%s: this host's clock agrees with Redis's again (%.3f s apart)", self.name, offset)
        return True

    def tried(self, anchored: bool) -> None:
        """Record an anchor attempt: the next is due :data:`RESYNC_SECONDS` after one that
        anchored, :data:`RETRY_SECONDS` after one that did not, doubling while they fail."""
        if anchored:
            self._failures, wait = 0, (float("inf") if self._resync is None else self._resync)
        else:
            wait = min(RESYNC_SECONDS, RETRY_SECONDS * 2 ** self._failures)
            self._failures += 1
        self._next = self._monotonic() + wait


class SyncRedisClock(RedisClock):
    """A :class:`RedisClock` that anchors itself with a redis-py client when due, inside ``now()``.

    With ``resync=None`` it keeps its first anchor for good (the workers': see ``tasks.dispatch``),
    and each anchor is the best of :data:`SAMPLES` readings (the shortest round trip)."""

    def __init__(self, client: redis.Redis, name: str, **clocks) -> None:
        super().__init__(name, **clocks)
        self._client = client

    def now(self) -> float:
        if self.due():
            self.sync()
        return super().now()

    def sync(self) -> None:
        """Anchor now, to the reading of :data:`SAMPLES` with the shortest round trip; a Redis that
        does not answer leaves the previous anchor (or the host's clock)."""
        best, read = None, 0
        try:
            for _ in range(SAMPLES):
                before = self._monotonic()
                reply = self._client.time()
                after = self._monotonic()
                read += 1
                if best is None or after - before < best[2] - best[0]:
                    best = (before, reply, after, self._wall())
        except (redis.RedisError, OSError) as exc:
            if best is None:
                log.debug("%s: Redis's clock not read (%s); keeping %s", self.name, exc, "the last anchor" if self._anchor else "this host's clock")
                self.tried(False)
                return
        self.tried(self.anchor(*best, readings=read))


async def anchor_async(clock: RedisClock, client) -> None:
    """Anchor ``clock`` with a ``redis.asyncio`` client (the auth service's, on its loop); a Redis
    that does not answer leaves the previous anchor.  Does nothing unless :meth:`RedisClock.due`:
    call it every :data:`RETRY_SECONDS`.  A loop busy when the reply came makes the round trip
    look long, and that reading is not taken."""
    if not clock.due():
        return
    try:
        before = clock._monotonic()
        reply = await client.time()
        after = clock._monotonic()
    except (redis.RedisError, OSError, asyncio.TimeoutError) as exc:
        log.debug("%s: Redis's clock not read (%s)", clock.name, exc)
        clock.tried(False)
        return
    clock.tried(clock.anchor(before, reply, after, clock._wall()))

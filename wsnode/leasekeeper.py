"""What a push node does about its leases in Redis (user -> node, and its own): the first lease of a
user whose first connection here opens, written together with those of the others that opened
meanwhile (and, with ``MAX_USER_CONNECTS``, counted against the user's connect rate in the same
script call); the renewal every third of ``LEASE_TTL``; the release of the users who left; and the
connections closed with 1013 when leases were not written for ``LEASE_TTL`` or Redis lost them,
so that they resume with ``since`` instead of missing what Dispatch could not route to them.

:class:`LeaseKeeper` is a part of :class:`wsnode.app.PushNode` (a mixin, as
:class:`wsnode.tokenwatch.TokenWatch`), written apart because it is one concept: it uses the node's
``hub``, ``leases`` (:class:`wsnode.registry.Leases`), ``claim`` (:class:`wsnode.addressclaim.AddressClaim`), ``metrics``, ``address``, ``draining``,
``connect_rate``, ``redis_ok``, ``redis_refused``, ``_redis_failed`` and the lease state that
:class:`~wsnode.app.PushNode` sets up (``_lease_writes``, ``_leasing``, ``_leases_until``, ``_lease_outage``).
Loop thread only.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

import redisfull
import redislogin
import settings
from wsnode import connectrate
from wsnode.closecodes import CloseCode
from wsnode.registry import Lapsed

if TYPE_CHECKING:
    from wsnode.handler import PushHandler

log = logging.getLogger("wsnode.app")  # the node's own log, as before this part was written apart

#: The close reason of a connection whose user's lease (or the node's own) a lease write found gone
#: or ended while the node's writes worked (:meth:`LeaseKeeper._close_unroutable`).
LEASE_LOST_REASON = "routes lost (leases gone from Redis), reconnect with since"


def renewal_failure(exc: RedisError) -> str:
    """What tells apart the fixes of a lease renewal that failed, for its :class:`outage.Outage`:
    Redis refusing REDIS_URL's login or rights (:func:`redislogin.refused`'s line: what to fix),
    Redis full, or Redis not answering (a refused connection and a timeout alike: one outage shows
    both in turn, with one fix).  Any other error by its type.  Reads ``settings``."""
    if (refused := redislogin.refused(exc)) is not None:
        return refused
    if redisfull.is_full(exc):
        return "full"
    if isinstance(exc, (RedisConnectionError, RedisTimeoutError)):
        return "no answer"
    return type(exc).__name__


class LeaseKeeper:
    """The lease writes of a push node and the connections their gaps close (see the module).
    Loop thread only."""

    def _leased(self, user: str, writing: asyncio.Future) -> None:
        if self._leasing.get(user) is writing:
            del self._leasing[user]
        if not writing.cancelled():
            writing.exception()  # retrieved: each waiting connection handles it

    async def _register_new_leases(self, users: list[str]) -> None:
        # A user whose connection closed while waiting for this pipeline is left out: its release
        # may already have run, and a lease written after it would point here until it expired.
        async with self._lease_writes:
            if not self.draining:
                started = time.monotonic()
                await self._write_leases([user for user in users if self.hub.of_user(user)])
                self._first_leases_written(started)

    async def _admit_connects(self, users: list[str]) -> list[int | None | Exception]:
        """Count the connects of ``users`` (one item per new connection) against
        ``MAX_USER_CONNECTS`` and write, in the same script call, the leases of those admitted
        whose user holds no bound connection here (as :meth:`_register_new_leases` would: the
        first connection of the user, or one after the others' lease lapsed); one round trip for
        all, holding ``_lease_writes``.  Returns per item None (admitted) or the milliseconds until
        its user's next connect would be admitted (refused: 4429).

        Redis unavailable: the connections whose lease was to be written get the error (refused
        with 1013, as without the limit); the others, whose user's lease is written already, are
        admitted uncounted: without the limit they would not have asked Redis at all, and the
        limiter must not make the node refuse more than it does without it.  Draining: every item
        is admitted uncounted, and ``attach`` closes it with 1001."""
        async with self._lease_writes:
            if self.draining:
                return [None] * len(users)
            connects = connectrate.tally(users)
            # Left meanwhile (no connection here): counted, but no lease (see _register_new_leases).
            lease = {user for user in connects if self.hub.of_user(user) and not self._open_bound(user)}
            started = time.monotonic()
            try:
                node_lapsed, admitted = await self.leases.admit(connects, lease, *self.connect_rate)
                if lease:
                    self._first_leases_written(started)
                if node_lapsed:
                    await self._node_lease_lapsed()
            except RedisError as exc:
                self._redis_failed(exc)
                unchecked = sum(1 for user in users if user not in lease)
                if unchecked:
                    log.warning("node=%s connect rate of %d connections not checked (%s): admitted, as their users' leases are written already",
                                self.address, unchecked, redislogin.explain(exc))
                return [exc if user in lease else None for user in users]
        return connectrate.answers(users, admitted)

    async def _write_leases(self, users: list[str]) -> None:
        """Write the leases of ``users``, whose connections here are not bound yet (a first write:
        no lease of theirs is expected), holding ``_lease_writes``.  The node's own lease is only
        extended: when it was gone or ended (Redis lost it), Dispatch routed to none of the node's
        users meanwhile, so their bound connections are closed before it is written again."""
        if await self.leases.register(users):
            self._check_leases()
            await self._node_lease_lapsed()

    def _first_leases_written(self, started: float) -> None:
        """First leases (:meth:`_register_new_leases`, :meth:`_admit_connects`) were written by a
        write that began at ``started`` (monotonic clock): close what a gap before it left
        unroutable (:meth:`_check_leases`), then, in that order, record their end, ``LEASE_TTL``
        after ``started``, when it comes before the one recorded (``_leases_until`` is the first
        end of all).  Loop thread only, holding ``_lease_writes``."""
        self._check_leases()
        self._leases_until = min(self._leases_until, started + settings.LEASE_TTL)

    async def _node_lease_lapsed(self) -> None:
        """A first lease write (:meth:`_write_leases`, :meth:`_admit_connects`) found the node's own
        lease gone or ended and left it so (Redis lost it): Dispatch routed to none of the node's
        users meanwhile, so their bound connections are closed with 1013 (:meth:`_close_unroutable`)
        before it is written again.  Loop thread only, holding ``_lease_writes``."""
        self._close_unroutable(Lapsed(node=True, users=[]))
        await self.leases.register([], node=True)

    async def _release_leases(self, left: list[str]) -> None:
        """Release the leases of the users who left, many per round trip (thousands leave at once
        when a proxy in front restarts).  A failure is logged here, once for the whole call."""
        users = [user for user in dict.fromkeys(left) if not self.hub.of_user(user)]  # not back already
        try:
            async with self._lease_writes:
                await self.leases.release(users)
                back = [user for user in users if self.hub.of_user(user)]  # reconnected meanwhile
                if back and not self.draining:
                    await self._write_leases(back)
        except RedisError as exc:
            # WARNING until the node knows Redis is down (its PING line says so once): then INFO,
            # or each disconnect during the outage was a WARNING of its own.
            log.log(logging.WARNING if self.redis_ok else logging.INFO,
                    "node=%s leases of %d users who left not released (%s); they expire within %.0f s",
                    self.address, len(users), exc, settings.LEASE_TTL)

    async def _renew(self) -> None:
        try:
            async with self._lease_writes:
                if self.draining:
                    return
                started = time.monotonic()
                lapsed = await self.leases.renew(self.hub.users())
                if (other := await self.claim.take()) is not None:
                    log.error("node=%s: %s holds this node's address in Redis (%s): two nodes with one NODE_HOST:PORT split one "
                              "queue, each delivering only what it reads; give each node its own NODE_HOST or --port",
                              self.address, other, self.claim.key)
                # Before the new end: a lease that ended before this write (Redis did not answer
                # for LEASE_TTL) left a gap in which Dispatch skipped its users.
                self._check_leases()
                self._leases_until = started + settings.LEASE_TTL
                if lapsed:  # left unwritten by the renewal: written again once their connections are closed
                    again = self._close_unroutable(lapsed)
                    if again or lapsed.node:
                        await self.leases.register(again, node=lapsed.node)
            if (recovery := self._lease_outage.answered()) is not None:
                log.info("node=%s leases written for %d users after %.0f s; %d renewals failed meanwhile",
                         self.address, self.hub.user_count, recovery.seconds, recovery.failures)
            elif not self.redis_ok:  # a PING or a first lease write failed, and no renewal
                log.info("node=%s leases written for %d users", self.address, self.hub.user_count)
            self.redis_ok, self.redis_refused = True, None
        except RedisError as exc:
            self.metrics.lease_failure()
            # Once per outage and cause: a WARNING every retry (every LEASE_TTL/3) for as long as
            # Redis was down, "for 0 users" on an idle node, buried the line that said why.
            if self._lease_outage.failed(renewal_failure(exc)):
                log.warning("node=%s lease renewal failed for %d users (%s): their leases expire within %.0f s unless Redis is back; "
                            "retrying every %.0f s", self.address, self.hub.user_count, redislogin.explain(exc), settings.LEASE_TTL,
                            settings.LEASE_TTL / 3)
            self._redis_failed(exc)

    def _check_leases(self) -> None:
        """Close the bound connections with 1013 once their leases may have ended (no lease write
        for ``LEASE_TTL``: Redis down, full or cut off from this node).  From then on Dispatch
        routes nothing to them, and what they miss is not redelivered to them when another device
        of their user acks it: open, they would never get it; closed, they resume with ``since``
        (on another node, or here once Redis answers).  Run before any live message is written
        (:meth:`wsnode.deliveries.Deliveries.deliver`) and before a lease write's new end is recorded, so that no message
        routed after such a gap reaches a connection that missed one during it."""
        if self.draining or time.monotonic() < self._leases_until:
            return
        self._leases_until = float("inf")
        conns = self._open_bound()
        if conns:
            log.warning("node=%s leases not written for %.0f s (LEASE_TTL; Redis unavailable): Dispatch routes nothing here, "
                        "closing %d connections with %d so that they resume with since", self.address, settings.LEASE_TTL,
                        len(conns), CloseCode.TRY_AGAIN_LATER)
        self._close_to_resume(conns, "routes lost (Redis unavailable), reconnect with since")

    def _open_bound(self, user: str | None = None) -> list[PushHandler]:
        """The connections here (``user``'s, or every user's) that are bound (their lease written)
        and not closing: those a lease lost, or a message lost on its way, concerns.  Loop thread."""
        conns = self.hub.all() if user is None else self.hub.of_user(user)
        return [conn for conn in conns if conn.bound and not conn.closing]

    def _close_to_resume(self, conns: list[PushHandler], reason: str) -> None:
        """Close ``conns`` (bound connections that may have missed a message: a lease lost or a
        queue connection given up on) with 1013 and ``reason``, so that they resume with
        ``since``.  The caller logs why, in its own words.  Loop thread only."""
        for conn in conns:
            conn.close_with(CloseCode.TRY_AGAIN_LATER, reason)

    def _close_unroutable(self, lapsed: Lapsed) -> list[str]:
        """Close with 1013 the bound connections of the users whose lease a write found gone or
        ended though the node's writes worked (every user's when it was the node's own lease):
        Redis lost it (restarted without persistence or lost the last second of its append-only
        file, failed over to a replica that lacked it, was flushed, or evicted the route key under
        a ``maxmemory`` policy).  Dispatch routed nothing to them since, and what they missed is not
        redelivered to them when another device of their user acks it; closed, they resume with
        ``since``.  Run before those leases are written again, so that nothing routed after the gap
        reaches a connection that missed something during it; the renewal and the first writes
        leave a lease they find gone or ended unwritten (:class:`wsnode.registry.Lapsed`).

        A connection not bound yet is left open: its first lease write is in flight (which finds no
        lease, rightly) or done, and its replay comes after it.  Returns the users of
        ``lapsed.users`` who still hold such a connection and whose first lease write is not in
        flight: their leases are to be written again now."""
        users = sum(1 for user in lapsed.users if self._open_bound(user))  # those whose own lease went
        closing = [conn for user in (self.hub.users() if lapsed.node else lapsed.users) for conn in self._open_bound(user)]
        if closing:
            self.metrics.leases_lost(node=lapsed.node, users=users)
            found = " and ".join(text for text, shown in (("the node's own lease", lapsed.node),
                                                          (f"the leases of {users} users with connections here", users)) if shown)
            log.warning("node=%s lease write found %s gone or ended (Redis lost them: restarted without them, failed over, flushed, or evicted "
                        "them): Dispatch routed nothing to them meanwhile; closing %d connections with %d so that they resume with since",
                        self.address, found, len(closing), CloseCode.TRY_AGAIN_LATER)
        self._close_to_resume(closing, LEASE_LOST_REASON)
        return [user for user in lapsed.users if user not in self._leasing and any(not conn.closing for conn in self.hub.of_user(user))]

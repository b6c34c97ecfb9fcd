"""Whether a push node is ready: what ``GET /healthz`` answers (200 or 503, with the reasons), and
the PING of the node's Redis that keeps it honest between lease renewals.

:class:`NodeHealth` is a part of :class:`wsnode.app.PushNode` (a mixin, as
:class:`wsnode.tokenwatch.TokenWatch`), written apart because it is one concept: it uses the node's
``hub``, ``redis``, ``address``, ``draining``, ``full``, ``redis_ok``, ``redis_full``,
``redis_refused``, ``_ping_refused``, ``_consumer``, ``_revocations`` and, from
:class:`wsnode.leasekeeper.LeaseKeeper`, ``_renew``.  Loop thread only.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

import tornado.web
from redis.exceptions import RedisError

import redisfull
import redislogin

if TYPE_CHECKING:
    from wsnode.app import PushNode

log = logging.getLogger("wsnode.app")  # the node's own log, as before this part was written apart

#: How often the node PINGs Redis so that ``/healthz`` turns 503 within seconds of an outage (and
#: renews its leases as soon as Redis is back), instead of at the next lease renewal.
REDIS_PING_SECONDS = 2.0


def ping_failure(exc: BaseException) -> str:
    """What a failed ``PING`` of the node's Redis met, for its log line: a ping that got no answer
    within :data:`REDIS_PING_SECONDS` raises ``asyncio.TimeoutError``, whose text is empty (the line
    read ``PING ()``)."""
    if isinstance(exc, asyncio.TimeoutError):
        return f"no answer within {REDIS_PING_SECONDS:g} s"
    return str(exc) or type(exc).__name__


def public_health(status: dict) -> dict:
    """What ``/healthz`` says on the public port of a node that has an internal one
    (``--internal-port``): whether it is ready, as its status code says too, and nothing of what
    :meth:`NodeHealth.health` adds for operators (its Redis's answers, which name ``REDIS_URL``'s
    host and user, its broker's, its load), which the internal port's ``/healthz`` keeps."""
    return {"ready": status["ready"]}


class HealthHandler(tornado.web.RequestHandler):
    """``GET /healthz``: 200 when the node is ready, else 503; the whole of
    :meth:`NodeHealth.health`, or only :func:`public_health` (``full=False``: the public port of a
    node that has an internal one)."""

    def initialize(self, node: PushNode, full: bool = True) -> None:
        self.node = node
        self.full = full

    def get(self) -> None:
        status = self.node.health()
        self.set_status(200 if status["ready"] else 503)
        self.finish(status if self.full else public_health(status))


class NodeHealth:
    """A push node's readiness and its Redis PING (see the module).  Loop thread only."""

    def _redis_failed(self, exc: Exception) -> None:
        """A write to Redis failed: not ready until a PING and a lease write succeed; ``/healthz``
        says whether Redis refused it for lack of memory (:mod:`redisfull`), refused REDIS_URL's
        login or rights (:mod:`redislogin`), or did not answer."""
        self.redis_ok = False
        self.redis_full = redisfull.is_full(exc)
        self.redis_refused = redislogin.refused(exc)

    async def _ping_redis(self) -> None:
        """Every ``REDIS_PING_SECONDS``: keep ``redis_ok`` honest between renewals; once Redis
        answers again, renew the leases now rather than at the next renewal: a Redis restarted
        without its data lost them, and the renewal closes the connections that were unroutable
        meanwhile (:meth:`_close_unroutable`) before it writes them again."""
        try:
            await asyncio.wait_for(self.redis.ping(), REDIS_PING_SECONDS)
        except (RedisError, asyncio.TimeoutError) as exc:
            refused = redislogin.refused(exc)
            if refused is not None and refused != self._ping_refused:  # once per change, as the line below
                log.warning("node=%s Redis refuses PING: %s; not ready until it takes it (retrying every %.0f s)", self.address, refused,
                            REDIS_PING_SECONDS)
            elif refused is None and (self.redis_ok or self._ping_answered or self._ping_refused is not None):
                log.warning("node=%s Redis does not answer PING (%s); not ready until it does", self.address, ping_failure(exc))
            self.redis_ok = False
            self.redis_full = False
            self.redis_refused = self._ping_refused = refused
            self._ping_answered = False
            return
        self._ping_refused = None
        self._ping_answered = True
        if not self.redis_ok:
            await self._renew()

    def health(self) -> dict:
        consumer_ok = self._consumer is not None and self._consumer.connected
        full = self.full
        redis_down = self.redis_refused or (redisfull.HINT if self.redis_full else "Redis unavailable")
        not_consuming = "queue consumer not connected to the broker"
        if not consumer_ok and self._consumer is not None and self._consumer.refused is not None:
            not_consuming += f": {self._consumer.refused}"
        problems = [text for text, bad in ((redis_down, not self.redis_ok), (not_consuming, not consumer_ok),
                                           ("draining", self.draining), ("full: MAX_CONNECTIONS connections", full)) if bad]
        return {
            "ready": not problems,
            "reason": "; ".join(problems) or None,
            "node": self.address,
            "redis": self.redis_ok,
            "queue": consumer_ok,
            "draining": self.draining,
            "full": full,
            # Not a part of "ready": a token is checked against the revocation list by auth at
            # every connect, so new connections are safe without it, and once the subscription is
            # back every open connection is checked against the list (revocations made
            # meanwhile close theirs then).  It is what an operator watches for a node that hears
            # no revocations (its Redis user without channel rights).
            "revocations": self._revocations.subscribed,
            "connections": self.hub.connection_count,
            "users": self.hub.user_count,
            "time": time.time(),
        }

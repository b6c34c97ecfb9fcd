"""The revocation list, kept in Redis so that every Auth process sees it.

Loop thread only: the ``redis.asyncio`` client passed in belongs to the loop that runs this object.

Two kinds of entry, each expiring as soon as it can no longer matter, so Redis never grows
without bound:

- ``auth:revoked:jti:<jti>`` -> ``1``: that one token; expires :data:`CLOCK_MARGIN_SECONDS` after
  the token itself (none is written for a token that expired longer ago than that).
- ``auth:revoked:user:<user_id>`` -> a cutoff in unix microseconds: every token of that user
  issued at or before the cutoff.  A token issued in the very microsecond of the cutoff is revoked
  too.  The entry expires :data:`CLOCK_MARGIN_SECONDS` after the last token it covers (cutoff +
  ``token_ttl``), so it assumes ``token_ttl`` is the lifetime the service issues tokens with.  A
  later revocation only ever moves the cutoff forward, and never the expiry back (made under a
  shorter ``token_ttl``).

Whether a token expired is decided by auth's clock, and Redis expires keys by its own: so each
entry is written with a time to live counted from auth's clock (never an absolute time, which
Redis would read by its clock: an auth ``N`` seconds behind Redis lost each entry ``N`` seconds
before its token expired, and a token revoked in its last ``N`` seconds was not recorded at all),
plus :data:`CLOCK_MARGIN_SECONDS` for auth processes whose clocks disagree with each other.

Each revocation recorded is also published on the Redis channel :data:`CHANNEL`, as JSON
``{"user_id": ..., "token_id": <jti>}`` (one token) or ``{"user_id": ..., "cutoff_us": ...}``
(every token of the user issued up to then): push nodes close the connections it covers
(:mod:`wsnode.revocations`).  A node reads the entries itself (:func:`revoked_by`) only after
losing its subscription, so a revocation recorded but not published would leave the connections
with its tokens open until they expire: a failed publish raises ``RevocationNotAnnounced``, and
the caller must revoke again (writing the entry again is harmless, and the retry publishes it).

Redis errors (down, timeout) surface as ``RevocationsUnavailable``: callers must then refuse the
token, never accept it unchecked.  A Redis that refuses the login or the command of ``REDIS_URL``
(:func:`redislogin.refused`) surfaces as its subclass ``RedisRefused``, whose message says what to fix.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable

import redis.asyncio
from redis.exceptions import RedisError

import redisfull
import redislogin
from auth import AuthError
from auth.tokens import Claims

log = logging.getLogger(__name__)

JTI_PREFIX = "auth:revoked:jti:"
USER_PREFIX = "auth:revoked:user:"
#: Where each revocation is published for the push nodes.
CHANNEL = "auth:revocations"
#: Seconds an entry outlives the last token it covers: another auth process whose clock runs up to
#: this much behind the one that wrote it still finds it until the token has expired by its clock.
CLOCK_MARGIN_SECONDS = 60


def revoked_by(by_jti: object, user_cutoff: object, issued_at_us: int) -> bool:
    """Whether a token issued at ``issued_at_us`` is revoked, given the values Redis holds under
    its ``JTI_PREFIX`` key and its user's ``USER_PREFIX`` key (None where there is no key).  Pure."""
    return by_jti is not None or (user_cutoff is not None and issued_at_us <= int(user_cutoff))

# KEYS[1] user key; ARGV[1] cutoff (us); ARGV[2] milliseconds the entry must live from now.  Keeps
# the larger cutoff and the later expiry: an entry made when TOKEN_TTL was longer covers tokens
# that live that long, so a later revocation must not shorten it.  Times to live only, never
# Redis's clock (TIME, EXAT): auth's clock decides when the tokens expire.
_MOVE_CUTOFF_FORWARD = """
local stored = redis.call('GET', KEYS[1])
local moved = (not stored) or tonumber(ARGV[1]) > tonumber(stored)
local left_ms = redis.call('PTTL', KEYS[1])
local keeps_later = left_ms >= tonumber(ARGV[2])
if moved then
  if keeps_later then
    redis.call('SET', KEYS[1], ARGV[1], 'KEEPTTL')
  else
    redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  end
  return 1
end
if not keeps_later then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""


class RevocationsUnavailable(AuthError):
    """Redis did not answer, so a revocation cannot be checked or recorded; retry later."""


class RedisFull(RevocationsUnavailable):
    """Redis answered but refused to record a revocation: it is over ``maxmemory`` (``noeviction``),
    see :mod:`redisfull`.  Reads (``/verify``) still work; retry the revocation once it has room."""


class RedisRefused(RevocationsUnavailable):
    """Redis answered but refused REDIS_URL's login or command (its password or user changed, the
    user's rights narrowed, its certificate replaced), which waiting does not end: the message is
    :func:`redislogin.refused`'s, naming the variable and the fix.  Retried as an outage is (an
    operator may fix Redis without restarting auth)."""


class RevocationNotAnnounced(AuthError):
    """The revocation is recorded (new connections with its tokens are refused) but could not be
    published, so the push nodes keep the connections already open with them; revoke again."""


class Revocations:
    """Records and checks revoked tokens and users; loop thread only."""

    def __init__(self, redis_client: redis.asyncio.Redis, token_ttl: int, clock: Callable[[], float] = time.time) -> None:
        self._redis = redis_client
        self._token_ttl = token_ttl
        self._clock = clock  # auth's, which tokens expire by (AuthService's)
        self._move_cutoff = redis_client.register_script(_MOVE_CUTOFF_FORWARD)

    async def revoke_token(self, claims_or_jti: Claims | str, expires_at: int) -> None:
        """Revoke one token until ``expires_at`` (unix seconds), after which it is dead anyway."""
        jti = claims_or_jti.jti if isinstance(claims_or_jti, Claims) else claims_or_jti
        if not isinstance(jti, str) or not jti:
            raise ValueError(f"expected a token's jti (a non-empty string) or its Claims, got {claims_or_jti!r}")
        live_ms = self._live_ms(expires_at)
        if live_ms > 0:  # else the token is dead for every auth already: nothing to record
            await self._call(self._redis.set(JTI_PREFIX + jti, 1, px=live_ms))
        if isinstance(claims_or_jti, Claims):
            await self._publish({"user_id": claims_or_jti.user_id, "token_id": jti})

    async def revoke_user(self, user_id: str, at: float) -> None:
        """Revoke every token of ``user_id`` issued at or before ``at`` (unix seconds)."""
        cutoff_us = math.floor(at * 1_000_000)
        live_ms = self._live_ms(at + self._token_ttl)
        if live_ms > 0:  # else every token it covers is dead already
            await self._call(self._move_cutoff(keys=[USER_PREFIX + user_id], args=[cutoff_us, live_ms]))
        await self._publish({"user_id": user_id, "cutoff_us": cutoff_us})

    def _live_ms(self, until: float) -> int:
        """Milliseconds from now, by auth's clock, that an entry covering tokens that expire at
        ``until`` (unix seconds) must live: to then, plus :data:`CLOCK_MARGIN_SECONDS`."""
        return math.ceil((until + CLOCK_MARGIN_SECONDS - self._clock()) * 1000)

    async def _publish(self, revocation: dict) -> None:
        """Tell the push nodes, or raise ``RevocationNotAnnounced``: a subscribed node hears of a
        revocation only from this message, so its failure must reach the caller, who retries."""
        try:
            await self._redis.publish(CHANNEL, json.dumps(revocation))
        except (RedisError, OSError) as exc:
            raise RevocationNotAnnounced(f"revocation of user={revocation['user_id']} recorded but not announced on {CHANNEL} "
                                         f"({type(exc).__name__}: {exc}); check that the Redis user of REDIS_URL may publish "
                                         f"on {CHANNEL} and that Redis answers") from None

    async def is_revoked(self, claims: Claims) -> bool:
        """Whether the token is revoked, by itself or with its user; one round trip (MGET)."""
        return (await self.are_revoked([claims]))[0]

    async def are_revoked(self, many: list[Claims]) -> list[bool]:
        """:meth:`is_revoked` for each of ``many``, in order, in one round trip (one MGET)."""
        if not many:
            return []
        keys = [key for claims in many for key in (JTI_PREFIX + claims.jti, USER_PREFIX + claims.user_id)]
        values = await self._call(self._redis.mget(keys))
        return [revoked_by(by_jti, user_cutoff, claims.issued_at_us) for claims, by_jti, user_cutoff in zip(many, values[0::2], values[1::2])]

    async def ping(self) -> None:
        """Raise ``RevocationsUnavailable`` unless Redis answers the read that :meth:`are_revoked`
        sends (an ``MGET`` of a token's and a user's entry, of no real token): a PING is answered
        for a user whose rights were narrowed so that it may not read the list (``-mget``, its key
        patterns), and ``/healthz`` answered 200 while every ``/verify`` answered 503 (and each
        probe ended the outage, whose ERROR line the next ``/verify`` wrote again)."""
        await self._call(self._redis.mget([JTI_PREFIX + "healthz", USER_PREFIX + "healthz"]))

    @staticmethod
    async def _call(awaitable):
        try:
            return await awaitable
        except (RedisError, OSError) as exc:
            if redisfull.is_full(exc):
                raise RedisFull(f"{redisfull.HINT} (REDIS_URL's server refused a write: {exc})") from None
            if (refused := redislogin.refused(exc)) is not None:  # the password, the rights or the certificate changed
                raise RedisRefused(refused) from None
            raise RevocationsUnavailable(f"Redis did not answer ({type(exc).__name__}: {exc}); check REDIS_URL and that Redis is running") from None

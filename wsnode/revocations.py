"""Tokens revoked while their connections are open: the node closes those connections.

Auth publishes every revocation it records on the Redis channel ``auth.revocations.CHANNEL``:
``{"user_id": ..., "token_id": <jti>}`` for one token, ``{"user_id": ..., "cutoff_us": ...}`` for
every token of a user issued up to then.  :class:`RevocationListener` holds one pub/sub connection
of the node's own and hands each revocation to the node, which closes every connection of that
user that it covers (:func:`covers`) with 4401 ``token revoked``: the browser's client asks its
backend for a new token, which a logged-out or banned user does not get.  The node keeps no
tokens, only each connection's :class:`~wsnode.auth.Identity` (token id and issue time), which
auth's ``/verify`` answers with.  A connection whose token was checked just before a revocation
came, and that binds just after it, is refused as it binds (:class:`RecentRevocations`).

A message published while the listener is not subscribed (Redis restarted, the connection
dropped) never reaches it.  So each time it subscribes again after losing its connection, the
node checks every connection against the revocation list itself (:func:`keys_of`, the keys auth
reads, one ``MGET`` per thousand connections) and closes the ones revoked meanwhile.  A token
check that began before such a catch-up and binds (or refreshes) after it began was neither in
that check nor covered by an announcement: the node reads the list for that one token as it binds
(``PushNode.revocation_checks``).

Loop thread only: the listener is a task on the node's event loop (``redis.asyncio``).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

import redislogin
from auth.revocations import CHANNEL, JTI_PREFIX, USER_PREFIX

log = logging.getLogger(__name__)

#: Seconds between two attempts to subscribe again after the pub/sub connection was lost.
RESUBSCRIBE_SECONDS = 1.0
#: After this many seconds without a message the listener sends a PING on its connection, and
#: takes the connection for lost when no answer came after as long again: a connection that died
#: without a reset (a network partition) is otherwise silent for ever.
PING_SECONDS = 30.0
#: Seconds the listener waits for Redis's answer to its SUBSCRIBE.
SUBSCRIBE_SECONDS = 10.0


@dataclass(frozen=True)
class Revocation:
    user_id: str
    #: One token (its jti), or None for every token of the user issued up to ``cutoff_us``.
    token_id: str | None = None
    cutoff_us: int | None = None


def parse(data: str | bytes) -> Revocation | None:
    """The revocation a message of the channel announces, or None (logged) for anything else.  Pure
    but for the log."""
    try:
        body = json.loads(data)
        user_id, token_id, cutoff_us = body["user_id"], body.get("token_id"), body.get("cutoff_us")
        if isinstance(user_id, str) and (isinstance(token_id, str) != isinstance(cutoff_us, int)):
            return Revocation(user_id, token_id if isinstance(token_id, str) else None, cutoff_us if isinstance(cutoff_us, int) else None)
    except (ValueError, TypeError, KeyError):
        pass
    log.warning("ignored a message on %s that is not a revocation: %r", CHANNEL, data[:200])
    return None


def covers(revocation: Revocation, identity) -> bool:
    """Whether ``revocation`` revokes the token of ``identity`` (a :class:`~wsnode.auth.Identity`,
    or None for a connection that has none).  A token whose issue time auth did not say is taken
    as issued before any cutoff of its user, as the node's check against the revocation list
    takes it (``issued_at_us or 0``): a user's revocation closes it rather than leaving it open.  Pure."""
    if identity is None or identity.token_id is None or identity.user_id != revocation.user_id:
        return False
    if revocation.token_id is not None:
        return identity.token_id == revocation.token_id
    return revocation.cutoff_us is not None and (identity.issued_at_us or 0) <= revocation.cutoff_us


def keys_of(identity) -> tuple[str, str]:
    """The two keys of auth's revocation list that say whether ``identity``'s token is revoked
    (read them with ``auth.revocations.revoked_by``).  Pure."""
    return JTI_PREFIX + identity.token_id, USER_PREFIX + identity.user_id


class RecentRevocations:
    """The revocations of the last ``seconds``, for the connections whose token was checked
    before a revocation reached the node and that bind after it (the check's answer was on its
    way): the node refuses those as it binds them.  Bounded by time only, kept by user: a count
    bound let a burst of revocations (a "log everyone out" script) push out one a moment old, and
    its token then got a working connection.  Pure: the caller passes the clock."""

    def __init__(self, seconds: float = 10.0) -> None:
        self._seconds = seconds
        self._order: deque[tuple[float, Revocation]] = deque()  # oldest first, for forgetting
        self._of_user: dict[str, list[Revocation]] = {}

    def add(self, revocation: Revocation, now: float) -> None:
        self._forget(now)
        self._order.append((now, revocation))
        self._of_user.setdefault(revocation.user_id, []).append(revocation)

    def covering(self, identity, now: float) -> bool:
        """Whether a revocation of the last ``seconds`` covers ``identity``'s token."""
        self._forget(now)
        if identity is None:
            return False
        return any(covers(revocation, identity) for revocation in self._of_user.get(identity.user_id, ()))

    def _forget(self, now: float) -> None:
        while self._order and self._order[0][0] < now - self._seconds:
            _, old = self._order.popleft()
            theirs = self._of_user[old.user_id]
            theirs.remove(old)  # an equal one, if several: the same to covering()
            if not theirs:
                del self._of_user[old.user_id]

    def __len__(self) -> int:
        return len(self._order)


class RevocationListener:
    """Subscribes to ``CHANNEL`` and calls ``on_revocation`` for each revocation; once subscribed,
    and again after losing the subscription, awaits ``on_resubscribed`` (the node's catch-up: the
    node takes connections before its first subscription is made, so a revocation published in
    between would otherwise go unseen)."""

    def __init__(self, redis_url: str, client_name: str, on_revocation: Callable[[Revocation], None],
                 on_resubscribed: Callable[[], Awaitable[None]]) -> None:
        # socket_timeout bounds the commands (SUBSCRIBE, PING) on a Redis that stopped answering;
        # the wait for a message has its own (PING_SECONDS).
        self._redis = aioredis.Redis.from_url(redis_url, socket_connect_timeout=5, socket_timeout=10, client_name=client_name)
        self._on_revocation = on_revocation
        self._on_resubscribed = on_resubscribed
        self._task: asyncio.Task | None = None
        self._stopping = False
        self.subscribed = False

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        """End the subscription; within a second or two whatever Redis does."""
        self._stopping = True
        self.subscribed = False
        task = self._task
        if task is not None:
            # redis-py can take a cancellation that lands while get_message waits for its timeout
            # for that timeout, and return None (seen with Python 3.11): cancel until it ends.
            for _ in range(20):
                task.cancel()
                done, _ = await asyncio.wait({task}, timeout=0.1)
                if done:
                    break
            else:
                log.warning("the listener of %s did not stop within 2 s; left behind", CHANNEL)
        try:
            await asyncio.wait_for(self._redis.aclose(), 2)
        except (asyncio.TimeoutError, RedisError, OSError) as exc:
            log.warning("closing the connection of the listener of %s: %r", CHANNEL, exc)

    async def _run(self) -> None:
        lost, first, refused = False, True, None
        while not self._stopping:
            pubsub = self._redis.pubsub()
            try:
                await pubsub.subscribe(CHANNEL)
                await _confirmed(pubsub)
                self.subscribed, refused = True, None
                if lost or first:
                    if lost:
                        log.info("subscribed to %s again: checking the open connections against the revocation list", CHANNEL)
                    await self._on_resubscribed()
                    lost = first = False
                awaiting_pong = False
                while not self._stopping:
                    message = await pubsub.get_message(timeout=PING_SECONDS)
                    if message is None:
                        if awaiting_pong:
                            raise ConnectionError(f"no answer to a PING within {PING_SECONDS:g} s")
                        await pubsub.ping()
                        awaiting_pong = True
                    elif message.get("type") == "pong":
                        awaiting_pong = False
                    elif message.get("type") == "message" and (revocation := parse(message["data"])) is not None:
                        self._on_revocation(revocation)
            except Exception as exc:  # noqa: BLE001 - the listener must outlive any one failure
                if self._stopping:
                    return
                if not isinstance(exc, (RedisError, OSError)):
                    log.exception("the listener of %s failed; subscribing again", CHANNEL)
                elif (now_refused := redislogin.refused(exc)) is not None:
                    if now_refused != refused:  # once per change, as a lost subscription
                        log.warning("no subscription to %s: %s; revocations made meanwhile are checked once it is back", CHANNEL, now_refused)
                    refused = now_refused
                elif not lost or refused is not None:
                    log.warning("lost the subscription to %s (%s); revocations made meanwhile are checked once it is back", CHANNEL, exc)
                    refused = None
                self.subscribed, lost = False, True
            finally:
                try:
                    await pubsub.aclose()
                except (RedisError, OSError):
                    pass
            if not self._stopping:
                await asyncio.sleep(RESUBSCRIBE_SECONDS)


async def _confirmed(pubsub) -> None:
    """Wait for Redis's answer to the SUBSCRIBE just sent: redis-py sends it without reading the
    answer, so a refusal (NOPERM, a user without the channel) came with the next read, after the
    listener had said it was subscribed again, once a second.  Raises what Redis answered instead,
    or :class:`ConnectionError` when nothing comes within :data:`SUBSCRIBE_SECONDS`."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + SUBSCRIBE_SECONDS
    while (left := deadline - loop.time()) > 0:
        message = await pubsub.get_message(timeout=left)
        if message is not None and message.get("type") == "subscribe":
            return
    raise RedisConnectionError(f"no answer to SUBSCRIBE {CHANNEL} within {SUBSCRIBE_SECONDS:g} s")

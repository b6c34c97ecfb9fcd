"""What a push node does about the tokens of its connections, after the handshake: a client's
``refresh`` checked with auth, expired tokens closed, revocations applied (announced, or read from
auth's revocation list after the node missed announcements), and a token check that overlapped a
catch-up read again.  Every one of them closes with 4401.

:class:`TokenWatch` is a part of :class:`wsnode.app.PushNode` (a mixin), written apart because it is
one concept: it uses the node's ``hub``, ``auth``, ``redis``, ``metrics``, ``expiries``,
``revocation_checks``, ``_recent_revocations``, ``_refreshing``, ``answer`` and
``_refuse_unbound``, which :class:`~wsnode.app.PushNode` sets up.  Loop thread only.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from redis.exceptions import RedisError
from tornado.ioloop import IOLoop

from auth.revocations import revoked_by
from wsnode import protocol
from wsnode.auth import AuthRejected, AuthUnavailable
from wsnode.closecodes import CloseCode, short_reason
from wsnode.revocations import Revocation, covers, keys_of

if TYPE_CHECKING:
    from wsnode.handler import PushHandler

log = logging.getLogger("wsnode.app")  # the node's own log, as before this part was written apart


class TokenWatch:
    """The token checks of a push node's open connections (see the module).  Loop thread only."""

    async def _not_revoked_while_checked(self, conn: PushHandler) -> bool:
        """Whether ``conn`` (in the hub, not bound yet) may still be bound once its token is read
        from the revocation list; otherwise it is refused here (4401, or 1013 when Redis cannot be
        read).  For a connection whose token check began before the last catch-up: auth may have
        answered it before a revocation that the node missed and the catch-up did not judge for it.
        It is in the hub by now, so a catch-up or an announcement from here on covers it."""
        identity = conn.identity
        if identity.token_id is None:  # no revocation closes it (wsnode.revocations.covers)
            return True
        try:
            revoked = await self._listed_as_revoked(identity)
        except RedisError as exc:
            if self.hub.get(conn.conn_id) is conn and not conn.closing:
                self._refuse_unbound(conn, CloseCode.TRY_AGAIN_LATER, why=f"revocation list not read ({exc})")
            return False
        if self.hub.get(conn.conn_id) is not conn or conn.closing:
            return False  # closed meanwhile (by the drain, an announced revocation...): told and counted once
        if revoked:
            self._refuse_unbound(conn, CloseCode.UNAUTHORIZED, "token revoked",
                                 why="token revoked while it was checked, unannounced to this node (read from the revocation list)")
            return False
        if self.draining:
            self._refuse_unbound(conn, CloseCode.GOING_AWAY, why="the node began draining while the revocation list was read")
            return False
        return True

    async def _listed_as_revoked(self, identity) -> bool:
        """Whether auth's revocation list revokes ``identity``'s token (which has a ``token_id``),
        read from Redis (one ``MGET``), as the catch-up reads it; a ``RedisError`` is raised, after
        marking Redis down (the next PING says when it is back)."""
        try:
            by_jti, cutoff = await self.redis.mget(keys_of(identity))
        except RedisError:
            self.redis_ok = False
            raise
        return revoked_by(by_jti, cutoff, identity.issued_at_us or 0)

    def refresh(self, conn: PushHandler, token: str) -> None:
        """A client sent a newer token for its open connection (``{"type": "refresh"}``): checked
        with auth, off this call; one at a time per connection (another that comes meanwhile is
        answered ``refresh_error``, and auth is not asked)."""
        if self.hub.get(conn.conn_id) is not conn or conn.closing:
            return  # refused or closing already: its close handshake may still bring frames
        if conn in self._refreshing:
            self.metrics.refresh("busy")
            self.answer(conn, protocol.refresh_error_frame("a refresh is in flight: wait for its answer"))
            return
        self._refreshing.add(conn)
        IOLoop.current().spawn_callback(self._refresh, conn, token)

    async def _refresh(self, conn: PushHandler, token: str) -> None:
        """The connection goes on with the new token's identity and expiry, and is told when it
        expires now (``refreshed``).  A token that auth refuses, that is another user's, or that was
        revoked while it was checked closes the connection with 4401, as it would refuse a new
        one.  When auth cannot be asked, the connection stays as it was and the client is told to
        try again (``refresh_error``)."""
        seen = self.revocation_checks
        try:
            identity = await self.auth.verify(token)
            # A catch-up that began meanwhile judged the connection's previous token, not this one.
            while seen != self.revocation_checks and identity.user_id == conn.user_id and identity.token_id is not None:
                seen = self.revocation_checks
                if await self._listed_as_revoked(identity):
                    self._refused_refresh(conn, "refresh refused: token revoked")
                    return
        except AuthRejected as exc:
            self._refused_refresh(conn, f"refresh refused: {exc}")
            return
        except (AuthUnavailable, RedisError) as exc:
            log.warning("conn=%s user=%s node=%s token refresh not checked: %s", conn.conn_id, conn.user_id, self.address, exc)
            self.metrics.refresh("unavailable")
            unavailable = "auth" if isinstance(exc, AuthUnavailable) else "revocation list (Redis)"
            self.answer(conn, protocol.refresh_error_frame(f"{unavailable} unavailable, try again"))
            return
        finally:
            self._refreshing.discard(conn)
        if identity.user_id != conn.user_id:
            self._refused_refresh(conn, "refresh refused: the token is another user's")
        elif self._recent_revocations.covering(identity, time.monotonic()):
            self._refused_refresh(conn, "refresh refused: token revoked")
        elif self.hub.get(conn.conn_id) is conn and not conn.closing:
            conn.identity = identity
            self.expiries.set(conn, identity.expires_at)
            self.metrics.refresh("ok")
            log.debug("conn=%s user=%s node=%s token refreshed, expires at %s", conn.conn_id, conn.user_id, self.address, identity.expires_at)
            self.answer(conn, protocol.refreshed_frame(identity.expires_at, time.time()))

    def _refused_refresh(self, conn: PushHandler, why: str) -> None:
        if self.hub.get(conn.conn_id) is conn and not conn.closing:
            self.metrics.refresh("rejected")
            self._close_unauthorized(conn, why)

    def _close_expired(self) -> None:
        """Every second: close the connections whose token expired ``TOKEN_EXPIRY_GRACE`` seconds
        ago and was not refreshed (4401 "token expired": the client reconnects with a new token)."""
        for conn in self.expiries.due(time.time()):
            if conn.closing:
                continue
            self._close_unauthorized(conn, "token expired", why=f"token expired at {conn.identity.expires_at} and was not refreshed")

    def _on_revocation(self, revocation: Revocation) -> None:
        """Auth revoked a token, or every token of a user up to now: close the connections here
        that it covers (4401), and forget the cached checks, so that no cached answer opens a new
        connection with a revoked token."""
        self.auth.forget()
        self._recent_revocations.add(revocation, time.monotonic())
        for conn in self.hub.of_user(revocation.user_id):
            if covers(revocation, conn.identity):
                self._close_unauthorized(conn, "token revoked")

    async def _check_revocations(self) -> None:
        """After the revocation listener lost its subscription: close the connections whose token
        was revoked meanwhile, read from the revocation list itself (one MGET per thousand)."""
        # Each connection with the identity its keys were read for: a refresh during the read
        # replaces it with a token auth checked just then, which this read must not judge.
        pairs = [(conn, conn.identity) for conn in self.hub.all() if conn.identity is not None and conn.identity.token_id is not None]
        # With the list of connections, before any wait: a token check that began before this
        # point and binds (or refreshes) after it reads the list itself (attach, _refresh).
        self.revocation_checks += 1
        self.auth.forget()
        closed = 0
        for at in range(0, len(pairs), 1000):
            chunk = pairs[at:at + 1000]
            values = await self.redis.mget([key for _, identity in chunk for key in keys_of(identity)])
            for (conn, identity), by_jti, cutoff in zip(chunk, values[0::2], values[1::2]):
                if conn.identity is identity and revoked_by(by_jti, cutoff, identity.issued_at_us or 0) and not conn.closing:
                    self._close_unauthorized(conn, "token revoked")
                    closed += 1
        log.info("node=%s checked %d connections against the revocation list: %d revoked", self.address, len(pairs), closed)

    def _close_unauthorized(self, conn: PushHandler, reason: str, why: str | None = None) -> None:
        """Close a bound connection with 4401 and ``reason`` (what the client sees), logged with
        ``why`` (default: the reason)."""
        if conn.closing:
            return
        if not conn.bound:  # revoked while its lease was written: it never worked, it is refused
            self._refuse_unbound(conn, CloseCode.UNAUTHORIZED, short_reason(reason), why=f"{why or reason} while the lease was written")
            return
        log.info("conn=%s user=%s node=%s closed with %d: %s", conn.conn_id, conn.user_id, self.address, CloseCode.UNAUTHORIZED, why or reason)
        conn.close_with(CloseCode.UNAUTHORIZED, short_reason(reason))

"""The WebSocket endpoint ``/ws``: one handler per browser connection.

Loop thread only.  Lifecycle (Tornado's): ``prepare`` runs before the upgrade and checks the
origin, ``since`` and the token; ``open`` drops what only the handshake needed, then binds the
connection through the node, or closes it at once with the code the check chose (4401 bad token,
4500 bad request, 1013 auth unavailable); ``on_message`` only runs after ``open`` finished,
records acks (at most one per message frame written, plus an allowance: :mod:`wsnode.acks`) and
hands token refreshes to the node; ``on_close`` unbinds.
Every refusal is logged with its reason and counted in the node's metrics by close code (or HTTP
status, before the upgrade); so is every close the node makes.  No token is ever logged (the token
is only in the query string, which no log line shows).
"""

from __future__ import annotations

import logging
import secrets

from tornado import httputil
from tornado.iostream import StreamClosedError
from tornado.log import app_log
from tornado.web import HTTPError
from tornado.websocket import WebSocketClosedError, WebSocketHandler

from wsnode import protocol, reader, wire
from wsnode.acks import ACK_ALLOWANCE, AckBudget
from wsnode.auth import AuthRejected, AuthUnavailable, Identity
from wsnode.closecodes import CloseCode, short_reason
from wsnode.session import Session

log = logging.getLogger(__name__)


class PushHandler(WebSocketHandler):
    def initialize(self, node) -> None:
        self.node = node
        self.conn_id = secrets.token_hex(8)
        self.user_id: str | None = None
        self.identity: Identity | None = None  # the token's, for revocations (wsnode.revocations)
        self.session: Session | None = None
        #: The node's ``revocation_checks`` when its token check began: ``attach`` reads the
        #: revocation list for its token when a catch-up began since (``PushNode.revocation_checks``).
        self.revocation_checks_seen: int | None = None
        self.acks = AckBudget()
        self._refusal: tuple[CloseCode, str] | None = None
        #: The refusal's log level when its cause is logged once per change elsewhere (auth down).
        self._refusal_level: int | None = None
        #: Bound and counted as connected (its lease written, hello sent): only such a connection
        #: counts as a disconnect when it closes.
        self.bound = False
        # on_close ran.  Tornado calls it at once when the client leaves during ``prepare``'s
        # token check, then still upgrades the dead socket and calls ``open``, and never calls
        # ``on_close`` again: ``open`` must not bind such a connection (it would stay bound).
        self._left = False

    def _request_summary(self) -> str:
        """What Tornado's own log lines say of the request: without the query string, which holds
        the token (Tornado's has the whole URI)."""
        return f"{self.request.method} {self.request.path} ({self.request.remote_ip})"

    def log_exception(self, typ, value, tb) -> None:
        """Tornado's, without the request's ``repr`` (it holds the URI, so the token): an error the
        handshake did not expect is logged with its traceback, the method, path and address."""
        if isinstance(value, HTTPError):
            super().log_exception(typ, value, tb)  # with _request_summary, above
            return
        app_log.error("Uncaught exception %s", self._request_summary(), exc_info=(typ, value, tb))

    def get_websocket_protocol(self):
        """Tornado's protocol with the node's frame reader (:mod:`wsnode.reader`)."""
        return reader.protocol_for(self)

    def decode_argument(self, value: bytes, name: str | None = None) -> str:
        """A query argument as text, with bytes that are not UTF-8 (a percent-escape such as
        ``%ff``) read as U+FFFD: such a token is then refused as invalid (4401) and such a
        ``since`` as not a message id (4500), as the README says, where Tornado's own decoding
        answered the handshake with HTTP 400."""
        return value.decode("utf-8", errors="replace")

    def check_origin(self, origin: str) -> bool:
        """Whether ``origin`` is in ``ALLOWED_ORIGINS``; the refusal is logged and counted where
        Tornado's check is made (:meth:`prepare`), which refuses some requests without asking this
        (``Sec-Fetch-Site: cross-site`` with no ``Origin``)."""
        return self.node.origin_allowed(origin)

    async def prepare(self) -> None:
        """Before the upgrade: refuse a draining or full node's requests, then one from an origin
        not in ``ALLOWED_ORIGINS`` (403), check ``since`` and the token.

        This is ``prepare`` rather than an override of ``get`` because Tornado's ``get`` runs for
        the connection's whole life (it awaits the frame loop): a coroutine of ours around it
        would stay in memory for every connection."""
        if self.node.draining:
            self._unavailable("draining", "node is draining: connect to another node")
            return
        if self.node.full:
            self._unavailable(f"full ({self.node.hub.connection_count} connections, MAX_CONNECTIONS)",
                              "node holds as many connections as it may (MAX_CONNECTIONS): connect to another node")
            return
        if (refused := self._check_cross_origin(self.check_origin)) is not None:
            # Tornado's ``get`` makes this same check, but only after ``prepare``: here it comes
            # before the token check, so a page of another origin cannot make the node ask auth
            # (a token check per handshake it sends).  The answer was 403
            # either way.  ``_check_cross_origin`` is Tornado's own algorithm (6.5+:
            # ``Sec-Fetch-Site``, then ``Origin``), so both agree.  It is private, and no public
            # API of Tornado 6.6 runs it before ``prepare`` (``check_origin`` is only the hook
            # that ``get`` calls; ``check_trusted_origin`` is skipped for GET): requirements.txt
            # pins Tornado, and test_bad_input's 403 test fails (500) on one without it.
            log.info("conn=%s node=%s rejected with 403: %s (ALLOWED_ORIGINS)", self.conn_id, self.node.address, refused[:300])
            self.node.metrics.rejected(403)
            self.set_status(403)
            self.finish("Cross origin websockets not allowed")
            return
        self.node.checking.add(self)
        try:
            since = protocol.parse_since(self.get_query_argument("since", None))
            self.revocation_checks_seen = self.node.revocation_checks  # before the check, which may be the cache's
            identity = await self.node.auth.verify(self.get_query_argument("token", None))
            if self._finished:
                return  # answered meanwhile: the node drained (drained_during_check)
            self.identity = identity
            self.user_id = identity.user_id
            self.session = self.node.new_session(since)
        except protocol.ProtocolError as exc:
            self._refusal = (exc.code, exc.reason)
        except AuthRejected as exc:
            self._refusal = (CloseCode.UNAUTHORIZED, short_reason(str(exc)))
        except AuthUnavailable as exc:
            # INFO: the outage itself is a WARNING once per change (wsnode.auth), not one per connect.
            log.info("conn=%s node=%s refused, auth unavailable: %s", self.conn_id, self.node.address, exc)
            self._refusal = (CloseCode.TRY_AGAIN_LATER, CloseCode.TRY_AGAIN_LATER.reason)
            self._refusal_level = logging.INFO
        finally:
            self.node.checking.discard(self)

    def drained_during_check(self) -> None:
        """The node drained while auth had still not answered this handshake's token check:
        answered with HTTP 503, as a handshake that came during the drain (the check's answer is
        then dropped).  A check that finishes during the drain gets 1001 instead (``attach``);
        one still waiting when the node's loop ends would be cancelled, and answered 500."""
        if not self._finished and not self._left:
            self._unavailable("the node drained while auth had not answered its token check",
                              "node is draining: connect to another node")

    def _unavailable(self, why: str, error: str) -> None:
        """Refuse the handshake with HTTP 503 before the upgrade: logged with ``why``, counted,
        ``error`` in the body."""
        log.info("conn=%s node=%s rejected with 503: %s", self.conn_id, self.node.address, why)
        self.node.metrics.rejected(503)
        self.set_status(503)
        self.finish({"error": error})

    async def open(self) -> None:
        self._forget_handshake()
        if self._left:
            log.info("conn=%s user=%s node=%s left during its handshake: not bound", self.conn_id, self.user_id, self.node.address)
            return
        if self._refusal is not None:
            self.refuse(*self._refusal, level=self._refusal_level)
            return
        await self.node.attach(self)

    def _forget_handshake(self) -> None:
        """Drop what only the handshake needed: the request's and the response's headers and the
        query string (it holds the token, which no longer stays in memory).  A browser sends a
        dozen headers or more, so this is a good part of an idle connection's memory."""
        request = self.request
        request.headers = httputil.HTTPHeaders()
        request.uri = request.path
        request.query = ""
        request.query_arguments = request.arguments = {}
        self._headers = httputil.HTTPHeaders()  # the response's, sent already (Tornado has no public way to drop them)

    def on_message(self, message: str | bytes) -> None:
        """One frame from the client.  The frames that one read from the socket brought are all
        handled (:mod:`wsnode.reader`), also after one of them closed the connection: a bad frame
        closes (and is logged and counted) once, and an ack that came before the client saw the
        close frame is still recorded.  A refused connection's frames (its close handshake may
        still bring some) are ignored: it was never bound to anyone."""
        if self._refusal is not None:
            return
        try:
            frame = protocol.parse_client_frame(message, self.node.ack_ids)
        except protocol.ProtocolError as exc:
            self._close_for_frame(exc.code, str(exc), exc.reason)
            return
        if isinstance(frame, protocol.Refresh):
            self.node.refresh(self, frame.token)
            return
        if isinstance(frame, protocol.Ping):
            self.node.answer(self, protocol.PONG_FRAME)
            return
        if not self.acks.take(len(frame.ids)):
            self._close_for_frame(CloseCode.BAD_REQUEST, f"an ack past the message frames written to it (and {ACK_ALLOWANCE} more)",
                                  "more acks than messages sent on this connection")
            return
        self.node.receipts.add_many(frame.ids, self.user_id, "acked")

    def on_text_not_utf8(self) -> None:
        """A text frame whose payload is not UTF-8 (:mod:`wsnode.reader`): a bad frame like any
        other (RFC 6455 lets the endpoint say 1007; 4500 tells a client not to reconnect until
        it is fixed, as for a binary frame)."""
        if self._refusal is not None:
            return
        exc = protocol.ProtocolError("text frame is not UTF-8: send JSON text")
        self._close_for_frame(exc.code, str(exc), exc.reason)

    def _close_for_frame(self, code: CloseCode, why: str, reason: str) -> None:
        if self.closing:
            return  # closed already, by an earlier frame of the same read or by the node
        log.info("conn=%s user=%s node=%s closed with %d: %s", self.conn_id, self.user_id, self.node.address, code, why)
        self.close_with(code, reason)

    def on_pong(self, data: bytes) -> None:
        self.node.pings.pong(self, data)

    def on_close(self) -> None:
        self._left = True
        if self.session is not None and self._refusal is None:
            self.node.detach(self)

    @property
    def closing(self) -> bool:
        """Whether the connection is closed or closing: nothing more can be written to it."""
        proto = self.ws_connection
        return proto is None or proto.is_closing()

    @property
    def unsent_bytes(self) -> int:
        """Bytes written to the connection that its socket has not taken yet (what Tornado's
        stream holds; the kernel's send buffer is not counted).  Grows while the client reads
        slower than messages come.  Tornado 6.6's stream attribute (pinned); tested in
        tests/integration/test_slow_client.py."""
        proto = self.ws_connection
        return 0 if proto is None or proto.stream is None else len(proto.stream._write_buffer)

    def send(self, frames: list[tuple[str | None, str]]) -> list[str]:
        """Write ``(message id, frame)`` pairs in order, with one write to the socket, and record a
        ``written`` receipt per message; returns the ids of the messages written: all of them, or
        none when the connection is closed (the store keeps them: the client gets them from
        ``since`` or its inbox)."""
        try:
            self._write_texts([frame for _, frame in frames])
        except WebSocketClosedError:
            return []
        written = [message_id for message_id, _ in frames if message_id is not None]
        if written:
            self.acks.written(len(written))
            self.node.receipts.add_many(written, self.user_id, "written")
        return written

    def _write_texts(self, frames: list[str]) -> None:
        """What ``write_message(frame)`` does for each text frame, with one stream write for all.

        Tornado's ``write_message`` writes each frame to the stream on its own (a ``send`` system
        call and a Future each) and wraps each write in an asyncio Task for callers that await
        it; the node never awaits, and a busy node writes several frames to a connection per
        queue batch.  This does the protocol's part per frame (byte count, permessage-deflate
        when negotiated, the frame header: :mod:`wsnode.wire`) and writes the frames together,
        dropping the stream's Future: a write that fails closes the stream, which completes
        that Future and marks its error retrieved, and ``on_close`` follows.  It uses Tornado
        6.6's protocol attributes (pinned); tests/integration/test_handler_write.py checks them."""
        if self.closing:
            raise WebSocketClosedError()
        proto = self.ws_connection
        compressor = proto._compressor
        parts: list[bytes] = []
        for frame in frames:
            data = frame.encode("utf-8")
            proto._message_bytes_out += len(data)
            if compressor is not None:
                data = compressor.compress(data)
            parts.append(wire.text_frame_header(len(data), compressed=compressor is not None))
            parts.append(data)
        if not parts:
            return
        data = b"".join(parts)
        proto._wire_bytes_out += len(data)
        try:
            proto.stream.write(data)
        except StreamClosedError:
            raise WebSocketClosedError() from None

    def refuse(self, code: CloseCode, reason: str | None = None, why: str | None = None, level: int | None = None) -> None:
        """Close a connection that was never bound (or was unbound at once): logged with ``why``
        (default: the close reason, which the client sees) and counted as rejected.  At WARNING
        for 1013 (a backend is down), unless ``level`` says otherwise: INFO where the outage is
        logged once per change (auth unavailable, a lease write Redis did not take), since one
        WARNING per refused connect in a reconnect storm buried it."""
        self._refusal = (code, reason or code.reason)
        if level is None:
            level = logging.WARNING if code == CloseCode.TRY_AGAIN_LATER else logging.INFO
        log.log(level, "conn=%s user=%s node=%s rejected with %d: %s", self.conn_id, self.user_id, self.node.address, code, why or self._refusal[1])
        self.node.metrics.rejected(code)
        self.close(code, short_reason(self._refusal[1]))

    def close_with(self, code: CloseCode, reason: str | None = None) -> None:
        """Close a bound connection; counted by code.  One that is closing already is left alone
        (Tornado would not send a second close frame, so it is not counted again)."""
        if self.closing:
            return
        self.node.metrics.closed(code)
        self.close(code, short_reason(reason or code.reason))

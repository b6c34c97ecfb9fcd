"""The one table of WebSocket close codes a push node uses.  Pure.

Ranges tell a client what to do: 1001/1009/1011/1013 and 4000-4499 mean reconnect (with backoff;
4401 only after getting a new token); 4500-4999 mean a client bug: do not reconnect until fixed.
Reasons are short (a close frame carries at most 123 bytes of reason).
"""

from __future__ import annotations

import enum


class CloseCode(enum.IntEnum):
    #: The client did not answer the node's ping within ``PING_TIMEOUT`` (a dead peer, a frozen
    #: tab): reconnect with backoff and ``since``.
    PING_TIMED_OUT = 1000
    #: The node is shutting down or draining: reconnect now, the load balancer sends you elsewhere.
    GOING_AWAY = 1001
    #: The answer to a client's close frame that no endpoint may send: a code reserved or out of
    #: range (1005, 1006, under 1000, 5000 and over), or a body of one byte.  The client was closing.
    PROTOCOL_ERROR = 1002
    #: The answer to a client's close frame whose reason is not UTF-8.  The client was closing.
    INVALID_PAYLOAD = 1007
    #: A frame larger than ``MAX_FRAME_BYTES`` (:mod:`wsnode.reader`, with Tornado's reason), or one
    #: whose compressed payload inflates past it (``message too big after decompression``).
    MESSAGE_TOO_BIG = 1009
    #: Reserved for an unexpected error on the node (reconnect with backoff and resume with
    #: ``since``); not sent by this version: Tornado aborts a connection whose callback raised
    #: (the client sees 1006) after the error is logged.
    INTERNAL_ERROR = 1011
    #: A backend (auth, Redis, the worker) is unavailable right now: reconnect with backoff.
    TRY_AGAIN_LATER = 1013
    #: The client read too slowly: more than ``CLIENT_QUEUE_MAX_BYTES`` waited for its socket when
    #: new messages came.  Reconnect with ``since``: what it missed comes from the store.
    SLOW_CLIENT = 4008
    #: The token is missing, bad, expired or revoked: get a new token, then reconnect.
    UNAUTHORIZED = 4401
    #: The user already holds ``MAX_USER_CONNECTIONS`` connections on this node: reconnect with
    #: backoff (to another node, or once one of the user's connections closed).  Also the user made
    #: ``MAX_USER_CONNECTS`` connects within its window, on any node: the reason says when to retry
    #: (``too many connects of this user, retry in N s``, :mod:`wsnode.connectrate`).
    TOO_MANY_CONNECTIONS = 4429
    #: The client sent a frame that is not a JSON object with a known ``type`` (a binary frame,
    #: a text frame that is not UTF-8, where RFC 6455 would allow 1007), a bad ``since``, or
    #: more acks than the message frames written to it allow (:mod:`wsnode.acks`).
    BAD_REQUEST = 4500

    @property
    def reason(self) -> str:
        return _REASONS[self]

    @property
    def reconnect(self) -> bool:
        """Whether a client should reconnect after this code (4401: with a fresh token)."""
        return not 4500 <= self <= 4999


_REASONS = {
    CloseCode.PING_TIMED_OUT: "ping timed out",
    CloseCode.GOING_AWAY: "node shutting down, reconnect elsewhere",
    CloseCode.PROTOCOL_ERROR: "bad close frame",
    CloseCode.INVALID_PAYLOAD: "close reason is not UTF-8",
    CloseCode.MESSAGE_TOO_BIG: "message too big",  # Tornado's own, which clients may already match
    CloseCode.INTERNAL_ERROR: "internal error, reconnect with since",
    CloseCode.TRY_AGAIN_LATER: "backend unavailable, try again later",
    CloseCode.SLOW_CLIENT: "client too slow, reconnect with since",
    CloseCode.UNAUTHORIZED: "token missing, bad, expired or revoked",
    CloseCode.TOO_MANY_CONNECTIONS: "too many connections of this user on this node",
    CloseCode.BAD_REQUEST: "bad request",
}

MAX_REASON_BYTES = 123


def short_reason(text: str) -> str:
    """``text`` cut to fit a close frame (123 bytes of UTF-8)."""
    data = text.encode()[:MAX_REASON_BYTES]
    return data.decode(errors="ignore")

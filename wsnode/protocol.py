"""The WebSocket frames between a push node and a browser.  Pure: strings in, strings out.

Server -> client (JSON text frames):

- ``{"type": "hello", "node": "<address>", "user": "<user id>", "conn": "<connection id>",
  "expires_at": <unix s>, "expires_in": <s>}``, first: ``expires_*`` say when the connection's
  token expires, as a unix time and in seconds from now by the node's clock (null when auth did
  not say); ``ping``: true, the node answers ``ping`` frames (nodes of earlier versions close a
  connection that sends one with 4500, and say nothing here); ``ack_ids``: the most ids one
  ``ack`` frame may carry in its ``ids`` list, as many as fit in ``MAX_FRAME_BYTES`` (145 at its
  default), at most :data:`MAX_ACK_IDS` (nodes of earlier versions take ``id`` only, close a
  connection that sends ``ids`` with 4500, and say nothing here).
- ``{"type": "message", "id": "<message id>", "data": <data>}``, one per message.
- ``{"type": "resumed", "since": "<id>" | null, "replayed": <n>, "truncated": <bool>}`` after the
  opening replay: what ``since`` asked for, or without ``since`` the user's unacked inbox; live
  messages follow it.  ``truncated`` means the replay reached past the retention,
  ``REPLAY_LIMIT`` or ``REPLAY_MAX_BYTES``: older messages are gone.  ``cursor`` (an id): a client that has seen no
  message yet resumes with ``since=<cursor>`` (everything after it is replayed or came live).
- ``{"type": "refreshed", "expires_at": <unix s>, "expires_in": <s>}``: the node took the token of
  a ``refresh``, and the connection now expires with it.
- ``{"type": "refresh_error", "reason": "..."}``: the node could not check a ``refresh`` now (auth
  unavailable, Redis unavailable for the revocation list, or another refresh in flight): the
  connection stays as it was; send it again later.
- ``{"type": "pong"}``: the answer to a client's ``ping``.

A connection whose token expired is closed with 4401 ``token expired`` ``TOKEN_EXPIRY_GRACE``
seconds later, unless a ``refresh`` gave it a newer token first (:mod:`wsnode.expiry`).

Client -> server: ``{"type": "ack", "id": "<message id>"}`` or ``{"type": "ack", "ids": ["<message
id>", ...]}`` (the acks of several message frames in one frame, at most hello's ``ack_ids``: a
client that acks what one read brought sends one frame instead of one per message, which costs
the node one frame to read and parse instead of many), ``{"type": "refresh", "token":
"<a new token of the same user>"}``, and ``{"type": "ping"}``, which a client sends to learn
whether its connection still works (a browser's JavaScript cannot see WebSocket ping frames, and a
connection whose network went away can look open for many minutes).  Anything else closes the
connection with 4500 (``CloseCode.BAD_REQUEST``) and a reason naming what was wrong.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from tasks import wirejson
from tasks.ids import is_message_id
from wsnode.closecodes import CloseCode, short_reason


class ProtocolError(ValueError):
    """A client frame or request the node refuses; ``code`` is the close code to use."""

    def __init__(self, message: str, code: CloseCode = CloseCode.BAD_REQUEST) -> None:
        super().__init__(message)
        self.code = code

    @property
    def reason(self) -> str:
        return short_reason(str(self))


#: The most message ids one ``ack`` frame may carry (``ids``), whatever ``MAX_FRAME_BYTES`` allows.
MAX_ACK_IDS = 1000
#: What an ``ack`` frame of ids takes beyond its ids, and each id in it, written by ``json.dumps``
#: (``{"type": "ack", "ids": [`` ... ``]}``, ``"<24 hex>", ``); ``JSON.stringify`` writes less.
ACK_FRAME_BYTES = 26
ACK_ID_BYTES = 28


def ack_ids_limit(max_frame_bytes: int) -> int:
    """How many ids an ``ack`` frame may carry on a node that takes frames of up to
    ``max_frame_bytes`` (``MAX_FRAME_BYTES``): as many as fit, at most :data:`MAX_ACK_IDS`; what
    ``hello`` tells clients (``ack_ids``), so that a frame of that many never closes with 1009."""
    return max(1, min(MAX_ACK_IDS, (max_frame_bytes - ACK_FRAME_BYTES) // ACK_ID_BYTES))


@dataclass(frozen=True)
class Ack:
    """The acks of one frame: one id (``id``) or several (``ids``), in the order sent."""

    ids: tuple[str, ...]


@dataclass(frozen=True)
class Refresh:
    token: str


@dataclass(frozen=True)
class Ping:
    pass


def parse_client_frame(frame: str | bytes, max_ack_ids: int = MAX_ACK_IDS) -> Ack | Refresh | Ping:
    """Parse one frame from a browser; raises :class:`ProtocolError`.  ``max_ack_ids``: the most
    ids an ``ack`` frame may carry, what the node's ``hello`` said (``ack_ids``)."""
    if isinstance(frame, bytes):
        raise ProtocolError("binary frames are not accepted: send JSON text")
    try:
        value = wirejson.loads(frame)
    except (ValueError, RecursionError):
        raise ProtocolError("frame is not JSON") from None
    if not isinstance(value, dict):
        raise ProtocolError("frame must be a JSON object with a type")
    kind = value.get("type")
    if kind is None:
        raise ProtocolError("frame has no type: expected {\"type\": \"ack\", \"id\": ...}")
    if kind == "ack":
        return Ack(_ack_ids(value, max_ack_ids))
    if kind == "refresh":
        token = value.get("token")
        if not isinstance(token, str) or not token:
            raise ProtocolError("refresh needs a token: {\"type\": \"refresh\", \"token\": \"...\"}")
        return Refresh(token)
    if kind == "ping":
        return Ping()
    raise ProtocolError(f"unknown frame type {str(kind)[:40]!r}: expected ack, refresh or ping")


def _ack_ids(value: dict, most: int) -> tuple[str, ...]:
    """The ids an ``ack`` frame names: ``id``, or the list ``ids`` (1 to ``most``), not both."""
    if "ids" not in value:
        if not is_message_id(value.get("id")):
            raise ProtocolError("ack needs the id of a message frame (\"id\"), or a list of them (\"ids\")")
        return (value["id"],)
    if "id" in value:
        raise ProtocolError("ack has both id and ids: send one id as \"id\" or several as \"ids\"")
    ids = value["ids"]
    if not isinstance(ids, list) or not ids:
        raise ProtocolError("ack ids must be a non-empty list of message ids")
    if len(ids) > most:
        raise ProtocolError(f"ack has {len(ids)} ids: send at most hello's ack_ids ({most}) in one frame")
    if not all(is_message_id(message_id) for message_id in ids):
        raise ProtocolError("ack ids must all be ids of message frames")
    return tuple(ids)


def origin_allowed(origin: str, allowed: tuple[str, ...]) -> bool:
    """Whether a handshake's ``Origin`` header names one of ``allowed`` (``settings.ALLOWED_ORIGINS``,
    already in the form browsers send: ``scheme://host[:port]`` in lower case, or ``*``).  Scheme
    and host are compared without regard to case, as origins are (a client other than a browser
    may send ``https://App.example.com``), and a trailing ``/`` is ignored.  Pure."""
    return "*" in allowed or origin.rstrip("/").lower() in allowed


def parse_since(value: str | None) -> str | None:
    """Validate the ``since`` query argument (absent, or a message id)."""
    if value is None or value == "":
        return None
    if not is_message_id(value):
        raise ProtocolError("since must be the id of a message frame")
    return value


def message_frame(envelope: dict) -> str:
    """The frame for one envelope; built once per envelope, written to every recipient.  ``data``
    as compact JSON with non-ASCII kept (orjson: a tenth of the standard library's cost)."""
    return '{"type":"message","id":%s,"data":%s}' % (wirejson.text(envelope["id"]), wirejson.text(envelope["data"]))


def expires_in(expires_at: int | None, now: float) -> float | None:
    """Seconds from ``now`` (the node's clock) until ``expires_at``, to a tenth; what a client
    schedules its refresh from, so that its own clock's error does not matter."""
    return None if expires_at is None else max(0.0, round(expires_at - now, 1))


def hello_frame(node: str, user: str, conn: str, expires_at: int | None = None, now: float = 0.0, ack_ids: int = 1) -> str:
    """``ack_ids``: :func:`ack_ids_limit` of the node's ``MAX_FRAME_BYTES``."""
    return json.dumps({"type": "hello", "node": node, "user": user, "conn": conn, "expires_at": expires_at,
                       "expires_in": expires_in(expires_at, now), "ping": True, "ack_ids": ack_ids})


def refreshed_frame(expires_at: int | None, now: float) -> str:
    return json.dumps({"type": "refreshed", "expires_at": expires_at, "expires_in": expires_in(expires_at, now)})


def refresh_error_frame(reason: str) -> str:
    return json.dumps({"type": "refresh_error", "reason": reason})


PONG_FRAME = '{"type":"pong"}'


def resumed_frame(since: str | None, replayed: int, truncated: bool, cursor: str | None = None) -> str:
    frame = {"type": "resumed", "since": since, "replayed": replayed, "truncated": truncated}
    if cursor is not None:  # from workers of this version on
        frame["cursor"] = cursor
    return json.dumps(frame)

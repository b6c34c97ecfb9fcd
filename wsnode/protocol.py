"""The WebSocket frames between a push node and a browser.  Pure: strings in, strings out.

Server -> client (JSON text frames):

- ``{"type": "hello", "node": "<address>", "user": "<user id>", "conn": "<connection id>"}``, first.
- ``{"type": "message", "id": "<message id>", "data": <data>}``, one per message.
- ``{"type": "resumed", "since": "<id>" | null, "replayed": <n>, "truncated": <bool>}`` after the
  opening replay: what ``since`` asked for, or without ``since`` the user's unacked inbox; live
  messages follow it.  ``truncated`` means the replay reached past the retention or
  ``REPLAY_LIMIT``: older messages are gone.

Client -> server: ``{"type": "ack", "id": "<message id>"}``.  Anything else closes the connection
with 4500 (``CloseCode.BAD_REQUEST``) and a reason naming what was wrong.
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


@dataclass(frozen=True)
class Ack:
    id: str


def parse_client_frame(frame: str | bytes) -> Ack:
    """Parse one frame from a browser; raises :class:`ProtocolError`."""
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
        message_id = value.get("id")
        if not is_message_id(message_id):
            raise ProtocolError("ack needs the id of a message frame")
        return Ack(message_id)
    raise ProtocolError(f"unknown frame type {str(kind)[:40]!r}: expected ack")


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


def hello_frame(node: str, user: str, conn: str) -> str:
    return json.dumps({"type": "hello", "node": node, "user": user, "conn": conn})


def resumed_frame(since: str | None, replayed: int, truncated: bool) -> str:
    return json.dumps({"type": "resumed", "since": since, "replayed": replayed, "truncated": truncated})

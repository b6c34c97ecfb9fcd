"""The bytes of WebSocket frames (RFC 6455, section 5.2): the headers of the text frames a push
node writes, and the headers of the frames it reads.  Pure.

The node writes every frame a connection gets from one queue batch with one write to its socket
(:meth:`wsnode.handler.PushHandler.send`), rather than one per frame as Tornado's
``write_message`` does: under load a connection gets several messages per batch, and each write
costs a ``send`` system call, a Future and a turn of Tornado's write path, on the node and, on
the receiving side, one more wake-up of the browser's (or benchmark client's) reader.

A server's frames are not masked (section 5.1), so a frame is its header and its payload.
:func:`read_header` serves the node's reader (:mod:`wsnode.reader`), which parses every frame one
read from the socket brought instead of awaiting three reads per frame.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

from wsnode.closecodes import CloseCode

FIN = 0x80
RSV1 = 0x40  # "per-message compressed" under permessage-deflate (RFC 7692)
OPCODE_TEXT = 0x1

_LENGTH_16 = struct.Struct("!BBH")
_LENGTH_64 = struct.Struct("!BBQ")
_LENGTH_16_ONLY = struct.Struct("!H")
_LENGTH_64_ONLY = struct.Struct("!Q")


def text_frame_header(length: int, compressed: bool = False) -> bytes:
    """The header of one final, unmasked text frame whose payload is ``length`` bytes; with
    ``compressed`` the RSV1 bit says the payload went through permessage-deflate."""
    if length < 0:
        raise ValueError(f"a payload length cannot be negative, got {length}")
    first = FIN | OPCODE_TEXT | (RSV1 if compressed else 0)
    if length < 126:
        return bytes((first, length))
    if length <= 0xFFFF:
        return _LENGTH_16.pack(first, 126, length)
    return _LENGTH_64.pack(first, 127, length)


class FrameHeader(NamedTuple):
    """A frame's header as read from the wire: the first byte (FIN, RSV1-3, opcode), the payload's
    length and masking key (``None`` when unmasked), and where the payload starts."""

    first: int
    length: int
    mask: bytes | None
    start: int


def read_header(buffer: bytes | bytearray, at: int = 0) -> FrameHeader | None:
    """The header of the frame that starts at ``buffer[at]``, or ``None`` while the buffer does
    not hold all of it yet.  Reads the header only: the caller checks the length before it waits
    for (or buffers) the payload."""
    available = len(buffer) - at
    if available < 2:
        return None
    first, second = buffer[at], buffer[at + 1]
    length = second & 0x7F
    start = at + 2
    if length == 126:
        if available < 4:
            return None
        length = _LENGTH_16_ONLY.unpack_from(buffer, start)[0]
        start += 2
    elif length == 127:
        if available < 10:
            return None
        length = _LENGTH_64_ONLY.unpack_from(buffer, start)[0]
        start += 8
    mask = None
    if second & 0x80:
        if len(buffer) < start + 4:
            return None
        mask = bytes(buffer[start:start + 4])
        start += 4
    return FrameHeader(first, length, mask, start)


#: Close codes a peer may send (RFC 6455, section 7.4, and IANA's registry): 1004, 1005, 1006 and
#: 1015 are reserved and never sent, 1016-2999 are for later versions of the protocol, and codes
#: under 1000 or from 5000 on are not close codes at all.
_SENDABLE_CLOSE_CODES = frozenset(range(1000, 1015)) - {1004, 1005, 1006}


def close_problem(payload: bytes) -> tuple[CloseCode, str] | None:
    """What is wrong with the payload of a close frame a peer sent, as the close code and reason
    to answer it with (RFC 6455, sections 5.5.1, 7.1.6 and 7.4.1), or None: a body of one byte
    (a code is two), a code no peer may send, or a reason that is not UTF-8.  Pure."""
    if not payload:
        return None
    if len(payload) == 1:
        return CloseCode.PROTOCOL_ERROR, "close frame of one byte"
    (code,) = _LENGTH_16_ONLY.unpack_from(payload)
    if code not in _SENDABLE_CLOSE_CODES and not 3000 <= code <= 4999:
        return CloseCode.PROTOCOL_ERROR, f"close code {code} may not be sent"
    try:
        payload[2:].decode("utf-8")
    except UnicodeDecodeError:
        return CloseCode.INVALID_PAYLOAD, CloseCode.INVALID_PAYLOAD.reason
    return None

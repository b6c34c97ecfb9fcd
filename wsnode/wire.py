"""The bytes of the WebSocket text frames a push node writes (RFC 6455, section 5.2).  Pure.

The node writes every frame a connection gets from one queue batch with one write to its socket
(:meth:`wsnode.handler.PushHandler.send`), rather than one per frame as Tornado's
``write_message`` does: under load a connection gets several messages per batch, and each write
costs a ``send`` system call, a Future and a turn of Tornado's write path, on the node and, on
the receiving side, one more wake-up of the browser's (or benchmark client's) reader.

A server's frames are not masked (section 5.1), so a frame is its header and its payload.
"""

from __future__ import annotations

import struct

FIN = 0x80
RSV1 = 0x40  # "per-message compressed" under permessage-deflate (RFC 7692)
OPCODE_TEXT = 0x1

_LENGTH_16 = struct.Struct("!BBH")
_LENGTH_64 = struct.Struct("!BBQ")


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

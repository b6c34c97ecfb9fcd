"""The node's WebSocket protocol: Tornado's, with a reader that handles every frame one read from
the socket brought.  Loop thread only.

Tornado's ``WebSocketProtocol13`` reads each frame with three awaited reads (header, mask,
payload), each a Future and a coroutine step, and re-registers the socket with the event loop at
every wake-up.  A browser sends one small ``ack`` frame per message it gets, so under load that
per-frame cost was the largest part of a node's loop (43% of its busy samples in a ``py-spy``
profile of the batch benchmark, against 37% for writing the batches).  :class:`BatchReadingProtocol`
reads whatever the socket holds (up to :data:`READ_CHUNK` bytes) and handles every complete frame
in it: the same checks, in the same order, with the same outcome as Tornado's ``_receive_frame``
(a frame over ``max_message_size`` closes with 1009 as soon as its header is read; reserved bits,
a fragmented or oversized control frame, or a continuation with nothing to continue abort the
connection), then Tornado's own ``_handle_message`` (permessage-deflate, text, binary, ping, pong,
close), except that a text message that is not UTF-8 goes to the handler's ``on_text_not_utf8``,
that a close frame whose code no peer may send, of one byte, or with a reason that is not UTF-8
is answered with 1002 or 1007 (:func:`wsnode.wire.close_problem`; Tornado echoed the code, and
dropped the connection on such a reason), and that after a 1009 the reader drops what the client still sends until its close frame comes
(Tornado's close timeout, 5 s, at most): Tornado dropped the connection at once, with the rest of
the frame unread, and the reset that sent reached a client still writing it before the close
frame did (Chromium and Tornado's client saw 1006 for a frame of a few megabytes).  It relies on Tornado 6.6's protocol attributes (pinned);
``tests/integration/test_reader.py`` runs it against Tornado's client and against raw frames.
"""

from __future__ import annotations

import asyncio

from tornado.iostream import StreamClosedError
from tornado.util import _websocket_mask
from tornado.websocket import WebSocketProtocol13, _DecompressTooLargeError, _WebSocketParams

from wsnode import wire
from wsnode.closecodes import CloseCode

#: The most bytes taken from the socket's buffer in one read.
READ_CHUNK = 65536
#: After this many bytes (a frame counting at least :data:`_FRAME_COST`) the reader lets the loop
#: run other callbacks before it reads on, as Tornado's reader does.
_YIELD_AFTER = 256 * 1024
_FRAME_COST = 1024


class BatchReadingProtocol(WebSocketProtocol13):
    #: A frame over the size limit closed the connection (1009): from then on only the client's
    #: close frame is read, every other frame is dropped unread.
    _too_big = False
    #: Bytes of a dropped frame's payload still to come.
    _skip = 0

    async def _receive_frame_loop(self) -> None:
        try:
            buffer = bytearray()
            work = 0
            while not self.client_terminated:
                chunk = await self.stream.read_bytes(READ_CHUNK, partial=True)
                self._wire_bytes_in += len(chunk)
                buffer += chunk
                at, frames = await self._handle_frames(buffer)
                del buffer[:at]
                work += len(chunk) + frames * _FRAME_COST
                if work >= _YIELD_AFTER:
                    work = 0
                    await asyncio.sleep(0)
        except StreamClosedError:
            self._abort()
        finally:
            self.handler.on_ws_connection_close(self.close_code, self.close_reason)

    async def _handle_frames(self, buffer: bytearray) -> tuple[int, int]:
        """Handle the complete frames at the start of ``buffer``; returns where the first frame
        not handled starts (incomplete, or after the connection ended) and how many were."""
        at = frames = 0
        while not self.client_terminated:
            if self._skip:
                dropped = min(self._skip, len(buffer) - at)
                at += dropped
                self._skip -= dropped
                if self._skip:
                    break
            header = wire.read_header(buffer, at)
            if header is None:
                break
            if not self._header_allowed(header):
                break
            if self._too_big and header.first & self.OPCODE_MASK != 0x8:
                at, self._skip = header.start, header.length
                continue
            end = header.start + header.length
            if end > len(buffer):
                break
            data = bytes(buffer[header.start:end])
            if header.mask is not None:
                data = _websocket_mask(header.mask, data)
            at = end
            frames += 1
            handled = self._frame(header.first, data)
            if handled is not None:
                await handled
        return at, frames

    def _header_allowed(self, header: wire.FrameHeader) -> bool:
        """Tornado's checks of a frame's header; False once they aborted (a frame over the size
        limit closes with 1009 and is dropped as it comes: :attr:`_too_big`)."""
        opcode = header.first & self.OPCODE_MASK
        reserved = header.first & self.RSV_MASK
        if self._decompressor is not None and opcode != 0:
            # The first frame of a message says whether it is compressed.
            self._frame_compressed = bool(reserved & self.RSV1)
            reserved &= ~self.RSV1
        if reserved:
            self._abort()  # an extension the client did not negotiate
            return False
        if opcode & 0x8 and header.length >= 126:
            self._abort()  # control frames carry at most 125 bytes
            return False
        size = header.length + (len(self._fragmented_message_buffer) if self._fragmented_message_buffer is not None else 0)
        if size > self.params.max_message_size:
            # Not Tornado's abort: the rest of the frame would be left unread, and closing a socket
            # with unread bytes sends a reset, which can reach a client still sending before the
            # close frame does.  The frame and what follows it are dropped as they come instead.
            self.close(CloseCode.MESSAGE_TOO_BIG, CloseCode.MESSAGE_TOO_BIG.reason)
            self._too_big = True
            self._fragmented_message_buffer = None
        return True

    def _frame(self, first: int, data: bytes):
        """Tornado's handling of one frame's payload: fragments gathered, a whole message to
        ``_handle_message`` (whose Future, when any, is returned)."""
        is_final = first & self.FIN
        opcode = first & self.OPCODE_MASK
        if opcode & 0x8:
            if not is_final:
                self._abort()  # control frames are never fragmented
                return None
        elif opcode == 0:  # continuation
            if self._fragmented_message_buffer is None:
                self._abort()
                return None
            self._fragmented_message_buffer.extend(data)
            if is_final:
                opcode = self._fragmented_message_opcode
                data = bytes(self._fragmented_message_buffer)
                self._fragmented_message_buffer = None
        else:  # a new message
            if self._fragmented_message_buffer is not None:
                self._abort()  # the previous one is not finished
                return None
            if not is_final:
                self._fragmented_message_opcode = opcode
                self._fragmented_message_buffer = bytearray(data)
        if is_final:
            return self._handle_message(opcode, data)
        return None

    def _handle_message(self, opcode: int, data: bytes):
        """Tornado's, except for a text message that is not UTF-8: Tornado drops the connection
        without a close frame (the client sees 1006, and reconnects to send it again); here the
        handler's ``on_text_not_utf8`` decides (the node closes with 4500, as for any bad frame).
        The text path below is Tornado 6.6's, decompression included."""
        if opcode == 0x8 and not self.client_terminated and (problem := wire.close_problem(data)) is not None:
            # Tornado echoed whatever code came (1005 and 1006 included, which no endpoint may
            # send), answered a one-byte body with an empty close, and dropped the connection
            # without a close frame when the reason was not UTF-8 (its decode raised).
            self.client_terminated = True
            self.close(*problem)
            return None
        if opcode != 0x1 or self.client_terminated:
            return super()._handle_message(opcode, data)
        if self._frame_compressed:
            try:
                data = self._decompressor.decompress(data)
            except _DecompressTooLargeError:
                self.close(CloseCode.MESSAGE_TOO_BIG, CloseCode.MESSAGE_TOO_BIG.reason + " after decompression")
                self._abort()
                return None
        self._message_bytes_in += len(data)
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            self.handler.on_text_not_utf8()
            return None
        return self._run_callback(self.handler.on_message, text)


def protocol_for(handler) -> BatchReadingProtocol | None:
    """What ``WebSocketHandler.get_websocket_protocol`` returns (Tornado 6.6's), with this reader:
    version 13 only, the handler's ping, size and compression settings, unmasked frames out."""
    if handler.request.headers.get("Sec-WebSocket-Version") != "13":
        return None
    params = _WebSocketParams(ping_interval=handler.ping_interval, ping_timeout=handler.ping_timeout,
                              max_message_size=handler.max_message_size, compression_options=handler.get_compression_options())
    return BatchReadingProtocol(handler, False, params)

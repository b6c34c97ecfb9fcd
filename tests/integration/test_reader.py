"""``wsnode.reader``: the node's frame reader, on a real Tornado server on loopback, against
Tornado's client (plain and permessage-deflate) and against raw frames written to a socket (many
in one write, one split over many writes, fragments, control frames, and the frames it must
refuse as Tornado's reader does)."""

from __future__ import annotations

import asyncio
import os
import struct

import pytest
import tornado.web
import tornado.websocket
from tornado.httpserver import HTTPServer
from tornado.testing import bind_unused_port

from tests.integration.wsclient import raw_connect, read_server_frame
from wsnode import reader

MAX_MESSAGE = 1000


class Recorder(tornado.websocket.WebSocketHandler):
    """Records what arrives; uses the node's protocol."""

    messages: list
    closed: asyncio.Event

    def get_websocket_protocol(self):
        return reader.protocol_for(self)

    def get_compression_options(self):
        return {}  # offered; a client that does not ask gets none

    @property
    def max_message_size(self):
        return MAX_MESSAGE

    def open(self) -> None:
        assert isinstance(self.ws_connection, reader.BatchReadingProtocol)

    def on_message(self, message) -> None:
        Recorder.messages.append(message)

    def on_text_not_utf8(self) -> None:
        Recorder.messages.append("<not UTF-8>")
        self.close(4500, "not UTF-8")

    def on_close(self) -> None:
        Recorder.closed.set()


@pytest.fixture
async def port():
    Recorder.messages, Recorder.closed = [], asyncio.Event()
    sock, port = bind_unused_port()
    server = HTTPServer(tornado.web.Application([("/ws", Recorder)]))
    server.add_sockets([sock])
    yield port
    server.stop()


async def wait_for_messages(count: int, timeout: float = 5.0) -> list:
    for _ in range(int(timeout / 0.01)):
        if len(Recorder.messages) >= count:
            break
        await asyncio.sleep(0.01)
    return Recorder.messages


@pytest.mark.parametrize("compress", [False, True], ids=["plain", "permessage-deflate"])
async def test_frames_from_tornados_client_arrive_in_order(port, compress):
    client = await tornado.websocket.websocket_connect(f"ws://127.0.0.1:{port}/ws", compression_options={} if compress else None)
    sent = [f'{{"type":"ack","id":"{i:024x}"}}' for i in range(500)] + ["x" * MAX_MESSAGE, b"\x00\x01binary"]
    for message in sent:
        client.write_message(message, binary=isinstance(message, bytes))

    assert await wait_for_messages(len(sent)) == sent
    client.close()
    await asyncio.wait_for(Recorder.closed.wait(), 5)


# --- raw frames ------------------------------------------------------------------------------

def frame(opcode: int, payload: bytes, fin: bool = True, rsv: int = 0, masked: bool = True, length: int | None = None) -> bytes:
    """A client frame: masked unless told otherwise; ``length`` overrides the declared length."""
    n = len(payload) if length is None else length
    head = bytes([(0x80 if fin else 0) | rsv | opcode])
    bit = 0x80 if masked else 0
    if n < 126:
        head += bytes([bit | n])
    elif n <= 0xFFFF:
        head += bytes([bit | 126]) + struct.pack("!H", n)
    else:
        head += bytes([bit | 127]) + struct.pack("!Q", n)
    if not masked:
        return head + payload
    mask = os.urandom(4)
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


async def closes_without_close_frame(stream: asyncio.StreamReader) -> bool:
    """Whether the server dropped the connection (an abort) rather than closing it cleanly."""
    return await asyncio.wait_for(stream.read(), 5) == b""


async def test_many_frames_in_one_write_are_all_handled(port):
    _, writer = await raw_connect(port)
    writer.write(b"".join(frame(0x1, f"m{i}".encode()) for i in range(300)))

    assert await wait_for_messages(300) == [f"m{i}" for i in range(300)]
    writer.close()


async def test_a_frame_split_over_many_writes_is_handled_once_whole(port):
    _, writer = await raw_connect(port)
    data = frame(0x1, b"y" * 300) + frame(0x1, b"after")
    for byte in data:
        writer.write(bytes([byte]))
        await writer.drain()

    assert await wait_for_messages(2) == ["y" * 300, "after"]
    writer.close()


async def test_fragments_make_one_message_and_a_ping_between_them_gets_its_pong(port):
    stream, writer = await raw_connect(port)
    writer.write(frame(0x1, b"hel", fin=False) + frame(0x9, b"p1") + frame(0x0, b"lo ", fin=False) + frame(0x0, b"world"))

    assert await read_server_frame(stream) == (0xA, b"p1")
    assert await wait_for_messages(1) == ["hello world"]
    writer.close()


async def test_a_close_frame_is_answered_and_ends_the_connection(port):
    stream, writer = await raw_connect(port)
    writer.write(frame(0x1, b"last") + frame(0x8, struct.pack("!H", 1000)))

    opcode, payload = await read_server_frame(stream)
    assert (opcode, payload[:2]) == (0x8, struct.pack("!H", 1000))
    await asyncio.wait_for(Recorder.closed.wait(), 5)
    assert Recorder.messages == ["last"]
    writer.close()


@pytest.mark.parametrize(("payload", "answer"), [
    (struct.pack("!H", 1000) + "bye".encode(), struct.pack("!H", 1000)),  # echoed, as RFC 6455 says
    (struct.pack("!H", 4001), struct.pack("!H", 4001)),
    (b"", b""),
    (b"\x03", struct.pack("!H", 1002) + b"close frame of one byte"),
    (struct.pack("!H", 1005), struct.pack("!H", 1002) + b"close code 1005 may not be sent"),
    (struct.pack("!H", 1006), struct.pack("!H", 1002) + b"close code 1006 may not be sent"),
    (struct.pack("!H", 999), struct.pack("!H", 1002) + b"close code 999 may not be sent"),
    (struct.pack("!H", 5000), struct.pack("!H", 1002) + b"close code 5000 may not be sent"),
    (struct.pack("!H", 1000) + b"\xff\xfe", struct.pack("!H", 1007) + b"close reason is not UTF-8"),
], ids=["1000", "4001", "empty", "one-byte", "1005", "1006", "999", "5000", "reason-not-utf8"])
async def test_a_close_frame_is_answered_with_its_code_or_with_what_was_wrong_in_it(port, payload, answer):
    """Tornado echoed any code (1005 and 1006 too, which no endpoint may send), answered a body of
    one byte with an empty close, and dropped the connection without a close frame when the reason
    was not UTF-8."""
    stream, writer = await raw_connect(port)
    writer.write(frame(0x8, payload))
    assert await asyncio.wait_for(read_server_frame(stream), 5) == (0x8, answer)
    await asyncio.wait_for(Recorder.closed.wait(), 5)
    writer.close()


async def test_a_frame_over_the_size_limit_closes_with_1009_as_soon_as_its_header_is_read(port):
    stream, writer = await raw_connect(port)
    writer.write(frame(0x1, b"", length=MAX_MESSAGE + 1)[:8])  # the header (2 + 2 length + 4 mask bytes), no payload

    opcode, payload = await read_server_frame(stream)
    assert (opcode, payload[:2]) == (0x8, struct.pack("!H", 1009))
    writer.close()
    await asyncio.wait_for(Recorder.closed.wait(), 5)


async def test_what_follows_a_frame_over_the_size_limit_is_dropped_until_the_clients_close_frame(port):
    """The reader aborted as soon as it had read the header: the rest of the frame stayed unread,
    and closing the socket so sent a reset, which reached a client still writing the frame before
    the close frame did (it saw 1006).  Now the frame, and every frame after it but the client's
    close frame, are dropped as they come; the close frame ends the connection cleanly."""
    stream, writer = await raw_connect(port)
    writer.write(frame(0x1, b"a" * 200_000) + frame(0x1, b"after") + frame(0x9, b"ping") + frame(0x8, struct.pack("!H", 1000)))

    opcode, payload = await read_server_frame(stream)
    assert (opcode, payload[:2]) == (0x8, struct.pack("!H", 1009))
    assert await asyncio.wait_for(stream.read(), 5) == b"", "more than the end of the connection after the close frame"
    await asyncio.wait_for(Recorder.closed.wait(), 5)
    assert Recorder.messages == []
    writer.close()


async def test_fragments_over_the_size_limit_together_close_with_1009(port):
    stream, writer = await raw_connect(port)
    writer.write(frame(0x1, b"a" * 600, fin=False) + frame(0x0, b"b" * 600))

    opcode, payload = await read_server_frame(stream)
    assert (opcode, payload[:2]) == (0x8, struct.pack("!H", 1009))
    assert Recorder.messages == []
    writer.close()


@pytest.mark.parametrize("bad", [
    frame(0x1, b"x", rsv=0x20),  # a reserved bit no extension gave a meaning
    frame(0x0, b"nothing to continue"),
    frame(0x9, b"p" * 126),  # a control frame longer than 125 bytes
    frame(0x9, b"p", fin=False),  # a fragmented control frame
    frame(0x1, b"a", fin=False) + frame(0x1, b"b"),  # a new message before the last one ended
], ids=["reserved bit", "stray continuation", "long control frame", "fragmented control frame", "unfinished message"])
async def test_frames_tornado_refuses_drop_the_connection(port, bad):
    stream, writer = await raw_connect(port)
    writer.write(bad + frame(0x1, b"never"))

    assert await closes_without_close_frame(stream)
    await asyncio.wait_for(Recorder.closed.wait(), 5)
    assert "never" not in Recorder.messages
    writer.close()


@pytest.mark.parametrize("compress", [False, True], ids=["plain", "permessage-deflate"])
async def test_a_text_message_that_is_not_utf8_goes_to_the_handler_which_closes(port, compress):
    """Tornado dropped such a connection without a close frame: the client saw 1006."""
    client = await tornado.websocket.websocket_connect(f"ws://127.0.0.1:{port}/ws", compression_options={} if compress else None)
    proto = client.protocol
    client.write_message("before")
    payload = b"\xff\xfe not UTF-8"
    if compress:
        assert proto._compressor is not None, "the server did not accept permessage-deflate"
        proto._write_frame(True, 0x1, proto._compressor.compress(payload), flags=proto.RSV1)
    else:
        proto._write_frame(True, 0x1, payload)
    assert await client.read_message() is None
    assert (client.close_code, client.close_reason) == (4500, "not UTF-8")
    assert await wait_for_messages(2) == ["before", "<not UTF-8>"]

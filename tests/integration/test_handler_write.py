"""``PushHandler._write_texts``, the node's text-frame write (several frames, one stream write, no
Tornado Task per frame), over a real Tornado server and client on loopback: the frames arrive as
``write_message`` would send them, plain and with permessage-deflate, a batch of them goes to the
stream in one write, and a closed connection raises WebSocketClosedError."""

from __future__ import annotations

import asyncio
import contextlib

import pytest
import tornado.web
import tornado.websocket
from tornado.httpserver import HTTPServer
from tornado.testing import bind_unused_port
from tornado.websocket import WebSocketClosedError

from wsnode.handler import PushHandler

# Payload lengths on each side of the header's 7-bit and 16-bit length forms.
FRAMES = ['{"type":"message","id":"a","data":"héllo"}', "x" * 125, "y" * 126, "z" * 65_535, "w" * 70_000, "", "{}"]


class Writer(tornado.websocket.WebSocketHandler):
    """Borrows PushHandler's write, so that it runs on a handler Tornado really opened; counts the
    writes its stream gets (the real stream's write runs)."""

    _write_texts = PushHandler._write_texts
    closing = PushHandler.closing
    compress = False
    one_call = True
    opened: asyncio.Future

    def get_compression_options(self):
        return {} if self.compress else None

    def open(self) -> None:
        stream = self.ws_connection.stream
        real_write, self.stream_writes = stream.write, 0

        def counting_write(data):
            self.stream_writes += 1
            return real_write(data)

        stream.write = counting_write
        if self.one_call:
            self._write_texts(FRAMES)
        else:
            for frame in FRAMES:
                self._write_texts([frame])
        Writer.opened.set_result(self)


@contextlib.asynccontextmanager
async def serving(compress: bool = False, one_call: bool = True):
    """A server whose handler writes FRAMES as it opens, and a Tornado client connected to it;
    yields the client and the server's handler."""
    Writer.compress, Writer.one_call = compress, one_call
    Writer.opened = asyncio.get_running_loop().create_future()
    sock, port = bind_unused_port()
    server = HTTPServer(tornado.web.Application([("/ws", Writer)]))
    server.add_sockets([sock])
    try:
        client = await tornado.websocket.websocket_connect(f"ws://127.0.0.1:{port}/ws", compression_options={} if compress else None)
        yield client, await Writer.opened
        client.close()
    finally:
        server.stop()


@pytest.mark.parametrize("one_call", [True, False], ids=["one call", "a call per frame"])
@pytest.mark.parametrize("compress", [False, True], ids=["plain", "permessage-deflate"])
async def test_frames_arrive_as_write_message_would_send_them(compress, one_call):
    async with serving(compress, one_call) as (client, handler):
        received = [await asyncio.wait_for(client.read_message(), 5) for _ in FRAMES]

        assert received == FRAMES
        assert handler.ws_connection._message_bytes_out == sum(len(f.encode()) for f in FRAMES)
        assert (handler.ws_connection._compressor is not None) is compress
        assert handler.ws_connection.mask_outgoing is False  # a server's frames carry no mask, as wsnode.wire writes them


async def test_frames_written_together_go_to_the_stream_in_one_write():
    async with serving() as (client, handler):
        [await asyncio.wait_for(client.read_message(), 5) for _ in FRAMES]

        assert handler.stream_writes == 1
        assert handler.ws_connection._wire_bytes_out > sum(len(f.encode()) for f in FRAMES)


async def test_writing_to_a_closed_connection_raises_websocket_closed():
    async with serving() as (client, handler):
        client.close()
        for _ in range(100):
            if handler.closing:
                break
            await asyncio.sleep(0.02)
        assert handler.closing
        with pytest.raises(WebSocketClosedError):
            handler._write_texts(["late"])

"""``PushHandler._write_text``, the node's text-frame write without Tornado's per-write Task, over a
real Tornado server and client on loopback: the frames arrive as ``write_message`` would send
them, plain and with permessage-deflate, and a closed connection raises WebSocketClosedError."""

from __future__ import annotations

import asyncio

import pytest
import tornado.web
import tornado.websocket
from tornado.httpserver import HTTPServer
from tornado.testing import bind_unused_port
from tornado.websocket import WebSocketClosedError

from wsnode.handler import PushHandler

FRAMES = ['{"type":"message","id":"a","data":"héllo"}', "x" * 70_000, "{}"]


class Writer(tornado.websocket.WebSocketHandler):
    """Borrows PushHandler's write, so that it runs on a handler Tornado really opened."""

    _write_text = PushHandler._write_text
    compress = False
    opened: asyncio.Future

    def get_compression_options(self):
        return {} if self.compress else None

    def open(self) -> None:
        for frame in FRAMES:
            self._write_text(frame)
        Writer.opened.set_result(self)


async def _serve(compress: bool):
    Writer.compress = compress
    Writer.opened = asyncio.get_running_loop().create_future()
    sock, port = bind_unused_port()
    server = HTTPServer(tornado.web.Application([("/ws", Writer)]))
    server.add_sockets([sock])
    return server, port


@pytest.mark.parametrize("compress", [False, True], ids=["plain", "permessage-deflate"])
async def test_frames_arrive_as_write_message_would_send_them(compress):
    server, port = await _serve(compress)
    try:
        client = await tornado.websocket.websocket_connect(f"ws://127.0.0.1:{port}/ws", compression_options={} if compress else None)
        received = [await asyncio.wait_for(client.read_message(), 5) for _ in FRAMES]
        handler = await Writer.opened

        assert received == FRAMES
        assert handler.ws_connection._message_bytes_out == sum(len(f.encode()) for f in FRAMES)
        assert (handler.ws_connection._compressor is not None) is compress
        client.close()
    finally:
        server.stop()


async def test_writing_to_a_closed_connection_raises_websocket_closed():
    server, port = await _serve(False)
    try:
        client = await tornado.websocket.websocket_connect(f"ws://127.0.0.1:{port}/ws")
        handler = await Writer.opened
        client.close()
        for _ in range(100):
            if handler.ws_connection is None or handler.ws_connection.is_closing():
                break
            await asyncio.sleep(0.02)
        with pytest.raises(WebSocketClosedError):
            handler._write_text("late")
    finally:
        server.stop()

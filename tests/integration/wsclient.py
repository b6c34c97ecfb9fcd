"""A small WebSocket test client over real loopback sockets (Tornado's client), as a browser uses
the node; and a raw peer on a plain socket for what no well-behaved client does (never answering
a ping, not reading, sending frames by hand)."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import socket
import struct

from tornado.iostream import StreamClosedError
from tornado.websocket import WebSocketClosedError, websocket_connect


class Client:
    """Acks every message it reads, as the browser client does (``auto_ack=False`` to stop that)."""

    def __init__(self, ws, url: str, auto_ack: bool = True) -> None:
        self.ws = ws
        self.url = url
        self.auto_ack = auto_ack
        self.frames: list[dict] = []
        self.hello: dict | None = None
        #: Messages the opening replay carried (the inbox), and its ``resumed`` frame, when
        #: ``connect`` waited for it.
        self.inbox: list[dict] = []
        self.resumed: dict | None = None

    @classmethod
    async def connect(cls, url: str, expect_hello: bool = True, timeout: float = 10.0, auto_ack: bool = True, wait_resumed: bool = False) -> "Client":
        """Open a connection; ``wait_resumed`` also reads the opening replay (kept in ``inbox``)."""
        ws = await asyncio.wait_for(websocket_connect(url, max_message_size=1 << 24), timeout)
        client = cls(ws, url, auto_ack)
        if expect_hello:
            client.hello = await client.next_frame(timeout)
            assert client.hello["type"] == "hello", client.hello
        if wait_resumed:
            before, client.resumed = await client.until("resumed", timeout)
            client.inbox = [f for f in before if f["type"] == "message"]
        return client

    async def next_frame(self, timeout: float = 10.0) -> dict:
        raw = await asyncio.wait_for(self.ws.read_message(), timeout)
        if raw is None:
            raise ConnectionError(f"closed with {self.ws.close_code} {self.ws.close_reason!r}")
        frame = json.loads(raw)
        self.frames.append(frame)
        if self.auto_ack and frame.get("type") == "message":
            self._ack(frame["id"])
        return frame

    def _ack(self, message_id: str) -> None:
        """Fire and forget, as a browser does: an ack lost with a closing socket is re-sent by
        redelivery; its error is consumed here so that it is never an unretrieved exception."""
        try:
            future = self.ws.write_message(json.dumps({"type": "ack", "id": message_id}))
        except (WebSocketClosedError, StreamClosedError):
            return
        future.add_done_callback(lambda f: f.exception())

    async def messages(self, count: int, timeout: float = 15.0) -> list[dict]:
        """The next ``count`` message frames (other frame types are kept in ``frames`` and skipped)."""
        out: list[dict] = []
        deadline = asyncio.get_running_loop().time() + timeout
        while len(out) < count:
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                raise TimeoutError(f"got {len(out)} of {count} messages on {self.url}: {out[-3:]}")
            frame = await self.next_frame(left)
            if frame["type"] == "message":
                out.append(frame)
        return out

    async def until(self, kind: str, timeout: float = 15.0) -> tuple[list[dict], dict]:
        """Frames before the first frame of type ``kind``, and that frame."""
        before: list[dict] = []
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            frame = await self.next_frame(deadline - asyncio.get_running_loop().time())
            if frame["type"] == kind:
                return before, frame
            before.append(frame)

    async def quiet(self, seconds: float = 0.7) -> list[dict]:
        """Frames that arrive within ``seconds`` (tests assert this is empty: nothing extra)."""
        extra = []
        try:
            while True:
                extra.append(await self.next_frame(seconds))
        except (asyncio.TimeoutError, TimeoutError):
            return extra

    async def closed(self, timeout: float = 10.0) -> tuple[int | None, str | None]:
        """Wait for the server to close; returns (code, reason)."""
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            raw = await asyncio.wait_for(self.ws.read_message(), deadline - asyncio.get_running_loop().time())
            if raw is None:
                return self.ws.close_code, self.ws.close_reason

    async def send(self, frame) -> None:
        await self.ws.write_message(frame if isinstance(frame, (str, bytes)) else json.dumps(frame), binary=isinstance(frame, bytes))

    def close(self) -> None:
        self.ws.close()


def dedup(frames: list[dict]) -> list[dict]:
    """Message frames with repeats dropped by id, first arrival kept: what a client shows."""
    seen: set[str] = set()
    out = []
    for frame in frames:
        if frame["type"] == "message" and frame["id"] not in seen:
            seen.add(frame["id"])
            out.append(frame)
    return out


async def raw_connect(port: int, query: str = "", receive_buffer: int | None = None, limit: int = 1 << 16) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A WebSocket handshake on a plain socket to ``/ws?query``, then nothing the test does not
    write itself (no pong, no ack).  ``receive_buffer`` sets the socket's SO_RCVBUF before it
    connects; the reader stops taking bytes from the socket once it holds ``2 * limit`` of them
    (asyncio's flow control), so a peer that does not read soon stops the node's writes."""
    sock = socket.socket()
    if receive_buffer is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
    sock.setblocking(False)
    try:
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    except BaseException:
        sock.close()
        raise
    reader, writer = await asyncio.open_connection(sock=sock, limit=limit)
    key = base64.b64encode(os.urandom(16)).decode()
    writer.write((f"GET /ws{'?' + query if query else ''} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
                  f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
    response = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert response.startswith(b"HTTP/1.1 101"), response
    return reader, writer


async def read_server_frame(stream: asyncio.StreamReader, timeout: float = 5.0) -> tuple[int, bytes] | None:
    """(opcode, payload) of the next frame the server sends, or None when it closed the TCP
    connection first."""
    async with asyncio.timeout(timeout):
        head = await stream.read(2)
        if not head:
            return None
        if len(head) < 2:
            head += await stream.readexactly(1)
        n = head[1] & 0x7F
        if n == 126:
            n = struct.unpack("!H", await stream.readexactly(2))[0]
        elif n == 127:
            n = struct.unpack("!Q", await stream.readexactly(8))[0]
        return head[0] & 0x0F, await stream.readexactly(n)


async def read_data_frame(stream: asyncio.StreamReader, timeout: float = 5.0) -> tuple[int, bytes] | None:
    """As :func:`read_server_frame`, skipping the node's keepalive pings (and pongs): a node pings
    a connection first at the first one-second tick that reaches its slot (``wsnode.pinger``),
    which for a node's first connection can be a second after the node started, between any two
    frames it writes; a browser answers it unseen."""
    deadline = asyncio.get_running_loop().time() + timeout
    while (frame := await read_server_frame(stream, deadline - asyncio.get_running_loop().time())) is not None and frame[0] in (0x9, 0xA):
        pass
    return frame


def client_close_frame(code: int = 1000) -> bytes:
    """A close frame as a client must send it (masked), for writing by hand to a raw peer."""
    data, mask = struct.pack("!H", code), os.urandom(4)
    return struct.pack("!BB", 0x88, 0x80 | len(data)) + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(data))


def client_text_frame(text: str) -> bytes:
    """A text frame as a client must send it (masked), for writing by hand to a raw peer."""
    data = text.encode()
    mask = os.urandom(4)
    if len(data) < 126:
        head = struct.pack("!BB", 0x81, 0x80 | len(data))
    elif len(data) < 1 << 16:
        head = struct.pack("!BBH", 0x81, 0x80 | 126, len(data))
    else:
        head = struct.pack("!BBQ", 0x81, 0x80 | 127, len(data))
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(data))

"""Keepalive pings (``wsnode.pinger``) on a node of the shared cluster started to ping every
``PING_INTERVAL`` (2) seconds and wait ``PING_TIMEOUT`` (1) for the pong: a peer that never answers
is closed with 1000 "ping timed out"; a client that answers stays connected.

The shared cluster's own nodes keep the defaults (25 s, 20 s): a test client reading nothing while
many messages arrive stops reading frames (Tornado's client queues one message), pongs included."""

from __future__ import annotations

import asyncio
import base64
import os
import struct
import time

import pytest

PING_INTERVAL, PING_TIMEOUT = 2, 1


@pytest.fixture
def pinging_node(cluster):
    """A node of ``cluster`` with short pings, stopped at the end of the test."""
    node = cluster.start_node(PING_INTERVAL=PING_INTERVAL, PING_TIMEOUT=PING_TIMEOUT)
    yield node.port
    node.terminate(timeout=10)
    cluster.services.remove(node)


async def _silent_peer(port: int, token: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A WebSocket client that completes the handshake and then never sends a frame (no pong)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    key = base64.b64encode(os.urandom(16)).decode()
    writer.write((f"GET /ws?token={token} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
                  f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
    await writer.drain()
    status = await reader.readline()
    assert b" 101 " in status, status
    while (await reader.readline()) not in (b"\r\n", b""):
        pass
    return reader, writer


async def _frames_until_closed(reader: asyncio.StreamReader, timeout: float) -> list[tuple[int, bytes, float]]:
    """(opcode, payload, monotonic time) of every frame the node sends until it closes the TCP
    connection (Tornado waits 5 s for the peer's own close frame before it does)."""
    frames = []
    async with asyncio.timeout(timeout):
        while head := await reader.read(2):
            if len(head) < 2:
                head += await reader.readexactly(2 - len(head))
            length = head[1] & 0x7F
            if length == 126:
                (length,) = struct.unpack("!H", await reader.readexactly(2))
            elif length == 127:
                (length,) = struct.unpack("!Q", await reader.readexactly(8))
            frames.append((head[0] & 0x0F, await reader.readexactly(length), time.monotonic()))
    return frames


async def test_a_peer_that_never_answers_a_ping_is_closed_with_ping_timed_out(cluster, pinging_node):
    port = pinging_node
    reader, writer = await _silent_peer(port, cluster.token("ping-silent"))
    started = time.monotonic()
    try:
        frames = await _frames_until_closed(reader, timeout=4 * (PING_INTERVAL + PING_TIMEOUT))
    finally:
        writer.close()

    opcodes = [opcode for opcode, _, _ in frames]
    assert 0x9 in opcodes, f"no ping before the close: {opcodes}"
    assert opcodes[-1] == 0x8, f"the node did not send a close frame: {opcodes}"
    payload, closed_at = frames[-1][1], frames[-1][2]
    assert (struct.unpack("!H", payload[:2])[0], payload[2:].decode()) == (1000, "ping timed out")
    assert closed_at - started <= PING_INTERVAL + PING_TIMEOUT + 2


async def test_a_client_that_answers_pings_stays_connected(cluster, pinging_node):
    client = await cluster.connect("ping-answering", port=pinging_node)
    await asyncio.sleep(3 * PING_INTERVAL)  # several pings, each answered by the client's protocol
    message_id = await cluster.collect("ping-answering", {"n": 1})
    try:
        assert [m["id"] for m in await client.messages(1)] == [message_id]
        assert client.ws.close_code is None
    finally:
        client.close()

"""Keepalive pings (``wsnode.pinger``) on a node of the shared cluster started to ping every
``PING_INTERVAL`` (2) seconds and wait ``PING_TIMEOUT`` (1) for the pong: a peer that never answers
is closed with 1000 "ping timed out"; a client that answers stays connected.  A client's own
``ping`` frame (how a browser learns that its connection still works) is answered ``pong``.

The shared cluster's own nodes keep the defaults (25 s, 20 s): a test client reading nothing while
many messages arrive stops reading frames (Tornado's client queues one message), pongs included."""

from __future__ import annotations

import asyncio
import struct
import time

import pytest

from tests.integration.wsclient import raw_connect, read_server_frame

PING_INTERVAL, PING_TIMEOUT = 2, 1

pytestmark = pytest.mark.parametrize("cluster", ["redis"], indirect=True)  # node-side only: one broker is enough


@pytest.fixture
def pinging_node(cluster):
    """A node of ``cluster`` with short pings, stopped at the end of the test."""
    node = cluster.start_node(PING_INTERVAL=PING_INTERVAL, PING_TIMEOUT=PING_TIMEOUT)
    yield node.port
    node.terminate(timeout=10)
    cluster.services.remove(node)


async def _frames_until_closed(reader: asyncio.StreamReader, timeout: float) -> list[tuple[int, bytes, float]]:
    """(opcode, payload, monotonic time) of every frame the node sends until it closes the TCP
    connection (Tornado waits 5 s for the peer's own close frame before it does)."""
    frames = []
    async with asyncio.timeout(timeout):
        while (frame := await read_server_frame(reader, timeout)) is not None:
            frames.append((*frame, time.monotonic()))
    return frames


async def test_a_peer_that_never_answers_a_ping_is_closed_with_ping_timed_out(cluster, pinging_node):
    port = pinging_node
    reader, writer = await raw_connect(port, f"token={cluster.token('ping-silent')}")
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


async def test_a_peer_that_sends_pongs_of_its_own_but_never_echoes_a_ping_is_closed_all_the_same(cluster, pinging_node):
    """Any pong counted as the answer: a client that read nothing (its opening replay held in the
    node's buffer, up to REPLAY_MAX_BYTES) but sent an unsolicited pong every second was never
    closed.  A pong now answers only the ping whose payload it echoes."""
    port = pinging_node
    reader, writer = await raw_connect(port, f"token={cluster.token('ping-forger')}")
    started = time.monotonic()

    async def forge() -> None:
        while True:
            writer.write(b"\x8a\x80" + b"\x00\x00\x00\x00")  # a masked pong, empty payload
            writer.write(b"\x8a\x88" + b"\x00\x00\x00\x00" + b"\x00" * 8)  # and one of 8 zero bytes, a ping's length
            await writer.drain()
            await asyncio.sleep(0.3)

    forging = asyncio.create_task(forge())
    try:
        frames = await _frames_until_closed(reader, timeout=4 * (PING_INTERVAL + PING_TIMEOUT))
    finally:
        forging.cancel()
        writer.close()

    payload, closed_at = frames[-1][1], frames[-1][2]
    assert frames[-1][0] == 0x8 and (struct.unpack("!H", payload[:2])[0], payload[2:].decode()) == (1000, "ping timed out")
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


async def test_a_client_ping_frame_is_answered_with_pong_and_the_connection_goes_on(cluster):
    client = await cluster.connect("app-ping")
    try:
        await client.send({"type": "ping"})
        before, pong = await client.until("pong", 10)
        assert pong == {"type": "pong"} and [frame["type"] for frame in before] == []
        message_id = await cluster.collect("app-ping", {"n": 1})
        await client.send({"type": "ping"})
        frames = [await client.next_frame(10) for _ in range(2)]
        assert sorted(frame["type"] for frame in frames) == ["message", "pong"]
        assert [frame["id"] for frame in frames if frame["type"] == "message"] == [message_id]
        assert client.ws.close_code is None
    finally:
        client.close()

"""A client that stops reading, on a node of the shared cluster started with a small
``CLIENT_QUEUE_MAX_BYTES``: the node stops writing to it and closes it with 4008 once more than
that waits for its socket, and the client gets every message it missed by resuming with ``since``
on another node.

A connection still in its opening replay is held to the same bound: the node keeps the live
messages that come meanwhile, and more than ``CLIENT_QUEUE_MAX_BYTES`` of them close it with 1013
instead of growing the node's memory.

The peer is a plain socket with a small receive buffer whose reader stops taking bytes after 8 KB
(:func:`~tests.integration.wsclient.raw_connect`), so what the node writes piles up in the node's
kernel send buffer (some megabytes on loopback) and then in Tornado's stream, which is what the
limit counts.  The test sends rounds of large messages until the node says (in its metrics) that
it closed a connection with 4008, instead of guessing how much the kernel holds."""

from __future__ import annotations

import asyncio
import json
import struct

import pytest

import launcher
from tests.integration.test_metrics import closes
from tests.integration.wsclient import Client, client_text_frame, dedup, raw_connect, read_data_frame
from wsnode.closecodes import CloseCode

LIMIT = 65536
PAD = "x" * 60000  # a message of about 60 KB: rounds of 10 fill kernel buffers quickly
MAX_ROUNDS = 60  # 36 MB at most; loopback buffers hold a few


@pytest.fixture
def limited_node(cluster):
    """A node of ``cluster`` with ``CLIENT_QUEUE_MAX_BYTES`` of 64 KB, stopped at the end of the test."""
    node = cluster.start_node(CLIENT_QUEUE_MAX_BYTES=LIMIT)
    yield node.port
    node.terminate(timeout=10)
    cluster.services.remove(node)


async def live_raw_peer(cluster, port: int, user: str):
    """A raw peer of ``user`` with a small receive buffer, past its opening ``hello`` and
    ``resumed`` frames: ``(token, reader, writer)``."""
    token = await asyncio.to_thread(cluster.token, user)
    reader, writer = await raw_connect(port, f"token={token}", receive_buffer=4096, limit=4096)
    opening = [json.loads((await read_data_frame(reader, 15))[1]) for _ in range(2)]
    assert [frame["type"] for frame in opening] == ["hello", "resumed"], opening
    return token, reader, writer


@pytest.mark.parametrize("cluster", ["redis"], indirect=True)  # node-side only: one broker is enough
async def test_a_client_that_stops_reading_is_closed_with_4008_and_resumes_without_a_loss(cluster, limited_node):
    port, user = limited_node, "slow-reader"
    _, reader, writer = await live_raw_peer(cluster, port, user)
    try:
        closes_before = await asyncio.to_thread(closes, port, CloseCode.SLOW_CLIENT)

        sent: list[str] = []
        for _ in range(MAX_ROUNDS):  # the peer reads nothing from here on
            sent += await cluster.collect_many([{"to": user, "data": {"n": len(sent) + i, "pad": PAD}} for i in range(10)])
            if await asyncio.to_thread(closes, port, CloseCode.SLOW_CLIENT) > closes_before:
                break
        else:
            pytest.fail(f"{len(sent)} messages of 60 KB to a peer that reads nothing, and the node never closed it with 4008")

        # What the node wrote before it gave up, in order, then its close frame.
        frames, close = [], None
        while (frame := await read_data_frame(reader, 15)) is not None:
            opcode, payload = frame
            if opcode == 0x8:
                close = (struct.unpack("!H", payload[:2])[0], payload[2:].decode())
                break
            frames.append(json.loads(payload))
    finally:
        writer.close()

    assert close == (CloseCode.SLOW_CLIENT, CloseCode.SLOW_CLIENT.reason)
    got = [frame["id"] for frame in frames if frame["type"] == "message"]
    assert got == sent[: len(got)], "the frames before the close are not the first messages sent, in order"
    assert len(got) < len(sent), "the node closed the connection only after writing everything"

    # Resuming elsewhere from the last message read gives the rest (the inbox when none was read).
    client = await cluster.connect(user, port=cluster.node_ports[0], since=got[-1] if got else None)
    try:
        replayed = client.inbox if not got else [f for f in (await client.until("resumed", timeout=30))[0] if f["type"] == "message"]
        shown = dedup([{"type": "message", "id": mid} for mid in got] + replayed)
        assert [f["id"] for f in shown] == sent
        assert all(f["data"]["pad"] == PAD for f in replayed)
    finally:
        client.close()


async def test_live_messages_held_during_a_replay_are_bounded_and_the_client_gets_them_by_resuming(fault_cluster):
    """The cluster's worker is replaced by one that consumes only ``collect``: messages are stored
    and routed, but the replay a new connection asks for (on ``dispatch``) waits, so the node holds
    the live messages for that connection.  Past ``CLIENT_QUEUE_MAX_BYTES`` of them it closes the
    connection with 1013 (before ``REPLAY_TIMEOUT`` would, with another reason), and once a full
    worker is back the user's inbox gives every one of them."""
    cluster, user = fault_cluster, "held-during-replay"
    await asyncio.to_thread(cluster.worker.terminate, 20)
    cluster.services.remove(cluster.worker)
    collect_only = await asyncio.to_thread(launcher.start_worker, cluster.env, "collect-only", "collect", log_path=cluster.logs / "collect-only.log")
    cluster.services.append(collect_only)
    node = await asyncio.to_thread(cluster.start_node, CLIENT_QUEUE_MAX_BYTES=LIMIT)

    token = await asyncio.to_thread(cluster.token, user)
    client = await Client.connect(cluster.ws_url(node.port, token))  # hello; its replay does not come
    try:
        half = "y" * (LIMIT // 2)  # two frames of these are over the limit with their envelopes
        sent = await cluster.collect_many([{"to": user, "data": {"n": n, "pad": half}} for n in range(3)])
        code, reason = await client.closed(timeout=30)
    finally:
        client.close()

    assert (code, reason) == (CloseCode.TRY_AGAIN_LATER, "too many messages during resume, reconnect with since")
    assert [f["type"] for f in client.frames] == ["hello"], "a message was written before the replay ended"

    cluster.worker = await asyncio.to_thread(cluster.start_worker, "worker2")
    resumed = await cluster.connect(user, port=cluster.node_ports[0])
    try:
        assert [f["id"] for f in resumed.inbox] == sent
        assert all(f["data"]["pad"] == half for f in resumed.inbox)
    finally:
        resumed.close()


@pytest.mark.parametrize("cluster", ["redis"], indirect=True)  # node-side only: one broker is enough
@pytest.mark.parametrize("kind", ["refresh", "ping"])
async def test_a_client_that_floods_refreshes_or_pings_and_reads_no_answer_is_closed_with_4008(cluster, limited_node, kind):
    """Each ``refresh`` sent while one is checked is answered ``refresh_error``, each ``ping``
    ``pong``: a client that sent them without end and read nothing had the node hold every answer,
    without bound."""
    port, user = limited_node, f"{kind}-flooder"
    token, _, writer = await live_raw_peer(cluster, port, user)
    try:
        closes_before = await asyncio.to_thread(closes, port, CloseCode.SLOW_CLIENT)
        chunk = client_text_frame(json.dumps({"type": kind, "token": token})) * 2000
        for _ in range(200):  # 2,000 refreshes a round; the peer reads nothing
            try:
                writer.write(chunk)
                await asyncio.wait_for(writer.drain(), 5)
            except (ConnectionError, asyncio.TimeoutError):
                break  # closed, or the node stopped reading: the metrics say which
            if await asyncio.to_thread(closes, port, CloseCode.SLOW_CLIENT) > closes_before:
                break
        assert await asyncio.to_thread(closes, port, CloseCode.SLOW_CLIENT) == closes_before + 1
    finally:
        writer.close()

"""A push node faces the internet: a client that opens a TCP connection and sends its handshake
slowly, or not at all (slowloris), must not hold a socket (and a file descriptor) for long.
Tornado waits an hour for a request's headers by default, and for ever for its body; the node
gives a request ``wsnode.app.REQUEST_TIMEOUT_SECONDS`` for each, and a WebSocket, once upgraded,
is not affected."""

from __future__ import annotations

import asyncio
import socket
import time

import pytest

from wsnode.app import REQUEST_TIMEOUT_SECONDS

pytestmark = pytest.mark.parametrize("cluster", ["redis"], indirect=True)  # node-side only: one broker is enough


def closed_by_peer_within(sock: socket.socket, seconds: float) -> float | None:
    """Seconds until the peer closed ``sock`` (an empty read or a reset), or None if it was still
    open after ``seconds``."""
    started = time.monotonic()
    sock.settimeout(0.5)
    while time.monotonic() - started < seconds:
        try:
            if sock.recv(4096) == b"":
                return time.monotonic() - started
        except socket.timeout:
            continue
        except ConnectionResetError:
            return time.monotonic() - started
    return None


def slow_client(port: int, first: bytes) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    if first:
        sock.sendall(first)
    return sock


async def test_a_client_that_sends_half_a_handshake_and_then_nothing_is_cut_off(cluster):
    node = cluster.start_node()
    partial = f"GET /ws?token=x HTTP/1.1\r\nHost: 127.0.0.1:{node.port}\r\nUpgrade: websocket\r\n".encode()  # no blank line: headers unfinished
    silent, half = slow_client(node.port, b""), slow_client(node.port, partial)
    try:
        waits = await asyncio.gather(*(asyncio.to_thread(closed_by_peer_within, sock, REQUEST_TIMEOUT_SECONDS + 10) for sock in (silent, half)))
        assert all(wait is not None for wait in waits), f"still open after {REQUEST_TIMEOUT_SECONDS + 10} s: {waits}"
    finally:
        silent.close()
        half.close()


async def test_a_client_that_trickles_a_request_body_is_cut_off(cluster):
    node = cluster.start_node()
    head = (f"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1:{node.port}\r\nContent-Length: 100000\r\n\r\n").encode()
    sock = slow_client(node.port, head)

    def trickle() -> float | None:
        started = time.monotonic()
        while time.monotonic() - started < REQUEST_TIMEOUT_SECONDS + 10:
            try:
                sock.sendall(b"x")  # a byte a second: the body never ends
            except OSError:
                return time.monotonic() - started
            wait = closed_by_peer_within(sock, 1.0)
            if wait is not None:
                return time.monotonic() - started
        return None

    try:
        assert await asyncio.to_thread(trickle) is not None, f"a body trickled for {REQUEST_TIMEOUT_SECONDS + 10} s was still read"
    finally:
        sock.close()


async def test_an_open_websocket_outlives_the_request_timeout(cluster):
    node = cluster.start_node()
    client = await cluster.connect("outlives-request-timeout", port=node.port)
    try:
        await asyncio.sleep(REQUEST_TIMEOUT_SECONDS + 2)
        message_id = await cluster.collect("outlives-request-timeout", {"n": 1})
        assert [frame["id"] for frame in await client.messages(1)] == [message_id]
    finally:
        client.close()

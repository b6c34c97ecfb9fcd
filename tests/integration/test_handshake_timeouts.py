"""A push node faces the internet: a client that opens a TCP connection and sends its handshake
slowly, or not at all (slowloris), must not hold a socket (and a file descriptor) for long.
Tornado waits an hour for a request's headers by default, and for ever for its body; the node
gives a request ``REQUEST_TIMEOUT`` seconds for each (10 by default), and a WebSocket, once
upgraded, is not affected.  The nodes here run with ``REQUEST_TIMEOUT=2``: each close is checked
to come after about that long, not the default's."""

from __future__ import annotations

import asyncio
import socket
import time

import pytest

import launcher
import settings

pytestmark = pytest.mark.parametrize("cluster", ["redis"], indirect=True)  # node-side only: one broker is enough

#: The nodes' REQUEST_TIMEOUT here, well under the default.
TIMEOUT = 2
assert settings.REQUEST_TIMEOUT > TIMEOUT + 4, "the tests below tell the setting from the default by the time a close takes"


def within_the_timeout(wait: float | None) -> bool:
    """A close after about ``TIMEOUT`` seconds (a loaded machine's slack), well before the default's."""
    return wait is not None and TIMEOUT - 0.5 <= wait <= TIMEOUT + 3.5


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
    node = cluster.start_node(REQUEST_TIMEOUT=TIMEOUT)
    partial = f"GET /ws?token=x HTTP/1.1\r\nHost: 127.0.0.1:{node.port}\r\nUpgrade: websocket\r\n".encode()  # no blank line: headers unfinished
    silent, half = slow_client(node.port, b""), slow_client(node.port, partial)
    try:
        waits = await asyncio.gather(*(asyncio.to_thread(closed_by_peer_within, sock, TIMEOUT + 10) for sock in (silent, half)))
        assert all(within_the_timeout(wait) for wait in waits), f"closed after {waits} s (None: still open after {TIMEOUT + 10} s)"
    finally:
        silent.close()
        half.close()


async def test_a_client_that_trickles_a_request_body_is_cut_off(cluster):
    node = cluster.start_node(REQUEST_TIMEOUT=TIMEOUT)
    head = (f"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1:{node.port}\r\nContent-Length: 100000\r\n\r\n").encode()
    sock = slow_client(node.port, head)

    def trickle() -> float | None:
        started = time.monotonic()
        while time.monotonic() - started < TIMEOUT + 10:
            try:
                sock.sendall(b"x")  # a byte a second: the body never ends
            except OSError:
                return time.monotonic() - started
            wait = closed_by_peer_within(sock, 1.0)
            if wait is not None:
                return time.monotonic() - started
        return None

    try:
        wait = await asyncio.to_thread(trickle)
        assert within_the_timeout(wait), f"a trickled body was cut off after {wait} s (None: still read after {TIMEOUT + 10} s)"
    finally:
        sock.close()


async def test_an_open_websocket_outlives_the_request_timeout(cluster):
    node = cluster.start_node(REQUEST_TIMEOUT=TIMEOUT)
    client = await cluster.connect("outlives-request-timeout", port=node.port)
    try:
        await asyncio.sleep(TIMEOUT + 2)
        message_id = await cluster.collect("outlives-request-timeout", {"n": 1})
        assert [frame["id"] for frame in await client.messages(1)] == [message_id]
    finally:
        client.close()


async def test_an_idle_keep_alive_connection_is_closed_after_the_request_timeout(cluster):
    """A scraper's (or a load balancer's) keep-alive connection, idle after its request, is closed
    after ``REQUEST_TIMEOUT``: set it above a balancer's idle timeout (README)."""
    node = cluster.start_node(REQUEST_TIMEOUT=TIMEOUT)
    sock = slow_client(node.port, f"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1:{node.port}\r\n\r\n".encode())
    try:
        sock.settimeout(5)
        answer = b""
        while b"\r\n\r\n" not in answer:
            answer += sock.recv(4096)
        assert answer.startswith(b"HTTP/1.1 "), answer[:200]
        assert b"connection: close" not in answer.lower(), answer[:400]  # kept alive, to be closed idle
        wait = await asyncio.to_thread(closed_by_peer_within, sock, TIMEOUT + 10)
        assert within_the_timeout(wait), f"an idle keep-alive connection was closed after {wait} s (None: still open after {TIMEOUT + 10} s)"
    finally:
        sock.close()


async def test_auth_cuts_off_a_client_that_sends_half_a_request_and_nodes_keep_checking_tokens_past_its_idle_timeout(cluster):
    """Auth gives a request ``REQUEST_TIMEOUT`` too (Tornado's defaults: an hour for the headers,
    no limit for a body).  A node keeps its connections to auth open between token checks
    (libcurl); auth closes one that stays idle that long, and the node's next check connects again
    rather than failing (1013)."""
    port = launcher.free_port()
    auth = launcher.start_auth({**cluster.env, "REQUEST_TIMEOUT": str(TIMEOUT)}, port, name="auth-timeouts", log_path=cluster._log("auth-timeouts"))
    cluster.services.append(auth)
    try:
        half = slow_client(port, f"POST /verify HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n".encode())
        try:
            wait = await asyncio.to_thread(closed_by_peer_within, half, TIMEOUT + 10)
            assert within_the_timeout(wait), f"auth closed a half-sent request after {wait} s (None: still open after {TIMEOUT + 10} s)"
        finally:
            half.close()
        node = cluster.start_node(AUTH_URL=f"http://127.0.0.1:{port}", AUTH_CACHE_SECONDS=0)
        for n in range(3):
            client = await cluster.connect(f"auth-idle-{n}", port=node.port)  # a hello, or it raises
            client.close()
            await asyncio.sleep(TIMEOUT + 1)  # auth closes the node's idle connection meanwhile
        assert "auth unavailable" not in cluster._log(f"node-{node.port}").read_text(errors="replace")
    finally:
        auth.terminate(timeout=10)

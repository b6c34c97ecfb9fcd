"""No log line of a push node carries a password of the URLs it is given: ``AUTH_URL`` may hold
one (``https://push:PASSWORD@auth.internal``, for an auth service behind a proxy that asks for
it; libcurl sends it as HTTP basic authentication), as ``REDIS_URL`` and ``BROKER_URL`` may."""

from __future__ import annotations

import asyncio
import base64
import http.server
import threading

import jwt
import pytest

import launcher
from tests.integration.wsclient import Client
from wsnode.closecodes import CloseCode

pytestmark = pytest.mark.parametrize("cluster", ["redis"], indirect=True)  # node-side only: one broker is enough

PASSWORD = "auth-url-password-d41f"


async def test_a_password_in_auth_url_is_not_logged_when_auth_answers_or_not(cluster):
    working = cluster.start_node(AUTH_URL=f"http://push:{PASSWORD}@127.0.0.1:{cluster.auth_port}")
    unreachable = cluster.start_node(AUTH_URL=f"http://push:{PASSWORD}@127.0.0.1:{launcher.free_port()}")
    token = await asyncio.to_thread(cluster.token, "auth-url-user")

    client = await Client.connect(cluster.ws_url(working.port, token))  # the password does not stop it working
    assert client.hello["user"] == "auth-url-user"
    client.close()
    refused = await Client.connect(cluster.ws_url(unreachable.port, token), expect_hello=False)
    assert (await refused.closed(15))[0] == CloseCode.TRY_AGAIN_LATER
    unreachable.wait_log("auth unavailable")

    for node in (working, unreachable):
        log = node.log_path.read_text(errors="replace")
        assert "auth http://push:***@127.0.0.1:" in log, log[-2000:]
        assert PASSWORD not in log, [line for line in log.splitlines() if PASSWORD in line]


async def test_at_log_level_debug_no_token_a_node_checks_or_is_refreshed_with_is_logged(cluster):
    """Tornado's libcurl client logs what it sends at DEBUG (``tornado.curl_httpclient``): the
    body of every ``POST /verify``, each browser's token in it, and its headers."""
    node = cluster.start_node(LOG_LEVEL="DEBUG", AUTH_URL=f"http://push:{PASSWORD}@127.0.0.1:{cluster.auth_port}")
    token, newer = [await asyncio.to_thread(cluster.token, "debug-log-user") for _ in range(2)]
    client = await Client.connect(cluster.ws_url(node.port, token), wait_resumed=True)
    await client.send({"type": "refresh", "token": newer})
    _, refreshed = await client.until("refreshed")  # only a "refreshed" frame: what it says is newer's expiry
    assert refreshed["expires_at"] == jwt.decode(newer, options={"verify_signature": False})["exp"], refreshed
    refused = await Client.connect(cluster.ws_url(node.port, token[:-4] + "AAAA"), expect_hello=False)
    assert (await refused.closed(10))[0] == CloseCode.UNAUTHORIZED
    client.close()

    log = node.log_path.read_text(errors="replace")
    assert " DEBUG " in log  # the level took
    basic = base64.b64encode(f"push:{PASSWORD}".encode()).decode()  # the Authorization header libcurl sends
    for secret in (token, newer, token[:-4] + "AAAA", PASSWORD, basic):
        assert secret not in log, [line for line in log.splitlines() if secret in line][:3]


class NestedAnswer(http.server.BaseHTTPRequestHandler):
    """An auth (or a proxy in its place) answering 200 with JSON nested past Python's recursion
    limit: ``json.loads`` raises RecursionError, which is not a ValueError."""

    BODY = b"[" * 100_000 + b"]" * 100_000

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(self.BODY)))
        self.end_headers()
        self.wfile.write(self.BODY)

    def log_message(self, *args) -> None:
        pass


async def test_an_unusable_answer_from_auth_refuses_with_1013_and_logs_no_token(cluster):
    """Any error the token check did not expect went to Tornado, which answered 500 and logged
    ``Uncaught exception GET /ws?token=...`` with the request: the token in the node's log."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), NestedAnswer)
    threading.Thread(target=server.serve_forever, name="nested-auth", daemon=True).start()
    try:
        node = cluster.start_node(AUTH_URL=f"http://127.0.0.1:{server.server_address[1]}")
        token = await asyncio.to_thread(cluster.token, "unusable-auth-answer")
        client = await Client.connect(cluster.ws_url(node.port, token), expect_hello=False)
        assert (await client.closed(15))[0] == CloseCode.TRY_AGAIN_LATER
        node.wait_log("auth unavailable")
    finally:
        server.shutdown()
        server.server_close()
    log = node.log_path.read_text(errors="replace")
    assert token not in log, [line for line in log.splitlines() if token in line][:3]

"""A browser's token reaches a push node's log only as the reason auth gives for refusing it, and
PyJWT's reasons quote parts of the token's header, which nobody signed (``Unsupported critical
extension: <name>``): a hostile page could write a line break into that reason (a forged line in
the node's log), or a lone surrogate, which no UTF-8 encoder takes (the handshake was answered
500, and a ``refresh`` was left unanswered)."""

from __future__ import annotations

import asyncio
import base64
import http.server
import json
import threading

import pytest

from tests.integration.wsclient import Client
from wsnode.closecodes import CloseCode

pytestmark = pytest.mark.parametrize("cluster", ["redis"], indirect=True)  # node and auth only: one broker is enough

FORGED = "2026-12-07 04:00:00,000 ERROR wsnode:1 wsnode.app: forged by a token"


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def token_naming_critical_extension(name: str) -> str:
    """A token (ASCII, as every token) whose header names ``name`` as a critical extension."""
    header = json.dumps({"alg": "HS256", "typ": "JWT", "crit": [name]}).encode()
    return f"{b64(header)}.{b64(b'{}')}.{b64(b'signature')}"


def forged_or_uncaught(log: str) -> list[str]:
    return [line for line in log.splitlines() if line.startswith(FORGED[:20]) or "Uncaught exception" in line or "Traceback" in line]


async def test_tokens_whose_header_holds_a_line_break_or_a_lone_surrogate_are_closed_with_4401_and_forge_no_log_line(cluster):
    node = cluster.start_node()
    for name in (f"x\n{FORGED}", "\ud800"):
        client = await Client.connect(cluster.ws_url(node.port, token_naming_critical_extension(name)), expect_hello=False)
        code, reason = await client.closed()
        assert code == CloseCode.UNAUTHORIZED and reason.isprintable(), (code, reason)

        token = await asyncio.to_thread(cluster.token, "hostile-refresh")
        client = await Client.connect(cluster.ws_url(node.port, token), wait_resumed=True)
        await client.send({"type": "refresh", "token": token_naming_critical_extension(name)})
        code, reason = await client.closed()
        assert code == CloseCode.UNAUTHORIZED and reason.startswith("refresh refused: token invalid") and reason.isprintable(), (code, reason)

    log = node.log_path.read_text(errors="replace")
    assert "Unsupported critical extension" in log  # the refusals were logged, on lines of their own
    assert not forged_or_uncaught(log), forged_or_uncaught(log)


class RefusingWithControlCharacters(http.server.BaseHTTPRequestHandler):
    """An auth (of an earlier version, or a proxy in its place) whose 401 quotes the token's
    header as it is: a line break, or a lone surrogate (JSON's ``\\ud800``)."""

    ERRORS = [f"token invalid: malformed (Unsupported critical extension: x\n{FORGED})", "token invalid: malformed (\ud800)"]

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        body = json.dumps({"error": self.ERRORS[self.server.answered % 2]}).encode()
        self.server.answered += 1
        self.send_response(401)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


async def test_a_node_refuses_with_4401_and_logs_on_one_line_an_auth_refusal_that_holds_a_line_break_or_a_lone_surrogate(cluster):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), RefusingWithControlCharacters)
    server.answered = 0
    threading.Thread(target=server.serve_forever, name="control-characters-auth", daemon=True).start()
    try:
        node = cluster.start_node(AUTH_URL=f"http://127.0.0.1:{server.server_address[1]}", AUTH_CACHE_SECONDS=0)
        for attempt in range(2):
            client = await Client.connect(cluster.ws_url(node.port, f"any-token-{attempt}"), expect_hello=False)
            code, reason = await client.closed()
            assert code == CloseCode.UNAUTHORIZED and reason.isprintable(), (code, reason)
    finally:
        server.shutdown()
        server.server_close()
    assert server.answered == 2
    log = node.log_path.read_text(errors="replace")
    assert "malformed (Unsupported critical extension: x\\n2026-12-07" in log  # the refusal was logged, within its own line
    assert not forged_or_uncaught(log), forged_or_uncaught(log)

"""The demo app (``python -m demo``) against a real cluster: its page, its JSON API, its refusals.

The demo is a business backend like any other, so one broker is enough here: the tests run on the
Redis-broker cluster only.
"""

from __future__ import annotations

import asyncio
import http.server
import json
import sys
import threading
import urllib.error
import urllib.request
import uuid

import pytest

import launcher
from tests.integration.browser_support import DemoPage, push_js
from tests.integration.conftest import http_call
from tests.integration.wsclient import Client

REDIS_ONLY = pytest.mark.parametrize("cluster", ["redis"], indirect=True)


@pytest.fixture
def demo(cluster):
    page = DemoPage(cluster, cluster.node_ports)
    yield page
    page.stop()


def fetch(url: str) -> tuple[int, str, bytes]:
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.status, response.headers.get("Content-Type", ""), response.read()


def unique(name: str) -> str:
    return f"{name}-{uuid.uuid4().hex[:6]}"


@REDIS_ONLY
def test_the_page_loads_push_js_which_the_demo_and_every_node_serve_unchanged(cluster, demo):
    status, kind, page = fetch(demo.url + "/")
    assert status == 200 and kind.startswith("text/html")
    assert b'<script src="static/push.js">' in page
    assert b'<link rel="icon" href="data:,">' in page  # an empty icon: no request for /favicon.ico, no 404 in the console
    assert fetch(demo.url + "/static/push.js")[2] == push_js()
    for port in cluster.node_ports:
        status, kind, body = fetch(f"http://127.0.0.1:{port}/static/push.js")
        assert status == 200 and "javascript" in kind and body == push_js()


@REDIS_ONLY
def test_config_lists_the_nodes_on_the_host_the_page_was_loaded_from(cluster, demo):
    status, config = demo.call("/api/config")
    assert status == 200
    assert config["nodes"] == [f"ws://127.0.0.1:{port}/ws" for port in cluster.node_ports]
    assert "tasks.collect" in config["send_example"]


@REDIS_ONLY
async def test_a_token_from_the_demo_opens_a_connection_as_that_user(cluster, demo):
    user = unique("demo-token")
    status, answer = await asyncio.to_thread(demo.call, "/api/token", {"user": f"  {user} "})
    assert status == 200 and answer["user"] == user and answer["expires_at"] > 0
    client = await Client.connect(cluster.ws_url(cluster.node_ports[1], answer["token"]), wait_resumed=True)
    assert client.hello["user"] == user
    client.close()


@REDIS_ONLY
@pytest.mark.parametrize("body, error", [
    ({"user": ""}, "type a user name"),
    ({"user": "a,b"}, "cannot be a user name"),
    ({}, "type a user name"),
    ({"user": "alice smith"}, "no whitespace"),  # auth refuses it: the page got 502 and push.js asked again and again
])
def test_a_bad_user_name_gets_400_saying_what_to_type(cluster, demo, body, error):
    status, answer = demo.call("/api/token", body)
    assert status == 400 and error in answer["error"]


@REDIS_ONLY
async def test_send_reaches_one_user_a_comma_list_and_everyone_online(cluster, demo):
    ann, ben = unique("demo-ann"), unique("demo-ben")
    a = await cluster.connect(ann, cluster.node_ports[0])
    b = await cluster.connect(ben, cluster.node_ports[1])
    to_ann = await asyncio.to_thread(demo.send, ann, "for ann")
    to_both = await asyncio.to_thread(demo.send, f"{ann}, {ben}", "for both")
    to_all = await asyncio.to_thread(demo.send, "*", "for everyone")
    to_ben = await asyncio.to_thread(demo.send, ben, "for ben")
    got_a, got_b = await a.messages(3), await b.messages(3)
    assert [(f["id"], f["data"]["text"]) for f in got_a] == [(to_ann, "for ann"), (to_both, "for both"), (to_all, "for everyone")]
    assert [(f["id"], f["data"]["text"]) for f in got_b] == [(to_both, "for both"), (to_all, "for everyone"), (to_ben, "for ben")]
    assert got_a[1]["data"]["to"] == f"{ann}, {ben}" and got_a[2]["data"]["to"] == "*"
    assert not await a.quiet(0.5)
    a.close()
    b.close()


@REDIS_ONLY
@pytest.mark.parametrize("body, error", [
    ({"to": "", "text": "hi"}, "say who gets the message"),
    ({"to": "ann,,ben", "text": "hi"}, "empty name between commas"),
    ({"to": "ann", "text": "  "}, "type some text"),
    ({"to": "ann, bob smith", "text": "hi"}, "no whitespace"),  # tasks.collect refuses it: the page got 502
])
def test_a_bad_send_form_gets_400_saying_what_to_fix(cluster, demo, body, error):
    status, answer = demo.call("/api/send", body)
    assert status == 400 and error in answer["error"]


def post(url: str, body: bytes, headers: dict) -> tuple[int, dict]:
    status, answer = http_call(url, body, headers, timeout=30)
    return status, json.loads(answer or b"{}")


@REDIS_ONLY
async def test_the_api_refuses_posts_from_another_origin_and_bodies_not_sent_as_json(cluster, demo):
    """Any site the developer visited could broadcast to every user online, or get a token for
    any user, through a form or a ``no-cors`` fetch: a ``text/plain`` body is a simple request,
    which browsers send cross-origin without asking."""
    user = unique("csrf")
    client = await cluster.connect(user)
    body = json.dumps({"to": user, "text": "from elsewhere"}).encode()
    host = demo.url.split("//", 1)[1]

    assert post(demo.url + "/api/send", body, {"Origin": "http://evil.example", "Content-Type": "application/json"})[0] == 403
    assert post(demo.url + "/api/token", json.dumps({"user": user}).encode(), {"Origin": "http://evil.example", "Content-Type": "application/json"})[0] == 403
    status, answer = post(demo.url + "/api/send", body, {"Origin": "http://evil.example", "Content-Type": "text/plain"})
    assert status == 403 and "cross-origin request from 'http://evil.example' refused" in answer["error"]
    status, answer = post(demo.url + "/api/token", json.dumps({"user": user}).encode(),
                          {"Host": f"evil.example:{demo.port}", "Origin": f"http://evil.example:{demo.port}", "Content-Type": "application/json"})
    assert status == 403 and "Host 'evil.example" in answer["error"], answer  # DNS rebinding: same-origin by its Host
    status, answer = post(demo.url + "/api/send", body, {"Content-Type": "text/plain;charset=UTF-8"})
    assert status == 415 and "Content-Type: application/json" in answer["error"]
    assert await client.quiet(1.0) == []
    status, answer = post(demo.url + "/api/send", body, {"Origin": f"http://{host}", "Content-Type": "application/json"})  # its own page
    assert status == 200
    assert [f["id"] for f in await client.messages(1)] == [answer["id"]]
    client.close()


def token_request_with_auth_at(cluster, auth_url: str, name: str) -> tuple[int, dict]:
    """``POST /api/token`` on a demo page of its own whose AUTH_URL is ``auth_url``: (status, answer)."""
    demo = DemoPage(cluster, cluster.node_ports, env={**cluster.env, "AUTH_URL": auth_url}, name=name)
    try:
        return demo.call("/api/token", {"user": "nobody"})
    finally:
        demo.stop()


@REDIS_ONLY
def test_without_the_auth_service_a_token_request_gets_502_naming_it(cluster):
    dead_auth = f"http://127.0.0.1:{launcher.free_port()}"
    status, answer = token_request_with_auth_at(cluster, dead_auth, "demo-no-auth")
    assert status == 502
    assert dead_auth in answer["error"] and "python -m auth" in answer["error"]


@REDIS_ONLY
def test_a_password_in_auth_url_is_neither_shown_by_the_demo_nor_logged(cluster):
    password = "demo-auth-url-password-7c2e"
    auth_url = f"http://push:{password}@127.0.0.1:{launcher.free_port()}"
    demo = DemoPage(cluster, cluster.node_ports, env={**cluster.env, "AUTH_URL": auth_url}, name="demo-auth-password")
    try:
        config_status, config = demo.call("/api/config")
        token_status, answer = demo.call("/api/token", {"user": "nobody"})
    finally:
        demo.stop()
    assert (config_status, token_status) == (200, 502)
    assert config["auth"] == auth_url.replace(password, "***")
    assert auth_url.replace(password, "***") in answer["error"]
    log = demo.service.log_path.read_text(errors="replace")
    assert password not in str(config) + answer["error"] + log, log[-2000:]


class FakeAuth(http.server.BaseHTTPRequestHandler):
    """Reads the request, then answers ``self.server.answer`` as it is: b"" closes the connection
    without a word (Tornado's client raises HTTPStreamClosedError, code 599, even with
    ``raise_error=False``)."""

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.close_connection = True
        if self.server.answer:
            self.wfile.write(self.server.answer)

    def log_message(self, *args) -> None:
        pass


@REDIS_ONLY
@pytest.mark.parametrize("answer, error", [
    (b"", "is `python -m auth` running?"),
    (b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: 14\r\n\r\n<h1>hello</h1>", "without a token"),
    (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n[]", "without a token"),
], ids=["closes-without-answering", "200-not-json", "200-json-without-token"])
def test_an_auth_service_that_says_nothing_or_no_token_gets_502_naming_it(cluster, answer, error):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FakeAuth)
    server.answer = answer
    threading.Thread(target=server.serve_forever, name="fake-auth", daemon=True).start()
    fake_auth = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        status, answer = token_request_with_auth_at(cluster, fake_auth, "demo-fake-auth")
    finally:
        server.shutdown()
        server.server_close()
    assert status == 502
    assert fake_auth in answer["error"] and error in answer["error"]


@REDIS_ONLY
def test_the_demo_refuses_to_run_in_production(cluster, tmp_path):
    env = {**cluster.env, "PUSH_ENV": "production", "AUTH_SECRET": "s" * 40, "AUTH_ADMIN_KEY": "k" * 40}
    argv = [sys.executable, "-m", "demo", "--port", str(launcher.free_port())]
    service = launcher.Service("demo-production", argv, env, log_path=tmp_path / "demo.log").start()
    assert service.wait(30) == 2
    assert "does not run in production" in service.log_tail()

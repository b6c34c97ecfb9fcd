"""A push node checks the tokens that come together in one request to auth (``POST /verify`` with a
list), and each connection still gets its own answer; against an auth that knows only one token
per request, the node falls back to that.  Real node, real auth, real WebSocket clients."""

from __future__ import annotations

import asyncio
import json
import time

import tornado.httpserver
import tornado.netutil
import tornado.web

import launcher
import settings
from auth.app import MAX_BODY_BYTES
from auth.tokens import issue
from tests.integration.test_metrics import scrape, value
from tests.integration.wsclient import Client
from wsnode.auth import MAX_TOKEN_CHARS
from wsnode.closecodes import CloseCode


async def _hello_or_close(url: str) -> tuple[str, object]:
    """``("hello", user)``, or ``("closed", (code, reason))`` when the node closed instead."""
    client = await Client.connect(url, expect_hello=False)
    try:
        frame = await client.next_frame()
    except ConnectionError:
        return "closed", (client.ws.close_code, client.ws.close_reason)
    client.close()
    return frame["type"], frame.get("user")


async def test_tokens_that_come_together_are_checked_in_one_request_and_each_connection_gets_its_own_answer(cluster):
    port = cluster.node_ports[0]
    now = time.time()
    good = {f"together-{n}": issue(settings.AUTH_SECRET, f"together-{n}", now=now, ttl=600).token for n in range(60)}
    revoked = await asyncio.to_thread(cluster.token, "together-revoked")
    await asyncio.to_thread(cluster.revoke, {"token": revoked})
    bad = {"garbage": "not-a-token", "expired": issue(settings.AUTH_SECRET, "together-old", now=now - 7200, ttl=60).token, "revoked": revoked}
    before = await asyncio.to_thread(scrape, cluster.auth_port)

    urls = [cluster.ws_url(port, token) for token in (*good.values(), *bad.values())]
    outcomes = await asyncio.gather(*(_hello_or_close(url) for url in urls))

    assert outcomes[: len(good)] == [("hello", user) for user in good]
    for (kind, (code, reason)), why in zip(outcomes[len(good):], ("invalid", "expired", "revoked")):
        assert kind == "closed" and code == CloseCode.UNAUTHORIZED and why in reason, (why, code, reason)
    after = await asyncio.to_thread(scrape, cluster.auth_port)
    checked = {result: value(after, "auth_verifications_total", result=result) - value(before, "auth_verifications_total", result=result)
               for result in ("ok", "invalid", "expired", "revoked")}
    assert checked == {"ok": len(good), "invalid": 1, "expired": 1, "revoked": 1}
    requests = value(after, "auth_request_duration_seconds_count", route="/verify") - value(before, "auth_request_duration_seconds_count", route="/verify")
    assert 1 <= requests < len(urls), f"{len(urls)} tokens checked in {requests:.0f} requests: none went together"


async def test_tokens_of_long_user_ids_that_come_together_go_in_requests_auth_accepts(cluster):
    # A user id of 128 characters outside the BMP makes a token of about 2,200 characters: 30 of
    # them are more than auth reads in one body (it resets the connection: every connection of the
    # request would be told to try again later).
    port = cluster.node_ports[0]
    users = [f"{n:03d}" + "\U0001F600" * 125 for n in range(100)]
    tokens = [issue(settings.AUTH_SECRET, user, now=time.time(), ttl=600).token for user in users]
    assert len(json.dumps({"tokens": tokens})) > MAX_BODY_BYTES
    before = await asyncio.to_thread(scrape, cluster.auth_port)

    outcomes = await asyncio.gather(*(_hello_or_close(cluster.ws_url(port, token)) for token in tokens))

    assert outcomes == [("hello", user) for user in users]
    after = await asyncio.to_thread(scrape, cluster.auth_port)
    requests = value(after, "auth_request_duration_seconds_count", route="/verify") - value(before, "auth_request_duration_seconds_count", route="/verify")
    assert 3 <= requests < len(tokens), f"{len(tokens)} tokens checked in {requests:.0f} requests"


async def test_a_token_longer_than_any_auth_issues_is_refused_by_the_node_without_asking_auth(cluster):
    before = await asyncio.to_thread(scrape, cluster.auth_port)
    kind, (code, reason) = await _hello_or_close(cluster.ws_url(cluster.node_ports[0], "x" * (MAX_TOKEN_CHARS + 1)))
    assert kind == "closed" and code == CloseCode.UNAUTHORIZED and f"longer than {MAX_TOKEN_CHARS} characters" in reason, (kind, code, reason)
    after = await asyncio.to_thread(scrape, cluster.auth_port)
    assert value(after, "auth_request_duration_seconds_count", route="/verify") == value(before, "auth_request_duration_seconds_count", route="/verify")


class OldVerifyHandler(tornado.web.RequestHandler):
    """What ``POST /verify`` answered before the list form: ``{"token"}`` only, 400 otherwise.  Each
    answer takes 50 ms, so that the tokens that come meanwhile wait together for the next request."""

    def initialize(self, seen: list) -> None:
        self.seen = seen

    async def post(self) -> None:
        body = json.loads(self.request.body)
        self.seen.append(body)
        await asyncio.sleep(0.05)
        if "token" not in body:
            self.set_status(400)
            self.finish({"error": """expected a JSON object like {"token": "..."}, got no 'token' field"""})
        elif body["token"].startswith("user:"):
            self.finish({"user_id": body["token"].removeprefix("user:"), "expires_at": int(time.time()) + 600})
        else:
            self.set_status(401)
            self.finish({"error": "token invalid: not one of this test's"})


async def test_against_an_auth_without_the_list_form_the_node_checks_one_token_per_request(cluster, tmp_path):
    seen: list[dict] = []
    sockets = tornado.netutil.bind_sockets(0, "127.0.0.1")
    old_auth = tornado.httpserver.HTTPServer(tornado.web.Application([(r"/verify", OldVerifyHandler, {"seen": seen})]))
    old_auth.add_sockets(sockets)
    auth_port = sockets[0].getsockname()[1]
    node_port = launcher.free_port()
    log_path = tmp_path / "node.log"
    node = await asyncio.to_thread(launcher.start_node, {**cluster.env, "AUTH_URL": f"http://127.0.0.1:{auth_port}", "AUTH_CACHE_SECONDS": "0"},
                                   node_port, log_path=log_path)
    try:
        users = [f"old-auth-{n}" for n in range(30)]
        for _ in range(2):  # the second round comes after the node learnt: no list at all
            outcomes = await asyncio.gather(*(_hello_or_close(cluster.ws_url(node_port, f"user:{user}")) for user in users),
                                            _hello_or_close(cluster.ws_url(node_port, "not-one")))
            assert outcomes[:-1] == [("hello", user) for user in users]
            kind, (code, reason) = outcomes[-1]
            assert kind == "closed" and code == CloseCode.UNAUTHORIZED and "not one of this test's" in reason
        lists = [body for body in seen if "tokens" in body]
        assert len(lists) == 1, lists  # the first list was refused; after it, one token per request
        assert sum(1 for body in seen if "token" in body) == 2 * (len(users) + 1)
    finally:
        await asyncio.to_thread(node.terminate)
        old_auth.stop()
    warnings = [line for line in log_path.read_text().splitlines() if "does not know POST /verify with a list" in line]
    assert len(warnings) == 1, warnings


def test_a_node_sends_at_most_as_many_tokens_per_request_as_auth_takes():
    from auth.app import MAX_VERIFY_BATCH as auth_takes
    from wsnode.auth import MAX_VERIFY_BATCH as node_sends
    from wsnode.auth import MAX_VERIFY_BODY_BYTES

    assert node_sends == auth_takes
    assert MAX_VERIFY_BODY_BYTES == MAX_BODY_BYTES


def test_the_node_refuses_no_token_auth_issues_and_any_token_it_sends_fits_one_request():
    longest = issue(settings.AUTH_SECRET, "\U0001F600" * 128, now=time.time(), ttl=10**9).token
    assert len(longest) <= MAX_TOKEN_CHARS
    assert len(json.dumps({"token": "\U0001F600" * MAX_TOKEN_CHARS})) <= MAX_BODY_BYTES

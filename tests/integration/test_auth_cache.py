"""The node's cache of token checks (``wsnode.auth.AuthClient``) against a real local Tornado
server standing in for auth, whose answers wait until the test lets them go: a revocation
announced while a check is in flight (``forget()``) must keep that check's answer out of the cache."""

from __future__ import annotations

import asyncio
import json
import time

import pytest
import tornado.httpserver
import tornado.netutil
import tornado.web

from wsnode.auth import AuthClient, AuthRejected, AuthUnavailable


class HeldVerifyHandler(tornado.web.RequestHandler):
    """``POST /verify``: a token ``user:<id>`` is good for ``<id>``; each answer waits for ``release``."""

    def initialize(self, seen: list, release: asyncio.Event) -> None:
        self.seen = seen
        self.release = release

    async def post(self) -> None:
        body = json.loads(self.request.body)
        self.seen.append(body)
        await self.release.wait()
        answers = [{"user_id": token.removeprefix("user:"), "token_id": f"jti-{token}", "issued_at_us": 1, "expires_at": int(time.time()) + 600}
                   for token in body.get("tokens", [body.get("token")])]
        self.finish({"results": answers} if "tokens" in body else answers[0])


@pytest.fixture
async def stand_in():
    """``(auth_url, bodies received, release event)`` of a stand-in auth on a free port."""
    seen: list[dict] = []
    release = asyncio.Event()
    sockets = tornado.netutil.bind_sockets(0, "127.0.0.1")
    server = tornado.httpserver.HTTPServer(tornado.web.Application([(r"/verify", HeldVerifyHandler, {"seen": seen, "release": release})]))
    server.add_sockets(sockets)
    try:
        yield f"http://127.0.0.1:{sockets[0].getsockname()[1]}", seen, release
    finally:
        release.set()
        server.stop()
        await server.close_all_connections()


async def asked(seen: list, count: int) -> None:
    for _ in range(200):
        if len(seen) >= count:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"the stand-in auth got {len(seen)} requests, expected {count}")


async def test_an_answer_is_cached_when_nothing_was_forgotten_meanwhile(stand_in):
    url, seen, release = stand_in
    client = AuthClient(url, cache_seconds=30)
    release.set()

    assert (await client.verify("user:alice")).user_id == "alice"
    assert (await client.verify("user:alice")).user_id == "alice"

    assert len(seen) == 1
    client._http.close()


@pytest.mark.parametrize("users", [["alice"], ["alice", "bob", "carol"]], ids=["alone", "together"])
async def test_answers_in_flight_when_a_revocation_made_the_node_forget_are_returned_but_not_cached(stand_in, users):
    url, seen, release = stand_in
    client = AuthClient(url, cache_seconds=30)
    first = asyncio.gather(*(client.verify(f"user:{user}") for user in users))
    await asked(seen, 1)
    assert seen[0].get("tokens", [seen[0].get("token")]) == [f"user:{user}" for user in users]  # one request for all

    client.forget()  # what the node does when a revocation is announced
    release.set()

    assert [identity.user_id for identity in await first] == users  # RecentRevocations refuses them as they bind
    await asyncio.gather(*(client.verify(f"user:{user}") for user in users))
    assert len(seen) == 2, "the answers auth gave before the revocation were cached and used again"
    client._http.close()


async def test_checks_that_waited_behind_a_check_auth_did_not_answer_fail_with_it_and_are_not_sent(stand_in):
    # An auth that accepts connections and answers nothing (stopped, overloaded): each request
    # times out.  The checks that came meanwhile used to go as the next requests, 100 a time, each
    # timing out in turn: in a reconnect storm the last browsers waited (number / 100) x the
    # timeout for their 1013, long after they had given up and come back with more checks.
    url, seen, _ = stand_in  # never released
    client = AuthClient(url, cache_seconds=0, timeout=0.5)
    first = asyncio.ensure_future(client.verify("user:first"))
    await asked(seen, 1)
    waiting = [asyncio.ensure_future(client.verify(f"user:u{index}")) for index in range(250)]

    results = await asyncio.gather(first, *waiting, return_exceptions=True)

    assert all(isinstance(result, AuthUnavailable) for result in results), {type(result).__name__ for result in results}
    assert len(seen) == 1, f"{len(seen)} requests to an auth that answered none"
    # Failed with the first check's timeout, unasked, not each after a timeout of its own (told by
    # what they say, not by a wall-clock bound, which a loaded machine can overrun).
    assert all("while this token waited for that check: not asked" in str(result) for result in results[1:]), {str(r) for r in results[1:]}
    client._http.close()


class FirstAnswerFailsHandler(tornado.web.RequestHandler):
    """``POST /verify``: the first request waits for ``release`` and is answered with ``status``;
    every later one at once, each token ``user:<id>`` good for ``<id>``."""

    def initialize(self, seen: list, release: asyncio.Event, status: int) -> None:
        self.seen, self.release, self.status = seen, release, status

    async def post(self) -> None:
        body = json.loads(self.request.body)
        self.seen.append(body)
        if len(self.seen) == 1:
            await self.release.wait()
            self.set_status(self.status)
            self.finish({"error": "held, then refused"})
            return
        answers = [{"user_id": token.removeprefix("user:"), "token_id": f"jti-{token}", "issued_at_us": 1, "expires_at": int(time.time()) + 600}
                   for token in body.get("tokens", [body.get("token")])]
        self.finish({"results": answers} if "tokens" in body else answers[0])


@pytest.mark.parametrize("status, waiting_fail", [(500, False), (502, False), (503, True)])
async def test_only_a_check_auth_did_not_answer_or_answered_503_fails_the_checks_waiting_behind_it(status, waiting_fail):
    """An auth that answered a check quickly with an error (a 500 for one token of the request, a
    proxy's 502) will answer the next request quickly too: the checks that waited behind it are
    asked (the README: only a check with no answer, or a 503, fails them unasked).  Failing them
    turned one bad request into 1013s for every browser whose check waited meanwhile."""
    seen: list[dict] = []
    release = asyncio.Event()
    sockets = tornado.netutil.bind_sockets(0, "127.0.0.1")
    server = tornado.httpserver.HTTPServer(tornado.web.Application([(r"/verify", FirstAnswerFailsHandler, {"seen": seen, "release": release, "status": status})]))
    server.add_sockets(sockets)
    client = AuthClient(f"http://127.0.0.1:{sockets[0].getsockname()[1]}", cache_seconds=0)
    try:
        first = asyncio.ensure_future(client.verify("user:first"))
        await asked(seen, 1)
        waiting = [asyncio.ensure_future(client.verify(f"user:u{index}")) for index in range(3)]
        await asyncio.sleep(0.05)
        release.set()

        with pytest.raises(AuthUnavailable, match=str(status)):
            await first
        results = await asyncio.gather(*waiting, return_exceptions=True)
        if waiting_fail:
            assert all(isinstance(result, AuthUnavailable) for result in results), results
            assert len(seen) == 1
        else:
            assert [getattr(result, "user_id", result) for result in results] == ["u0", "u1", "u2"]
            assert len(seen) == 2
    finally:
        client._http.close()
        server.stop()
        await server.close_all_connections()


class RedisDownVerifyHandler(tornado.web.RequestHandler):
    """``POST /verify`` of an auth that cannot read Redis while ``down`` is set: a signed token
    (``user:<id>``) gets 503, a bad one 401 (auth refuses it without reading Redis)."""

    def initialize(self, down: list) -> None:
        self.down = down

    def post(self) -> None:
        body = json.loads(self.request.body)
        tokens = body.get("tokens", [body.get("token")])
        if self.down and any(token.startswith("user:") for token in tokens):
            self.set_status(503)
            self.finish({"error": "Redis did not answer"})
            return
        answers = [{"user_id": token.removeprefix("user:"), "token_id": f"jti-{token}", "issued_at_us": 1, "expires_at": int(time.time()) + 600}
                   if token.startswith("user:") else {"error": "token invalid: bad"} for token in tokens]
        if "tokens" in body:
            self.finish({"results": answers})
        elif "error" in answers[0]:
            self.set_status(401)
            self.finish(answers[0])
        else:
            self.finish(answers[0])


async def test_a_node_logs_auths_outage_once_when_tokens_auth_refuses_without_redis_come_between(caplog):
    """A 401 for a bad or expired token is no sign that auth can check tokens again (auth refuses
    those without reading Redis): it logged "auth answers again" during auth's Redis outage, and
    the next check the outage's WARNING again, one pair per such check in a reconnect storm."""
    import logging

    down = [True]
    sockets = tornado.netutil.bind_sockets(0, "127.0.0.1")
    server = tornado.httpserver.HTTPServer(tornado.web.Application([(r"/verify", RedisDownVerifyHandler, {"down": down})]))
    server.add_sockets(sockets)
    client = AuthClient(f"http://127.0.0.1:{sockets[0].getsockname()[1]}", cache_seconds=0)
    caplog.set_level(logging.INFO, logger="wsnode.auth")
    try:
        for index in range(3):
            with pytest.raises(AuthUnavailable):
                await client.verify(f"user:u{index}")
            with pytest.raises(AuthRejected):
                await client.verify("bad-token")
            results = await asyncio.gather(client.verify("bad-1"), client.verify("bad-2"), return_exceptions=True)
            assert all(isinstance(result, AuthRejected) for result in results), results
        warnings = [r.getMessage() for r in caplog.records if r.name == "wsnode.auth" and r.levelno >= logging.WARNING]
        assert len(warnings) == 1 and warnings[0].startswith("auth unavailable:"), warnings
        assert not [r for r in caplog.records if "answers again" in r.getMessage()]
        down.clear()
        assert (await client.verify("user:back")).user_id == "back"
        [again] = [r.getMessage() for r in caplog.records if "answers again" in r.getMessage()]
        assert "3 token checks failed meanwhile" in again, again
    finally:
        client._http.close()
        server.stop()
        await server.close_all_connections()

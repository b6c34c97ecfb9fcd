"""Revoking a token, or every token of a user, closes the connections already open with it, on
every node, with 4401 (``wsnode.revocations``); other connections stay open and go on receiving.
A node that missed the announcement (its pub/sub connection dropped) checks its connections
against the revocation list once it has subscribed again."""

from __future__ import annotations

import asyncio
import json
import re
import time
import uuid

import psutil
import pytest
import redis.asyncio
import tornado.httpserver
import tornado.netutil
import tornado.web

import launcher
from auth.revocations import CHANNEL, JTI_PREFIX, USER_PREFIX
from tests.integration.test_guarantees import wait_for
from tests.integration.wsclient import Client
from wsnode import revocations
from wsnode.closecodes import CloseCode


async def connect_with(cluster, token: str, port: int) -> Client:
    return await Client.connect(cluster.ws_url(port, token), wait_resumed=True)


async def still_receives(cluster, client: Client, user: str) -> None:
    message_id = await cluster.collect(user, {"still": "open"})
    frames = await client.messages(1, timeout=20)
    assert [f["id"] for f in frames] == [message_id]


async def test_revoking_a_token_closes_its_connections_on_every_node_and_no_other(cluster):
    first, second = [await asyncio.to_thread(cluster.token, "revoked-live") for _ in range(2)]
    on_a = await connect_with(cluster, first, cluster.node_ports[0])
    on_b = await connect_with(cluster, first, cluster.node_ports[1])
    other_token = await connect_with(cluster, second, cluster.node_ports[0])
    other_user = await cluster.connect("revoked-live-bystander")

    await asyncio.to_thread(cluster.revoke, {"token": first})

    for client in (on_a, on_b):
        assert await client.closed(10) == (CloseCode.UNAUTHORIZED, "token revoked")
    # Nor does it open a new one, though each node checked it moments ago (its cache was cleared).
    for port in cluster.node_ports:
        again = await Client.connect(cluster.ws_url(port, first), expect_hello=False)
        code, reason = await again.closed(10)
        assert code == CloseCode.UNAUTHORIZED and "revoked" in reason
    await still_receives(cluster, other_token, "revoked-live")
    await still_receives(cluster, other_user, "revoked-live-bystander")
    other_token.close()
    other_user.close()


async def test_revoking_a_user_closes_the_connections_of_tokens_issued_before_and_not_after(cluster):
    old = await asyncio.to_thread(cluster.token, "logged-out")
    on_a = await connect_with(cluster, old, cluster.node_ports[0])
    on_b = await connect_with(cluster, old, cluster.node_ports[1])

    await asyncio.to_thread(cluster.revoke, {"user_id": "logged-out"})

    for client in (on_a, on_b):
        assert await client.closed(10) == (CloseCode.UNAUTHORIZED, "token revoked")
    fresh = await connect_with(cluster, await asyncio.to_thread(cluster.token, "logged-out"), cluster.node_ports[0])
    await still_receives(cluster, fresh, "logged-out")
    fresh.close()


async def test_a_node_that_missed_a_revocation_closes_the_connection_once_subscribed_again(cluster):
    """The announcement lost: the node's pub/sub connection is cut, and the user's revocation is
    written to the list as auth writes it, but not announced.  Once subscribed again the node
    reads the list and closes the connection."""
    port = cluster.node_ports[0]
    client = await connect_with(cluster, await asyncio.to_thread(cluster.token, "missed-revocation"), port)
    name = f"wsnode:127.0.0.1:{port}:revocations"
    listener = [c for c in cluster.routes.client_list() if c.get("name") == name]
    assert len(listener) == 1, f"no Redis client named {name}"
    cluster.routes.set("auth:revoked:user:missed-revocation", int(time.time() * 1_000_000), ex=3600)
    cluster.routes.client_kill_filter(_id=listener[0]["id"])

    assert await client.closed(15) == (CloseCode.UNAUTHORIZED, "token revoked")
    # The node logs its check once done; a thread of this process copies its output to the file.
    checked = re.compile(r"checked \d+ connections against the revocation list: [1-9]\d* revoked")
    for _ in range(50):
        if checked.search(cluster._log(f"node-{port}").read_text(errors="replace")):
            break
        await asyncio.sleep(0.1)
    else:
        raise AssertionError("the connection was not closed by the node's own check of the revocation list")


async def test_the_listener_keeps_its_subscription_alive_with_pings_and_reconnects_when_they_go_unanswered(tmp_path, monkeypatch):
    """``RevocationListener`` alone, against a Redis of its own: once subscribed it runs its check
    (a revocation published before the first subscription went unseen); idle, it pings and stays
    subscribed; a connection that stops answering (here the Redis server stopped with SIGSTOP, so
    no reset comes) is taken for lost after two ping intervals, and once Redis answers again the
    listener subscribes again and runs its check.  (Not the session's Redis: stopping that one
    stops every process of the shared cluster with it.)"""
    redis_server = launcher.RedisServer(data_dir=tmp_path / "redis").start()
    monkeypatch.setattr(revocations, "PING_SECONDS", 0.3)
    monkeypatch.setattr(revocations, "RESUBSCRIBE_SECONDS", 0.1)
    got: list[revocations.Revocation] = []
    checks = asyncio.Event()
    checked = []

    async def check() -> None:
        checked.append(listener.subscribed)
        if len(checked) > 1:
            checks.set()

    listener = revocations.RevocationListener(redis_server.url(1), "revocations-test", got.append, check)
    listener.start()
    publisher = redis.asyncio.Redis.from_url(redis_server.url(1))
    try:
        for _ in range(50):
            if listener.subscribed:
                break
            await asyncio.sleep(0.1)
        await asyncio.sleep(1.5)  # five ping intervals, idle
        # Once, after the first subscription (the node took connections before it), and not again.
        assert listener.subscribed and checked == [True]
        await publisher.publish(CHANNEL, '{"user_id": "idle", "cutoff_us": 7}')
        for _ in range(50):
            if got:
                break
            await asyncio.sleep(0.1)
        assert got == [revocations.Revocation("idle", cutoff_us=7)]

        process = psutil.Process(redis_server.service.pid)
        process.suspend()
        try:
            for _ in range(50):
                if not listener.subscribed:
                    break
                await asyncio.sleep(0.1)
            assert not listener.subscribed, "an unanswered PING did not end the subscription"
        finally:
            process.resume()
        await asyncio.wait_for(checks.wait(), 15)
        assert listener.subscribed
    finally:
        await listener.stop()
        await publisher.aclose()
        redis_server.stop()


class HeldAuth(tornado.web.RequestHandler):
    """Stand-in auth: a token ``<user>/<jti>`` is good (issued at 1 us, expiring in 10 min), and each
    answer waits for ``release``: an answer auth gave before a revocation, still on its way to the
    node while the revocation is made."""

    def initialize(self, seen: list, release: asyncio.Event) -> None:
        self.seen, self.release = seen, release

    async def post(self) -> None:
        body = json.loads(self.request.body)
        self.seen.append(body)
        await self.release.wait()
        answers = [{"user_id": token.split("/")[0], "token_id": token.split("/")[1], "issued_at_us": 1, "expires_at": int(time.time()) + 600}
                   for token in body.get("tokens", [body.get("token")])]
        self.finish({"results": answers} if "tokens" in body else answers[0])


class HeldNode:
    """A node of the cluster whose auth is a :class:`HeldAuth`."""

    def __init__(self, cluster, service: launcher.Service, port: int, seen: list, release: asyncio.Event) -> None:
        self.cluster, self.service, self.port, self.seen, self.release = cluster, service, port, seen, release

    def catch_ups(self) -> int:
        return len(re.findall(r"checked \d+ connections against the revocation list", self.service.log_tail(1000)))

    async def miss_announcements(self) -> None:
        """Cut the node's pub/sub connection (what it is sent meanwhile is lost) and return once it
        has subscribed again and checked its connections against the revocation list."""
        before = self.catch_ups()
        name = f"wsnode:127.0.0.1:{self.port}:revocations"
        listener = [c for c in self.cluster.routes.client_list() if c.get("name") == name]
        assert len(listener) == 1, f"no Redis client named {name}"
        self.cluster.routes.client_kill_filter(_id=listener[0]["id"])
        await wait_for(lambda: self.catch_ups() > before, 8, "the node's catch-up after it subscribed again")


@pytest.fixture
async def held_node(cluster, tmp_path):
    seen: list[dict] = []
    release = asyncio.Event()
    release.set()
    sockets = tornado.netutil.bind_sockets(0, "127.0.0.1")
    auth = tornado.httpserver.HTTPServer(tornado.web.Application([(r"/verify", HeldAuth, {"seen": seen, "release": release})]))
    auth.add_sockets(sockets)
    port = launcher.free_port()
    service = await asyncio.to_thread(launcher.start_node, {**cluster.env, "AUTH_URL": f"http://127.0.0.1:{sockets[0].getsockname()[1]}"},
                                      port, log_path=tmp_path / "node.log")
    node = HeldNode(cluster, service, port, seen, release)
    try:
        await wait_for(node.catch_ups, 5, "the node's first check of the revocation list")
        yield node
    finally:
        release.set()
        await asyncio.to_thread(service.terminate, 10)
        auth.stop()


async def outcome(client: Client, seconds: float) -> tuple[int | None, str | None, list[str]]:
    """The close code and reason the node closed ``client`` with, (None, None) if it is still open
    after ``seconds`` of quiet; and the types of the frames it got before."""
    try:
        while True:
            await client.next_frame(seconds)
    except ConnectionError:
        return client.ws.close_code, client.ws.close_reason, [frame["type"] for frame in client.frames]
    except (asyncio.TimeoutError, TimeoutError):
        client.close()
        return None, None, [frame["type"] for frame in client.frames]


@pytest.mark.parametrize("cluster", ["redis"], indirect=True)  # the broker plays no part
async def test_a_handshake_auth_answered_before_a_revocation_the_node_missed_is_refused_when_it_binds_after_the_catch_up(held_node):
    """Auth answered the token check before the user was revoked; the announcement was lost (the
    node's pub/sub connection cut), and the node's catch-up ran before the handshake bound, so the
    catch-up did not see it and no announcement covers it: it opened, with a revoked token, until
    the token expired.  It now reads the revocation list as it binds, and is refused."""
    user = f"checked-before-revocation-{uuid.uuid4().hex[:6]}"
    held_node.release.clear()
    attempt = asyncio.ensure_future(Client.connect(held_node.cluster.ws_url(held_node.port, f"{user}/{user}-jti"), expect_hello=False))
    await wait_for(lambda: held_node.seen, 5, "the node never asked auth about the token")
    held_node.cluster.routes.set(USER_PREFIX + user, int(time.time() * 1_000_000), ex=3600)  # as auth records it
    await held_node.miss_announcements()
    held_node.release.set()

    assert await outcome(await attempt, 3) == (CloseCode.UNAUTHORIZED, "token revoked", [])
    await wait_for(lambda: "token revoked while it was checked, unannounced to this node" in held_node.service.log_tail(50), 5,
                   "the node's log of the refusal")

    # A token checked across a catch-up that is not revoked is read from the list too, and opens.
    other = f"checked-not-revoked-{uuid.uuid4().hex[:6]}"
    held_node.release.clear()
    attempt = asyncio.ensure_future(Client.connect(held_node.cluster.ws_url(held_node.port, f"{other}/{other}-jti"), expect_hello=False))
    await wait_for(lambda: len(held_node.seen) > 1, 5, "the node never asked auth about the other token")
    await held_node.miss_announcements()
    held_node.release.set()
    bystander = await attempt
    assert (await bystander.next_frame(5))["type"] == "hello"
    bystander.close()


@pytest.mark.parametrize("cluster", ["redis"], indirect=True)  # the broker plays no part
async def test_a_refresh_auth_answered_before_its_token_was_revoked_unannounced_closes_the_connection(held_node):
    """The same for a ``refresh``: the catch-up judged the connection's previous token, and the
    new one, revoked meanwhile, was taken.  It is now read from the list before it is taken."""
    user = f"refreshed-before-revocation-{uuid.uuid4().hex[:6]}"
    client = await Client.connect(held_node.cluster.ws_url(held_node.port, f"{user}/{user}-old"))
    held_node.release.clear()
    asked = len(held_node.seen)
    await client.send({"type": "refresh", "token": f"{user}/{user}-new"})
    await wait_for(lambda: len(held_node.seen) > asked, 5, "the node never asked auth about the refresh's token")
    held_node.cluster.routes.set(JTI_PREFIX + f"{user}-new", 1, ex=3600)  # that token alone, as auth records it
    await held_node.miss_announcements()
    held_node.release.set()

    code, reason, frames = await outcome(client, 3)
    assert (code, reason) == (CloseCode.UNAUTHORIZED, "refresh refused: token revoked")
    assert "refreshed" not in frames

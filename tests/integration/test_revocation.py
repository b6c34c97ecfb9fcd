"""Revoking a token, or every token of a user, closes the connections already open with it, on
every node, with 4401 (``wsnode.revocations``); other connections stay open and go on receiving.
A node that missed the announcement (its pub/sub connection dropped) checks its connections
against the revocation list once it has subscribed again."""

from __future__ import annotations

import asyncio
import re
import time

import psutil
import redis.asyncio

import launcher
from auth.revocations import CHANNEL
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

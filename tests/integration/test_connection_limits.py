"""``MAX_CONNECTIONS``, ``MAX_USER_CONNECTIONS`` and ``MAX_USER_CONNECTS`` on real nodes: past the
node's limit a handshake gets HTTP 503 before the upgrade; past a user's, a new connection of that
user is closed with 4429 while other users connect (connections held on one node, or connects made
in a window on any node of the cluster); each is counted, and a slot freed is usable again."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import time

import pytest
import tornado.httpclient

from tests.integration.tcpproxy import FreezableProxy
from tests.integration.test_metrics import health as healthz
from tests.integration.test_metrics import scrape, value
from tests.integration.wsclient import Client
from wsnode.connectrate import log_key
from wsnode.registry import route_key
from wsnode.closecodes import CloseCode

pytestmark = pytest.mark.parametrize("cluster", ["redis"], indirect=True)  # node-side only: one broker is enough


async def connect(cluster, port: int, user: str) -> Client:
    token = await asyncio.to_thread(cluster.token, user)
    return await Client.connect(cluster.ws_url(port, token), wait_resumed=True)


async def refused_before_upgrade(cluster, port: int, user: str) -> tornado.httpclient.HTTPClientError:
    token = await asyncio.to_thread(cluster.token, user)
    with pytest.raises(tornado.httpclient.HTTPClientError) as caught:
        await Client.connect(cluster.ws_url(port, token))
    return caught.value


async def wait_count(port: int, count: int) -> None:
    for _ in range(100):
        if value(await asyncio.to_thread(scrape, port), "push_node_connections") == count:
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"the node on {port} never held {count} connections")


async def test_a_user_past_max_user_connections_is_closed_with_4429_and_others_are_not(cluster):
    node = cluster.start_node(MAX_USER_CONNECTIONS=2)
    tabs = [await connect(cluster, node.port, "limited-user") for _ in range(2)]

    token = await asyncio.to_thread(cluster.token, "limited-user")
    third = await Client.connect(cluster.ws_url(node.port, token), expect_hello=False)
    assert await third.closed(10) == (CloseCode.TOO_MANY_CONNECTIONS, "too many connections of this user on this node")
    other = await connect(cluster, node.port, "limited-other")  # another user is not limited by it
    # Both tabs still get their messages; once one closes, the user may connect again.
    message_id = await cluster.collect("limited-user", {"n": 1})
    for tab in tabs:
        assert [frame["id"] for frame in await tab.messages(1)] == [message_id]
    tabs[0].close()
    await wait_count(node.port, 2)
    again = await connect(cluster, node.port, "limited-user")
    assert again.hello["user"] == "limited-user"
    assert value(await asyncio.to_thread(scrape, node.port), "push_node_rejected_connections_total", code="4429") == 1
    for client in (tabs[1], other, again):
        client.close()


#: The connect rate of the test below: 3 connects per user in any 12 s, so that the three admitted
#: ones fall in one window on a loaded machine too (each takes well under a second).
CONNECTS, WINDOW = 3, 12


async def test_a_user_past_max_user_connects_on_any_node_is_closed_with_4429_until_the_window_passes_and_others_are_not(cluster):
    """Two nodes with ``MAX_USER_CONNECTS``: the user's connects are counted across both (a
    reconnect loop spread by a load balancer), the one past the limit is closed with 4429 and the
    time to wait before it binds (no hello, no replay, no lease on that node), another user connects
    meanwhile, and once the oldest connect left the window the user connects again."""
    nodes = [cluster.start_node(MAX_USER_CONNECTS=f"{CONNECTS}/{WINDOW}") for _ in range(2)]
    user, other = "rate-limited-user", "rate-limited-other"
    started = time.monotonic()
    # A reconnect loop over the two nodes: each connection closed before the next one opens.
    for port in (nodes[0].port, nodes[1].port):
        client = await connect(cluster, port, user)
        client.close()
        await wait_count(port, 0)
    held = await connect(cluster, nodes[0].port, user)  # the third, still open

    token = await asyncio.to_thread(cluster.token, user)
    refused = await Client.connect(cluster.ws_url(nodes[1].port, token), expect_hello=False)
    code, reason = await outcome(refused)
    assert time.monotonic() - started < WINDOW - 1, "the three connects took longer than the window: the test proves nothing"
    assert code == CloseCode.TOO_MANY_CONNECTIONS, (code, reason)
    wait = re.fullmatch(r"too many connects of this user, retry in (\d+) s", reason)
    assert wait and 1 <= int(wait[1]) <= WINDOW, reason
    samples = await asyncio.to_thread(scrape, nodes[1].port)
    assert value(samples, "push_node_rejected_connections_total", code="4429") == 1
    assert value(samples, "push_node_connects_total") == 1  # the second connect only: the refused one never bound
    assert cluster.routes.zscore(route_key(user), f"127.0.0.1:{nodes[1].port}") is None  # no lease there
    assert cluster.routes.zscore(route_key(user), f"127.0.0.1:{nodes[0].port}") is not None  # the held one's stays

    another = await connect(cluster, nodes[1].port, other)  # another user is not limited by it
    assert another.hello["user"] == other

    await asyncio.sleep(int(wait[1]))  # the oldest connect has left the window
    again = await connect(cluster, nodes[1].port, user)
    assert again.hello["user"] == user
    # Held all along, the third connection still gets the user's messages, as does the new one.
    message_id = await cluster.collect(user, {"n": 1})
    for client in (held, again):
        assert [frame["id"] for frame in await client.messages(1)] == [message_id]
    log = cluster._log(f"node-{nodes[1].port}").read_text(errors="replace")
    assert f"rejected with 4429: too many connects of this user, retry in {wait[1]} s: {CONNECTS} connects in {WINDOW} s already" in log
    for client in (held, another, again):
        client.close()


async def test_with_redis_cut_off_max_user_connects_refuses_only_what_the_lease_write_would(cluster):
    """The node's Redis stops answering (a partition): a connection whose lease is to be written is
    closed with 1013, as without the limit, and a second one of a user whose lease is written
    already, which without the limit would not have asked Redis, is let in uncounted: the limiter
    does not make the node refuse more than it did."""
    proxy, url = FreezableProxy.to_url(cluster.env["REDIS_URL"])
    try:
        # Leases outlive the cut (the node's Redis calls give up after 5 s).
        node = cluster.start_node(REDIS_URL=url, LEASE_TTL=60, MAX_USER_CONNECTS="5/60")
        user, fresh_user = f"cut-off-{node.port}", f"cut-off-new-{node.port}"
        held = await connect(cluster, node.port, user)
        tokens = [await asyncio.to_thread(cluster.token, name) for name in (user, fresh_user)]
        proxy.freeze()
        second, fresh = await asyncio.gather(*(Client.connect(cluster.ws_url(node.port, token), expect_hello=False, timeout=30)
                                               for token in tokens))
        assert await outcome(second, 30) == ("hello", user)
        assert await outcome(fresh, 30) == (CloseCode.TRY_AGAIN_LATER, CloseCode.TRY_AGAIN_LATER.reason)
        proxy.thaw()
        assert cluster.routes.zcard(log_key(user)) == 1  # the held connection's connect only
        assert not cluster.routes.exists(log_key(fresh_user))
        assert "connect rate of 1 connections not checked" in node.log_tail(200)
        for client in (held, second):
            client.close()
    finally:
        proxy.close()


async def test_a_node_at_max_connections_answers_503_before_the_upgrade_until_one_closes(cluster):
    node = cluster.start_node(MAX_CONNECTIONS=3)
    held = [await connect(cluster, node.port, f"full-{n}") for n in range(3)]

    error = await refused_before_upgrade(cluster, node.port, "full-3")
    assert error.code == 503 and b"MAX_CONNECTIONS" in error.response.body
    # Not ready for more, so a load balancer sends new ones elsewhere; the held ones go on.
    status, health = await asyncio.to_thread(healthz, node.port)
    assert (status, health["ready"], health["full"], health["reason"]) == (503, False, True, "full: MAX_CONNECTIONS connections")
    assert value(await asyncio.to_thread(scrape, node.port), "push_node_rejected_connections_total", code="503") == 1
    other_node = await connect(cluster, cluster.node_ports[0], "full-3")  # the other node takes it
    held[0].close()
    await wait_count(node.port, 2)
    status, health = await asyncio.to_thread(healthz, node.port)
    assert (status, health["ready"], health["full"]) == (200, True, False)
    late = await connect(cluster, node.port, "full-3")
    assert late.hello["node"] == f"127.0.0.1:{node.port}"
    for client in (*held[1:], other_node, late):
        client.close()


async def test_handshakes_in_flight_when_the_node_fills_are_closed_with_1013_as_they_bind(cluster):
    """Auth stopped (SIGSTOP) holds two handshakes in their token check, past the 503 check; once
    auth answers, the first binds and fills the node, and the second is closed with 1013."""
    node = cluster.start_node(MAX_CONNECTIONS=1)
    tokens = [await asyncio.to_thread(cluster.token, f"in-flight-{n}") for n in range(2)]
    os.kill(cluster.auth.pid, signal.SIGSTOP)
    try:
        pending = [asyncio.ensure_future(Client.connect(cluster.ws_url(node.port, token), expect_hello=False, timeout=20)) for token in tokens]
        await asyncio.sleep(1.0)  # both upgraded requests wait in prepare for auth
    finally:
        os.kill(cluster.auth.pid, signal.SIGCONT)
    clients = await asyncio.gather(*pending)
    outcomes = [await outcome(client) for client in clients]
    bound = [found for found in outcomes if found[0] == "hello"]
    assert len(bound) == 1 and bound[0][1] in ("in-flight-0", "in-flight-1"), outcomes
    assert [found for found in outcomes if found[0] != "hello"] == [(CloseCode.TRY_AGAIN_LATER, "node full, connect to another node")]
    for client in clients:
        client.close()


async def outcome(client: Client, timeout: float = 10) -> tuple:
    """``("hello", user)``, or ``(code, reason)`` when the node closed instead."""
    try:
        frame = await client.next_frame(timeout)
    except ConnectionError:
        return client.ws.close_code, client.ws.close_reason
    return frame["type"], frame["user"]


async def test_a_client_that_leaves_while_its_token_is_checked_is_not_bound(cluster):
    """Tornado calls ``on_close`` at once when a client leaves during the token check (before the
    upgrade), then still upgrades the dead socket and calls ``open``: such a connection was bound
    after it had been unbound, and stayed so for good (its lease renewed for ever, counted against
    ``MAX_CONNECTIONS``)."""
    node = cluster.start_node()
    users = [f"left-early-{n}" for n in range(20)]
    tokens = [await asyncio.to_thread(cluster.token, user) for user in users]  # fresh: checked with auth, not from the cache
    for token in tokens:
        reader, writer = await asyncio.open_connection("127.0.0.1", node.port)
        writer.write((f"GET /ws?token={token} HTTP/1.1\r\nHost: 127.0.0.1:{node.port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                      "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
        await writer.drain()
        writer.close()  # before the node answers
    await asyncio.sleep(1.5)
    await wait_count(node.port, 0)
    # (A client whose close the node saw only after the upgrade was bound, then unbound as usual.)
    assert not [user for user in users if cluster.routes.exists(route_key(user))]
    assert "left during its handshake" in cluster._log(f"node-{node.port}").read_text(errors="replace"), \
        "no client left during its token check: the test did not make the case it is about"


async def test_a_handshake_whose_token_check_ends_while_the_node_drains_is_closed_with_1001(cluster):
    """Auth stopped (SIGSTOP) holds a handshake in its token check, past the draining check that
    answers 503; the node is told to stop (SIGTERM) meanwhile.  Once auth answers, the connection
    is closed with 1001 ("reconnect elsewhere") instead of being bound to a node that is going."""
    node = cluster.start_node()
    token = await asyncio.to_thread(cluster.token, "drained-in-flight")
    os.kill(cluster.auth.pid, signal.SIGSTOP)
    try:
        pending = asyncio.ensure_future(Client.connect(cluster.ws_url(node.port, token), expect_hello=False, timeout=20))
        await asyncio.sleep(1.0)  # the upgraded request waits in prepare for auth
        os.kill(node.pid, signal.SIGTERM)
        log = cluster._log(f"node-{node.port}")
        for _ in range(50):
            if "draining" in log.read_text(errors="replace"):
                break
            await asyncio.sleep(0.02)
        else:
            raise AssertionError("the node never began draining")
    finally:
        os.kill(cluster.auth.pid, signal.SIGCONT)
    client = await pending
    assert await outcome(client) == (CloseCode.GOING_AWAY, CloseCode.GOING_AWAY.reason)
    assert await asyncio.to_thread(node.terminate, 20) == 0
    assert "began draining while the connection opened" in log.read_text(errors="replace")
    assert not cluster.routes.exists(route_key("drained-in-flight"))

"""A connection lives on its token (``wsnode.expiry``): the hello frame says when the token
expires; a connection still on it ``TOKEN_EXPIRY_GRACE`` seconds later (1 s in these tests) is
closed with 4401 "token expired"; a client that sends a newer token of the same user (``refresh``)
goes on, and one that sends a bad, revoked or another user's token is closed with 4401."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest

from tests.integration.conftest import TOKEN_EXPIRY_GRACE
from tests.integration.test_metrics import scrape, value
from tests.integration.wsclient import Client
from wsnode.closecodes import CloseCode


#: Node-side behaviour: one broker is enough (the messages these tests collect are checked on both
#: elsewhere), and it keeps CI's run shorter.
pytestmark = pytest.mark.parametrize("cluster", ["redis"], indirect=True)


async def token(cluster, user: str, ttl: int | None = None) -> str:
    return await asyncio.to_thread(cluster.token, user, ttl)


async def connect(cluster, tok: str, port_index: int = 0) -> Client:
    return await Client.connect(cluster.ws_url(cluster.node_ports[port_index], tok), wait_resumed=True)


async def test_a_connection_on_a_token_that_expires_is_closed_with_4401_after_the_grace_and_not_before(cluster):
    short = await token(cluster, "expiring", ttl=2)
    client = await connect(cluster, short)
    expires_at = client.hello["expires_at"]
    assert isinstance(expires_at, int) and 0 < expires_at - time.time() <= 3  # auth rounds the expiry up to a second
    assert 0 < client.hello["expires_in"] <= 3

    code, reason = await client.closed(timeout=expires_at + TOKEN_EXPIRY_GRACE + 10 - time.time())

    closed_at = time.time()
    assert (code, reason) == (CloseCode.UNAUTHORIZED, "token expired")
    assert closed_at >= expires_at + TOKEN_EXPIRY_GRACE - 0.05, "closed before the token expired and its grace ran out"
    # And the same token opens nothing any more, on either node.
    for index in range(2):
        again = await Client.connect(cluster.ws_url(cluster.node_ports[index], short), expect_hello=False)
        code, reason = await again.closed(10)
        assert code == CloseCode.UNAUTHORIZED and "expired" in reason


async def test_a_connection_that_refreshes_its_token_outlives_the_first_one_and_keeps_receiving(cluster):
    user = "refreshing"
    client = await connect(cluster, await token(cluster, user, ttl=2), port_index=1)
    first_expiry = client.hello["expires_at"]
    expiries = []
    while time.time() < first_expiry + TOKEN_EXPIRY_GRACE + 1.5:  # well past the first token's expiry and its grace
        await asyncio.sleep(1.0)
        await client.send({"type": "refresh", "token": await token(cluster, user, ttl=3)})
        _, answer = await client.until("refreshed", timeout=10)
        assert 0 < answer["expires_in"] <= 4
        expiries.append(answer["expires_at"])
    assert len(expiries) >= 3 and expiries == sorted(expiries) and expiries[0] >= first_expiry

    message_id = await cluster.collect(user, {"after": "refreshes"})
    assert [frame["id"] for frame in await client.messages(1, timeout=20)] == [message_id]
    # And the last token's expiry is enforced in turn.
    code, reason = await client.closed(timeout=expiries[-1] + TOKEN_EXPIRY_GRACE + 10 - time.time())
    assert (code, reason) == (CloseCode.UNAUTHORIZED, "token expired")


async def test_a_refresh_with_another_users_token_closes_the_connection_with_4401(cluster):
    client = await connect(cluster, await token(cluster, "refresh-owner"))

    await client.send({"type": "refresh", "token": await token(cluster, "refresh-intruder")})

    assert await client.closed(10) == (CloseCode.UNAUTHORIZED, "refresh refused: the token is another user's")


@pytest.mark.parametrize("kind", ["garbage", "revoked", "expired"])
async def test_a_refresh_with_a_token_auth_refuses_closes_the_connection_with_4401_saying_why(cluster, kind):
    user = f"refresh-{kind}"
    client = await connect(cluster, await token(cluster, user))
    if kind == "garbage":
        new = "not-a-token"
    else:
        new = await token(cluster, user, ttl=1)
        if kind == "revoked":
            await asyncio.to_thread(cluster.revoke, {"token": new})
        else:
            await asyncio.sleep(2.1)  # past its expiry, which auth rounds up to a second

    await client.send({"type": "refresh", "token": new})

    code, reason = await client.closed(10)
    expected = {"garbage": "token invalid", "revoked": "token revoked", "expired": "token expired"}[kind]
    assert code == CloseCode.UNAUTHORIZED and reason.startswith("refresh refused:") and expected in reason, reason


async def test_a_refresh_frame_without_a_token_is_a_bad_request(cluster):
    client = await connect(cluster, await token(cluster, "refresh-malformed"))

    await client.send({"type": "refresh", "token": 42})

    code, reason = await client.closed(10)
    assert code == CloseCode.BAD_REQUEST and "refresh needs a token" in reason


async def test_a_refreshed_connection_is_still_closed_by_a_revocation_of_its_new_token(cluster):
    user = "refresh-then-revoke"
    client = await connect(cluster, await token(cluster, user))
    new = await token(cluster, user)
    await client.send({"type": "refresh", "token": new})
    await client.until("refreshed", timeout=10)

    await asyncio.to_thread(cluster.revoke, {"token": new})

    assert await client.closed(10) == (CloseCode.UNAUTHORIZED, "token revoked")


async def test_while_auth_does_not_answer_a_refresh_gets_refresh_error_and_the_connection_stays(cluster):
    """Auth stopped (SIGSTOP): the node's check times out (5 s) and it answers ``refresh_error``; a
    second refresh sent meanwhile is answered ``refresh_error`` at once, without asking auth; once
    auth answers again a refresh goes through on the same connection."""
    user = "refresh-auth-down"
    port = cluster.node_ports[0]
    before = await asyncio.to_thread(scrape, port)
    client = await connect(cluster, await token(cluster, user))
    first, second, third = [await token(cluster, user) for _ in range(3)]  # none checked yet: not in the node's cache
    os.kill(cluster.auth.pid, signal.SIGSTOP)
    try:
        await client.send({"type": "refresh", "token": first})
        await client.send({"type": "refresh", "token": second})
        busy = await client.next_frame(timeout=4)
        assert busy == {"type": "refresh_error", "reason": "a refresh is in flight: wait for its answer"}
        unavailable = await client.next_frame(timeout=15)
        assert unavailable == {"type": "refresh_error", "reason": "auth unavailable, try again"}
    finally:
        os.kill(cluster.auth.pid, signal.SIGCONT)
    await client.send({"type": "refresh", "token": third})
    _, answer = await client.until("refreshed", timeout=15)
    assert answer["expires_in"] > 3000
    message_id = await cluster.collect(user, {"after": "auth came back"})
    assert [frame["id"] for frame in await client.messages(1, timeout=20)] == [message_id]
    after = await asyncio.to_thread(scrape, port)
    counted = {outcome: value(after, "push_node_token_refreshes_total", outcome=outcome) - value(before, "push_node_token_refreshes_total", outcome=outcome)
               for outcome in ("ok", "busy", "unavailable", "rejected")}
    assert counted == {"ok": 1, "busy": 1, "unavailable": 1, "rejected": 0}

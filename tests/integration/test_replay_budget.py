"""REPLAY_MAX_BYTES on a real cluster: an opening replay whose messages' frames take more than the
budget sends the newest that fit, in order, says ``truncated``, and live messages follow with no gap;
one within the budget is whole.  A private cluster with a budget of 4 KB (and MAX_MESSAGE_BYTES
of 1 KB, which the budget must hold), so that a backlog of a few small messages passes it.  Its
clients do not ack, and redelivery is not what these tests look at: it waits an hour here, where
the other clusters' 4 s (``REDELIVER_AFTER``) sent the unacked messages a truncated replay left out
again, after the live ones, into a test that a slow machine had kept running that long."""

from __future__ import annotations

import asyncio
import uuid

import pytest

import launcher
from tasks.replay import newest_within
from tests.integration.conftest import Cluster, start_or_explain
from tests.integration.wsclient import Client, dedup

BUDGET = 4096


@pytest.fixture(scope="module")
def budget_cluster(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("replay-budget")
    redis_server = launcher.RedisServer(data_dir=workdir / "redis").start()
    try:
        cluster = Cluster(redis_server, workdir, auth_port=launcher.free_port(), MAX_MESSAGE_BYTES=1024, REPLAY_MAX_BYTES=BUDGET,
                          REDELIVER_AFTER=3600)
        start_or_explain(cluster, nodes=1)
        try:
            yield cluster
        finally:
            cluster.stop(at_once=True)
    finally:
        redis_server.stop()


def unique(name: str) -> str:
    return f"{name}-{uuid.uuid4().hex[:6]}"


async def backlog(cluster: Cluster, user: str, count: int, pad: int) -> list[dict]:
    """``count`` messages to ``user`` (offline), collected in one request: envelopes, oldest first."""
    data = [{"n": n, "pad": "p" * pad} for n in range(count)]
    ids = await cluster.collect_many([{"to": user, "data": item} for item in data])
    assert len(ids) == count and ids == sorted(ids), ids
    return [{"id": mid, "data": item} for mid, item in zip(ids, data)]


def kept_within_budget(envelopes: list[dict]) -> list[str]:
    kept, truncated = newest_within(reversed(envelopes), BUDGET)
    return [e["id"] for e in kept]


async def live_after_replay(cluster: Cluster, client, user: str) -> None:
    """Messages collected after the replay come live, right after it, and nothing else does."""
    live = await backlog(cluster, user, 3, 10)
    assert [f["id"] for f in await client.messages(3)] == [e["id"] for e in live]
    assert await client.quiet(0.5) == []


async def test_a_resume_over_the_byte_budget_gets_its_newest_messages_in_order_then_the_live_ones(budget_cluster):
    user = unique("budget-since")
    anchor = await budget_cluster.collect(user, "seen")
    sent = await backlog(budget_cluster, user, 20, 400)
    expected = kept_within_budget(sent)
    assert 2 <= len(expected) < 20, "the backlog must pass the budget, the test's own premise"

    client = await budget_cluster.connect(user, since=anchor)
    before, resumed = await client.until("resumed")
    replayed = [f["id"] for f in before if f["type"] == "message"]
    assert replayed == expected == [e["id"] for e in sent[-len(expected):]], "the newest, in order"
    assert resumed["truncated"] is True and resumed["replayed"] == len(expected), resumed
    await live_after_replay(budget_cluster, client, user)
    client.close()


async def test_an_inbox_over_the_byte_budget_gets_its_newest_unacked_messages_and_says_truncated(budget_cluster):
    user = unique("budget-inbox")
    sent = await backlog(budget_cluster, user, 20, 400)
    expected = kept_within_budget(sent)

    client = await budget_cluster.connect(user)
    assert [f["id"] for f in client.inbox] == expected == [e["id"] for e in sent[-len(expected):]]
    assert client.resumed["truncated"] is True and client.resumed["replayed"] == len(expected), client.resumed
    await live_after_replay(budget_cluster, client, user)
    client.close()


async def test_a_resume_within_the_byte_budget_is_whole_and_not_truncated(budget_cluster):
    user = unique("budget-small")
    anchor = await budget_cluster.collect(user, "seen")
    sent = await backlog(budget_cluster, user, 4, 400)
    assert kept_within_budget(sent) == [e["id"] for e in sent], "the backlog must fit the budget, the test's own premise"

    client = await budget_cluster.connect(user, since=anchor)
    before, resumed = await client.until("resumed")
    replayed = [f["id"] for f in before if f["type"] == "message"]
    # The replay starts RESUME_OVERLAP_MS before since: the anchor comes again (clients drop repeats by id).
    assert replayed == [anchor] + [e["id"] for e in sent], replayed
    assert resumed["truncated"] is False and resumed["replayed"] == 5, resumed
    await live_after_replay(budget_cluster, client, user)
    client.close()


async def stream(cluster: Cluster, user: str, sent: list[str], stop: asyncio.Event) -> None:
    """Messages to ``user`` one after another (ids in order) until ``stop``, then three more."""
    n = 0
    while not stop.is_set() or n < 3:
        if stop.is_set():
            n += 1
        sent.append(await cluster.collect(user, {"live": len(sent), "pad": "l" * 300}))


def a_suffix_in_order(got: list[str], sent: list[str]) -> int:
    """Where the messages a client shows (``got``, repeats dropped) begin in ``sent``: they must be
    all of ``sent`` from there on, in order, with no gap.  Returns that place."""
    assert got and got[0] in sent, (got[:3], sent[:3])
    start = sent.index(got[0])
    assert got == sent[start:], f"a gap or a reordering: {len(got)} got vs {len(sent) - start} sent from {start}; missing {sorted(set(sent[start:]) - set(got))[:5]}"
    return start


@pytest.mark.parametrize("resume", [True, False], ids=["since", "inbox"])
async def test_two_tabs_replayed_over_the_budget_while_messages_stream_show_a_suffix_with_no_gap(budget_cluster, resume):
    """Two connections of one user opening together (one tasks.replay_many) with a backlog over
    the budget while messages keep coming: each shows every message from some point on, in order,
    none missing between the replayed and the live ones."""
    user = unique("budget-live")
    anchor = await budget_cluster.collect(user, "seen")
    sent = [anchor] + [e["id"] for e in await backlog(budget_cluster, user, 20, 400)]
    stop = asyncio.Event()
    streaming = asyncio.ensure_future(stream(budget_cluster, user, sent, stop))
    await asyncio.sleep(0.3)
    token = await asyncio.to_thread(budget_cluster.token, user)
    url = budget_cluster.ws_url(budget_cluster.node_ports[0], token, since=anchor if resume else None)
    tabs = await asyncio.gather(*(Client.connect(url, auto_ack=False, wait_resumed=True, timeout=30) for _ in range(2)))
    await asyncio.sleep(0.5)
    stop.set()
    await streaming
    for tab in tabs:
        assert tab.resumed["truncated"] is True, tab.resumed
        deadline = asyncio.get_running_loop().time() + 30
        while sent[-1] not in {f["id"] for f in tab.frames if f["type"] == "message"} and asyncio.get_running_loop().time() < deadline:
            await tab.next_frame(deadline - asyncio.get_running_loop().time())
        start = a_suffix_in_order([f["id"] for f in dedup(tab.frames)], sent)
        assert start > 1, "truncated, so the oldest are left out"
        tab.close()

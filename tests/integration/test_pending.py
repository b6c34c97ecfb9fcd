"""Redelivery candidates in Redis (``tasks.pending``), against the session's real redis-server."""

from __future__ import annotations

import time

import pytest
import redis as redis_lib

from tasks import pending
from tasks.ids import IdGenerator
from tests.conftest import redis_now
from wsnode.registry import NODES_KEY, RouteTable, route_key


@pytest.fixture
def redis(redis_server):
    client = redis_lib.Redis.from_url(redis_server.url(3))  # this module's own database
    client.flushdb()
    yield client
    client.flushdb()


def routed(redis, pairs: list[tuple[str, str]]) -> None:
    """Record ``pairs`` as Dispatch does: its users online (leases on a live node), and the lookup
    script adds their deliveries in the same call."""
    until = redis_now(redis) + 60  # leases end by Redis's clock
    users = list(dict.fromkeys(user for _, user in pairs))
    redis.zadd(NODES_KEY, {"10.0.0.1:8001": until})
    for user in users:
        redis.zadd(route_key(user), {"10.0.0.1:8001": until})
    RouteTable(redis).lookup(users, pending.PENDING_KEY, pending.marks(pairs))


def test_routed_deliveries_are_pending_by_message_time_until_acked(redis):
    old, new = IdGenerator(clock=lambda: 1000.0).next_id(), IdGenerator(clock=lambda: 2000.0).next_id()
    routed(redis, [(old, "ann"), (old, "b:o:b"), (new, "ann")])
    routed(redis, [(old, "ann")])  # routed again (a redelivery): still one entry

    assert pending.between(redis, 0, 1500) == [(old, "ann"), (old, "b:o:b")]
    pending.remove(redis, [(old, "ann"), ("f" * 24, "nobody")])
    assert pending.between(redis, 0, 3000) == [(old, "b:o:b"), (new, "ann")]


def test_prune_drops_what_is_older_than_the_given_time_only(redis):
    gen = IdGenerator(clock=lambda: 1000.0)
    first, second = gen.next_id(), gen.next_id()
    later = IdGenerator(clock=lambda: time.time()).next_id()
    routed(redis, [(first, "ann"), (second, "ann"), (later, "ann")])

    assert pending.prune(redis, 1500.0) == 2
    assert pending.between(redis, 0, time.time() + 60) == [(later, "ann")]


def test_empty_batches_cost_nothing(redis):
    routed(redis, [])
    pending.remove(redis, [])
    assert redis.exists(pending.PENDING_KEY) == 0

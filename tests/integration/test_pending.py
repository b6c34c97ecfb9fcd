"""Redelivery candidates in Redis (``tasks.pending``), against the session's real redis-server."""

from __future__ import annotations

import time

import pytest
import redis as redis_lib

from tasks import pending
from tasks.ids import IdGenerator


@pytest.fixture
def redis(redis_server):
    client = redis_lib.Redis.from_url(redis_server.url(3))
    client.delete(pending.PENDING_KEY)
    yield client
    client.delete(pending.PENDING_KEY)


def test_routed_deliveries_are_pending_by_message_time_until_acked(redis):
    old, new = IdGenerator(clock=lambda: 1000.0).next_id(), IdGenerator(clock=lambda: 2000.0).next_id()
    pending.add(redis, [(old, "ann"), (old, "b:o:b"), (new, "ann")])
    pending.add(redis, [(old, "ann")])  # routed again (a redelivery): still one entry

    assert pending.between(redis, 0, 1500) == [(old, "ann"), (old, "b:o:b")]
    pending.remove(redis, [(old, "ann"), ("f" * 24, "nobody")])
    assert pending.between(redis, 0, 3000) == [(old, "b:o:b"), (new, "ann")]


def test_prune_drops_what_is_older_than_the_given_time_only(redis):
    gen = IdGenerator(clock=lambda: 1000.0)
    first, second = gen.next_id(), gen.next_id()
    later = IdGenerator(clock=lambda: time.time()).next_id()
    pending.add(redis, [(first, "ann"), (second, "ann"), (later, "ann")])

    assert pending.prune(redis, 1500.0) == 2
    assert pending.between(redis, 0, time.time() + 60) == [(later, "ann")]


def test_empty_batches_cost_nothing(redis):
    pending.add(redis, [])
    pending.remove(redis, [])
    assert redis.exists(pending.PENDING_KEY) == 0

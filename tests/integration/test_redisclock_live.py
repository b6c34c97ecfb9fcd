"""Redis's clock against a real redis-server (``redisclock``): processes whose hosts' clocks
disagree read the same time; a Redis that stops answering leaves the clock running."""

from __future__ import annotations

import time

import redis as redis_lib

import launcher
from redisclock import SyncRedisClock
from tasks.ids import IdGenerator, timestamp_ms


def redis_now(client: redis_lib.Redis) -> float:
    seconds, micros = client.time()
    return seconds + micros / 1_000_000


def test_two_workers_whose_hosts_disagree_by_five_seconds_make_ids_by_the_same_clock():
    """Ids made on a host 5 s ahead of another sorted 5 s after the other's made at the same
    moment, and a resume (2 s of overlap) lost 3 s of the other's messages (faketime)."""
    with launcher.RedisServer() as server:
        client = redis_lib.Redis.from_url(server.url(0))
        ahead = SyncRedisClock(client, "ahead", wall=lambda: time.time() + 5)
        behind = SyncRedisClock(client, "behind", wall=lambda: time.time() - 5)
        first, second = IdGenerator(clock=ahead.now).next_id(), IdGenerator(clock=behind.now).next_id()
        now_ms = redis_now(client) * 1000

        assert abs(timestamp_ms(first) - now_ms) < 500 and abs(timestamp_ms(second) - now_ms) < 500, (first, second, now_ms)
        assert 4.5 < ahead.offset < 5.5 and -5.5 < behind.offset < -4.5


def test_a_redis_that_stops_answering_leaves_the_clock_running_from_its_last_anchor():
    server = launcher.RedisServer().__enter__()
    try:
        client = redis_lib.Redis.from_url(server.url(0), socket_timeout=1, socket_connect_timeout=1)
        clock = SyncRedisClock(client, "t", wall=lambda: time.time() + 30)
        anchored = clock.now()
        assert abs(anchored - time.time()) < 0.5
    finally:
        server.__exit__(None, None, None)
    clock.sync()  # Redis is gone: no error, the anchor stays
    assert abs(clock.now() - time.time()) < 0.5
    fresh = SyncRedisClock(client, "t", wall=lambda: time.time() + 30)
    assert abs(fresh.now() - (time.time() + 30)) < 0.5, "never anchored: the host's clock"


def test_the_workers_ids_replay_cursors_and_late_routings_read_redis_clock():
    from tasks import collect, dispatch, housekeeping, replay

    assert isinstance(dispatch.clock, SyncRedisClock)
    assert collect._ProcessState().ids._clock == dispatch.clock.now
    assert replay.clock is dispatch.clock and housekeeping.clock is dispatch.clock


def test_a_clock_that_started_before_its_redis_anchors_within_seconds_of_it_answering():
    """Attempts that failed were retried only a minute later: an auth process started 3 s before
    its Redis issued tokens by its host's clock (5 s ahead) for a minute after Redis answered."""
    port = launcher.free_port()
    client = redis_lib.Redis(port=port, socket_timeout=1, socket_connect_timeout=1)
    clock = SyncRedisClock(client, "t", wall=lambda: time.time() + 5)
    assert abs(clock.now() - (time.time() + 5)) < 0.5  # no Redis yet: the host's clock
    with launcher.RedisServer(port=port):
        deadline = time.monotonic() + 5
        while clock.offset is None and time.monotonic() < deadline:
            clock.now()
            time.sleep(0.1)
        assert clock.offset is not None, "not anchored within 5 s of Redis answering"
        assert abs(clock.now() - redis_now(client)) < 0.5

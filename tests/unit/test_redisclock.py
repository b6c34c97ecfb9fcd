"""Redis's clock as a process reads it (``redisclock``): anchored to one TIME reply, run on with
the monotonic clock.  Pure: the clocks are given; tests/integration/test_redisclock.py reads a
real Redis."""

from __future__ import annotations

import logging

from redisclock import MAX_ROUND_TRIP_SECONDS, RESYNC_SECONDS, RETRY_SECONDS, ROUGH_AFTER_ATTEMPTS, WARN_SECONDS, RedisClock


class Clocks:
    """A host's wall and monotonic clocks, moved by hand."""

    def __init__(self, wall: float, monotonic: float = 1000.0) -> None:
        self.wall_now, self.monotonic_now = wall, monotonic

    def wall(self) -> float:
        return self.wall_now

    def monotonic(self) -> float:
        return self.monotonic_now

    def advance(self, seconds: float) -> None:
        self.wall_now += seconds
        self.monotonic_now += seconds


def test_before_its_first_anchor_it_reads_the_hosts_clock():
    clocks = Clocks(wall=5000.0)
    clock = RedisClock("t", wall=clocks.wall, monotonic=clocks.monotonic)
    assert clock.now() == 5000.0 and clock.offset is None and clock.due()


def test_anchored_it_reads_redis_time_at_the_middle_of_the_round_trip_and_runs_on_monotonically():
    clocks = Clocks(wall=5005.0)  # the host runs 5 s ahead of Redis
    clock = RedisClock("t", wall=clocks.wall, monotonic=clocks.monotonic)
    assert clock.anchor(before=999.98, reply=(5000, 0), after=1000.0, wall_after=clocks.wall())
    clock.tried(True)

    assert abs(clock.now() - 5000.01) < 1e-9  # TIME was read 10 ms ago, at the round trip's middle
    assert abs(clock.offset - 4.99) < 1e-9
    clocks.advance(2.5)
    assert abs(clock.now() - 5002.51) < 1e-9
    clocks.wall_now -= 3600  # the host's wall clock steps back an hour (NTP, a VM resumed)
    assert abs(clock.now() - 5002.51) < 1e-9, "a step of the wall clock must not move it"
    assert not clock.due()
    clocks.advance(RESYNC_SECONDS)
    assert clock.due()


def test_a_host_clock_off_redis_is_logged_once_and_again_when_it_agrees(caplog):
    clocks = Clocks(wall=100.0)
    clock = RedisClock("worker", wall=clocks.wall, monotonic=clocks.monotonic)
    with caplog.at_level(logging.INFO, logger="redisclock"):
        clock.anchor(1000.0, (int(100 - WARN_SECONDS - 2), 0), 1000.0, clocks.wall())
        clock.anchor(1000.0, (int(100 - WARN_SECONDS - 2), 0), 1000.0, clocks.wall())
        clock.anchor(1000.0, (100, 0), 1000.0, clocks.wall())
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "worker: this host's clock is 3.0 s ahead of Redis's" in warnings[0], warnings
    assert any("agrees with Redis's again" in r.getMessage() for r in caplog.records if r.levelno == logging.INFO)


def test_a_reading_whose_round_trip_was_slow_is_not_taken_and_is_tried_again_soon():
    """Redis answers TIME at the end of a stall (a long script, a fork) or the caller's loop
    resumes late: half that stall was the clock's error, for a minute, and a resume lost a message."""
    clocks = Clocks(wall=5000.0)
    clock = RedisClock("t", wall=clocks.wall, monotonic=clocks.monotonic)
    slow = MAX_ROUND_TRIP_SECONDS + 0.01
    assert not clock.anchor(1000.0 - slow, (5002, 0), 1000.0, clocks.wall())
    assert clock.now() == 5000.0 and clock.offset is None
    clock.tried(False)
    assert not clock.due()
    clocks.advance(RETRY_SECONDS)
    assert clock.due()


def test_attempts_that_fail_are_retried_after_a_second_doubling_up_to_the_resync_period():
    """A process started before its Redis anchored only a minute after Redis answered, and
    issued tokens by its host's clock meanwhile."""
    clocks = Clocks(wall=5000.0)
    clock = RedisClock("t", wall=clocks.wall, monotonic=clocks.monotonic)
    waits = []
    for _ in range(9):
        clock.tried(False)
        start = clocks.monotonic_now
        while not clock.due():
            clocks.advance(0.25)
        waits.append(clocks.monotonic_now - start)
    assert waits == [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 60.0, 60.0, 60.0]
    clock.tried(True)
    clock.tried(False)
    clocks.advance(RETRY_SECONDS)
    assert clock.due(), "an anchor resets the doubling"


def test_a_clock_without_resync_keeps_its_first_anchor_for_good_and_retries_until_it_has_one():
    """The workers' (tasks.dispatch.clock): anchored once in the worker's main process, before its
    pool forks, so that every pool process reads the very same clock; pool processes that each
    anchored on their own made ids 8 ms out of order on a loaded machine."""
    clocks = Clocks(wall=5000.0)
    clock = RedisClock("worker", wall=clocks.wall, monotonic=clocks.monotonic, resync=None)
    clock.tried(False)
    clocks.advance(RETRY_SECONDS)
    assert clock.due(), "no anchor yet: tried again"
    assert clock.anchor(1000.0, (4000, 0), 1000.0, clocks.wall())
    clock.tried(True)
    clocks.advance(30 * 86400)
    assert not clock.due()


def test_auths_clock_is_the_hosts_own_while_the_host_is_within_a_second_of_redis():
    """Two auth processes of one host each anchored on their own read clocks up to half a round
    trip apart, and a revocation right after the other one issued a token missed it (CI)."""
    clocks = Clocks(wall=5000.4)
    clock = RedisClock("auth", wall=clocks.wall, monotonic=clocks.monotonic, host_within=WARN_SECONDS)
    assert clock.anchor(1000.0, (5000, 0), 1000.0, clocks.wall())
    assert clock.now() == 5000.4
    clocks.wall_now = 5003.0  # now 3 s ahead: Redis's
    assert clock.anchor(1000.0, (5000, 0), 1000.0, clocks.wall())
    assert clock.now() == 5000.0


def test_a_redis_whose_time_never_comes_back_fast_is_anchored_to_roughly_after_a_few_attempts(caplog):
    """A Redis over a WAN link, 300 ms away: every reading was refused for its round trip, and its
    processes kept their hosts' clocks for good, however far off.  After ROUGH_AFTER_ATTEMPTS
    slow attempts the clock takes one, off by at most half its round trip, and says so."""
    clocks = Clocks(wall=5009.0)  # the host 9 s ahead of Redis
    clock = RedisClock("auth", wall=clocks.wall, monotonic=clocks.monotonic)
    far = 0.3
    for _ in range(ROUGH_AFTER_ATTEMPTS):
        assert not clock.anchor(clocks.monotonic() - far, (5000, 0), clocks.monotonic(), clocks.wall())
        clock.tried(False)
    assert clock.offset is None and clock.now() == 5009.0
    with caplog.at_level(logging.WARNING, logger="redisclock"):
        assert clock.anchor(clocks.monotonic() - far, (5000, 0), clocks.monotonic(), clocks.wall())
    assert abs(clock.now() - 5000.15) < 1e-9  # TIME's middle: 150 ms ago
    assert any(f"at each of {ROUGH_AFTER_ATTEMPTS + 1} readings: anchored to it anyway, within 0.150 s" in r.getMessage() for r in caplog.records)
    clock.tried(True)
    clocks.advance(RESYNC_SECONDS)
    assert not clock.anchor(clocks.monotonic() - far, (6000, 0), clocks.monotonic(), clocks.wall()), \
        "anchored, it keeps waiting for a reading within MAX_ROUND_TRIP_SECONDS"
    assert abs(clock.now() - 5060.15) < 1e-9
    assert clock.anchor(clocks.monotonic() - 0.01, (6000, 0), clocks.monotonic(), clocks.wall())
    assert abs(clock.now() - 6000.005) < 1e-9


def test_readings_refused_for_errors_do_not_count_as_slow_ones():
    clocks = Clocks(wall=5000.0)
    clock = RedisClock("t", wall=clocks.wall, monotonic=clocks.monotonic)
    for _ in range(ROUGH_AFTER_ATTEMPTS + 2):
        clock.tried(False)  # Redis did not answer
    assert not clock.anchor(clocks.monotonic() - MAX_ROUND_TRIP_SECONDS - 0.01, (4000, 0), clocks.monotonic(), clocks.wall())


def test_a_workers_one_sync_before_its_pool_forks_takes_a_far_redis_rough_anchor_for_all_its_pool_processes():
    """A worker anchors once, in its main process before the pool forks (``worker.py``), so that
    every pool process reads one clock (``tasks.dispatch.clock``).  With a Redis 300 ms away that
    one sync, SAMPLES slow readings, counted as one slow attempt: each pool process went on to
    take a rough anchor of its own, off by up to half a round trip each (ids out of order by up to
    a round trip between processes of one worker, for good), where they had shared the host's
    clock.  A sync whose every reading was slow counts each of them."""
    import copy

    from redisclock import SAMPLES, SyncRedisClock

    clocks = Clocks(wall=5009.0)

    class FarRedis:
        def __init__(self) -> None:
            self.reads = 0

        def time(self):
            self.reads += 1
            clocks.advance(0.3 + 0.01 * self.reads)  # every reading slower than the one before
            return (5000 + int(clocks.monotonic_now - 1000.0), 0)

    assert SAMPLES >= ROUGH_AFTER_ATTEMPTS + 1
    client = FarRedis()
    main = SyncRedisClock(client, "worker", wall=clocks.wall, monotonic=clocks.monotonic, resync=None)
    main.sync()  # worker_init
    assert main.offset is not None, "anchored before the fork"
    pool = [copy.copy(main) for _ in range(2)]  # what each forked pool process inherits
    reads = client.reads
    clocks.advance(RETRY_SECONDS * 8)
    assert pool[0].now() == pool[1].now() and client.reads == reads, "the pool processes keep the main process's anchor"

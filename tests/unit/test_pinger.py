"""Pure tests of ``wsnode.pinger.PingSchedule``: who is pinged at each one-second tick, and who is
given up on."""

from __future__ import annotations

import tracemalloc

import pytest

from wsnode.pinger import PingSchedule


def run(schedule: PingSchedule, ticks: int, answering=lambda conn, tick: True) -> tuple[dict, dict]:
    """Tick ``ticks`` times; each pinged connection answers at once when ``answering`` says so.
    Returns {conn: [ticks pinged]} and {conn: tick closed}."""
    pinged: dict = {}
    closed: dict = {}
    for tick in range(ticks):
        to_ping, timed_out = schedule.tick()
        for conn in timed_out:
            closed[conn] = tick
            schedule.remove(conn)
        for conn in to_ping:
            pinged.setdefault(conn, []).append(tick)
            if answering(conn, tick):
                schedule.pong(conn, schedule.payload)
    return pinged, closed


def test_each_connection_is_pinged_once_per_interval():
    schedule = PingSchedule(interval=25, timeout=20)
    for conn in range(100):
        schedule.add(conn)
    pinged, closed = run(schedule, 100)
    assert closed == {}
    assert all(len(ticks) == 4 and all(b - a == 25 for a, b in zip(ticks, ticks[1:])) for ticks in pinged.values())
    assert len(pinged) == 100


def test_the_pings_of_an_interval_are_spread_over_its_seconds():
    schedule = PingSchedule(interval=25, timeout=20)
    for conn in range(1000):
        schedule.add(conn)
    per_tick = [len(schedule.tick()[0]) for _ in range(25)]
    assert per_tick == [40] * 25


def test_a_connection_that_never_answers_is_closed_timeout_seconds_after_its_ping():
    schedule = PingSchedule(interval=25, timeout=20)
    schedule.add("dead")
    schedule.add("alive")
    pinged, closed = run(schedule, 60, answering=lambda conn, tick: conn == "alive")
    assert closed == {"dead": pinged["dead"][0] + 20}
    assert "alive" not in closed and len(schedule) == 1


def test_a_late_pong_within_the_timeout_keeps_the_connection():
    schedule = PingSchedule(interval=25, timeout=20)
    schedule.add("slow")
    to_ping, _ = schedule.tick()
    assert to_ping == ["slow"]
    echoed = schedule.payload
    for _ in range(10):
        schedule.tick()
    schedule.pong("slow", echoed)  # 10 s later
    _, closed = run(schedule, 30)
    assert closed == {}


def test_a_connection_that_left_is_neither_pinged_nor_closed():
    schedule = PingSchedule(interval=5, timeout=5)
    schedule.add("gone")
    schedule.remove("gone")
    pinged, closed = run(schedule, 20, answering=lambda conn, tick: False)
    assert pinged == {} and closed == {} and len(schedule) == 0


def test_with_the_timeout_equal_to_the_interval_an_unanswered_connection_is_closed_instead_of_pinged_again():
    schedule = PingSchedule(interval=5, timeout=5)
    schedule.add("dead")
    pinged, closed = run(schedule, 12, answering=lambda conn, tick: False)
    assert pinged == {"dead": [0]} and closed == {"dead": 5}


@pytest.mark.parametrize("interval, timeout", [(0, 1), (10, 0), (10, 11)])
def test_a_timeout_outside_the_interval_is_refused(interval, timeout):
    with pytest.raises(ValueError, match="interval"):
        PingSchedule(interval, timeout)


def test_a_long_interval_costs_what_its_connections_cost_not_a_slot_per_second():
    """A set per second of the interval: ``PING_INTERVAL`` of a year (to ping next to never) took
    gigabytes and minutes before the node listened."""
    tracemalloc.start()
    try:
        schedule = PingSchedule(interval=31_536_000, timeout=20)
        for conn in range(3):
            schedule.add(conn)
        pinged, closed = run(schedule, 5)
        schedule.remove(2)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    assert peak < 100_000, f"{peak} bytes for three connections"
    assert pinged == {0: [0], 1: [1], 2: [2]} and closed == {} and len(schedule) == 2


def test_only_a_pong_that_echoes_its_ping_answers_it():
    """A client that reads nothing (the replay it was sent held in the node's buffer) but sends a
    pong of its own every second was never closed: any pong counted."""
    schedule = PingSchedule(interval=5, timeout=2)
    for conn in ("hog", "fair"):
        schedule.add(conn)
    closed = {}
    for tick in range(12):
        to_ping, timed_out = schedule.tick()
        for conn in timed_out:
            closed[conn] = tick
            schedule.remove(conn)
        schedule.pong("hog", b"")  # unsolicited, or a guess
        schedule.pong("hog", b"\x00" * 8)
        for conn in to_ping:
            if conn == "fair":
                schedule.pong(conn, schedule.payload)

    assert closed == {"hog": 2}


def test_each_tick_pings_with_a_payload_of_its_own():
    schedule = PingSchedule(interval=1, timeout=1)
    payloads = set()
    for _ in range(50):
        schedule.tick()
        payloads.add(schedule.payload)
    assert len(payloads) == 50 and all(len(payload) == 8 for payload in payloads)

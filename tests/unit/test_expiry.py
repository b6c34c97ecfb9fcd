"""Pure tests of ``wsnode.expiry``: which connections' tokens ran out at each tick."""

from __future__ import annotations

import pytest

from wsnode.expiry import ExpirySchedule

T = 1_700_000_000  # a token's expiry, in unix seconds


def test_a_connection_is_due_once_its_token_expired_grace_seconds_ago():
    schedule = ExpirySchedule(grace=5)
    schedule.set("a", T)

    assert schedule.due(T + 4.9) == []
    assert schedule.due(T + 5) == ["a"]
    assert schedule.due(T + 6) == [] and "a" not in schedule and len(schedule) == 0


def test_with_no_grace_a_connection_is_due_when_its_token_expires():
    schedule = ExpirySchedule(grace=0)
    schedule.set("a", T)

    assert schedule.due(T - 0.5) == []
    assert schedule.due(T) == ["a"]


def test_a_fractional_grace_rounds_the_deadline_up_to_the_next_tick():
    schedule = ExpirySchedule(grace=0.5)
    schedule.set("a", T)

    assert schedule.due(T + 0.9) == []
    assert schedule.due(T + 1) == ["a"]


def test_a_refresh_moves_the_deadline_to_the_new_tokens():
    schedule = ExpirySchedule(grace=2)
    schedule.set("a", T)
    schedule.due(T)
    schedule.set("a", T + 3600)

    assert schedule.due(T + 2) == []
    assert schedule.due(T + 3601) == []
    assert schedule.due(T + 3602) == ["a"]


def test_a_removed_connection_is_never_due_and_leaves_nothing_behind():
    schedule = ExpirySchedule(grace=1)
    schedule.set("a", T)
    schedule.set("b", T)
    schedule.remove("a")
    schedule.remove("a")  # twice: a no-op

    assert schedule.due(T + 10) == ["b"]
    assert schedule._buckets == {} and schedule._bucket_of == {}


def test_a_token_without_expiry_is_never_due_and_clears_an_earlier_deadline():
    schedule = ExpirySchedule(grace=1)
    schedule.set("a", T)
    schedule.set("a", None)

    assert "a" not in schedule
    assert schedule.due(T + 10**6) == []


def test_the_first_tick_finds_deadlines_that_passed_before_it():
    schedule = ExpirySchedule(grace=1)
    schedule.set("old", T - 100)
    schedule.set("older", T - 200)
    schedule.set("later", T + 100)

    assert schedule.due(T) == ["older", "old"]


def test_a_deadline_set_in_the_past_after_ticks_began_is_due_at_the_next_tick():
    schedule = ExpirySchedule(grace=0)
    schedule.due(T)
    schedule.set("late", T - 30)

    assert schedule.due(T + 1) == ["late"]


def test_ticks_that_skipped_seconds_read_every_bucket_they_skipped_in_order():
    schedule = ExpirySchedule(grace=0)
    schedule.due(T)
    for second in range(1, 6):
        schedule.set(f"c{second}", T + second)

    assert schedule.due(T + 3) == ["c1", "c2", "c3"]
    assert schedule.due(T + 10**7) == ["c4", "c5"]  # a clock jump: reads the buckets, not 10 million seconds


def test_a_clock_that_goes_back_neither_loses_nor_repeats_a_connection():
    schedule = ExpirySchedule(grace=0)
    schedule.set("a", T + 5)
    schedule.due(T + 3)
    assert schedule.due(T - 100) == []
    assert schedule.due(T + 5) == ["a"]
    assert schedule.due(T + 6) == []


def test_a_deadline_set_after_the_clock_went_back_comes_due_by_the_clock_as_it_is():
    schedule = ExpirySchedule(grace=0)
    schedule.due(T + 3600)
    schedule.due(T)  # the clock was set back an hour
    schedule.set("a", T + 10)

    assert schedule.due(T + 9) == []
    assert schedule.due(T + 10) == ["a"]


def test_many_connections_in_one_second_are_all_due_together():
    schedule = ExpirySchedule(grace=0)
    for index in range(1000):
        schedule.set(index, T)

    assert sorted(schedule.due(T)) == list(range(1000))


@pytest.mark.parametrize("grace", [-1, -0.001])
def test_a_negative_grace_is_refused(grace):
    with pytest.raises(ValueError, match="grace"):
        ExpirySchedule(grace)

"""When housekeeping may take a node for gone again after Redis refused writes for lack of memory, or after its runs stopped for a while
(``tasks.housekeeping.refusals_settled``): the nodes' lease renewals were refused too."""

from __future__ import annotations

from tasks.housekeeping import refusals_settled, runs_unbroken_since

SETTLE = 6.0


def test_a_redis_that_never_refused_a_write_is_settled_from_the_first_run():
    assert refusals_settled(0, None, 1000.0, SETTLE) == (True, (0, 0.0))
    assert refusals_settled(0, (0, 0.0), 1001.0, SETTLE) == (True, (0, 0.0))


def test_refusals_counted_since_the_last_run_hold_nodes_for_the_settle_time_from_when_they_were_seen():
    settled, keep = refusals_settled(5, (0, 0.0), 1000.0, SETTLE)
    assert (settled, keep) == (False, (5, 1000.0))
    assert refusals_settled(5, keep, 1005.9, SETTLE) == (False, keep)
    assert refusals_settled(5, keep, 1006.0, SETTLE) == (True, keep)


def test_more_refusals_start_the_settle_time_again():
    assert refusals_settled(9, (5, 1000.0), 1004.0, SETTLE) == (False, (9, 1004.0))


def test_refusals_counted_before_housekeeping_first_looked_are_taken_as_recent():
    assert refusals_settled(3, None, 1000.0, SETTLE) == (False, (3, 1000.0))


def test_a_count_that_went_down_a_redis_restarted_or_its_stats_reset_counts_as_a_change():
    assert refusals_settled(0, (7, 900.0), 1000.0, SETTLE) == (False, (0, 1000.0))


def test_runs_with_no_gap_continue_their_series():
    assert runs_unbroken_since(1000.0, 900.0, 1003.0, gap=3.0) == 900.0


def test_a_run_after_a_gap_longer_than_the_limit_starts_a_series():
    assert runs_unbroken_since(1000.0, 900.0, 1003.5, gap=3.0) == 1003.5


def test_the_first_run_starts_a_series():
    assert runs_unbroken_since(None, None, 1000.0, gap=3.0) == 1000.0

"""The redelivery schedule of ``tasks.housekeeping``: which unacked deliveries a run re-sends."""

from __future__ import annotations

import pytest

from tasks.housekeeping import SWEEP_OVERLAP_SECONDS, crossed, redelivery_window, sweep_window

MARKS = [30.0, 60.0, 120.0]


def test_a_delivery_younger_than_the_first_threshold_is_not_resent():
    assert crossed(10.0, 20.0, MARKS) is False


def test_a_delivery_whose_age_crossed_a_threshold_since_the_last_run_is_resent():
    assert crossed(25.0, 35.0, MARKS) is True


def test_a_delivery_between_thresholds_is_not_resent_again():
    assert crossed(35.0, 45.0, MARKS) is False


def test_a_long_gap_that_crosses_several_thresholds_resends_once():
    assert crossed(10.0, 200.0, MARKS) is True


def test_a_delivery_past_the_last_threshold_is_never_resent():
    assert crossed(130.0, 140.0, MARKS) is False


@pytest.mark.parametrize("mark", MARKS)
def test_reaching_a_threshold_exactly_counts_as_crossing_it(mark):
    assert crossed(mark - 1, mark, MARKS) is True


def test_over_consecutive_runs_each_delivery_is_resent_once_per_threshold():
    ages = [i * 7.0 for i in range(40)]  # runs every 7 s
    resent = sum(crossed(a, b, MARKS) for a, b in zip(ages, ages[1:]))
    assert resent == len(MARKS)


# --- the sweep's window ------------------------------------------------------------------------

def test_a_first_sweep_reads_the_whole_window():
    assert sweep_window(1000.0, 1450.0, None) == (1000.0, 1450.0)


def test_a_later_sweep_starts_one_overlap_before_where_the_previous_one_ended():
    assert sweep_window(1000.0, 1450.0, 1300.0) == (1300.0 - SWEEP_OVERLAP_SECONDS, 1450.0)


def test_a_sweep_never_reads_older_than_the_window_whatever_the_mark():
    assert sweep_window(1000.0, 1450.0, 1010.0) == (1000.0, 1450.0)


def test_a_mark_ahead_of_the_window_end_counts_from_the_end():
    """Another worker's clock ahead of this one's: the overlap still comes before this end."""
    assert sweep_window(1000.0, 1450.0, 9000.0) == (1450.0 - SWEEP_OVERLAP_SECONDS, 1450.0)


def _resent_after(outage: float, routed_before_outage: float) -> bool:
    """Whether the first run after ``outage`` seconds without a run re-sends a delivery routed
    ``routed_before_outage`` seconds before the outage began (and never acked)."""
    now = 10_000.0
    start, end, gap = redelivery_window(now, now - outage, MARKS)
    routed = now - outage - routed_before_outage
    age = now - routed
    return start <= routed <= end and crossed(age - gap, age, MARKS)


def test_after_an_outage_shorter_than_the_last_threshold_each_delivery_that_crossed_one_is_resent():
    assert all(_resent_after(100.0, before) for before in (0.0, 10.0, 25.0))


def test_after_a_longer_outage_only_the_deliveries_that_crossed_a_threshold_in_its_last_span_are_resent():
    """As the README says: the rest stay in their users' inboxes."""
    assert _resent_after(1000.0, -900.0)  # routed during the outage, 100 s before its end: crossed 30 and 60
    assert not _resent_after(1000.0, 10.0)  # every threshold passed early in the outage

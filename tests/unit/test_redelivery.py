"""The redelivery schedule of ``tasks.housekeeping``: which unacked deliveries a run re-sends."""

from __future__ import annotations

import pytest

from tasks.housekeeping import crossed

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

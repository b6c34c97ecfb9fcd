"""The expiry of a housekeeping run the scheduler sends (``tasks.scheduler.expiry``)."""

from __future__ import annotations

from tasks.scheduler import EXPIRY_PERIODS, MIN_EXPIRY_SECONDS, expiry


def test_a_sent_run_outlives_a_clock_difference_of_a_minute_between_the_sending_and_the_consuming_worker():
    """Celery dates the expiry by the sender's clock and checks it by the consumer's: at one
    period (10 s), a consuming worker whose clock ran 11 s ahead dropped every run (reproduced
    with faketime: 5 of 5 runs "Discarding revoked task")."""
    for interval in (0.5, 2.0, 10.0):
        assert expiry(interval) >= 60.0


def test_runs_that_waited_still_expire_after_a_few_periods_and_do_not_all_run_later():
    assert (MIN_EXPIRY_SECONDS, EXPIRY_PERIODS) == (60.0, 6)
    assert expiry(10.0) == 60.0  # six runs at most, at the default HOUSEKEEPING_SECONDS
    assert expiry(100.0) == 600.0

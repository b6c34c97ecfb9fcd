"""An outage logged once per change (``outage.Outage``): when a failure is to be logged, and what
the one line after it says; fed failures and a clock by hand."""

from __future__ import annotations

from redis.exceptions import AuthenticationError, ConnectionError, ResponseError, TimeoutError

from outage import Outage, Recovery
from wsnode.leasekeeper import renewal_failure


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_only_the_first_failure_of_an_outage_is_to_be_logged():
    outage = Outage(Clock())
    assert [outage.failed() for _ in range(4)] == [True, False, False, False]


def test_a_failure_whose_cause_changes_is_to_be_logged_again_and_one_whose_cause_comes_back_too():
    outage = Outage(Clock())
    causes = ["no answer", "no answer", "wrong password", "wrong password", "no answer"]
    assert [outage.failed(cause) for cause in causes] == [True, False, True, False, True]


def test_the_answer_that_ends_an_outage_says_how_long_it_lasted_from_its_first_failure_and_how_many_failed():
    clock = Clock()
    outage = Outage(clock)
    outage.failed("no answer", count=3)
    clock.now += 7
    outage.failed("no answer")
    outage.failed("wrong password", count=2)
    clock.now += 5
    assert outage.answered() == Recovery(seconds=12, failures=6)


def test_an_answer_to_a_request_sent_before_the_outage_began_ends_nothing_and_one_sent_after_ends_it():
    clock = Clock()
    outage = Outage(clock)
    slow = outage.asking()  # sent while the backend answered; its answer comes late
    clock.now += 1
    assert outage.failed()
    clock.now += 1
    assert outage.answered(slow) is None and outage.down
    assert not outage.failed()  # the same outage: nothing logged again
    fresh = outage.asking()
    clock.now += 1
    assert outage.answered(fresh) == Recovery(seconds=2, failures=2)
    assert not outage.down


def test_an_answer_with_no_outage_before_it_says_nothing_and_an_outage_ends_once():
    outage = Outage(Clock())
    assert outage.answered() is None
    outage.failed()
    assert outage.down
    assert outage.answered() is not None
    assert not outage.down
    assert outage.answered() is None


def test_the_next_outage_is_logged_again_and_counted_from_naught_even_with_the_same_cause():
    clock = Clock()
    outage = Outage(clock)
    outage.failed("no answer", count=5)
    outage.answered()
    clock.now += 60
    assert outage.failed("no answer") is True
    clock.now += 2
    assert outage.answered() == Recovery(seconds=2, failures=1)


def test_a_lease_renewal_refused_connection_and_timeout_are_one_cause_and_a_refused_login_or_a_full_redis_another_each():
    unanswered = {renewal_failure(ConnectionError("Error 111 connecting to 127.0.0.1:6390. Connection refused.")),
                  renewal_failure(TimeoutError("Timeout reading from socket"))}
    refused = renewal_failure(AuthenticationError("invalid username-password pair or user is disabled."))
    full = renewal_failure(ResponseError("OOM command not allowed when used memory > 'maxmemory'."))
    assert len(unanswered) == 1
    assert len(unanswered | {refused, full}) == 3
    assert "REDIS_URL" in refused  # what to fix, which a change of it logs again


def test_a_failure_of_a_request_sent_before_the_outage_ended_starts_nothing_and_one_sent_after_starts_the_next():
    """The mirror of an answer to a request sent before the outage: a slow request sent while
    Redis was down (a connection cut, waiting for its timeout) that failed after another request's
    answer had ended the outage began a new one: its ERROR line again, and "answers again after 0 s"
    at the next answer."""
    clock = Clock()
    outage = Outage(clock)
    assert outage.failed()
    slow = outage.asking()  # sent while the backend is down; its failure comes late
    clock.now += 1
    assert outage.answered(outage.asking()) == Recovery(seconds=1, failures=1)
    clock.now += 1
    assert outage.failed(asked_at=slow) is False and not outage.down
    assert outage.answered() is None  # nothing to say: no outage began
    fresh = outage.asking()
    assert outage.failed(asked_at=fresh) is True and outage.down
    assert outage.failed("another cause", asked_at=slow) is False  # nor does it count in the next one, or change its cause
    clock.now += 2
    assert outage.answered() == Recovery(seconds=2, failures=1)

"""Pure tests of ``tasks.channelerrors``: when a worker connects again after a channel error, and
what its log says about the error."""

from __future__ import annotations

import pytest
from redis.exceptions import OutOfMemoryError

import redisfull

from tasks.channelerrors import ChannelErrorBackoff, advice


def test_a_channel_error_after_the_worker_consumed_steadily_is_retried_at_once():
    backoff = ChannelErrorBackoff(first=1, cap=30, steady=30)
    backoff.consuming(0.0)
    assert backoff.failed(1800.0) == 0.0  # RabbitMQ's consumer timeout, 30 min in


def test_a_channel_error_that_keeps_coming_back_is_retried_after_a_doubling_delay_up_to_the_cap():
    backoff = ChannelErrorBackoff(first=1, cap=30, steady=30)
    backoff.consuming(0.0)
    now, delays = 100.0, []
    for _ in range(8):
        delays.append(backoff.failed(now))
        now += delays[-1] + 0.01
    assert delays == [0.0, 1, 2, 4, 8, 16, 30, 30]


def test_one_that_comes_back_soon_after_the_worker_consumed_again_still_counts():
    backoff = ChannelErrorBackoff(first=1, cap=30, steady=30)
    backoff.failed(100.0)
    backoff.failed(100.1)
    backoff.consuming(102.0)  # a Redis WRONGTYPE on BRPOP comes after the worker is ready
    assert backoff.failed(102.5) == 2


def test_a_connection_that_consumed_steadily_and_was_lost_ends_the_run():
    """A run of channel errors, fixed; the worker consumes for an hour and loses its connection
    (a broker restart, not a channel error); a channel error soon after it connected again is the
    first of a new run, retried at once, not the fifth of the old one."""
    backoff = ChannelErrorBackoff(first=1, cap=30, steady=30)
    for now in (100.0, 100.1, 101.2, 103.3):
        backoff.failed(now)
    backoff.consuming(108.0)
    backoff.lost(3708.0)
    backoff.consuming(3712.0)
    assert backoff.failed(3720.0) == 0.0 and backoff.run == 1


def test_a_connection_lost_before_the_worker_consumed_steadily_keeps_the_run():
    backoff = ChannelErrorBackoff(first=1, cap=30, steady=30)
    for now in (100.0, 100.1, 101.2):
        backoff.failed(now)
    backoff.consuming(104.0)
    backoff.lost(110.0)
    backoff.consuming(150.0)
    assert backoff.failed(151.0) == 4


def test_consuming_steadily_again_ends_the_run():
    backoff = ChannelErrorBackoff(first=1, cap=30, steady=30)
    for now in (100.0, 100.1, 101.2, 103.3):
        backoff.failed(now)
    backoff.consuming(108.0)
    assert backoff.failed(140.0) == 0.0 and backoff.run == 1
    assert backoff.failed(140.1) == 1


@pytest.mark.parametrize("error, says", [
    ("(50, 10): PRECONDITION_FAILED - inequivalent arg 'x-max-priority' for queue 'collect' in vhost 'v': received none but "
     "current is the value '10' of type 'signedint'", "queue 'collect' exists on the broker with other arguments"),
    ("PRECONDITION_FAILED - inequivalent arg 'type' for exchange 'dispatch' in vhost 'v': received 'direct' but current is 'topic'",
     "rabbitmqctl delete_exchange dispatch"),
    ("PRECONDITION_FAILED - delivery acknowledgement on channel 1 timed out. Timeout value used: 1800000 ms", "consumer_timeout"),
    ("Command # 1 (LLEN dispatch) of pipeline caused error: WRONGTYPE Operation against a key holding the wrong kind of value",
     "key 'dispatch' of the Redis broker's database holds another type"),
    ("Command # 1 (LLEN dispatch) of pipeline caused error: WRONGTYPE Operation against a key holding the wrong kind of value",
     "see TYPE dispatch, then delete or rename it"),
    ("WRONGTYPE Operation against a key holding the wrong kind of value", "a queue key (collect, dispatch"),
    ("READONLY You can't write against a read only replica.", "the Redis broker is a replica"),
    ("You can't write against a read only replica.", "the Redis broker is a replica"),  # redis-py's ReadOnlyError
    ("Link with MASTER is down and replica-serve-stale-data is set to 'no'.", "a replica cut off from its primary"),  # MasterDownError
    ("(404) NOT_FOUND - no queue 'collect' in vhost 'v'", "missing on the broker"),
    ("ERR something new", "the broker refused a command"),
    ("this user has no permissions to access one of the channels used as arguments", "the Redis broker's user (BROKER_URL) lacks a right"),
    ("NOPERM this user has no permissions to run the 'publish' command", "~* &* +@all -@dangerous +info"),
    ("OOM command not allowed when used memory > 'maxmemory'.", "Redis is out of memory (maxmemory): raise maxmemory or free memory"),
])
def test_the_log_says_what_a_channel_error_means(error, says):
    assert says in advice(Exception(error))


def test_a_login_refused_as_the_worker_first_connects_is_named_as_such_not_as_missing_permissions():
    """A wrong password (say, BROKER_URL not updated after a credentials rotation) is AMQP's 403
    ACCESS_REFUSED, a channel error raised before the worker holds a connection: the worker logs
    it with this advice (Consumer.on_connection_error_before_connected), which told the operator to
    grant the user permissions on the vhost."""
    says = advice(Exception("(0, 0): (403) ACCESS_REFUSED - Login was refused using authentication mechanism PLAIN. "
                            "For details see the broker logfile."))
    assert "password" in says and "BROKER_URL" in says and "set_permissions" not in says


def test_a_full_redis_is_named_as_redis_py_raises_it():
    """redis-py's OutOfMemoryError keeps Redis's reply without its "OOM" prefix."""
    assert advice(OutOfMemoryError("command not allowed when used memory > 'maxmemory'.")) == redisfull.HINT

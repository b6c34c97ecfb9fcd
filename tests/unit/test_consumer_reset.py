"""wsnode.consumer.reset: which errors of a consuming connection mean that what was on its way
was dropped (a reset), as redis-py and py-amqp raise them."""

from __future__ import annotations

import redis.exceptions

from wsnode.consumer import reset, timed_out


def raised_inside(handled: BaseException, raised: BaseException) -> BaseException:
    """``raised`` as redis-py raises its own errors: inside the handler of ``handled``."""
    try:
        try:
            raise handled
        except OSError:
            raise raised
    except BaseException as exc:  # noqa: BLE001 - returned for the test
        return exc


def test_a_reset_is_told_directly_and_inside_redis_pys_connection_error():
    assert reset(ConnectionResetError(104, "Connection reset by peer"))  # py-amqp
    assert reset(raised_inside(ConnectionResetError(104, "Connection reset by peer"),
                               redis.exceptions.ConnectionError("Error while reading from 127.0.0.1:6379 : (104, 'Connection reset by peer')")))


def test_a_close_by_the_broker_a_refusal_and_a_timeout_are_not_a_reset():
    assert not reset(redis.exceptions.ConnectionError("Connection closed by server."))  # an EOF: all sent was read
    assert not reset(ConnectionRefusedError(111, "Connection refused"))
    assert not reset(None)
    assert not reset(redis.exceptions.TimeoutError("Timeout reading from socket")) and timed_out(redis.exceptions.TimeoutError())

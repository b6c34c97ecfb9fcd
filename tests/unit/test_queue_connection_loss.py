"""Which failures of a node's queue connection may have lost what the broker sent on it
(``wsnode.consumer.timed_out``): the node closes its connections for those only."""

from __future__ import annotations

import socket

import pytest
import redis.exceptions
from amqp.exceptions import ConnectionForced, ConsumerCancelled, RecoverableConnectionError

from wsnode.consumer import timed_out


@pytest.mark.parametrize("exc", [redis.exceptions.TimeoutError("Timeout reading from socket"), redis.exceptions.TimeoutError("Timeout connecting to server"),
                                 socket.timeout("timed out"), TimeoutError()])
def test_a_read_or_connect_that_timed_out_may_have_lost_what_was_on_its_way(exc):
    assert timed_out(exc)


@pytest.mark.parametrize("exc", [redis.exceptions.ConnectionError("Connection closed by server."), ConnectionResetError(104, "reset"),
                                 RecoverableConnectionError("Socket closed"), ConnectionForced("broker shutdown", (10, 50)),
                                 ConsumerCancelled("queue deleted")])
def test_a_connection_the_broker_closed_refused_or_cancelled_lost_nothing_on_its_way(exc):
    assert not timed_out(exc)

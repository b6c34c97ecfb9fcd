"""Tests of ``wsnode.consumer.InFlight``: how far the node's queue thread may read ahead of the
loop that writes what it read.  Real threads, no sockets."""

from __future__ import annotations

import threading

from wsnode.consumer import InFlight


def test_the_queue_thread_hands_over_up_to_the_limit_without_waiting():
    in_flight = InFlight(limit=2)
    assert in_flight.take(timeout=0) is True
    assert in_flight.take(timeout=0) is True
    assert in_flight.out == 2


def test_past_the_limit_the_queue_thread_waits_until_the_loop_has_written_a_batch():
    in_flight = InFlight(limit=1)
    in_flight.take(timeout=0)
    took = threading.Event()
    waiter = threading.Thread(target=lambda: in_flight.take(timeout=30) and took.set())
    waiter.start()
    assert not took.wait(0.2), "took a place while the loop still had the batch"
    in_flight.give_back()  # the loop wrote it
    assert took.wait(10)
    waiter.join(10)
    assert in_flight.out == 1


def test_a_loop_that_never_writes_is_reported_and_the_batch_goes_all_the_same():
    in_flight = InFlight(limit=1)
    in_flight.take(timeout=0)
    assert in_flight.take(timeout=0.05) is False
    assert in_flight.out == 2  # counted: each give_back of the loop returns one


def test_drained_waits_for_every_batch_handed_over():
    in_flight = InFlight(limit=2)
    in_flight.take(timeout=0)
    in_flight.take(timeout=0)
    assert in_flight.drained(timeout=0.05) is False
    in_flight.give_back()
    assert in_flight.drained(timeout=0.05) is False
    threading.Timer(0.05, in_flight.give_back).start()
    assert in_flight.drained(timeout=10) is True
    assert in_flight.out == 0


def test_nothing_handed_over_is_drained_at_once():
    assert InFlight().drained(timeout=0) is True

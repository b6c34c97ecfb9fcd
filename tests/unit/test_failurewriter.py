"""The failure writer (``tasks.failurewriter``) with plain functions for the write and the loop:
what it hands back to the loop, when, and in which order.  No Redis, no worker."""

from __future__ import annotations

import logging
import queue
import threading

from tasks.failurewriter import FailureWriter

WAIT = 10.0  # seconds: only a bound for a test that would otherwise hang


class Loop:
    """What the writer hands to the worker's loop (``call_soon``), kept until the test runs it."""

    def __init__(self) -> None:
        self.handed: queue.Queue = queue.Queue()

    def call_soon(self, callback) -> None:
        self.handed.put(callback)

    def run_next(self) -> None:
        self.handed.get(timeout=WAIT)()


class Writes:
    """A result backend's writes, each held until the test lets it go."""

    def __init__(self) -> None:
        self.started: queue.Queue = queue.Queue()
        self.done: list[str] = []
        self.go = threading.Event()

    def __call__(self, task_id, error, properties) -> None:
        self.started.put(task_id)
        assert self.go.wait(WAIT)
        self.done.append(task_id)


def test_submit_returns_while_the_write_waits_and_what_follows_reaches_the_loop_once_it_is_written():
    loop, writes, settled = Loop(), Writes(), []
    writer = FailureWriter(writes, loop.call_soon)
    writer.submit("t-1", ValueError("refused"), {}, lambda: settled.append("t-1"))
    assert writes.started.get(timeout=WAIT) == "t-1"  # submit returned with the write under way
    assert loop.handed.empty() and settled == []
    writes.go.set()
    loop.run_next()
    assert writes.done == ["t-1"] and settled == ["t-1"]


def test_failures_are_written_one_at_a_time_in_the_order_submitted():
    loop, writes, settled = Loop(), Writes(), []
    writer = FailureWriter(writes, loop.call_soon)
    for task_id in ("t-1", "t-2", "t-3"):
        writer.submit(task_id, ValueError(task_id), {}, lambda task_id=task_id: settled.append(task_id))
    assert writes.started.get(timeout=WAIT) == "t-1"
    assert writes.started.empty()  # the second waits for the first
    writes.go.set()
    for _ in range(3):
        loop.run_next()
    assert writes.done == settled == ["t-1", "t-2", "t-3"]


def test_a_write_that_raises_is_logged_and_its_message_is_still_settled(caplog):
    loop, settled = Loop(), []

    def write(task_id, error, properties):
        raise RuntimeError("backend gone")

    FailureWriter(write, loop.call_soon).submit("t-1", ValueError("refused"), {}, lambda: settled.append("t-1"))
    with caplog.at_level(logging.WARNING, logger="tasks.failurewriter"):
        loop.run_next()
    assert settled == ["t-1"]
    assert "task t-1: result not stored (RuntimeError('backend gone'))" in caplog.text


def test_what_follows_a_write_never_raises_into_the_loop(caplog):
    loop = Loop()

    def settle():
        raise RuntimeError("channel closed")

    FailureWriter(lambda *_: None, loop.call_soon).submit("t-1", ValueError("refused"), {}, settle)
    with caplog.at_level(logging.ERROR, logger="tasks.failurewriter"):
        loop.run_next()
    assert "task t-1: its refused message's failure was written or given up, but what follows" in caplog.text
    assert "the broker gives an unacknowledged message back" in caplog.text


def test_submit_waits_for_room_once_the_most_failures_wait(caplog):
    loop, writes = Loop(), Writes()
    writer = FailureWriter(writes, loop.call_soon, most_waiting=1)
    writer.submit("t-1", ValueError("1"), {}, lambda: None)
    assert writes.started.get(timeout=WAIT) == "t-1"  # being written: no longer waiting
    writer.submit("t-2", ValueError("2"), {}, lambda: None)  # waits: the queue is full
    third = threading.Thread(target=writer.submit, args=("t-3", ValueError("3"), {}, lambda: None))
    with caplog.at_level(logging.WARNING, logger="tasks.failurewriter"):
        third.start()
        third.join(0.3)
        assert third.is_alive(), "submit returned with more failures waiting than the bound"
        writes.go.set()
        third.join(WAIT)
    assert not third.is_alive()
    for _ in range(3):
        loop.run_next()
    assert writes.done == ["t-1", "t-2", "t-3"]
    assert "task t-3: 1 failures of refused messages wait for the result backend already" in caplog.text

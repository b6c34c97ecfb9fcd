"""What the worker's pool (:mod:`tasks.prefork`) keeps and finishes at a warm shutdown: the pure
parts, on billiard's own job records (``ApplyResult``)."""

from __future__ import annotations

import weakref

from billiard.pool import ApplyResult

from tasks.prefork import sent_to_a_process, unfinished_write


class Process:
    """What the pool knows of a pool process here: whether it is alive."""

    def __init__(self, alive: bool) -> None:
        self.alive = alive

    def _is_alive(self) -> bool:
        return self.alive


def job(accepted: bool = False, written_to: Process | None = None) -> ApplyResult:
    record = ApplyResult({}, callback=None)
    record._accepted = accepted
    record._write_to = written_to
    return record


def test_the_jobs_kept_are_those_sent_to_a_live_process_whose_ack_was_not_read():
    live, dead = Process(True), Process(False)
    sent, taken, queued, lost = job(written_to=live), job(accepted=True, written_to=live), job(), job(written_to=dead)
    assert sent_to_a_process([sent, taken, queued, lost]) == [sent]


def test_a_write_is_unfinished_only_while_its_generator_is_suspended():
    def write():
        yield  # the pipe is full: the rest waits
        yield

    record = job()
    assert unfinished_write(record) is None  # never scheduled: no writer at all
    writer = write()
    record._writer = weakref.ref(writer)
    assert unfinished_write(record) is None  # scheduled, not begun: Celery's flush drops it
    next(writer)
    assert unfinished_write(record) is writer
    next(writer)
    try:
        next(writer)
    except StopIteration:
        pass
    assert unfinished_write(record) is None  # written whole
    del writer
    assert unfinished_write(record) is None  # gone with its generator

"""What the worker's pool (:mod:`tasks.prefork`) keeps and finishes at a warm shutdown: the pure
parts, on billiard's own job records (``ApplyResult``), and its word to stop, on billiard's own
pipe (``_SimpleQueue``), with no process behind it."""

from __future__ import annotations

import os
import weakref

from billiard.pool import ApplyResult
from billiard.queues import _SimpleQueue

from tasks.prefork import sent_to_a_process, tell_to_stop, unfinished_write


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


class PipedProcess:
    """A pool process as :func:`tasks.prefork.tell_to_stop` sees it: its pipe (billiard's own, the
    process's reading end left open as the main process leaves it) and whether it is alive, as the
    answers ``alive`` gives one by one (the last one again when they run out)."""

    def __init__(self, *alive: bool) -> None:
        self.inq = _SimpleQueue()
        self.inqW_fd = self.inq._writer.fileno()
        self._answers = list(alive)

    def _is_alive(self) -> bool:
        return self._answers.pop(0) if len(self._answers) > 1 else self._answers[0]

    def fill(self) -> None:
        """Fill the pipe, as a job half written to a process that stopped reading leaves it."""
        os.set_blocking(self.inqW_fd, False)
        try:
            while True:
                os.write(self.inqW_fd, b"x" * 4096)
        except BlockingIOError:
            pass
        os.set_blocking(self.inqW_fd, True)


def test_a_live_process_with_room_in_its_pipe_is_told_to_stop():
    proc = PipedProcess(True)
    assert tell_to_stop(proc, poll=0.01) is True
    assert proc.inq.get() is None  # what a pool process reads as "stop"


def test_a_dead_process_with_a_full_pipe_is_not_written_to():
    proc = PipedProcess(False)
    proc.fill()
    assert tell_to_stop(proc, poll=0.01) is False  # Celery's blocking write never returned here


def test_a_process_that_dies_while_its_pipe_is_full_is_given_up_on():
    proc = PipedProcess(True, True, True, False)
    proc.fill()
    assert tell_to_stop(proc, poll=0.01) is False
    assert proc._answers == [False]  # asked again after each wait for room, until it was dead


def test_a_process_whose_pipe_is_closed_already_is_skipped():
    proc = PipedProcess(True)
    proc.inq._writer.close()
    assert tell_to_stop(proc, poll=0.01) is False

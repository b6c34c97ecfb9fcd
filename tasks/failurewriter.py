"""The writer of the failures of the messages the worker's main process refuses before they run
(:class:`tasks.taskmessages.Consumer`): one thread beside the worker's event loop.

A refused message's failure (a malformed message, an unreadable or overflowing eta, a body that
does not decode) is written to the result backend so that a caller waiting on it is told why.  A
results Redis that refuses writes for a while (over ``maxmemory``, ``READONLY``, ``MASTERDOWN``:
:data:`tasks.resultbackend.REFUSED_FOR_NOW`), or does not answer, has that write retried for up
to about 100 s (``result_backend_always_retry`` in ``worker.py``).  The main process wrote it
itself, and read no other task meanwhile: one bad message while the results Redis was full held
every collect of that worker.  The write is made here instead, while the loop goes on reading and
running other tasks.

Thread rules:

- :meth:`FailureWriter.submit`: the loop thread only (the worker's main thread).  It returns at
  once, unless ``most_waiting`` writes already wait: it then waits for room, as the loop waited
  for every write before.  On the worker the prefetch window bounds them first: a refused message
  stays unacknowledged (and counted) while its failure waits.
- ``write`` runs on the writer's thread (a daemon, started by the first submit), one write at a
  time in the order submitted; it must not touch the message, its channel or the event dispatcher
  (none is thread-safe).
- ``then`` (what the message needs once its failure is written or given up: its task events, its
  acknowledgement) is handed back to the loop with ``call_soon`` (Celery's consumer's, through
  kombu's ``Hub.call_soon``, which may be called from any thread and wakes the loop), and runs
  there.  An error it raises is logged, never raised into the loop.

The guarantee: the message is acknowledged only in ``then``, so a worker that stops (or loses its
broker connection) while a failure waits leaves the message to the broker, which gives it back
(Redis restores it, RabbitMQ requeues it) and the next read refuses and writes it again; writing
the same failure twice is harmless.  Nothing is waited for at exit.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)

#: Most failure writes that wait before :meth:`FailureWriter.submit` waits for room: far above the
#: worker's prefetch window, which holds every refused message whose failure waits.
MOST_WAITING = 10_000


class FailureWriter:
    """Runs ``write(task_id, error, properties)`` for each submitted failure on a thread of its
    own, then hands its ``then`` to ``call_soon``.  Thread rules: in the module docstring."""

    def __init__(self, write: Callable[[str, Exception, dict | None], None], call_soon: Callable[[Callable[[], None]], object],
                 most_waiting: int = MOST_WAITING) -> None:
        self._write = write
        self._call_soon = call_soon
        self._waiting: queue.Queue = queue.Queue(most_waiting)
        self._thread: threading.Thread | None = None

    def submit(self, task_id: str, error: Exception, properties: dict | None, then: Callable[[], None]) -> None:
        """Writes the failure ``error`` of the task ``task_id`` (its message's ``properties``), then
        has ``then`` run on the loop.  The loop thread only."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="failure-writer", daemon=True)
            self._thread.start()
        if self._waiting.full():
            log.warning("task %s: %d failures of refused messages wait for the result backend already: "
                        "the worker reads no other task until one is written", task_id, self._waiting.qsize())
        self._waiting.put((task_id, error, properties, then))

    def _run(self) -> None:
        while True:
            task_id, error, properties, then = self._waiting.get()
            try:
                self._write(task_id, error, properties)
            except Exception as exc:  # noqa: BLE001 - the writer goes on with the next failure
                log.warning("task %s: result not stored (%r)", task_id, exc)
            self._call_soon(_logged(task_id, then))


def _logged(task_id: str, then: Callable[[], None]) -> Callable[[], None]:
    def run() -> None:
        try:
            then()
        except Exception:  # noqa: BLE001 - never into the worker's loop
            log.exception("task %s: its refused message's failure was written or given up, but what follows (its events, "
                          "its acknowledgement) failed: the broker gives an unacknowledged message back", task_id)

    return run

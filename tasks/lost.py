"""Requests lost with their pool process, and the poison among them: one that kills the process
running it every time (its data runs the process out of memory, say) is failed after a few
losses instead of being put back on its queue for ever.

Every task runs with ``acks_late`` and ``task_reject_on_worker_lost`` (``worker.py``): when a pool
process dies under a task (SIGKILL, the OOM killer), Celery puts the task back on its queue at
once, and it runs again under the same id.  That is what keeps a task whose process was killed
for an unrelated reason, and on its own it is also Celery's documented message loop: a request
that kills its process comes back, kills the next one, and so on, for ever.  Here the worker's main
process counts the losses of each request (:class:`LostRequests`), and one lost ``fail_after``
times is failed with :class:`LostWithItsProcess` instead: it is acked, ``task-failed`` goes to
Flower, and a task that keeps results stores the failure as its result.

- :class:`Request` does that for every plain task (``tasks.dispatch``, ``tasks.receipts``,
  ``tasks.replay``, ...): the app's ``task_cls`` is :class:`Task`, whose requests are of this class.
- ``tasks.collect`` and ``tasks.collect_many`` run in batches (:class:`tasks.collectbatches.CollectBatches`),
  where a lost batch takes every request in it: they use :class:`LostRequests` themselves, to run
  the requests of a lost batch one per batch before failing the one that kills its process.

Counts live in the worker's main process: a worker restart clears them, and a request put back
may be taken by another worker, which starts from nothing (with W workers a poison can kill up to
``W x fail_after`` pool processes).  Pool processes that die while the worker shuts down count
against no request.

Only the prefork pool loses a request this way: under the solo and threads pools what dies is
the worker itself, and the broker gives the task back (on Redis after ``VISIBILITY_TIMEOUT``).

Threading: the worker's main process.  The prefork pool calls a request's ``on_failure`` and
acknowledges it on the main process's event loop; the threads pool from its threads, where each
:class:`LostRequests` call here is a few dict operations that the GIL keeps whole.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from billiard.einfo import ExceptionInfo, ExceptionWithTraceback
from celery import Task as CeleryTask
from celery.exceptions import WorkerLostError
from celery.worker import state as worker_state

from tasks import taskrequest

log = logging.getLogger(__name__)

#: Losses of one request (the last ones with it alone) after which it is failed, not put back.
FAIL_AFTER = 3


class LostWithItsProcess(Exception):
    """The result of a request that the worker's pool process died running ``FAIL_AFTER`` times
    (for a batched task, the last times with the request alone in its batch): it is failed rather
    than run again."""


class LostRequests:
    """The requests that died with their pool process (SIGKILL, the OOM killer), by task id, and
    how many times.  Pure; the worker's main process.

    A request lost that way goes back to its queue (``task_reject_on_worker_lost``) and comes back
    under the same id.  A batched task loses every request of the batch at once; if one of them is
    what kills the process, every batch it is in dies again, with the requests beside it.  So a
    request seen lost before is run in a batch of its own (:meth:`suspect`), which leaves the
    others to run, and one lost ``fail_after`` times in all, the last time alone, is failed
    instead of put back (:meth:`lost` says which), as Celery fails a task whose process died when
    it does not requeue it.  A plain task is always alone.  At most ``most`` ids are remembered,
    the oldest forgotten first; an id is forgotten once it returns or fails otherwise.
    """

    def __init__(self, fail_after: int = FAIL_AFTER, most: int = 10_000) -> None:
        self.fail_after = max(1, fail_after)
        self._most = most
        self._lost: dict[str, int] = {}

    def suspect(self, request_id: str) -> bool:
        """Whether the request was lost before: it runs alone."""
        return request_id in self._lost

    def lost(self, request_ids: Sequence[str]) -> set[str]:
        """A batch of these requests died with its pool process; returns those not to put back
        (lost ``fail_after`` times, alone in this batch)."""
        for request_id in request_ids:
            self._lost[request_id] = self._lost.pop(request_id, 0) + 1  # newest last
        while len(self._lost) > self._most:
            del self._lost[next(iter(self._lost))]
        if len(request_ids) == 1 and self._lost.get(request_ids[0], 0) >= self.fail_after:
            del self._lost[request_ids[0]]
            return {request_ids[0]}
        return set()

    def times(self, request_id: str) -> int:
        """How many times the request was lost so far (0 once it is forgotten)."""
        return self._lost.get(request_id, 0)

    def returned(self, request_ids: Sequence[str]) -> None:
        """These requests returned (ran, or failed with an error of their own)."""
        if self._lost:
            for request_id in request_ids:
                self._lost.pop(request_id, None)

    def __len__(self) -> int:
        return len(self._lost)


def exception_of(exc_info: ExceptionInfo) -> BaseException:
    """The exception a pool callback reports (billiard hands it over wrapped in an
    ``ExceptionWithTraceback``)."""
    exc = exc_info.exception
    return exc.exc if isinstance(exc, ExceptionWithTraceback) else exc


def shutting_down() -> bool:
    """Whether the worker is stopping: its pool processes die then, and no request is to blame.
    Celery's own test (``celery.worker.state.maybe_shutdown``): a warm shutdown on SIGTERM sets
    ``should_stop`` to exit code 0, which is not false here."""
    return any(flag is not None and flag is not False for flag in (worker_state.should_terminate, worker_state.should_stop))


def lost_too_often(task_name: str, request_id: str, times: int, alone: bool = False) -> ExceptionInfo:
    """The failure of a request lost with its pool process ``times`` times (logged here)."""
    last = ", the last time with it alone in its batch" if alone else ""
    text = (f"the worker's pool process died {times} times while running this request{last} (killed, or out of "
            "memory?): it is not run again; send it again once what kills the process is fixed")
    log.error("%s %s: %s", task_name, request_id, text)
    try:
        raise LostWithItsProcess(text)
    except LostWithItsProcess:
        return ExceptionInfo()


#: The plain tasks' losses, in the worker's main process (every plain task shares it: ids are unique).
_LOST = LostRequests()


class Request(taskrequest.Request):
    """Celery's request, failed with :class:`LostWithItsProcess` once its pool process died
    running it ``FAIL_AFTER`` times, instead of being put back on its queue again.  What it does
    otherwise is Celery's own, but for the eta it checks as it is made (:class:`tasks.taskrequest.Request`).
    Main process only (see the module docstring)."""

    def on_failure(self, exc_info, send_failed_event=True, return_ok=False):
        exc = exception_of(exc_info)
        if isinstance(exc, WorkerLostError) and self.task.acks_late and self.task.reject_on_worker_lost and not shutting_down():
            if _LOST.lost((self.id,)):
                exc_info, return_ok = lost_too_often(self.task.name, self.id, _LOST.fail_after), False
            else:
                log.warning("%s %s: its pool process died running it (%d of %d times); it goes back to the queue",
                            self.task.name, self.id, _LOST.times(self.id), _LOST.fail_after)
        else:
            _LOST.returned((self.id,))
        return super().on_failure(exc_info, send_failed_event=send_failed_event, return_ok=return_ok)

    def acknowledge(self):
        # Acked: it ran (or failed with an error of its own, or is retried under a new message).
        _LOST.returned((self.id,))
        super().acknowledge()


class Task(CeleryTask):
    """The app's task class (``Celery(task_cls=...)``): Celery's, with :class:`Request`."""

    Request = Request

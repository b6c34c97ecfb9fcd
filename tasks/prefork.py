"""Celery's prefork pool, with one change: a warm shutdown no longer forgets a job that a pool
process has already been sent, nor leaves it half written, nor waits for ever on the full pipe of
a process that died during it.  It is the worker's pool
(``worker_pool`` in ``worker.py``), also with ``-P prefork``, which Celery's command line takes for
"the configured pool"; the banner says ``(prefork)``.  Celery's own stays at hand:
``CELERY_CUSTOM_WORKER_POOL=celery.concurrency.prefork:TaskPool`` and ``-P custom``.

What it mends (bench/HISTORY.md, 2026-12-07 12:10 and 15:00).  When the worker stops, Celery first
closes the pool, then its consumer flushes it (``AsynPool.flush``):

- The flush drops from the pool's cache every job whose ACK the main process has not read yet,
  "since they will be redelivered by the broker anyway".  A job already written to a process's
  pipe is run by that process all the same.  The main process's last reading of results at
  shutdown loops only while the cache holds a job, so nothing read that job's result: the process
  then waited 30 s (billiard's ``GUARANTEE_MESSAGE_CONSUMPTION_RETRY_LIMIT``) for the main process
  to count it before it exited, and the job's requests, never acked, ran again on the next worker.
- A job whose write had begun (a payload larger than the pipe's 64 KB: a batch of a few hundred
  messages) is to be written to the end, "to keep message boundaries"; but the flush does that
  only while the pool runs, and it is closed by then.  The process waited for ever for the rest of
  its job, and the worker for the process: it never exited.

It happened when SIGTERM landed just after a task went to a pool process: four stops in 137 of a
worker kept busy with batches took 30 s more, and the housekeeping run, sent every
``HOUSEKEEPING_SECONDS``, met it too.  Three in 110 never ended when this pool first kept the jobs
without finishing their writes: it then waited for the result of a job its process never had whole.

:class:`AsynPool`'s flush, when it comes from a stop, first writes to the end every job a live
process has begun to receive, then keeps in the cache the jobs written to a live process, so that
the stop reads their results like those of the jobs already running: the worker stops once they
are done, and their requests are acked.  A process that dies during the stop (killed while a job
was being written to it) is not told to stop (:func:`tell_to_stop`): Celery's pool wrote that word
to its full pipe and waited for ever, with its own pool too.  The job's requests, never acked, go
back to the queue as the stop closes the broker channel (kombu restores what it held unacked), and
the next worker runs them.  A flush for a lost broker connection, the worker running
on, is Celery's, unchanged.  Threading: the worker's main process, in its stop, as Celery's pool.
"""

from __future__ import annotations

import errno
import inspect
import select

from billiard.compat import setblocking
from celery.concurrency import asynpool, prefork

from tasks.lost import shutting_down

#: Seconds between two looks at whether a pool process that has no room in its pipe is still alive.
_ALIVE_POLL_SECONDS = 0.5


def sent_to_a_process(jobs) -> list:
    """The jobs of ``jobs`` (the pool's cache's values) that a live pool process will run although
    the main process has not read its ACK: written to its pipe, or being written (billiard's
    ``ApplyResult._write_to`` is set as the write starts).  Pure, but for asking each process
    whether it is alive."""
    return [job for job in jobs if not job._accepted and job._write_to is not None and job._write_to._is_alive()]


def unfinished_write(job):
    """The generator writing ``job`` to its process (Celery's ``_write_job``) if it has begun and
    not ended, else None.  Pure."""
    ref = getattr(job, "_writer", None)
    writer = ref() if ref is not None else None
    if writer is not None and inspect.getgeneratorstate(writer) == inspect.GEN_SUSPENDED:
        return writer
    return None


def tell_to_stop(proc, poll: float = _ALIVE_POLL_SECONDS) -> bool:
    """Celery's word to a pool process that the pool stops (``None`` on its pipe, written blocking as
    Celery writes it), once the pipe has room; never to a dead process, whose pipe may be full for
    ever.  Returns whether it was written.  Main process, at the pool's join only."""
    while proc._is_alive():
        try:
            _, writable, _ = select.select([], [proc.inq._writer.fileno()], [], poll)
        except (OSError, ValueError):
            return False  # the pipe is closed already (Celery's own skips such a process too)
        if not writable:
            continue
        try:
            setblocking(proc.inq._writer, 1)
            proc.inq.put(None)
        except OSError as exc:
            if exc.errno not in (errno.EBADF, errno.EPIPE):
                raise
            return False
        return True
    return False


class AsynPool(asynpool.AsynPool):
    @staticmethod
    def _stop_task_handler(task_handler) -> None:
        # Celery's writes None to every process's pipe, blocking: a process that died with its
        # pipe full (killed while the stop finished writing it a job over the pipe's 64 KB) never
        # reads it, the main process holds the pipe's other end too, and the write waited for ever.
        for proc in task_handler.pool:
            tell_to_stop(proc)

    def flush(self) -> None:
        kept = sent_to_a_process(self._cache.values()) if shutting_down() else []
        for job in kept:
            writer = unfinished_write(job)
            if writer is not None:
                # Celery's own loop for this (in super().flush()) runs only while the pool runs,
                # and a stop closes it first.  Blocks until the process has read the job: it is
                # alive, and reads it once it is done with what it runs (Celery's fair scheduling
                # writes only to a process that runs nothing).
                self._flush_writer(job._write_to, writer)
        try:
            super().flush()
        finally:
            for job in kept:
                self._cache.setdefault(job._job, job)


class TaskPool(prefork.TaskPool):
    """Celery's prefork ``TaskPool`` on :class:`AsynPool`."""

    Pool = AsynPool

"""Celery's prefork pool, with one change: a warm shutdown no longer forgets a job that a pool
process has already been sent.  It is the worker's pool (``worker_pool`` in ``worker.py``), also
with ``-P prefork``, which Celery's command line takes for "the configured pool"; the banner says
``(prefork)``.  Celery's own stays at hand: ``CELERY_CUSTOM_WORKER_POOL=celery.concurrency.prefork:TaskPool``
and ``-P custom``.

What it mends (bench/HISTORY.md, 2026-12-07 12:10): when the worker stops, its consumer flushes
the pool (``AsynPool.flush``), which drops from the pool's cache every job whose ACK the main
process has not read yet, "since they will be redelivered by the broker anyway".  A job already
written to a process's pipe, or being written, is run by that process all the same.  The main
process's last reading of results at shutdown loops only while the cache holds a job, so nothing
read that job's result: the process then waited 30 s (billiard's
``GUARANTEE_MESSAGE_CONSUMPTION_RETRY_LIMIT``) for the main process to count it before it exited,
and the job's requests, never acked, ran again on the next worker.  It happened when SIGTERM
landed just after a task went to a pool process: four stops in 137 of a worker kept busy with
batches, and the housekeeping run, sent every ``HOUSEKEEPING_SECONDS``, met it too.

:class:`AsynPool` keeps such jobs in the cache when the flush comes from a stop (its pool process
alive), so that the stop reads their results like those of the jobs already running: the worker
stops once they are done, and their requests are acked.  A flush for a lost broker connection, the
worker running on, is Celery's, unchanged.  Threading: the worker's main process, on its event loop
(kombu's Hub) or in its stop, as Celery's pool.
"""

from __future__ import annotations

from celery.concurrency import asynpool, prefork

from tasks.lost import shutting_down


def sent_to_a_process(jobs) -> list:
    """The jobs of ``jobs`` (the pool's cache's values) that a live pool process will run although
    the main process has not read its ACK: written to its pipe, or being written (billiard's
    ``ApplyResult._write_to`` is set as the write starts).  Pure, but for asking each process
    whether it is alive."""
    return [job for job in jobs if not job._accepted and job._write_to is not None and job._write_to._is_alive()]


class AsynPool(asynpool.AsynPool):
    def flush(self) -> None:
        kept = sent_to_a_process(self._cache.values()) if shutting_down() else []
        try:
            super().flush()
        finally:
            for job in kept:
                self._cache.setdefault(job._job, job)


class TaskPool(prefork.TaskPool):
    """Celery's prefork ``TaskPool`` on :class:`AsynPool`."""

    Pool = AsynPool

"""The requests of ``tasks.collect`` and ``tasks.collect_many`` that the worker holds back, as
Celery holds any task's: one whose ``countdown`` or ``eta`` lies ahead waits on the worker's timer
until it is due, its place in the prefetch window given back meanwhile (``celery inspect
scheduled`` and Flower list it); what the task's rate limit holds back waits, in order, for its
token.

:class:`HeldRequests` is a part of :class:`tasks.collectbatches.CollectBatches` (a mixin), written
apart because it is one concept: it uses the task's ``app``, ``name``, ``flush_interval``,
celery-batches' ``_buffer``, ``_count`` and ``_tref``, and the state that
:class:`~tasks.collectbatches.CollectBatches` sets up (``_consumer``, ``_waiting``, ``_limited``,
``_limit_tref``, ``_announced``), its ``_do_flush`` and ``_flush_when_free``.  Worker main
process, on its event loop (kombu's Hub), as the rest of the task class's flushing.
"""

from __future__ import annotations

import itertools
import time

from celery.worker import state as worker_state
from celery_batches import consume_queue

from tasks import batchevents, taskrequest
from tasks.lost import shutting_down

#: A request whose eta is at most this far ahead (seconds) runs with the batch at hand rather than
#: being held on the timer: the timer's own resolution, and what converting an eta to the timer's
#: clock twice can differ by.
ETA_SLACK = 0.005


class HeldRequests:
    """The requests a batched collect task holds back (see the module).  Worker main process."""

    def _take_ready(self) -> tuple[list, list]:
        """What of this task may go to the pool now, for a flush of this task or of the other
        (:meth:`~tasks.collectbatches.CollectBatches._do_flush`): ``(requests due and within the rate limit, in the order read; what
        waited at the last flush, as (request, its picklable copy, its users))``.  A request whose
        eta lies ahead is put on the timer, and one over the rate limit kept for its token."""
        waiting, self._waiting = self._waiting, []  # past the rate limit already
        ready, self._limited = self._limited, []
        now = time.monotonic()
        for req in consume_queue(self._buffer):
            due = self._due(req)
            if due <= now + ETA_SLACK:
                ready.append(req)
            else:
                self._hold(req, due)
        self._count = itertools.count(1)
        return self._within_rate_limit(ready), waiting

    def _within_rate_limit(self, ready: list) -> list:
        """The first of ``ready`` that the task's rate limit lets run now: Celery's token bucket
        per worker and task name, one token per request (a ``tasks.collect_many`` request counts
        as one task), as ``celery control rate_limit`` or Flower's worker page set it (or
        ``rate_limit`` on the task).  The rest wait, in order and ahead of what comes
        later, for a flush that the timer calls when the next token is due."""
        consumer = self._consumer
        bucket = None if consumer is None or consumer.disable_rate_limits else consumer.task_buckets.get(self.name)
        if bucket is None:
            return ready
        for at, req in enumerate(ready):
            if not bucket.can_consume(1):
                self._limited = ready[at:]
                if self._limit_tref is None:
                    self._limit_tref = consumer.timer.call_after(bucket.expected_time(1), self._rate_limit_due)
                return ready[:at]
        return ready

    def _rate_limit_due(self) -> None:
        self._limit_tref = None
        self._do_flush()

    def _due(self, req) -> float:
        """When ``req`` may run, on the worker timer's clock (0 for now).  An eta that is no time
        that clock holds never comes here: the request is refused as it is made, as any task's
        (:class:`tasks.taskrequest.Request`)."""
        if not req.eta:
            return 0.0
        return taskrequest.eta_timestamp(req.eta, req.utc, self.app.timezone)

    def _hold(self, req, due: float) -> None:
        """Keep ``req`` on the worker's timer until ``due`` (Celery's ``default`` strategy for a
        task with an eta): its place in the prefetch window is given back meanwhile, so the
        worker goes on reading other tasks."""
        worker_state.task_ready(req)  # not reserved while it waits: `inspect scheduled` lists it, as Celery's own
        self._consumer.qos.increment_eventually()
        self._consumer.timer.call_at(due, self._release, (req,), priority=6)
        if req.id not in self._announced:  # Flower lists it now, with its eta, as Celery's own
            self._announced.add(req.id)
            batchevents.send_received(req)

    def _release(self, req) -> None:
        """Timer: ``req`` is due.  It joins the buffer and goes with the next batch (one revoked
        while it waited is dropped there).  Not while the worker stops: it stays unacknowledged,
        and the broker gives it to the next worker (see :meth:`~tasks.collectbatches.CollectBatches._do_flush`)."""
        if shutting_down():
            return
        self._consumer.qos.decrement_eventually()
        self._buffer.put(req)
        if self._tref is None:
            self._tref = self._consumer.timer.call_repeatedly(self.flush_interval, self._do_flush)
        self._flush_when_free()

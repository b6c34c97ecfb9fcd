"""The task class of ``tasks.collect`` and ``tasks.collect_many``: celery-batches' ``Batches``, plus
what a plain Celery task gives operators and callers.

celery-batches runs the requests a worker read as one batch; this class adds what Celery gives any
task of its own and celery-batches does not: the requests counted as reserved and active (``celery
inspect``, Flower's worker page), their ``countdown``/``eta`` held on the worker's timer, the task's
rate limit, revoked and expired requests dropped, a task event per request (Flower lists each as a
task), eager ``apply``, time limits, and a batch lost with its pool process put back request by
request.  A batch goes to the pool as soon as no other batch of its task runs
(:class:`tasks.batching.FlushGate`), and takes along what of the other task may run: one batch
may hold requests of both.  A request waits while a request of one of its users read before it,
of either task, has not returned, unless both go in one batch (per-user order:
:func:`tasks.batching.ordered_batches`).

Thread rules: :class:`CollectBatches`' ``Strategy``, ``flush`` and the timer callbacks run on the
worker's main process, on its event loop (kombu's Hub); :func:`_apply_batch` and
:func:`tasks.batchevents.send_outcomes` run in a pool process (one of its threads in ``-P threads``, under a lock).
What the batch function does with the requests is :mod:`tasks.collect`'s; the requests held back
for their eta or by the rate limit are :mod:`tasks.heldrequests`'s (:class:`~tasks.heldrequests.HeldRequests`,
a mixin of :class:`CollectBatches`).
"""

from __future__ import annotations

import itertools
import logging
import socket
import time
import traceback
import uuid
from queue import Queue

from billiard.einfo import ExceptionInfo
from celery import Task, states
from celery.exceptions import InvalidTaskError, WorkerLostError
from celery.result import EagerResult
from celery.utils.functional import maybe_list
from celery.worker import state as worker_state
from celery_batches import Batches, SimpleRequest, consume_queue
from celery_batches.trace import apply_batches_task

import settings
from tasks import batchevents, envelopes, links, redis_transport, taskrequest
from tasks.batching import FlushGate, batch_time_limits, messages_in, ordered_batches, request_users
from tasks.heldrequests import HeldRequests
from tasks.lost import LostRequests, exception_of, lost_too_often, shutting_down

#: Most levels a ``tasks.collect`` or ``tasks.collect_many`` request's arguments may nest: far
#: above what validation lets through (``tasks.messages.MAX_DATA_DEPTH``), and far enough below
#: what this process can pickle for the pool (pickle spends two of Python's 1,000 recursion
#: levels per level of nesting: it fails near 500 levels, less the loop's own stack).
MAX_REQUEST_DEPTH = envelopes.MAX_REQUEST_DEPTH

log = logging.getLogger(__name__)

#: Whether a request waits for a running batch of its users (``COLLECT_ORDER``).
ORDERED = settings.COLLECT_ORDER == "user"
NOBODY: frozenset[str] = frozenset()

#: Numbers the requests of ``tasks.collect`` and ``tasks.collect_many`` as this worker process
#: reads them (:meth:`_ReservedBuffer.put`), one count for both: the order their users' messages
#: keep across the two tasks.
_READ_ORDER = itertools.count()

#: The requests of both tasks lost with their pool process, in the worker's main process: a batch
#: may hold requests of both (:meth:`CollectBatches._do_flush`), and ids are unique.
_LOST = LostRequests()
#: Ids of the requests of both tasks held for their eta whose ``task-received`` was sent (their
#: batch may be the other task's).  Worker main process.
_ANNOUNCED: set[str] = set()


class CollectBatches(HeldRequests, Batches):
    """celery-batches' task class, plus what a plain Celery task gives operators and callers.

    Worker main process (``flush``) and pool process (``run``).  celery-batches acks every
    request of a batch once the batch returns, whatever happened, so the batch function never
    lets an error escape: it records a result per request (an id, a failure, or a retry sent
    first).  When task events are on (Flower), ``flush`` also sends ``task-received`` and
    ``task-started`` for each request, and the pool process that ran the batch sends each one's
    ``task-succeeded``/``task-failed``/``task-retried`` (:func:`_apply_batch`), so Flower lists
    every request as a task of its own.  A request
    revoked or expired is dropped before its batch goes to the pool, as Celery drops any task's;
    one with a countdown, or over the task's rate limit, is held back as Celery holds any task
    (:meth:`_do_flush`).
    The requests of a batch are acked together (:func:`tasks.redis_transport.acknowledge`: one
    round trip on the Redis broker instead of one per request).
    """

    abstract = True
    #: Celery's request, which refuses an eta no clock holds as it is made, as for any task.
    Request = taskrequest.Request

    #: The most messages one batch stores and routes (a request of ``tasks.collect_many`` counts
    #: its items, any other request one): a flush of more goes to the pool as several batches.
    batch_messages: int = settings.COLLECT_BATCH

    def __init__(self) -> None:
        super().__init__()
        self._buffer = _ReservedBuffer()
        self._gate = FlushGate()
        self._lost = _LOST  # shared by both tasks: a batch may hold requests of both
        self._hub = None  # the worker's event loop (kombu's Hub), or None without one
        self._consumer = None  # the worker's consumer (its timer and prefetch window), once started
        self._connection = None  # the consumer's broker connection when the strategy was made
        self._announced = _ANNOUNCED  # ids of the requests held for their eta: task-received sent (both tasks')
        self._limited: list = []  # requests due but held back by the task's rate limit, in order
        self._limit_tref = None  # the timer entry that flushes them when the next token is due
        self._flush_pending = False
        # Requests that wait behind a running batch naming one of their users (per-user order,
        # tasks.batching.ordered_batches), in the order read, as (request, its picklable copy,
        # its users); they go first at the next flush.
        self._waiting: list[tuple] = []
        # The users of each batch in the pool, by its gate token.  Set on the loop; removed where
        # the batch's result callback runs (a thread of the threads pool: dict.pop is atomic
        # under the GIL, and the loop reads a copy).
        self._running_users: dict[object, frozenset[str] | None] = {}
        # The worker's other CollectBatches tasks (tasks.collect's is tasks.collect_many's, and the
        # other way round), whose requests and batches a request of this one waits for as for its
        # own (per-user order across both); found when the consumer starts.
        self._siblings: list[CollectBatches] = []

    def __call__(self, *args, **kwargs):
        """``collect(to=..., data=...)``: business code calling the task object directly, which
        for any Celery task runs its body here and returns its result.  Here: :meth:`apply`, its
        message id or ids returned, its error raised.  A batch (one list of celery-batches
        requests: the worker's and :meth:`apply`'s call) runs the batch function."""
        if len(args) == 1 and not kwargs and isinstance(args[0], list) and args[0] and isinstance(args[0][0], SimpleRequest):
            return super().__call__(*args)
        return self.apply(args, kwargs, throw=True).get()

    def apply(self, args=None, kwargs=None, link=None, link_error=None, task_id=None, throw=None, **options):
        """Run one request here and now: ``collect.apply(kwargs=...)``, and ``delay()`` or
        ``apply_async()`` under ``task_always_eager`` (business code's tests), as Celery runs any
        task eagerly.  The ``EagerResult`` holds what the worker would store: the message id (a
        list of them for ``tasks.collect_many``), or the request's error, which ``get()`` raises
        (and ``apply`` itself with ``throw=True`` or ``task_eager_propagates``).  The message is
        stored and dispatched as from a worker, and ``link``/``link_error`` follow as from a
        worker (:mod:`tasks.links`).  An eager request does not retry when the store is
        unavailable: it fails at once with ``StoreUnavailable``.  Its result goes to the result
        backend only with ``task_store_eager_result``, as any task's.

        (celery-batches' own ``apply`` returned the batch function's return value, the outcome
        of every request of the batch, as the result, SUCCESS even for an invalid request, and
        called ``link`` with it.)"""
        task_id = task_id or str(uuid.uuid4())
        request = links.CollectRequest(
            task_id, self.name, tuple(args or ()), dict(kwargs or {}),
            {"is_eager": True, "exchange": options.get("exchange"), "routing_key": options.get("routing_key"), "priority": options.get("priority")},
            socket.gethostname(), bool(options.get("ignore_result")) or not self.store_eager_result, None, None, {"retries": 0})
        request.callbacks = maybe_list(link) or None
        request.errbacks = maybe_list(link_error) or None
        # The batch's own trace stores nothing: its return value is the outcome table, not a result.
        batch = Task.apply(self, ([request],), {}, task_id=task_id, throw=throw, **{**options, "ignore_result": True})
        if batch.state != states.SUCCESS or not isinstance(batch.result, dict):
            return batch  # the batch function itself failed: its error is already the result
        kind, detail = batch.result.get(task_id, ("failed", RuntimeError(f"{self.name} {task_id}: the batch ran without this request")))
        if kind == "ok":
            return EagerResult(task_id, detail, states.SUCCESS, name=self.name)
        exc = detail if isinstance(detail, BaseException) else RuntimeError(str(detail))
        if throw if throw is not None else self.app.conf.task_eager_propagates:
            raise exc
        return EagerResult(task_id, exc, states.FAILURE, traceback="".join(traceback.format_exception(exc)), name=self.name)

    def Strategy(self, task, app, consumer):
        """Called when the worker's consumer starts, and again each time it reconnects to the
        broker.  Requests still buffered then came on the old connection: the broker gives their
        messages back (Redis restores them, RabbitMQ requeues them), so they are dropped here
        rather than run and then fail to ack; and the flush timer is started afresh with the
        next request, so a reconnection cannot leave requests waiting for a timer that is gone.

        Also called on a pool restart (``pool_restart``, Flower's Restart pool, where
        ``worker_pool_restarts`` is on), with the same consumer on the same connection: the
        requests held then stay, and run in the new pool processes.  Dropping them left their
        messages unacknowledged on the live channel: back only after ``VISIBILITY_TIMEOUT`` on
        Redis (out of order), never on RabbitMQ, whose prefetch window they then filled."""
        connection = getattr(consumer, "connection", None)
        if not (consumer is self._consumer and connection is not None and connection is self._connection):
            self._start_afresh()
        self._connection = connection
        self._hub = consumer.hub
        self._consumer = consumer
        self._siblings = [other for other in app.tasks.values() if isinstance(other, CollectBatches) and other is not self]
        on_message = super().Strategy(task, app, consumer)

        def buffer_then_flush_when_free(message, *args, **kwargs):
            # Its args and kwargs are a list and an object (tasks.taskmessages.Consumer checked).
            # This process pickles them for the pool, which raised out of the loop (and stopped
            # the worker) for arguments nested near Python's recursion limit.
            problem = envelopes.depth_problem(message.body, "compression" in message.headers, message.payload, MAX_REQUEST_DEPTH)
            if problem is not None:
                raise InvalidTaskError(problem)  # the consumer stores it as the result
            on_message(message, *args, **kwargs)
            self._flush_when_free()

        return buffer_then_flush_when_free

    def _start_afresh(self) -> None:
        """Drop what a consumer on an earlier connection held (see :meth:`Strategy`)."""
        if self._tref is not None:
            self._tref.cancel()
            self._tref = None
        dropped = [*(entry[0] for entry in self._waiting), *consume_queue(self._buffer), *consume_queue(self._pending), *self._limited]
        for req in dropped:
            worker_state.task_ready(req)  # not reserved here any more: the broker has it again
        if dropped:
            log.warning("%s: consumer restarted; %d buffered requests left to the broker, which delivers them again", self.name, len(dropped))
        self._count = itertools.count(1)
        self._announced.clear()
        self._limited, self._limit_tref = [], None  # the consumer cleared its timer
        self._waiting = []
        self._gate.reset()
        self._running_users.clear()
        self._flush_pending = False

    def _flush_when_free(self) -> None:
        """Run what is buffered as a batch if the gate lets one go: on the loop's next turn, so
        that the requests read from the broker in this turn go together (on the Redis broker a
        worker reads a whole backlog in one turn)."""
        if self._flush_pending or not self._has_work() or not self._gate.may_flush():
            return
        if self._hub is None:
            self._do_flush()
            return
        self._flush_pending = True
        self._hub.call_soon(self._flush_now)

    def _flush_now(self) -> None:
        self._flush_pending = False
        if self._has_work() and self._gate.may_flush():
            self._do_flush()

    def _has_work(self) -> bool:
        return bool(self._waiting) or not self._buffer.empty()

    def _batch_done(self, token) -> None:
        """A batch returned: what gathered while it ran may go (through the loop: the threads
        pool calls this on its own thread).  Without an event loop (green pools) it goes with
        the next request or the timer instead."""
        self._running_users.pop(token, None)
        self._gate.finished(token)
        if self._hub is not None:
            self._flush_when_free()
        self._wake_siblings()

    def _wake_siblings(self) -> None:
        """A batch of this task returned, or a flush started some of its requests, dropped them or
        held them for their eta: a request of the other task that waited for them may go now."""
        for other in self._siblings:
            if other._waiting and other._hub is not None:
                other._flush_when_free()

    def _not_started(self):
        """(read number, users) of each request of this task that was read and has not started
        (waiting for a batch of its users, held by the rate limit, or buffered), in no order."""
        for req in itertools.chain((entry[0] for entry in self._waiting), self._limited, list(self._buffer.queue)):
            yield req.read_at, req.read_users

    def _do_flush(self) -> None:
        """Hand what is buffered to :meth:`flush`, but for two kinds of request, held as Celery
        holds any task's: one whose ``countdown`` or ``eta`` lies ahead waits on the worker's
        timer until it is due, and the prefetch window grows by one while it does; and what the
        task's rate limit holds back waits for its token (:meth:`~tasks.heldrequests.HeldRequests._within_rate_limit`).  Called by
        celery-batches' timer and count, by :meth:`_flush_when_free` and by the rate limit's
        timer.  Worker main process.

        (celery-batches kept such a request in a list of its own, read again at every flush, and
        it filled a place of the prefetch window until it ran: a few hundred requests sent with a
        countdown of minutes, ``COLLECT_BATCH`` times the pool's processes, stopped the worker
        from reading any other task until the first came due.  Held on the timer, they are also
        what ``celery inspect scheduled`` and Flower's worker page list.)"""
        if shutting_down():
            # A warm shutdown drains the pool, which runs nothing more (Celery 5.6 fires the loop's
            # timers on a thread meanwhile): what is buffered stays unacknowledged, and the broker
            # gives it to the next worker, rather than being announced as started and never run.
            return
        ready, waiting = self._take_ready()
        # The other task's requests that may run now go too, in the same batches: a sender of
        # both tasks to the same users gets one batch for both (one claim, insert, route lookup
        # and node message) where the two tasks' batches would take turns (per-user order).
        for other in self._siblings:
            other_ready, other_waiting = other._take_ready()
            ready += other_ready
            waiting += other_waiting
        if ready or waiting:
            self.flush(ready, waiting)
        elif self._tref is not None:
            self._tref.cancel()  # nothing waits: the next request starts it again
            self._tref = None
        self._wake_siblings()

    def flush(self, requests, waiting=()):
        # A request revoked (``app.control.revoke``) or past its ``expires`` is dropped here, as
        # Celery's own strategy drops it before running a task (celery-batches does not): the
        # request's ``revoked()`` logs it, stores REVOKED, sends ``task-revoked`` and acks it.
        # A request with a ``countdown`` or ``eta`` comes here when it is due (_do_flush), so one
        # revoked while it waits is dropped too.
        # A request whose batch died with its pool process before runs alone, so that if it is
        # what kills the process it no longer takes other requests with it (LostRequests).
        # A request that names a user of a batch in the pool (of either task), of a batch cut
        # before it here, or of a request read before it that has not started (of either task),
        # waits for the next flush, behind any earlier one that waits (per-user order: see
        # tasks.batching); the rest go now, as several batches when they are more than one holds.
        # ``waiting``: what waited at the last flush, as (request, its picklable copy, its users).
        # Both may hold requests of the other task too (_do_flush): they go in the same batches,
        # which this task's batch function runs (tasks.collectrequests._parse_request).
        live = []  # the same, in the order read
        for req, simple, users in [*waiting, *((req, None, None) for req in requests)]:
            if req.revoked():
                self._announced.discard(req.id)
                self._lost.returned((req.id,))
            elif simple is None:
                live.append((req, links.CollectRequest.from_request(req), req.read_users))
            else:
                live.append((req, simple, users))
        # (what waited and what the rate limit held back can interleave in the order read)
        live.sort(key=lambda entry: entry[0].read_at)
        # A batch that holds requests of both tasks holds as many messages as the larger task's.
        most = max(task.batch_messages for task in {self, *(entry[0].task for entry in live)})
        running = list(self._running_users.values())
        earlier = []
        if ORDERED:
            for other in self._siblings:
                running.extend(list(other._running_users.values()))  # a copy: see _running_users
            # What has not started and is not here: either task's requests held by its rate
            # limit (this task's too: the other's requests here may have been read after them).
            for task in (self, *self._siblings):
                earlier.extend(task._not_started())
            earlier.sort(key=lambda entry: entry[0])
        batches, self._waiting = ordered_batches(
            live, lambda entry: entry[2], lambda entry: most + 1 if self._lost.suspect(entry[0].id) else messages_in(entry[1]), most,
            running, earlier, lambda entry: entry[0].read_at)
        for batch, users in batches:
            if self._lost.suspect(batch[0][0].id):
                log.warning("%s %s: its batch was lost with its pool process before; it runs alone", batch[0][0].task.name, batch[0][0].id)
            self._run_in_pool([(req, simple) for req, simple, _ in batch], users)

    def _run_in_pool(self, pairs, users: frozenset[str] | None):
        requests = [req for req, _ in pairs]
        serializable = ([simple for _, simple in pairs],)
        for req in requests:
            if req.id in self._announced:
                self._announced.discard(req.id)  # sent when it was put on hold (_hold)
            else:
                batchevents.send_received(req)
            req.send_event("task-started")
            # What `celery inspect active` and `stats` (Flower's worker page) read: the request
            # runs, and counts in the worker's total per task name, as Celery's own requests do.
            worker_state.task_accepted(req)
        token = self._gate.started()
        self._running_users[token] = users
        # The pool process sends each request's task-succeeded/failed/retried event itself
        # (_apply_batch): the main process needs only to know that the batch returned.
        events = any(batchevents.sends_events(req) for req in requests)

        def on_return(returned) -> None:
            if isinstance(returned, ExceptionInfo):
                # The threads and solo pools hand a BaseException out of the batch (_retry's
                # SystemExit: a retry that could not be sent) to this callback as a WorkerLostError,
                # where prefork's process dies and on_lost runs: acking the batch here lost it.
                on_lost(returned)
                return
            try:
                self._lost.returned([req.id for req in requests])
                for req in requests:
                    worker_state.task_ready(req)
                redis_transport.acknowledge(requests)
            finally:
                self._batch_done(token)

        def on_lost(exc_info) -> None:
            # The pool process died with the batch (SIGKILL, the OOM killer) or passed the hard
            # time limit: each request as Celery handles a task of its own then.  A worker lost
            # puts it back on its queue at once (task_reject_on_worker_lost; before, it waited
            # unacknowledged for VISIBILITY_TIMEOUT on Redis, and on RabbitMQ until the worker's
            # connection closed); a time limit fails it with TimeLimitExceeded and acks it.
            # One lost alone too often (LostRequests) is failed with LostWithItsProcess instead;
            # pool processes that die while the worker shuts down count against no request.
            try:
                exc = exception_of(exc_info)
                ids = [req.id for req in requests]
                if not isinstance(exc, WorkerLostError):
                    self._lost.returned(ids)  # they fail, and are not put back
                    doomed = set()
                elif shutting_down():
                    doomed = set()
                else:
                    doomed = self._lost.lost(ids)
                log.error("%s: a batch of %d requests was lost with its pool process (%r); %s", self.name, len(requests), exc,
                          "they fail" if not isinstance(exc, WorkerLostError) else
                          "it fails, not run again" if doomed else "they go back to the queue")
                for req in requests:
                    if req.id in doomed:
                        req.on_failure(lost_too_often(req.task.name, req.id, self._lost.fail_after, alone=True), return_ok=False)
                    else:
                        req.on_failure(exc_info, return_ok=True)  # return_ok: logged once above, not once per request; task_ready too
            finally:
                self._batch_done(token)

        def on_timeout(soft: bool, timeout: float) -> None:
            for req in requests:
                req.on_timeout(soft, timeout)

        # Time limits as for any task: the task's own (``celery control time_limit``, Flower's
        # worker page) or the worker's (``--time-limit``, ``--soft-time-limit``), for the batch;
        # for a batch that holds requests of both tasks, the shorter of theirs.
        soft, hard = batch_time_limits({req.task for req in requests} or {self}, self.app.conf)
        return self._pool.apply_async(_apply_batch, (self, serializable, events), callback=on_return, error_callback=on_lost,
                                      timeout_callback=on_timeout, soft_timeout=soft, timeout=hard)


class _ReservedBuffer(Queue):
    """celery-batches' buffer of the requests read and not started yet, each counted as reserved
    while it is there (Celery's ``task_reserved``, as Celery's own strategy counts a task it read):
    what ``celery inspect reserved`` and Flower's worker page (Tasks, Reserved) list.  A request
    leaves the count when it ends (``task_ready``; while its batch runs it is active too, and
    ``inspect reserved`` leaves it out), is held for its eta, is dropped at a reconnection, or is
    rejected.  Requests held back by a rate limit stay counted (Celery counts its own only once
    their token comes).  ``--autoscale`` and ``worker_disable_prefetch`` read this count: with them
    a backlog of requests asks for a process each, and batches hold about as many requests as the
    pool has processes.  Worker main process."""

    def put(self, item, block: bool = True, timeout: float | None = None) -> None:
        worker_state.task_reserved(item)
        # Its place in the order read, across both tasks, and the users it names (per-user
        # order); a request held for its eta comes here again when it is due, and counts as read then.
        item.read_at = next(_READ_ORDER)
        item.read_users = request_users(item.args, item.kwargs) if ORDERED else NOBODY
        super().put(item, block, timeout)


def _apply_batch(task, args, events: bool) -> None:
    """Pool process: run one batch (celery-batches' ``apply_batches_task``) and send each request's
    task-succeeded, -failed or -retried event when task events are on (:func:`tasks.batchevents.send_outcomes`).

    It returns nothing: what it returns crosses the pool's pipe to the worker's main process, which
    needs only to know that the batch returned.  The batch's own result (every message id of up
    to 1,000 messages) came to tens of KB, which the main process reads in pieces, and a warm
    shutdown (SIGTERM) that stopped its event loop between two pieces left it blocked for ever in
    Celery's reading of the rest (``AsynPool``'s ``_flush_outqueue`` starts a new message mid-way
    through the old one).  A message under Linux's ``PIPE_BUF`` (4 KB) is written, and read, at
    once."""
    started = time.monotonic()
    outcomes = apply_batches_task(task, args, 0, None) or {}
    if events:
        answer = [outcomes.get(req.id, ("failed", "the batch did not run: see the worker log")) for req in args[0]]
        batchevents.send_outcomes(task, args[0], answer, time.monotonic() - started)

"""Collect: validate business messages, persist them, then hand them to Dispatch.

Worker process only.  Business code calls::

    collect.delay(to="alice", data={"text": "hi"})                 # -> message id
    collect.delay(to=["alice", "bob"], data=...)                   # one message, two recipients
    collect.delay(to="*", data=...)                                # every user online now
    collect_many.delay(messages=[{"to": ..., "data": ...}, ...])   # -> ids, in order

or, without importing this project, ``send_task("tasks.collect", kwargs=..., queue="collect")``.

A message is stored before it is dispatched: the store insert happens first, and only then does
Dispatch run, inside the same task (``tasks.dispatch.route``): one Celery task per message rather
than two, and messages from a caller that waits for each collect reach the node queue in the order
they were collected.  When routing fails there (Redis or the broker unavailable), the stored
messages go to ``tasks.dispatch`` on the ``dispatch`` queue, which retries with backoff.

``tasks.collect`` is a celery-batches task: the worker takes its requests from the queue and
runs up to ``COLLECT_BATCH`` of them at once (one claim, one insert, one route lookup and one queue
message per node for the batch), so one task per message costs about what ``collect_many`` does.
A batch goes to the pool as soon as no other batch of them runs, and requests gather only
while one does (:mod:`tasks.batching`): a lone request does not wait for a batch to fill.  Each request still has its own id, result and, when events are on, its own events in
Flower.

The tasks are idempotent, so they run with ``acks_late``: a worker killed mid-task leaves the task
on the queue and the next run gives back the same ids.  Each run first binds an idempotency key to
its ids in the store: the Celery task id, or the ``key`` business code passes to ``tasks.collect``
(so that a retry after a lost answer does not store the message twice).  A key is remembered as
long as messages are (``RETENTION_SECONDS``); a reused key returns the first message's id, sends
the stored message again (clients drop it by id) and stores nothing new.  Invalid input raises :class:`~tasks.messages.InvalidMessage` (the task
fails with that text in its result and in the worker log) and nothing of it is stored or sent.
Dispatch receives the message bodies rather than ids so that the hot path never reads the store
(the embedded store has no range indexes); the store remains the record.
"""

from __future__ import annotations

import itertools
import logging
import os
import time
import uuid

from celery import states
from celery.backends.redis import RedisBackend
from celery.utils.time import get_exponential_backoff_interval
from celery_batches import Batches, SimpleRequest, consume_queue
from celery_batches.trace import apply_batches_task

import settings
from tasks import messages as validation, redis_transport
from tasks.batching import FlushGate
from tasks.queues import COLLECT_QUEUE
from tasks.dispatch import DISPATCH_RETRYABLE, dispatch, route
from tasks.ids import IdGenerator
from tasks.store import StoreUnavailable, get_store
from worker import app

log = logging.getLogger(__name__)

class _ProcessState:
    """Per-process state of the collect tasks: an id generator (its random tag must differ in
    every prefork child, so it is made after the fork)."""

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.ids = IdGenerator()


_state: _ProcessState | None = None


def _process() -> _ProcessState:
    global _state
    if _state is None or _state.pid != os.getpid():
        _state = _ProcessState()
    return _state


def _persist_and_dispatch(valid: list[validation.Message], key: str) -> list[str]:
    """Store and dispatch the messages of one ``collect_many`` task, all under one key."""
    state = _process()
    store = get_store()
    fresh = state.ids.next_ids(len(valid))
    (ids,) = store.claim_many([(key, fresh)])
    if len(ids) != len(valid):
        raise validation.InvalidMessage(f"idempotency key {key!r} was used before for {len(ids)} message(s), not {len(valid)}: use a new key per message")
    _store_and_route(store, ids, valid, fresh)
    return ids


def _persist_and_dispatch_keyed(pairs: list[tuple[validation.Message, str]]) -> list:
    """Store and dispatch one message per ``(message, key)``, each under its own key; returns per
    pair its id, or an InvalidMessage when its key was bound to a batch of another size."""
    store = get_store()
    fresh = _process().ids.next_ids(len(pairs))
    claimed = store.claim_many([(key, [mid]) for (_, key), mid in zip(pairs, fresh)])
    results: list = []
    ids, messages, seen = [], [], set()
    for (message, key), bound in zip(pairs, claimed):
        if len(bound) != 1:
            results.append(validation.InvalidMessage(f"idempotency key {key!r} was used before for {len(bound)} messages, not 1: use a new key per message"))
            continue
        results.append(bound[0])
        if bound[0] not in seen:  # the same key twice in one batch: store and send it once
            seen.add(bound[0])
            ids.append(bound[0])
            messages.append(message)
    _store_and_route(store, ids, messages, fresh)
    return results


def _store_and_route(store, ids: list[str], valid: list[validation.Message], fresh: list[str]) -> None:
    """Insert the messages ``ids`` and route them; ``fresh`` are the ids this run generated, so
    any other id was bound to its key by an earlier run (a task run again, or business code
    retrying): send what was stored under it, and store only what an interrupted earlier run
    never stored."""
    new = set(fresh)
    reused = [mid for mid in ids if mid not in new]
    stored = store.messages(reused) if reused else {}
    now = time.time()
    docs = [
        {"id": mid, "to": stored[mid]["to"], "data": stored[mid]["data"], "ts": now} if mid in stored
        else {"id": mid, "to": m.to if m.to == validation.BROADCAST else list(m.to), "data": m.data, "ts": now}
        for mid, m in zip(ids, valid)
    ]
    if not docs:
        return
    store.insert_messages(docs)
    try:
        route(docs)
    except DISPATCH_RETRYABLE as exc:
        log.warning("dispatching %d stored messages inline failed (%s); queued for tasks.dispatch", len(docs), exc)
        dispatch.apply_async(args=[docs])


def _validate(to, data, unexpected=None) -> validation.Message:
    return validation.validate(to, data, max_bytes=settings.MAX_MESSAGE_BYTES, max_recipients=settings.MAX_RECIPIENTS, unexpected=unexpected)


def _task_key(task) -> str:
    return f"task:{task.request.id or uuid.uuid4()}"


def _parse_collect(request) -> tuple[validation.Message, str]:
    """The message and idempotency key of one ``tasks.collect`` request; raises InvalidMessage."""
    kwargs = dict(request.kwargs or {})
    if request.args:
        raise validation.InvalidMessage("tasks.collect takes keyword arguments only: kwargs={\"to\": ..., \"data\": ...}")
    to = kwargs.pop("to", validation.MISSING)
    data = kwargs.pop("data", validation.MISSING)
    key = kwargs.pop("key", None)
    message = _validate(to, data, kwargs)
    if key is not None and (not isinstance(key, str) or not key or len(key) > 200):
        raise validation.InvalidMessage(f'"key" must be a non-empty string of at most 200 characters, got {key!r:.60}')
    return message, f"key:{key}" if key is not None else f"task:{request.id or uuid.uuid4()}"


class CollectBatches(Batches):
    """celery-batches' task class, plus what a plain Celery task gives operators and callers.

    Worker main process (``flush``) and pool process (``run``).  celery-batches acks every
    request of a batch once the batch returns, whatever happened, so the batch function never
    lets an error escape: it records a result per request (an id, a failure, or a retry sent
    first).  ``flush`` also sends, when events are on (Flower), ``task-received`` for each
    request and ``task-succeeded``/``task-failed``/``task-retried`` per request from the
    outcome the batch returns, so Flower lists every ``tasks.collect`` as a task of its own.
    The requests of a batch are acked together (:func:`tasks.redis_transport.acknowledge`: one
    round trip on the Redis broker instead of one per request).
    """

    abstract = True

    def __init__(self) -> None:
        super().__init__()
        self._gate = FlushGate()
        self._hub = None  # the worker's event loop (kombu's Hub), or None without one
        self._flush_pending = False

    def Strategy(self, task, app, consumer):
        """Called when the worker's consumer starts, and again each time it reconnects to the
        broker.  Requests still buffered then came on the old connection: the broker gives their
        messages back (Redis restores them, RabbitMQ requeues them), so they are dropped here
        rather than run and then fail to ack; and the flush timer is started afresh with the
        next request, so a reconnection cannot leave requests waiting for a timer that is gone."""
        if self._tref is not None:
            self._tref.cancel()
            self._tref = None
        dropped = len(list(consume_queue(self._buffer))) + len(list(consume_queue(self._pending)))
        if dropped:
            log.warning("tasks.collect: consumer restarted; %d buffered requests left to the broker, which delivers them again", dropped)
        self._count = itertools.count(1)
        self._gate.reset()
        self._flush_pending = False
        self._hub = consumer.hub
        on_message = super().Strategy(task, app, consumer)

        def buffer_then_flush_when_free(*args, **kwargs):
            on_message(*args, **kwargs)
            self._flush_when_free()

        return buffer_then_flush_when_free

    def _flush_when_free(self) -> None:
        """Run what is buffered as a batch if the gate lets one go: on the loop's next turn, so
        that the requests read from the broker in this turn go together (on the Redis broker a
        worker reads a whole backlog in one turn)."""
        if self._flush_pending or self._buffer.empty() or not self._gate.may_flush():
            return
        if self._hub is None:
            self._do_flush()
            return
        self._flush_pending = True
        self._hub.call_soon(self._flush_now)

    def _flush_now(self) -> None:
        self._flush_pending = False
        if not self._buffer.empty() and self._gate.may_flush():
            self._do_flush()

    def _batch_done(self, token) -> None:
        """A batch returned: what gathered while it ran may go (through the loop: the threads
        pool calls this on its own thread).  Without an event loop (green pools) it goes with
        the next request or the timer instead."""
        self._gate.finished(token)
        if self._hub is not None:
            self._flush_when_free()

    def flush(self, requests):
        requests = list(requests)
        serializable = ([SimpleRequest.from_request(r) for r in requests],)
        for req in requests:
            req.send_event("task-received", name=req.name, args=str(req.args), kwargs=str(req.kwargs), retries=req.request_dict.get("retries", 0))
            req.send_event("task-started")
        started = time.monotonic()
        token = self._gate.started()

        def on_return(outcomes) -> None:
            try:
                runtime = time.monotonic() - started
                outcomes = outcomes or {}
                for req in requests:
                    kind, value = outcomes.get(req.id, ("failed", "the batch did not run: see the worker log"))
                    if kind == "ok":
                        req.send_event("task-succeeded", result=repr(value), runtime=runtime)
                    elif kind == "retry":
                        req.send_event("task-retried", exception=value, traceback="")
                    else:
                        req.send_event("task-failed", exception=value, traceback="")
                redis_transport.acknowledge(requests)
            finally:
                self._batch_done(token)

        def on_lost(_exc_info) -> None:
            # The pool process died with the batch: its requests stay unacknowledged, and the
            # broker gives them back (Redis after VISIBILITY_TIMEOUT, RabbitMQ when the
            # connection closes); only the slot is freed here.
            self._batch_done(token)

        return self._pool.apply_async(apply_batches_task, (self, serializable, 0, None), callback=on_return, error_callback=on_lost)


#: How often a request whose batch could not reach the store is sent again before it fails.
COLLECT_MAX_RETRIES = 5


@app.task(name="tasks.collect", base=CollectBatches, bind=True, acks_late=True,
          flush_every=settings.COLLECT_BATCH, flush_interval=settings.COLLECT_FLUSH_SECONDS)
def collect(self, requests) -> dict[str, tuple[str, str]]:
    """Store and dispatch a batch of ``tasks.collect`` requests; each request's result is its
    message id.  Business code calls it as one task per message::

        collect.delay(to="alice", data={...}, key="order-42")   # key: optional, idempotency

    The worker runs what it has buffered as soon as no other batch of it runs (at most
    ``COLLECT_BATCH`` requests; while one runs, requests wait for it to return, or
    ``COLLECT_FLUSH_SECONDS`` at most) and runs them here together: one claim of their keys, one insert,
    one route lookup and one queue message per node for the whole batch.  ``key``: a non-empty
    string of at most 200 characters; a request with a key used before returns the same id and
    stores and sends nothing new.  An invalid request fails alone, with the reason in its result.

    Returns ``{task id: (outcome, detail)}`` for :class:`CollectBatches` (outcome ``ok``,
    ``failed`` or ``retry``); callers read each request's own result.
    """
    outcomes: dict[str, tuple[str, str]] = {}
    parsed: list[tuple[object, validation.Message, str]] = []
    for req in requests:
        try:
            message, key = _parse_collect(req)
            parsed.append((req, message, key))
        except validation.InvalidMessage as exc:
            log.warning("tasks.collect %s rejected: %s", req.id, exc)
            outcomes[req.id] = ("failed", f"InvalidMessage: {exc}")
            _store_result(req, exc, failed=True)
    if not parsed:
        return outcomes
    try:
        ids = _persist_and_dispatch_keyed([(message, key) for _, message, key in parsed])
    except StoreUnavailable as exc:
        for req, _, _ in parsed:
            outcomes[req.id] = _retry(self, req, exc)
        return outcomes
    except Exception as exc:  # noqa: BLE001 - record a failure per request rather than lose them silently
        log.exception("tasks.collect: a batch of %d failed", len(parsed))
        for req, _, _ in parsed:
            outcomes[req.id] = ("failed", f"{type(exc).__name__}: {exc}")
            _store_result(req, exc, failed=True)
        return outcomes
    done = []
    for (req, message, _), message_id in zip(parsed, ids):
        if isinstance(message_id, validation.InvalidMessage):
            outcomes[req.id] = ("failed", f"InvalidMessage: {message_id}")
            _store_result(req, message_id, failed=True)
        else:
            outcomes[req.id] = ("ok", message_id)
            done.append((req, message_id))
    _store_results(done)
    log.debug("collected %d messages in one batch", len(parsed))
    return outcomes


def _store_result(req, value, failed: bool = False) -> None:
    if getattr(req, "ignore_result", False) or not req.id:
        return
    try:
        if failed:
            app.backend.mark_as_failure(req.id, value, request=req)
        else:
            app.backend.mark_as_done(req.id, value, request=req)
    except Exception as exc:  # noqa: BLE001 - the message itself is stored and sent; only the answer is lost
        log.warning("tasks.collect %s: result not stored (%s)", req.id, exc)


def _store_results(done: list[tuple[object, str]]) -> None:
    """Store each request's message id as its SUCCESS result.  With Celery's Redis backend, in
    one pipeline (SET with its expiry and PUBLISH per result, what ``mark_as_done`` sends, without its prior GET
    that only guards a SUCCESS against being overwritten: here a rerun writes the same id); with
    any other backend, ``mark_as_done`` one by one."""
    done = [(req, mid) for req, mid in done if req.id and not getattr(req, "ignore_result", False)]
    backend = app.backend
    if not isinstance(backend, RedisBackend) or not done:
        for req, message_id in done:
            _store_result(req, message_id)
        return
    try:
        with backend.client.pipeline(transaction=False) as pipe:
            for (req, message_id), meta in zip(done, _success_metas(backend, done)):
                key, value = backend.get_key_for_task(req.id), backend.encode(meta)
                pipe.set(key, value, ex=backend.expires or None)
                pipe.publish(key, value)
            pipe.execute()
    except Exception as exc:  # noqa: BLE001 - the messages are stored and sent; only the answers are lost
        log.warning("tasks.collect: %d results not stored (%s)", len(done), exc)


def _success_metas(backend, done: list[tuple[object, str]]) -> list[dict]:
    """The SUCCESS result meta of each ``(request, message id)``, as Celery's backend makes it
    (``_get_result_meta``, plus ``task_id``), with what the requests of a batch share (the time,
    the settings it reads) made once: per request it cost a quarter of storing the results.
    A request with a group, a parent or children, or ``result_extended`` on, gets Celery's own."""
    extended = backend.app.conf.find_value_for_key("extended", "result")
    shared = None
    metas = []
    for req, message_id in done:
        if extended or any(getattr(req, name, None) for name in ("group", "parent_id", "children")):
            meta = backend._get_result_meta(result=message_id, state=states.SUCCESS, traceback=None, request=req)
        else:
            if shared is None:
                shared = backend._get_result_meta(result=None, state=states.SUCCESS, traceback=None, request=req)
            meta = dict(shared, result=message_id)
        meta["task_id"] = req.id
        metas.append(meta)
    return metas


def _retry(task, req, exc: Exception) -> tuple[str, str]:
    """Send ``req`` again (same task id, same kwargs, so the same idempotency key) after a
    backoff; after ``COLLECT_MAX_RETRIES`` the request fails with ``exc``."""
    retries = int((req.request_dict or {}).get("retries") or 0)
    if retries >= COLLECT_MAX_RETRIES:
        log.error("tasks.collect %s failed after %d retries: %s", req.id, retries, exc)
        _store_result(req, exc, failed=True)
        return ("failed", f"{type(exc).__name__}: {exc}")
    countdown = get_exponential_backoff_interval(factor=1, retries=retries, maximum=30, full_jitter=True)
    try:
        task.apply_async(args=req.args, kwargs=req.kwargs, task_id=req.id, countdown=countdown, retries=retries + 1, queue=COLLECT_QUEUE)
    except Exception as send_exc:  # noqa: BLE001
        # Not sent: failing would lose the message; let the worker die instead so the broker
        # restores the unacked request.
        log.critical("tasks.collect %s: store unavailable (%s) and retry not sent (%s)", req.id, exc, send_exc)
        raise SystemExit(1) from send_exc
    log.warning("tasks.collect %s: store unavailable (%s); retry %d in %.1f s", req.id, exc, retries + 1, countdown)
    return ("retry", f"{type(exc).__name__}: {exc}")


@app.task(name="tasks.collect_many", bind=True, acks_late=True, autoretry_for=(StoreUnavailable,), retry_backoff=True, retry_backoff_max=30, max_retries=5)
def collect_many(self, messages=validation.MISSING, **unexpected) -> list:
    """Store a batch of messages with one insert and dispatch them with one task.

    Returns, in the order given, each message's id, or for an invalid item
    ``{"index": i, "error": "messages[i]: ..."}``; an invalid item rejects only itself.
    """
    if unexpected:
        raise validation.InvalidMessage(f"unexpected argument(s) {', '.join(sorted(unexpected))}: collect_many takes messages")
    if messages is validation.MISSING or not isinstance(messages, (list, tuple)):
        raise validation.InvalidMessage('"messages" must be a list of {"to": ..., "data": ...} items')
    results: list = [None] * len(messages)
    valid: list[validation.Message] = []
    positions: list[int] = []
    for index, item in enumerate(messages):
        try:
            if not isinstance(item, dict):
                raise validation.InvalidMessage(f"each item must be an object with to and data, got {type(item).__name__}")
            extra = {k: v for k, v in item.items() if k not in ("to", "data")}
            valid.append(_validate(item.get("to", validation.MISSING), item.get("data", validation.MISSING), extra))
            positions.append(index)
        except validation.InvalidMessage as exc:
            results[index] = {"index": index, "error": f"messages[{index}]: {exc}"}
            log.warning("collect_many rejected messages[%d]: %s", index, exc)
    if valid:
        for index, message_id in zip(positions, _persist_and_dispatch(valid, _task_key(self))):
            results[index] = message_id
    return results

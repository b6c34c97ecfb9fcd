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

``tasks.collect`` and ``tasks.collect_many`` are celery-batches tasks: the worker takes their
requests from the queue and runs several at once (one claim, one insert, one route lookup and one
queue message per node for the batch: up to ``COLLECT_BATCH`` ``tasks.collect``, or
``COLLECT_MANY_MESSAGES`` messages of ``tasks.collect_many``), so one task per message costs
about what ``collect_many`` does, and a node gets fewer, fuller queue messages when business code
sends many lists.  A batch goes to the pool as soon as no other batch of its task runs, and
requests gather only while one does (:mod:`tasks.batching`): a lone request does not wait for a
batch to fill.  Each request still has its own id, result and, when events are on, its own events
in Flower (:mod:`tasks.collectbatches`, the task class: what Celery gives any task of its own).

The tasks are idempotent, so they run with ``acks_late``: a worker killed mid-task leaves the task
on the queue and the next run gives back the same ids.  Each run first binds an idempotency key to
its ids in the store: the Celery task id, or the ``key`` business code passes to ``tasks.collect``
(so that a retry after a lost answer does not store the message twice).  A key is remembered as
long as messages are (``RETENTION_SECONDS``); a reused key returns the first message's id, sends
the stored message again (clients drop it by id) and stores nothing new.  Invalid input raises :class:`~tasks.messages.InvalidMessage` (the task
fails with that text in its result and in the worker log) and nothing of it is stored or sent.
Dispatch receives the message bodies rather than ids so that the hot path never reads the store
(the embedded store has no range indexes); the store remains the record.

How each request is read (its messages, its key, its result's form) is :mod:`tasks.collectrequests`'s;
what a key used before is told, and when a key whose first run stored nothing is bound anew,
:mod:`tasks.collectkeys`'s.
"""

from __future__ import annotations

import logging
import os
import time

from celery.exceptions import SoftTimeLimitExceeded
from celery.utils.time import get_exponential_backoff_interval

import redislogin
import settings
from tasks import batchresults, links, messages as validation, publishing, wirejson
from tasks.collectbatches import CollectBatches
from tasks.collectkeys import _claim_afresh, key_reused, key_reused_for_another, same_message
from tasks.collectrequests import COLLECT_MANY_TASK, _parse_request, _task_of
from tasks.queues import COLLECT_QUEUE, DISPATCH_QUEUE, by_size
from tasks.dispatch import DISPATCH_RETRYABLE, dispatch, route
from tasks.dispatch import clock as dispatch_clock
from tasks.ids import IdGenerator
from tasks.store import StoreUnavailable, get_store
from worker import app

log = logging.getLogger(__name__)


class _ProcessState:
    """Per-process state of the collect tasks: an id generator (its random tag must differ in
    every prefork child, so it is made after the fork)."""

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.ids = IdGenerator(clock=dispatch_clock.now)  # Redis's: ids are compared across workers


_state: _ProcessState | None = None


def _process() -> _ProcessState:
    global _state
    if _state is None or _state.pid != os.getpid():
        _state = _ProcessState()
    return _state


def _persist_and_dispatch_groups(groups: list[tuple[list[validation.Message], str]], patient: bool = True,
                                 retried: frozenset[str] | set[str] = frozenset()) -> list:
    """Store and dispatch each group of messages under its own idempotency key, all of them with
    one claim, one insert and one route; returns per group its ids, or an InvalidMessage when
    its key was bound before to another number of messages.  ``patient``: see :func:`_hand_off`.
    ``retried``: the keys of requests this worker sent again (:func:`_retry`), whose earlier run
    has ended (:func:`_claim_afresh`)."""
    store = get_store()
    fresh = _process().ids.next_ids(sum(len(messages) for messages, _ in groups))
    wanted, at = [], 0
    for messages, key in groups:
        wanted.append((key, fresh[at:at + len(messages)]))
        at += len(messages)
    results: list = []
    ids, messages_out, keys_out, seen = [], [], [], {}
    for (messages, key), bound in zip(groups, _claim_afresh(store, wanted, store.claim_many(wanted), retried)):
        if len(bound) != len(messages):
            results.append(key_reused(key, len(bound), len(messages)))
            continue
        results.append(bound)
        for message_id, message in zip(bound, messages):
            if message_id in seen:  # the same key twice in one batch: store and send it once
                first = seen[message_id]
                if not same_message({"to": first.to if first.to == validation.BROADCAST else list(first.to), "data": first.data}, message):
                    log.warning("%s", key_reused_for_another(key, message_id))
                continue
            seen[message_id] = message
            ids.append(message_id)
            messages_out.append(message)
            keys_out.append(key)
    _store_and_route(store, ids, messages_out, fresh, patient, keys_out)
    return results


def _store_and_route(store, ids: list[str], valid: list[validation.Message], fresh: list[str], patient: bool = True,
                     keys: list[str] | None = None) -> None:
    """Insert the messages ``ids`` and route them; ``fresh`` are the ids this run generated, so
    any other id was bound to its key by an earlier run (a task run again, or business code
    retrying): send what was stored under it, and store only what an interrupted earlier run
    never stored.  A stored message other than the request's (its key, ``keys``, reused for
    another message) is logged: it is what is sent, and the request's own is lost."""
    new = set(fresh)
    reused = [mid for mid in ids if mid not in new]
    stored = store.messages(reused) if reused else {}
    _warn_of_reused_keys(stored, ids, valid, keys)
    now = time.time()
    docs = [
        {"id": mid, "to": stored[mid]["to"], "data": stored[mid]["data"], "ts": now} if mid in stored
        else {"id": mid, "to": m.to if m.to == validation.BROADCAST else list(m.to), "data": m.data, "ts": now}
        for mid, m in zip(ids, valid)
    ]
    if not docs:
        return
    inserted = store.insert_messages(docs)
    # An id that neither was stored when read above nor is inserted now was stored meanwhile by
    # another run of its key (sent again while its first run was between its claim and its
    # insert, in another pool process or worker): what that run stored is what goes, never this
    # run's copy, which the store did not take.
    raced = [mid for mid in ids if mid not in inserted and mid not in stored]
    if raced:
        stored_meanwhile = store.messages(raced)
        _warn_of_reused_keys(stored_meanwhile, ids, valid, keys)
        docs = [{**doc, "to": stored_meanwhile[doc["id"]]["to"], "data": stored_meanwhile[doc["id"]]["data"]} if doc["id"] in stored_meanwhile else doc
                for doc in docs]
    _hand_off(docs, patient)


def _warn_of_reused_keys(stored: dict[str, dict], ids: list[str], valid: list[validation.Message], keys: list[str] | None) -> None:
    """Log each request whose key names a ``stored`` message other than its own."""
    for mid, message, key in zip(ids, valid, keys or ()):
        if mid in stored and not same_message(stored[mid], message):
            log.warning("%s", key_reused_for_another(key, mid))


def _hand_off(docs: list[dict], patient: bool = True) -> None:
    """Route the stored ``docs`` inline or, when that fails, queue them for ``tasks.dispatch``.

    When both fail (Redis is down and is also the broker, or RabbitMQ is down), the messages are
    stored but no node and no queue has them: this waits for Redis or the broker, with the policy
    the batch's results are written with (:func:`tasks.batchresults.while_redis_is_down`), and tries both again.
    Failing at once would fail the requests of messages that are stored, and business code sending
    again without its ``key`` would store them twice.  Not ``patient`` (a request run eagerly, in
    the caller's process), it fails at once, as such a request does when the store is down."""
    def attempt() -> None:
        try:
            route(docs)
        except (*DISPATCH_RETRYABLE, SoftTimeLimitExceeded) as exc:
            # The soft time limit (--soft-time-limit) too: the messages are stored, and failing
            # their requests would have business code send them again under new ids.
            why = "the soft time limit" if isinstance(exc, SoftTimeLimitExceeded) else redislogin.explain(exc, redislogin.variables_of(exc))
            log.warning("dispatching %d stored messages inline failed (%s); queued for tasks.dispatch", len(docs), why)
            # send_task, not apply_async: under task_always_eager that runs tasks.dispatch here,
            # which fails the same way, is retried eagerly and returns a failed result without
            # raising, so the request succeeded with its messages neither routed nor queued.
            # One task, so that its messages keep their order (several would retry apart); too big
            # for one broker message (tasks.queues.by_size), it names them and Dispatch reads
            # their data from the store.
            handed = docs if len(by_size(docs)) == 1 else [{"id": doc["id"], "to": doc["to"]} for doc in docs]
            with publishing.producer(app) as producer:
                app.send_task(dispatch.name, args=[handed], queue=DISPATCH_QUEUE, producer=producer, serializer=wirejson.SERIALIZER)

    if not patient:
        attempt()
        return
    batchresults.while_redis_is_down(attempt, lambda exc: isinstance(exc, DISPATCH_RETRYABLE), f"{len(docs)} stored messages", "routed or queued for tasks.dispatch")


#: How often a request whose batch could not reach the store is sent again before it fails.
COLLECT_MAX_RETRIES = 5


@app.task(name="tasks.collect", base=CollectBatches, bind=True, acks_late=True,
          flush_every=settings.COLLECT_BATCH, flush_interval=settings.COLLECT_FLUSH_SECONDS)
def collect(self, requests) -> dict[str, tuple[str, object]]:
    """Store and dispatch a batch of ``tasks.collect`` requests; each request's result is its
    message id.  Business code calls it as one task per message::

        collect.delay(to="alice", data={...}, key="order-42")   # key: optional, idempotency

    The worker runs what it has buffered as soon as no other batch of it runs (at most
    ``COLLECT_BATCH`` requests; while one runs, requests wait for it to return, or
    ``COLLECT_FLUSH_SECONDS`` at most) and runs them here together: one claim of their keys, one insert,
    one route lookup and one queue message per node for the whole batch.  ``key``: a non-empty
    string of at most 200 characters; a request with a key used before returns the same id and
    stores and sends nothing new.  An invalid request fails alone, with the reason in its result.

    Returns ``{task id: (outcome, detail)}`` for :class:`CollectBatches` (outcome ``ok`` with the
    result, ``failed`` or ``retry`` with the exception); callers read each request's own result.
    """
    return _run_batch(self, requests, _parse_request)


def _run_batch(task, requests, parse) -> dict[str, tuple[str, object]]:
    """Store and dispatch the requests of one batch of ``task`` together; returns and stores each
    request's outcome.  ``parse(request)`` gives its valid messages, its idempotency key and a
    function from their ids to the request's result, or raises InvalidMessage (the request fails
    alone).  The batch may hold requests of the other task too (:func:`_task_of` says whose each
    is); ``task`` is the one whose batch function runs."""
    outcomes: dict[str, tuple[str, object]] = {}
    parsed = []
    for req in requests:
        try:
            parsed.append((req, *parse(req)))
        except validation.InvalidMessage as exc:
            log.warning("%s %s rejected: %s", req.name or task.name, req.id, exc)
            outcomes[req.id] = ("failed", exc)
            batchresults.store_result(req, exc, failed=True)
        except Exception as exc:  # noqa: BLE001 - a bug of validation: this request fails alone, not its batch
            log.exception("%s %s: validating it failed", req.name or task.name, req.id)
            outcomes[req.id] = ("failed", exc)
            batchresults.store_result(req, exc, failed=True)
    storing = [(req, messages, key, result) for req, messages, key, result in parsed if messages]
    done = [(req, result([])) for req, messages, _, result in parsed if not messages]
    # Logged before anything is stored or sent, so that whoever sees a result or a delivery
    # of this batch finds the line already written (the batching tests read it).
    if log.isEnabledFor(logging.DEBUG):
        log.debug("%s: %d requests, %d messages in one batch%s", task.name, len(requests), sum(len(m) for _, m, _, _ in storing),
                  _other_task_part(task, requests, storing))
    try:
        patient = not any(_eager(req) for req, *_ in storing)
        retried = {key for req, _, key, _ in storing if _retries(req)}
        bound = _persist_and_dispatch_groups([(messages, key) for _, messages, key, _ in storing], patient, retried) if storing else []
    except StoreUnavailable as exc:
        for req, *_ in storing:
            outcomes[req.id] = _retry(task, req, exc)
        storing, bound = [], []
    except Exception as exc:  # noqa: BLE001 - record a failure per request rather than lose them silently
        told = redislogin.retold(exc, redislogin.variables_of(exc))  # the login or rights refused: what to fix, as the result too
        if told is exc:
            log.exception("%s: a batch of %d failed", task.name, len(storing))
        else:
            log.error("%s: a batch of %d failed: %s", task.name, len(storing), told)
        exc = told
        for req, *_ in storing:
            outcomes[req.id] = ("failed", exc)
            batchresults.store_result(req, exc, failed=True)
        storing, bound = [], []
    for (req, _, _, result), ids in zip(storing, bound):
        if isinstance(ids, validation.InvalidMessage):
            log.warning("%s %s rejected: %s", req.name or task.name, req.id, ids)
            outcomes[req.id] = ("failed", ids)
            batchresults.store_result(req, ids, failed=True)
        else:
            done.append((req, result(ids)))
    for req, value in done:
        outcomes[req.id] = ("ok", value)
    batchresults.store_results(done)
    for req, value in done:
        links.chord_part_done(app, req, value)
        links.apply_followers(app, req, value)
    return outcomes


def _other_task_part(task, requests, storing) -> str:
    """For the batch line of :func:`_run_batch`: what of a batch of ``task`` is the other task's
    (its requests and the messages they store), or nothing when it holds none."""
    others = [req for req in requests if _task_of(req) != task.name]
    if not others:
        return ""
    ids = {req.id for req in others}
    return f" (of them {_task_of(others[0])}: {len(others)} requests, {sum(len(m) for req, m, _, _ in storing if req.id in ids)} messages)"


def _eager(req) -> bool:
    """Whether ``req`` runs eagerly, in the caller's process (``apply()``, ``task_always_eager``)."""
    return bool((getattr(req, "delivery_info", None) or {}).get("is_eager"))


def _retries(req) -> int:
    """How many times this worker sent ``req`` again (:func:`_retry`): 0 for a first run."""
    return int((req.request_dict or {}).get("retries") or 0)


def _retry(task, req, exc: Exception) -> tuple[str, object]:
    """Send ``req`` again (same task id, same kwargs, so the same idempotency key) after a
    backoff; after ``COLLECT_MAX_RETRIES`` the request fails with ``exc``.  It goes again as a
    request of its own task, whichever task's batch it ran in."""
    task = app.tasks.get(_task_of(req)) or task
    retries = _retries(req)
    eager = _eager(req)  # run in the caller's process: it fails at once
    if eager or retries >= COLLECT_MAX_RETRIES:
        log.error("%s %s failed %s: %s", task.name, req.id, "(run eagerly, no retry)" if eager else f"after {retries} retries", exc)
        batchresults.store_result(req, exc, failed=True)
        return ("failed", exc)
    countdown = get_exponential_backoff_interval(factor=1, retries=retries, maximum=30, full_jitter=True)
    _mark_as_retry(req, exc)
    try:
        with publishing.producer(app) as producer:
            task.apply_async(args=req.args, kwargs=req.kwargs, task_id=req.id, countdown=countdown, retries=retries + 1, queue=COLLECT_QUEUE,
                             producer=producer, **links.retry_options(req))
    except Exception as send_exc:  # noqa: BLE001
        # Not sent: failing would lose the message; let the worker die instead so the broker
        # restores the unacked request.
        log.critical("%s %s: store unavailable (%s) and retry not sent (%s)", task.name, req.id, exc, send_exc)
        raise SystemExit(1) from send_exc
    log.warning("%s %s: store unavailable (%s); retry %d in %.1f s", task.name, req.id, exc, retries + 1, countdown)
    return ("retry", exc)


def _mark_as_retry(req, exc: Exception) -> None:
    """Store ``req``'s state as ``RETRY`` with ``exc``, as Celery's own retry does, so that a caller
    that looks (``AsyncResult(id).state``, ``.info``) sees why it waits instead of ``PENDING``.
    Before the request is sent again: a rerun's ``SUCCESS`` is never overwritten by it (Celery's
    backends keep a ``SUCCESS``).  Not when it asked for no result."""
    if not req.id or getattr(req, "ignore_result", False):
        return
    try:
        app.backend.mark_as_retry(req.id, exc, request=req)
    except Exception as store_exc:  # noqa: BLE001 - only the caller's view of the wait is lost
        log.warning("%s: its RETRY state was not stored (%s)", req.id, store_exc)


#: The most messages one batch of ``tasks.collect_many`` requests stores and routes; the requests
#: of a bigger batch go to the pool as several.  Also the most envelopes a node gets in one queue
#: message from one batch (when every recipient is on it; :func:`tasks.queues.by_size` splits it
#: by bytes).  Since a user's requests never run in two batches at once, the several batches of
#: one flush that name the same users run one after the other, each with its own claim, insert,
#: route lookup, publish and hand-overs between the worker's processes: at 1,000, lists of 100
#: to 200 users sent faster than the worker stores them went through in flushes of four or five
#: such batches in a row.  4,000 (``bench/compare.py``, 2026-12-07, runs of one machine state):
#: 24,216-27,957 delivered msg/s at 2 nodes against 19,731-22,136, the nodes' CPU per delivery
#: 10.8-13.5 µs against 16.2-20.1 (each node message carries 1,429 envelopes, not 476); 10,000
#: delivered no more (19,213-25,570: fewer, longer batches overlap less with the nodes' and the
#: clients' work).  No new largest batch: one request alone may hold ``COLLECT_MANY_MAX_ITEMS``
#: (10,000) messages, and goes alone.  What a bigger batch costs is at a warm shutdown, which
#: finishes the batches running and those just sent to a pool process (``tasks.prefork``): it
#: waits for one batch of up to this many messages per process.
COLLECT_MANY_MESSAGES = 4000


@app.task(name=COLLECT_MANY_TASK, base=CollectBatches, bind=True, acks_late=True,
          flush_every=settings.COLLECT_BATCH, flush_interval=settings.COLLECT_FLUSH_SECONDS, batch_messages=COLLECT_MANY_MESSAGES)
def collect_many(self, requests) -> dict[str, tuple[str, object]]:
    """Store a list of messages with one insert and dispatch them at once.  Business code calls::

        collect_many.delay(messages=[{"to": "alice", "data": 1}, {"to": "bob", "data": 2}])

    Each request's result is, in the order given, each message's id, or for an invalid item
    ``{"index": i, "error": "messages[i]: ..."}``; an invalid item rejects only itself.  Its
    idempotency key is its task id: a request run again returns the same ids.

    Batched like ``tasks.collect``: the worker runs the requests that gathered while it was busy
    together (one claim, one insert, one route lookup and one queue message per node), up to
    :data:`COLLECT_MANY_MESSAGES` messages per batch.  Returns ``{task id: (outcome, detail)}``
    for :class:`CollectBatches`.
    """
    return _run_batch(self, requests, _parse_request)



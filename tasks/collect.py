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
"""

from __future__ import annotations

import logging
import os
import time
import uuid

from celery.exceptions import SoftTimeLimitExceeded
from celery.utils.time import get_exponential_backoff_interval

import redislogin
import settings
from tasks import batchresults, links, messages as validation, publishing, wirejson
from tasks.collectbatches import CollectBatches
from tasks.queues import COLLECT_QUEUE, DISPATCH_QUEUE, by_size
from tasks.dispatch import DISPATCH_RETRYABLE, dispatch, route
from tasks.dispatch import clock as dispatch_clock
from tasks.ids import IdGenerator
from tasks.store import StoreUnavailable, get_store
from tasks.storedocs import as_stored
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


#: The idempotency key of a request without a ``key`` of its own: its task id, after this.
TASK_KEY_PREFIX = "task:"


def key_reused(key: str, before: int, now: int) -> validation.InvalidMessage:
    """The error of a request whose idempotency key was bound before to another number of
    messages: a ``key`` the caller gave, or (``task:...``) the task id it chose.  Pure."""
    fix = "send each new request with a new task id (Celery's default: leave task_id unset)" if key.startswith(TASK_KEY_PREFIX) else "use a new key per task"
    return validation.InvalidMessage(f"idempotency key {key!r} was used before for {before} message(s), not {now}: {fix}")


def same_message(stored: dict, message: validation.Message) -> bool:
    """Whether the stored ``{"to", "data"}`` is ``message`` (recipients in any order).  Pure."""
    if message.to == validation.BROADCAST or stored["to"] == validation.BROADCAST:
        same_to = message.to == stored["to"]
    else:
        same_to = set(message.to) == set(stored["to"])
    return same_to and same_json(stored["data"], as_stored(message.data))


def _json_kind(value: object) -> str:
    """A value's JSON type, telling ``true`` from ``1`` and ``1`` from ``1.0`` (the store gives
    64-bit integers back as ``bson.Int64``, an int).  Pure."""
    return "bool" if isinstance(value, bool) else "int" if isinstance(value, int) else "float" if isinstance(value, float) else \
        "object" if isinstance(value, dict) else "array" if isinstance(value, (list, tuple)) else type(value).__name__


def same_json(a: object, b: object) -> bool:
    """Whether ``a`` and ``b`` are the same JSON value, object keys in any order.  Python's ``==``
    says ``true`` is ``1``, ``1`` is ``1.0`` and ``-0.0`` is ``0.0``: a key reused with such other
    data was taken as a retry of the same message and its warning never logged.  Pure."""
    if _json_kind(a) != _json_kind(b):
        return False
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same_json(a[key], b[key]) for key in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same_json(x, y) for x, y in zip(a, b))
    if isinstance(a, float):
        return repr(a) == repr(b)
    return a == b


def key_reused_for_another(key: str, message_id: str) -> str:
    """The warning for a request whose idempotency key names a stored message other than its own
    (other recipients or data): what happened, and the fix.  Pure."""
    if key.startswith(TASK_KEY_PREFIX):
        named = f"task id {key[len(TASK_KEY_PREFIX):]!r}"
        fix = "send each new request with a new task id (Celery's default: leave task_id unset)"
    else:
        named = f"key {key.removeprefix('key:')!r}"
        fix = "give each message a key of its own"
    return (f"{named} was used before for message {message_id}, to other recipients or with other data: "
            f"that message was sent again and this request's was not stored; {fix}")


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


#: A key bound this long ago to ids none of which is stored belongs to a run that failed or died
#: between the two writes (each store operation gives up after 5 s): any run of the request may
#: bind it anew.  Also the longest a request the worker sends again itself (which may bind anew at
#: once) takes, five retries with backoff, to fail (README: the caller then sends it again).
STALE_CLAIM_SECONDS = 30.0


def _claim_afresh(store, wanted: list[tuple[str, list[str]]], claimed: list[list[str]], retried) -> list[list[str]]:
    """``claimed``, with the keys whose earlier ids are none of them stored bound to this run's
    ids (``wanted``) instead: a key of ``retried`` at once, any other once it was claimed
    ``STALE_CLAIM_SECONDS`` ago.

    Such a request's first run claimed its key and then could not store its messages (the store
    unavailable, or its worker killed between the two writes).  Stored now under that run's ids,
    up to minutes old, they would fall before the ``since`` of a device that saw a message stored
    meanwhile and resumes from it: the replay (which reaches ``RESUME_OVERLAP_MS`` back) skipped
    them.  Their new ids are from now, and no caller saw the old ones (a request's ids are its
    result, stored once it succeeds).  A request this worker sent again (:func:`_retry`) may at
    once: the run that sent it has ended, so none is about to store the old ids.  Any other
    (redelivered after its worker died, or sent again by business code after it failed) only once
    the claim is too old to be a run still between its two writes."""
    stale: dict[str, tuple[list[str], list[str]]] = {}
    for (key, mine), bound in zip(wanted, claimed):
        if key not in stale and bound != mine and len(bound) == len(mine):
            stale[key] = (bound, mine)
    if not stale:
        return claimed
    stored = store.messages([mid for old, _ in stale.values() for mid in old], {"_id": 1})
    cutoff = time.time() - STALE_CLAIM_SECONDS
    tried = [(key, old, new, None if key in retried else cutoff) for key, (old, new) in stale.items() if not any(mid in stored for mid in old)]
    if not tried:
        return claimed
    rebound = store.rebind_keys(tried)
    for key in rebound:
        log.info("idempotency key %r: its first run stored none of its messages (%s); bound to new ids from now (%s)",
                 key, ", ".join(stale[key][0]), ", ".join(stale[key][1]))
    current = {key: stale[key][1] for key in rebound}
    # A key another run rebound first (the compare-and-set lost), or claimed too recently: its ids
    # as they are now, which may be that other run's (not the old ones, which that run no longer
    # stores: two ids for one message, delivered twice).
    lost = [(key, new) for key, _, new, _ in tried if key not in rebound]
    current.update(zip((key for key, _ in lost), store.claim_many(lost)))
    return [current.get(key, bound) for (key, _), bound in zip(wanted, claimed)]


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


def _validate(to, data, unexpected=None, takes: str = validation.COLLECT_TAKES) -> validation.Message:
    return validation.validate(to, data, max_bytes=settings.MAX_MESSAGE_BYTES, max_recipients=settings.MAX_RECIPIENTS, unexpected=unexpected, takes=takes)


#: A ``collect_many`` item's keys: the request is keyed by its task id, not per message.
_COLLECT_MANY_ITEM_TAKES = ("a collect_many item takes to and data only (the request is keyed by its task id): "
                            "send a message that needs a key of its own with tasks.collect")


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
    if key is not None and (problem := validation.not_unicode(key)) is not None:
        raise validation.InvalidMessage(f'"key" is not valid Unicode: it holds {problem}')
    return message, f"key:{key}" if key is not None else f"{TASK_KEY_PREFIX}{request.id or uuid.uuid4()}"


#: The name of ``tasks.collect_many``: a batch may hold requests of both tasks, parsed by their task's name.
COLLECT_MANY_TASK = "tasks.collect_many"

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


def _parse_collect_request(req):
    message, key = _parse_collect(req)
    return [message], key, lambda ids: ids[0]


def _parse_request(req):
    """What ``parse`` of :func:`_run_batch` gives for a request of either task, by its task's name:
    a batch may hold requests of both (:meth:`tasks.collectbatches.CollectBatches._do_flush`)."""
    return _parse_collect_many(req) if _task_of(req) == COLLECT_MANY_TASK else _parse_collect_request(req)


def _task_of(req) -> str:
    """The name of the task ``req`` is of (not its ``shadow`` name)."""
    return getattr(req, "task_name", None) or req.name


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
#: message from one batch (when every recipient is on it).
COLLECT_MANY_MESSAGES = 1000
#: The most items one ``tasks.collect_many`` request may hold; a longer list fails the request
#: whole, telling the sender to split it.  Without a bound, one request of a million items would be
#: one insert, one route lookup (a script that blocks Redis for every other client meanwhile) and
#: one result, held in the worker's memory all at once.  The same figure as ``MAX_RECIPIENTS``'s default.
COLLECT_MANY_MAX_ITEMS = 10_000


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


def _parse_collect_many(req):
    """The valid messages of one ``tasks.collect_many`` request, its key, and the function that
    makes its result (each item's id or error, in order) from their ids."""
    kwargs = dict(req.kwargs or {})
    args = tuple(req.args or ())
    if args:
        if len(args) > 1 or "messages" in kwargs:
            raise validation.InvalidMessage("tasks.collect_many takes one argument, messages: kwargs={\"messages\": [...]}")
        kwargs["messages"] = args[0]
    messages = kwargs.pop("messages", validation.MISSING)
    if kwargs:
        raise validation.InvalidMessage(f"unexpected argument(s) {validation.argument_names(kwargs)}: collect_many takes messages")
    if messages is validation.MISSING or not isinstance(messages, (list, tuple)):
        raise validation.InvalidMessage('"messages" must be a list of {"to": ..., "data": ...} items')
    if len(messages) > COLLECT_MANY_MAX_ITEMS:
        raise validation.InvalidMessage(f'"messages" has {len(messages)} items; at most {COLLECT_MANY_MAX_ITEMS} per tasks.collect_many '
                                        "request: split the list into several requests")
    results: list = [None] * len(messages)
    valid: list[validation.Message] = []
    positions: list[int] = []
    for index, item in enumerate(messages):
        try:
            if not isinstance(item, dict):
                raise validation.InvalidMessage(f"each item must be an object with to and data, got {type(item).__name__}")
            extra = {k: v for k, v in item.items() if k not in ("to", "data")}
            valid.append(_validate(item.get("to", validation.MISSING), item.get("data", validation.MISSING), extra, _COLLECT_MANY_ITEM_TAKES))
            positions.append(index)
        except validation.InvalidMessage as exc:
            results[index] = {"index": index, "error": f"messages[{index}]: {exc}"}
            log.warning("collect_many %s rejected messages[%d]: %s", req.id, index, exc)

    def result(ids: list[str]) -> list:
        for index, message_id in zip(positions, ids):
            results[index] = message_id
        return results

    return valid, f"{TASK_KEY_PREFIX}{req.id or uuid.uuid4()}", result

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

import settings
from tasks import messages as validation
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
    state = _process()
    store = get_store()
    fresh = state.ids.next_ids(len(valid))
    ids = store.claim_ids(key, fresh)
    if len(ids) != len(valid):
        raise validation.InvalidMessage(f"idempotency key {key!r} was used before for {len(ids)} message(s), not {len(valid)}: use a new key per message")
    # A key used before (a task run again, or business code retrying): send what was stored under
    # it, and store only what an interrupted earlier run never stored.
    stored = store.messages(ids) if ids != fresh else {}
    now = time.time()
    docs = [
        {"id": mid, "to": stored[mid]["to"], "data": stored[mid]["data"], "ts": now} if mid in stored
        else {"id": mid, "to": m.to if m.to == validation.BROADCAST else list(m.to), "data": m.data, "ts": now}
        for mid, m in zip(ids, valid)
    ]
    store.insert_messages(docs)
    try:
        route(docs)
    except DISPATCH_RETRYABLE as exc:
        log.warning("dispatching %d stored messages inline failed (%s); queued for tasks.dispatch", len(docs), exc)
        dispatch.apply_async(args=[docs])
    return ids


def _validate(to, data, unexpected=None) -> validation.Message:
    return validation.validate(to, data, max_bytes=settings.MAX_MESSAGE_BYTES, max_recipients=settings.MAX_RECIPIENTS, unexpected=unexpected)


def _task_key(task) -> str:
    return f"task:{task.request.id or uuid.uuid4()}"


@app.task(name="tasks.collect", bind=True, acks_late=True, autoretry_for=(StoreUnavailable,), retry_backoff=True, retry_backoff_max=30, max_retries=5)
def collect(self, to=validation.MISSING, data=validation.MISSING, key: str | None = None, **unexpected) -> str:
    """Store one message for ``to`` and dispatch it; returns its id.

    ``key``: optional idempotency key (a string of at most 200 characters); calling again with the
    same key returns the same id and stores and sends nothing new."""
    message = _validate(to, data, unexpected)
    if key is not None and (not isinstance(key, str) or not key or len(key) > 200):
        raise validation.InvalidMessage(f'"key" must be a non-empty string of at most 200 characters, got {key!r:.60}')
    (message_id,) = _persist_and_dispatch([message], f"key:{key}" if key is not None else _task_key(self))
    log.debug("collected %s for %s", message_id, message.to)
    return message_id


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

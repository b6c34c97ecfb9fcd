"""Collect: validate business messages, persist them, then hand them to Dispatch.

Worker process only.  Business code calls::

    collect.delay(to="alice", data={"text": "hi"})                 # -> message id
    collect.delay(to=["alice", "bob"], data=...)                   # one message, two recipients
    collect.delay(to="*", data=...)                                # every user online now
    collect_many.delay(messages=[{"to": ..., "data": ...}, ...])   # -> ids, in order

or, without importing this project, ``send_task("tasks.collect", kwargs=..., queue="collect")``.

A message is stored before it is dispatched: the store insert happens first, and only then is a
``tasks.dispatch`` queued.  Invalid input raises :class:`~tasks.messages.InvalidMessage` (the task
fails with that text in its result and in the worker log) and nothing of it is stored or sent.
Dispatch receives the message bodies rather than ids so that the hot path never reads the store
(the embedded store has no range indexes); the store remains the record.
"""

from __future__ import annotations

import logging
import os
import time

import settings
from tasks import messages as validation
from tasks.dispatch import dispatch
from tasks.ids import IdGenerator
from tasks.store import get_store
from worker import app

log = logging.getLogger(__name__)

PURGE_EVERY_SECONDS = 60.0


class _ProcessState:
    """Per-process state of the collect tasks: an id generator (its random tag must differ in
    every prefork child, so it is made after the fork) and the time of the last retention purge."""

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.ids = IdGenerator()
        self.last_purge = time.monotonic()


_state: _ProcessState | None = None


def _process() -> _ProcessState:
    global _state
    if _state is None or _state.pid != os.getpid():
        _state = _ProcessState()
    return _state


def _persist_and_dispatch(valid: list[validation.Message], key: str | None = None) -> list[str]:
    state = _process()
    ids = state.ids.next_ids(len(valid))
    now = time.time()
    docs = [{"id": mid, "to": m.to if m.to == validation.BROADCAST else list(m.to), "data": m.data, "ts": now} for mid, m in zip(ids, valid)]
    store = get_store()
    store.insert_messages([dict(doc, key=key) for doc in docs] if key else docs)
    dispatch.apply_async(args=[docs])
    if time.monotonic() - state.last_purge > PURGE_EVERY_SECONDS:
        state.last_purge = time.monotonic()
        purged = store.purge()
        if purged:
            log.info("purged %d records older than %d s", purged, settings.RETENTION_SECONDS)
    return ids


def _validate(to, data, unexpected=None) -> validation.Message:
    return validation.validate(to, data, max_bytes=settings.MAX_MESSAGE_BYTES, max_recipients=settings.MAX_RECIPIENTS, unexpected=unexpected)


@app.task(name="tasks.collect")
def collect(to=validation.MISSING, data=validation.MISSING, key: str | None = None, **unexpected) -> str:
    """Store one message for ``to`` and dispatch it; returns its id."""
    message = _validate(to, data, unexpected)
    if key is not None and not isinstance(key, str):
        raise validation.InvalidMessage(f'"key" must be a string idempotency key, got {type(key).__name__}')
    (message_id,) = _persist_and_dispatch([message], key)
    log.debug("collected %s for %s", message_id, message.to)
    return message_id


@app.task(name="tasks.collect_many")
def collect_many(messages=validation.MISSING, **unexpected) -> list:
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
        for index, message_id in zip(positions, _persist_and_dispatch(valid)):
            results[index] = message_id
    return results

"""What a request of ``tasks.collect`` or ``tasks.collect_many`` holds: its valid messages, its
idempotency key, and how its result is made from their ids; or the :class:`~tasks.messages.InvalidMessage`
that fails it alone.

One batch may hold requests of both tasks (:meth:`tasks.collectbatches.CollectBatches._do_flush`),
so each is read by the task it is of (:func:`_parse_request`).  Pure but for ``settings``
(``MAX_MESSAGE_BYTES``, ``MAX_RECIPIENTS``) and the log line of a rejected ``collect_many`` item;
worker process (a batch's, in the pool), any thread.  Its log lines are ``tasks.collect``'s, as
before this module was written apart.
"""

from __future__ import annotations

import logging
import uuid

import settings
from tasks import messages as validation
from tasks.collectkeys import TASK_KEY_PREFIX

log = logging.getLogger("tasks.collect")


#: The name of ``tasks.collect_many``: a batch may hold requests of both tasks, parsed by their task's name.
COLLECT_MANY_TASK = "tasks.collect_many"


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


def _parse_collect_request(req):
    message, key = _parse_collect(req)
    return [message], key, lambda ids: ids[0]


def _parse_request(req):
    """What ``parse`` of :func:`tasks.collect._run_batch` gives for a request of either task, by its task's name:
    a batch may hold requests of both (:meth:`tasks.collectbatches.CollectBatches._do_flush`)."""
    return _parse_collect_many(req) if _task_of(req) == COLLECT_MANY_TASK else _parse_collect_request(req)


def _task_of(req) -> str:
    """The name of the task ``req`` is of (not its ``shadow`` name)."""
    return getattr(req, "task_name", None) or req.name


#: The most items one ``tasks.collect_many`` request may hold; a longer list fails the request
#: whole, telling the sender to split it.  Without a bound, one request of a million items would be
#: one insert, one route lookup (a script that blocks Redis for every other client meanwhile) and
#: one result, held in the worker's memory all at once.  The same figure as ``MAX_RECIPIENTS``'s default.
COLLECT_MANY_MAX_ITEMS = 10_000

#: The most deliveries (each item's recipients, summed; ``"*"`` counts none) one
#: ``tasks.collect_many`` request may make, or ``MAX_RECIPIENTS`` when that is more (one message
#: to as many users as a message may name always fits); more fails the request whole, telling the
#: sender to split it.  Each delivery is a pending record in Redis, a receipt in the store and an
#: envelope on a node's queue: 10,000 items of 10,000 recipients each (each within its own bound)
#: were a hundred million of them from one request, minutes of the worker and gigabytes of Redis.
COLLECT_MANY_MAX_DELIVERIES = 100_000


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

    most = max(COLLECT_MANY_MAX_DELIVERIES, settings.MAX_RECIPIENTS)
    if (deliveries := sum(len(m.to) for m in valid if m.to != validation.BROADCAST)) > most:
        raise validation.InvalidMessage(f'"messages" name {deliveries} deliveries (recipients summed over the items); at most {most} per '
                                        "tasks.collect_many request: split the list into several requests")

    def result(ids: list[str]) -> list:
        for index, message_id in zip(positions, ids):
            results[index] = message_id
        return results

    return valid, f"{TASK_KEY_PREFIX}{req.id or uuid.uuid4()}", result

"""What an item of a queue's Redis list is to the broker channel (:mod:`tasks.redis_transport`):
a message as kombu stores one, one that lacks only kombu's bookkeeping (which the channel then
supplies), or an item that cannot be delivered (why, and the task id it names, if any).  Pure.

kombu's Redis channel reads two properties of a message that are its own bookkeeping, not the
task's: ``delivery_tag``, the key under which it records the message as unacknowledged (its
unacked hash and index; an ack removes that key, a restore pushes back what it recorded), and
``delivery_info``'s ``exchange`` and ``routing_key``, which kombu's record names as the message's
way back and Celery's request reads.  kombu's producer writes both as it publishes.  A producer
that is not Celery (a hand-built ``LPUSH``, a client in another language) may leave them out of an
otherwise valid Celery message; the channel's record does not need what ``delivery_info`` names
(it records the queue the message was read from: :func:`tasks.backlogread.record`), and a fresh
tag is as good as kombu's (a uuid4), so the channel supplies them (:func:`with_bookkeeping`),
before the message is recorded: the record, and what a restore pushes back, then hold them, and
the message comes back with the same tag, as any other.
"""

from __future__ import annotations

import json
from base64 import b64decode

from kombu.utils.json import loads

from tasks.envelopes import raw_task_id, usable_task_id


def _type(value: object) -> str:
    return type(value).__name__


def item_problem(payload: object) -> str | None:
    """Why ``payload``, an item of a queue's list decoded from JSON, is not a message as kombu's
    Redis channel stores one, with everything its ``Message`` and QoS read before a consumer sees
    it, or None: ``properties`` with a string ``delivery_tag`` and a ``delivery_info`` naming the
    exchange and routing key, ``headers`` that are an object, a ``content-type`` and
    ``content-encoding`` that are strings (each may be absent), and a body its ``body_encoding``
    decodes (none, utf-8 or base64).  Pure."""
    if not isinstance(payload, dict):
        return f"it is JSON of type {_type(payload)}, not an object"
    properties = payload.get("properties")
    if not isinstance(properties, dict):
        return f"its properties are of type {_type(properties)}, not an object"
    if not isinstance(properties.get("delivery_tag"), str):
        return f"its properties' delivery_tag is of type {_type(properties.get('delivery_tag'))}, not a string"
    info = properties.get("delivery_info")
    if not isinstance(info, dict) or "exchange" not in info or "routing_key" not in info:
        return "its properties' delivery_info is not an object with an exchange and a routing_key"
    if payload.get("headers") and not isinstance(payload["headers"], dict):
        return f"its headers are of type {_type(payload['headers'])}, not an object"  # kombu's Message reads headers.get("compression")
    for name in ("content-type", "content-encoding"):
        if not isinstance(payload.get(name) or "", str):
            return f"its {name} is of type {_type(payload[name])}, not a string"  # kombu's decoder looks the type up in a set and lowercases the encoding
    body, encoding = payload.get("body"), properties.get("body_encoding")
    if body and encoding and not (isinstance(encoding, str) and encoding.lower() == "utf-8"):
        if encoding != "base64":
            return f"its body_encoding is {encoding!r:.60}, not base64 or utf-8"
        if not isinstance(body, str):
            return f"its body is of type {_type(body)}, not the base64 text its body_encoding says"
        try:
            b64decode(body)  # as kombu's codec decodes it
        except ValueError:  # binascii.Error, and non-ASCII text
            return "its body is not valid base64, which its body_encoding says it is"
    return None


def kombu_message(raw: str) -> dict | None:
    """``raw`` decoded, if it is a message as kombu's Redis channel stores one
    (:func:`item_problem`); else None.  Pure."""
    try:
        payload = loads(raw)
    except Exception:  # noqa: BLE001 - kombu's decoder also rebuilds tagged values ({"__type__": "decimal", ...}),
        return None    # with hooks that raise what they raise; and deep nesting raises RecursionError
    return payload if item_problem(payload) is None else None


def with_bookkeeping(raw: str, queue: str, tag: str) -> str | None:
    """``raw``, a JSON object with a body, with the bookkeeping kombu's channel needs and it lacks
    supplied: ``properties.delivery_tag`` ``tag`` where it has none (or null), and
    ``delivery_info``'s ``exchange`` ``""`` and ``routing_key`` ``queue`` (the queue it was read
    from) where it has none; None when it lacks none of them, or is not such an object, or has them
    in a shape that is not kombu's (a tag that is not a string, properties or a delivery_info that
    are not objects: those are not filled in but refused, :func:`item_problem`).  Re-encoded with
    Python's json, which gives back every value as Python's reader read it: the channel reads
    it as it reads any item.  Pure."""
    try:
        payload = json.loads(raw)
    except (ValueError, TypeError, RecursionError):
        return None
    if not isinstance(payload, dict) or payload.get("body") is None:
        return None
    properties = payload.get("properties")
    properties = {} if properties is None else properties
    info = properties.get("delivery_info") if isinstance(properties, dict) else None
    info = {} if info is None else info
    if not isinstance(properties, dict) or not isinstance(info, dict):
        return None
    supplied = {}
    if properties.get("delivery_tag") is None:
        supplied["delivery_tag"] = tag
    missing = {key: value for key, value in (("exchange", ""), ("routing_key", queue)) if key not in info}
    if missing:
        supplied["delivery_info"] = {**info, **missing}
    if not supplied:
        return None
    payload["properties"] = {**properties, **supplied}
    return json.dumps(payload)


def route_back(payload: dict, queue: str) -> None:
    """Make the ``delivery_info`` of ``payload``, a message read from ``queue``'s list
    (:func:`kombu_message`), name the way back to ``queue`` (the default exchange, ``queue`` as the
    routing key) where its routing key is another: Celery's retry of a task publishes it again to
    the exchange and routing key its ``delivery_info`` names, and one that named gocelery's
    ``celery``, bound to nothing here, sent the retry nowhere (dropped, with a warning kombu logs),
    while its caller waited for ever.  A message Celery sent to ``queue`` names it already and is
    left as it is (what Flower and the task's request show).  In place; pure."""
    info = payload["properties"]["delivery_info"]
    if info.get("routing_key") != queue:
        info["exchange"], info["routing_key"] = "", queue


def item_task_id(raw: str) -> str | None:
    """The task id an item that cannot be delivered names, so that its failure is stored where its
    caller waits: its headers' ``id``, or the ``id`` of a protocol 1 body (as text, or base64 when
    its ``body_encoding`` says so: :func:`tasks.envelopes.raw_task_id`); None when it names none, or one a result cannot be stored under
    (:func:`tasks.envelopes.usable_task_id`).  Pure."""
    try:
        payload = json.loads(raw)
    except (ValueError, TypeError, RecursionError):
        return None
    if not isinstance(payload, dict):
        return None
    headers = payload.get("headers")
    if isinstance(headers, dict) and (task_id := usable_task_id(headers.get("id"))) is not None:
        return task_id
    body, properties = payload.get("body"), payload.get("properties")
    if isinstance(properties, dict) and properties.get("body_encoding") == "base64" and isinstance(body, str):
        try:
            body = b64decode(body)
        except ValueError:
            return None
    return raw_task_id(body)


def why_dropped(raw: str) -> tuple[str, dict | None]:
    """Why the item ``raw`` cannot be delivered, for its caller (:func:`item_problem`, or that
    it has no body, or is not JSON kombu's decoder reads), and its ``properties`` (where its caller
    waits: ``reply_to``), if it has them.  Pure."""
    try:
        payload = loads(raw)
    except Exception:  # noqa: BLE001 - as kombu_message
        return "it is not JSON that kombu's decoder reads", None
    properties = payload.get("properties") if isinstance(payload, dict) else None
    properties = properties if isinstance(properties, dict) else None
    # None: a message Python reads, which the read script recorded under another delivery tag
    # (bytes that are not UTF-8)
    problem = item_problem(payload) or "its delivery_tag is not UTF-8 text"
    if isinstance(payload, dict) and payload.get("body") is None:
        # without a body, the read supplies no bookkeeping: that is not what to tell
        problem = "it has no body" if "properties" in problem else f"it has no body, and {problem}"
    return problem, properties

"""Whether a message on a worker's task queues can become a Celery request, and the errors of one
that cannot.  Pure.

Celery's consumer reads a message's task name, task id and body without checking their shape, and
several shapes a message made by hand or by another client can have raised out of the worker's
event loop (see :mod:`tasks.taskmessages`, whose :class:`~tasks.taskmessages.Consumer` refuses
what :func:`envelope_problem` finds before Celery reads it).  :func:`depth_problem` is for
``tasks.collect``'s strategy, which pickles its batches for the pool in the main process.
"""

from __future__ import annotations

import json
import re

from kombu.exceptions import ContentDisallowed

from tasks.messages import MAX_DATA_DEPTH, InvalidMessage, nesting, not_unicode

#: C0 and C1 control characters, DEL, and the line and paragraph separators.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def _named(value: object) -> bool:
    return isinstance(value, str) and bool(value)


def _type(value: object) -> str:
    return type(value).__name__


def arguments_problem(args: object, kwargs: object, embed: object) -> str | None:
    """Why a request's ``args``, ``kwargs`` and ``embed`` are not a list, an object and an object
    (or null), or None.  Pure."""
    if isinstance(args, (list, tuple)) and isinstance(kwargs, dict) and isinstance(embed, (dict, type(None))):
        return None
    return f"its args, kwargs and embed are of types {_type(args)}, {_type(kwargs)} and {_type(embed)}"


#: Most levels of lists and objects this process accepts in what it pickles for its pool: a
#: request's headers (every task's), a protocol 1 body (Celery converts it here), and
#: ``tasks.collect``'s arguments (:func:`depth_problem`).  Pickling near Python's recursion limit
#: raised out of the worker's loop.
MAX_REQUEST_DEPTH = 200
#: The same for a protocol 1 body, whose chain nests about three levels per task (a chain of 100
#: tasks from an older client is about 300 deep, and pickles): still below where pickling fails.
MAX_PROTOCOL_1_BODY_DEPTH = 350

#: The longest ``timelimit`` accepted, in seconds (about 31 years): billiard adds it to the clock,
#: which a larger integer overflows (as a float, it raised out of the worker's loop).
MAX_TIME_LIMIT = 10**9


def envelope_problem(headers: object, body: object) -> str | None:
    """Why a message cannot become a Celery request, or None: one of protocol 2 (headers with a
    ``task`` name and an ``id``, a body ``[args, kwargs, embed]``), or of protocol 1 (no task
    header, a body with ``task``, ``id``, ``args`` and ``kwargs``; the headers it has override
    those fields, as in Celery), or a message that is not a
    task message at all (neither names a task), which Celery logs and discards itself.  Headers,
    nested more than ``MAX_REQUEST_DEPTH`` levels, and a protocol 1 body more than
    ``MAX_PROTOCOL_1_BODY_DEPTH``, are refused too (this process pickles them for its pool), and a
    ``retries`` that is not a whole number of 0 or more (``tasks.collect`` counts it as it sends a
    request again).  Pure."""
    if nesting(headers, MAX_REQUEST_DEPTH) > MAX_REQUEST_DEPTH:
        return f"its headers nest lists and objects more than {MAX_REQUEST_DEPTH} levels deep"
    if isinstance(body, dict) and nesting(body, MAX_PROTOCOL_1_BODY_DEPTH) > MAX_PROTOCOL_1_BODY_DEPTH:
        return f"its protocol 1 body nests lists and objects more than {MAX_PROTOCOL_1_BODY_DEPTH} levels deep (data may nest at most {MAX_DATA_DEPTH})"
    if not isinstance(headers, dict):
        return f"its headers are of type {_type(headers)}"
    if "task" in headers:
        fields = headers
        if isinstance(body, dict) and "args" in body:  # protocol 2 headers on a protocol 1 body, which Celery converts
            arguments = body.get("args"), body.get("kwargs", {}), None
        elif isinstance(body, (list, tuple)) and len(body) == 3:
            arguments = body
        else:
            return f"its body is of type {_type(body)}" + (f" with {len(body)} items" if isinstance(body, (list, tuple)) else "")
    elif isinstance(body, dict) and "task" in body:
        # Celery builds a protocol 1 message's request from its body's fields, then lets the
        # message's own headers override them (``hybrid_to_proto2``): a header left unchecked
        # here (a ``timelimit`` of 5, a list as ``shadow``) raised out of the worker's loop.
        fields, arguments = {**body, **headers}, (body.get("args", []), body.get("kwargs", {}), None)
    else:
        return None
    if not _named(fields["task"]):
        return f"its task name is of type {_type(fields['task'])}"
    if not _named(fields.get("id")):
        return "it has no task id"
    for name in ("id", "group", "root_id", "parent_id"):
        # JSON's \ud800 escapes carry a lone surrogate, which neither the store (the request's
        # key is its task id) nor Redis (its result's key) can encode: one such id failed every
        # request of its batch with UnicodeEncodeError, or left them all without a result.
        value = fields.get(name)
        if isinstance(value, str) and (problem := not_unicode(value)) is not None:
            return f"its {name} is not valid Unicode: it holds {problem}"
        # The worker's log lines show task ids (Celery's "received", the request's errors): one
        # holding a line break wrote lines of its own there, with any level and time.
        if isinstance(value, str) and (control := _CONTROL.search(value)) is not None:
            return f"its {name} holds the control character {control.group()!r}: ids are written into log lines"
    for limits in (fields.get("timelimit"), body.get("timelimit") if isinstance(body, dict) else None):  # Celery reads a hybrid's body too
        if not time_limits_ok(limits):
            return f"its timelimit header is {limits!r:.60}, not [hard, soft] (null or 0 to {MAX_TIME_LIMIT} seconds each)"
    for source in (fields, body) if isinstance(body, dict) else (fields,):  # as for timelimit
        if (problem := name_and_stamps_problem(source)) is not None:
            return problem
        retries = source.get("retries")
        if retries is not None and not (isinstance(retries, int) and not isinstance(retries, bool) and retries >= 0):
            # A batch that sent its requests again (the store unavailable) raised on it, and every
            # request of the batch was acked unstored.
            return f"its retries header is {retries!r:.60}, not a whole number of retries made (0 or more)"
    return arguments_problem(*arguments)


def name_and_stamps_problem(fields: dict) -> str | None:
    """Why a message's ``shadow``, ``stamped_headers`` and ``stamps`` are not what Celery sends (a
    task name, a list of header names, an object; each may be null), or None.  The worker's main
    process counts the request under its shadow name (a key of a dict) and looks each stamped
    header up in a dict when it checks whether the request was revoked, as it reads the request:
    anything else there (a list, a number) raised out of its loop and stopped the worker.  Pure."""
    shadow, stamped_headers, stamps = fields.get("shadow"), fields.get("stamped_headers"), fields.get("stamps")
    if shadow is not None and not isinstance(shadow, str):
        return f"its shadow (the task name to show) is of type {_type(shadow)}"
    if stamped_headers is not None and not (isinstance(stamped_headers, (list, tuple)) and all(isinstance(name, str) for name in stamped_headers)):
        return f"its stamped_headers header is {stamped_headers!r:.60}, not a list of header names"
    if stamps is not None and not isinstance(stamps, dict):
        return f"its stamps header is {stamps!r:.60}, not an object"
    return None


def time_limits_ok(limits: object) -> bool:
    """Whether a message's ``timelimit`` is absent (or empty: Celery reads that as none) or
    ``[hard, soft]``, each null or a number of seconds up to ``MAX_TIME_LIMIT``
    (``apply_async(time_limit=..., soft_time_limit=...)`` sends that).  Pure."""
    if not limits:
        return True
    return isinstance(limits, (list, tuple)) and len(limits) == 2 and all(
        limit is None or (isinstance(limit, (int, float)) and not isinstance(limit, bool) and 0 <= limit <= MAX_TIME_LIMIT)
        for limit in limits)


def depth_problem(raw: object, compressed: bool, payload: object, most: int) -> str | None:
    """Why a request's decoded body ``payload`` (its raw body: ``raw``) is too deep for this
    process to pickle for its pool: lists and objects nested more than ``most`` levels.  A raw
    body with fewer openers than that (and not compressed) needs no walk.  Pure."""
    if not compressed and isinstance(raw, (bytes, str)):
        bracket, brace = (b"[", b"{") if isinstance(raw, bytes) else ("[", "{")
        if raw.count(bracket) + raw.count(brace) <= most:
            return None
    if nesting(payload, most) <= most:
        return None
    return f"its arguments nest lists and objects more than {most} levels deep (data may nest at most {MAX_DATA_DEPTH})"


def task_id_of(headers: object, body: object) -> str | None:
    """The task id a message gives (its headers' or, in protocol 1, its body's), or None.  Pure."""
    for fields in (headers, body):
        if isinstance(fields, dict) and _named(fields.get("id")):
            return fields["id"]
    return None


#: The content type the worker decodes (kombu's ``json`` serializer): the only one it accepts.
JSON_CONTENT_TYPE = "application/json"
#: Longest undecoded body :func:`raw_task_id` parses for its task id.
MAX_RAW_ID_BODY = 1 << 20


def content_type_problem(content_type: object, body: object) -> str | None:
    """Why a message whose body kombu left undecoded (``body`` bytes or text: its content type was
    missing, or one kombu trusts without a decoder, such as ``application/data``) cannot be run, or
    None for a body that was decoded as JSON.  Celery took such a protocol 1 message for one that
    is not a task message at all ("Received and deleted unknown message"), and a protocol 2 one
    was refused as "its body is of type bytes".  Pure."""
    if not isinstance(body, (bytes, bytearray, str)) or content_type == JSON_CONTENT_TYPE:
        return None
    told = f"its content type is {content_type!r:.60}" if content_type else "it has no content type"
    return f"{told}, so its body was not decoded: send it as {JSON_CONTENT_TYPE} (content-encoding utf-8)"


def raw_task_id(body: object) -> str | None:
    """The task id in a protocol 1 body the worker did not decode (its content type missing, or
    one it refuses, such as ``application/json; charset=utf-8``), read as JSON for that id alone,
    so that its failure is stored where its caller waits; None when there is none, or none that
    :func:`envelope_problem` would let through (a control character, a lone surrogate).  Pure."""
    if not isinstance(body, (bytes, bytearray, str)) or len(body) > MAX_RAW_ID_BODY:
        return None
    try:
        fields = json.loads(body)
    except (ValueError, TypeError, RecursionError):
        return None
    return usable_task_id(task_id_of(None, fields))


def usable_task_id(value: object) -> str | None:
    """``value``, if it is a task id a failure can be stored under and logged: a string that is
    not empty and holds neither a lone surrogate nor a control character (as
    :func:`envelope_problem` requires); else None.  Pure."""
    if not _named(value) or not_unicode(value) is not None or _CONTROL.search(value):
        return None
    return value


def not_a_task_message(problem: str) -> InvalidMessage:
    return InvalidMessage(f"not a Celery task message: {problem}; expected a body [args (a list), kwargs (an object), "
                          "embed (an object)] and headers with the task's name and id: send it with Celery's send_task or apply_async")


def not_a_kombu_message(queue: str, problem: str) -> InvalidMessage:
    """The error of an item of ``queue``'s Redis list that names a task id but is not a message
    the broker channel can deliver (``problem``: :func:`tasks.queueitems.item_problem`).  Pure."""
    return InvalidMessage(
        f"not run: the item pushed to queue {queue!r:.100} is not a message the worker can read: {problem}; push a JSON object "
        '{"body": the base64 of the JSON [args, kwargs, embed], "content-type": "application/json", "content-encoding": "utf-8", '
        '"headers": {"task": the task\'s name, "id": the task id}, "properties": {"body_encoding": "base64"}} '
        "(a delivery_tag and delivery_info may be left out: the worker supplies them), or send it with Celery's send_task")


def not_run(exc: Exception) -> InvalidMessage:
    """The error of a message Celery refused before running it (an unreadable ``eta``, a content
    type the worker does not accept).  A sender whose serializer is not JSON (``pickle``,
    ``yaml``, ``msgpack``, set with ``task_serializer`` or ``serializer=``) is told to send JSON,
    which is all the worker reads: kombu's own text names only the type it refused.  Pure."""
    if isinstance(exc, ContentDisallowed):
        return InvalidMessage(f"not run: {exc}; the worker accepts JSON only: send it with Celery's default serializer, "
                              "json (task_serializer=\"json\", or serializer=\"json\" in apply_async)")
    return InvalidMessage(f"not run: {exc}")

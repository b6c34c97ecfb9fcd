"""Validation of business messages: what ``tasks.collect`` accepts.  Pure.

``validate(to, data)`` returns a :class:`Message` or raises :class:`InvalidMessage`, whose text says
what was expected, what arrived, and how to fix the call.  Nothing is stored or sent for an
invalid message.
"""

from __future__ import annotations

import functools
import inspect
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson

from auth.tokens import MAX_USER_ID_LENGTH, forbidden_character

BROADCAST = "*"
MAX_USER_ID_CHARS = MAX_USER_ID_LENGTH  # auth's rule: an id no token can carry gets no message
#: Most levels lists and objects may nest in ``data``: MongoDB refuses a document nested deeper
#: than 100 levels, and a message's ``data`` is a field of one.
MAX_DATA_DEPTH = 64
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
MISSING: Any = object()


class InvalidMessage(ValueError):
    """A business message that cannot be collected; retrying it unchanged fails again."""


def checked_arguments(task_name: str) -> Callable[[Callable], Callable]:
    """Decorate a task's function (under ``@app.task``) so that a request with missing, extra or
    unknown arguments fails with :class:`InvalidMessage`, naming what the task takes, as any other
    bad request of the caller's does (the task's ``throws``: one line at INFO), where Python's
    ``TypeError`` was logged as a worker ERROR with a traceback.  Business code that knows the
    task by name only sends its arguments unchecked.  The function keeps its signature, so that
    Celery still checks the calls of code that imports the task.  Pure."""
    def decorate(fun: Callable) -> Callable:
        signature = inspect.signature(fun)

        @functools.wraps(fun)
        def checked(*args, **kwargs):
            try:
                signature.bind(*args, **kwargs)
            except TypeError as exc:
                raise InvalidMessage(f"{task_name} takes ({', '.join(signature.parameters)}): {exc}") from None
            return fun(*args, **kwargs)

        checked.__signature__ = signature  # Celery reads it with getfullargspec, which does not follow __wrapped__
        return checked
    return decorate


@dataclass(frozen=True)
class Message:
    #: ``"*"`` for every user online now, else the recipients in the order given, without repeats.
    to: str | tuple[str, ...]
    data: Any
    #: ``data`` as compact JSON, measured against the size limit.
    data_json: str


def not_unicode(text: str) -> str | None:
    """Why ``text`` cannot be encoded as UTF-8 (it holds a lone surrogate, which JSON's ``\\ud800``
    escapes can carry), or None.  Pure."""
    try:
        text.encode()
    except UnicodeEncodeError as exc:
        return f"a lone surrogate {exc.object[exc.start:exc.end]!r} at position {exc.start}"
    return None


def check_user_id(value: object, where: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise InvalidMessage(f"{where} must be a non-empty string user id, got {value!r:.60}")
    if (char := forbidden_character(value)) is not None:
        raise InvalidMessage(f"{where} holds {char!r}: user ids have no whitespace, control, format or surrogate characters "
                             "(auth issues no token for such an id)")
    if len(value) > MAX_USER_ID_CHARS:
        raise InvalidMessage(f"{where} is {len(value)} characters long; user ids have at most {MAX_USER_ID_CHARS}")
    if value == BROADCAST:
        raise InvalidMessage(f'{where} is "*": to reach every user online, pass to="*" alone, not inside a list')
    return value


def recipients(to: object, max_recipients: int) -> str | tuple[str, ...]:
    if to is MISSING or to is None:
        raise InvalidMessage('"to" is missing: pass a user id, a list of user ids, or "*" for every user online')
    if to == BROADCAST:
        return BROADCAST
    if isinstance(to, str):
        return (check_user_id(to, '"to"'),)
    if not isinstance(to, (list, tuple)):
        raise InvalidMessage(f'"to" must be a user id, a list of user ids, or "*", got {type(to).__name__}')
    if not to:
        raise InvalidMessage('"to" is an empty list: name at least one user id')
    unique = tuple(dict.fromkeys(check_user_id(user, f'"to"[{i}]') for i, user in enumerate(to)))
    if len(unique) > max_recipients:
        raise InvalidMessage(f'"to" names {len(unique)} users; at most {max_recipients} per message (MAX_RECIPIENTS), split the list')
    return unique


#: ``json.dumps(data, allow_nan=False, ensure_ascii=False, separators=(",", ":"))`` without
#: building an encoder per call (``json.dumps`` reuses its own only for the default options): a
#: quarter of the cost for a small message.  It keeps no state between calls (any thread).
_strict_compact_json = json.JSONEncoder(allow_nan=False, ensure_ascii=False, separators=(",", ":")).encode


def nesting(value: object, most: int) -> int:
    """How many levels lists and objects nest in ``value`` (0 for anything else), counted up to
    ``most + 1`` at most.  Iterative, so any depth is safe to ask about.  Pure."""
    depth, level = 0, [value]
    while depth <= most:
        children: list = []
        containers = 0
        for item in level:
            if isinstance(item, dict):
                children += item.values()
            elif isinstance(item, (list, tuple)):
                children += item
            else:
                continue
            containers += 1
        if not containers:
            break
        depth += 1
        level = children
    return depth


#: The value types orjson encodes exactly as the standard library's strict encoder does
#: (``_strict_compact_json``), besides finite floats (below); exact types, not subclasses.
_PLAIN_SCALARS = frozenset((str, int, bool, type(None)))
#: The most characters a float takes as JSON, in the spelling of either encoder (they differ only
#: in some exponents: ``1e-05`` and ``1e-5``, ``2.5e-07`` and ``2.5e-7``).
_FLOAT_CHARS = 24


def scan(data: object) -> tuple[str | None, int | None]:
    """One walk of ``data``: why MongoDB cannot store it as a field of a message's document, or
    None (lists and objects nested more than :data:`MAX_DATA_DEPTH` levels, an integer beyond 64
    bits, an object key that is not a string or holds NUL); and the number of floats in it when
    every value is plain JSON (exact ``dict`` with ``str`` keys, ``list``, ``tuple``, ``str``,
    ``int``, ``bool``, ``None``, finite ``float``), else None (a subclass, a date, a NaN, a set
    ...), which :func:`encode_data` leaves to the standard library's encoder.  Iterative.  Pure."""
    depth, level = 0, [data]
    floats: int | None = 0
    while level:
        children: list = []
        containers = 0
        for item in level:
            kind = type(item)
            if kind is dict or isinstance(item, dict):
                for key in item:
                    if type(key) is not str or "\x00" in key:
                        if not isinstance(key, str) or "\x00" in key:
                            return f"has the object key {key!r:.40}: MongoDB stores keys that are strings without NUL", None
                        floats = None  # a str subclass: the standard library's encoder judges it
                children += item.values()
                if kind is not dict:
                    floats = None
            elif kind is list or kind is tuple or isinstance(item, (list, tuple)):
                children += item
                if kind is not list and kind is not tuple:
                    floats = None
            else:
                if isinstance(item, int) and not _INT64_MIN <= item <= _INT64_MAX:
                    return "holds an integer outside MongoDB's 64-bit range (-2**63 to 2**63 - 1): send larger numbers as strings", None
                if kind is float:
                    if floats is not None:
                        floats = floats + 1 if item - item == 0.0 else None  # NaN and infinities give NaN
                elif kind not in _PLAIN_SCALARS:
                    floats = None
                continue
            containers += 1
        if containers:
            depth += 1
            if depth > MAX_DATA_DEPTH:
                return f"nests lists and objects more than {MAX_DATA_DEPTH} levels deep (MongoDB stores at most 100 per document): flatten it, or send it as a string", None
        level = children
    return None, floats


def encode_data(data: object, max_bytes: int) -> str:
    """``data`` as compact JSON, or InvalidMessage saying why it cannot be a message's data.  The
    standard library's strict encoder is the rule; plain JSON (:func:`scan`) is encoded with orjson
    instead (1.2 µs against 2.6 for a small message), whose text is the same but for the spelling
    of some floats' exponents, and is taken only when it is within ``max_bytes`` in either
    spelling, so the verdict is always the standard library's."""
    if data is MISSING:
        raise InvalidMessage('"data" is missing: pass any JSON value, e.g. data={"text": "hi"}')
    problem, floats = scan(data)
    if problem is not None:
        raise InvalidMessage(f'"data" {problem}')
    if floats is not None:  # plain JSON: orjson's text is the standard library's, but for some floats' spelling
        try:
            plain = orjson.dumps(data)
        except orjson.JSONEncodeError:  # a lone surrogate: the standard library's path below says what
            plain = None
        if plain is not None and len(plain) + _FLOAT_CHARS * floats <= max_bytes:  # within the limit in either spelling
            return plain.decode()
    try:
        text = _strict_compact_json(data)
    except RecursionError:
        raise InvalidMessage('"data" is nested too deeply to be encoded as JSON') from None
    except (TypeError, ValueError) as exc:
        raise InvalidMessage(f'"data" is not JSON: {exc}; send only dicts, lists, strings, numbers, booleans and null') from None
    try:
        size = len(text.encode())
    except UnicodeEncodeError:
        raise InvalidMessage(f'"data" is not valid Unicode: its JSON holds {not_unicode(text)}') from None
    if size > max_bytes:
        raise InvalidMessage(f'"data" is {size} bytes as JSON; the limit is {max_bytes} (MAX_MESSAGE_BYTES): send a reference instead')
    return text


#: MongoDB's largest document (``maxBsonObjectSize``, 16 MiB); the store refuses a bigger message too.
MAX_DOCUMENT_BYTES = 16 * 1024 * 1024
#: What a message's document holds beside ``to`` and ``data``: its id, time and key.
_DOCUMENT_ROOM = 1024


def document_problem(to: str | tuple[str, ...], data: object, data_chars: int) -> str | None:
    """Why a message with these recipients and ``data`` (``data_chars`` characters as JSON) would
    not fit in one MongoDB document, or None.  BSON spends about 6 bytes per JSON character at
    most (a list of one-digit numbers; a character of a string takes at most 4), and 4 per
    character of a user id plus 16 per id: only a message that could pass the limit by 6.5 times
    that is encoded to measure it.  Pure."""
    users = () if to == BROADCAST else to
    bound = 6.5 * data_chars + sum(4 * len(user) + 16 for user in users)
    if bound <= MAX_DOCUMENT_BYTES - _DOCUMENT_ROOM:
        return None
    import bson  # pymongo's BSON codec, only for such large messages

    size = len(bson.encode({"to": list(users), "data": data}))
    if size <= MAX_DOCUMENT_BYTES - _DOCUMENT_ROOM:
        return None
    return (f"takes {size} bytes as a MongoDB document with its recipients, over the limit of {MAX_DOCUMENT_BYTES} "
            "(BSON takes about 6 times JSON's bytes for lists of small numbers): send less data, or fewer recipients per message")


#: What ``tasks.collect`` takes, for the error that names an unexpected argument.
COLLECT_TAKES = "collect takes to, data and optionally key"


def validate(to: object, data: object, *, max_bytes: int, max_recipients: int, unexpected: dict | None = None,
             takes: str = COLLECT_TAKES) -> Message:
    """``takes``: what the caller accepts, said after the unexpected arguments (a ``collect_many``
    item takes no ``key``: naming it as accepted there contradicted the error)."""
    if unexpected:
        raise InvalidMessage(f"unexpected argument(s) {argument_names(unexpected)}: {takes}")
    users = recipients(to, max_recipients)
    text = encode_data(data, max_bytes)
    if (problem := document_problem(users, data, len(text))) is not None:
        raise InvalidMessage(f"the message {problem}")
    return Message(users, data, text)


def argument_names(names) -> str:
    """Unexpected argument names for an error message, which the worker logs: each as its
    ``repr`` (a name holding a line break wrote a line of its own into the log, one that looked
    like the worker's), at most 10 of them and 40 characters each.  Pure."""
    shown = [repr(name)[:40] for name in sorted(names, key=str)[:10]]
    return ", ".join(shown) + (f" and {len(names) - 10} more" if len(names) > 10 else "")

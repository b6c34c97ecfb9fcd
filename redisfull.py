"""A Redis over ``maxmemory``: how every process tells that error from others.  Pure.

With ``maxmemory-policy noeviction`` (what the platform needs: an evicted lease or queued task is a
lost route or message), a full Redis answers every write that may use memory with ``OOM command
not allowed when used memory > 'maxmemory'`` (redis-py's ``OutOfMemoryError``, a
``ResponseError``, not a ``ConnectionError``) while reads, deletes and PING still work.  It is no
outage, and waiting helps only once an operator acts (or queues drain), so each process says so in
the words of :data:`HINT`, and retries it where it retries a Redis that does not answer.
"""

from __future__ import annotations

from redis.exceptions import OutOfMemoryError

#: What to tell an operator (and a caller) when Redis refused a write for lack of memory.
HINT = "Redis is out of memory (maxmemory): raise maxmemory or free memory"

#: The text of Redis's refusal, as it reaches us wrapped (a pipeline's error, kombu's OperationalError).
_REFUSAL = "used memory > 'maxmemory'"


def is_full(exc: BaseException) -> bool:
    """Whether ``exc`` is Redis refusing a write because it is over ``maxmemory``: redis-py's
    ``OutOfMemoryError``, or an error that carries its text (kombu wraps it in
    ``OperationalError`` when a publish fails)."""
    return isinstance(exc, OutOfMemoryError) or _REFUSAL in str(exc)


def explain(exc: BaseException) -> str:
    """``exc`` as text for a log line or an answer: prefixed with :data:`HINT` when it is a full Redis."""
    return f"{HINT} ({exc})" if is_full(exc) else str(exc)

"""The worker's result backend on Redis: Celery's, which also retries a write that Redis refuses
for now.  Any thread (Celery makes one backend per thread).

With ``result_backend_always_retry`` (``worker.py``) Celery's backend writes a result again, after
a growing, jittered sleep, only when Redis does not answer (its ``exception_safe_to_retry``: the
connection errors).  A Redis over ``maxmemory`` (:mod:`redisfull`) or demoted to a replica by a
failover (``READONLY``) refuses the write for a while too, and then takes it: such a result was
given up at once ('result not stored'), and a caller asking for it afterwards waited for ever.
:func:`refused_for_now` is the one rule for what a result write retries: every result Celery writes
(a plain task's, a failure written one at a time) and a batch's results
(:func:`tasks.batchresults.store_results`) go by it.

:func:`install` makes ``redis://``, ``rediss://`` and ``sentinel://`` result backends of an app
these classes (Celery's loader's ``override_backends``), its URL and settings unchanged.
"""

from __future__ import annotations

from celery.backends.redis import RedisBackend as CeleryRedisBackend
from celery.backends.redis import SentinelBackend as CelerySentinelBackend
from redis.exceptions import MasterDownError, OutOfMemoryError, ReadOnlyError

import redisfull

#: The refusals of a Redis that takes the command later, as redis-py raises them (each a
#: ``ResponseError``, not a ``ConnectionError``, so nothing retries them unless told): over
#: ``maxmemory`` (``OOM``, :mod:`redisfull`); a replica, which refuses writes (``READONLY``: a
#: failover's demotion, until it is promoted again or its address moves to the new primary); and a
#: replica with ``replica-serve-stale-data no`` whose link to its primary is down, which refuses
#: reads and writes (``MASTERDOWN``: a failover in progress, or the primary restarting) until it is
#: in sync again or promoted.  For ``autoretry_for`` (``tasks.dispatch``, ``tasks.presence``);
#: :func:`refused_for_now` is the same rule for an error that may come wrapped.  A Redis still
#: loading its data (``LOADING``) is redis-py's ``BusyLoadingError``, a ``ConnectionError``, which
#: every retry of a Redis that does not answer covers already.
REFUSED_FOR_NOW = (OutOfMemoryError, ReadOnlyError, MasterDownError)


def refused_for_now(exc: BaseException) -> bool:
    """Whether ``exc`` is Redis refusing a command that it takes later (:data:`REFUSED_FOR_NOW`),
    or carries the text of a full Redis's refusal (:func:`redisfull.is_full`: kombu wraps it).  Pure."""
    return isinstance(exc, REFUSED_FOR_NOW) or redisfull.is_full(exc)


class RedisBackend(CeleryRedisBackend):
    """Celery's Redis result backend, which retries what :func:`refused_for_now` accepts as it
    retries a Redis that does not answer."""

    def exception_safe_to_retry(self, exc):
        return super().exception_safe_to_retry(exc) or refused_for_now(exc)


class SentinelBackend(CelerySentinelBackend):
    """Celery's Sentinel result backend, which retries as :class:`RedisBackend` does."""

    def exception_safe_to_retry(self, exc):
        return super().exception_safe_to_retry(exc) or refused_for_now(exc)


#: The result backend schemes (``celery.app.backends.BACKEND_ALIASES``) that name these classes.
OVERRIDES = {
    "redis": f"{__name__}:RedisBackend",
    "rediss": f"{__name__}:RedisBackend",
    "sentinel": f"{__name__}:SentinelBackend",
}


def install(app) -> None:
    """Make ``app``'s Redis result backends these classes; before ``app.backend`` is first read."""
    app.loader.override_backends = {**app.loader.override_backends, **OVERRIDES}

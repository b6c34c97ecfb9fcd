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
these classes (Celery's loader's ``override_backends``), its URL and settings unchanged.  Their
:class:`ResultConsumer`, what a caller's ``.get()`` waits with, subscribes again before it reads the
stored results when it reconnects.
"""

from __future__ import annotations

from celery.backends.redis import RedisBackend as CeleryRedisBackend
from celery.backends.redis import ResultConsumer as CeleryResultConsumer
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


class ResultConsumer(CeleryResultConsumer):
    """Celery's, which waits for results by their notices on one pub/sub connection (the thread
    of the ``.get()`` that drains it).  When that connection breaks (Redis restarted, a network
    cut), Celery's reconnection read the results stored meanwhile, then subscribed again: a result
    stored in between was never heard of, and its ``.get()`` waited its whole timeout for a
    result that was there.  Here it subscribes first, then reads: a result stored after the
    subscription comes by its notice, one stored before by the read (one that comes both ways is
    taken once)."""

    def _reconnect_pubsub(self):
        if not self.subscribed_to:
            return super()._reconnect_pubsub()
        self._pubsub = None
        self.backend.client.connection_pool.reset()
        self._pubsub = self.backend.client.pubsub(ignore_subscribe_messages=True)
        keys = list(self.subscribed_to)
        self._pubsub.subscribe(*keys)
        for meta in self.backend.client.mget(keys):
            if meta:
                self.on_state_change(self._decode_result(meta), None)


class RedisBackend(CeleryRedisBackend):
    """Celery's Redis result backend, which retries what :func:`refused_for_now` accepts as it
    retries a Redis that does not answer, and whose results are waited for with
    :class:`ResultConsumer`."""

    ResultConsumer = ResultConsumer

    def exception_safe_to_retry(self, exc):
        return super().exception_safe_to_retry(exc) or refused_for_now(exc)


class SentinelBackend(CelerySentinelBackend):
    """Celery's Sentinel result backend, which retries and waits as :class:`RedisBackend` does."""

    ResultConsumer = ResultConsumer

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

"""What a result write retries (``tasks.resultbackend``).  Pure: no Redis is reached."""

from __future__ import annotations

import redis
from celery import Celery
from redis._parsers.base import BaseParser
from redis.exceptions import OutOfMemoryError, ReadOnlyError, ResponseError

from tasks import resultbackend


def test_a_replica_a_full_redis_and_a_lost_connection_are_retried_but_not_another_refusal():
    app = Celery(backend="redis://127.0.0.1:1/1")
    resultbackend.install(app)
    backend = app.backend
    assert isinstance(backend, resultbackend.RedisBackend)
    assert backend.exception_safe_to_retry(ReadOnlyError("You can't write against a read only replica."))
    assert backend.exception_safe_to_retry(OutOfMemoryError("command not allowed when used memory > 'maxmemory'."))
    assert backend.exception_safe_to_retry(redis.ConnectionError("Connection refused"))
    assert not backend.exception_safe_to_retry(ResponseError("WRONGTYPE Operation against a key holding the wrong kind of value"))


def test_a_replica_cut_off_from_its_primary_and_a_redis_loading_its_data_are_retried_by_every_retry():
    """As redis-py's parser raises Redis's replies: MASTERDOWN (a replica serving no stale data while
    its primary is down) is a ResponseError, retried because REFUSED_FOR_NOW names it; LOADING is a
    ConnectionError, which every retry of a Redis that does not answer takes already."""
    from tasks.dispatch import DISPATCH_RETRYABLE
    from tasks.presence import presence

    app = Celery(backend="redis://127.0.0.1:1/1")
    resultbackend.install(app)
    masterdown = BaseParser.parse_error("MASTERDOWN Link with MASTER is down and replica-serve-stale-data is set to 'no'.")
    loading = BaseParser.parse_error("LOADING Redis is loading the dataset in memory")
    assert isinstance(masterdown, ResponseError) and not isinstance(masterdown, redis.ConnectionError)
    assert isinstance(loading, redis.ConnectionError)
    for exc in (masterdown, loading):
        assert app.backend.exception_safe_to_retry(exc), repr(exc)
        assert isinstance(exc, DISPATCH_RETRYABLE), repr(exc)
        assert isinstance(exc, tuple(presence.autoretry_for)), repr(exc)
    assert resultbackend.refused_for_now(masterdown)


def test_the_workers_redis_result_backends_are_the_retrying_ones_and_others_are_celerys():
    for url, cls in (("rediss://127.0.0.1:1/1?ssl_cert_reqs=required", resultbackend.RedisBackend),
                     ("sentinel://127.0.0.1:1/1", resultbackend.SentinelBackend)):
        app = Celery(backend=url)
        resultbackend.install(app)
        assert type(app.backend) is cls
    app = Celery(backend="rpc://")
    resultbackend.install(app)
    assert type(app.backend).__module__ == "celery.backends.rpc"


def test_the_worker_app_installs_them():
    import worker

    assert worker.app.loader.override_backends["redis"] == "tasks.resultbackend:RedisBackend"

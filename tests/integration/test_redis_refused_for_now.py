"""What each retry of the platform makes of the refusals of a real Redis that takes the command
later (``tasks.resultbackend.REFUSED_FOR_NOW``): here a replica with ``replica-serve-stale-data
no`` whose primary does not answer, which refuses reads and writes with ``MASTERDOWN`` (a failover
in progress, a primary restarting).  No cluster: a private redis-server, and the rules as the
worker's tasks and result backend read them."""

from __future__ import annotations

import pytest
import redis as redis_lib
from celery import Celery

import launcher
from tasks import resultbackend
from wsnode.registry import RouteTable


@pytest.fixture
def cut_off_replica():
    """A client of a private Redis that is a replica of a primary that does not answer, serving no
    stale data."""
    with launcher.RedisServer() as server:
        client = redis_lib.Redis.from_url(server.url(), socket_timeout=5)
        client.config_set("replica-serve-stale-data", "no")
        client.execute_command("REPLICAOF", "127.0.0.1", str(launcher.free_port()))
        try:
            yield client
        finally:
            client.close()


def refusal(call) -> redis_lib.RedisError:
    with pytest.raises(redis_lib.RedisError) as caught:
        call()
    return caught.value


def test_a_replica_cut_off_from_its_primary_refuses_reads_with_masterdown_and_every_retry_takes_it(cut_off_replica):
    """Writes are refused with READONLY first, as by any replica (retried since fb478bc); the reads
    are refused with MASTERDOWN, even PING: Dispatch's lookup (a script, also when it writes no
    marks), a result write's prior GET (Celery's ``mark_as_done``), tasks.presence's read."""
    from tasks.dispatch import DISPATCH_RETRYABLE, dispatch
    from tasks.presence import presence

    app = Celery(backend="redis://127.0.0.1:1/1")
    resultbackend.install(app)
    assert isinstance(refusal(lambda: cut_off_replica.set("celery-task-meta-x", "{}")), redis_lib.exceptions.ReadOnlyError)
    table = RouteTable(cut_off_replica)
    lookup = refusal(lambda: table.lookup(["user"], "pending", [("user", "message", 1.0)]))
    prior_get = refusal(lambda: cut_off_replica.get("celery-task-meta-x"))
    for exc in (lookup, prior_get, refusal(cut_off_replica.ping)):
        assert "Link with MASTER is down" in str(exc), repr(exc)
        assert not isinstance(exc, redis_lib.ConnectionError)  # nothing retries it unless told
        assert resultbackend.refused_for_now(exc), repr(exc)
        assert app.backend.exception_safe_to_retry(exc), repr(exc)
        assert isinstance(exc, DISPATCH_RETRYABLE) and isinstance(exc, tuple(dispatch.autoretry_for)), repr(exc)
        assert isinstance(exc, tuple(presence.autoretry_for)), repr(exc)

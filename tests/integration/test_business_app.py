"""The tests' business-process Celery app (``conftest.business_app``) and its release before its
result backend stops (``conftest.release_results``), on a real Redis."""

from __future__ import annotations

import pytest

import launcher
from tests.integration.conftest import business_app, release_results


def _finalised_after_its_redis_stopped(tmp_path, release: bool) -> None:
    """A business app's result whose ``.get()`` raised, finalised (``AsyncResult.__del__``, what
    the garbage collector runs whenever it gets to it) after its Redis stopped, with
    ``release_results`` called before the stop or not."""
    server = launcher.RedisServer(data_dir=tmp_path / "redis").start()
    try:
        app = business_app(server.url(0), server.url(1))
        app.backend.mark_as_failure("failed-task", ValueError("boom"))
        result = app.AsyncResult("failed-task")
        with pytest.raises(ValueError, match="boom"):
            result.get(timeout=10)
        if release:
            release_results(app)
    finally:
        server.stop()
    # The collector takes the app's objects in no set order: its Redis connections may be closed
    # before the result is finalised, and the unsubscribe then has to connect again.
    app.backend.client.connection_pool.disconnect()
    try:
        result.__del__()
    finally:
        release_results(app)  # else the collector's own finalisation would reconnect again, in a later test


def test_a_released_business_app_leaves_its_results_nothing_to_reconnect_to(tmp_path):
    _finalised_after_its_redis_stopped(tmp_path, release=True)  # raises nothing


def test_without_the_release_a_result_finalised_later_reconnects_to_the_stopped_redis(tmp_path):
    """What the release is for: Celery's ``AsyncResult.__del__`` unsubscribes from the stopped
    Redis and gives up only after its reconnection attempts (3 here; Celery's default is 20, a
    second apart), inside whatever code the garbage collector ran in."""
    with pytest.raises(RuntimeError, match="Retry limit exceeded while trying to reconnect to the Celery result store"):
        _finalised_after_its_redis_stopped(tmp_path, release=False)

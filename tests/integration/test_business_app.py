"""The tests' business-process Celery app (``conftest.business_app``) and its release before its
result backend stops (``conftest.release_results``), on a real Redis."""

from __future__ import annotations

import gc
import sys

import pytest
from celery import Celery

import launcher
from tests.integration.conftest import business_app, release_results


def _failed_get_then_collected(tmp_path, release: bool) -> list:
    """A business app whose ``.get()`` raised, its Redis stopped (``release_results`` first or
    not), then the app dropped and collected once another app is Celery's current one, as a later
    test makes: what ``sys.unraisablehook`` got meanwhile."""
    server = launcher.RedisServer(data_dir=tmp_path / "redis").start()
    try:
        app = business_app(server.url(0), server.url(1))
        app.backend.mark_as_failure("failed-task", ValueError("boom"))
        with pytest.raises(ValueError, match="boom"):
            app.AsyncResult("failed-task").get(timeout=10)
        if release:
            release_results(app)
    finally:
        server.stop()
    unraisable: list = []
    previous, sys.unraisablehook = sys.unraisablehook, unraisable.append
    try:
        del app
        Celery(broker=f"redis://127.0.0.1:{launcher.free_port()}/0")  # the current app from now on
        gc.collect()
    finally:
        sys.unraisablehook = previous
    return unraisable


def test_a_released_business_app_leaves_its_results_nothing_to_reconnect_to(tmp_path):
    assert _failed_get_then_collected(tmp_path, release=True) == []


def test_without_the_release_the_collected_result_reconnects_to_the_stopped_redis(tmp_path):
    """What the release is for: Celery's ``AsyncResult.__del__`` unsubscribes from the stopped
    Redis and gives up only after its reconnection attempts (3 here), inside whatever code the
    garbage collector ran in."""
    (failure,) = _failed_get_then_collected(tmp_path, release=False)
    assert isinstance(failure.exc_value, RuntimeError), failure.exc_value
    assert "Retry limit exceeded while trying to reconnect to the Celery result store" in str(failure.exc_value)
    assert "AsyncResult.__del__" in repr(failure.object)

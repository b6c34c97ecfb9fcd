"""The tests' business-process Celery app (``conftest.business_app``), its release before its
result backend stops (``conftest.release_results``), and its wait for a result across a Redis
restart (``conftest.get_result``), on a real Redis."""

from __future__ import annotations

import concurrent.futures
import json
import time

import pytest
import redis as redis_lib
from celery.exceptions import TimeoutError as ResultTimeout

import launcher
from tests.integration.conftest import business_app, get_result, private_business_app, release_results


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


def _gets(admin) -> int:
    """How many GETs the server has run (``INFO commandstats``)."""
    return admin.info("commandstats").get("cmdstat_get", {}).get("calls", 0)


def _stored_while_waiting(app, admin, task_id: str, wait):
    """``wait(result)`` on a thread; once it has read the result (none yet), the result is stored
    as it is after a missed notice: a plain ``SET`` of Celery's key, no ``PUBLISH`` reaching the
    subscriber.  Returns what ``wait`` returned, or raises what it raised."""
    result = app.AsyncResult(task_id)
    read_before = _gets(admin)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(wait, result)
        deadline = time.monotonic() + 30
        while _gets(admin) == read_before and time.monotonic() < deadline:
            time.sleep(0.01)
        meta = {"status": "SUCCESS", "result": f"id-of-{task_id}", "traceback": None, "children": [], "task_id": task_id}
        admin.set(app.backend.get_key_for_task(task_id), json.dumps(meta))
        return waiting.result(timeout=60)


def test_a_result_stored_whose_notice_was_missed_is_waited_for_by_get_and_read_by_get_result(tmp_path):
    """Why the tests wait on results with ``get_result``: a ``get()`` reads the stored result once,
    then waits for its notice (``PUBLISH``).  Celery's reconnection after a Redis restart reads the
    stored results before it subscribes again, and a result published in between is never
    noticed: one ``get()`` waits its whole timeout for a result that is stored; ``get_result``
    asks again and reads it."""
    with private_business_app(tmp_path) as (server, app):
        admin = redis_lib.Redis.from_url(server.url(1))
        try:
            with pytest.raises(ResultTimeout):
                _stored_while_waiting(app, admin, "one-get", lambda result: result.get(timeout=3))
            assert _stored_while_waiting(app, admin, "get-result", lambda result: get_result(result, timeout=10, reread=1)) == "id-of-get-result"
        finally:
            admin.close()

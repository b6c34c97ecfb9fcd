"""A ``tasks.housekeeping`` run that meets its Redis away (a restart, ``LOADING`` after one) is
logged as the passing trouble it is: Celery logged "raised unexpected" at ERROR with a traceback
at every such run, beside the lines that said Redis was down, which read as a crash.  Run in this
process through Celery's own tracer (``apply``), against a real port where no Redis answers."""

from __future__ import annotations

import logging

import pytest
import redis as redis_lib

import launcher
from tasks import housekeeping


@pytest.fixture
def redis_away(monkeypatch):
    client = redis_lib.Redis(port=launcher.free_port(), socket_connect_timeout=2, socket_timeout=2)
    monkeypatch.setattr(housekeeping, "_redis", client)
    yield client
    client.close()


def test_a_run_that_meets_redis_away_is_logged_at_info_without_a_traceback(redis_away, caplog):
    with caplog.at_level(logging.INFO, logger="celery.app.trace"):
        result = housekeeping.housekeeping.apply()
    assert result.failed() and isinstance(result.result, redis_lib.ConnectionError), result.result
    [record] = [r for r in caplog.records if r.name == "celery.app.trace" and "tasks.housekeeping" in r.getMessage()]
    assert record.levelno == logging.INFO and "raised expected" in record.getMessage(), record.getMessage()
    assert record.exc_info is None

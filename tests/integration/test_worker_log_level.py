"""``celery -A worker worker``, as the README runs it (no ``--loglevel``), logs at ``LOG_LEVEL``
like every other process; ``--loglevel`` still wins.  Celery's own default, WARNING, hid every
INFO line the README quotes.  Each worker runs on a Redis of its own, so that it takes no task
of another test's cluster."""

from __future__ import annotations

import sys

import pytest

import launcher

CELERY_WORKER = [sys.executable, "-m", "celery", "-A", "worker", "worker", "-c", "1", "--without-gossip", "--without-mingle"]


@pytest.fixture
def private_redis():
    with launcher.RedisServer() as server:
        yield server


def worker(private_redis, tmp_path, name: str, *options: str, **env: str) -> launcher.Service:
    environment = launcher.cluster_env(private_redis.url(), tmp_path, launcher.free_port(), **{"LOG_LEVEL": None, **env})
    environment.pop("CELERY_WORKER_LOGLEVEL", None)
    return launcher.Service(name, [*CELERY_WORKER, "-n", f"{name}@%h", *options], environment,
                            log_path=tmp_path / f"{name}.log").start()


def test_a_worker_started_without_loglevel_logs_at_log_level_info_by_default(private_redis, tmp_path):
    service = worker(private_redis, tmp_path, "default-level")
    try:
        service.wait_log("ready.", timeout=60)  # Celery's INFO line: never logged at WARNING
        service.wait_log("broker redis://127.0.0.1:", timeout=10)  # the platform's own INFO line at start
    finally:
        service.terminate(timeout=30)


def test_the_worker_s_loglevel_option_still_wins_over_log_level(private_redis, tmp_path):
    quiet = worker(private_redis, tmp_path, "quiet", "--loglevel=WARNING", LOG_LEVEL="DEBUG")
    try:
        # The worker is up once it answers a ping through the broker (as launcher.start_worker
        # waits at LOG_LEVEL WARNING); its log then holds no INFO line.
        launcher._answers_ping(private_redis.url(0), "quiet", 60)(quiet)
        assert not [line for line in quiet.log_tail(200).splitlines() if "INFO/" in line or "DEBUG/" in line], quiet.log_tail()
    finally:
        quiet.terminate(timeout=30)

"""Test set-up shared by every test.

Settings are read once, at import, from the environment (``settings.py``), so this file points the
environment of the test process at a private Redis on a free port *before* anything imports
``settings``.  The Redis itself is started by the session fixture ``redis_server`` only when a
test needs it; unit tests never touch it.
"""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest

import launcher

TEST_REDIS_PORT = launcher.free_port()
TEST_DATA_DIR = tempfile.mkdtemp(prefix="push-tests-")
TEST_AUTH_PORT = launcher.free_port()

os.environ.update(
    BROKER_URL=f"redis://127.0.0.1:{TEST_REDIS_PORT}/0",
    REDIS_URL=f"redis://127.0.0.1:{TEST_REDIS_PORT}/1",
    DATA_DIR=TEST_DATA_DIR,
    AUTH_PORT=str(TEST_AUTH_PORT),
    AUTH_URL=f"http://127.0.0.1:{TEST_AUTH_PORT}",
)
os.environ.pop("RESULT_BACKEND", None)


@pytest.fixture(scope="session")
def redis_server():
    """A private redis-server for the whole session, on the port this process's settings use."""
    server = launcher.RedisServer(port=TEST_REDIS_PORT, persistent=True).start()
    yield server
    server.stop()


def pytest_sessionfinish(session, exitstatus):
    """The session's data folder (embedded store, process logs) goes when every test passed (or
    none was selected); after a failure it stays, for reading the processes' logs, and its path is
    printed.  Session fixtures (the Redis, the clusters) are torn down before this runs."""
    if exitstatus in (pytest.ExitCode.OK, pytest.ExitCode.NO_TESTS_COLLECTED):
        shutil.rmtree(TEST_DATA_DIR, ignore_errors=True)
    else:
        print(f"\ntest data and process logs kept in {TEST_DATA_DIR}")

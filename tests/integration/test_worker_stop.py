"""A warm shutdown (SIGTERM) that lands just after a task went to a pool process
(``tasks.prefork``): the worker reads that task's result and stops, where Celery's own prefork
pool forgot the task, left its process waiting 30 s for the main process to count the result, and
let the task run again on the next worker."""

from __future__ import annotations

import threading

import psutil
import redis as redis_lib

import launcher
from tests.integration.conftest import business_app, get_result, release_results, unacked_task_ids

#: Seconds the stop may take: well under the 30 s that billiard's pool process waits for a result
#: nobody counts (``GUARANTEE_MESSAGE_CONSUMPTION_RETRY_LIMIT``), which Celery's own pool took.
STOP_SECONDS = 20


def test_a_worker_stopped_just_after_a_task_went_to_its_pool_process_reads_its_result_and_stops(tmp_path):
    """The pool process is stopped (SIGSTOP), so the task the main process writes to its pipe is
    not yet acked by it when the SIGTERM comes; it is resumed a second after.  It runs the task, the
    main process reads the result, acks the message and exits: the broker holds nothing for the
    next worker, and the result is stored once."""
    redis_server = launcher.RedisServer(data_dir=tmp_path / "redis").start()
    worker = business = None
    try:
        env = launcher.cluster_env(redis_server.url(), tmp_path / "data", launcher.free_port())
        worker = launcher.start_worker(env, queues="dispatch", concurrency=1, log_path=tmp_path / "worker.log")
        business = business_app(env["BROKER_URL"], env["REDIS_URL"])
        assert get_result(business.send_task("tasks.presence", args=[["first"]], queue="dispatch"), 30) == {"first": []}
        (process,) = psutil.Process(worker.pid).children()
        broker = redis_lib.Redis.from_url(env["BROKER_URL"])

        process.suspend()
        result = business.send_task("tasks.presence", args=[["caught"]], queue="dispatch")
        for _ in range(100):  # read by the main process, which holds it unacked and writes it to the pipe
            if result.id in unacked_task_ids(broker):
                break
            threading.Event().wait(0.1)
        else:
            raise AssertionError("the worker did not read the task")
        threading.Event().wait(0.5)
        threading.Timer(1.0, process.resume).start()  # after the SIGTERM's flush of the pool
        assert worker.terminate(STOP_SECONDS) == 0, f"the worker did not stop within {STOP_SECONDS} s of SIGTERM"
        worker = None

        assert get_result(result, 10) == {"caught": []}
        assert result.id not in unacked_task_ids(broker), "the task was left to the next worker: it would run again"
        assert not broker.llen("dispatch"), "the task went back to the queue: it would run again"
        log = (tmp_path / "worker.log").read_text(errors="replace")
        assert "could not ensure all messages were consumed" not in log, log[-3000:]
    finally:
        if business is not None:
            release_results(business)
            business.close()
        if worker is not None:
            worker.terminate(timeout=30)
        redis_server.stop()

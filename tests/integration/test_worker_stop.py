"""A warm shutdown (SIGTERM) that lands just after a task went to a pool process
(:mod:`tasks.prefork`): the worker finishes writing it, reads its result and stops.

Celery's own prefork pool did neither:

- a task written whole to the pool process's pipe, whose ACK the main process had not read yet,
  was forgotten: the process ran it, then waited 30 s for the main process to count its result, and
  the task ran again on the next worker;
- a task whose write had begun (a payload over the pipe's 64 KB) was left half written, because
  Celery closes the pool before it flushes it and its flush finishes writes only in a running pool:
  the process waited for ever for the rest, and the worker never exited.

Each test makes its case happen every time: the pool process is stopped (SIGSTOP), so it reads
nothing; a task is sent; the worker gets SIGTERM; the process is resumed a second later, or
killed (SIGKILL): the task then runs on the next worker."""

from __future__ import annotations

import socket
import threading

import psutil
import pytest

import launcher
from tests.integration.conftest import BrokerHolds, get_result, lone_worker

#: Seconds the stop may take: well under the 30 s that billiard's pool process waits for a result
#: nobody counts (``GUARANTEE_MESSAGE_CONSUMPTION_RETRY_LIMIT``), which Celery's own pool took.
STOP_SECONDS = 20

pytestmark = pytest.mark.timeout(120)

#: A batch whose pickled payload to the pool process is several times a pipe's 64 KB.
BIG = [{"to": f"u{i % 50}", "data": {"i": i, "pad": "x" * 100}} for i in range(1000)]


def _idle(business, name: str) -> bool:
    """Whether the worker's main process has read the result of everything it ran (so its pool
    process is free for the next task: Celery writes a task only to a process that is not busy)."""
    active = business.control.inspect(destination=[name], timeout=3).active() or {}
    return name in active and not active[name]


CASES = [
    pytest.param("tasks.presence", "dispatch", {"users": ["caught"]}, {"caught": []}, "redis", id="written-whole"),
    pytest.param("tasks.collect_many", "collect", {"messages": BIG}, 1000, "redis", id="half-written"),
    pytest.param("tasks.collect_many", "collect", {"messages": BIG}, 1000, "amqp", id="half-written-amqp"),
]


def _caught_in_the_pipe(lone, task: str, queue: str, kwargs: dict):
    """The lone worker's pool process stopped (SIGSTOP) once it is idle, and ``task`` sent: returns
    its result, the process and the broker's :class:`BrokerHolds`, once the main process holds the task unacked
    and has had half a second to write it to the pipe."""
    name = f"worker@{socket.gethostname()}"
    business = lone.business
    assert get_result(business.send_task("tasks.presence", args=[["first"]], queue=queue), 30) == {"first": []}
    for _ in range(50):
        if _idle(business, name):
            break
    else:
        raise AssertionError("the worker still counts a task as running")
    (process,) = psutil.Process(lone.worker.pid).children()
    broker = BrokerHolds(lone.env["BROKER_URL"], queue)

    process.suspend()
    result = business.send_task(task, kwargs=kwargs, queue=queue)
    for _ in range(100):  # read by the main process, which holds it unacked and writes it to the pipe
        if broker.unacked(result.id):
            break
        threading.Event().wait(0.1)
    else:
        raise AssertionError("the worker did not read the task")
    threading.Event().wait(0.5)
    return result, process, broker


@pytest.mark.parametrize(("task", "queue", "kwargs", "expected", "broker_kind"), CASES)
def test_a_worker_stopped_just_after_a_task_went_to_its_pool_process_finishes_it_and_stops(tmp_path, task, queue, kwargs, expected, broker_kind):
    with lone_worker(tmp_path, queue, broker=broker_kind) as lone:
        result, process, broker = _caught_in_the_pipe(lone, task, queue, kwargs)
        threading.Timer(1.0, process.resume).start()  # after the SIGTERM's flush of the pool
        assert lone.worker.terminate(STOP_SECONDS) == 0, f"the worker did not stop within {STOP_SECONDS} s of SIGTERM"
        lone.worker = None

        answer = get_result(result, 10)
        assert (len(answer) if isinstance(expected, int) else answer) == expected, answer
        assert not broker.unacked(result.id), "the task was left to the next worker: it would run again"
        assert not broker.queued(result.id), "the task went back to the queue: it would run again"
        log = (tmp_path / "worker.log").read_text(errors="replace")
        assert "could not ensure all messages were consumed" not in log, log[-3000:]


@pytest.mark.timeout(240)
@pytest.mark.parametrize(("task", "queue", "kwargs", "expected", "broker_kind"), CASES)
def test_a_task_kept_at_a_stop_whose_pool_process_dies_runs_on_the_next_worker(tmp_path, task, queue, kwargs, expected, broker_kind):
    """The kept job's process is killed (SIGKILL) during the stop instead of resumed: the worker
    still stops, and the task, which never ran, is not lost: the stop puts it back on the queue
    (kombu's restore of what the channel held unacked on Redis, were that to fail the next worker's
    after ``VISIBILITY_TIMEOUT``; RabbitMQ's requeue of a closed connection's unacked messages), and
    the next worker runs it.  With a job half written, Celery's pool (this one too, before
    ``tell_to_stop``) then waited for ever at its join, writing its word to stop to the dead
    process's full pipe."""
    with lone_worker(tmp_path, queue, broker=broker_kind, VISIBILITY_TIMEOUT=8) as lone:
        result, process, broker = _caught_in_the_pipe(lone, task, queue, kwargs)
        threading.Timer(1.0, process.kill).start()  # after the SIGTERM's flush of the pool
        assert lone.worker.terminate(STOP_SECONDS) == 0, f"the worker did not stop within {STOP_SECONDS} s of SIGTERM"
        assert not process.is_running() or process.status() == psutil.STATUS_ZOMBIE
        assert broker.holds(result.id), "the task is neither queued nor held unacked: lost"
        log = (tmp_path / "worker.log").read_text(errors="replace")
        assert "Traceback" not in log.partition("Warm shutdown")[2], log[-3000:]

        lone.worker = launcher.start_worker(lone.env, queues=queue, concurrency=1, log_path=tmp_path / "worker-2.log")
        answer = get_result(result, 90)
        assert (len(answer) if isinstance(expected, int) else answer) == expected, answer
        for _ in range(50):
            if not broker.unacked(result.id):
                break
            threading.Event().wait(0.1)
        assert not broker.holds(result.id), "the task is still held or queued: it would run again"

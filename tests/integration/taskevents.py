"""Celery's task events as Flower receives them, for the tests that check what an operator sees."""

from __future__ import annotations

import threading

from tests.integration.conftest import Cluster


class TaskEvents:
    """Every task event the cluster's workers send, by task id, read by Celery's own event
    receiver on a thread (as Flower reads them)."""

    def __init__(self, cluster: Cluster) -> None:
        self.by_task: dict[str, list[dict]] = {}
        self.heartbeat = threading.Event()
        self._lock = threading.Lock()
        self._connection = cluster.business.connection_for_read()
        self._receiver = cluster.business.events.Receiver(self._connection, handlers={"*": self._on_event})
        self._thread = threading.Thread(target=self._receiver.capture, kwargs={"limit": None, "timeout": None, "wakeup": False}, daemon=True)

    def _on_event(self, event: dict) -> None:
        if event["type"] == "worker-heartbeat":
            self.heartbeat.set()
        elif "uuid" in event:
            with self._lock:
                self.by_task.setdefault(event["uuid"], []).append(event)

    def start(self) -> "TaskEvents":
        self._thread.start()
        # Events go to a fanout exchange: only those sent once the receiver's queue is bound
        # arrive.  The worker's heartbeat (every 2 s with -E) says that it is.
        assert self.heartbeat.wait(15), "no worker-heartbeat event in 15 s: does the worker send events (-E)?"
        return self

    def types(self, task_id: str) -> list[str]:
        with self._lock:
            return [event["type"] for event in self.by_task.get(task_id, [])]

    def timestamps(self, task_id: str, kind: str) -> list[float]:
        """When the worker sent each ``kind`` event of the task (its ``timestamp``: ``time.time()``
        of the worker's clock, this machine's)."""
        with self._lock:
            return [event["timestamp"] for event in self.by_task.get(task_id, []) if event["type"] == kind]

    def stop(self) -> None:
        self._receiver.should_stop = True
        self._thread.join(5)
        self._connection.release()

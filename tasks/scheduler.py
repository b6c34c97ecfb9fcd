"""Sends ``tasks.housekeeping`` every ``HOUSEKEEPING_SECONDS`` from exactly one worker.

Runs as a daemon thread in each worker's main process (started on ``worker_ready``).  Every tick,
each worker tries ``SET push:housekeeping-lock NX PX`` in Redis; the one that wins sends the task,
so a cluster of N workers still runs housekeeping once per period, and it keeps running when any
worker dies.  (Celery beat would need one more process, and two beats would double the work.)
"""

from __future__ import annotations

import logging
import socket
import threading

import redislogin

log = logging.getLogger(__name__)

LOCK_KEY = "push:housekeeping-lock"
#: Shortest expiry of a sent run, in seconds (:func:`expiry`).
MIN_EXPIRY_SECONDS = 60.0
#: A sent run expires after this many periods at least.
EXPIRY_PERIODS = 6


def expiry(interval: float) -> float:
    """Seconds after which a sent run is dropped unrun: runs that waited (no worker consumed
    ``dispatch``) do not all run at once later, at most ``EXPIRY_PERIODS`` of them.  Celery turns it
    into a time by the sending worker's clock, which the consuming worker compares with its own:
    the expiry of one period (10 s) made a consumer whose clock ran more than that ahead of the
    sender's (or a sender behind) drop every run, and housekeeping never ran (no redelivery, no
    hand-back of dead nodes' queues, no purge).  With a minute at least, workers' clocks may
    disagree by up to about that much.  Pure."""
    return max(MIN_EXPIRY_SECONDS, EXPIRY_PERIODS * interval)


class HousekeepingScheduler:
    def __init__(self, app, redis, interval: float) -> None:
        self._app = app
        self._redis = redis
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="housekeeping-scheduler", daemon=True)
        self._me = f"{socket.gethostname()}:{id(self)}"

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def tick(self) -> bool:
        """Send the task if this worker holds the lock for this period; True when it did."""
        if not self._redis.set(LOCK_KEY, self._me, nx=True, px=max(1, int(self._interval * 900))):
            return False
        self._app.send_task("tasks.housekeeping", ignore_result=True, expires=expiry(self._interval))
        return True

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                self.tick()
            except Exception as exc:  # noqa: BLE001 - Redis or the broker may be down; try next tick
                log.warning("housekeeping not scheduled this time: %s", redislogin.explain(exc, redislogin.variables_of(exc)))

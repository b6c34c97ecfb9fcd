"""When the worker hands buffered ``tasks.collect`` and ``tasks.collect_many`` requests to its
pool: at once while none of their task's batches runs, gathered while one does (group commit);
and how many go in one batch.  Pure.

celery-batches on its own runs a batch every ``flush_interval`` seconds or every ``flush_every``
requests, so a request that comes alone waits up to the interval (50 ms by default) before
anything is done with it, even on an idle worker.  :class:`FlushGate` lets a batch go as soon as
no batch of ours is running, and holds requests while one is; when it returns, what gathered
meanwhile goes as the next batch.  An idle worker thus runs a lone request right away, and a busy
one runs bigger batches the busier it is (each claim, insert, route lookup and node message is
then shared by more requests), with no fixed wait in either case.  ``COLLECT_BATCH`` still caps a
batch and ``COLLECT_FLUSH_SECONDS`` still flushes what waits whatever the gate says (the timer and
count of celery-batches): the longest a request can be held, and what puts a second batch beside
a running one under load, on the pool's other processes.

One batch at a time by default, not one per pool process: a batch has a fixed cost (Redis round
trips and a store commit), and letting a batch go whenever a process was free made the batches
small while the pool was busy; sending one task per message as fast as one process can
(``bench/compare.py``, 2026-12-02) that nearly doubled the platform's CPU per message and cut the
delivered rate by about a third, where one at a time kept the rate.

Threading: the worker's main process, on its event loop.  ``started`` is called where the batch
is handed to the pool; ``finished`` from the pool's result callback, which the prefork and solo
pools run on the loop and the threads pool on one of its threads (a ``set.discard`` is atomic
under the GIL, and :class:`tasks.collectbatches.CollectBatches` schedules the next flush through the
hub's thread-safe ``call_soon``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import TypeVar

T = TypeVar("T")


def chunks(items: Sequence[T], size: Callable[[T], int], limit: int) -> Iterator[list[T]]:
    """``items`` in order, cut into runs whose ``size`` adds up to at most ``limit``; an item
    bigger than ``limit`` goes alone (a batch is never empty, and nothing is split)."""
    chunk: list[T] = []
    total = 0
    for item in items:
        n = max(1, size(item))
        if chunk and total + n > limit:
            yield chunk
            chunk, total = [], 0
        chunk.append(item)
        total += n
    if chunk:
        yield chunk


class FlushGate:
    """Counts the batches of one task that are in the pool and says whether another may go:
    while fewer than ``limit`` run (at least one)."""

    def __init__(self, limit: int = 1) -> None:
        self.limit = max(1, limit)
        self._running: set[object] = set()

    @property
    def running(self) -> int:
        """Batches handed to the pool and not returned yet."""
        return len(self._running)

    def may_flush(self) -> bool:
        """Whether a batch may go now."""
        return len(self._running) < self.limit

    def started(self) -> object:
        """A batch went to the pool; returns the token to pass to :meth:`finished`."""
        token = object()
        self._running.add(token)
        return token

    def finished(self, token: object) -> None:
        """The batch of ``token`` returned (or was lost with its pool process).  A token from
        before :meth:`reset` is ignored."""
        self._running.discard(token)

    def reset(self) -> None:
        """Forget the running batches: the consumer restarted, and those batches' requests are
        the broker's again (their results still come back, and are ignored here)."""
        self._running.clear()

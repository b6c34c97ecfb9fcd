"""When the worker hands buffered ``tasks.collect`` requests to its pool: at once while a pool
process is free for them, gathered while every one is busy (group commit).  Pure.

celery-batches on its own runs a batch every ``flush_interval`` seconds or every ``flush_every``
requests, so a request that comes alone waits up to the interval (50 ms by default) before
anything is done with it, even on an idle worker.  :class:`FlushGate` lets a batch go as soon as
fewer of our batches are running than the pool has processes, and holds requests while all are
taken; when a batch returns, what gathered meanwhile goes as the next batch.  An idle worker thus
runs a lone request right away, and a busy one runs bigger batches the busier it is (each claim,
insert, route lookup and node message is then shared by more requests), with no fixed wait in
either case.  ``COLLECT_BATCH`` still caps a batch and ``COLLECT_FLUSH_SECONDS`` still flushes
what waits, whatever the gate says (the timer of celery-batches): the longest a request can be
held while the pool is busy.

Threading: the worker's main process, on its event loop.  ``started`` is called where the batch
is handed to the pool; ``finished`` from the pool's result callback, which the prefork and solo
pools run on the loop and the threads pool on one of its threads (a ``set.discard`` is atomic
under the GIL, and :class:`tasks.collect.CollectBatches` schedules the next flush through the
hub's thread-safe ``call_soon``).
"""

from __future__ import annotations


class FlushGate:
    """Counts the batches of one task that are in the pool and says whether another may go."""

    def __init__(self) -> None:
        self._running: set[object] = set()

    @property
    def running(self) -> int:
        """Batches handed to the pool and not returned yet."""
        return len(self._running)

    def may_flush(self, slots: int) -> bool:
        """Whether a batch may go now, given the pool's processes (``slots``, at least one counts)."""
        return len(self._running) < max(1, slots)

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

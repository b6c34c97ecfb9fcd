"""Replay requests waiting to be sent as ``tasks.replay_many``.  Two threads, as marked.

The node's loop thread ``add``s a request for every connection that opens; the first request of
a round schedules the round (the node does so ``REPLAY_GATHER_SECONDS`` later, on the publisher
thread), which takes everything queued by then, ``per_task`` requests at a time.  Requests that
arrive while a round is waiting or sending join it or the next round, so connections opening a
few milliseconds apart share a task, and in a reconnect storm thousands of connections become
tens of tasks.

The deque is safe across the two threads (append and popleft are atomic), and so is the flag:
the publisher clears it before it reads the deque, so a request added meanwhile is either taken
now or makes ``add`` schedule another round.
"""

from __future__ import annotations

import collections
from collections.abc import Iterator
from typing import Generic, TypeVar

T = TypeVar("T")


class ReplayRequests(Generic[T]):
    def __init__(self, per_task: int) -> None:
        if per_task < 1:
            raise ValueError(f"per_task must be at least 1, got {per_task!r}")
        self._per_task = per_task
        self._items: collections.deque[T] = collections.deque()
        self._scheduled = False

    def add(self, item: T) -> bool:
        """Loop thread: queue ``item``; True when the caller must schedule :meth:`batches` on the
        publisher (no round is scheduled yet)."""
        self._items.append(item)
        if self._scheduled:
            return False
        self._scheduled = True
        return True

    def batches(self) -> Iterator[list[T]]:
        """Publisher thread: everything queued, oldest first, at most ``per_task`` per batch,
        including what is added while the batches are being sent."""
        self._scheduled = False
        while self._items:
            batch = []
            while self._items and len(batch) < self._per_task:
                batch.append(self._items.popleft())
            yield batch

    def __len__(self) -> int:
        return len(self._items)

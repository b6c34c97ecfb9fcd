"""Batches browser acks into ``tasks.receipts`` tasks.  Loop thread only.

``add_many`` is called for every ack frame (with its ids); the buffer hands a batch to ``send`` when it reaches
``batch_max`` items, and the node calls ``flush`` every ``RECEIPT_FLUSH_SECONDS`` and at shutdown.
``send`` must not block the loop (the node passes one that submits to its publisher thread).
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterable


class ReceiptBuffer:
    def __init__(self, send: Callable[[list[dict]], None], batch_max: int, clock: Callable[[], float] = time.time) -> None:
        self._send = send
        self._batch_max = batch_max
        self._clock = clock
        self._items: list[dict] = []

    def add(self, message_id: str, user: str, state: str = "acked") -> None:
        self._items.append({"id": message_id, "user": user, "state": state, "at": self._clock()})
        if len(self._items) >= self._batch_max:
            self.flush()

    def add_many(self, message_ids: Iterable[str], user: str, state: str) -> None:
        """:meth:`add` for several messages of one user at one time (the messages of one write, the
        ids of one ``ack`` frame);
        full batches go as :meth:`add` sends them, ``batch_max`` items each."""
        at = self._clock()
        self._items.extend({"id": message_id, "user": user, "state": state, "at": at} for message_id in message_ids)
        while len(self._items) >= self._batch_max:
            batch, self._items = self._items[:self._batch_max], self._items[self._batch_max:]
            self._send(batch)

    def flush(self) -> None:
        if self._items:
            batch, self._items = self._items, []
            self._send(batch)

    def __len__(self) -> int:
        return len(self._items)


def argsrepr(batch: list[dict]) -> str:
    """What Flower shows as the arguments of the ``tasks.receipts`` task carrying ``batch``: how many
    receipts of each state, like ``[<1000 receipts: 998 acked, 2 written>]``, instead of Celery's
    repr of the batch cut at 1 KB (which also cost the node a sixth of publishing it).  Pure."""
    states = ", ".join(f"{count} {state}" for state, count in sorted(Counter(r["state"] for r in batch).items()))
    return f"[<{len(batch)} receipt{'' if len(batch) == 1 else 's'}: {states}>]"

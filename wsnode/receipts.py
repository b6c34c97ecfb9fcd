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
    """The receipts waiting to go.  An ack of a delivery whose ``written`` receipt still waits here
    does not add a second item: that item becomes the ack, ``{"state": "acked", "at": <ack time>,
    "written": <write time>}`` (one item carries both receipts), which halves what the node sends
    and the worker decodes for a client that acks within ``RECEIPT_FLUSH_SECONDS``; the worker
    records both (:func:`tasks.receipts.parse_receipts`)."""

    def __init__(self, send: Callable[[list[dict]], None], batch_max: int, clock: Callable[[], float] = time.time) -> None:
        self._send = send
        self._batch_max = batch_max
        self._clock = clock
        self._items: list[dict] = []
        self._written: dict[tuple[str, str], dict] = {}  # (id, user) -> its written item, still in _items

    def add(self, message_id: str, user: str, state: str = "acked") -> None:
        self.add_many((message_id,), user, state)

    def add_many(self, message_ids: Iterable[str], user: str, state: str) -> None:
        """:meth:`add` for several messages of one user at one time (the messages of one write, the
        ids of one ``ack`` frame); full batches go as they fill, ``batch_max`` items each."""
        at = self._clock()
        items, written = self._items, self._written
        acked, writing = state == "acked", state == "written"
        for message_id in message_ids:
            key = (message_id, user)
            waiting = written.pop(key, None) if acked else None
            if waiting is not None:  # its write's receipt is still here: that item becomes the ack
                waiting["written"], waiting["state"], waiting["at"] = waiting["at"], state, at
                continue
            item = {"id": message_id, "user": user, "state": state, "at": at}
            items.append(item)
            if writing:
                written[key] = item
        while len(self._items) >= self._batch_max:
            batch, self._items = self._items[:self._batch_max], self._items[self._batch_max:]
            self._forget(batch)
            self._send(batch)

    def flush(self) -> None:
        if self._items:
            batch, self._items = self._items, []
            self._written.clear()
            self._send(batch)

    def _forget(self, batch: list[dict]) -> None:
        """The written items of ``batch``, about to go, can no longer take an ack."""
        if self._written:
            for item in batch:
                if item["state"] == "written":
                    self._written.pop((item["id"], item["user"]), None)

    def __len__(self) -> int:
        return len(self._items)


def argsrepr(batch: list[dict]) -> str:
    """What Flower shows as the arguments of the ``tasks.receipts`` task carrying ``batch``: how many
    receipts of each state, like ``[<1000 receipts: 998 acked, 2 written>]``, instead of Celery's
    repr of the batch cut at 1 KB (which also cost the node a sixth of publishing it).  Pure."""
    counts = Counter(r["state"] for r in batch)
    counts["written"] += sum(1 for r in batch if "written" in r)  # an ack that carries its write
    total = sum(counts.values())
    states = ", ".join(f"{count} {state}" for state, count in sorted(counts.items()) if count)
    return f"[<{total} receipt{'' if total == 1 else 's'}: {states}>]"

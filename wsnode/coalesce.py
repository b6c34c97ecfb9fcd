"""Many callers, one call at a time: what arrives while a call runs goes into the next one.  asyncio,
one event loop only (the node's loop thread); no sockets, unit-tested.

The node writes a lease for each user whose first connection opens, and releases it when the last
one closes.  One Redis pipeline per connection costs the loop a round trip each; when hundreds of
connections open or close a second (after a node or a proxy restarted), :class:`Coalescer` writes
the leases of all the users who connected (or releases those of all who left) while the previous
pipeline was in flight with one pipeline, and each caller still learns whether its own was written.
The token checks go the same way (``wsnode.auth``): one request to auth carries every token that
came while the previous one was in flight, and each caller gets its own token's answer.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")


class Coalescer(Generic[T, R]):
    """Runs ``flush(items)`` one call at a time, with every item submitted since the previous call
    started (at most ``max_items`` per call).

    ``flush`` returns None (each caller's ``submit`` then returns None), or one result per item, in
    the order of the items: each caller's ``submit`` returns its own, or raises it when it is an
    exception.  What ``flush`` raises reaches every caller of that call."""

    def __init__(self, flush: Callable[[list[T]], Awaitable[list[R | Exception] | None]], max_items: int = 1000) -> None:
        if max_items < 1:
            raise ValueError(f"max_items must be at least 1, got {max_items!r}")
        self._flush = flush
        self._max_items = max_items
        self._waiting: list[tuple[T, asyncio.Future]] = []
        self._running = False
        self._task: asyncio.Task | None = None  # referenced, so that it is not collected while it runs

    async def submit(self, item: T) -> R | None:
        """Return once a call that carried ``item`` returned, with ``item``'s result; raise what
        that call raised, or ``item``'s result when it is an exception."""
        future = asyncio.get_running_loop().create_future()
        self._waiting.append((item, future))
        if not self._running:
            self._running = True
            self._task = asyncio.get_running_loop().create_task(self._drain())
        return await future

    async def _drain(self) -> None:
        batch: list[tuple[T, asyncio.Future]] = []
        try:
            while self._waiting:
                batch, self._waiting = self._waiting[: self._max_items], self._waiting[self._max_items :]
                try:
                    results = await self._flush([item for item, _ in batch])
                    if results is not None and len(results) != len(batch):
                        raise RuntimeError(f"{self._flush!r} returned {len(results)} results for {len(batch)} items: a bug in it")
                except Exception as exc:  # noqa: BLE001 - handed to each caller of this call
                    _settle(batch, exc)
                else:
                    _settle(batch, None, results)
        except BaseException:  # cancelled (the loop is closing): so is every caller still waiting
            _settle(batch, asyncio.CancelledError())
            _settle(self._waiting, asyncio.CancelledError())
            self._waiting = []
            raise
        finally:
            self._running = False
            self._task = None

    def fail_waiting(self, error: Exception) -> int:
        """Raise ``error`` to the callers of every item submitted and not yet carried by a call (a
        ``flush`` that learnt its items' answer holds for them too, as it returns); returns how many."""
        waiting, self._waiting = self._waiting, []
        _settle(waiting, error)
        return len(waiting)

    def __len__(self) -> int:
        """Items submitted and not yet carried by a call."""
        return len(self._waiting)


def _settle(batch: list[tuple[object, asyncio.Future]], error: BaseException | None, results: list | None = None) -> None:
    for index, (_, future) in enumerate(batch):
        if future.done():
            continue  # its caller gave up waiting
        if error is None:
            result = None if results is None else results[index]
            if isinstance(result, Exception):
                future.set_exception(result)
            else:
                future.set_result(result)
        elif isinstance(error, asyncio.CancelledError):
            future.cancel()
        else:
            future.set_exception(error)

"""Keepalive pings for every open connection from one node-wide timer.  Loop thread only; the
bookkeeping is pure and unit-tested without sockets.

Tornado's own pings (``websocket_ping_interval``) run an asyncio Task per connection that sleeps
between pings: a Task, a coroutine frame and a sleeping timer for every idle connection, about a
tenth of the memory an idle connection costs.  Here each connection gets a turn, one of
``interval`` one-second slots, when it opens; every second the node pings the connections of one
slot and checks those it pinged ``timeout`` seconds before: one whose pong has not come by then is
closed (a dead peer, a half-open TCP connection).  So each connection is pinged every ``interval``
seconds, and a dead one is dropped within ``interval + timeout`` seconds, as with Tornado's.
"""

from __future__ import annotations

import itertools
from collections.abc import Hashable
from typing import Generic, TypeVar

C = TypeVar("C", bound=Hashable)


class PingSchedule(Generic[C]):
    """Which connections to ping, and which to give up on, at each one-second tick.  Pure."""

    def __init__(self, interval: int, timeout: int) -> None:
        if interval < 1 or not 0 < timeout <= interval:
            raise ValueError(f"need interval >= 1 and 0 < timeout <= interval, got {interval!r} and {timeout!r}")
        self.interval, self.timeout = interval, timeout
        #: slot -> its connections; only slots that hold some (an interval of a year took a set per second).
        self._slots: dict[int, set[C]] = {}
        self._slot_of: dict[C, int] = {}
        self._waiting: set[C] = set()  # pinged, no pong yet
        self._next_slot = itertools.count()
        self._tick = 0

    def add(self, conn: C) -> None:
        slot = next(self._next_slot) % self.interval
        self._slots.setdefault(slot, set()).add(conn)
        self._slot_of[conn] = slot

    def remove(self, conn: C) -> None:
        slot = self._slot_of.pop(conn, None)
        if slot is not None:
            held = self._slots[slot]
            held.discard(conn)
            if not held:
                del self._slots[slot]
        self._waiting.discard(conn)

    def pong(self, conn: C) -> None:
        self._waiting.discard(conn)

    def tick(self) -> tuple[list[C], list[C]]:
        """One second passed: ``(to_ping, timed_out)``.  The caller pings the first and closes
        the second (and removes them)."""
        tick, self._tick = self._tick, self._tick + 1
        check = self._slots.get((tick - self.timeout) % self.interval, ())
        timed_out = [conn for conn in check if conn in self._waiting] if tick >= self.timeout else []
        gone = set(timed_out)  # the same slot when timeout == interval
        to_ping = [conn for conn in self._slots.get(tick % self.interval, ()) if conn not in gone]
        self._waiting.update(to_ping)
        return to_ping, timed_out

    def __len__(self) -> int:
        return len(self._slot_of)

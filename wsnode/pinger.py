"""Keepalive pings for every open connection from one node-wide timer.  Loop thread only; the
bookkeeping is pure and unit-tested without sockets.

Tornado's own pings (``websocket_ping_interval``) run an asyncio Task per connection that sleeps
between pings: a Task, a coroutine frame and a sleeping timer for every idle connection, about a
tenth of the memory an idle connection costs.  Here each connection gets a turn, one of
``interval`` one-second slots, when it opens; every second the node pings the connections of one
slot and checks those it pinged ``timeout`` seconds before: one whose pong has not come by then is
closed (a dead peer, a half-open TCP connection).  So each connection is pinged every ``interval``
seconds, and a dead one is dropped within ``interval + timeout`` seconds, as with Tornado's.

Each tick's pings carry a fresh random payload (:attr:`PingSchedule.payload`), and only a pong that
echoes its connection's (RFC 6455 has every pong echo its ping) answers it: any pong counted, so a
client that read nothing (its opening replay, up to ``REPLAY_MAX_BYTES``, held in the node's write
buffer for it) but sent a pong of its own every second was never closed.
"""

from __future__ import annotations

import itertools
import secrets
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

C = TypeVar("C", bound=Hashable)


class PingSchedule(Generic[C]):
    """Which connections to ping, and which to give up on, at each one-second tick.  Pure."""

    def __init__(self, interval: int, timeout: int, nonce: Callable[[], bytes] = lambda: secrets.token_bytes(8)) -> None:
        if interval < 1 or not 0 < timeout <= interval:
            raise ValueError(f"need interval >= 1 and 0 < timeout <= interval, got {interval!r} and {timeout!r}")
        self.interval, self.timeout = interval, timeout
        self._nonce = nonce
        #: What the pings of the last tick carry, and their pongs must echo.
        self.payload = b""
        #: slot -> its connections; only slots that hold some (an interval of a year took a set per second).
        self._slots: dict[int, set[C]] = {}
        self._slot_of: dict[C, int] = {}
        self._waiting: dict[C, bytes] = {}  # pinged, no pong yet: the payload its pong must echo
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
        self._waiting.pop(conn, None)

    def pong(self, conn: C, data: bytes) -> None:
        """A pong came from ``conn`` carrying ``data``: the answer to its ping if it echoes it."""
        if self._waiting.get(conn) == data:
            del self._waiting[conn]

    def tick(self) -> tuple[list[C], list[C]]:
        """One second passed: ``(to_ping, timed_out)``.  The caller pings the first, with
        :attr:`payload`, and closes the second (and removes them)."""
        tick, self._tick = self._tick, self._tick + 1
        self.payload = self._nonce()
        check = self._slots.get((tick - self.timeout) % self.interval, ())
        timed_out = [conn for conn in check if conn in self._waiting] if tick >= self.timeout else []
        gone = set(timed_out)  # the same slot when timeout == interval
        to_ping = [conn for conn in self._slots.get(tick % self.interval, ()) if conn not in gone]
        self._waiting.update(dict.fromkeys(to_ping, self.payload))
        return to_ping, timed_out

    def __len__(self) -> int:
        return len(self._slot_of)

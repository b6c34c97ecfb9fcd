"""When each connection's token runs out.  Pure; the node calls it on its loop thread only.

A connection lives on its token: auth says when the token expires (``expires_at``, unix seconds,
in the ``/verify`` answer and in the ``hello`` frame).  Before that a client sends a newer token
of the same user (``{"type": "refresh", "token": ...}``, push.js does it by itself) and the node
moves the connection's deadline; a connection still on an expired token ``grace`` seconds after
its expiry is closed with 4401 ``token expired``, and the client reconnects with a new token.
This is Centrifugo's connection expiration (its ``client_expired_close_delay`` is this grace), so
that a user whose backend stopped giving tokens (logged out, banned) does not keep a connection for
days on one token.

The deadlines are kept in one-second buckets, as :mod:`wsnode.pinger` keeps its slots: adding,
moving and removing a connection cost a dict and a set operation, nothing stays behind a closed
connection, and each tick of the node's one-second timer reads only the buckets that came due.
"""

from __future__ import annotations

import math
from collections.abc import Hashable
from typing import Generic, TypeVar

C = TypeVar("C", bound=Hashable)


class ExpirySchedule(Generic[C]):
    """Which connections' tokens ran out (``grace`` seconds ago) at each tick.  Pure."""

    def __init__(self, grace: float) -> None:
        if grace < 0:
            raise ValueError(f"grace must be >= 0 seconds, got {grace!r}")
        self.grace = grace
        self._buckets: dict[int, set[C]] = {}
        self._bucket_of: dict[C, int] = {}
        self._checked: int | None = None  # the last second whose bucket was read

    def set(self, conn: C, expires_at: int | None) -> None:
        """``conn`` now lives on a token that expires at ``expires_at`` (None: never)."""
        self.remove(conn)
        if expires_at is None:
            return
        second = math.ceil(expires_at + self.grace)
        if self._checked is not None and second <= self._checked:
            second = self._checked + 1  # due already: the next tick closes it
        self._buckets.setdefault(second, set()).add(conn)
        self._bucket_of[conn] = second

    def remove(self, conn: C) -> None:
        second = self._bucket_of.pop(conn, None)
        if second is not None:
            bucket = self._buckets[second]
            bucket.discard(conn)
            if not bucket:
                del self._buckets[second]

    def due(self, now: float) -> list[C]:
        """The connections whose deadline is at or before unix time ``now``, removed from the
        schedule; the caller closes them."""
        upto = math.floor(now)
        if self._checked is None or upto - self._checked > len(self._buckets):
            # The first tick, or a gap longer than there are buckets (a clock jump): read the buckets.
            seconds = sorted(second for second in self._buckets if second <= upto)
        else:
            seconds = [second for second in range(self._checked + 1, upto + 1) if second in self._buckets]
        # A clock that went back moves the mark back with it: nothing at or before the old mark is
        # left in the buckets, and a deadline set now must come due by the clock as it is.
        self._checked = upto
        out: list[C] = []
        for second in seconds:
            for conn in self._buckets.pop(second):
                del self._bucket_of[conn]
                out.append(conn)
        return out

    def __len__(self) -> int:
        return len(self._bucket_of)

    def __contains__(self, conn: object) -> bool:
        return conn in self._bucket_of

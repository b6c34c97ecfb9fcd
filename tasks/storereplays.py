"""The message store's reads for a browser that connects: a replay of what came after an id
(:meth:`StoreReplays.each_replay` and its one-connection forms) and the user's inbox
(:meth:`StoreReplays.unacked`), as envelopes, newest kept within a limit and a byte budget.  What
``tasks.replay`` and ``tasks.replay_many`` read (:mod:`tasks.replay`).

On the embedded engine a replay from an id with at most ``_EMBEDDED_RANGE_ROWS`` messages after it
reads them all through the primary key (:func:`tasks.storesql.id_range`), and the replays of one
``tasks.replay_many`` share that read; beyond, and on MongoDB, each goes through the ``to`` index.
:meth:`StoreReplays.index_pinned` keeps the embedded engine's query index as of a task's first read.

:class:`StoreReplays` is a part of :class:`tasks.store.Store` (a mixin), written apart because it
is one concept: it uses the store's ``_messages``, ``_receipts``, ``embedded``, ``message_data``,
``_distinct`` and ``_acked``.  Worker process only, the store's own thread, as the rest of
:class:`~tasks.store.Store`; it logs nothing.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from tasks import storesql
from tasks.storedocs import BROADCAST, Cut, newest_first, replays_from
from tasks.storeerrors import translated

#: On the embedded engine a replay reads every message after its ``since`` through the primary key
#: when there are at most this many (about 10 us each to decode here); beyond, through the index.
_EMBEDDED_RANGE_ROWS = 5000


class StoreReplays:
    """The part of :class:`tasks.store.Store` that reads replays and inboxes (see the module docstring)."""

    def replay(self, user: str, after_id: str, limit: int, cut: Cut | None = None) -> tuple[list[dict], bool]:
        """Envelopes ``{"id", "data"}`` of the messages to ``user`` or to everyone with an id above
        ``after_id``, oldest first.  At most the newest ``limit``; True when older ones were left out.

        ``cut`` (:data:`Cut`, e.g. :func:`tasks.replay.newest_within` with ``REPLAY_MAX_BYTES``)
        is given those newest ``limit`` newest first, as their data is read, and returns what it
        keeps, oldest first, and whether it left any out (then the replay is truncated too); the
        data is read in growing reads (``_REPLAY_READ_IDS``, then twice as many each time), and no
        further once the cut returns."""
        return self.replays([(user, after_id)], limit, cut)[0]

    def replays(self, wanted: list[tuple[str, str]], limit: int, cut: Cut | None = None) -> list[tuple[list[dict], bool]]:
        """:meth:`replay` for each ``(user, after_id)`` of ``wanted``, in order: :meth:`each_replay`, all read."""
        return list(self.each_replay(wanted, limit, cut))

    def each_replay(self, wanted: list[tuple[str, str]], limit: int, cut: Cut | None = None) -> Iterator[tuple[list[dict], bool]]:
        """:meth:`replay` for each ``(user, after_id)`` of ``wanted``, in order, each read as it is
        taken, so a caller that lets go of one before it takes the next holds one at a time.

        On the embedded engine, when at most ``_EMBEDDED_RANGE_ROWS`` messages were stored after
        the earliest ``after_id`` (a browser back after seconds or minutes), one read of them all,
        whoever they are for, through the primary key serves every replay (the connections of one
        ``tasks.replay_many``, often a reconnect storm's), rather than have mongomock rebuild the
        index of the whole collection first (another process nearly always wrote since its last
        read while messages flow).  Otherwise each replay from that earliest id goes through the
        index, and each of the others tries the same for itself.  (That one read holds every message
        it finds, at most ``_EMBEDDED_RANGE_ROWS``: ``cut`` bounds what each replay keeps of it.)"""
        if limit < 1:
            raise ValueError(f"limit must be at least 1, got {limit!r}")
        return self._each_replay(wanted, limit, cut)

    def _each_replay(self, wanted: list[tuple[str, str]], limit: int, cut: Cut | None) -> Iterator[tuple[list[dict], bool]]:
        if not wanted:
            return
        first = min(after for _, after in wanted)
        with translated(f"replaying for {len(wanted)} connections"):
            recent = storesql.id_range(self._messages, first, first_included=False, most=_EMBEDDED_RANGE_ROWS)
        if recent is not None:
            yield from replays_from(recent, wanted, limit, cut)
            return
        for user, after in wanted:
            yield self._replay_by_index(user, after, limit, cut) if after == first else self.replays([(user, after)], limit, cut)[0]

    def _replay_by_index(self, user: str, after_id: str, limit: int, cut: Cut | None) -> tuple[list[dict], bool]:
        """:meth:`replay` through the ``to`` index (on the embedded engine, mongomock's)."""
        query = {"to": {"$in": [user, BROADCAST]}, "_id": {"$gt": after_id}}
        with translated(f"replaying for user {user!r}"):
            if self.embedded:
                # mongomock's cursor copies its result list on every next() (quadratic); distinct() doesn't.
                newest = sorted(self._messages.distinct("_id", query), reverse=True)[: limit + 1]
            else:
                newest = [doc["_id"] for doc in self._messages.find(query, {"_id": 1}).sort("_id", -1).limit(limit + 1)]
            truncated = len(newest) > limit
            envelopes, cut_short = self._envelopes(sorted(newest[:limit]), cut)
        return envelopes, truncated or cut_short

    def _envelopes(self, mids: list[str], cut: Cut | None) -> tuple[list[dict], bool]:
        """Envelopes of the messages ``mids`` (oldest first) that are still stored (a message purged
        since its id was read is simply missing), oldest first, and whether ``cut`` left any out.
        With ``cut``, their data is read newest first, in growing reads (:func:`storedocs.newest_first`),
        and only until the cut stops taking them; without, in one go."""
        if cut is None:
            found = self.message_data(mids)
            return [{"id": mid, "data": found[mid]} for mid in mids if mid in found], False
        return cut(newest_first(mids, self.message_data))

    @contextlib.contextmanager
    def index_pinned(self) -> Iterator[None]:
        """On the embedded engine, the reads inside use the query index as of the first of them,
        even when other processes write meanwhile, instead of rebuilding it from the whole
        collection at each read that follows a write elsewhere (about 1.3 s per 100,000 messages
        here, at every read of a busy store).  Only for reads that may miss what other processes
        write while they run: a ``tasks.replay_many``, whose connections' routes were registered
        before it started, so that a message stored after its first read is routed to them live.
        The first read after the block sees everything again.  Nothing to do on MongoDB."""
        with storesql.index_pinned((self._messages, self._receipts) if self.embedded else ()):
            yield

    def unacked(self, user: str, limit: int, cut: Cut | None = None) -> tuple[list[dict], bool]:
        """Envelopes of the messages addressed to ``user`` (broadcasts excluded) that no device of
        theirs acked, oldest first: the newest ``limit``, and True when older ones were left out.
        ``cut``: as for :meth:`replay`."""
        with translated(f"reading the inbox of user {user!r}"):
            mids = sorted(self._distinct(self._messages, "_id", {"to": user}))  # a user id is never "*"
            acked = self._acked([(mid, user) for mid in mids])
            pending = [mid for mid in mids if (mid, user) not in acked]
            envelopes, cut_short = self._envelopes(pending[-limit:], cut)
        return envelopes, len(pending) > limit or cut_short

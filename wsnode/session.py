"""What one connection is owed, in order, while its opening replay runs.  Pure; loop thread only.

Every connection starts *replaying*: with ``since`` it is owed every message after that id, without
it the user's inbox (messages no device acked).  Live messages that arrive meanwhile are held back;
the replay pages are written as they come; when the last page arrives the ``resumed`` frame is
written, then the held-back live messages that the replay did not already contain.  What is held
is bounded twice: at most ``max_backlog`` messages and ``max_backlog_bytes`` bytes of frames, as
UTF-8 on the wire (the node passes ``CLIENT_QUEUE_MAX_BYTES``, the bound on what a live connection
may leave unread);
beyond either, :class:`BacklogOverflow` says the client should resume later with ``since``, from
the store, rather than have the node hold its messages in memory.  A live copy of
a replayed message can also arrive *after* the replay (its dispatch was slower than the replay):
the session keeps the replayed ids until :meth:`forget_replayed` (the node calls it a little
later) and drops such copies.  Each method returns the ``(message id, frame)`` pairs to write, in
order (``None`` as the id of a control frame).
"""

from __future__ import annotations

from wsnode import protocol

Outgoing = list[tuple[str | None, str]]
_NOTHING: frozenset[str] = frozenset()  # shared: an idle connection keeps no set of its own


def utf8_length(frame: str) -> int:
    """The bytes ``frame`` takes on the wire.  Frames keep non-ASCII text as it is (a CJK character
    is 3 bytes, an emoji 4), so the length in characters can be a quarter of it; an ASCII frame,
    the common case, is measured without encoding it (``str.isascii`` reads a flag)."""
    return len(frame) if frame.isascii() else len(frame.encode("utf-8", "surrogatepass"))


class BacklogOverflow(RuntimeError):
    """Too many live messages arrived during a replay; the client should reconnect with ``since``."""


class Session:
    # One per connection, for as long as it lives: no per-instance dictionary.
    __slots__ = ("since", "replaying", "_held", "_held_bytes", "_replayed", "_max_backlog", "_max_backlog_bytes")

    def __init__(self, since: str | None, max_backlog: int = 10000, max_backlog_bytes: int | None = None) -> None:
        self.since = since
        self.replaying = True
        self._held: Outgoing = []
        self._held_bytes = 0
        self._replayed: set[str] | frozenset[str] = set()
        self._max_backlog = max_backlog
        self._max_backlog_bytes = max_backlog_bytes

    def live(self, message_id: str, frame: str) -> Outgoing:
        if not self.replaying:
            return [] if message_id in self._replayed else [(message_id, frame)]
        if len(self._held) >= self._max_backlog:
            raise BacklogOverflow(f"more than {self._max_backlog} live messages arrived during the replay")
        held = self._held_bytes + utf8_length(frame)
        # The first message is held whatever its size: a bound below one message must not make a
        # connection that gets one during its replay unable to resume.
        if self._max_backlog_bytes is not None and self._held and held > self._max_backlog_bytes:
            raise BacklogOverflow(f"more than {self._max_backlog_bytes} bytes of live messages arrived during the replay")
        self._held.append((message_id, frame))
        self._held_bytes = held
        return []

    def replay_page(self, items: Outgoing, last: bool, count: int = 0, truncated: bool = False, cursor: str | None = None) -> Outgoing:
        if not self.replaying:
            return []  # a late page after a timeout: the client already resumed another way
        out = list(items)
        self._replayed.update(message_id for message_id, _ in items)
        if last:
            out.append((None, protocol.resumed_frame(self.since, count, truncated, cursor)))
            out.extend(pair for pair in self._held if pair[0] not in self._replayed)
            self._held.clear()
            self.replaying = False
        return out

    def forget_replayed(self) -> None:
        """Stop dropping live copies of replayed messages (frees their ids)."""
        self._replayed = _NOTHING

"""What one connection is owed, in order, while a resume runs.  Pure; loop thread only.

A connection opened with ``since`` starts *replaying*: live messages that arrive meanwhile are held
back, the replay pages are written as they come, and when the last page arrives the ``resumed``
frame is written, then the held-back live messages that the replay did not already contain.  A
connection without ``since`` is live at once.  Each method returns the frames to write, in order.
"""

from __future__ import annotations

from wsnode import protocol


class BacklogOverflow(RuntimeError):
    """Too many live messages arrived during a replay; the client should reconnect with ``since``."""


class Session:
    def __init__(self, since: str | None, max_backlog: int = 10000) -> None:
        self.since = since
        self.replaying = since is not None
        self._held: list[tuple[str, str]] = []
        self._replayed: set[str] = set()
        self._max_backlog = max_backlog

    def live(self, message_id: str, frame: str) -> list[str]:
        if not self.replaying:
            return [frame]
        if len(self._held) >= self._max_backlog:
            raise BacklogOverflow(f"more than {self._max_backlog} live messages arrived during the replay")
        self._held.append((message_id, frame))
        return []

    def replay_page(self, items: list[tuple[str, str]], last: bool, count: int = 0, truncated: bool = False) -> list[str]:
        if not self.replaying:
            return []  # a late page after a timeout: the client already resumed another way
        frames = [frame for _, frame in items]
        self._replayed.update(message_id for message_id, _ in items)
        if last:
            frames.append(protocol.resumed_frame(self.since, count, truncated))
            frames.extend(frame for message_id, frame in self._held if message_id not in self._replayed)
            self._held.clear()
            self._replayed.clear()
            self.replaying = False
        return frames

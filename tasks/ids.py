"""Message ids: fixed-width hex strings that sort in the order the messages were collected.

Pure; one generator per process (any thread, it locks).

An id is 24 hex characters: 12 for the milliseconds since the epoch, 6 for a counter, 6 for a
random tag drawn once per process.  Ids from one process are strictly increasing, even when the
clock steps back.  Ids from two processes collected in the same millisecond have no defined order
between them, which is why a resume replays from a little before the client's last id
(``settings.RESUME_OVERLAP_MS``) and clients drop repeats by id.

The form is also a valid MongoDB ObjectId string, but the platform stores it as a plain string.
"""

from __future__ import annotations

import os
import re
import threading
import time

_ID = re.compile(r"[0-9a-f]{24}")
_HEX_DIGITS = frozenset("0123456789abcdef")
_COUNTER_MAX = 0xFFFFFF


class MessageIdError(ValueError):
    """A string that should be a message id is not one."""


def is_message_id(value: object) -> bool:
    return isinstance(value, str) and _ID.fullmatch(value) is not None


def id_problem(value: object) -> str | None:
    """Why ``value`` is not a message id, in words for an error message; None when it is one.  Pure."""
    if is_message_id(value):
        return None
    if not isinstance(value, str):
        return f"{type(value).__name__}, not a string"
    if len(value) == 24 and _ID.fullmatch(value.lower()):
        return "upper-case hex: ids are lower-case, as tasks.collect returns them"
    if len(value) == 24:  # the right length: what is wrong is a character
        bad = next(char for char in value if char.lower() not in _HEX_DIGITS)  # as given: 'G', not 'g'
        return f"not hex ({bad!r:.12}): an id is 24 lower-case hex characters"
    return f"{len(value)} characters; an id is 24 lower-case hex characters"


def timestamp_ms(message_id: str) -> int:
    """Milliseconds since the epoch at which ``message_id`` was made."""
    if not is_message_id(message_id):
        raise MessageIdError(f"{message_id!r} is not a message id: expected 24 lowercase hex characters, as sent in the 'id' of a message frame")
    return int(message_id[:12], 16)


def lower_bound(ms: int) -> str:
    """The smallest id that could have been made at millisecond ``ms``."""
    return f"{max(ms, 0):012x}" + "0" * 12


class IdGenerator:
    """Makes strictly increasing ids for one process."""

    def __init__(self, clock=time.time, tag: int | None = None) -> None:
        self._clock = clock
        self._tag = int.from_bytes(os.urandom(3), "big") if tag is None else tag
        self._lock = threading.Lock()
        self._last_ms = 0
        self._counter = 0

    def next_ids(self, count: int) -> list[str]:
        with self._lock:
            ms = int(self._clock() * 1000)
            if ms > self._last_ms:
                self._last_ms, self._counter = ms, 0
            ids = []
            for _ in range(count):
                if self._counter > _COUNTER_MAX:
                    self._last_ms, self._counter = self._last_ms + 1, 0
                ids.append(f"{self._last_ms:012x}{self._counter:06x}{self._tag:06x}")
                self._counter += 1
            return ids

    def next_id(self) -> str:
        return self.next_ids(1)[0]

"""Checkpoints of the embedded store's SQLite write-ahead logs, on a thread of their own.

The embedded store (litemongo) keeps each collection in an SQLite file in WAL mode.  SQLite's
default is that the commit which takes a log past 1,000 pages (4 MB) copies the whole log back
into the file before it returns: 6 to 8 ms here, about every 2 s of a worker collecting 1,000
messages a second, inside whichever task made that commit.  Those stalls were the slowest
deliveries of ``bench/e2e.py``'s latency row.

So :meth:`tasks.store.Store.open` raises its connections' automatic threshold to
:data:`SAFETY_NET_PAGES` (a last resort, should this thread stop) and starts a
:class:`Checkpointer`, which runs a passive checkpoint of each file every ``interval`` seconds on
its own connections.  A passive checkpoint takes no lock that a writer or a reader waits for: a
commit made meanwhile goes on appending to the log, and a checkpoint that finds another one
running (another worker process's) just skips that round.  It changes no data, so it does not
make litemongo rebuild its query indexes (``PRAGMA data_version`` stays the same).

Threading: the checkpointer's connections are opened and used on its thread only; the store's own
connections never leave the store's thread.  sqlite3 releases the GIL while it copies, so the
tasks of the process keep running.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
from collections.abc import Sequence

import settings
from tasks import storedisk

log = logging.getLogger(__name__)

#: The automatic checkpoint threshold, in pages, of the store's own connections while a
#: :class:`Checkpointer` runs: 40 MB of log, reached only if the checkpointer stops.
SAFETY_NET_PAGES = 10_000

#: What a write-ahead log keeps of its file once it was copied back whole (SQLite's
#: ``journal_size_limit``): SQLite reuses a log from its start and never shrinks its file by
#: itself, so a log that grew large once (a purge after a long outage, a backlog taken in big
#: transactions) kept that size on disk for good.  A few seconds' worth of writes at full speed.
WAL_KEEP_BYTES = 16 * 1024 * 1024

#: Seconds between two checkpoints of a file.
INTERVAL_SECONDS = 1.0


def database_file(connection: sqlite3.Connection) -> str:
    """The file of ``connection``'s main database ("" for an in-memory one)."""
    for _seq, name, path in connection.execute("PRAGMA database_list"):
        if name == "main":
            return path or ""
    return ""


class Checkpointer:
    """Checkpoints the write-ahead logs of ``paths`` every ``interval`` seconds, on a daemon thread."""

    def __init__(self, paths: Sequence[str], interval: float = INTERVAL_SECONDS) -> None:
        self.paths = list(dict.fromkeys(paths))
        self.interval = interval
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._connections: dict[str, sqlite3.Connection] = {}
        self._failing: set[str] = set()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="store-checkpoints", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the thread (after the checkpoint in hand); its connections close as it ends, or
        here when it is not running (those of :meth:`checkpoint` called without the thread)."""
        self._stopping.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)
        if not self.running:
            for path in list(self._connections):
                self._close(path)

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def checkpoint(self) -> dict[str, tuple[int, int, int]]:
        """One passive checkpoint of every file: ``{path: (busy, pages in the log, pages copied)}``
        (SQLite's answer; busy is 1 when another checkpoint was running).  A file that fails is
        logged once per failing spell and left out.  The checkpointer's thread only, or a caller
        when the thread is not running."""
        done: dict[str, tuple[int, int, int]] = {}
        for path in self.paths:
            try:
                connection = self._connections.get(path)
                if connection is None:
                    connection = self._connections[path] = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
                busy, pages, copied = connection.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
            except sqlite3.Error as exc:
                if path not in self._failing:
                    log.warning("store checkpoint of %s failed (%s): %s; the store's own commits checkpoint it past %d pages",
                                path, exc, storedisk.explain(exc, os.path.abspath(settings.DATA_DIR), os.path.dirname(path)), SAFETY_NET_PAGES)
                    self._failing.add(path)
                self._close(path)
                continue
            if path in self._failing:
                log.info("store checkpoint of %s works again", path)
                self._failing.discard(path)
            done[path] = (busy, pages, copied)
        return done

    def _run(self) -> None:
        try:
            while not self._stopping.wait(self.interval):
                self.checkpoint()
        except Exception:  # noqa: BLE001 - the safety net of the store's connections takes over
            log.exception("the store's checkpoint thread stopped; the store's own commits checkpoint past %d pages", SAFETY_NET_PAGES)
        finally:
            for path in list(self._connections):
                self._close(path)

    def _close(self, path: str) -> None:
        connection = self._connections.pop(path, None)
        if connection is not None:
            try:
                connection.close()
            except sqlite3.Error:
                pass

"""The embedded store's lock on claiming idempotency keys: one process at a time, across the worker
processes that share ``DATA_DIR``.

litemongo checks that an ``_id`` is free and then upserts, so two processes inserting the same
``_id`` at once would both "succeed", and a message run twice concurrently would get two ids.
MongoDB itself enforces ``_id`` atomically and needs no lock (:meth:`tasks.store.Store.claim_many`
takes it on the embedded engine only).  An ``flock`` on ``DATA_DIR/mongo/keys.lock``.

Worker process; any thread (each :func:`held` opens the file anew).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator

from tasks.storeerrors import StoreUnavailable, embedded_folder, explain_disk


@contextlib.contextmanager
def held() -> Iterator[None]:
    """Hold the lock inside; StoreUnavailable when its file cannot be opened (a disk that refuses)."""
    path = os.path.join(embedded_folder(), "keys.lock")
    try:
        # Read-only (flock needs no more): opening it to append failed on a file system
        # mounted read-only with a bare OSError, which failed the requests at once.
        handle = os.open(path, os.O_RDONLY | os.O_CREAT, 0o644)
    except OSError as exc:
        raise StoreUnavailable(f"cannot open the embedded store's lock file {path} ({exc}): {explain_disk(exc)}") from exc
    try:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
    finally:
        os.close(handle)

"""What to tell an operator when the embedded store's SQLite files refuse a write.

SQLite reports the disk's refusals in a few codes that do not say which one it was: a full disk is
``SQLITE_FULL`` ("database or disk is full") when a write ran out of space part-way, but
``SQLITE_IOERR_WRITE`` ("disk I/O error") when it wrote nothing, as is a file that reached the
process's file size limit (``EFBIG``: ``ulimit -f``, systemd's ``LimitFSIZE``; Python ignores
``SIGXFSZ``, so the write fails instead of killing the process); a folder the worker's user may
not write, or a file system mounted read-only, is ``SQLITE_READONLY`` or ``SQLITE_CANTOPEN``.
:func:`facts` looks at the disk when such an error comes, and :func:`advice` (pure) says which
case it is and what to do.

Any thread (the store's, the checkpointer's).
"""

from __future__ import annotations

import dataclasses
import os
import resource
import sqlite3

# SQLite's primary result codes (an extended code's low byte).
SQLITE_PERM, SQLITE_BUSY, SQLITE_LOCKED, SQLITE_READONLY, SQLITE_IOERR, SQLITE_FULL, SQLITE_CANTOPEN = 3, 5, 6, 8, 10, 13, 14

#: Below this many free bytes, a disk I/O error of a write is taken for a full disk.
LOW_SPACE_BYTES = 1 << 20

#: The fallback, when the disk shows nothing wrong.
GENERIC = "check that the disk is local, writable and not full, and that no stuck process holds its files"


@dataclasses.dataclass(frozen=True)
class Facts:
    """What :func:`advice` needs to know of the error and of the disk.  ``code``: SQLite's
    (extended) result code, None when unknown; ``free_bytes``: what this process may still write
    on the folder's file system (None: unknown); ``file_size_limit``: the process's soft
    ``RLIMIT_FSIZE`` in bytes, None when unlimited; ``largest_file``: the size of the largest file
    of the folder."""

    data_dir: str
    code: int | None = None
    free_bytes: int | None = None
    read_only_mount: bool = False
    writable: bool = True
    user: str = ""
    file_size_limit: int | None = None
    largest_file: int = 0


def advice(facts: Facts) -> str:
    """Which of the disk's refusals ``facts`` shows, and what to do, in a clause.  Pure."""
    primary = None if facts.code is None else facts.code & 0xFF
    if primary in (SQLITE_BUSY, SQLITE_LOCKED):
        return "another process holds its files locked: check that no stuck process holds them, and that the disk is local (not a network file system)"
    if facts.read_only_mount:
        return ("the file system of DATA_DIR is mounted read-only (a disk error makes the kernel do that: check its log): "
                "remount it read-write")
    if primary in (SQLITE_READONLY, SQLITE_CANTOPEN, SQLITE_PERM) and not facts.writable:
        return (f"the worker's user ({facts.user}) may not write its folder or files: give that user write access to "
                f"{facts.data_dir} and everything in it, or set DATA_DIR to a folder it owns")
    if primary in (SQLITE_FULL, SQLITE_IOERR, SQLITE_CANTOPEN):
        if facts.file_size_limit is not None and facts.largest_file >= facts.file_size_limit - 65536:
            return (f"a file of it reached the worker's file size limit ({facts.file_size_limit} bytes: ulimit -f, or "
                    "LimitFSIZE of a systemd unit): remove that limit for the worker")
        if primary == SQLITE_FULL or (facts.free_bytes is not None and facts.free_bytes < LOW_SPACE_BYTES):
            free = "" if facts.free_bytes is None else f", {facts.free_bytes} bytes free now"
            return f"the disk of DATA_DIR ({facts.data_dir}) is full{free}: free space on it, or move DATA_DIR to a larger disk"
        if primary == SQLITE_IOERR:
            return "the disk failed to read or write: check it (the kernel's log) and that it is a local disk"
    return GENERIC


def facts(exc: BaseException, data_dir: str, folder: str | None = None) -> Facts:
    """The :class:`Facts` of ``exc`` (an sqlite3 error, or an OSError) for the store in
    ``folder`` (default ``data_dir``), read from the disk now."""
    folder = folder or data_dir
    code = getattr(exc, "sqlite_errorcode", None)
    if code is None and isinstance(exc, OSError):
        code = {28: SQLITE_FULL, 27: SQLITE_FULL, 30: SQLITE_READONLY, 13: SQLITE_READONLY, 1: SQLITE_READONLY}.get(exc.errno or 0, SQLITE_IOERR)
    free, read_only = None, False
    try:
        stat = os.statvfs(folder)
        free = (stat.f_bfree if os.geteuid() == 0 else stat.f_bavail) * stat.f_frsize
        read_only = bool(stat.f_flag & os.ST_RDONLY)
    except OSError:
        pass
    sizes, writable = [0], os.access(folder, os.W_OK)
    try:
        with os.scandir(folder) as entries:
            for entry in entries:
                if entry.is_file():
                    sizes.append(entry.stat().st_size)
                    writable = writable and os.access(entry.path, os.W_OK)
    except OSError:
        pass
    soft, _ = resource.getrlimit(resource.RLIMIT_FSIZE)
    return Facts(data_dir=data_dir, code=code, free_bytes=free, read_only_mount=read_only, writable=writable, user=_user(),
                 file_size_limit=None if soft == resource.RLIM_INFINITY else soft, largest_file=max(sizes))


def explain(exc: BaseException, data_dir: str, folder: str | None = None) -> str:
    """:func:`advice` for ``exc``, from the disk as it is now."""
    try:
        return advice(facts(exc, data_dir, folder))
    except Exception:  # noqa: BLE001 - an explanation must never hide the error it explains
        return GENERIC


def is_disk_refusal(exc: BaseException) -> bool:
    """Whether ``exc`` is SQLite's report of a disk that refused a write or an open (not a lock
    held by another process, which goes away by itself)."""
    code = getattr(exc, "sqlite_errorcode", None)
    return isinstance(exc, sqlite3.Error) and code is not None and code & 0xFF in (SQLITE_PERM, SQLITE_READONLY, SQLITE_IOERR, SQLITE_FULL, SQLITE_CANTOPEN)


def _user() -> str:
    uid = os.geteuid()
    try:
        import pwd

        return f"{pwd.getpwuid(uid).pw_name}, uid {uid}"
    except (ImportError, KeyError):
        return f"uid {uid}"


def unwritable(folder: str | os.PathLike) -> OSError | None:
    """Why ``folder`` cannot hold data files (made with its parents if missing, then a file
    created in it and removed), or None when it can: a path that is a file, a folder of another
    user, a read-only file system."""
    import tempfile

    try:
        os.makedirs(folder, exist_ok=True)
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as exc:
        return exc
    return None


def folder_problem(data_dir: str) -> str | None:
    """What stops the embedded store from using ``DATA_DIR``, and what to do, in one line; None
    when it can (:func:`unwritable`)."""
    path = os.path.abspath(data_dir)
    exc = unwritable(path)
    if exc is None:
        return None
    return (f"DATA_DIR={data_dir!r} ({path}) cannot hold the message store ({exc.strerror or exc}): set DATA_DIR to a local "
            f"folder the worker's user ({_user()}) may write, or MONGO_URL to a MongoDB")

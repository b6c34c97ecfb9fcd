"""The errors of the message store (:mod:`tasks.store`), and what a driver's or SQLite's error
becomes (:func:`translated`; opening the store, :func:`opening_mongo` and :func:`opening_embedded`):
:class:`StoreError`, for anything the store cannot do; :class:`StoreUnavailable`, for a
server or disk that cannot be reached right now, or a server that refuses for now (no primary, a
write its replica set did not confirm): transient, retry with backoff.  Each says what to check.

Worker process only (it reads the settings that name the store).
"""

from __future__ import annotations

import contextlib
import errno
import os
import sqlite3
from collections.abc import Iterator

import bson.errors
from pymongo import errors

import settings
from tasks import storedisk


#: MongoDB's code for a duplicate key (an ``_id`` stored already).
DUPLICATE_KEY = 11000

#: MongoDB's codes for "not now" (a replica set electing a primary, a member shutting down, a
#: network error between members, a write its members did not confirm in time): the retryable
#: writes specification's list, plus MaxTimeMSExpired (50) and WriteConcernFailed (64, wtimeout).
#: pymongo raises most of them as AutoReconnect; these come as OperationFailure (a write concern
#: error) or inside a BulkWriteError.
_TRANSIENT_CODES = frozenset({6, 7, 50, 64, 89, 91, 134, 189, 262, 9001, 10058, 10107, 11600, 11602, 13435, 13436})

#: AuthenticationFailed, Unauthorized: MONGO_URL's user, or its roles.
ACCESS_CODES = frozenset({13, 18})


class StoreError(Exception):
    """The store could not do what was asked."""


class StoreUnavailable(StoreError):
    """MongoDB or the embedded store's disk cannot be reached now; retry later."""


#: SQLite's SQLITE_CORRUPT and SQLITE_NOTADB: a file of the embedded store is damaged.
_DAMAGED = frozenset({11, 26})

#: An OSError of these, opening the embedded store, is a disk that may be freed or remounted, or
#: rights that may be given (the error names the worker's user).
DISK_ERRNOS = frozenset({errno.ENOSPC, errno.EFBIG, errno.EROFS, errno.EDQUOT, errno.EACCES, errno.EPERM})


def embedded_folder() -> str:
    """The embedded store's folder, ``DATA_DIR/mongo``, as an absolute path (what errors name)."""
    return os.path.abspath(os.path.join(settings.DATA_DIR, "mongo"))


def explain_disk(exc: BaseException) -> str:
    """What the embedded store's disk refused, and what to do (:mod:`tasks.storedisk`)."""
    where = embedded_folder()
    return storedisk.explain(exc, os.path.abspath(settings.DATA_DIR), os.path.join(where, settings.MONGO_DB))


def dns_for_now(exc: Exception) -> bool:
    """Whether pymongo's error making a client is a DNS lookup of a ``mongodb+srv://`` URL that
    may work later (timed out, no name server answered), rather than a URL or options it refuses
    (which are ConfigurationErrors too), or a name that has no such records."""
    from dns.exception import DNSException
    from dns.resolver import NXDOMAIN, NoAnswer

    cause = exc.__cause__
    return isinstance(exc, errors.ConfigurationError) and isinstance(cause, DNSException) and not isinstance(cause, (NXDOMAIN, NoAnswer))


def duplicates_only(exc: errors.BulkWriteError) -> set[int] | None:
    """The indexes of the documents an unordered ``insert_many`` skipped because their ``_id`` was
    stored already, when those are all ``exc`` holds; None when it holds any other error."""
    details = exc.details
    if details.get("writeConcernErrors") or any(e.get("code") != DUPLICATE_KEY for e in details.get("writeErrors", ())):
        return None
    return {e["index"] for e in details.get("writeErrors", ())}


def transient(exc: errors.OperationFailure) -> bool:
    """Whether MongoDB refused ``exc``'s operation for now rather than for good: a code of
    ``_TRANSIENT_CODES``, or the server's RetryableWriteError label.  A BulkWriteError is when each
    of its errors but the duplicate keys is (``insert_many`` reports a write concern error, such as
    a primary stepping down before the majority had the documents, in ``writeConcernErrors``:
    the documents may be stored or not, and inserting them again is what settles it)."""
    if isinstance(exc, errors.BulkWriteError):
        details = exc.details or {}
        codes = [e.get("code") for e in details.get("writeErrors", ()) if e.get("code") != DUPLICATE_KEY]
        codes += [e.get("code") for e in details.get("writeConcernErrors", ())]
        return bool(codes) and all(code in _TRANSIENT_CODES for code in codes)
    return exc.code in _TRANSIENT_CODES or exc.has_error_label("RetryableWriteError")


def damaged(action: str, exc: BaseException) -> StoreError | None:
    """A :class:`StoreError` saying how to recover, when ``exc`` is SQLite's finding a file of the
    embedded store damaged (``database disk image is malformed``, ``file is not a database``: a
    disk or file system that lost writes, a file changed by hand), or a document in it that
    cannot be decoded (damage inside a row, which SQLite does not see); None for any other error.
    Retrying does not help, so it is not :class:`StoreUnavailable`."""
    if isinstance(exc, bson.errors.InvalidBSON) and not settings.MONGO_URL:
        return StoreError(
            f"{action}: a document of the embedded store in {embedded_folder()} cannot be read ({exc!r}): its file is damaged "
            "inside a document, which SQLite's own checks (PRAGMA quick_check) do not see: stop the workers and move the folder "
            "aside to start with an empty store (what it held is lost)")
    if getattr(exc, "sqlite_errorcode", None) not in _DAMAGED:
        return None
    return StoreError(
        f"{action}: a file of the embedded store in {embedded_folder()} is damaged ({exc}): stop the workers, then for each "
        "file there that `sqlite3 FILE 'PRAGMA quick_check'` does not answer ok, recover what it holds with "
        "`sqlite3 FILE .recover | sqlite3 FILE.recovered`, move FILE (and FILE-wal, FILE-shm) aside and put FILE.recovered "
        "in its place; or move the whole folder aside to start with an empty store (what it held is lost)")


@contextlib.contextmanager
def opening_mongo(where: str) -> Iterator[None]:
    """Turn pymongo's refusal to make a client of ``MONGO_URL`` (``where``: the URL redacted) into a
    StoreError, or StoreUnavailable when it is a DNS lookup that may work later."""
    try:
        yield
    except (errors.ConfigurationError, ValueError) as exc:
        # pymongo parses the URL here, and looks a mongodb+srv:// URL's hosts up in DNS
        # (SRV and TXT records): a lookup that failed may work later, a URL it refused won't.
        if dns_for_now(exc):
            raise StoreUnavailable(f"MONGO_URL={where}: looking its hosts up in DNS failed ({exc}); check the name and the DNS server") from exc
        raise StoreError(f"MONGO_URL={where} cannot be used ({exc}): check its form (mongodb://user:password@host:port/, "
                         "the password percent-encoded) and its options") from exc


@contextlib.contextmanager
def opening_embedded(where: str) -> Iterator[None]:
    """Turn an error opening the embedded store in ``where`` into a StoreError that says what to do,
    or StoreUnavailable for a disk that may be freed or remounted."""
    try:
        yield
    except OSError as exc:
        if exc.errno in DISK_ERRNOS:  # a full or read-only disk: it may be freed or remounted
            raise StoreUnavailable(f"cannot open the embedded store in {where} ({exc}): {explain_disk(exc)}") from exc
        raise StoreError(f"cannot open the embedded store in {where} ({exc}): set DATA_DIR to a writable local folder") from exc
    except (ValueError, sqlite3.Error) as exc:
        if (damage := damaged("opening the embedded store", exc)) is not None:
            raise damage from exc
        raise StoreError(f"cannot open the embedded store in {where} ({exc}): set DATA_DIR to a writable local folder") from exc


@contextlib.contextmanager
def translated(action: str) -> Iterator[None]:
    """Turn driver and SQLite errors into StoreError / StoreUnavailable that say what to check."""
    try:
        yield
    except (errors.ConnectionFailure, errors.ExecutionTimeout, errors.WTimeoutError) as exc:
        raise StoreUnavailable(f"{action}: MongoDB did not answer ({exc}); check that MONGO_URL={settings.redact(settings.MONGO_URL or '')} is reachable and the server is up") from exc
    except (sqlite3.DatabaseError, bson.errors.InvalidBSON) as exc:
        if (damage := damaged(action, exc)) is not None:
            raise damage from exc
        if not isinstance(exc, sqlite3.OperationalError):
            raise _other(action, exc) from exc
        # A full disk, a file size limit, a read-only folder or a lock: each goes away once
        # an operator acts (or the other process lets go), so the caller retries; the error
        # says which one it is.
        where = embedded_folder()
        raise StoreUnavailable(f"{action}: the embedded store in {where} failed ({exc}): {explain_disk(exc)}") from exc
    except (errors.PyMongoError, sqlite3.Error) as exc:
        raise _other(action, exc) from exc


def _other(action: str, exc: Exception) -> StoreError:
    """What :func:`translated` makes of a driver's or SQLite's error that is neither a server that
    did not answer nor the embedded store's disk or damage: the caller raises it."""
    where = settings.redact(settings.MONGO_URL or "")
    if isinstance(exc, errors.OperationFailure) and transient(exc):
        return StoreUnavailable(f"{action}: MongoDB could not do it now ({exc}); check that MONGO_URL={where} has a primary "
                                "and that its members are up and replicating")
    if isinstance(exc, errors.OperationFailure) and exc.code in ACCESS_CODES:
        return StoreError(f"{action} failed: {exc}; check the user, password and authSource in MONGO_URL={where} and that "
                          f"the user has the readWrite role on the database {settings.MONGO_DB}")
    return StoreError(f"{action} failed: {exc}")

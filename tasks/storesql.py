"""The embedded store's shortcuts into litemongo's SQLite tables, for :mod:`tasks.store` only.

litemongo (mongomock's query engine over SQLite) checks, copies or decodes every document it
touches, and rebuilds a collection's in-memory index from every document whenever another process
wrote since.  :mod:`tasks.store` does a few operations in SQL on litemongo 0.2's tables instead
(``TableDict``: ``_id`` the primary key, encoded by ``encode_key``; ``doc`` the BSON document):
new documents' inserts, reads by ``_id`` and by a window of ids through the primary key, the
hash index's candidates unchecked, a purge's look at the oldest row, and one transaction (one
commit) for many writes; and, beside the tables, it pins litemongo's query index for a block of
reads (:func:`index_pinned`) and starts the thread that checkpoints the tables' write-ahead logs
(:func:`start_checkpoints`).  Each function returns None (or does nothing) where the table is not
what it reads, MongoDB or another litemongo version, and the store then goes through the driver;
tests/integration/test_store.py covers both paths and fails when the embedded engine has no such
table.

The store's thread only (SQLite connections refuse other threads).
"""

from __future__ import annotations

import contextlib
import datetime
import sqlite3
from collections.abc import Iterator

import bson
from pymongo import errors

from tasks import checkpoints

UTC = datetime.timezone.utc


class _OneCommit:
    """Stands for a litemongo table's sqlite3 connection during :func:`one_transaction`: its
    ``with connection:`` (a commit per document) does nothing, so the inserts share one
    transaction, committed once.  Everything else goes to the real connection."""

    def __init__(self, connection: sqlite3.Connection) -> None:
        self._connection = connection

    def __getattr__(self, name):
        return getattr(self._connection, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> bool:
        return False


@contextlib.contextmanager
def one_transaction(collection) -> Iterator[None]:
    """On the embedded engine, the writes inside share one SQLite transaction (one commit, and one
    take of the file's write lock, instead of one per document), committed when the block ends,
    also when it raises a BulkWriteError (MongoDB keeps the documents that went in), and rolled
    back for any other error or when the commit fails (a full disk).  litemongo 0.2 commits every document; this reaches into its table
    object (``CollectionStore._documents``) and does nothing where that is not there (MongoDB)."""
    table = _documents_of(collection)
    connection = getattr(table, "_connection", None)
    if not isinstance(connection, sqlite3.Connection):  # MongoDB, or inside another one_transaction
        yield
        return
    table._connection = _OneCommit(connection)
    try:
        yield
    except errors.BulkWriteError:
        _commit(collection, connection)
        raise
    except BaseException:
        _roll_back(collection, connection)
        raise
    else:
        _commit(collection, connection)
    finally:
        table._connection = connection


def _commit(collection, connection: sqlite3.Connection) -> None:
    """Commit :func:`one_transaction`'s writes; when the commit fails (a full disk), roll them back
    as for any error inside it.  mongomock has applied them to this connection's query index
    already (a purge's deletions): kept, they hid documents still stored from this process's reads
    (a user's inbox) until another process wrote."""
    try:
        connection.commit()
    except BaseException:
        _roll_back(collection, connection)
        raise


def _roll_back(collection, connection: sqlite3.Connection) -> None:
    try:
        connection.rollback()
    finally:
        collection._store._query_index = None  # rebuilt on the next read: it may name rolled-back documents


def _documents_of(collection):
    """litemongo's table object behind ``collection`` (``CollectionStore._documents``), or None
    (MongoDB).  Unchecked: see :func:`table_of` for what the SQL of this module needs."""
    return getattr(getattr(collection, "_store", None), "_documents", None)


def table_of(collection):
    """On the embedded engine, the SQLite table behind ``collection`` (litemongo 0.2's
    ``TableDict``: ``_id`` the primary key, encoded by ``encode_key``; ``doc`` the BSON document),
    for the few operations done here in SQL instead of through mongomock, which checks,
    copies and decodes every document it touches.  None on MongoDB, or where the table is not
    what this module reads (another litemongo version): the callers then go through mongomock.
    tests/integration/test_store.py fails when the embedded engine has no such table."""
    store = getattr(collection, "_store", None)
    table = _documents_of(collection)
    if not isinstance(getattr(table, "_connection", None), (sqlite3.Connection, _OneCommit)):
        return None
    if not all(hasattr(table, name) for name in ("_table_name", "ID", "DOC", "encode_key", "_decode_doc", "_codec_options")):
        return None
    if not hasattr(store, "_query_index") or not callable(getattr(store, "_query_index_is_stale", None)):
        return None
    return table


def id_range(collection, first: str, last: str | None = None, *, first_included: bool = True,
                       most: int | None = None) -> list[dict] | None:
    """On the embedded engine, the documents whose string ``_id`` is from ``first`` (included, or
    excluded with ``first_included=False``) to ``last`` (excluded; no end without it), in ``_id``
    order, read through the primary key of litemongo's SQLite table: mongomock has no range index,
    and its query would decode and match every document of the collection (0.5 s per 20,000
    messages here, whatever the range).  None when there are more than ``most`` of them, or where
    that table is not there (MongoDB, or a litemongo whose table is not what this reads), for the
    caller to query instead.

    This reads litemongo 0.2's ``TableDict`` (``encode_key`` maps a string id to a text key
    that sorts as the id does), as :func:`one_transaction` does; tests cover both paths."""
    table = table_of(collection)
    if table is None:
        return None
    keys = [_sortable_key(table, first)] + ([] if last is None else [_sortable_key(table, last)])
    if None in keys:
        return None
    where = f"{table.ID} {'>=' if first_included else '>'} ?" + ("" if last is None else f" AND {table.ID} < ?")
    limit = "" if most is None else " LIMIT ?"
    rows = table._connection.execute(  # nosec - names from litemongo, values bound
        f"SELECT {table.DOC} FROM {table._table_name} WHERE {where} ORDER BY {table.ID}{limit}",
        keys + ([] if most is None else [most + 1])).fetchall()
    if most is not None and len(rows) > most:
        return None
    return [table._decode_doc(doc) for (doc,) in rows]


@contextlib.contextmanager
def index_pinned(collections) -> Iterator[None]:
    """Inside, litemongo's query index of each of ``collections`` is checked for staleness at its
    first read only (:func:`first_check_only`; :meth:`Store.index_pinned`); its own check again after."""
    pinned = [store for store in (getattr(c, "_store", None) for c in collections)
              if callable(getattr(store, "_query_index_is_stale", None))]
    saved = [(store, store.__dict__.get("_query_index_is_stale")) for store in pinned]
    for store in pinned:
        store._query_index_is_stale = first_check_only(store._query_index_is_stale)
    try:
        yield
    finally:
        for store, before in saved:  # litemongo's own check again
            if before is None:
                del store._query_index_is_stale
            else:
                store._query_index_is_stale = before


def first_check_only(is_stale):
    """litemongo's staleness check (``CollectionStore._query_index_is_stale``, which records the
    version it saw), asked only the first time; False after that (:meth:`Store.index_pinned`)."""
    asked = False

    def check() -> bool:
        nonlocal asked
        if asked:
            return False
        asked = True
        return is_stale()
    return check


def start_checkpoints(collections) -> checkpoints.Checkpointer | None:
    """Copy the SQLite write-ahead logs of ``collections`` back into their files on a thread, not in
    whichever task's commit crosses SQLite's threshold (:mod:`tasks.checkpoints`): the checkpointer
    started, or None (SQLite's own checkpoints left alone) where litemongo's tables are not what
    this reads."""
    tables = [table_of(collection) for collection in collections]
    if any(table is None for table in tables):
        return None
    paths = [checkpoints.database_file(table._connection) for table in tables]
    if not all(paths):
        return None
    for table in tables:
        table._connection.execute(f"PRAGMA wal_autocheckpoint={checkpoints.SAFETY_NET_PAGES}")
        table._connection.execute(f"PRAGMA journal_size_limit={checkpoints.WAL_KEEP_BYTES}")
    checkpointer = checkpoints.Checkpointer(paths)
    checkpointer.start()
    return checkpointer


def _sortable_key(table, message_id: str) -> str | None:
    """``message_id`` as litemongo's table keys it, or None where that key would not sort as the
    ids do (a key format other than a text prefix followed by the id)."""
    key = table.encode_key(message_id)
    return key if isinstance(key, str) and key.endswith(message_id) else None


def by_id(collection, ids: list, projection: dict) -> list[dict] | None:
    """On the embedded engine, the documents of ``ids`` (those still there, each once) with the
    fields of ``projection`` (an inclusion, ``{field: 1}``) and ``_id``, read through the primary key
    of litemongo's table.  A query by ``_id`` through mongomock would rebuild the collection's
    in-memory index first whenever another process wrote since (a read of every document: 1.3 s
    for 100,000 messages here), check ``$in`` against the whole list for every candidate, and
    copy each document.  None where that table is not there, for the caller to query instead."""
    table = table_of(collection)
    if table is None or not callable(getattr(table, "get_many", None)):
        return None
    fields = ["_id", *(name for name, include in projection.items() if include and name != "_id")]
    return [{name: doc[name] for name in fields if name in doc} for doc in table.get_many(dict.fromkeys(ids))]


def candidates(collection, query: dict) -> Iterator[dict] | None:
    """On the embedded engine, the documents that may match ``query`` by the collection's hash
    indexes (litemongo's ``find_candidates``), decoded from the table but neither checked against
    the query nor copied: the caller checks what it needs.  mongomock's own check of an ``$in``
    on an array field scans the whole ``$in`` list for each element of each candidate, and its
    projection copies every element: with receipts documents of up to 1,000 receipts, a user's
    inbox read cost about a millisecond per message the user holds (0.35-0.53 s for 440-530
    messages here), nine tenths of it in those two.  None where that hook is not there."""
    if table_of(collection) is None:
        return None
    find = getattr(collection._store, "find_candidates", None)
    return find(query) if callable(find) else None


def may_hold_older(collection, cutoff: datetime.datetime) -> bool:
    """On the embedded engine, whether a purge of what is older than ``cutoff`` can find anything:
    False when the collection is empty or the first document it still holds in insertion order
    is not older (one row read through litemongo's SQLite table; a purge's query decodes every
    document).  Documents go in about in time order, so one older than the first waits for the
    next purge at which the first is old too: minutes, against a retention of hours.  True where
    the table is not what this reads."""
    table = table_of(collection)
    if table is None:
        return True
    row = table._connection.execute(f"SELECT {table.DOC} FROM {table._table_name} ORDER BY ROWID LIMIT 1").fetchone()  # nosec
    if row is None:
        return False
    at = table._decode_doc(row[0]).get("at")
    return not isinstance(at, datetime.datetime) or (at if at.tzinfo else at.replace(tzinfo=UTC)) < cutoff


def insert_new(collection, table, docs: list[dict], encoded: list[bytes] | None = None) -> list[dict]:
    """:func:`_insert_new` on the embedded engine: one SQLite transaction of ``INSERT ... ON
    CONFLICT DO NOTHING`` (what mongomock's insert amounts to here, without its per-document
    validation, copy, existence read and index-list read: about a third of its cost), and the
    new documents added to this connection's query index as mongomock adds them, unless another
    connection wrote since the index was built.  The store's collections have no unique
    index but ``_id``."""
    store, connection = collection._store, table._connection
    insert = f"INSERT INTO {table._table_name} VALUES (?, ?) ON CONFLICT({table.ID}) DO NOTHING"  # nosec - names from litemongo
    new: list[tuple[str, dict]] = []
    try:
        with connection:  # one commit; inside one_transaction, the caller's
            if encoded is None:
                encoded = [bson.encode(doc, codec_options=table._codec_options) for doc in docs]
            for doc, data in zip(docs, encoded):
                key = table.encode_key(doc["_id"])
                if connection.execute(insert, (key, data)).rowcount == 1:
                    new.append((key, doc))
    except BaseException:
        store._query_index = None  # rebuilt on the next read
        raise
    try:
        if store._query_index is not None:
            if store._query_index_is_stale():
                # Another connection wrote since this one built its index (with several worker
                # processes, nearly always): the next read rebuilds it from the table in any case, so
                # adding to it would be work thrown away (a third of an insert's cost).  The check
                # records the version it saw, so the index must go now for that read to rebuild it.
                store._query_index = None
            else:
                for key, doc in new:
                    store._query_index.add(key, doc)
    except BaseException:
        # Interrupted part-way (Celery's soft time limit is raised by a signal handler, on any
        # line): an index that lacks rows committed above would hide them from this process's
        # reads, while it counts as current.
        store._query_index = None
        raise
    return [doc for _, doc in new]


def guard_index_rebuild(collection) -> None:
    """On the embedded engine, make the query index of ``collection`` go when its rebuild is
    interrupted.  litemongo records the data version it saw before it rebuilds the index after
    another process wrote; an exception during the rebuild (Celery's soft time limit, raised from a
    signal handler on any line; a read error) left the old index in place, counted as current, so
    this process's inbox reads and ``tasks.status`` missed what the other wrote until the next
    write.  Dropped instead, it is built anew by the next read.  Nothing on MongoDB."""
    store = getattr(collection, "_store", None)
    rebuild = getattr(store, "_get_query_index", None)
    if table_of(collection) is None or rebuild is None:
        return

    def guarded():
        try:
            return rebuild()
        except BaseException:
            store._query_index = None
            raise
    store._get_query_index = guarded

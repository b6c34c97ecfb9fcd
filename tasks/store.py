"""Messages (each recipient's inbox) and receipts in MongoDB: the only module the tasks reach the store through,
and with its helpers (:mod:`tasks.storesql`, :mod:`tasks.storedocs`, :mod:`tasks.storeerrors`) the only
ones that import pymongo or litemongo.

Worker process only.  ``get_store()`` opens one :class:`Store` lazily in each process (after the
Celery worker has forked: a store is never carried across a fork) and in each thread, because the
embedded engine's SQLite connections refuse to be used from another thread.

Two engines, one code path:

- ``MONGO_URL`` set: pymongo against MongoDB, 5 s timeouts.  Indexes: messages ``(to, _id)``,
  receipts ``m`` (both multikey), late ``(to, r)``, and a TTL index on ``at`` in every collection, so
  MongoDB itself enforces the retention.
- ``MONGO_URL`` unset: litemongo, mongomock's query engine over SQLite files in ``DATA_DIR/mongo``.
  It survives a restart and several processes may write the same folder, but: single host only
  (local disk, no network file system); hash indexes only, so equality and ``$in`` narrow the
  candidates and ranges and sorts run in Python over them (a replay costs every message kept for
  the user plus every broadcast kept); a process rebuilds an index from the whole collection on its
  first read after another process wrote; each insert or delete of this module is one SQLite
  transaction (litemongo itself commits every document); no TTL index (mongomock would scan
  every collection on every read): call :meth:`Store.purge`.  Inserts, and some reads, go to
  litemongo's SQLite tables directly (:mod:`tasks.storesql`) instead of through mongomock, which
  checks, copies or decodes every document it touches: the inserts of new documents, reads by
  ``_id`` and a window of message ids (:meth:`Store.deliveries_between`), both through the primary
  key, and a purge's check that a collection holds anything old (its first document in insertion
  order).  So does a replay with at most ``_EMBEDDED_RANGE_ROWS`` messages after its id (all of
  them, filtered here; the replays of one ``tasks.replay_many`` share the read,
  :meth:`Store.replays`).  The inbox's ack lookup takes the receipts index's candidates and checks
  them here (:func:`storesql.candidates`).  Every other read goes through mongomock, which first
  rebuilds the collection's index from every document whenever another process wrote since (about
  1.3 s per 100,000 messages here): the user lookup of an inbox or of a longer replay (once per
  ``tasks.replay_many``: :meth:`Store.index_pinned`), and the redelivery sweep's acks.  The SQLite
  write-ahead logs are copied back into their files by a thread of each store
  (:mod:`tasks.checkpoints`), not by whichever task's commit crosses SQLite's 1,000 pages.

The documents it writes and reads are :mod:`tasks.storedocs`'s; its errors, and what a driver's
or SQLite's error becomes, :mod:`tasks.storeerrors`'s; the embedded engine's lock on claiming
idempotency keys, :mod:`tasks.keylock`'s; the reads of a replay and of an inbox (with
``_EMBEDDED_RANGE_ROWS``), :mod:`tasks.storereplays`'s (:class:`~tasks.storereplays.StoreReplays`, a
part of :class:`Store`).
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Iterator

import bson
import litemongo
import pymongo
import pymongo.database
from litemongo import sqlite_store
from pymongo import errors

import settings
from tasks import checkpoints, ids, keylock, storedisk, storesql
from tasks.storedocs import BROADCAST, UTC, Cut, as_collected, id_time, late_among, message_documents, receipt_documents, status_of
from tasks.storeerrors import ACCESS_CODES, StoreError, StoreUnavailable, duplicates_only, embedded_folder, opening_embedded, opening_mongo, translated
from tasks.storereplays import StoreReplays

#: What the tasks import from here: the store, and its documents' and errors' names they need.
__all__ = ["BROADCAST", "Cut", "Store", "StoreError", "StoreUnavailable", "get_store"]

log = logging.getLogger(__name__)

TIMEOUT_MS = 5000
_OPEN_ATTEMPTS = 10
_EMBEDDED_ID_BATCH = 2000
_INDEX_OPTIONS_CONFLICT = 85
#: Ids per update of records routed late again: one update of 20,000 took the embedded engine
#: about 30 s (each row checked against the whole list), 256 at a time about 2 s.
_LATE_UPDATE_IDS = 256
_COLLECTIONS = ("messages", "receipts", "keys", "late")
ACKED = "acked"
class Store(StoreReplays):
    """One connection to the message store.  Worker process only, one thread (on the embedded
    engine, plus the checkpoint thread it starts, which has connections of its own)."""

    def __init__(self, database: pymongo.database.Database) -> None:
        self.database = database
        self._messages, self._receipts, self._keys, self._late = (database[name] for name in _COLLECTIONS)
        self._checkpointer: checkpoints.Checkpointer | None = None

    @classmethod
    def open(cls) -> Store:
        """A store on ``MONGO_URL``, or on the embedded engine in ``DATA_DIR/mongo`` when it is unset."""
        if settings.MONGO_URL:
            where = settings.redact(settings.MONGO_URL)
            with opening_mongo(where):
                client = pymongo.MongoClient(settings.MONGO_URL, serverSelectionTimeoutMS=TIMEOUT_MS, connectTimeoutMS=TIMEOUT_MS, socketTimeoutMS=TIMEOUT_MS, tz_aware=True)
        else:
            where = embedded_folder()
            with opening_embedded(where):
                # litemongo's own mkdir fails when another process makes the folder at the same moment
                os.makedirs(os.path.join(where, settings.MONGO_DB), exist_ok=True)
                client = litemongo.MongoClient(sqlite_store.ServerStore(where))
        store = cls(client[settings.MONGO_DB])
        try:
            store.ensure_indexes()
            for collection in store._collections:  # their tables exist now
                storesql.guard_index_rebuild(collection)
            if store.embedded:
                store._checkpointer = storesql.start_checkpoints(store._collections)
        except BaseException:
            client.close()
            raise
        log.info("message store: %s, database %s", where if store.embedded else f"MongoDB at {where}", settings.MONGO_DB)
        return store

    @property
    def _collections(self) -> tuple:
        return (self._messages, self._receipts, self._keys, self._late)

    @property
    def embedded(self) -> bool:
        return not isinstance(self.database, pymongo.database.Database)

    def ensure_indexes(self) -> None:
        """Create the indexes the queries need; idempotent, run at open.

        On the embedded engine this also opens every collection file.  litemongo races when two
        processes create the same new file ("database is locked" at once, or a UNIQUE constraint
        on its info table), so an SQLite error here is retried a few times; not a disk that
        refuses the write (full, read-only), which no retry within the second fixes: each
        collect request retried over a full disk paid the ten tries, 2.25 s of sleeps.
        """
        for attempt in range(1, _OPEN_ATTEMPTS + 1):
            try:
                with translated("creating indexes"):
                    self._create_indexes()
                return
            except StoreError as exc:
                if not isinstance(exc.__cause__, sqlite3.Error) or storedisk.is_disk_refusal(exc.__cause__) or attempt == _OPEN_ATTEMPTS:
                    raise
                time.sleep(0.05 * attempt)

    def _create_indexes(self) -> None:
        if self.embedded:
            # Hash indexes only, and never a TTL index (see the module docstring).
            self._messages.create_index([("to", 1)])
            self._receipts.create_index([("m", 1)])
            # Open the other files now too, inside the retry: a first open is what races.
            self._keys.find_one({"_id": ""})
            self._late.create_index([("to", 1)])
            return
        self._messages.create_index([("to", 1), ("_id", 1)])
        self._receipts.create_index([("m", 1)])
        self._late.create_index([("to", 1), ("r", 1)])
        for collection in self._collections:
            self._ensure_ttl(collection)

    def _ensure_ttl(self, collection) -> None:
        try:
            collection.create_index([("at", 1)], name="at_ttl", expireAfterSeconds=settings.RETENTION_SECONDS)
        except errors.OperationFailure as exc:
            if exc.code != _INDEX_OPTIONS_CONFLICT:
                raise
            # RETENTION_SECONDS changed since the index was made (or an index on `at` has another
            # name): change it in place, found by its key.  collMod needs more than the readWrite
            # role (dbAdmin); without it the store works on with the retention the index has.
            change = {"keyPattern": {"at": 1}, "expireAfterSeconds": settings.RETENTION_SECONDS}
            try:
                self.database.command("collMod", collection.name, index=change)
            except errors.OperationFailure as denied:
                if denied.code not in ACCESS_CODES:
                    raise
                log.error("the TTL index on %s.at keeps its retention, not RETENTION_SECONDS=%s: MONGO_URL's user may not run "
                          "collMod (%s); run db.runCommand({collMod: %r, index: %s}) as a dbAdmin of %s",
                          collection.name, settings.RETENTION_SECONDS, denied, collection.name, change, self.database.name)

    def insert_messages(self, messages: list[dict]) -> set[str]:
        """Store ``[{"id", "to": [users] | "*", "data"[, "key"]}]``; re-inserting the same ids is a
        no-op.  Returns the ids stored now (not those stored before)."""
        if not messages:
            return set()
        # The check below encodes each document as BSON; on the embedded engine those bytes are
        # what goes into its table, so they are encoded with the table's options and kept.
        table = storesql.table_of(self._messages)
        codec_options = table._codec_options if table is not None else bson.DEFAULT_CODEC_OPTIONS
        docs, encoded = message_documents(messages, codec_options)  # before any write: a bad item stores nothing of the batch
        with translated(f"storing {len(docs)} messages"):
            return {doc["_id"] for doc in _insert_new(self._messages, docs, encoded if table is not None else None)}

    def claim_ids(self, key: str, ids: list[str]) -> list[str]:
        """Bind idempotency ``key`` to ``ids``, or return the ids it was bound to before."""
        (claimed,) = self.claim_many([(key, ids)])
        return claimed

    def claim_many(self, claims: list[tuple[str, list[str]]]) -> list[list[str]]:
        """:meth:`claim_ids` for several ``(key, ids)`` pairs at once, in order, under one lock;
        a key given twice gets, the second time, the ids of the first.

        One unordered ``insert_many`` of a document per key, keyed by ``_id`` (the primary key on
        both engines, no secondary unique index): one round trip to MongoDB for the whole batch.
        The keys it reports taken (a task run again, a key reused) are read back in one more.
        """
        if not claims:
            return []
        wanted_of: dict[str, list[str]] = {}
        for key, wanted in claims:
            wanted_of.setdefault(key, list(wanted))
        now = datetime.datetime.now(UTC)
        docs = [{"_id": key, "ids": wanted, "at": now} for key, wanted in wanted_of.items()]
        with translated(f"recording {len(claims)} idempotency keys"), self._key_lock():
            claimed = {doc["_id"]: doc["ids"] for doc in _insert_new(self._keys, docs)}
            taken = [key for key in wanted_of if key not in claimed]
            if taken:
                claimed.update((doc["_id"], list(doc["ids"])) for doc in self._by_ids(self._keys, taken, {"ids": 1}))
        # A key purged between its insert and its read (rare): bind those anew.
        purged: dict[str, list[str]] = {}
        for key, wanted in claims:
            if key not in claimed:
                purged.setdefault(key, wanted)
        if purged:
            claimed.update(zip(purged, self.claim_many(list(purged.items()))))
        return [claimed[key] for key, _ in claims]

    def rebind_keys(self, rebinds: list[tuple[str, list[str], list[str], float | None]]) -> set[str]:
        """For each ``(key, old ids, new ids, claimed before)``, bind ``key`` to the new ids if it
        is still bound to the old ones and, unless ``claimed before`` is None, was bound to them
        before that unix time; returns the keys rebound.  For a request whose first run claimed
        its key and then could not store its messages (the store unavailable, its worker killed):
        stored later under the ids of that first run, tens of seconds old, they fell before the
        ``since`` of a resume from a message stored meanwhile, which skipped them.  Only a run
        that found none of the old ids stored may call this: a compare-and-set per key, so that
        of two runs rebinding at once one wins, and the other reads the key again."""
        now = datetime.datetime.now(UTC)
        rebound: set[str] = set()
        with translated(f"binding {len(rebinds)} idempotency keys anew"), self._key_lock():
            for key, old, new, before in rebinds:
                query: dict = {"_id": key, "ids": list(old)}
                if before is not None:
                    query["at"] = {"$lt": datetime.datetime.fromtimestamp(before, UTC)}
                if self._keys.update_one(query, {"$set": {"ids": list(new), "at": now}}).matched_count:
                    rebound.add(key)
        return rebound

    def _key_lock(self) -> contextlib.AbstractContextManager:
        """On the embedded engine, one process at a time claims keys (:mod:`tasks.keylock`: litemongo
        would let two insert the same _id); MongoDB itself enforces _id atomically and needs no lock."""
        return keylock.held() if self.embedded else contextlib.nullcontext()

    def mark_late(self, messages: list[dict], routed_at: float) -> None:
        """Record that ``messages`` (``[{"id", "to"}]``) were routed at ``routed_at`` (unix
        seconds), more than a resume's overlap after their ids' time (:func:`tasks.dispatch.route`):
        a browser that saw a later message before them and resumes from its id would not reach
        back to them without it (:meth:`late_since`).  One small document each in ``late``, purged
        with the messages; a message routed late again keeps the latest time."""
        if not messages:
            return
        at_ms = int(routed_at * 1000)
        docs = [{"_id": m["id"], "to": m["to"], "r": at_ms, "at": id_time(m["id"])} for m in dict((m["id"], m) for m in messages).values()]
        with translated(f"recording {len(docs)} messages routed late"):
            new = {doc["_id"] for doc in _insert_new(self._late, docs)}  # on the embedded engine straight into its table
            again = [doc["_id"] for doc in docs if doc["_id"] not in new]
            if again:  # routed late again (a redelivery): in chunks, as mongomock checks each row against the whole list
                with storesql.one_transaction(self._late):
                    for start in range(0, len(again), _LATE_UPDATE_IDS):
                        self._late.update_many({"_id": {"$in": again[start : start + _LATE_UPDATE_IDS]}}, {"$max": {"r": at_ms}})

    def late_since(self, routed_from_ms: int, users: list[str]) -> list[tuple[str, list[str] | str, int]]:
        """``(message id, to, routed at in unix ms)`` of the messages to any of ``users`` or to
        everyone routed late (:meth:`mark_late`) at ``routed_from_ms`` or after, through the index
        on ``to``: after an outage of the routing Redis, or a dead node's queue handed back, the
        collection holds a record per message routed then, and reading them all for every replay
        took seconds per 100,000 (the resumes timed out, 1013, again and again)."""
        wanted = [*dict.fromkeys(users), BROADCAST]
        with translated("reading the messages routed late"):
            candidates = storesql.candidates(self._late, {"to": {"$in": wanted}})
            if candidates is None:
                query = {"to": {"$in": wanted}, "r": {"$gte": routed_from_ms}}
                return [(doc["_id"], doc["to"], doc["r"]) for doc in self._late.find(query, {"to": 1, "r": 1})]
            return late_among(candidates, wanted, routed_from_ms)

    def deliveries_between(self, start: datetime.datetime, end: datetime.datetime) -> list[tuple[str, str]]:
        """``(message id, user)`` of the messages stored between ``start`` and ``end``, acked or
        not, oldest first (broadcasts excluded).  A range of ids (they start with their time): on
        the embedded engine read through its table's primary key (:func:`storesql.id_range`), on
        MongoDB through ``aggregate`` on the ``_id`` index."""
        first, last = (ids.lower_bound(int(when.timestamp() * 1000)) for when in (start, end))
        with translated("listing deliveries"):
            docs = storesql.id_range(self._messages, first, last)
            if docs is None:
                query = {"_id": {"$gte": first, "$lt": last}, "to": {"$ne": BROADCAST}}
                docs = self._messages.aggregate([{"$match": query}, {"$project": {"to": 1}}])
            return sorted((doc["_id"], user) for doc in docs if doc["to"] != BROADCAST for user in doc["to"])

    def acked_since(self, start: datetime.datetime) -> set[tuple[str, str]]:
        """``(message id, user)`` of the acks recorded in receipts documents newer than ``start``
        (and perhaps a few older ones): one read of the recent receipts, for checking many
        deliveries at once (:meth:`not_acked` looks each message up)."""
        with translated("listing recent acks"):
            found = self._distinct(self._receipts, "_id", {"s": ACKED, "at": {"$gte": start}})
            return {(mid, user) for doc in self._by_ids(self._receipts, found, {"r": 1}) for mid, user, _ in doc["r"]}

    def not_acked(self, pairs: list[tuple[str, str]]) -> list[tuple[str, str]]:
        """The ``(message id, user)`` pairs no device of that user acked, in the order given."""
        with translated(f"looking up acks of {len(pairs)} deliveries"):
            acked = self._acked(pairs)
        return [pair for pair in pairs if pair not in acked]

    def message_data(self, message_ids: list[str]) -> dict[str, object]:
        """``{id: data}`` for the ids that are still stored."""
        return {mid: doc["data"] for mid, doc in self.messages(message_ids, {"data": 1}).items()}

    def messages(self, message_ids: list[str], projection: dict | None = None) -> dict[str, dict]:
        """``{id: {"to", "data"}}`` (or the fields of ``projection``) for the ids still stored."""
        if not message_ids:
            return {}
        with translated(f"reading {len(message_ids)} messages"):
            docs = {doc["_id"]: doc for doc in self._by_ids(self._messages, list(message_ids), projection or {"to": 1, "data": 1})}
        for doc in docs.values():
            if "data" in doc:
                doc["data"] = as_collected(doc["data"])
        return docs

    def status(self, message_id: str) -> dict | None:
        """What happened to one message: when it was collected, and per recipient the time of each
        receipt state (``routed``, ``written``, ``acked``); None when it is unknown or purged."""
        with translated(f"reading the status of {message_id}"):
            message = self._messages.find_one({"_id": message_id}, {"to": 1, "at": 1})
            if message is None:
                return None
            return status_of(message_id, message, self._receipts.find({"m": message_id}, {"s": 1, "r": 1}))

    def _acked(self, pairs: list[tuple[str, str]]) -> set[tuple[str, str]]:
        if not pairs:
            return set()
        wanted = set(pairs)
        mids = list(dict.fromkeys(mid for mid, _ in pairs))
        found: set[tuple[str, str]] = set()
        candidates = storesql.candidates(self._receipts, {"m": {"$in": mids}})
        if candidates is None:
            docs = self._by_ids(self._receipts, mids, {"r": 1}, field="m", also={"s": ACKED})
        else:  # unchecked: any state, and perhaps none of these messages (the pairs filter those)
            docs = (doc for doc in candidates if doc.get("s") == ACKED)
        for doc in docs:
            found.update(pair for pair in ((mid, user) for mid, user, _ in doc["r"]) if pair in wanted)
        return found

    def _distinct(self, collection, field: str, query: dict) -> list:
        """The values of ``field`` in the documents matching ``query``.  On the embedded engine
        through distinct(): mongomock's cursor copies its result list on every next() (quadratic)."""
        if self.embedded:
            return collection.distinct(field, query)
        return [doc[field] for doc in collection.find(query, {field: 1})]

    def _by_ids(self, collection, ids: list, projection: dict, field: str = "_id", also: dict | None = None) -> Iterator[dict]:
        """The documents whose ``field`` (default ``_id``) is (or, for an array, holds) one of
        ``ids`` and that match ``also``, in batches; a document may come once per batch it matches.  On the embedded engine every
        query rebuilds the collection's query index whenever another process wrote since (a full
        scan), and then checks ``$in`` against a list for every candidate: 2,000 ids per query
        balances the two (100 made housekeeping's ack lookups take a whole worker process).
        By ``_id`` alone, the embedded engine reads its table's primary key instead
        (:func:`storesql.by_id`): no index, and no scan."""
        if field == "_id" and not also:
            docs = storesql.by_id(collection, ids, projection)
            if docs is not None:
                yield from docs
                return
        batch = _EMBEDDED_ID_BATCH if self.embedded else 5000
        for start in range(0, len(ids), batch):
            yield from collection.find({field: {"$in": ids[start : start + batch]}, **(also or {})}, projection)

    def record_receipts(self, receipts: list[dict]) -> int:
        """Append ``[{"id", "user", "state", "at": unix seconds}]`` as a few documents (see the
        module docstring); returns how many receipts were recorded: a receipt given twice counts
        once (its earliest time is kept), and a batch recorded before counts 0."""
        docs = receipt_documents(receipts)
        if not docs:
            return 0
        with translated(f"recording {sum(len(doc['r']) for doc in docs)} receipts"):
            return sum(len(doc["r"]) for doc in _insert_new(self._receipts, docs))

    def purge(self, now: datetime.datetime | None = None) -> int:
        """Delete everything older than ``RETENTION_SECONDS`` before ``now``; returns how many."""
        cutoff = (now or datetime.datetime.now(UTC)) - datetime.timedelta(seconds=settings.RETENTION_SECONDS)
        deleted = 0
        with translated("purging old messages"):
            for collection in self._collections:
                if self.embedded and not storesql.may_hold_older(collection, cutoff):
                    continue
                with storesql.one_transaction(collection):
                    deleted += collection.delete_many({"at": {"$lt": cutoff}}).deleted_count
        return deleted

    def close(self) -> None:
        if self._checkpointer is not None:
            self._checkpointer.stop()
        self.database.client.close()

def _insert_new(collection, docs: list[dict], encoded: list[bytes] | None = None) -> list[dict]:
    """One unordered insert_many; documents whose _id exists already are skipped.  Returns the new
    ones.  ``encoded``: on the embedded engine, each document already encoded as BSON with its
    table's codec options (else they are encoded here)."""
    table = storesql.table_of(collection)
    if table is not None:
        return storesql.insert_new(collection, table, docs, encoded)
    try:
        with storesql.one_transaction(collection):
            collection.insert_many(docs, ordered=False)
        return docs
    except errors.BulkWriteError as exc:
        if (taken := duplicates_only(exc)) is None:
            raise
        return [doc for index, doc in enumerate(docs) if index not in taken]


_local = threading.local()


def get_store() -> Store:
    """This process's (and thread's) store, opened on first use."""
    store, pid = getattr(_local, "store", None), getattr(_local, "pid", None)
    if store is None or pid != os.getpid():
        # A store inherited through fork is dropped but never closed: closing the parent's SQLite
        # connection from the child could disturb the parent's files.  Keep it referenced instead.
        if store is not None:
            _local.inherited = store
        _local.store, _local.pid = Store.open(), os.getpid()
    return _local.store

"""The documents of the message store (:mod:`tasks.store`), and what the store makes of them.  Pure; any thread.

Documents, as few per delivery as the queries allow (each costs a write, and on the embedded
engine mongomock's checks and copies, about 90 us):

- ``messages {_id: id, to: [users] | "*", data, at}``: one per message, whatever its recipients.
  It is also each recipient's inbox: the index on ``to`` finds a user's messages.  ``at`` is the
  time in the id, so a retried insert writes the same document.
- ``receipts {_id, s: state, m: [message ids], r: [[id, user, at], ...], at}``: one per state and
  minute of a batch of receipts (a batch of acks from a node, the routing of a batch), at most
  ``RECEIPT_DOC_ITEMS`` receipts each (:func:`receipt_documents`).  ``_id`` is a digest of the
  content, so recording the same batch again (a retried task) adds nothing; ``at`` is the newest
  receipt's time, for retention.
- ``keys {_id: key, ids, at}``: idempotency keys.
"""

from __future__ import annotations

import datetime
import hashlib
import heapq
from collections.abc import Callable, Iterable, Iterator

import bson
from bson.dbref import DBRef

from tasks import ids, wirejson
from tasks.messages import MAX_DOCUMENT_BYTES
from tasks.storeerrors import StoreError


#: ``to`` of a message to every user online.
BROADCAST = "*"

#: Most receipts in one receipts document (MongoDB caps a document at 16 MB).
RECEIPT_DOC_ITEMS = 1000

#: Receipts of one state are grouped per minute of their time, so retention drops them within a minute of their due.
_RECEIPT_BUCKET_SECONDS = 60

UTC = datetime.timezone.utc

#: What a replay keeps of its messages: given their envelopes newest first (read as it takes them),
#: returns those it keeps, oldest first, and whether it left any out (:meth:`Store.replay`).
Cut = Callable[[Iterable[dict]], tuple[list[dict], bool]]


#: A replay with a ``cut`` reads its messages' data newest first, this many in its first read and
#: twice as many in each next one (up to ``_REPLAY_READ_IDS_MAX``), until the cut stops taking them:
#: the worker holds what the cut keeps plus at most one such read, of no more messages than were
#: read before it and 100 more, nor than 1,000 (``MAX_MESSAGE_BYTES`` each: about one budget more
#: when the messages are alike in size), not ``REPLAY_LIMIT`` messages; and a long replay of small
#: messages costs MongoDB 13 queries of data for 10,000, not 100.  Each past 101 messages is two
#: round trips (a ``find``'s first batch holds 101 documents, its ``getMore`` up to 16 MiB): 25 in
#: all, where the reads of 100 cost 100 and the two reads of 5,000 before the budget cost 4.
_REPLAY_READ_IDS = 100
_REPLAY_READ_IDS_MAX = 1000


def newest_first(mids: list[str], message_data: Callable[[list[str]], dict[str, object]]) -> Iterator[dict]:
    """Envelopes of the messages ``mids`` (oldest first) that ``message_data`` still finds, newest
    first, their data read as they are taken: ``_REPLAY_READ_IDS`` ids in the first read, twice as
    many in each next one, up to ``_REPLAY_READ_IDS_MAX`` (:meth:`Store.replay` with a ``cut``).
    The reads are ``message_data``'s; pure besides."""
    end, size = len(mids), _REPLAY_READ_IDS
    while end > 0:
        chunk = mids[max(0, end - size) : end]
        found = message_data(chunk)
        for mid in reversed(chunk):
            if mid in found:
                yield {"id": mid, "data": found[mid]}
        end, size = end - len(chunk), min(size * 2, _REPLAY_READ_IDS_MAX)


def replays_from(docs: list[dict], wanted: list[tuple[str, str]], limit: int, cut: Cut | None = None) -> Iterator[tuple[list[dict], bool]]:
    """What :meth:`Store.each_replay` yields for ``wanted``, from ``docs``: every message stored
    after the earliest ``after_id`` of ``wanted``, in ``_id`` order; each replay made as it is
    taken.  Pure."""
    of_user: dict[str, list[dict]] = {}
    for doc in docs:
        for user in [BROADCAST] if doc["to"] == BROADCAST else doc["to"]:
            of_user.setdefault(user, []).append(doc)
    broadcasts = of_user.get(BROADCAST, [])
    for user, after in wanted:
        mine = [doc for doc in heapq.merge(of_user.get(user, []) if user != BROADCAST else [], broadcasts, key=doc_id) if doc["_id"] > after]
        newest = mine[-limit:]
        if cut is None:
            yield [{"id": doc["_id"], "data": as_collected(doc["data"])} for doc in newest], len(mine) > limit
        else:
            envelopes, cut_short = cut({"id": doc["_id"], "data": as_collected(doc["data"])} for doc in reversed(newest))
            yield envelopes, len(mine) > limit or cut_short


def as_stored(data: object) -> object:
    """``data`` as the store gives it back: BSON's round trip (a null ``$db`` of a DBRef shape is
    dropped, for one), then :func:`as_collected`.  To compare what a request sends with what is
    stored under its key.  Pure."""
    return as_collected(bson.decode(bson.encode({"d": data}))["d"])


def as_collected(data: object) -> object:
    """``data`` as it was collected.  Pymongo's BSON decoder (MongoDB's, and the embedded engine's)
    reads every object with a string ``"$ref"`` and an ``"$id"`` (and a ``"$db"`` that is a string
    or null) back as a ``DBRef``, which no JSON encoder takes: a message holding one broke every
    replay request it was part of, and every redelivery run.  Such objects become plain ones again,
    their keys in ``DBRef``'s order (``$ref``, ``$id``, ``$db``, then the others) and a null
    ``"$db"`` left out.  Data without one is returned as it is, after one walk.  Pure."""
    level = [data]
    while level:
        children: list = []
        for item in level:
            kind = type(item)
            if kind is DBRef:
                return _without_refs(data)
            if kind is dict:
                children += item.values()
            elif kind is list:
                children += item
        level = children
    return data


def _without_refs(data: object) -> object:
    if isinstance(data, DBRef):
        data = data.as_doc()
    if isinstance(data, dict):
        return {key: _without_refs(value) for key, value in data.items()}
    if isinstance(data, list):
        return [_without_refs(item) for item in data]
    return data


def message_documents(messages: list[dict], codec_options: bson.CodecOptions) -> tuple[list[dict], list[bytes]]:
    """The messages documents of ``[{"id", "to": [users] | "*", "data"[, "key"]}]``, and each one
    encoded as BSON with ``codec_options``; a :class:`StoreError` for the first that cannot be
    stored (a user named ``*``, data BSON cannot hold, a document over MongoDB's limit).  Pure."""
    docs, encoded = [], []
    for message in messages:
        mid, to = message["id"], message["to"]
        at = id_time(mid)
        users = [to] if isinstance(to, str) else list(dict.fromkeys(to))
        if to != BROADCAST and BROADCAST in users:
            raise StoreError(f"message {mid}: to={to!r} names a user {BROADCAST!r}; send to={BROADCAST!r} (a string) to broadcast")
        doc = {"_id": mid, "to": to if to == BROADCAST else users, "data": message["data"], "at": at}
        if message.get("key") is not None:
            doc["key"] = message["key"]
        try:
            encoded.append(bson.encode(doc, codec_options=codec_options))
        except (bson.errors.BSONError, OverflowError) as exc:
            raise StoreError(f"message {mid}: its data cannot be stored in MongoDB ({exc}); integers must fit in 64 bits and keys cannot contain NUL") from None
        if len(encoded[-1]) > MAX_DOCUMENT_BYTES:
            # MongoDB refuses it with DocumentTooLarge, which is not a PyMongoError.  Validation
            # refuses such a message first (tasks.messages.document_problem): this is for callers that skip it.
            raise StoreError(f"message {mid}: stored, it would take {len(encoded[-1])} bytes, over MongoDB's limit of {MAX_DOCUMENT_BYTES} "
                             "per document: send smaller data")
        docs.append(doc)
    return docs, encoded


def id_time(message_id: str) -> datetime.datetime:
    """The time in a message id, as the ``at`` of its documents."""
    try:
        return datetime.datetime.fromtimestamp(ids.timestamp_ms(message_id) / 1000, UTC)
    except ids.MessageIdError as exc:
        raise StoreError(str(exc)) from None


def unix_seconds(at: datetime.datetime) -> float:
    """A document's ``at`` as unix seconds (one read without a time zone is UTC)."""
    return (at if at.tzinfo else at.replace(tzinfo=UTC)).timestamp()


def status_of(message_id: str, message: dict, receipts: Iterable[dict]) -> dict:
    """What :meth:`tasks.store.Store.status` says of a message: its document (``to``, ``at``) and
    its receipts documents (``s``, ``r``) read.  Pure."""
    broadcast = message["to"] == BROADCAST
    recipients: dict[str, dict[str, float]] = {} if broadcast else {user: {} for user in message["to"]}
    seen: dict[str, dict[str, float]] = {}
    for receipt in receipts:
        state = receipt["s"]
        for mid, user, at in receipt["r"]:
            if mid == message_id:
                times = seen.setdefault(user, {})
                times[state] = min(at, times.get(state, at))  # recorded twice: the first time
    # A browser may ack any id: only a recipient's receipts count.  A broadcast's recipients
    # are the users a node wrote it to (a `written` receipt): one who was offline when it went
    # and acks its id later never got it.
    for user, times in seen.items():
        if user in recipients or (broadcast and "written" in times):
            recipients[user] = times
    return {"id": message_id, "to": message["to"], "collected_at": unix_seconds(message["at"]), "recipients": recipients}


def late_among(candidates: Iterable[dict], wanted: list[str], routed_from_ms: int) -> list[tuple[str, list[str] | str, int]]:
    """What :meth:`tasks.store.Store.late_since` returns, from ``late`` documents that may name none
    of ``wanted`` (users, and ``*``) and may come more than once each.  Pure."""
    # Unchecked, perhaps more than once each: mongomock's own check of that $in against
    # each record's list scanned the whole list for each of its users (77 s for the
    # resumes of 1,000 users with 40 records each here, against the replay's 15 s).
    named, found = set(wanted), {}
    for doc in candidates:
        to = doc["to"]
        if doc["r"] >= routed_from_ms and (to == BROADCAST or not named.isdisjoint(to)):
            found[doc["_id"]] = (doc["_id"], to, doc["r"])
    return list(found.values())


def doc_id(doc: dict) -> str:
    return doc["_id"]


def receipt_documents(receipts: list[dict]) -> list[dict]:
    """The receipts documents for ``[{"id", "user", "state", "at"}]``: per state and minute, the
    receipts sorted, each (id, user) once at its earliest time, ``RECEIPT_DOC_ITEMS`` per document;
    ``_id`` is a digest of the state and the receipts.  Pure."""
    groups: dict[tuple[str, int], dict[tuple[str, str], float]] = {}
    for r in receipts:
        at = float(r["at"])
        items = groups.setdefault((r["state"], int(at // _RECEIPT_BUCKET_SECONDS)), {})
        pair = (r["id"], r["user"])
        items[pair] = min(at, items.get(pair, at))
    docs = []
    for (state, _), items in sorted(groups.items()):
        entries = sorted([mid, user, at] for (mid, user), at in items.items())
        for start in range(0, len(entries), RECEIPT_DOC_ITEMS):
            chunk = entries[start : start + RECEIPT_DOC_ITEMS]
            # orjson: the standard library's encoder was half of this function's time (the floats).
            # A receipt recorded again under another digest (a retry across an upgrade) is harmless:
            # readers take each receipt's earliest time.
            digest = hashlib.sha1(wirejson.dumps([state, chunk])).hexdigest()[:32]
            docs.append({"_id": f"{state}:{digest}", "s": state, "m": sorted({mid for mid, _, _ in chunk}), "r": chunk,
                         "at": datetime.datetime.fromtimestamp(max(at for _, _, at in chunk), UTC)})
    return docs

"""The documents of the message store (:mod:`tasks.store`), and what the store makes of them.  Pure.

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

from tasks import wirejson


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

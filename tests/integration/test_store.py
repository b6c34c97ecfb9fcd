"""The message store against the embedded engine, or against the MongoDB at ``MONGO_URL`` when it is set.

Each test gets a store on a fresh, uniquely named database (in a tmp_path folder when embedded;
dropped at the end on MongoDB).
"""

from __future__ import annotations

import datetime
import json
import multiprocessing
import os
import socket
import sqlite3
import time
import uuid

import pymongo
import dns.exception
import dns.resolver
import pytest
from pymongo import errors

import settings
from tasks import checkpoints, storedocs, storereplays, storesql, wirejson
from tasks import store as store_module
from tasks.ids import IdGenerator
from tasks.replay import frame_bytes, newest_within
from tasks.messages import MAX_DOCUMENT_BYTES
from tasks.store import Store, StoreError, StoreUnavailable

OLD = time.time() - settings.RETENTION_SECONDS - 3600


@pytest.fixture
def location(tmp_path, monkeypatch):
    """Point the settings at a fresh data folder and database; returns (data_dir, db_name).  On
    MongoDB the database is dropped at the end: the tests that open stores of their own (not
    through ``store``) left one database each behind."""
    where = (str(tmp_path), f"test_store_{uuid.uuid4().hex[:12]}")
    monkeypatch.setattr(settings, "DATA_DIR", where[0])
    monkeypatch.setattr(settings, "MONGO_DB", where[1])
    yield where
    if os.environ.get("MONGO_URL"):  # the environment's: a test may have pointed settings.MONGO_URL elsewhere
        with pymongo.MongoClient(os.environ["MONGO_URL"], serverSelectionTimeoutMS=5000) as client:
            client.drop_database(where[1])


@pytest.fixture
def store(location):
    opened = Store.open()
    yield opened
    if not opened.embedded:
        opened.database.client.drop_database(opened.database.name)
    opened.close()


def make(gen: IdGenerator, to, data=None) -> dict:
    mid = gen.next_id()
    return {"id": mid, "to": to, "data": {"n": mid} if data is None else data}


def ids_of(envelopes: list[dict]) -> list[str]:
    return [e["id"] for e in envelopes]


def test_replay_returns_the_users_messages_oldest_first_with_their_data(store):
    gen = IdGenerator()
    messages = [make(gen, ["alice"], data) for data in ({"text": "hi"}, [1, 2], "three", None)]
    store.insert_messages(list(reversed(messages[:2])))
    store.insert_messages(messages[2:])

    envelopes, truncated = store.replay("alice", "", 100)

    assert envelopes == [{"id": m["id"], "data": m["data"]} for m in messages]
    assert truncated is False


def test_replay_returns_only_the_users_own_messages_and_broadcasts(store):
    gen = IdGenerator()
    to_alice, to_bob, to_both, to_all = make(gen, ["alice"]), make(gen, ["bob"]), make(gen, ["alice", "bob"]), make(gen, "*")
    store.insert_messages([to_alice, to_bob, to_both, to_all])

    assert ids_of(store.replay("alice", "", 100)[0]) == [to_alice["id"], to_both["id"], to_all["id"]]
    assert ids_of(store.replay("bob", "", 100)[0]) == [to_bob["id"], to_both["id"], to_all["id"]]
    assert ids_of(store.replay("carol", "", 100)[0]) == [to_all["id"]]


def test_a_message_is_one_document_whatever_its_recipients(store):
    gen = IdGenerator()
    store.insert_messages([make(gen, "*"), make(gen, ["ann", "bob", "cid"])])

    assert store.database["messages"].count_documents({}) == 2
    assert set(store.database.list_collection_names()) <= {"messages", "receipts", "keys", "late"}
    assert store.database["late"].count_documents({}) == 0  # nothing was routed late


def test_replay_leaves_out_messages_up_to_and_including_after_id(store):
    gen = IdGenerator()
    messages = [make(gen, ["alice"]) for _ in range(5)]
    store.insert_messages(messages)

    envelopes, _ = store.replay("alice", messages[1]["id"], 100)

    assert ids_of(envelopes) == [m["id"] for m in messages[2:]]


def test_replay_over_the_limit_keeps_the_newest_and_says_it_was_truncated(store):
    gen = IdGenerator()
    messages = [make(gen, ["alice"]) for _ in range(5)]
    store.insert_messages(messages)

    assert store.replay("alice", "", 3) == ([{"id": m["id"], "data": m["data"]} for m in messages[2:]], True)
    assert store.replay("alice", "", 5)[1] is False


def test_inserting_the_same_messages_again_is_no_error_and_stores_no_duplicates(store):
    gen = IdGenerator()
    first = [make(gen, ["alice", "bob"]) for _ in range(3)]
    store.insert_messages(first)
    later = make(gen, ["alice"])

    store.insert_messages(first + [later])  # a retried task that also carries a new message

    assert ids_of(store.replay("alice", "", 100)[0]) == [m["id"] for m in first] + [later["id"]]
    assert store.database["messages"].count_documents({}) == 4
    assert ids_of(store.replay("bob", "", 100)[0]) == [m["id"] for m in first]


def test_a_batch_is_visible_to_other_connections_once_stored_also_when_part_of_it_was_there(store):
    gen = IdGenerator()
    first = [make(gen, ["alice"]) for _ in range(3)]
    store.insert_messages(first)
    later = make(gen, ["alice"])
    store.insert_messages(first + [later])  # duplicates of the first three: the new one is kept all the same

    other = Store.open()  # another connection (on the embedded engine, another SQLite connection)
    try:
        assert ids_of(other.replay("alice", "", 100)[0]) == ids_of(first) + [later["id"]]
    finally:
        other.close()


def test_reads_see_every_insert_whichever_connection_made_it(store):
    """On the embedded engine each connection keeps a query index: its own inserts go into it,
    and an insert made after another connection wrote drops it, to be rebuilt by the next read."""
    gen = IdGenerator()
    first = make(gen, ["alice"])
    store.insert_messages([first])
    assert ids_of(store.replay("alice", "", 100)[0]) == [first["id"]]  # this connection's index is built
    other = Store.open()
    try:
        theirs = make(gen, ["alice"])
        other.insert_messages([theirs])  # another connection writes
        mine = make(gen, ["alice"])
        store.insert_messages([mine])  # this one writes after it
        assert ids_of(store.replay("alice", "", 100)[0]) == [first["id"], theirs["id"], mine["id"]]
        again = make(gen, ["alice"])
        store.insert_messages([again])  # nobody else wrote since that read
        assert ids_of(store.replay("alice", "", 100)[0]) == [first["id"], theirs["id"], mine["id"], again["id"]]
        assert ids_of(other.replay("alice", "", 100)[0]) == [first["id"], theirs["id"], mine["id"], again["id"]]
    finally:
        other.close()


def test_an_error_inside_one_transaction_stores_nothing_of_it(store):
    if not store.embedded:
        pytest.skip("the shared transaction is the embedded engine's; MongoDB writes each insert_many itself")
    gen = IdGenerator()
    kept = make(gen, ["alice"])
    store.insert_messages([kept])
    assert len(store.replay("alice", "", 100)[0]) == 1  # builds this connection's index of "to"
    with pytest.raises(RuntimeError):
        with storesql.one_transaction(store.database["messages"]):
            store.database["messages"].insert_many([{"_id": make(gen, [])["id"], "to": ["alice"], "data": n, "at": 0} for n in range(3)])
            raise RuntimeError("failed half-way")

    assert store.replay("alice", "", 100)[0] == [{"id": kept["id"], "data": kept["data"]}]
    assert store.database["messages"].count_documents({"to": "alice"}) == 1
    other = Store.open()
    try:
        assert ids_of(other.replay("alice", "", 100)[0]) == [kept["id"]]
    finally:
        other.close()


def test_repeated_recipients_are_stored_once(store):
    message = make(IdGenerator(), ["alice", "alice", "bob"])
    store.insert_messages([message])

    assert ids_of(store.replay("alice", "", 100)[0]) == [message["id"]]
    assert store.database["messages"].find_one({"_id": message["id"]})["to"] == ["alice", "bob"]
    assert store.unacked("alice", 100)[0] == [{"id": message["id"], "data": message["data"]}]


def test_a_list_naming_the_broadcast_user_is_rejected_and_nothing_is_stored(store):
    with pytest.raises(StoreError, match="broadcast"):
        store.insert_messages([make(IdGenerator(), ["alice", "*"])])

    assert store.database["messages"].count_documents({}) == 0


def test_data_mongodb_cannot_hold_rejects_the_batch_before_anything_is_stored(store):
    gen = IdGenerator()
    good, too_big = make(gen, ["alice"]), make(gen, ["alice"], {"n": 2**64})

    with pytest.raises(StoreError, match="64 bits"):
        store.insert_messages([good, too_big])

    assert store.database["messages"].count_documents({}) == 0
    assert store.replay("alice", "", 100) == ([], False)


def test_a_message_over_mongodbs_document_limit_rejects_the_batch_before_anything_is_stored(store):
    """Only with MAX_MESSAGE_BYTES raised far above its default: MongoDB's DocumentTooLarge came as
    no StoreError, and the embedded store stored what MongoDB refuses."""
    gen = IdGenerator()
    good, huge = make(gen, ["alice"]), make(gen, ["alice"], "x" * MAX_DOCUMENT_BYTES)

    with pytest.raises(StoreError, match="over MongoDB's limit"):
        store.insert_messages([good, huge])

    assert store.database["messages"].count_documents({}) == 0


def test_recording_receipts_counts_each_once_and_a_batch_recorded_before_not_at_all(store):
    now = time.time()
    acked = {"id": IdGenerator().next_id(), "user": "alice", "state": "acked", "at": now}
    written = dict(acked, state="written")

    assert store.record_receipts([acked, written, written]) == 2
    assert store.record_receipts([written, acked]) == 0, "the same batch again: a retried task"
    assert store.record_receipts([]) == 0
    assert store.database["receipts"].count_documents({"m": acked["id"]}) == 2  # one per state


def test_a_batch_of_receipts_is_a_few_documents_and_each_receipt_is_found(store):
    gen = IdGenerator()
    messages = [make(gen, [f"u{n}"]) for n in range(250)]
    store.insert_messages(messages)
    now = time.time()
    batch = [{"id": m["id"], "user": f"u{n}", "state": "acked", "at": now} for n, m in enumerate(messages)]
    batch += [{"id": m["id"], "user": f"u{n}", "state": "written", "at": now - 0.5} for n, m in enumerate(messages)]

    assert store.record_receipts(batch) == 500

    assert store.database["receipts"].count_documents({}) <= 4  # per state, and per minute
    assert store.not_acked([(m["id"], f"u{n}") for n, m in enumerate(messages)] + [(messages[0]["id"], "u1")]) == [(messages[0]["id"], "u1")]
    assert store.status(messages[7]["id"])["recipients"] == {"u7": {"written": now - 0.5, "acked": now}}


def test_a_receipt_recorded_twice_keeps_its_first_time(store):
    message = make(IdGenerator(), ["ann"])
    store.insert_messages([message])
    store.record_receipts([{"id": message["id"], "user": "ann", "state": "written", "at": 200.0}])
    store.record_receipts([{"id": message["id"], "user": "ann", "state": "written", "at": 100.0},
                           {"id": message["id"], "user": "ann", "state": "written", "at": 150.0}])

    assert store.status(message["id"])["recipients"] == {"ann": {"written": 100.0}}


def test_purge_removes_records_older_than_the_retention_and_keeps_newer_ones(store):
    old_gen, new_gen = IdGenerator(clock=lambda: OLD), IdGenerator()
    old = [make(old_gen, ["alice"]), make(old_gen, "*")]
    new = [make(new_gen, ["alice"]), make(new_gen, "*")]
    store.insert_messages(old + new)
    store.record_receipts([{"id": old[0]["id"], "user": "alice", "state": "acked", "at": OLD}, {"id": new[0]["id"], "user": "alice", "state": "acked", "at": time.time()}])

    deleted = store.purge()

    if store.embedded:  # on MongoDB the TTL monitor may have taken some of them first
        assert deleted == 3
    assert ids_of(store.replay("alice", "", 100)[0]) == [m["id"] for m in new]
    assert store.database["messages"].count_documents({}) == 2
    assert store.database["receipts"].count_documents({}) == 1
    assert store.status(new[0]["id"])["recipients"]["alice"]["acked"] > OLD


@pytest.mark.parametrize("around", [True, False], ids=["around mongomock", "through queries"])
def test_messages_routed_late_are_listed_per_user_from_a_routing_time_with_the_latest_time_kept(store, around, monkeypatch):
    """On the embedded engine the records are the hash index's candidates, checked here: mongomock's
    own check of the ``$in`` took 77 s for the resumes of 1,000 users with 40 records each, against
    the replay's 15 s.  Without them (MongoDB, or another litemongo) a query: both find the same."""
    if not around:
        monkeypatch.setattr(storesql, "candidates", lambda *_: None)
    elif store.embedded:
        monkeypatch.setattr(store._late, "find", None)  # not through mongomock's query
    gen = IdGenerator()
    one, everyone, other = make(gen, ["alice", "bob"]), make(gen, "*"), make(gen, ["carol"])
    store.insert_messages([one, everyone, other])
    now = time.time()

    store.mark_late([{"id": one["id"], "to": one["to"]}, {"id": other["id"], "to": other["to"]}], now - 10)
    store.mark_late([{"id": everyone["id"], "to": "*"}], now - 5)
    store.mark_late([{"id": one["id"], "to": one["to"]}], now - 20)  # an earlier time does not replace a later one

    assert sorted(store.late_since(int((now - 60) * 1000), ["bob", "dave"])) == sorted([
        (one["id"], ["alice", "bob"], int((now - 10) * 1000)), (everyone["id"], "*", int((now - 5) * 1000))])
    assert sorted(mid for mid, _, _ in store.late_since(int((now - 60) * 1000), ["carol"])) == sorted([other["id"], everyone["id"]])
    assert store.late_since(int((now - 7) * 1000), ["alice"]) == [(everyone["id"], "*", int((now - 5) * 1000))]
    store.mark_late([{"id": one["id"], "to": one["to"]}], now)  # routed late again, later
    assert sorted(mid for mid, _, _ in store.late_since(int((now - 1) * 1000), ["alice"])) == [one["id"]]
    assert store.late_since(int((now - 1) * 1000), ["alice", "bob", "alice"]) == [(one["id"], ["alice", "bob"], int(now * 1000))], "once"
    assert store.late_since(int((now + 1) * 1000), ["alice", "bob", "carol"]) == []


def test_purge_removes_the_records_of_old_messages_routed_late(store):
    old, new = make(IdGenerator(clock=lambda: OLD), ["alice"]), make(IdGenerator(), ["alice"])
    store.insert_messages([old, new])
    store.mark_late([{"id": old["id"], "to": old["to"]}, {"id": new["id"], "to": new["to"]}], time.time())

    store.purge()

    assert [mid for mid, _, _ in store.late_since(0, ["alice"])] == [new["id"]]


def test_purge_measures_age_from_the_given_now(store):
    store.insert_messages([make(IdGenerator(), ["alice"])])
    later = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(seconds=settings.RETENTION_SECONDS + 60)

    assert store.purge(now=later) == 1
    assert store.replay("alice", "", 100) == ([], False)


def test_an_old_message_stored_after_newer_ones_is_purged_at_the_latest_with_them(store):
    """The embedded engine skips a collection whose first document (in insertion order) is not old
    yet: it reads one document instead of decoding all of them."""
    new, old = make(IdGenerator(), ["alice"]), make(IdGenerator(clock=lambda: OLD), ["alice"])
    store.insert_messages([new])
    store.insert_messages([old])  # a late insert of an old id

    store.purge()
    if store.embedded:
        assert store.database["messages"].count_documents({}) == 2, "kept until the first document is old too"
    later = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(seconds=settings.RETENTION_SECONDS + 60)
    store.purge(now=later)

    assert store.database["messages"].count_documents({}) == 0


def test_a_purge_with_nothing_old_keeps_everything(store):
    store.insert_messages([make(IdGenerator(), ["alice"])])
    store.claim_ids("key:k", ["a" * 24])
    assert store.purge() == 0
    assert store.database["messages"].count_documents({}) == 1 and store.claim_ids("key:k", ["b" * 24]) == ["a" * 24]


def test_embedded_store_keeps_messages_across_a_restart(store):
    if not store.embedded:
        pytest.skip("restart persistence is the embedded engine's job; MongoDB is a server")
    message = make(IdGenerator(), ["alice"])
    store.insert_messages([message])
    store.close()

    reopened = Store.open()
    try:
        assert reopened.replay("alice", "", 100) == ([{"id": message["id"], "data": message["data"]}], False)
    finally:
        reopened.close()


def _insert_from_another_process(data_dir: str, db_name: str, user: str, count: int, start) -> None:
    settings.DATA_DIR, settings.MONGO_DB = data_dir, db_name
    gen = IdGenerator()
    start.wait(timeout=60)  # both open the (new) files and write at the same moment
    store = Store.open()
    for _ in range(count // 10):  # many small inserts, so that the two processes interleave
        store.insert_messages([make(gen, [user, "shared"]) for _ in range(10)])
    store.close()


def test_processes_writing_the_same_new_store_at_once_lose_nothing(location):
    count, users = 300, ("alice", "bob", "carol")
    spawn = multiprocessing.get_context("spawn")
    start = spawn.Barrier(len(users))
    workers = [spawn.Process(target=_insert_from_another_process, args=(*location, user, count, start)) for user in users]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=120)

    store = Store.open()
    try:
        assert [w.exitcode for w in workers] == [0] * len(users)
        shared, _ = store.replay("shared", "", 10 * count)
        assert len(set(ids_of(shared))) == len(users) * count
        assert [len(store.replay(user, "", 10 * count)[0]) for user in users] == [count] * len(users)
    finally:
        if not store.embedded:
            store.database.client.drop_database(store.database.name)
        store.close()


def test_a_document_damaged_inside_its_row_raises_a_store_error_not_bsons_own(store):
    """Damage inside a row's BSON passes SQLite's checks (PRAGMA quick_check says ok), and a
    replay raised bson's InvalidBSON, which nothing turned into a StoreError."""
    if not store.embedded:
        pytest.skip("the embedded engine's files")
    gen = IdGenerator()
    message = make(gen, ["ann"], "x" * 100)
    store.insert_messages([message])
    table = storesql.table_of(store.database["messages"])
    assert table is not None
    table._connection.execute(f"UPDATE {table._table_name} SET {table.DOC} = ?", (b"\x30\x00\x00\x00garbage",))
    table._connection.commit()

    with pytest.raises(StoreError) as raised:
        store.message_data([message["id"]])
    assert "cannot be read" in str(raised.value) and "move the folder aside" in str(raised.value), raised.value


@pytest.mark.parametrize("damage", ["header", "pages"])
def test_a_damaged_store_file_raises_a_store_error_saying_how_to_recover_it(location, damage):
    """SQLite's "file is not a database" and "database disk image is malformed" (a disk that lost
    writes, a file changed by hand) failed every task with only SQLite's words, and with damaged
    pages the worker went on storing while every replay failed (1013 every 15 s)."""
    store = Store.open()
    if not store.embedded:
        pytest.skip("the embedded engine's files")
    gen = IdGenerator()
    store.insert_messages([make(gen, ["ann"], "x" * 3000) for _ in range(300)])
    store.close()
    path = os.path.join(location[0], "mongo", location[1], "messages")
    for leftover in (path + "-wal", path + "-shm"):
        if os.path.exists(leftover):
            os.remove(leftover)
    with open(path, "r+b") as file:
        if damage == "header":
            file.write(b"\xff" * 100)
        else:
            file.seek(8192)
            file.write(os.urandom(200_000))
    with pytest.raises(StoreError) as raised:
        opened = Store.open()
        try:
            opened.replay("ann", "", 1000)
        finally:
            opened.close()
    assert not isinstance(raised.value, StoreUnavailable), "retrying cannot help"
    assert "is damaged" in str(raised.value) and ".recover" in str(raised.value), raised.value
    assert os.path.join(location[0], "mongo") in str(raised.value)


def test_an_unreachable_mongodb_raises_store_unavailable_naming_mongo_url(location, monkeypatch):
    with socket.socket() as sock:  # a port that nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setattr(settings, "MONGO_URL", f"mongodb://127.0.0.1:{port}/")
    monkeypatch.setattr(store_module, "TIMEOUT_MS", 300)

    with pytest.raises(StoreUnavailable, match="MONGO_URL"):
        Store.open()


@pytest.mark.parametrize("url", ["mongodb://push:p@ss@127.0.0.1:27017/", "mongodb://push:s3cret@127.0.0.1:99999/"],
                         ids=["a password with an unescaped @", "a port out of range"])
def test_a_mongo_url_pymongo_refuses_raises_store_error_naming_it_without_its_password(location, monkeypatch, url):
    """pymongo refused such a URL with its own ValueError or InvalidURI, out of Store.open: the
    worker's start (which catches StoreError) and each collect failed with an error naming no
    setting."""
    monkeypatch.setattr(settings, "MONGO_URL", url)

    with pytest.raises(StoreError, match="MONGO_URL=mongodb://push:\\*\\*\\*@") as raised:
        Store.open()
    assert not isinstance(raised.value, StoreUnavailable) and "s3cret" not in str(raised.value)


def _client_raising(error: Exception, cause: Exception | None = None):
    """A MongoClient that raises ``error`` (from ``cause``) as pymongo's does on a URL it refuses
    or whose SRV lookup fails (pymongo/synchronous/srv_resolver.py: ``raise ConfigurationError(str(exc)) from exc``)."""
    def make(*_, **__):
        raise error from cause
    return make


def test_a_dns_lookup_of_a_mongodb_srv_url_that_timed_out_raises_store_unavailable(location, monkeypatch):
    monkeypatch.setattr(settings, "MONGO_URL", "mongodb+srv://push:s3cret@cluster0.example.net/")
    monkeypatch.setattr(store_module.pymongo, "MongoClient",
                        _client_raising(errors.ConfigurationError("The DNS operation timed out."), dns.exception.Timeout()))

    with pytest.raises(StoreUnavailable, match="DNS") as raised:
        Store.open()
    assert "s3cret" not in str(raised.value)


@pytest.mark.parametrize("error, cause", [
    (errors.ConfigurationError("Cannot specify replicaSet with loadBalanced=true"), None),
    (errors.ConfigurationError("The DNS query name does not exist: _mongodb._tcp.cluster0.example.net."), dns.resolver.NXDOMAIN()),
], ids=["options pymongo refuses", "a name with no SRV records"])
def test_other_errors_of_a_mongodb_srv_url_raise_store_error_not_unavailable(location, monkeypatch, error, cause):
    """Every ConfigurationError of a mongodb+srv:// URL was taken for a DNS lookup that may work
    later, and retried for ever."""
    monkeypatch.setattr(settings, "MONGO_URL", "mongodb+srv://push:s3cret@cluster0.example.net/")
    monkeypatch.setattr(store_module.pymongo, "MongoClient", _client_raising(error, cause))

    with pytest.raises(StoreError, match="cannot be used") as raised:
        Store.open()
    assert not isinstance(raised.value, StoreUnavailable) and "s3cret" not in str(raised.value)


def _through_mongodb(store, monkeypatch, method: str, error: Exception) -> None:
    """Make the store's writes and reads go through its collections' pymongo methods, as on
    MongoDB, with ``method`` of every collection raising ``error`` (what a server sends back)."""
    monkeypatch.setattr(storesql, "table_of", lambda *_: None)

    def refuse(*_, **__):
        raise error
    for name in ("messages", "receipts", "keys"):
        monkeypatch.setattr(getattr(store, f"_{name}"), method, refuse)


#: What MongoDB answers when a replica set cannot do a write now (pymongo raises those that come as
#: a command's error as AutoReconnect, which the store already took as unavailable).
REFUSED_FOR_NOW = {
    "replication timed out": errors.BulkWriteError({"writeErrors": [], "nInserted": 1, "writeConcernErrors": [
        {"code": 64, "codeName": "WriteConcernFailed", "errmsg": "waiting for replication timed out", "errInfo": {"wtimeout": True}}]}),
    "primary stepped down, some keys taken": errors.BulkWriteError({"nInserted": 0, "writeErrors": [
        {"index": 0, "code": 11000, "errmsg": "E11000 duplicate key error"}], "writeConcernErrors": [
        {"code": 11602, "codeName": "InterruptedDueToReplStateChange", "errmsg": "operation was interrupted"}]}),
    "no primary for a write": errors.BulkWriteError({"nInserted": 0, "writeConcernErrors": [], "writeErrors": [
        {"index": 0, "code": 10107, "errmsg": "not primary"}, {"index": 1, "code": 11000, "errmsg": "E11000 duplicate key error"}]}),
}


@pytest.mark.parametrize("error", list(REFUSED_FOR_NOW.values()), ids=list(REFUSED_FOR_NOW))
def test_a_write_mongodb_refuses_for_now_raises_store_unavailable_so_that_it_is_retried(store, monkeypatch, error):
    """A replica set that did not confirm a write in time, or lost its primary during it, answers
    insert_many with a BulkWriteError: that was a StoreError, which Collect and the receipts task
    do not retry (the batch failed, and its acks were lost), although the same write succeeds
    once the set has a primary again."""
    _through_mongodb(store, monkeypatch, "insert_many", error)
    gen = IdGenerator()

    with pytest.raises(StoreUnavailable, match="primary"):
        store.insert_messages([make(gen, ["alice"])])
    with pytest.raises(StoreUnavailable):
        store.record_receipts([{"id": gen.next_id(), "user": "alice", "state": "acked", "at": time.time()}])
    with pytest.raises(StoreUnavailable):
        store.claim_ids("key:k", [gen.next_id()])


def test_a_write_concern_error_of_a_stepdown_on_a_purge_raises_store_unavailable(store, monkeypatch):
    _through_mongodb(store, monkeypatch, "delete_many", errors.WriteConcernError(
        "operation was interrupted", 11602, {"ok": 1, "n": 3, "writeConcernError": {"code": 11602, "errmsg": "operation was interrupted"}}))
    monkeypatch.setattr(storesql, "may_hold_older", lambda *_: True)

    with pytest.raises(StoreUnavailable):
        store.purge()


def test_a_write_mongodb_refuses_for_good_raises_store_error_not_store_unavailable(store, monkeypatch):
    _through_mongodb(store, monkeypatch, "insert_many", errors.BulkWriteError({"nInserted": 0, "writeConcernErrors": [], "writeErrors": [
        {"index": 0, "code": 121, "errmsg": "Document failed validation"}, {"index": 1, "code": 11600, "errmsg": "interrupted at shutdown"}]}))

    with pytest.raises(StoreError, match="failed validation") as raised:
        store.insert_messages([make(IdGenerator(), ["alice"])])
    assert not isinstance(raised.value, StoreUnavailable)


def test_an_authentication_failure_raises_store_error_naming_mongo_url_without_its_password(store, monkeypatch):
    monkeypatch.setattr(settings, "MONGO_URL", "mongodb://push:s3cret@db.example:27017/push")
    _through_mongodb(store, monkeypatch, "insert_many", errors.OperationFailure(
        "Authentication failed.", 18, {"ok": 0, "errmsg": "Authentication failed.", "code": 18, "codeName": "AuthenticationFailed"}))

    with pytest.raises(StoreError, match="mongodb://push:\\*\\*\\*@db.example:27017/push") as raised:
        store.insert_messages([make(IdGenerator(), ["alice"])])
    assert not isinstance(raised.value, StoreUnavailable) and "s3cret" not in str(raised.value)


class _TTLIndexOfAnotherRetention:
    """A collection whose TTL index was made with another RETENTION_SECONDS: MongoDB refuses
    createIndexes with IndexOptionsConflict (85), as it does when an index on ``at`` has another name."""
    name = "messages"

    def create_index(self, *_, **__):
        raise errors.OperationFailure("An equivalent index already exists with the same name but different options", 85)


def test_a_changed_retention_changes_the_ttl_index_by_its_key(store, monkeypatch):
    commands = []
    monkeypatch.setattr(store.database, "command", lambda *args, **kwargs: commands.append((args, kwargs)))

    store._ensure_ttl(_TTLIndexOfAnotherRetention())

    assert commands == [(("collMod", "messages"), {"index": {"keyPattern": {"at": 1}, "expireAfterSeconds": settings.RETENTION_SECONDS}})]


def test_a_changed_retention_the_user_may_not_apply_leaves_the_store_working_and_says_what_to_run(store, monkeypatch, caplog):
    """collMod is not in MongoDB's readWrite role: a deploy that changed RETENTION_SECONDS made
    every worker process fail to open its store, and so to store any message."""
    def unauthorized(*_, **__):
        raise errors.OperationFailure("not authorized on push to execute command { collMod: ... }", 13)
    monkeypatch.setattr(store.database, "command", unauthorized)

    store._ensure_ttl(_TTLIndexOfAnotherRetention())

    assert "collMod" in caplog.text and "RETENTION_SECONDS" in caplog.text and "dbAdmin" in caplog.text


def test_a_locked_embedded_store_raises_store_unavailable_naming_the_disk(store):
    if not store.embedded:
        pytest.skip("SQLite locking is the embedded engine's")
    blocker = sqlite3.connect(f"{settings.DATA_DIR}/mongo/{settings.MONGO_DB}/messages", isolation_level=None)
    blocker.execute("BEGIN EXCLUSIVE")
    try:
        with pytest.raises(StoreUnavailable, match="disk"):
            store.insert_messages([make(IdGenerator(), ["alice"])])  # waits SQLite's 5 s busy timeout
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()


def test_get_store_returns_one_store_per_process_and_a_new_one_after_a_fork(location, monkeypatch):
    monkeypatch.setattr(store_module, "_local", type(store_module._local)())
    parent = store_module.get_store()
    assert store_module.get_store() is parent

    monkeypatch.setattr(store_module.os, "getpid", lambda: -1)  # as seen from a forked child
    child = store_module.get_store()

    assert child is not parent
    assert store_module.get_store() is child
    child.close()
    parent.close()


# --- idempotency keys, inbox, redelivery candidates and status (delivery guarantees) ---------

def test_claiming_a_new_key_keeps_the_ids_given(store):
    assert store.claim_ids("task:abc", ["a" * 24]) == ["a" * 24]


def test_claiming_a_key_again_returns_the_first_ids_not_the_new_ones(store):
    store.claim_ids("key:order-17", ["a" * 24])
    assert store.claim_ids("key:order-17", ["b" * 24]) == ["a" * 24]


def test_claiming_many_keys_binds_each_new_one_and_returns_earlier_ids_for_old_ones(store):
    store.claim_ids("key:old", ["a" * 24])
    claimed = store.claim_many([("key:new", ["b" * 24]), ("key:old", ["c" * 24]), ("task:t1", ["d" * 24])])
    assert claimed == [["b" * 24], ["a" * 24], ["d" * 24]]
    assert store.claim_ids("task:t1", ["e" * 24]) == ["d" * 24]


def test_a_key_given_twice_in_one_claim_gets_the_first_ids_both_times(store):
    assert store.claim_many([("key:k", ["a" * 24]), ("key:k", ["b" * 24])]) == [["a" * 24], ["a" * 24]]


def test_a_key_is_bound_anew_only_while_it_still_holds_the_ids_its_rebinder_found(store):
    store.claim_many([("task:t1", ["a" * 24, "b" * 24]), ("task:t2", ["c" * 24])])
    rebound = store.rebind_keys([("task:t1", ["a" * 24, "b" * 24], ["d" * 24, "e" * 24], None), ("task:t2", ["x" * 24], ["f" * 24], None)])
    assert rebound == {"task:t1"}, "t2 holds other ids than the rebinder found: another run bound it meanwhile"
    assert store.claim_many([("task:t1", ["g" * 24, "g" * 24]), ("task:t2", ["h" * 24])]) == [["d" * 24, "e" * 24], ["c" * 24]]
    assert store.rebind_keys([("task:t1", ["a" * 24, "b" * 24], ["i" * 24, "j" * 24], None)]) == set(), "a second rebind from the same old ids lost"
    assert store.claim_ids("task:t1", ["k" * 24, "k" * 24]) == ["d" * 24, "e" * 24]


def test_a_key_claimed_after_the_given_time_is_not_bound_anew(store):
    store.claim_many([("key:recent", ["a" * 24])])
    assert store.rebind_keys([("key:recent", ["a" * 24], ["b" * 24], time.time() - 30)]) == set()
    assert store.rebind_keys([("key:recent", ["a" * 24], ["b" * 24], time.time() + 1)]) == {"key:recent"}
    assert store.claim_ids("key:recent", ["c" * 24]) == ["b" * 24]


def test_a_request_sent_again_without_retries_binds_anew_a_stale_claim_that_stored_nothing_but_not_a_recent_one(store):
    """A request that failed (the store unavailable through its five retries) and that business
    code sends again with the same ``key``, as the README says to, runs as a new task (no
    ``retries``): it stored its message under the first run's ids, over 30 s old, which a resume
    from a message stored meanwhile skipped.  A claim that recent may be a run still between its
    two writes, so it is kept; as is a claim whose message is stored."""
    from tasks.collectkeys import STALE_CLAIM_SECONDS, _claim_afresh

    gen = IdGenerator()
    stale, recent, done = [gen.next_id()], [gen.next_id()], make(gen, ["ann"])
    store.claim_many([("key:stale", stale), ("key:recent", recent), ("key:done", [done["id"]])])
    store.insert_messages([done])
    long_ago = datetime.datetime.now(datetime.UTC) - datetime.timedelta(seconds=STALE_CLAIM_SECONDS + 5)
    for key in ("key:stale", "key:done"):
        store._keys.update_one({"_id": key}, {"$set": {"at": long_ago}})
    mine = [[gen.next_id()] for _ in range(3)]
    wanted = list(zip(("key:stale", "key:recent", "key:done"), mine))
    assert _claim_afresh(store, wanted, [stale, recent, [done["id"]]], retried=set()) == [mine[0], recent, [done["id"]]]
    assert store.claim_many([("key:stale", ["x" * 24])]) == [mine[0]]


def test_a_retry_whose_key_another_run_rebound_first_takes_that_runs_ids_not_the_old_ones(store):
    """Two runs of one request sent again (the same ``key`` from two retried tasks, or a retry
    redelivered) both read the key bound to ids none of which is stored, and both rebind it: the
    one that lost the compare-and-set stored the message under the old ids, the winner under its
    own, and the message went out twice under two ids."""
    from tasks.collectkeys import _claim_afresh

    old, theirs, mine = ["a" * 24], ["b" * 24], ["c" * 24]
    assert store.claim_many([("key:k", old)]) == [old]  # this run's claim reads the old ids ...
    assert store.rebind_keys([("key:k", old, theirs, None)]) == {"key:k"}  # ... and the other run rebinds them first
    assert _claim_afresh(store, [("key:k", mine)], [old], {"key:k"}) == [theirs]
    assert store.claim_ids("key:k", mine) == theirs


def test_the_inbox_holds_the_users_unacked_messages_oldest_first(store):
    gen = IdGenerator()
    messages = [make(gen, ["ann", "bob"], {"n": n}) for n in range(4)]
    store.insert_messages(messages)
    store.record_receipts([{"id": messages[1]["id"], "user": "ann", "state": "acked", "at": time.time()}])
    store.record_receipts([{"id": messages[2]["id"], "user": "ann", "state": "written", "at": time.time()}])

    envelopes, truncated = store.unacked("ann", 100)

    assert ids_of(envelopes) == [messages[0]["id"], messages[2]["id"], messages[3]["id"]]
    assert truncated is False
    assert len(store.unacked("bob", 100)[0]) == 4, "an ack by one user is not an ack by another"


def test_the_inbox_leaves_broadcasts_out(store):
    gen = IdGenerator()
    store.insert_messages([make(gen, "*", "all"), make(gen, ["ann"], "mine")])
    assert [e["data"] for e in store.unacked("ann", 100)[0]] == ["mine"]


def test_the_inbox_keeps_the_newest_messages_beyond_the_limit_and_says_so(store):
    gen = IdGenerator()
    messages = [make(gen, ["ann"], n) for n in range(5)]
    store.insert_messages(messages)
    envelopes, truncated = store.unacked("ann", 2)
    assert ids_of(envelopes) == [messages[3]["id"], messages[4]["id"]] and truncated is True


def test_not_acked_keeps_the_deliveries_no_device_of_that_user_acked_in_the_order_given(store):
    gen = IdGenerator()
    message = make(gen, ["ann", "bob"], 1)
    store.insert_messages([message])
    store.record_receipts([{"id": message["id"], "user": "bob", "state": "acked", "at": time.time()},
                           {"id": message["id"], "user": "ann", "state": "written", "at": time.time()}])

    assert store.not_acked([(message["id"], "bob"), (message["id"], "ann"), ("f" * 24, "ann")]) == [(message["id"], "ann"), ("f" * 24, "ann")]


def test_deliveries_between_are_the_recipients_of_the_messages_stored_in_the_window_without_broadcasts(store):
    now = datetime.datetime.now(datetime.timezone.utc)
    gen = IdGenerator()
    inside = [make(gen, ["ann", "bob"], 1), make(gen, "*", 2)]
    store.insert_messages(inside)
    store.insert_messages([make(IdGenerator(clock=lambda: time.time() - 3600), ["ann"], "too old")])

    pairs = store.deliveries_between(now - datetime.timedelta(seconds=60), now + datetime.timedelta(seconds=60))

    assert pairs == [(inside[0]["id"], "ann"), (inside[0]["id"], "bob")]


def test_deliveries_between_reads_exactly_the_window_on_either_path(store):
    """On the embedded engine the window is read through litemongo's primary key; it must find
    what the query finds, at the window's edges too (a message at its start is in, at its end out)."""
    base = time.time() - 300
    gens = [IdGenerator(clock=lambda at=base + offset: at) for offset in (0.0, 10.0, 20.0, 30.0)]
    messages = [make(gen, [f"u{n}", "ann"], n) for n, gen in enumerate(gens)] + [make(gens[1], "*", "all")]
    store.insert_messages(messages)
    utc = datetime.timezone.utc
    start, end = (datetime.datetime.fromtimestamp(base + offset, utc) for offset in (10.0, 30.0))

    pairs = store.deliveries_between(start, end)

    assert pairs == sorted((m["id"], user) for m in messages[1:3] for user in m["to"])
    if store.embedded:
        first, last = messages[1]["id"][:12] + "0" * 12, messages[3]["id"][:12] + "0" * 12
        read = storesql.id_range(store.database["messages"], first, last)
        assert read is not None, "litemongo's table is not what tasks.store reads: the sweep would scan every message"
        queried = store.database["messages"].find({"_id": {"$gte": first, "$lt": last}})
        assert [doc["_id"] for doc in read] == sorted(doc["_id"] for doc in queried)


@pytest.mark.parametrize("around", [True, False], ids=["around mongomock", "through queries"])
def test_the_inbox_and_reads_by_id_find_the_same_on_either_path(store, around, monkeypatch):
    """On the embedded engine, reads by _id go through litemongo's primary key and the inbox's ack
    lookup takes the hash index's candidates unchecked (tasks.storesql.by_id and
    candidates); without them (MongoDB) they are queries.  Both must find the same,
    also what another connection wrote after this one built its index."""
    if not store.embedded:
        pytest.skip("these reads are the embedded engine's; on MongoDB the other tests cover the queries")
    if not around:
        monkeypatch.setattr(storesql, "candidates", lambda *_: None)
        monkeypatch.setattr(storesql, "by_id", lambda *_: None)
    gen = IdGenerator()
    messages = [make(gen, ["ann", "bob"], n) for n in range(6)]
    mids = [m["id"] for m in messages]
    now = time.time()
    store.insert_messages(messages[:3])
    store.record_receipts([{"id": mid, "user": "bob", "state": "acked", "at": now} for mid in mids[:3]])
    assert ids_of(store.unacked("ann", 100)[0]) == mids[:3]  # this connection's index is built
    other = Store.open()
    try:
        other.insert_messages(messages[3:])
        other.record_receipts([{"id": mids[4], "user": "ann", "state": "acked", "at": now},
                               {"id": mids[5], "user": "ann", "state": "written", "at": now}])
    finally:
        other.close()

    assert ids_of(store.unacked("ann", 100)[0]) == mids[:4] + mids[5:]
    assert ids_of(store.unacked("bob", 100)[0]) == mids[3:]
    assert store.not_acked([(mids[4], "ann"), (mids[5], "ann"), (mids[0], "bob")]) == [(mids[5], "ann")]

    assert ids_of(store.replay("ann", "", 100)[0]) == mids and store.message_data(mids[1:2]) == {mids[1]: 1}
    if not around:
        return
    receipts, collection = store.database["receipts"], store.database["messages"]
    candidates = storesql.candidates(receipts, {"m": {"$in": mids}})
    assert candidates is not None, "litemongo has no find_candidates: an inbox read would go through mongomock's checks and copies"
    assert {doc["_id"] for doc in receipts.find({"m": {"$in": mids}})} <= {doc["_id"] for doc in candidates}
    read = storesql.by_id(collection, [mids[4], mids[0], mids[4], "f" * 24], {"data": 1})
    assert read is not None, "litemongo's table has no get_many: reads by id would rebuild the index and scan"
    assert read == [{"_id": mids[4], "data": 4}, {"_id": mids[0], "data": 0}]
    assert read == [collection.find_one({"_id": mid}, {"data": 1}) for mid in (mids[4], mids[0])]


def test_a_replay_finds_the_same_through_the_range_of_ids_and_through_the_index(store, monkeypatch):
    """On the embedded engine a replay with few messages since its id reads them through the
    table's primary key (tasks.storesql.id_range), and through the index otherwise: both
    must give the same messages, with the same limit and truncation, also for what another
    connection wrote after this one built its index."""
    if not store.embedded:
        pytest.skip("the range read is the embedded engine's")
    gen = IdGenerator()
    messages = [make(gen, to, n) for n, to in enumerate([["ann"], ["bob"], "*", ["bob", "ann"], ["cy"], ["ann"], "*", ["bob"]])]
    store.insert_messages(messages[:4])
    assert len(store.replay("ann", "", 100)[0]) == 3  # this connection's index is built
    other = Store.open()
    try:
        other.insert_messages(messages[4:])
    finally:
        other.close()
    mine = [m["id"] for m in messages if m["to"] == "*" or "ann" in m["to"]]

    def replays() -> list:
        return [store.replay("ann", after, limit) for after in ("", messages[0]["id"], messages[3]["id"], messages[7]["id"]) for limit in (1, 2, 100)]

    through_range = replays()
    assert storesql.id_range(store.database["messages"], "", first_included=False, most=100) is not None, \
        "litemongo's table is not what tasks.store reads"
    monkeypatch.setattr(storereplays, "_EMBEDDED_RANGE_ROWS", 3)  # more than that since "" and since messages[0]
    mixed = replays()
    monkeypatch.setattr(storesql, "id_range", lambda *_, **__: None)
    through_index = replays()

    assert through_range == mixed == through_index
    assert through_range[2] == ([{"id": mid, "data": int(n)} for mid, n in zip(mine, (0, 2, 3, 5, 6))], False)
    assert through_range[1] == ([{"id": mine[-2], "data": 5}, {"id": mine[-1], "data": 6}], True)
    assert through_range[8] == ([{"id": mine[3], "data": 5}, {"id": mine[4], "data": 6}], False)
    assert through_range[11] == ([], False)


@pytest.mark.parametrize("rows", [100, 4, 0], ids=["one read for all", "one read for some", "each alone"])
def test_replays_of_several_connections_are_each_what_its_own_replay_is(store, rows, monkeypatch):
    """Store.replays answers the connections of one tasks.replay_many; on the embedded engine with
    one read of what came after the earliest of them when that is few enough
    (_EMBEDDED_RANGE_ROWS), else each alone.  Either way each answer is that connection's replay."""
    gen = IdGenerator()
    messages = [make(gen, to, n) for n, to in enumerate([["ann"], ["bob"], "*", ["bob", "ann"], ["cy"], ["ann"], "*", ["bob"]])]
    store.insert_messages(messages)
    afters = ["", messages[1]["id"], messages[4]["id"], messages[7]["id"]]
    wanted = [(user, after) for after in afters for user in ("ann", "bob", "dee")]
    alone = {limit: [store.replay(user, after, limit) for user, after in wanted] for limit in (1, 2, 100)}
    monkeypatch.setattr(storereplays, "_EMBEDDED_RANGE_ROWS", rows)

    for limit in (1, 2, 100):
        assert store.replays(wanted, limit) == alone[limit]
        assert store.replays(list(reversed(wanted)), limit) == list(reversed(alone[limit]))
    assert alone[100][0] == ([{"id": messages[n]["id"], "data": n} for n in (0, 2, 3, 5, 6)], False)
    assert alone[2][1] == ([{"id": messages[n]["id"], "data": n} for n in (6, 7)], True)
    assert alone[100][8] == ([{"id": messages[6]["id"], "data": 6}], False)
    assert store.replays([], 10) == []


def budget(max_bytes: int):
    """A replay's cut as tasks.replay makes it from REPLAY_MAX_BYTES (frames as the node writes them)."""
    return lambda newest_first: newest_within(newest_first, max_bytes)


@pytest.mark.parametrize("rows", [100, 4, 0], ids=["one read for all", "one read for some", "each alone"])
def test_a_replay_over_its_byte_budget_keeps_its_newest_messages_and_says_it_was_truncated(store, rows, monkeypatch):
    """REPLAY_MAX_BYTES: the newest messages whose frames fit, oldest first, truncated; the same
    through every read (on MongoDB, always through the index)."""
    gen = IdGenerator()
    messages = [make(gen, to, "x" * 100) for to in [["ann"], "*", ["ann", "bob"], ["bob"], ["ann"], ["ann"]]]
    store.insert_messages(messages)
    frame = frame_bytes({"id": messages[0]["id"], "data": "x" * 100})
    mine = [{"id": m["id"], "data": m["data"]} for m in messages if m["to"] == "*" or "ann" in m["to"]]
    monkeypatch.setattr(storereplays, "_EMBEDDED_RANGE_ROWS", rows)
    if rows == 0:  # every read through mongomock's queries, as on MongoDB
        monkeypatch.setattr(storesql, "id_range", lambda *_, **__: None)
        monkeypatch.setattr(storesql, "by_id", lambda *_, **__: None)

    assert store.replay("ann", "", 100, budget(3 * frame)) == (mine[-3:], True)
    assert store.replay("ann", "", 100, budget(3 * frame + frame - 1)) == (mine[-3:], True)
    assert store.replay("ann", "", 100, budget(1)) == (mine[-1:], True), "the newest, even alone over the budget"
    assert store.replay("ann", "", 100, budget(5 * frame)) == store.replay("ann", "", 100) == (mine, False)
    assert store.replay("ann", "", 2, budget(5 * frame)) == (mine[-2:], True), "REPLAY_LIMIT still applies"
    assert store.replays([("ann", ""), ("bob", messages[2]["id"])], 100, budget(frame)) == [(mine[-1:], True), ([{"id": messages[3]["id"], "data": "x" * 100}], False)]


def test_an_inbox_over_its_byte_budget_keeps_its_newest_unacked_messages_and_says_it_was_truncated(store):
    gen = IdGenerator()
    messages = [make(gen, ["ann"], "y" * 50) for _ in range(5)]
    store.insert_messages(messages)
    store.record_receipts([{"id": messages[3]["id"], "user": "ann", "state": "acked", "at": time.time()}])
    frame = frame_bytes({"id": messages[0]["id"], "data": "y" * 50})
    pending = [{"id": m["id"], "data": m["data"]} for n, m in enumerate(messages) if n != 3]

    assert store.unacked("ann", 100, budget(2 * frame)) == (pending[-2:], True)
    assert store.unacked("ann", 100, budget(4 * frame)) == store.unacked("ann", 100) == (pending, False)
    assert store.unacked("ann", 3, budget(4 * frame)) == (pending[-3:], True)


@pytest.mark.parametrize("read", ["replay", "inbox"])
def test_a_replay_over_its_byte_budget_reads_the_data_of_its_newest_messages_only(store, read, monkeypatch):
    """The data is read newest first, _REPLAY_READ_IDS messages first and twice as many in each
    next read (up to _REPLAY_READ_IDS_MAX), and no further once the budget is spent: the worker does
    not hold REPLAY_LIMIT messages to send a few, and a long replay is a few reads, not one per
    hundred."""
    gen = IdGenerator()
    messages = [make(gen, ["ann"], "z" * 200) for _ in range(450)]
    store.insert_messages(messages)
    monkeypatch.setattr(storereplays, "_EMBEDDED_RANGE_ROWS", 10)  # through the index, as on MongoDB past it
    reads: list[list[str]] = []
    data_of = store.message_data
    monkeypatch.setattr(store, "message_data", lambda mids: reads.append(list(mids)) or data_of(mids))
    frame = frame_bytes({"id": messages[0]["id"], "data": "z" * 200})

    def replay(cut=None):
        reads.clear()
        return store.replay("ann", "", 1000, cut) if read == "replay" else store.unacked("ann", 1000, cut)

    assert replay(budget(150 * frame)) == ([{"id": m["id"], "data": m["data"]} for m in messages[-150:]], True)
    assert reads == [[m["id"] for m in messages[350:]], [m["id"] for m in messages[150:350]]], "the newest 100, then the 200 before"
    envelopes, truncated = replay(budget(1000 * frame))
    assert len(envelopes) == 450 and not truncated and [len(r) for r in reads] == [100, 200, 150]
    monkeypatch.setattr(storedocs, "_REPLAY_READ_IDS_MAX", 200)
    envelopes, truncated = replay(budget(1000 * frame))
    assert len(envelopes) == 450 and not truncated and [len(r) for r in reads] == [100, 200, 150]
    monkeypatch.setattr(storedocs, "_REPLAY_READ_IDS_MAX", 150)
    envelopes, truncated = replay(budget(1000 * frame))
    assert envelopes == [{"id": m["id"], "data": m["data"]} for m in messages] and [len(r) for r in reads] == [100, 150, 150, 50]
    replay()
    assert [len(r) for r in reads] == [450], "without a cut, in one read as before"


def test_reads_with_the_index_pinned_keep_the_index_of_their_first_read(store):
    """Store.index_pinned (the reads of one tasks.replay_many): on the embedded engine the reads
    inside keep the index of the first one although another process writes meanwhile, and the
    first read after the block sees everything again."""
    if not store.embedded:
        pytest.skip("the query index is the embedded engine's")
    gen = IdGenerator()
    first, second, third = (make(gen, ["ann"], n) for n in range(3))
    store.insert_messages([first])
    other = Store.open()
    try:
        with store.index_pinned():
            assert ids_of(store.unacked("ann", 100)[0]) == [first["id"]]
            other.insert_messages([second])
            other.record_receipts([{"id": first["id"], "user": "ann", "state": "acked", "at": time.time()}])
            assert ids_of(store.unacked("ann", 100)[0]) == [first["id"]], "the index was rebuilt inside the block"
        assert ids_of(store.unacked("ann", 100)[0]) == [second["id"]]
        other.insert_messages([third])
        assert ids_of(store.unacked("ann", 100)[0]) == [second["id"], third["id"]]
    finally:
        other.close()


def _index_add_raising_at(monkeypatch, call: int) -> None:
    """The embedded engine's query index raises on its ``call``-th addition from now on, as a task
    interrupted there (Celery's soft time limit, raised from a signal handler on any line) does."""
    from litemongo._vendor.mongomock import indexing

    real, calls = indexing.CollectionIndexes.add, [0]

    def add(self, key, doc):
        calls[0] += 1
        if calls[0] == call:
            raise RuntimeError("interrupted (SoftTimeLimitExceeded)")
        return real(self, key, doc)
    monkeypatch.setattr(indexing.CollectionIndexes, "add", add)


def test_an_index_rebuild_interrupted_after_another_process_wrote_hides_nothing_from_the_next_read(store, monkeypatch):
    """The rebuild after another process wrote records the data version first: interrupted, it
    left the old index counted as current, and this process's inbox and status missed the other's
    message until someone wrote again."""
    if not store.embedded:
        pytest.skip("the query index is the embedded engine's")
    gen = IdGenerator()
    store.insert_messages([make(gen, ["bob"], n) for n in range(5)])
    assert store.unacked("alice", 100)[0] == []  # this process's index built
    other = Store.open()
    try:
        theirs = make(gen, ["alice"], "hello")
        other.insert_messages([theirs])
        with monkeypatch.context() as patched:
            _index_add_raising_at(patched, 3)
            with pytest.raises(Exception, match="interrupted"):
                store.unacked("alice", 100)

        assert ids_of(store.unacked("alice", 100)[0]) == [theirs["id"]]
        assert store.status(theirs["id"]) is not None
    finally:
        other.close()


def test_an_insert_interrupted_while_it_indexes_what_it_committed_hides_none_of_it(store, monkeypatch):
    if not store.embedded:
        pytest.skip("the query index is the embedded engine's")
    gen = IdGenerator()
    store.insert_messages([make(gen, ["bob"], 0)])
    assert store.unacked("alice", 100)[0] == []  # this process's index built
    mine = [make(gen, ["alice"], n) for n in range(3)]
    with monkeypatch.context() as patched:
        _index_add_raising_at(patched, 2)
        with pytest.raises(Exception, match="interrupted"):
            store.insert_messages(mine)

    assert sorted(store.message_data([m["id"] for m in mine])) == sorted(m["id"] for m in mine)  # committed
    assert ids_of(store.unacked("alice", 100)[0]) == [m["id"] for m in mine]
    assert all(store.status(m["id"]) is not None for m in mine)


def test_acked_since_lists_the_acks_recorded_after_the_given_time(store):
    gen = IdGenerator()
    message = make(gen, ["ann", "bob"], 1)
    store.insert_messages([message])
    now = time.time()
    store.record_receipts([{"id": message["id"], "user": "ann", "state": "acked", "at": now},
                           {"id": message["id"], "user": "bob", "state": "written", "at": now}])
    store.record_receipts([{"id": message["id"], "user": "bob", "state": "acked", "at": now - 3600}])

    since = datetime.datetime.fromtimestamp(now - 60, datetime.timezone.utc)
    assert store.acked_since(since) == {(message["id"], "ann")}


def test_status_lists_each_recipient_with_the_time_of_each_receipt_state_and_no_one_else(store):
    gen = IdGenerator()
    message = make(gen, ["ann", "bob"], "x")
    store.insert_messages([message])
    store.record_receipts([
        {"id": message["id"], "user": "ann", "state": "routed", "at": 100.0},
        {"id": message["id"], "user": "ann", "state": "acked", "at": 102.5},
        {"id": message["id"], "user": "mallory", "state": "acked", "at": 103.0},  # a browser may ack any id
    ])

    status = store.status(message["id"])

    assert status["to"] == ["ann", "bob"]
    assert status["recipients"] == {"ann": {"routed": 100.0, "acked": 102.5}, "bob": {}}
    assert abs(status["collected_at"] - time.time()) < 60


def test_status_of_a_broadcast_lists_the_users_a_node_wrote_it_to(store):
    """A browser may ack any id: bob, offline when the broadcast went, acked its id later and was
    listed as a recipient that had acked it."""
    message = make(IdGenerator(), "*")
    store.insert_messages([message])
    store.record_receipts([{"id": message["id"], "user": "ann", "state": "written", "at": 100.0},
                           {"id": message["id"], "user": "bob", "state": "acked", "at": 101.0},
                           {"id": message["id"], "user": "cy", "state": "written", "at": 100.5},
                           {"id": message["id"], "user": "cy", "state": "acked", "at": 102.0}])

    assert store.status(message["id"])["recipients"] == {"ann": {"written": 100.0}, "cy": {"written": 100.5, "acked": 102.0}}


def test_status_of_an_unknown_id_is_none(store):
    assert store.status("f" * 24) is None


def test_purge_also_forgets_old_idempotency_keys(store):
    store.claim_ids("key:old", ["a" * 24])
    later = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(seconds=settings.RETENTION_SECONDS + 60)
    store.purge(now=later)
    assert store.claim_ids("key:old", ["b" * 24]) == ["b" * 24]


def _claim_many(data_dir: str, db: str, prefix: str, out) -> None:
    settings.DATA_DIR, settings.MONGO_DB = data_dir, db
    store = Store.open()
    gen = IdGenerator()
    out.put([store.claim_ids(f"{prefix}{i}", [gen.next_id()])[0] for i in range(200)])


def test_two_processes_claiming_the_same_keys_at_once_get_the_same_ids(location):
    if settings.MONGO_URL:
        pytest.skip("MongoDB enforces _id itself; this checks the embedded engine's lock")
    Store.open().close()  # create the files first, as a worker's start does
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_claim_many, args=(*location, "race:", out)) for _ in range(2)]
    for proc in procs:
        proc.start()
    first, second = out.get(timeout=60), out.get(timeout=60)
    for proc in procs:
        proc.join(30)
    assert first == second, "a key was bound to two different ids"


def test_embedded_commits_leave_the_checkpoints_to_the_stores_thread(store):
    """SQLite's default copies the log back into the file inside the commit that takes it past
    1,000 pages (a stall of several ms in that task); the store's connections leave that to a
    thread (tasks.checkpoints), and checkpoint themselves only past the safety net."""
    if not store.embedded:
        pytest.skip("write-ahead logs are the embedded engine's")
    checkpointer = store._checkpointer
    assert checkpointer is not None and checkpointer.running
    tables = [storesql.table_of(store.database[name]) for name in store_module._COLLECTIONS]
    assert sorted(checkpointer.paths) == sorted(checkpoints.database_file(t._connection) for t in tables)
    assert {t._connection.execute("PRAGMA wal_autocheckpoint").fetchone()[0] for t in tables} == {checkpoints.SAFETY_NET_PAGES}
    checkpointer.stop()  # from here on only this test checkpoints
    path = checkpoints.database_file(tables[0]._connection)
    size = os.path.getsize(path)

    gen = IdGenerator()
    for _ in range(10):  # about 1,500 pages of log
        store.insert_messages([make(gen, ["alice"], {"pad": "x" * 3000}) for _ in range(200)])

    assert os.path.getsize(path) == size  # no commit copied the log into the file
    busy, pages, copied = checkpointer.checkpoint()[path]
    assert (busy, copied) == (0, pages) and pages > 1000
    assert os.path.getsize(path) > size + 4_000_000
    assert len(store.replay("alice", "", 5000)[0]) == 2000


def test_an_embedded_log_that_grew_large_shrinks_back_once_copied_into_its_file(location, monkeypatch):
    """SQLite reuses a write-ahead log from its start but never shrinks its file: a log that grew
    large once (a purge after a long outage) kept that size on disk for good."""
    monkeypatch.setattr(checkpoints, "WAL_KEEP_BYTES", 1 << 20)
    store = Store.open()
    try:
        if not store.embedded:
            pytest.skip("write-ahead logs are the embedded engine's")
        store._checkpointer.stop()  # from here on only this test checkpoints
        path = checkpoints.database_file(storesql.table_of(store.database["messages"])._connection)
        gen = IdGenerator()
        for _ in range(10):  # about 6 MB of log
            store.insert_messages([make(gen, ["alice"], {"pad": "x" * 3000}) for _ in range(200)])
        assert os.path.getsize(path + "-wal") > 5_000_000
        busy, pages, copied = store._checkpointer.checkpoint()[path]
        assert (busy, copied) == (0, pages)
        store.insert_messages([make(gen, ["alice"], {"small": 1})])  # starts the log again from its start
        assert os.path.getsize(path + "-wal") <= 1 << 20
        assert len(store.replay("alice", "", 5000)[0]) == 2001
    finally:
        store.close()


def test_closing_an_embedded_store_stops_its_checkpoint_thread(location):
    store = Store.open()
    if not store.embedded:
        store.close()
        pytest.skip("the checkpoint thread is the embedded engine's")
    checkpointer = store._checkpointer
    assert checkpointer.running
    store.close()
    assert not checkpointer.running


#: JSON objects that pymongo's BSON decoder reads back as a DBRef (a string "$ref" and an "$id").
REF_SHAPED = [
    {"see": {"$ref": "orders", "$id": 7}},
    {"$ref": "u", "$id": {"n": [1, {"$ref": "inner", "$id": "x", "$db": "d"}]}, "extra": True},
    [{"$ref": "a", "$id": None}, {"$ref": 5, "$id": 1}, {"$ref": "only"}],
]


@pytest.mark.parametrize("data", REF_SHAPED, ids=["nested", "top level with a nested one and another key", "in a list, beside look-alikes"])
@pytest.mark.parametrize("path", ["range", "index"])
def test_data_shaped_like_a_mongodb_dbref_comes_back_as_it_was_collected(store, data, path, monkeypatch):
    """Such data came back as bson's DBRef from every read (the replays, the inbox, the reads by
    id that redelivery and a collect sent again with its key use), which no JSON encoder takes: one
    such message failed every replay request it was part of, other users' included."""
    if path == "index":
        monkeypatch.setattr(storesql, "id_range", lambda *_, **__: None)
    elif not store.embedded:
        pytest.skip("the range read is the embedded engine's")
    gen = IdGenerator()
    message = make(gen, ["ref-user"], data)
    store.insert_messages([message])

    reads = [store.replay("ref-user", "", 10)[0], store.replays([("ref-user", ""), ("other", "")], 10)[0][0], store.unacked("ref-user", 10)[0],
             [{"id": message["id"], "data": store.message_data([message["id"]])[message["id"]]}],
             [{"id": message["id"], "data": store.messages([message["id"]])[message["id"]]["data"]}]]
    for envelopes in reads:
        assert envelopes == [{"id": message["id"], "data": data}]
        assert json.loads(wirejson.text(envelopes[0]["data"])) == data


# --- a disk that refuses writes (embedded engine) -------------------------------------------

def _page_limit(store, collection: str) -> None:
    """Cap the SQLite file of ``collection`` at the pages it has: SQLite then refuses what needs a
    new page with SQLITE_FULL ("database or disk is full"), the code a full disk gives."""
    connection = storesql.table_of(store.database[collection])._connection
    connection.execute("PRAGMA max_page_count=1")  # clamped to the pages in use


def test_a_full_embedded_store_says_the_disk_of_data_dir_is_full_and_keeps_everything_stored(store):
    if not store.embedded:
        pytest.skip("the embedded engine's disk")
    gen = IdGenerator()
    before = [make(gen, ["alice"], {"pad": "x" * 3000}) for _ in range(20)]
    store.insert_messages(before)
    _page_limit(store, "messages")

    refused = [make(gen, ["alice"], {"pad": "y" * 3000}) for _ in range(20)]
    with pytest.raises(StoreUnavailable, match=r"database or disk is full\): the disk of DATA_DIR \(.+\) is full, \d+ bytes free now: free space on it"):
        store.insert_messages(refused)

    storesql.table_of(store.database["messages"])._connection.execute("PRAGMA max_page_count=1073741823")  # space again
    store.insert_messages(refused)  # what the retry sends: nothing of its first try was kept
    after = [make(gen, ["alice"])]
    store.insert_messages(after)
    assert ids_of(store.replay("alice", "", 1000)[0]) == ids_of(before + refused + after)
    assert store.unacked("alice", 1000)[0] == store.replay("alice", "", 1000)[0]
    other = Store.open()  # what another process reads
    try:
        assert ids_of(other.replay("alice", "", 1000)[0]) == ids_of(before + refused + after)
    finally:
        other.close()


def _in_a_full_process(data_dir: str, db_name: str, out) -> None:
    """A worker process whose files cannot grow (RLIMIT_FSIZE, as ``ulimit -f``): a store write
    fails as on a full disk, with EFBIG (Python ignores SIGXFSZ, as Celery's pool processes do)."""
    import resource

    settings.DATA_DIR, settings.MONGO_DB = data_dir, db_name
    store = Store.open()
    store._checkpointer.stop()
    gen = IdGenerator()
    old = [make(gen, ["alice"]) for _ in range(30)]
    store.insert_messages(old)
    inbox = ids_of(store.unacked("alice", 100)[0])  # builds this process's index of "to"
    for name in _COLLECTIONS_OF_TEST:  # empty logs: the next write must make them grow
        storesql.table_of(store.database[name])._connection.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.RLIM_INFINITY))
    errors_seen = []
    for attempt in (lambda: store.insert_messages([make(gen, ["alice"])]),
                    lambda: store.purge(datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(seconds=settings.RETENTION_SECONDS + 60))):
        try:
            attempt()
            errors_seen.append(None)
        except StoreError as exc:
            errors_seen.append(f"{type(exc).__name__}: {exc}")
    after_failed_purge = ids_of(store.unacked("alice", 100)[0])
    resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    newer = make(gen, ["alice"])
    store.insert_messages([newer])
    out.put({"errors": errors_seen, "inbox": inbox, "after_failed_purge": after_failed_purge,
             "later": ids_of(store.unacked("alice", 100)[0]), "expected_later": inbox + [newer["id"]]})
    store.close()


_COLLECTIONS_OF_TEST = ("messages", "receipts", "keys")


def test_a_write_past_the_workers_file_size_limit_says_so_and_a_failed_purge_hides_nothing(location):
    """The error names the limit rather than a full disk; a purge whose commit the disk refused
    left this process's index without the documents it had deleted before the commit, so the
    user's inbox read empty here (until another process wrote) though all was still stored."""
    if os.environ.get("MONGO_URL"):
        pytest.skip("the embedded engine's disk")
    spawn = multiprocessing.get_context("spawn")
    out = spawn.Queue()
    child = spawn.Process(target=_in_a_full_process, args=(*location, out))
    child.start()
    got = out.get(timeout=60)
    child.join(30)

    insert_error, purge_error = got["errors"]
    assert insert_error.startswith("StoreUnavailable: storing 1 messages: ") and "reached the worker's file size limit (4096 bytes" in insert_error
    assert purge_error.startswith("StoreUnavailable: purging old messages: ") and "file size limit" in purge_error
    assert len(got["inbox"]) == 30 and got["after_failed_purge"] == got["inbox"]
    assert got["later"] == got["expected_later"]


def _open_as_another_user(data_dir: str, db_name: str, out) -> None:
    if os.geteuid() == 0:  # root writes whatever the modes say
        os.setgid(65534)
        os.setuid(65534)
    settings.DATA_DIR, settings.MONGO_DB = data_dir, db_name
    tries = []
    create_indexes = Store._create_indexes

    def counted(store) -> None:  # each try of the open (Store.ensure_indexes retries some errors)
        tries.append(1)
        create_indexes(store)

    Store._create_indexes = counted
    try:
        Store.open().close()
        out.put(("opened", len(tries)))
    except StoreError as exc:
        out.put((f"{type(exc).__name__}: {exc}", len(tries)))


def test_a_store_the_workers_user_may_not_write_says_who_and_where_without_retrying_the_open():
    if os.environ.get("MONGO_URL"):
        pytest.skip("the embedded engine's disk")
    import shutil
    import tempfile

    data_dir = tempfile.mkdtemp(prefix="push-readonly-")  # reachable by another user, unlike tmp_path
    try:
        os.chmod(data_dir, 0o755)
        db_name = "readonly"
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(settings, "DATA_DIR", data_dir)
            patch.setattr(settings, "MONGO_DB", db_name)
            Store.open().close()
        for root, dirs, files in os.walk(data_dir):
            for name in dirs:
                os.chmod(os.path.join(root, name), 0o555)
            for name in files:
                os.chmod(os.path.join(root, name), 0o444)
        spawn = multiprocessing.get_context("spawn")
        out = spawn.Queue()
        child = spawn.Process(target=_open_as_another_user, args=(data_dir, db_name, out))
        child.start()
        said, tries = out.get(timeout=60)
        child.join(30)
    finally:
        for root, dirs, _ in os.walk(data_dir):
            for name in dirs:
                os.chmod(os.path.join(root, name), 0o755)
        shutil.rmtree(data_dir)

    assert said.startswith("StoreUnavailable: creating indexes: ")
    assert f"the worker's user ({'nobody, uid 65534' if os.geteuid() == 0 else ''}" in said
    assert f"may not write its folder or files: give that user write access to {data_dir} and everything in it" in said
    assert tries == 1, f"the open was tried {tries} times"  # ten tries slept 2.25 s

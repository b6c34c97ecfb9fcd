"""tasks.checkpoints on plain SQLite files in WAL mode (no store, no sockets)."""

from __future__ import annotations

import logging
import os
import sqlite3
import time

import pytest

from tasks.checkpoints import Checkpointer, database_file


def wal_file(path) -> sqlite3.Connection:
    """A connection to a new WAL-mode file that never checkpoints by itself, with 200 rows in its log."""
    connection = sqlite3.connect(path, isolation_level=None)
    connection.execute("PRAGMA journal_mode=WAL")
    connection.execute("PRAGMA wal_autocheckpoint=0")
    connection.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, doc BLOB)")
    connection.execute("BEGIN")
    connection.executemany("INSERT INTO t VALUES (?, ?)", [(i, b"x" * 500) for i in range(200)])
    connection.execute("COMMIT")
    return connection


def test_a_checkpoint_copies_every_page_of_each_log_into_its_file(tmp_path):
    paths = [str(tmp_path / name) for name in ("a.db", "b.db")]
    writers = [wal_file(path) for path in paths]
    assert all(os.path.getsize(path) < 20_000 for path in paths)  # the rows are in the logs only

    done = Checkpointer(paths).checkpoint()

    assert set(done) == set(paths)
    for busy, pages, copied in done.values():
        assert (busy, copied) == (0, pages) and pages > 20
    assert all(os.path.getsize(path) > 100_000 for path in paths)
    assert [w.execute("SELECT count(*) FROM t").fetchone()[0] for w in writers] == [200, 200]


def test_a_checkpoint_does_not_change_the_writers_data_version(tmp_path):
    """litemongo rebuilds a connection's query index when PRAGMA data_version changes; a checkpoint
    must not cause that."""
    writer = wal_file(tmp_path / "a.db")
    before = writer.execute("PRAGMA data_version").fetchone()[0]

    Checkpointer([str(tmp_path / "a.db")]).checkpoint()

    assert writer.execute("PRAGMA data_version").fetchone()[0] == before
    assert writer.execute("SELECT count(*) FROM t").fetchone()[0] == 200


def test_the_thread_checkpoints_until_stopped_and_closes_its_connections(tmp_path):
    path = str(tmp_path / "a.db")
    wal_file(path)
    checkpointer = Checkpointer([path], interval=0.01)
    checkpointer.start()
    try:
        deadline = time.monotonic() + 10
        while os.path.getsize(path) < 100_000:  # the rows reach the file only through a checkpoint
            if time.monotonic() > deadline:
                pytest.fail("the checkpoint thread never copied the log into the file")
            time.sleep(0.01)
    finally:
        checkpointer.stop()
    assert not checkpointer.running
    assert checkpointer._connections == {}


def test_a_file_that_fails_is_logged_once_and_left_out_until_it_works(tmp_path, caplog):
    missing = tmp_path / "gone" / "a.db"  # its folder does not exist: SQLite cannot open it
    checkpointer = Checkpointer([str(missing)])

    with caplog.at_level(logging.WARNING, logger="tasks.checkpoints"):
        assert checkpointer.checkpoint() == {}
        assert checkpointer.checkpoint() == {}
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and str(missing) in warnings[0].getMessage()

    missing.parent.mkdir()
    wal_file(missing)
    assert checkpointer.checkpoint()[str(missing)][0] == 0
    checkpointer.stop()  # never started: closes what checkpoint() opened
    assert checkpointer._connections == {}


def test_database_file_names_the_main_file(tmp_path):
    assert database_file(sqlite3.connect(tmp_path / "a.db")) == str(tmp_path / "a.db")
    assert database_file(sqlite3.connect(":memory:")) == ""

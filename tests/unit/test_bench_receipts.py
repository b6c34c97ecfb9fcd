"""bench/e2e.py's duplicates that arrive after their row ended (a redelivery comes REDELIVER_AFTER,
30 s, after the first delivery, long after --settle), as e2e.py and compare.py count them (pure:
made-up records, nothing is run)."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
e2e = pytest.importorskip("e2e")

USERS = ["u0", "u1"]


def rec(index: int, message_id: str, seq: int) -> tuple:
    """A client process's record: (conn index, id, seq, t_send, t_recv)."""
    return (index, message_id, seq, 100.0, 100.1)


def row(receipts: "e2e.RunReceipts", mode: str, seq0: int, records: list[tuple]) -> dict:
    """One row of two messages, seq0 to user 0 and seq0 + 1 to user 1, analysed and noted as e2e.py does."""
    expected = [("u0", seq0), ("u1", seq0 + 1)]
    seqs = range(seq0, seq0 + 2)
    result = e2e.analyse(mode, expected, records, USERS, 100.0, 100.0, ("done", 100.0, 100.0, 2, 2, []), seqs)
    result.update(problems=[], late_duplicates=0)
    receipts.add_row(result, records, seqs)
    return result


def test_a_copy_arriving_after_its_row_is_a_duplicate_of_that_row_wherever_it_lands():
    receipts = e2e.RunReceipts()
    a = row(receipts, "single", 0, [rec(0, "a0", 0), rec(1, "a1", 1)])
    assert a["duplicates"] == 0

    receipts.late([rec(0, "a0", 0)], "before batch")  # among the next row's leftovers
    # among the next row's own records, twice: strays there, not that row's duplicates
    b = row(receipts, "batch", 2, [rec(0, "b2", 2), rec(1, "a1", 1), rec(1, "b3", 3), rec(1, "a1", 1)])
    assert (b["delivered"], b["duplicates"], b["stray_from_earlier_modes"]) == (2, 0, 2)
    assert (a["duplicates"], a["late_duplicates"]) == (3, 3)

    assert receipts.late([rec(0, "b2", 2)], "after the last mode") == 1  # the final take
    assert (b["duplicates"], b["late_duplicates"]) == (1, 1)
    assert b["problems"] == ["duplicate after the row ended (after the last mode): connection 0, id b2, seq 2"]


def test_a_message_first_received_after_its_row_is_no_duplicate_but_its_second_copy_is():
    receipts = e2e.RunReceipts()
    a = row(receipts, "single", 0, [rec(0, "a0", 0)])
    assert a["lost"] == 1
    assert receipts.late([rec(1, "a1", 1)], "before batch") == 0
    assert receipts.late([rec(1, "a1", 1), rec(1, "zz", 99)], "after the last mode") == 1  # seq 99: no row's
    assert a["duplicates"] == 1

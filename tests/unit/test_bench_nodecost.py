"""bench/nodecost.py's count of a row's receipts (pure: made-up records, nothing is run)."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
nodecost = pytest.importorskip("nodecost")


def records(*seqs: int) -> list[tuple]:
    """What the e2e client process takes: (conn index, id, seq, t_send, t_recv)."""
    return [(0, f"id{seq}", seq, 0.0, 0.0) for seq in seqs]


def test_one_loss_and_one_duplicate_is_not_a_complete_row():
    receipts = nodecost.RowReceipts(100, 4)
    receipts.add(records(100, 101, 102))
    receipts.add(records(102))  # 103 lost, 102 twice: four receipts for four envelopes
    assert (receipts.delivered, receipts.duplicates, receipts.stray) == (3, 1, 0)


def test_a_duplicate_alone_is_counted_as_such_not_as_a_loss():
    receipts = nodecost.RowReceipts(100, 3)
    receipts.add(records(100, 101, 101, 102))
    assert (receipts.delivered, receipts.duplicates) == (3, 1)


def test_late_frames_of_the_row_before_are_strays_not_deliveries():
    receipts = nodecost.RowReceipts(100, 3)
    receipts.add(records(98, 99, 100, 101))
    assert (receipts.delivered, receipts.duplicates, receipts.stray) == (2, 0, 2)

"""bench/capacity.py's count of the clients one message to everyone reached (pure: made-up records
and pipes, nothing is run)."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
capacity = pytest.importorskip("capacity")


class FakePipe:
    """A client process's end as :meth:`capacity.Clients.take` sees it: answers ``take`` with ``answer``."""

    def __init__(self, answer: tuple) -> None:
        self.answer = answer

    def send(self, command) -> None:
        assert command == ("take",)

    def poll(self, timeout=None) -> bool:
        return True

    def recv(self):
        return self.answer


def clients(*answers: tuple) -> "capacity.Clients":
    c = object.__new__(capacity.Clients)
    c.conns = [FakePipe(a) for a in answers]
    return c


def test_index_0_of_two_client_processes_is_two_clients_reached():
    records, closed = clients(([(0, 1, 10.0, 10.5)], []), ([(0, 1, 10.0, 10.7)], [])).take()
    receipts = capacity.BroadcastReceipts(1)
    assert receipts.add(records) == 2
    assert (receipts.reached, receipts.duplicates, receipts.first) == (2, 0, {(0, 0): 10.5, (1, 0): 10.7})


def test_a_duplicate_does_not_make_up_for_a_client_not_reached():
    receipts = capacity.BroadcastReceipts(1)
    receipts.add([(0, 0, 1, 10.0, 10.5), (0, 1, 1, 10.0, 10.6)])
    assert receipts.add([(0, 0, 1, 10.0, 11.5), (0, 2, 7, 10.0, 11.6)]) == 0  # client (0, 2) never got seq 1
    assert (receipts.reached, receipts.duplicates, receipts.other) == (2, 1, 1)
    assert receipts.first[(0, 0)] == 10.5

    result = {"connected": 3, "closed_while_idle": 0, "broadcast_received": receipts.reached, "broadcast_duplicates": receipts.duplicates}
    failure = capacity.broadcast_failure(result)
    assert "reached 2 of 3 connected" in failure and "1 duplicate" in failure


def test_every_client_reached_once_is_no_failure():
    assert capacity.broadcast_failure({"connected": 3, "closed_while_idle": 0, "broadcast_received": 3, "broadcast_duplicates": 0}) is None

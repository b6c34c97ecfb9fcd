"""Pure tests of ``wsnode.receipts``: acks in, batches handed to an injected ``send`` out."""

from __future__ import annotations

from wsnode.receipts import ReceiptBuffer

ID1, ID2, ID3 = (f"018bcfe56800{n:06x}a1b2c3" for n in (1, 2, 3))


class Recorder:
    def __init__(self) -> None:
        self.batches: list[list[dict]] = []

    def __call__(self, batch: list[dict]) -> None:
        self.batches.append(batch)


def buffer(batch_max: int = 3, now: float = 1000.0) -> tuple[ReceiptBuffer, Recorder]:
    sent = Recorder()
    return ReceiptBuffer(sent, batch_max, clock=lambda: now), sent


def test_adding_fewer_than_batch_max_sends_nothing():
    receipts, sent = buffer(batch_max=3)
    receipts.add(ID1, "alice")
    receipts.add(ID2, "alice")

    assert sent.batches == []


def test_reaching_batch_max_sends_one_batch():
    receipts, sent = buffer(batch_max=2)
    receipts.add(ID1, "alice")
    receipts.add(ID2, "bob")

    assert [[item["id"] for item in batch] for batch in sent.batches] == [[ID1, ID2]]


def test_the_buffer_is_empty_after_an_automatic_flush():
    receipts, _ = buffer(batch_max=2)
    receipts.add(ID1, "alice")
    receipts.add(ID2, "bob")

    assert len(receipts) == 0


def test_each_full_batch_is_sent_separately():
    receipts, sent = buffer(batch_max=2)
    for message_id in (ID1, ID2, ID3, ID1):
        receipts.add(message_id, "alice")

    assert [len(batch) for batch in sent.batches] == [2, 2]


def test_flush_sends_the_items_waiting():
    receipts, sent = buffer(batch_max=10)
    receipts.add(ID1, "alice")
    receipts.add(ID2, "bob")

    receipts.flush()

    assert [[item["id"] for item in batch] for batch in sent.batches] == [[ID1, ID2]]


def test_flush_sends_the_rest_after_a_full_batch():
    receipts, sent = buffer(batch_max=2)
    for message_id in (ID1, ID2, ID3):
        receipts.add(message_id, "alice")

    receipts.flush()

    assert [[item["id"] for item in batch] for batch in sent.batches] == [[ID1, ID2], [ID3]]


def test_flush_of_an_empty_buffer_sends_nothing():
    receipts, sent = buffer()

    receipts.flush()

    assert sent.batches == []


def test_a_second_flush_sends_nothing_more():
    receipts, sent = buffer()
    receipts.add(ID1, "alice")
    receipts.flush()

    receipts.flush()

    assert len(sent.batches) == 1


def test_len_counts_the_items_waiting():
    receipts, _ = buffer(batch_max=10)
    receipts.add(ID1, "alice")
    receipts.add(ID2, "alice")

    assert len(receipts) == 2


def test_an_item_carries_id_user_state_and_the_clock_time():
    receipts, sent = buffer(now=1_700_000_000.25)
    receipts.add(ID1, "alice")
    receipts.flush()

    assert sent.batches == [[{"id": ID1, "user": "alice", "state": "acked", "at": 1_700_000_000.25}]]


def test_an_item_carries_a_state_other_than_acked_when_given():
    receipts, sent = buffer()
    receipts.add(ID1, "alice", state="delivered")
    receipts.flush()

    assert sent.batches[0][0]["state"] == "delivered"


def test_each_item_reads_the_clock_when_it_is_added():
    times = iter([10.0, 20.0])
    sent = Recorder()
    receipts = ReceiptBuffer(sent, 10, clock=lambda: next(times))
    receipts.add(ID1, "alice")
    receipts.add(ID2, "alice")

    receipts.flush()

    assert [item["at"] for item in sent.batches[0]] == [10.0, 20.0]


def test_items_keep_the_order_they_were_added_in():
    receipts, sent = buffer(batch_max=10)
    for message_id in (ID3, ID1, ID2):
        receipts.add(message_id, "alice")
    receipts.flush()

    assert [item["id"] for item in sent.batches[0]] == [ID3, ID1, ID2]

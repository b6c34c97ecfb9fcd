"""Pure tests of receipts: ``wsnode.receipts`` (acks in, batches handed to an injected ``send`` out) and how the store groups them into documents."""

from __future__ import annotations

from wsnode.receipts import ReceiptBuffer, argsrepr

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


def test_add_many_makes_one_item_per_message_at_one_clock_time():
    times = iter([10.0, 20.0])
    sent = Recorder()
    receipts = ReceiptBuffer(sent, 10, clock=lambda: next(times))
    receipts.add_many([ID1, ID2], "alice", "written")
    receipts.flush()

    assert sent.batches == [[{"id": ID1, "user": "alice", "state": "written", "at": 10.0},
                             {"id": ID2, "user": "alice", "state": "written", "at": 10.0}]]


def test_add_many_sends_full_batches_of_batch_max_and_keeps_the_rest_in_order():
    receipts, sent = buffer(batch_max=2)
    receipts.add(ID3, "bob")
    receipts.add_many([ID1, ID2, ID3, ID1], "alice", "written")

    assert [[(item["id"], item["user"]) for item in batch] for batch in sent.batches] == [[(ID3, "bob"), (ID1, "alice")], [(ID2, "alice"), (ID3, "alice")]]
    assert len(receipts) == 1
    receipts.flush()
    assert [item["id"] for item in sent.batches[-1]] == [ID1]


def test_add_many_of_nothing_sends_nothing():
    receipts, sent = buffer(batch_max=1)
    receipts.add_many([], "alice", "written")

    assert sent.batches == [] and len(receipts) == 0


# --- how the store groups receipts into documents (tasks.storedocs.receipt_documents, pure) -------

def test_receipt_documents_group_by_state_and_minute_with_a_digest_id():
    from tasks.storedocs import receipt_documents

    batch = [{"id": "m1", "user": "ann", "state": "acked", "at": 120.5}, {"id": "m2", "user": "bob", "state": "acked", "at": 121.0},
             {"id": "m1", "user": "ann", "state": "written", "at": 120.0}, {"id": "m3", "user": "ann", "state": "acked", "at": 185.0}]

    docs = receipt_documents(batch)

    assert [(d["s"], d["r"]) for d in docs] == [("acked", [["m1", "ann", 120.5], ["m2", "bob", 121.0]]), ("acked", [["m3", "ann", 185.0]]),
                                                ("written", [["m1", "ann", 120.0]])]
    assert docs[0]["m"] == ["m1", "m2"] and docs[0]["at"].timestamp() == 121.0
    assert [d["_id"] for d in receipt_documents(list(reversed(batch)))] == [d["_id"] for d in docs], "same receipts, same ids"
    assert len({d["_id"] for d in docs}) == 3


def test_receipt_documents_keep_each_receipts_first_time_and_split_big_batches(monkeypatch):
    from tasks import storedocs

    monkeypatch.setattr(storedocs, "RECEIPT_DOC_ITEMS", 2)
    batch = [{"id": f"m{n}", "user": "ann", "state": "routed", "at": 10.0 + n} for n in range(5)]
    batch.append({"id": "m0", "user": "ann", "state": "routed", "at": 5.0})

    docs = storedocs.receipt_documents(batch)

    assert [d["r"] for d in docs] == [[["m0", "ann", 5.0], ["m1", "ann", 11.0]], [["m2", "ann", 12.0], ["m3", "ann", 13.0]], [["m4", "ann", 14.0]]]


def test_flower_sees_a_batch_as_its_count_per_state_not_its_receipts():
    batch = [{"id": ID1, "user": "alice", "state": "acked", "at": 1.0}, {"id": ID2, "user": "bob", "state": "written", "at": 1.0},
             {"id": ID3, "user": "alice", "state": "acked", "at": 2.0}]
    assert argsrepr(batch) == "[<3 receipts: 2 acked, 1 written>]"
    assert argsrepr(batch[:1]) == "[<1 receipt: 1 acked>]"


# --- what tasks.receipts takes ------------------------------------------------------------------

def test_tasks_receipts_keeps_the_well_formed_items_and_says_why_each_other_is_left_out():
    """One malformed item (a node's bug, or a message published by hand) failed the whole batch:
    every good ack in it was lost, and its messages were redelivered.  A time far ahead was
    stored, and kept the embedded store from purging any receipt."""
    from tasks.receipts import parse_receipts

    now = 1_800_000_000.0
    good = [{"id": ID1, "user": "alice", "state": "acked", "at": now - 5}, {"id": ID2, "user": "bob", "state": "written", "at": now + 30}]
    bad = [None, "text", {"id": "x", "user": "alice", "state": "acked", "at": now}, {"id": ID1, "user": "", "state": "acked", "at": now},
           {"id": ID1, "user": "a b", "state": "acked", "at": now}, {"id": ID1, "user": "alice", "state": "read", "at": now},
           {"id": ID1, "user": "alice", "state": "acked", "at": None}, {"id": ID1, "user": "alice", "state": "acked", "at": float("nan")},
           {"id": ID1, "user": "alice", "state": "acked", "at": 1e300}, {"id": ID1, "user": "alice", "state": "acked", "at": 4e9},
           {"id": ID1, "user": "alice", "state": "acked", "at": True}]
    kept, left_out = parse_receipts([good[0], *bad, good[1]], now)
    assert kept == good
    assert len(left_out) == len(bad)
    assert "state is not one of" in left_out[5] and "within a day" in left_out[9]
    assert parse_receipts("not a list", now) == ([], ["'not a list' (not an object)"])


def test_a_receipt_whose_time_is_an_integer_too_large_for_a_float_is_left_out_not_raised():
    """JSON carries integers of any size, and kombu's decoder reads them as such: checking one with
    math.isfinite raised OverflowError, which failed the whole batch and lost its good acks."""
    from tasks.receipts import parse_receipts

    now = 1_800_000_000.0
    good = {"id": ID1, "user": "alice", "state": "acked", "at": int(now)}
    huge = [{"id": ID2, "user": "alice", "state": "acked", "at": 10**400}, {"id": ID3, "user": "bob", "state": "written", "at": -(10**400)}]
    kept, left_out = parse_receipts([*huge, good], now)
    assert kept == [good]
    assert len(left_out) == 2 and all("within a day" in reason for reason in left_out)


# --- an ack that carries its write --------------------------------------------------------------

def test_an_ack_of_a_write_still_waiting_becomes_that_item_and_carries_the_write_time():
    times = iter([10.0, 11.0, 12.0])
    sent = Recorder()
    receipts = ReceiptBuffer(sent, batch_max=100, clock=lambda: next(times))
    receipts.add_many([ID1, ID2], "alice", "written")  # at 10
    receipts.add_many([ID2, ID3], "alice", "acked")  # at 11: ID2's write waits, ID3's went earlier
    receipts.add_many([ID1], "bob", "acked")  # at 12: another user's delivery of ID1
    receipts.flush()

    assert sent.batches == [[
        {"id": ID1, "user": "alice", "state": "written", "at": 10.0},
        {"id": ID2, "user": "alice", "state": "acked", "at": 11.0, "written": 10.0},
        {"id": ID3, "user": "alice", "state": "acked", "at": 11.0},
        {"id": ID1, "user": "bob", "state": "acked", "at": 12.0},
    ]]
    assert argsrepr(sent.batches[0]) == "[<5 receipts: 3 acked, 2 written>]"


def test_a_write_whose_receipt_went_already_is_not_changed_by_its_ack():
    for full_batch in (True, False):
        sent = Recorder()
        receipts = ReceiptBuffer(sent, batch_max=2 if full_batch else 100, clock=lambda: 5.0)
        receipts.add_many([ID1, ID2], "alice", "written")
        if not full_batch:
            receipts.flush()
        receipts.add_many([ID1], "alice", "acked")
        receipts.flush()

        assert sent.batches == [[{"id": ID1, "user": "alice", "state": "written", "at": 5.0}, {"id": ID2, "user": "alice", "state": "written", "at": 5.0}],
                                [{"id": ID1, "user": "alice", "state": "acked", "at": 5.0}]]


def test_tasks_receipts_records_an_ack_that_carries_its_write_as_two_receipts():
    from tasks.receipts import parse_receipts

    now = 1_800_000_000.0
    both = {"id": ID1, "user": "alice", "state": "acked", "at": now, "written": now - 0.2}
    kept, left_out = parse_receipts([both], now)
    assert kept == [{"id": ID1, "user": "alice", "state": "written", "at": now - 0.2}, both] and left_out == []

    bad = [dict(both, written=None), dict(both, written=now + 2e5), dict(both, state="written")]
    kept, left_out = parse_receipts(bad, now)
    assert kept == [] and len(left_out) == 3
    assert "written is not a unix time" in left_out[0] and "only an ack carries a written time" in left_out[2]

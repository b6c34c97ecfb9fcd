"""Pure tests of ``tasks.batching``: when the worker hands buffered ``tasks.collect`` and
``tasks.collect_many`` requests to its pool (``FlushGate``), and how many at a time (``chunks``)."""

from __future__ import annotations

from tasks.batching import FlushGate, chunks


def test_an_idle_pool_takes_a_batch_at_once():
    assert FlushGate().may_flush()


def test_requests_gather_while_a_batch_runs():
    gate = FlushGate()
    gate.started()
    assert not gate.may_flush()
    assert gate.running == 1


def test_with_a_higher_limit_batches_go_until_that_many_run():
    gate = FlushGate(limit=2)
    gate.started()
    assert gate.may_flush()
    gate.started()
    assert not gate.may_flush() and gate.running == 2


def test_a_limit_below_one_still_runs_one_batch_at_a_time():
    gate = FlushGate(limit=0)
    assert gate.may_flush()
    gate.started()
    assert not gate.may_flush()


def test_a_returned_batch_lets_what_gathered_go():
    gate = FlushGate()
    token = gate.started()
    gate.finished(token)
    assert gate.may_flush() and gate.running == 0


def test_a_batch_returning_twice_frees_one_slot_only():
    gate = FlushGate(limit=2)
    first = gate.started()
    gate.started()
    gate.finished(first)
    gate.started()
    gate.finished(first)  # e.g. a result callback and a lost-worker callback for the same batch
    assert not gate.may_flush()


def test_after_a_reset_batches_from_before_neither_hold_nor_free_a_slot():
    gate = FlushGate()
    old = gate.started()
    gate.reset()
    assert gate.running == 0 and gate.may_flush()
    new = gate.started()
    gate.finished(old)
    assert gate.running == 1 and not gate.may_flush()
    gate.finished(new)
    assert gate.may_flush()


def test_chunks_keep_the_order_and_cut_where_the_sizes_would_pass_the_limit():
    sizes = {"a": 400, "b": 500, "c": 200, "d": 1000, "e": 1}
    assert list(chunks(list("abcde"), sizes.get, 1000)) == [["a", "b"], ["c"], ["d"], ["e"]]


def test_an_item_bigger_than_the_limit_goes_alone_and_whole():
    assert list(chunks([5, 2000, 5], lambda n: n, 1000)) == [[5], [2000], [5]]


def test_items_of_no_size_count_as_one():
    assert list(chunks(["x"] * 5, lambda _: 0, 2)) == [["x", "x"], ["x", "x"], ["x"]]


def test_nothing_makes_no_chunk():
    assert list(chunks([], len, 10)) == []


def test_an_outcome_event_carries_the_results_repr_or_the_errors_text_cut_as_celery_cuts_results():
    from tasks.collectbatches import outcome_text

    ids = [f"01a23d0ff4e00000{n:02x}adb707" for n in range(100)]
    assert outcome_text("ok", ids[0], 1024) == f"'{ids[0]}'"
    many = outcome_text("ok", ids, 1024)
    assert many.startswith(f"['{ids[0]}'") and many.endswith("...]") and len(many) < 1100
    from tasks.messages import InvalidMessage
    from tasks.store import StoreUnavailable

    assert outcome_text("failed", InvalidMessage("x" * 2000), 1024) == ("InvalidMessage: " + "x" * 2000)[:1024]
    assert outcome_text("retry", StoreUnavailable("down"), 1024) == "StoreUnavailable: down"
    assert outcome_text("failed", "the batch did not run: see the worker log", 1024) == "the batch did not run: see the worker log"

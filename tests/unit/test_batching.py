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


def test_outcome_texts_are_results_reprs_and_errors_cut_to_fit_one_pipe_write():
    import pickle

    from tasks.collect import outcome_texts

    ids = [f"01a23d0ff4e00000{n:02x}adb707" for n in range(90)]
    texts = outcome_texts([("ok", mid) for mid in ids], 1024, 3000)
    assert texts[0] == ("ok", f"'{ids[0]}'") and len(pickle.dumps(texts)) < 4096  # ids fit whole
    errors = outcome_texts([("failed", "InvalidMessage: " + "x" * 500)] * 90, 1024, 3000)
    assert all(text.startswith("InvalidMessage: x") and text.endswith("...") and len(text) == 33 for _, text in errors)
    assert len(pickle.dumps(errors)) < 4096
    alone = outcome_texts([("ok", ids * 20), ("retry", "StoreUnavailable: down")], 1024, 3000)
    assert alone[0][1].endswith("...]") and len(alone[0][1]) < 1100 and alone[1] == ("retry", "StoreUnavailable: down")

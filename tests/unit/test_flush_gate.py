"""Pure tests of ``tasks.batching.FlushGate``: when the worker hands buffered ``tasks.collect``
requests to its pool."""

from __future__ import annotations

from tasks.batching import FlushGate


def test_an_idle_pool_takes_a_batch_at_once():
    assert FlushGate().may_flush(slots=2)


def test_batches_go_while_a_pool_process_is_free_and_gather_once_every_one_runs_a_batch():
    gate = FlushGate()
    gate.started()
    assert gate.may_flush(slots=2)
    gate.started()
    assert not gate.may_flush(slots=2)
    assert gate.running == 2


def test_a_returned_batch_frees_its_slot_for_what_gathered():
    gate = FlushGate()
    first = gate.started()
    gate.started()
    gate.finished(first)
    assert gate.may_flush(slots=2) and gate.running == 1


def test_a_batch_returning_twice_frees_one_slot_only():
    gate = FlushGate()
    first = gate.started()
    gate.started()
    gate.finished(first)
    gate.started()
    gate.finished(first)  # e.g. a result callback and a lost-worker callback for the same batch
    assert not gate.may_flush(slots=2)


def test_a_pool_that_reports_no_processes_still_runs_one_batch_at_a_time():
    gate = FlushGate()
    assert gate.may_flush(slots=0)
    gate.started()
    assert not gate.may_flush(slots=0)


def test_after_a_reset_batches_from_before_neither_hold_nor_free_a_slot():
    gate = FlushGate()
    old = gate.started()
    gate.started()
    gate.reset()
    assert gate.running == 0
    new = gate.started()
    gate.finished(old)
    assert gate.running == 1 and not gate.may_flush(slots=1)
    gate.finished(new)
    assert gate.may_flush(slots=1)

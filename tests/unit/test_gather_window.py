"""Pure tests of ``wsnode.consumer.GatherWindow``: when the node's queue thread waits for more
messages before handing a batch to the loop."""

from __future__ import annotations

from wsnode.consumer import GatherWindow


def test_the_first_message_a_node_reads_goes_at_once():
    assert GatherWindow(0.002).wait(first_at=100.0) == 0.0


def test_a_message_that_comes_after_a_quiet_spell_goes_at_once():
    window = GatherWindow(0.002)
    window.handed_over(100.0)
    assert window.wait(first_at=100.010) == 0.0  # one queue message every 10 ms


def test_a_message_that_was_waiting_when_the_previous_batch_was_handed_over_waits_for_more():
    window = GatherWindow(0.002)
    window.handed_over(100.0)
    assert window.wait(first_at=100.0003) == 0.002  # queued while the loop wrote: the node is busy


def test_each_batch_is_judged_by_the_gap_since_the_batch_before_it():
    window = GatherWindow(0.002)
    window.handed_over(100.0)
    assert window.wait(first_at=100.001) == 0.002
    window.handed_over(100.004)
    assert window.wait(first_at=100.050) == 0.0

"""Pure tests of ``wsnode.acks.AckBudget``: how many acks a connection may send."""

from __future__ import annotations

from wsnode.acks import ACK_ALLOWANCE, AckBudget


def test_a_new_connection_may_send_the_allowance_and_no_more():
    budget = AckBudget()
    assert [budget.take() for _ in range(ACK_ALLOWANCE)] == [True] * ACK_ALLOWANCE
    assert budget.take() is False
    assert budget.take() is False


def test_each_message_frame_written_allows_one_more_ack():
    budget = AckBudget(allowance=2)
    budget.written(3)
    assert [budget.take() for _ in range(6)] == [True] * 5 + [False]
    budget.written(1)  # a later message (or a repeat of one acked before: its ack was lost)
    assert budget.take() is True
    assert budget.take() is False


def test_frames_written_after_the_budget_ran_out_count_in_full():
    budget = AckBudget(allowance=0)
    assert budget.take() is False
    budget.written(2)
    assert [budget.take(), budget.take(), budget.take()] == [True, True, False]


def test_an_ack_frame_of_several_ids_takes_one_per_id_or_none_when_fewer_are_left():
    budget = AckBudget(allowance=0)
    budget.written(5)
    assert budget.take(3) is True
    assert budget.take(3) is False  # two left: the frame is refused whole, and takes nothing
    assert budget.take(2) is True
    assert budget.take() is False

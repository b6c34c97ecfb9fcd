"""Pure tests of ``tasks.lost.LostRequests``: which requests run alone after their batch died
with its pool process, and which are failed instead of put back."""

from __future__ import annotations

from tasks.lost import LostRequests


def test_the_requests_of_a_lost_batch_are_suspects_and_one_that_returns_is_forgotten():
    lost = LostRequests()
    assert lost.lost(["a", "b", "c"]) == set()
    assert [lost.suspect(i) for i in "abcd"] == [True, True, True, False]
    lost.returned(["b"])
    assert not lost.suspect("b") and lost.suspect("a") and len(lost) == 2


def test_a_request_lost_fail_after_times_the_last_time_alone_is_failed_once():
    lost = LostRequests(fail_after=3)
    assert lost.lost(["poison", "x", "y"]) == set()
    lost.returned(["x"])
    lost.returned(["y"])
    assert lost.lost(["poison"]) == set()
    assert lost.lost(["poison"]) == {"poison"}
    assert not lost.suspect("poison") and len(lost) == 0


def test_a_request_lost_often_but_never_alone_is_put_back():
    # (In the worker both run alone after their first loss; this pins the rule itself.)
    lost = LostRequests(fail_after=2)
    for _ in range(4):
        assert lost.lost(["p", "q"]) == set()  # two in the batch: neither is known to be the cause
    assert lost.lost(["p"]) == {"p"}
    assert lost.suspect("q")


def test_at_most_so_many_ids_are_kept_the_oldest_forgotten_first():
    lost = LostRequests(most=3)
    lost.lost(["a", "b"])
    lost.lost(["c"])
    lost.lost(["a"])  # seen again: now the newest
    lost.lost(["d"])
    assert [i for i in "abcd" if lost.suspect(i)] == ["a", "c", "d"]


def test_a_plain_task_alone_each_time_is_counted_and_failed_on_its_third_loss():
    # tasks.lost.Request: one id per loss; times() is what the worker logs ("2 of 3 times").
    lost = LostRequests()
    assert lost.fail_after == 3 and lost.times("t") == 0
    assert lost.lost(["t"]) == set() and lost.times("t") == 1
    assert lost.lost(["t"]) == set() and lost.times("t") == 2
    assert lost.lost(["t"]) == {"t"} and lost.times("t") == 0 and len(lost) == 0


def test_the_worker_shutting_down_is_told_by_celerys_own_flags(monkeypatch):
    # A warm shutdown on SIGTERM sets should_stop to exit code 0: still a shutdown.
    from celery.worker import state as worker_state

    from tasks.lost import shutting_down

    monkeypatch.setattr(worker_state, "should_stop", None)
    monkeypatch.setattr(worker_state, "should_terminate", None)
    assert not shutting_down()
    monkeypatch.setattr(worker_state, "should_stop", 0)
    assert shutting_down()
    monkeypatch.setattr(worker_state, "should_stop", False)
    monkeypatch.setattr(worker_state, "should_terminate", 1)
    assert shutting_down()

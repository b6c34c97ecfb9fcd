"""Pure tests of the node's queue of replay requests (``wsnode.replays``) and of the worker's
check of a ``tasks.replay_many``'s requests (``tasks.replay.parse_requests``)."""

from __future__ import annotations

import pytest

from tasks import ids
from tasks.replay import PAGE, _pages, parse_requests, past_retention, reach_back
from wsnode.replays import ReplayRequests

SINCE = "0193a1b2c3d4" + "0" * 12


def test_the_first_request_schedules_a_round_and_the_next_ones_join_it():
    requests = ReplayRequests(per_task=100)
    assert [requests.add(n) for n in range(3)] == [True, False, False]
    assert list(requests.batches()) == [[0, 1, 2]]
    assert len(requests) == 0


def test_a_round_sends_per_task_requests_at_a_time_oldest_first():
    requests = ReplayRequests(per_task=2)
    for n in range(5):
        requests.add(n)
    assert list(requests.batches()) == [[0, 1], [2, 3], [4]]


def test_a_request_added_while_a_round_sends_is_taken_by_it_or_schedules_the_next():
    requests = ReplayRequests(per_task=1)
    requests.add("a")
    rounds = requests.batches()
    assert next(rounds) == ["a"]
    assert requests.add("b") is True  # the round began: the flag is clear, so the caller schedules one more
    assert list(rounds) == [["b"]]  # ... and this round takes it anyway; the next one finds nothing
    assert list(requests.batches()) == []


def test_per_task_must_be_positive():
    with pytest.raises(ValueError, match="per_task"):
        ReplayRequests(per_task=0)


def test_well_formed_requests_are_kept_in_order():
    good, bad = parse_requests([{"conn": "c1", "user": "alice", "since": None}, {"conn": "c2", "user": "bob", "since": SINCE}])
    assert good == [("c1", "alice", None), ("c2", "bob", SINCE)]
    assert bad == []


@pytest.mark.parametrize("item", [
    {"conn": "c1", "user": 7, "since": None},
    {"conn": None, "user": "alice", "since": None},
    {"conn": "c1", "user": "alice", "since": "yesterday"},
    ["c1", "alice", None],
    "junk",
])
def test_a_malformed_request_is_left_out_and_described(item):
    good, bad = parse_requests([{"conn": "ok", "user": "alice"}, item])
    assert good == [("ok", "alice", None)]
    assert len(bad) == 1 and bad[0].startswith(repr(item)[:10])


def test_requests_that_are_not_a_list_are_one_malformed_request():
    assert parse_requests("junk") == ([], ["'junk'"])


def test_a_resume_from_before_the_retention_is_truncated_and_one_within_it_is_not():
    now, day = 1_800_000_000.0, 86_400
    within = ids.IdGenerator(clock=lambda: now - day + 5).next_id()
    before = ids.IdGenerator(clock=lambda: now - day - 5).next_id()
    assert not past_retention(within, now, day)
    assert past_retention(before, now, day)


def test_only_the_last_page_of_a_replay_carries_the_cursor():
    envelopes = [{"id": f"{n:024x}", "data": n} for n in range(PAGE + 1)]
    pages = _pages(envelopes, False, "0190f00000000000000000aa")
    assert [info.get("cursor") for _, info in pages] == [None, "0190f00000000000000000aa"]
    assert [info["last"] for _, info in pages] == [False, True]
    assert _pages([], True, "0190f00000000000000000aa") == [([], {"last": True, "truncated": True, "count": 0, "cursor": "0190f00000000000000000aa"})]


def test_a_resume_reaches_back_to_the_oldest_message_to_its_user_routed_at_or_after_its_start():
    after = ids.lower_bound(10_000)
    older, oldest, other = ids.lower_bound(8_000)[:-1] + "1", ids.lower_bound(5_000)[:-1] + "1", ids.lower_bound(3_000)[:-1] + "1"
    late = [(older, ["alice"], 10_500), (oldest, ["alice", "bob"], 10_000), (other, ["carol"], 12_000)]

    assert reach_back([("alice", after), ("bob", after), ("dave", after)], late) == [
        ("alice", ids.lower_bound(4_999)), ("bob", ids.lower_bound(4_999)), ("dave", after)]


def test_a_resume_does_not_reach_back_for_a_message_routed_before_its_start_or_already_after_it():
    after = ids.lower_bound(10_000)
    routed_before = (ids.lower_bound(5_000)[:-1] + "1", ["alice"], 9_999)
    within = (ids.lower_bound(10_001), ["alice"], 20_000)  # the replay reads it anyway

    assert reach_back([("alice", after)], [routed_before, within]) == [("alice", after)]
    assert reach_back([("alice", after)], []) == [("alice", after)]


def test_a_broadcast_routed_late_reaches_every_resume_back():
    after = ids.lower_bound(10_000)
    broadcast = ids.lower_bound(7_000)[:-1] + "1"

    assert reach_back([("alice", after), ("bob", after)], [(broadcast, "*", 11_000)]) == [
        ("alice", ids.lower_bound(6_999)), ("bob", ids.lower_bound(6_999))]

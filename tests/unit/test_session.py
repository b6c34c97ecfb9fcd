"""Pure tests of ``wsnode.session``: live messages and replay pages in, frames to write out."""

from __future__ import annotations

import json

import pytest

from wsnode.protocol import resumed_frame
from wsnode.session import BacklogOverflow, Session

SINCE = "018bcfe56800" "000000" "000001"


def mid(n: int) -> str:
    return f"018bcfe56801{n:06x}000001"


def frame(n: int) -> str:
    return f"frame-{n}"


def item(n: int) -> tuple[str, str]:
    return mid(n), frame(n)


def test_a_session_without_since_is_live_at_once():
    assert Session(None).replaying is False


def test_a_live_session_passes_a_frame_straight_through():
    assert Session(None).live(mid(1), frame(1)) == [frame(1)]


def test_a_live_session_never_overflows():
    session = Session(None, max_backlog=1)

    assert [session.live(mid(n), frame(n)) for n in range(3)] == [[frame(0)], [frame(1)], [frame(2)]]


def test_a_session_with_since_starts_replaying():
    assert Session(SINCE).replaying is True


def test_a_replaying_session_holds_live_frames_back():
    session = Session(SINCE)

    assert session.live(mid(1), frame(1)) == []


def test_a_single_last_page_writes_the_replay_then_the_resumed_frame():
    session = Session(SINCE)

    written = session.replay_page([item(1), item(2)], last=True, count=2)

    assert written == [frame(1), frame(2), resumed_frame(SINCE, 2, False)]


def test_the_resumed_frame_reports_the_count_and_truncation_it_was_given():
    written = Session(SINCE).replay_page([item(1)], last=True, count=700, truncated=True)

    assert json.loads(written[-1]) == {"type": "resumed", "since": SINCE, "replayed": 700, "truncated": True}


def test_an_empty_last_page_writes_only_the_resumed_frame():
    assert Session(SINCE).replay_page([], last=True) == [resumed_frame(SINCE, 0, False)]


def test_the_last_page_releases_held_live_frames_after_the_resumed_frame():
    session = Session(SINCE)
    session.live(mid(5), frame(5))
    session.live(mid(6), frame(6))

    written = session.replay_page([item(1)], last=True, count=1)

    assert written == [frame(1), resumed_frame(SINCE, 1, False), frame(5), frame(6)]


def test_the_last_page_drops_held_frames_that_the_replay_already_wrote():
    session = Session(SINCE)
    for n in (3, 4, 5):
        session.live(mid(n), frame(n))

    written = session.replay_page([item(2), item(3), item(4)], last=True, count=3)

    assert written == [frame(2), frame(3), frame(4), resumed_frame(SINCE, 3, False), frame(5)]


def test_held_frames_replayed_on_an_earlier_page_are_dropped_too():
    session = Session(SINCE)
    session.live(mid(1), frame(1))
    session.live(mid(9), frame(9))
    session.replay_page([item(1)], last=False)

    written = session.replay_page([item(2)], last=True, count=2)

    assert written == [frame(2), resumed_frame(SINCE, 2, False), frame(9)]


def test_a_page_before_the_last_writes_its_frames_only():
    session = Session(SINCE)
    session.live(mid(9), frame(9))

    assert session.replay_page([item(1), item(2)], last=False) == [frame(1), frame(2)]


def test_a_page_before_the_last_keeps_the_session_replaying():
    session = Session(SINCE)
    session.replay_page([item(1)], last=False)

    assert session.replaying is True and session.live(mid(9), frame(9)) == []


def test_pages_are_written_in_order_across_several_pages():
    session = Session(SINCE)
    session.live(mid(9), frame(9))

    written = session.replay_page([item(1), item(2)], last=False) + session.replay_page([item(3)], last=False) + session.replay_page([item(4)], last=True, count=4)

    assert written == [frame(1), frame(2), frame(3), frame(4), resumed_frame(SINCE, 4, False), frame(9)]


def test_the_session_is_live_after_the_last_page():
    session = Session(SINCE)
    session.replay_page([], last=True)

    assert session.replaying is False and session.live(mid(7), frame(7)) == [frame(7)]


def test_held_frames_are_released_only_once():
    session = Session(SINCE)
    session.live(mid(5), frame(5))
    session.replay_page([], last=True)

    assert session.live(mid(6), frame(6)) == [frame(6)]


def test_a_live_frame_beyond_the_backlog_raises_backlog_overflow():
    session = Session(SINCE, max_backlog=2)
    session.live(mid(1), frame(1))
    session.live(mid(2), frame(2))

    with pytest.raises(BacklogOverflow):
        session.live(mid(3), frame(3))


def test_a_backlog_exactly_at_its_limit_does_not_overflow():
    session = Session(SINCE, max_backlog=2)
    session.live(mid(1), frame(1))
    session.live(mid(2), frame(2))

    assert session.replay_page([], last=True)[1:] == [frame(1), frame(2)]


def test_the_overflow_error_names_the_limit():
    session = Session(SINCE, max_backlog=1)
    session.live(mid(1), frame(1))

    with pytest.raises(BacklogOverflow, match="more than 1 live messages"):
        session.live(mid(2), frame(2))


def test_a_page_after_the_session_is_live_writes_nothing():
    session = Session(SINCE)
    session.replay_page([], last=True)

    assert session.replay_page([item(1)], last=True, count=1) == []


def test_a_page_for_a_session_that_never_replayed_writes_nothing():
    assert Session(None).replay_page([item(1)], last=False) == []

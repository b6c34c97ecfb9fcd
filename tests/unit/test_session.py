"""Pure tests of ``wsnode.session``: live messages and replay pages in, frames to write out."""

from __future__ import annotations

import json

import pytest

from wsnode.protocol import resumed_frame
from wsnode.session import BacklogOverflow, Session, utf8_length

SINCE = "018bcfe56800" "000000" "000001"


def mid(n: int) -> str:
    return f"018bcfe56801{n:06x}000001"


def frame(n: int) -> str:
    return f"frame-{n}"


def item(n: int) -> tuple[str, str]:
    return mid(n), frame(n)


def frames(out: list[tuple[str | None, str]]) -> list[str]:
    return [f for _, f in out]


def live_session() -> Session:
    session = Session(None)
    session.replay_page([], last=True)
    return session


def test_a_session_without_since_also_starts_replaying_its_inbox():
    assert Session(None).replaying is True


def test_the_resumed_frame_of_an_inbox_replay_has_no_since():
    assert json.loads(Session(None).replay_page([], last=True)[-1][1])["since"] is None


def test_a_live_session_passes_a_frame_straight_through_with_its_id():
    assert live_session().live(mid(1), frame(1)) == [(mid(1), frame(1))]


def test_replayed_and_released_frames_carry_their_message_ids_and_the_resumed_frame_none():
    session = Session(SINCE)
    session.live(mid(5), frame(5))

    out = session.replay_page([item(1)], last=True, count=1)

    assert [message_id for message_id, _ in out] == [mid(1), None, mid(5)]


def test_a_live_session_never_overflows():
    session = Session(None, max_backlog=1)
    session.replay_page([], last=True)

    assert [frames(session.live(mid(n), frame(n))) for n in range(3)] == [[frame(0)], [frame(1)], [frame(2)]]


def test_a_session_with_since_starts_replaying():
    assert Session(SINCE).replaying is True


def test_a_replaying_session_holds_live_frames_back():
    session = Session(SINCE)

    assert session.live(mid(1), frame(1)) == []


def test_a_single_last_page_writes_the_replay_then_the_resumed_frame():
    session = Session(SINCE)

    written = frames(session.replay_page([item(1), item(2)], last=True, count=2))

    assert written == [frame(1), frame(2), resumed_frame(SINCE, 2, False)]


def test_the_resumed_frame_reports_the_count_and_truncation_it_was_given():
    written = frames(Session(SINCE).replay_page([item(1)], last=True, count=700, truncated=True))

    assert json.loads(written[-1]) == {"type": "resumed", "since": SINCE, "replayed": 700, "truncated": True}


def test_an_empty_last_page_writes_only_the_resumed_frame():
    assert frames(Session(SINCE).replay_page([], last=True)) == [resumed_frame(SINCE, 0, False)]


def test_the_last_page_releases_held_live_frames_after_the_resumed_frame():
    session = Session(SINCE)
    session.live(mid(5), frame(5))
    session.live(mid(6), frame(6))

    written = frames(session.replay_page([item(1)], last=True, count=1))

    assert written == [frame(1), resumed_frame(SINCE, 1, False), frame(5), frame(6)]


def test_the_last_page_drops_held_frames_that_the_replay_already_wrote():
    session = Session(SINCE)
    for n in (3, 4, 5):
        session.live(mid(n), frame(n))

    written = frames(session.replay_page([item(2), item(3), item(4)], last=True, count=3))

    assert written == [frame(2), frame(3), frame(4), resumed_frame(SINCE, 3, False), frame(5)]


def test_held_frames_replayed_on_an_earlier_page_are_dropped_too():
    session = Session(SINCE)
    session.live(mid(1), frame(1))
    session.live(mid(9), frame(9))
    session.replay_page([item(1)], last=False)

    written = frames(session.replay_page([item(2)], last=True, count=2))

    assert written == [frame(2), resumed_frame(SINCE, 2, False), frame(9)]


def test_a_page_before_the_last_writes_its_frames_only():
    session = Session(SINCE)
    session.live(mid(9), frame(9))

    assert frames(session.replay_page([item(1), item(2)], last=False)) == [frame(1), frame(2)]


def test_a_page_before_the_last_keeps_the_session_replaying():
    session = Session(SINCE)
    session.replay_page([item(1)], last=False)

    assert session.replaying is True and session.live(mid(9), frame(9)) == []


def test_pages_are_written_in_order_across_several_pages():
    session = Session(SINCE)
    session.live(mid(9), frame(9))

    written = frames(session.replay_page([item(1), item(2)], last=False) + session.replay_page([item(3)], last=False) + session.replay_page([item(4)], last=True, count=4))

    assert written == [frame(1), frame(2), frame(3), frame(4), resumed_frame(SINCE, 4, False), frame(9)]


def test_the_session_is_live_after_the_last_page():
    session = Session(SINCE)
    session.replay_page([], last=True)

    assert session.replaying is False and frames(session.live(mid(7), frame(7))) == [frame(7)]


def test_held_frames_are_released_only_once():
    session = Session(SINCE)
    session.live(mid(5), frame(5))
    session.replay_page([], last=True)

    assert frames(session.live(mid(6), frame(6))) == [frame(6)]


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

    assert frames(session.replay_page([], last=True))[1:] == [frame(1), frame(2)]


def test_the_overflow_error_names_the_limit():
    session = Session(SINCE, max_backlog=1)
    session.live(mid(1), frame(1))

    with pytest.raises(BacklogOverflow, match="more than 1 live messages"):
        session.live(mid(2), frame(2))


def test_held_frames_beyond_the_byte_bound_raise_backlog_overflow():
    session = Session(SINCE, max_backlog_bytes=25)
    session.live(mid(1), "a" * 10)
    session.live(mid(2), "b" * 10)

    with pytest.raises(BacklogOverflow, match="more than 25 bytes of live messages"):
        session.live(mid(3), "c" * 10)


def test_held_frames_exactly_at_the_byte_bound_are_written_after_the_replay():
    session = Session(SINCE, max_backlog_bytes=20)
    session.live(mid(1), "a" * 10)
    session.live(mid(2), "b" * 10)

    assert frames(session.replay_page([], last=True))[1:] == ["a" * 10, "b" * 10]


def test_a_first_held_frame_larger_than_the_byte_bound_is_held():
    session = Session(SINCE, max_backlog_bytes=5)
    session.live(mid(1), "a" * 10)

    assert frames(session.replay_page([], last=True))[1:] == ["a" * 10]


def test_the_byte_bound_applies_to_the_held_frames_only():
    session = Session(SINCE, max_backlog_bytes=15)
    session.live(mid(1), "a" * 10)
    session.replay_page([item(7)], last=True)  # the replay page and the held frame are written

    # Once live, frames go out at once and nothing is held, whatever their size.
    assert frames(session.live(mid(2), "b" * 10)) == ["b" * 10]
    assert frames(session.live(mid(3), "c" * 10)) == ["c" * 10]


def test_the_byte_bound_counts_non_ascii_frames_in_utf8_bytes_not_characters():
    # 7 characters, 14 bytes on the wire: two are 14 characters (under the bound) but 28 bytes.
    text = "你好😀abcd"
    session = Session(SINCE, max_backlog_bytes=20)
    session.live(mid(1), text)

    with pytest.raises(BacklogOverflow, match="more than 20 bytes"):
        session.live(mid(2), text)


def test_utf8_length_is_the_encoded_length():
    assert utf8_length("abc") == 3
    assert utf8_length("é") == 2
    assert utf8_length("你") == 3
    assert utf8_length("😀") == 4


def test_a_page_after_the_session_is_live_writes_nothing():
    session = Session(SINCE)
    session.replay_page([], last=True)

    assert session.replay_page([item(1)], last=True, count=1) == []


def test_a_page_for_a_session_whose_replay_ended_writes_nothing():
    assert live_session().replay_page([item(1)], last=False) == []


def test_a_live_copy_of_a_replayed_message_arriving_after_the_replay_is_dropped():
    session = Session(None)
    session.replay_page([item(1)], last=True, count=1)

    assert session.live(mid(1), frame(1)) == []
    assert frames(session.live(mid(2), frame(2))) == [frame(2)]


def test_after_forget_replayed_a_replayed_id_passes_again():
    session = Session(None)
    session.replay_page([item(1)], last=True, count=1)
    session.forget_replayed()

    assert frames(session.live(mid(1), frame(1))) == [frame(1)]


def test_the_resumed_frame_carries_the_cursor_the_last_page_brought():
    written = frames(Session(None).replay_page([], last=True, cursor="0190f00000000000000000aa"))
    assert json.loads(written[-1]) == {"type": "resumed", "since": None, "replayed": 0, "truncated": False, "cursor": "0190f00000000000000000aa"}

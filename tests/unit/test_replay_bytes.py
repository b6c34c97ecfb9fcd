"""REPLAY_MAX_BYTES: an opening replay keeps its newest messages whose frames fit the budget
(``tasks.replay.newest_within``), measured as the node writes them (``tasks.replay.frame_bytes``)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import settings
from tasks.messages import encode_data
from tasks.replay import frame_bytes, newest_within
from wsnode.protocol import message_frame

IDS = [f"0190f0000000{n:06x}0000aa" for n in range(20)]


def envelopes(sizes: list[int]) -> list[dict]:
    """Envelopes, oldest first, whose frames take ``sizes`` bytes."""
    return [{"id": IDS[n], "data": "x" * (size - settings.MESSAGE_FRAME_OVERHEAD - 2)} for n, size in enumerate(sizes)]


def cut(sizes: list[int], max_bytes: int) -> tuple[list[int], bool]:
    """newest_within over envelopes of ``sizes``: the indexes kept, and whether it cut."""
    given = envelopes(sizes)
    kept, truncated = newest_within(reversed(given), max_bytes)
    return [given.index(e) for e in kept], truncated


def test_a_frame_is_measured_as_the_node_writes_it_in_utf8_bytes():
    for data in ["plain", {"text": "日本語", "emoji": "😀"}, [1, 2.5, None, True], "x" * 1000]:
        envelope = {"id": IDS[0], "data": data}
        assert frame_bytes(envelope) == len(message_frame(envelope).encode("utf-8"))
    assert frame_bytes({"id": IDS[0], "data": "日本語"}) == settings.MESSAGE_FRAME_OVERHEAD + 2 + 9, "3 bytes a character, not 1"


@pytest.mark.parametrize("data", ["x" * 100, {"k": "é" * 50}, [1e16, 1e-7, 123.456, -0.0, 2 ** 63 - 1], {"a": [{"b": None}, True, ""]}, "😀" * 10])
def test_a_frame_adds_the_settings_overhead_at_most_to_its_datas_json(data):
    """settings.MESSAGE_FRAME_OVERHEAD, which REPLAY_MAX_BYTES's floor adds to MAX_MESSAGE_BYTES,
    is what message_frame adds to data as tasks.collect measures it (encode_data)."""
    size = len(encode_data(data, settings.MAX_MESSAGE_BYTES).encode())
    assert frame_bytes({"id": IDS[0], "data": data}) <= size + settings.MESSAGE_FRAME_OVERHEAD
    assert frame_bytes({"id": IDS[0], "data": "x" * 100}) == 102 + settings.MESSAGE_FRAME_OVERHEAD


def test_everything_within_the_budget_is_kept_in_order_and_not_truncated():
    assert cut([100, 200, 300], 600) == ([0, 1, 2], False)
    assert cut([100, 200, 300], 10_000) == ([0, 1, 2], False)
    assert newest_within([], 100) == ([], False)


def test_over_the_budget_the_newest_are_kept_oldest_first_and_the_replay_is_truncated():
    assert cut([100, 200, 300], 599) == ([1, 2], True)
    assert cut([100, 100, 100, 100, 100], 250) == ([3, 4], True)
    assert cut([100, 100, 100, 100, 100], 300) == ([2, 3, 4], True)


def test_the_newest_message_is_kept_even_alone_over_the_budget():
    assert cut([100, 500], 200) == ([1], True)
    assert cut([500], 200) == ([0], False), "nothing was left out"


def test_an_older_message_that_fits_after_one_that_did_not_is_left_out_too():
    """No gap: the kept messages are the newest in a row, up to the live ones."""
    assert cut([70, 1000, 70, 70], 200) == ([2, 3], True)


def test_the_cut_reads_no_further_than_the_first_message_that_does_not_fit():
    given = envelopes([100] * 10)
    read: list[dict] = []

    def newest_first():
        for envelope in reversed(given):
            read.append(envelope)
            yield envelope

    kept, truncated = newest_within(newest_first(), 350)
    assert kept == given[-3:] and truncated
    assert read == list(reversed(given))[:4], "it stopped at the fourth, the first that did not fit"


def test_a_custom_size_is_used_for_the_budget():
    given = [{"id": mid, "data": None} for mid in IDS[:5]]
    kept, truncated = newest_within(reversed(given), 3, size=lambda envelope: 1)
    assert kept == given[-3:] and truncated


def test_replay_max_bytes_at_one_messages_largest_frame_is_accepted():
    env = {**os.environ, "MAX_MESSAGE_BYTES": "1000", "REPLAY_MAX_BYTES": str(1000 + settings.MESSAGE_FRAME_OVERHEAD)}
    done = subprocess.run([sys.executable, "-c", "import settings; print(settings.REPLAY_MAX_BYTES)"], cwd=Path(__file__).resolve().parents[2],
                          env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == "1058", done.stderr[-500:]


def test_the_default_budget_keeps_ten_thousand_messages_of_1_6_kb_whole():
    env = {key: value for key, value in os.environ.items() if key not in ("REPLAY_MAX_BYTES", "MAX_MESSAGE_BYTES")}
    done = subprocess.run([sys.executable, "-c", "import settings; print(settings.REPLAY_MAX_BYTES)"], cwd=Path(__file__).resolve().parents[2],
                          env=env, capture_output=True, text=True, timeout=60)
    default = int(done.stdout)
    given = [{"id": IDS[0], "data": "x" * 1600}] * 10_000
    assert newest_within(reversed(given), default) == (given, False)
    assert newest_within(reversed(given * 2), default)[1] is True, "not so for 20,000"


def test_a_replay_of_the_default_budget_goes_in_pages_of_at_most_one_publish_each_in_order():
    """Each page is one broker message: a replay of ``REPLAY_MAX_BYTES`` (16 MiB by default) was
    cut into pages by count alone, 500 messages of 33 KB in one message of 16.7 MB, over RabbitMQ
    4's default ``max_message_size`` (16 MiB) as soon as the budget is raised a little."""
    from tasks.queues import MAX_PUBLISH_BYTES
    from tasks.replay import PAGE, _pages

    data = "é" * 16_000  # 32 KB of UTF-8: 500 of them take 16 MB
    given = [{"id": f"0190f0000000{n:06x}0000aa", "data": data} for n in range(PAGE)]
    pages = _pages(given, False, "c" * 24)

    assert len(pages) >= 2
    assert [e for envelopes, _ in pages for e in envelopes] == given
    assert all(sum(len(message_frame(e).encode()) for e in envelopes) <= MAX_PUBLISH_BYTES for envelopes, _ in pages)
    assert [info["last"] for _, info in pages] == [False] * (len(pages) - 1) + [True]
    assert all(info["count"] == PAGE and info["truncated"] is False for _, info in pages)
    assert "cursor" in pages[-1][1] and not any("cursor" in info for _, info in pages[:-1])


def test_small_replays_keep_their_pages_of_page_messages():
    from tasks.replay import PAGE, _pages

    given = [{"id": f"0190f0000000{n:06x}0000aa", "data": n} for n in range(2 * PAGE + 1)]
    assert [len(envelopes) for envelopes, _ in _pages(given, True, "c" * 24)] == [PAGE, PAGE, 1]
    assert [(envelopes, info) for envelopes, info in _pages([], False, "c" * 24)] == [([], {"last": True, "truncated": False, "count": 0, "cursor": "c" * 24})]

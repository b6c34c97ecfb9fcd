"""bench/e2e.py's plans (pure: ``make_plan`` builds the tasks a sender sends and the deliveries
expected; nothing is run)."""

import random
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
e2e = pytest.importorskip("e2e")

USERS = [f"u{i}" for i in range(5)]


def test_the_mixed_plan_alternates_a_collect_many_with_ten_collects_and_expects_every_message_once_in_send_order():
    tasks, expected = e2e.make_plan(e2e.MIXED, 325, 100, USERS, 1000, random.Random(1))
    assert [kind for kind, _ in tasks] == (["batch"] + ["single"] * 10) * 2 + ["batch"] + ["single"] * 5
    assert [len(items) for kind, items in tasks if kind == "batch"] == [100, 100, 100]  # 325 = 2 x 110 + 105
    # each task's messages, in send order, are the expected deliveries, every seq once and in order
    sent = [pair for kind, body in tasks for pair in (body if kind == "batch" else [body])]
    assert [(user, seq) for seq, user in sent] == expected
    assert [seq for _, seq in expected] == list(range(1000, 1325))
    assert {user for user, _ in expected} <= set(USERS)


def test_the_mixed_plan_stops_at_the_messages_asked_for_even_inside_the_ten_collects():
    tasks, expected = e2e.make_plan(e2e.MIXED, 103, 100, USERS, 0, random.Random(2))
    assert [kind for kind, _ in tasks] == ["batch"] + ["single"] * 3
    assert len(expected) == 103

"""``tasks.pending.Marks``: a batch's pending marks, made one user at a time as the route lookup
asks for them (a batch of 250 messages to 10,000 users each made 2.5 million at once: 5 GB)."""

from __future__ import annotations

from tasks import pending
from tasks.ids import IdGenerator, timestamp_ms


def test_marks_are_made_per_user_in_the_order_the_deliveries_came_and_all_of_them_on_iteration():
    gen = IdGenerator()
    one, two = gen.next_id(), gen.next_id()
    marks = pending.marks(((one, "ann"), (one, "bob"), (two, "ann")))

    assert len(marks) == 3
    assert marks.of("ann") == [("ann", f"{one}:ann", timestamp_ms(one) / 1000), ("ann", f"{two}:ann", timestamp_ms(two) / 1000)]
    assert marks.of("eve") == []
    assert sorted(marks) == sorted([*marks.of("ann"), *marks.of("bob")])


def test_marks_take_the_deliveries_from_a_generator_without_a_list_of_them():
    gen = IdGenerator()
    ids = gen.next_ids(3)
    marks = pending.marks((mid, user) for mid in ids for user in ("ann", "bob"))
    assert len(marks) == 6 and [member for _, member, _ in marks.of("bob")] == [f"{mid}:bob" for mid in ids]

"""Pure tests of ``tasks.ids``: an injected clock and fixed tags in, id strings out."""

from __future__ import annotations

import re

import pytest

from tasks.ids import IdGenerator, MessageIdError, is_message_id, lower_bound, timestamp_ms

T0 = 1_700_000_000.5  # exactly representable, so T0 * 1000 has no rounding
T0_MS = 1_700_000_000_500


class FakeClock:
    """A clock that returns whatever the test last set, in seconds."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def generator(now: float = T0, tag: int = 0xABCDEF) -> tuple[IdGenerator, FakeClock]:
    clock = FakeClock(now)
    return IdGenerator(clock=clock, tag=tag), clock


def test_an_id_is_24_lowercase_hex_characters():
    gen, _ = generator()

    assert re.fullmatch(r"[0-9a-f]{24}", gen.next_id())


def test_ids_from_a_random_tag_are_24_lowercase_hex_characters():
    gen = IdGenerator(clock=FakeClock(T0))

    assert all(re.fullmatch(r"[0-9a-f]{24}", message_id) for message_id in gen.next_ids(50))


def test_ids_are_strictly_increasing_while_the_clock_stands_still():
    gen, _ = generator()

    made = [gen.next_id() for _ in range(100)]

    assert all(a < b for a, b in zip(made, made[1:]))


def test_ids_are_strictly_increasing_when_the_clock_goes_backwards():
    gen, clock = generator()
    first = gen.next_id()
    clock.now = T0 - 5.0

    second = gen.next_id()

    assert first < second


def test_ids_after_the_clock_steps_back_and_recovers_stay_increasing():
    gen, clock = generator()
    made = [gen.next_id()]
    for now in (T0 - 1.0, T0 - 0.5, T0, T0 + 0.001, T0 - 2.0, T0 + 1.0):
        clock.now = now
        made.extend(gen.next_ids(3))

    assert made == sorted(made) and len(set(made)) == len(made)


def test_a_batch_from_next_ids_is_strictly_increasing():
    gen, _ = generator()

    made = gen.next_ids(1000)

    assert all(a < b for a, b in zip(made, made[1:]))


def test_next_ids_returns_as_many_ids_as_asked():
    gen, _ = generator()

    assert len(gen.next_ids(7)) == 7


def test_a_later_clock_reading_makes_an_id_with_the_later_timestamp():
    gen, clock = generator()
    gen.next_id()
    clock.now = T0 + 0.25

    assert timestamp_ms(gen.next_id()) == T0_MS + 250


def test_counter_overflow_rolls_into_the_next_millisecond():
    gen, _ = generator()
    gen.next_id()
    # Reaching the overflow honestly takes 16.7 million ids; start the counter at its last value.
    gen._counter = 0xFFFFFF

    at_max, rolled = gen.next_ids(2)

    assert (timestamp_ms(at_max), timestamp_ms(rolled)) == (T0_MS, T0_MS + 1)


def test_ids_stay_increasing_across_a_counter_overflow():
    gen, _ = generator()
    before = gen.next_id()
    gen._counter = 0xFFFFFF

    made = [before, *gen.next_ids(3), gen.next_id()]

    assert all(a < b for a, b in zip(made, made[1:]))


def test_ids_stay_increasing_when_the_clock_catches_up_with_an_overflowed_millisecond():
    gen, clock = generator()
    gen.next_id()
    gen._counter = 0xFFFFFF
    rolled = gen.next_ids(2)[-1]  # now in T0_MS + 1
    clock.now = T0 + 0.001

    assert gen.next_id() > rolled


def test_two_generators_with_different_tags_make_different_ids_at_the_same_moment():
    first, _ = generator(tag=1)
    second, _ = generator(tag=2)

    assert first.next_id() != second.next_id()


def test_the_tag_is_the_last_six_hex_characters_of_an_id():
    gen, _ = generator(tag=0x123456)

    assert gen.next_id().endswith("123456")


def test_timestamp_ms_returns_the_millisecond_the_id_was_made_at():
    gen, _ = generator(now=T0)

    assert timestamp_ms(gen.next_id()) == T0_MS


@pytest.mark.parametrize("ms", [0, 1, 1_700_000_000_123, 1_799_999_999_999, 0xFFFFFFFFFFFF])
def test_timestamp_ms_round_trips_through_an_id(ms):
    gen, _ = generator(now=ms / 1000)

    assert timestamp_ms(gen.next_id()) == ms


def test_lower_bound_sorts_before_every_id_of_that_millisecond():
    gen, _ = generator(tag=1)

    made = gen.next_ids(10)

    assert all(lower_bound(T0_MS) < message_id for message_id in made)


def test_lower_bound_is_not_above_an_id_with_a_zero_counter_and_zero_tag():
    gen, _ = generator(tag=0)

    assert lower_bound(T0_MS) <= gen.next_id()


def test_lower_bound_sorts_after_every_id_of_the_previous_millisecond():
    gen, _ = generator(now=(T0_MS - 1) / 1000, tag=0xFFFFFF)
    gen.next_id()
    gen._counter = 0xFFFFFF  # the largest id that millisecond can hold

    largest = gen.next_id()

    assert timestamp_ms(largest) == T0_MS - 1 and largest < lower_bound(T0_MS)


def test_lower_bound_is_a_message_id():
    assert is_message_id(lower_bound(T0_MS))


def test_lower_bound_of_a_negative_millisecond_is_the_smallest_id():
    assert lower_bound(-5) == "0" * 24


def test_is_message_id_accepts_a_generated_id():
    gen, _ = generator()

    assert is_message_id(gen.next_id())


@pytest.mark.parametrize(
    "value",
    [
        "0" * 23,
        "0" * 25,
        "",
        "ABCDEF" + "0" * 18,
        "g" + "0" * 23,
        " " + "0" * 23,
        None,
        123,
        b"0" * 24,
        ["0" * 24],
    ],
    ids=["23 chars", "25 chars", "empty", "uppercase", "non-hex", "leading space", "None", "int", "bytes", "list"],
)
def test_is_message_id_rejects_anything_but_24_lowercase_hex_characters(value):
    assert is_message_id(value) is False


def test_is_message_id_rejects_an_id_followed_by_a_newline():
    assert is_message_id("0" * 24 + "\n") is False


def test_timestamp_ms_of_a_non_id_raises_message_id_error():
    with pytest.raises(MessageIdError):
        timestamp_ms("not-an-id")


def test_message_id_error_is_a_value_error():
    assert issubclass(MessageIdError, ValueError)


def test_timestamp_ms_error_names_the_bad_value_and_the_expected_form():
    with pytest.raises(MessageIdError) as caught:
        timestamp_ms("XYZ")

    assert "'XYZ'" in str(caught.value) and "24 lowercase hex characters" in str(caught.value)


def test_timestamp_ms_of_a_non_string_raises_message_id_error():
    with pytest.raises(MessageIdError):
        timestamp_ms(12345)  # type: ignore[arg-type]


@pytest.mark.parametrize("value, says", [
    ("01A243F0F0BD000000B2E826", "upper-case hex: ids are lower-case"),
    ("01a243f0f0bd000000b2e82", "23 characters; an id is 24 lower-case hex characters"),
    ("01a243f0f0bd000000b2e82g", "not hex ('g'): an id is 24 lower-case hex characters"),
    ("0x1a243f0f0bd000000b2e82", "not hex ('x'): an id is 24 lower-case hex characters"),
    ("01A243F0F0BD000000B2E82G", "not hex ('G'): an id is 24 lower-case hex characters"),  # the character as given
    (12, "int, not a string"),
    (None, "NoneType, not a string"),
])
def test_the_status_task_says_why_a_value_is_not_a_message_id(value, says):
    """An upper-case id is 24 hex characters: the status task's error used to tell its caller to
    pass 24 hex characters, which it had done."""
    from tasks.messages import InvalidMessage
    from tasks.status import status

    with pytest.raises(InvalidMessage, match=re.escape(says)):
        status.run(value)


def test_an_id_has_no_problem():
    from tasks.ids import id_problem

    assert id_problem("01a243f0f0bd000000b2e826") is None

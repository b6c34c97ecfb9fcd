"""Pure tests of what ``tasks.presence`` accepts (``tasks.presence.users_of``)."""

from __future__ import annotations

import pytest

from tasks.messages import InvalidMessage
from tasks.presence import users_of


def test_one_user_id_or_a_list_without_repeats_in_order():
    assert users_of("alice", 10) == ("alice",)
    assert users_of(["bob", "alice", "bob"], 10) == ("bob", "alice")


@pytest.mark.parametrize("value, says", [
    ("*", '"*" is not one'), (["alice", "*"], '"*" is not one'), ([], "non-empty list"), (None, "non-empty list"),
    (5, "non-empty list"), ({"alice": 1}, "non-empty list"), (["alice", 7], "users[1] must be a non-empty string user id"),
    (["al ice"], "users[0] holds ' '"), ("", "the user must be a non-empty string user id"),
])
def test_anything_else_is_refused_saying_what_was_expected(value, says):
    with pytest.raises(InvalidMessage) as caught:
        users_of(value, 10)
    assert says in str(caught.value)


def test_more_users_than_the_limit_are_refused_naming_it():
    with pytest.raises(InvalidMessage, match="at most 3 per call"):
        users_of(["a", "b", "c", "d"], 3)

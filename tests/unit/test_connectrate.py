"""Pure tests of ``wsnode.connectrate`` (``MAX_USER_CONNECTS``): each connection's answer from the
script's answer per user, the close reason, and the setting's form (``settingtypes._connect_rate``)."""

from __future__ import annotations

import pytest

from settings import SettingsError, _read
from settingtypes import MAX_CONNECT_WINDOW_SECONDS, MAX_CONNECTS_PER_WINDOW, _connect_rate
from wsnode import connectrate
from wsnode.closecodes import MAX_REASON_BYTES


def test_tally_counts_each_users_connects_in_the_order_users_first_come():
    assert list(connectrate.tally(["bob", "ann", "bob", "cid", "bob"]).items()) == [("bob", 3), ("ann", 1), ("cid", 1)]


def test_a_users_first_connects_in_a_call_are_the_admitted_ones_and_the_rest_get_the_retry_time():
    users = ["ann", "bob", "ann", "ann", "bob"]
    assert connectrate.answers(users, {"ann": (1, 2500), "bob": (2, 0)}) == [None, None, 2500, 2500, None]


def test_a_user_with_none_admitted_gets_the_retry_time_on_every_connection_and_never_zero():
    assert connectrate.answers(["ann", "ann"], {"ann": (0, 700)}) == [700, 700]
    assert connectrate.answers(["ann"], {"ann": (0, 0)}) == [1]  # refused is never "retry in 0"


def test_the_reason_gives_whole_seconds_rounded_up_and_fits_a_close_frame():
    assert connectrate.reason(1) == "too many connects of this user, retry in 1 s"
    assert connectrate.reason(1000) == "too many connects of this user, retry in 1 s"
    assert connectrate.reason(1001) == "too many connects of this user, retry in 2 s"
    assert connectrate.reason(86_400_000) == "too many connects of this user, retry in 86400 s"
    assert len(connectrate.reason(86_400_000).encode()) <= MAX_REASON_BYTES


def test_the_log_key_is_the_users_own():
    assert connectrate.log_key("alice") == "push:connects:alice"


# --- the setting ------------------------------------------------------------------------------


@pytest.mark.parametrize(("raw", "value"), [("0", None), ("30/60", (30, 60)), (" 5 / 10 ", (5, 10)), ("1/1", (1, 1)),
                                            (f"{MAX_CONNECTS_PER_WINDOW}/{MAX_CONNECT_WINDOW_SECONDS}",
                                             (MAX_CONNECTS_PER_WINDOW, MAX_CONNECT_WINDOW_SECONDS))])
def test_the_setting_is_0_or_a_count_per_seconds(raw, value):
    assert _connect_rate(raw) == value


def test_the_setting_is_off_by_default():
    assert _read({}, "MAX_USER_CONNECTS", None, _connect_rate, "...") is None


@pytest.mark.parametrize(("raw", "says"), [
    ("30", "no '/' between the count and the seconds"),
    ("30/", "invalid literal"),
    ("abc/60", "invalid literal"),
    ("2.5/60", "invalid literal"),
    ("0/60", "the count must be 1 to 1000; 0 alone turns the limit off"),
    ("-1/60", "the count must be 1 to 1000"),
    ("1001/60", "the count must be 1 to 1000"),
    ("30/0", "the seconds must be 1 to 86400"),
    ("30/86401", "the seconds must be 1 to 86400"),
    ("30/60/2", "invalid literal"),
])
def test_a_bad_setting_stops_the_process_naming_the_variable_the_value_the_form_and_why(raw, says):
    with pytest.raises(SettingsError) as caught:
        _read({"MAX_USER_CONNECTS": raw}, "MAX_USER_CONNECTS", None, _connect_rate, "0 (no limit) or COUNT/SECONDS")
    text = str(caught.value)
    assert text.startswith(f"MAX_USER_CONNECTS={raw!r} is not valid: expected 0 (no limit) or COUNT/SECONDS (")
    assert says in text

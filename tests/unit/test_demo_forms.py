"""demo/forms.py: what the demo page's forms send, with plain values."""

from __future__ import annotations

import pytest

from demo import forms


def test_a_user_name_is_trimmed():
    assert forms.user_name("  alice ") == "alice"


@pytest.mark.parametrize("value", ["", "   ", None, 7])
def test_a_missing_user_name_asks_for_one(value):
    with pytest.raises(forms.DemoInputError, match="type a user name"):
        forms.user_name(value)


def test_a_user_name_longer_than_the_platform_accepts_is_refused():
    forms.user_name("u" * forms.MAX_USER_CHARS)
    with pytest.raises(forms.DemoInputError, match="at most 128 characters; this one has 129"):
        forms.user_name("u" * 129)


@pytest.mark.parametrize("value", ["alice,bob", "*"])
def test_a_user_name_cannot_hold_a_comma_or_be_the_star(value):
    with pytest.raises(forms.DemoInputError, match="cannot be a user name"):
        forms.user_name(value)


@pytest.mark.parametrize("value", ["alice smith", "alice\tsmith", "alice\u200bsmith", "alice\x07"])
def test_a_user_name_cannot_hold_what_no_user_id_holds(value):
    """Auth issues no token for such a name, and tasks.collect sends nothing to it."""
    with pytest.raises(forms.DemoInputError, match="no whitespace, control or format characters"):
        forms.user_name(value)


def test_one_recipient_is_a_plain_user_id():
    assert forms.recipients(" alice ") == "alice"


def test_a_comma_list_becomes_a_list_in_order_without_repeats():
    assert forms.recipients("bob, alice ,bob") == ["bob", "alice"]


def test_a_comma_list_naming_one_user_twice_is_that_user():
    assert forms.recipients("alice, alice") == "alice"


def test_the_star_means_everyone_online():
    assert forms.recipients(" * ") == "*"


def test_the_star_inside_a_list_is_refused():
    with pytest.raises(forms.DemoInputError, match="'\\*' means everyone"):
        forms.recipients("alice, *")


@pytest.mark.parametrize("value", ["alice,,bob", "alice,", ",bob"])
def test_an_empty_name_between_commas_is_refused(value):
    with pytest.raises(forms.DemoInputError, match="empty name between commas"):
        forms.recipients(value)


def test_no_recipient_says_what_to_write():
    with pytest.raises(forms.DemoInputError, match="a user name, several separated by commas, or \\*"):
        forms.recipients("  ")


def test_message_data_carries_the_text_the_recipients_as_typed_and_the_sender():
    assert forms.message_data("hi", ["alice", "bob"], "carol") == {"text": "hi", "to": "alice, bob", "from": "carol"}
    assert forms.message_data("hi", "*") == {"text": "hi", "to": "*", "from": "demo page"}


@pytest.mark.parametrize("text", ["", "  ", None])
def test_message_data_needs_some_text(text):
    with pytest.raises(forms.DemoInputError, match="type some text"):
        forms.message_data(text, "alice")


def test_message_data_refuses_a_text_over_the_demo_limit():
    with pytest.raises(forms.DemoInputError, match="at most 2000 characters"):
        forms.message_data("x" * 2001, "alice")


def test_node_ports_become_urls_on_the_host_the_page_came_from():
    assert forms.node_urls(["8101", "8102"], "127.0.0.1:8080") == ["ws://127.0.0.1:8101/ws", "ws://127.0.0.1:8102/ws"]
    assert forms.node_urls(["8101"], "demo.example.com") == ["ws://demo.example.com:8101/ws"]
    assert forms.node_urls(["8101"], "[::1]:8080") == ["ws://[::1]:8101/ws"]


def test_node_urls_are_kept_as_given():
    assert forms.node_urls(["wss://push.example.com/ws", "8101"], "localhost:8080") == ["wss://push.example.com/ws", "ws://localhost:8101/ws"]


def test_a_node_that_is_neither_a_port_nor_a_ws_url_is_refused():
    with pytest.raises(forms.DemoInputError, match="give a port \\(8101\\) or a ws:// URL"):
        forms.node_urls(["http://127.0.0.1:8101"], "127.0.0.1:8080")


def test_a_token_ttl_is_optional_and_a_whole_number_of_seconds():
    assert forms.token_ttl(None) is None
    assert forms.token_ttl(30) == 30


@pytest.mark.parametrize("value", [0, -1, 1.5, "30", True, [30]])
def test_a_token_ttl_that_is_not_a_positive_whole_number_is_refused(value):
    with pytest.raises(forms.DemoInputError, match="ttl is a whole number of seconds"):
        forms.token_ttl(value)

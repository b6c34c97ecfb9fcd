"""Pure tests of ``tasks.messages``: the arguments of ``tasks.collect`` in, a Message or an error out."""

from __future__ import annotations

import datetime

import pytest

from auth.tokens import InvalidUserId, check_user_id

from tasks.messages import BROADCAST, MAX_DATA_DEPTH, MAX_USER_ID_CHARS, MISSING, InvalidMessage, Message, document_problem, nesting, not_unicode, validate

LIMITS = {"max_bytes": 1000, "max_recipients": 5}


def check(to=MISSING, data=MISSING, **overrides) -> Message:
    return validate(to, data, **{**LIMITS, **overrides})


def rejection(to=MISSING, data=MISSING, **overrides) -> str:
    with pytest.raises(InvalidMessage) as caught:
        check(to, data, **overrides)
    return str(caught.value)


# --- to ---------------------------------------------------------------------------------------


def test_a_single_user_id_becomes_a_one_recipient_tuple():
    assert check("alice", {"x": 1}).to == ("alice",)


def test_a_list_of_users_keeps_its_order():
    assert check(["carol", "alice", "bob"], 1).to == ("carol", "alice", "bob")


def test_a_list_of_users_drops_repeats_keeping_the_first_position():
    assert check(["bob", "alice", "bob", "carol", "alice"], 1).to == ("bob", "alice", "carol")


def test_a_tuple_of_users_is_accepted_like_a_list():
    assert check(("alice", "bob"), 1).to == ("alice", "bob")


def test_a_star_alone_means_broadcast():
    assert check("*", 1).to == BROADCAST == "*"


def test_a_missing_to_is_rejected():
    assert '"to" is missing' in rejection(data=1)


def test_to_none_is_rejected_as_missing():
    assert '"to" is missing' in rejection(None, 1)


def test_the_missing_to_error_says_what_to_pass():
    assert 'a user id, a list of user ids, or "*"' in rejection(data=1)


@pytest.mark.parametrize("to", ["", "   ", "\t\n"], ids=["empty", "spaces", "tab-newline"])
def test_an_empty_or_blank_user_id_is_rejected(to):
    assert "non-empty string user id" in rejection(to, 1)


def test_an_empty_list_is_rejected_and_asks_for_at_least_one_user():
    assert "empty list" in rejection([], 1) and "at least one user id" in rejection([], 1)


def test_a_star_inside_a_list_is_rejected():
    assert '"to"[1] is "*"' in rejection(["alice", "*"], 1)


def test_the_star_inside_a_list_error_says_to_pass_it_alone():
    assert 'to="*" alone' in rejection(["*"], 1)


@pytest.mark.parametrize("bad, shown", [(5, "5"), (None, "None"), (["bob"], "['bob']")])
def test_a_non_string_item_is_rejected_with_its_index_and_value(bad, shown):
    text = rejection(["alice", "bob", bad], 1)

    assert '"to"[2]' in text and shown in text


def test_a_huge_non_string_item_is_shown_cut_short():
    """Its whole repr went into the error: into the worker's log line and the stored result, a
    megabyte each for an item of a megabyte (a user object passed where its id belongs)."""
    text = rejection(["alice", {"id": "bob", "profile": "x" * 1_000_000}], 1)

    assert text.startswith('"to"[1] must be a non-empty string user id, got {\'id\': \'bob\', \'profile\': \'xxx')
    assert len(text) < 200


def test_a_blank_item_in_a_list_is_rejected_with_its_index():
    assert '"to"[0] must be a non-empty string user id' in rejection([" ", "alice"], 1)


@pytest.mark.parametrize("to", [5, {"alice": 1}, b"alice", True], ids=["int", "dict", "bytes", "bool"])
def test_a_to_of_another_type_is_rejected_naming_that_type(to):
    assert type(to).__name__ in rejection(to, 1)


def test_more_recipients_than_the_limit_are_rejected():
    text = rejection(["a", "b", "c", "d"], 1, max_recipients=3)

    assert "names 4 users" in text and "at most 3" in text


def test_the_too_many_recipients_error_says_to_split_the_list():
    assert "split the list" in rejection(["a", "b", "c"], 1, max_recipients=2)


def test_exactly_the_recipient_limit_is_accepted():
    assert check(["a", "b", "c"], 1, max_recipients=3).to == ("a", "b", "c")


def test_a_user_id_at_the_length_limit_is_accepted():
    user = "u" * MAX_USER_ID_CHARS

    assert check(user, 1).to == (user,)


def test_an_over_long_user_id_is_rejected_with_its_length_and_the_limit():
    text = rejection("u" * (MAX_USER_ID_CHARS + 1), 1)

    assert f"{MAX_USER_ID_CHARS + 1} characters" in text and f"at most {MAX_USER_ID_CHARS}" in text


def test_an_over_long_user_id_in_a_list_is_rejected_with_its_index():
    assert '"to"[1] is' in rejection(["alice", "u" * (MAX_USER_ID_CHARS + 1)], 1)


# --- data -------------------------------------------------------------------------------------


def test_data_is_kept_unchanged():
    data = {"text": "hi", "n": [1, 2.5, None, True]}

    assert check("alice", data).data == data


def test_data_json_is_compact():
    assert check("alice", {"a": [1, 2]}).data_json == '{"a":[1,2]}'


def test_data_json_keeps_non_ascii_characters():
    assert check("alice", {"text": "héllo ✓"}).data_json == '{"text":"héllo ✓"}'


@pytest.mark.parametrize("data", [None, 0, "", [], {}, False], ids=["null", "zero", "empty string", "empty list", "empty dict", "false"])
def test_falsy_json_values_are_valid_data(data):
    assert check("alice", data).data == data


def test_missing_data_is_rejected():
    assert '"data" is missing' in rejection("alice")


def test_the_missing_data_error_gives_an_example():
    assert 'data={"text": "hi"}' in rejection("alice")


@pytest.mark.parametrize(
    "data",
    [
        {1, 2},
        b"bytes",
        float("nan"),
        float("inf"),
        datetime.datetime(2024, 1, 1),
        {"nested": [object()]},
    ],
    ids=["set", "bytes", "NaN", "infinity", "datetime", "nested object"],
)
def test_data_that_is_not_json_is_rejected(data):
    assert '"data" is not JSON' in rejection("alice", data)


def test_the_not_json_error_lists_the_accepted_types():
    assert "dicts, lists, strings, numbers, booleans and null" in rejection("alice", {1, 2})


def test_data_at_exactly_the_size_limit_is_accepted():
    data = "x" * 8  # '"xxxxxxxx"' is 10 bytes of JSON

    assert check("alice", data, max_bytes=10).data_json == '"xxxxxxxx"'


def test_data_one_byte_over_the_size_limit_is_rejected():
    text = rejection("alice", "x" * 9, max_bytes=10)

    assert '"data" is 11 bytes' in text and "the limit is 10" in text


def test_data_size_is_counted_in_utf8_bytes_not_characters():
    # '"éé"' is 4 characters but 6 bytes.
    assert '"data" is 6 bytes' in rejection("alice", "éé", max_bytes=5)


def test_the_too_big_error_suggests_sending_a_reference():
    assert "send a reference instead" in rejection("alice", "x" * 50, max_bytes=10)


# --- other arguments --------------------------------------------------------------------------


def test_unexpected_arguments_are_rejected_by_name():
    text = rejection("alice", 1, unexpected={"colour": "red", "priority": 1})

    assert "'colour', 'priority'" in text


def test_the_unexpected_arguments_error_lists_the_accepted_ones():
    assert "collect takes to, data" in rejection("alice", 1, unexpected={"x": 1})


def test_an_empty_unexpected_mapping_is_not_an_error():
    assert check("alice", 1, unexpected={}).to == ("alice",)


def test_invalid_message_is_a_value_error():
    assert issubclass(InvalidMessage, ValueError)


# --- depth and Unicode --------------------------------------------------------------------------


def _nested(levels: int, leaf: object = 1) -> object:
    value = leaf
    for level in range(levels):
        value = [value] if level % 2 else {"k": value}
    return value


def test_nesting_counts_levels_of_lists_and_objects_at_any_depth():
    assert [nesting(value, 64) for value in (1, "x", [], {}, [1], {"a": [1]}, [{"a": [{}]}])] == [0, 0, 1, 1, 1, 2, 4]
    assert nesting(_nested(5000), 10_000) == 5000  # iterative: no recursion limit
    assert nesting(_nested(5000), 64) == 65  # counting stops past the bound


def test_data_nested_to_the_limit_is_accepted_and_one_level_more_is_rejected_saying_why():
    assert check("ann", _nested(MAX_DATA_DEPTH)).data == _nested(MAX_DATA_DEPTH)
    text = rejection("ann", _nested(MAX_DATA_DEPTH + 1), max_bytes=10_000)
    assert f"more than {MAX_DATA_DEPTH} levels deep" in text and "MongoDB" in text


def test_data_with_a_lone_surrogate_is_rejected_where_it_is():
    # JSON's "\ud800" escape decodes to one, which cannot be stored or sent as UTF-8
    assert rejection("ann", {"text": "ok \ud800"}) == '"data" is not valid Unicode: its JSON holds a lone surrogate \'\\ud800\' at position 12'


@pytest.mark.parametrize(("to", "where", "char"), [
    ("\udc00", '"to"', "\udc00"), (["ann", "b\ud800"], '"to"[1]', "\ud800"), ("has space", '"to"', " "),
    (["ann", "tab\there"], '"to"[1]', "\t"), ("zero\u200dwidth", '"to"', "\u200d"), ("no\xa0break", '"to"', "\xa0"),
])
def test_a_user_id_auth_would_not_issue_a_token_for_is_rejected_with_its_place(to, where, char):
    assert rejection(to, 1).startswith(f"{where} holds {char!r}: user ids have no whitespace, control, format or surrogate characters")


@pytest.mark.parametrize("user", ["alice", "Zoë", "用户", "🙂" * 10, "a\ue000b", "x.y@z-1_2", "u" * MAX_USER_ID_CHARS, "has space", "tab\t",
                                  "\u200d", "\ud800", "u" * (MAX_USER_ID_CHARS + 1), "", " "])
def test_collect_accepts_exactly_the_user_ids_auth_issues_tokens_for(user):
    try:
        check_user_id(user)
        auth_accepts = True
    except InvalidUserId:
        auth_accepts = False
    try:
        check(user, 1)
        collect_accepts = True
    except InvalidMessage:
        collect_accepts = False
    assert collect_accepts == auth_accepts


def test_not_unicode_names_the_first_lone_surrogate_only_when_there_is_one():
    assert not_unicode("héllo ✓") is None
    assert not_unicode("ab\udfffc") == "a lone surrogate '\\udfff' at position 2"


@pytest.mark.parametrize(("data", "says"), [
    ({"n": 2**63}, "holds an integer outside MongoDB's 64-bit range"),
    ([-(2**63) - 1], "holds an integer outside MongoDB's 64-bit range"),
    ({"a\x00b": 1}, "has the object key 'a\\x00b'"),
    ({"outer": {7: "x"}}, "has the object key 7"),
])
def test_data_mongodb_cannot_store_is_rejected_before_its_batch_is_stored(data, says):
    assert rejection("ann", data).startswith(f'"data" {says}')


def test_the_64_bit_range_itself_is_accepted():
    assert check("ann", [2**63 - 1, -(2**63), True, 1.5e300]).data == [2**63 - 1, -(2**63), True, 1.5e300]


def test_a_message_whose_mongodb_document_would_pass_16_mib_fails_alone_and_says_why():
    numbers = [0] * 1_500_000  # 3 MB as JSON, about 18 MB as BSON
    with pytest.raises(InvalidMessage, match="over the limit of 16777216"):
        validate("alice", numbers, max_bytes=4_000_000, max_recipients=10)
    assert document_problem(("alice",), numbers[:1_000_000], 2_000_000) is None  # about 12 MB
    assert document_problem(BROADCAST, {"text": "hi"}, 13) is None


def test_checked_arguments_names_what_the_task_takes_and_keeps_the_signature():
    import inspect

    from tasks.messages import checked_arguments

    @checked_arguments("tasks.example")
    def example(message_id: str, verbose: bool = False) -> tuple:
        return message_id, verbose

    assert example("m1", verbose=True) == ("m1", True)
    for args, kwargs, says in [((), {}, "missing a required argument: 'message_id'"), (("a", True, 3), {}, "too many positional arguments"),
                               (("a",), {"colour": 1}, "got an unexpected keyword argument 'colour'")]:
        with pytest.raises(InvalidMessage, match=r"^tasks\.example takes \(message_id, verbose\): ") as caught:
            example(*args, **kwargs)
        assert says in str(caught.value)
    assert list(inspect.signature(example).parameters) == ["message_id", "verbose"]
    assert inspect.getfullargspec(example).args == ["message_id", "verbose"], "Celery's check of importers' calls reads this"

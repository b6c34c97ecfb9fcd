"""Pure tests of how ``tasks.messages.encode_data`` measures ``data``: plain JSON goes through
orjson, anything else through the standard library's strict encoder, and both give the same
verdict (accepted, or refused with the same words) as the standard library alone."""

from __future__ import annotations

import dataclasses
import datetime
import enum
import json
import uuid

import pytest

from tasks.messages import InvalidMessage, encode_data, scan

STRICT = json.JSONEncoder(allow_nan=False, ensure_ascii=False, separators=(",", ":")).encode


def verdict(data, max_bytes: int) -> str:
    try:
        return "ok " + encode_data(data, max_bytes)
    except InvalidMessage as exc:
        return "refused " + str(exc)


PLAIN_WITHOUT_FLOATS = [
    {"text": "hello", "n": 3, "ok": True, "none": None},
    ["é", "✓", "😀", "\u2028", "\x7f", "a/b", 'quote " and \\ backslash'],
    "".join(chr(c) for c in range(0x20)),  # every control character, escaped
    {"nested": [[[{"deep": [1, 2, 3]}]]], "empty": {}, "list": []},
    (1, "tuple", [2, 3]),
    [-(2**63), 2**63 - 1, 0, -1],
    "",
]


@pytest.mark.parametrize("data", PLAIN_WITHOUT_FLOATS)
def test_plain_data_without_floats_is_measured_as_the_standard_library_spells_it(data):
    assert encode_data(data, 1_000_000) == STRICT(data)


@pytest.mark.parametrize("data", PLAIN_WITHOUT_FLOATS)
def test_at_the_size_limit_plain_data_gets_the_standard_librarys_verdict(data):
    size = len(STRICT(data).encode())
    assert verdict(data, size).startswith("ok ")
    if size:
        assert verdict(data, size - 1) == f'refused "data" is {size} bytes as JSON; the limit is {size - 1} (MAX_MESSAGE_BYTES): send a reference instead'


@pytest.mark.parametrize("data", [[1e-05], {"t": 2.5e-07, "x": "y" * 40}, [0.1, 1e16, -0.0, 5e-324, 1796573785.2829492]])
def test_floats_whose_spelling_differs_get_the_standard_librarys_verdict_at_the_limit(data):
    size = len(STRICT(data).encode())
    assert verdict(data, size).startswith("ok ")
    assert verdict(data, size - 1) == f'refused "data" is {size} bytes as JSON; the limit is {size - 1} (MAX_MESSAGE_BYTES): send a reference instead'
    assert json.loads(encode_data(data, 1_000_000)) == json.loads(STRICT(data))  # the same values, whichever spelling


@dataclasses.dataclass
class Point:
    x: int


class Colour(enum.Enum):
    RED = "red"


class Text(str):
    pass


@pytest.mark.parametrize("data", [
    uuid.UUID(int=1),  # orjson encodes these four; the standard library refuses them
    datetime.datetime(2024, 1, 1),
    Point(1),
    Colour.RED,
    [1, float("nan")],
    {"a": {"b": float("-inf")}},
    {1, 2},
    {"text": "ok \ud800"},
], ids=["uuid", "datetime", "dataclass", "enum", "nested NaN", "nested infinity", "set", "lone surrogate"])
def test_what_is_not_plain_json_is_refused_as_the_standard_library_refuses_it(data):
    text = verdict(data, 1_000_000)
    assert text.startswith('refused "data" is not ')
    with pytest.raises((TypeError, ValueError, UnicodeEncodeError)):
        STRICT(data).encode()


@pytest.mark.parametrize("data", [enum.IntEnum("N", "ONE")(1), Text("sub"), {Text("key"): 1}, True])
def test_subclasses_the_standard_library_accepts_are_accepted_and_spelled_as_it_spells_them(data):
    assert encode_data(data, 1000) == STRICT(data)


def test_scan_counts_the_floats_of_plain_data_and_gives_none_for_anything_else():
    assert scan({"a": [1.5, 2.5], "b": 1, "c": "x"}) == (None, 2)
    assert scan({"a": [1, "x", None, True]}) == (None, 0)
    assert scan([1.0, float("nan")]) == (None, None)
    assert scan([Text("x")]) == (None, None)
    assert scan({1: "x"})[0].startswith("has the object key 1")

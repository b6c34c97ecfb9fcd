"""The items of a queue's Redis list as the broker channel tells them apart (``tasks.queueitems``):
pure, on JSON text."""

from __future__ import annotations

import base64
import json

from tasks.queueitems import item_task_id, kombu_message, route_back, why_dropped, with_bookkeeping

BODY = base64.b64encode(json.dumps([[], {"to": "u", "data": 1}, {}]).encode()).decode()
HAND_BUILT = {"body": BODY, "content-type": "application/json", "content-encoding": "utf-8",
              "headers": {"task": "tasks.collect", "id": "task-1"}, "properties": {"body_encoding": "base64"}}


def test_a_message_without_a_delivery_tag_or_delivery_info_gets_them_and_keeps_the_rest():
    amended = with_bookkeeping(json.dumps(HAND_BUILT), "collect", "tag-1")
    message = kombu_message(amended)
    assert message["properties"] == {"body_encoding": "base64", "delivery_tag": "tag-1", "delivery_info": {"exchange": "", "routing_key": "collect"}}
    assert {key: value for key, value in message.items() if key != "properties"} == {k: v for k, v in HAND_BUILT.items() if k != "properties"}


def test_a_delivery_info_without_its_exchange_or_routing_key_has_them_filled_in_and_keeps_the_rest():
    item = {**HAND_BUILT, "properties": {"delivery_tag": "mine", "delivery_info": {"priority": 3, "exchange": "celery"}}}
    properties = kombu_message(with_bookkeeping(json.dumps(item), "collect", "unused"))["properties"]
    assert properties == {"delivery_tag": "mine", "delivery_info": {"priority": 3, "exchange": "celery", "routing_key": "collect"}}


def test_without_properties_or_with_null_ones_they_are_supplied_whole():
    for properties in (None, {"delivery_tag": None, "delivery_info": None}):
        item = {key: value for key, value in HAND_BUILT.items() if key != "properties"}
        if properties is not None:
            item["properties"] = properties
        assert kombu_message(with_bookkeeping(json.dumps(item), "q", "t"))["properties"]["delivery_tag"] == "t"


def test_a_complete_message_or_one_that_is_not_kombus_shape_gets_nothing():
    complete = {**HAND_BUILT, "properties": {"delivery_tag": "t", "delivery_info": {"exchange": "", "routing_key": "q"}}}
    for item in (complete, {"not": "kombu"}, [1, 2], {**HAND_BUILT, "body": None}, {**HAND_BUILT, "properties": "x"},
                 {**HAND_BUILT, "properties": {"delivery_info": "celery"}}):
        assert with_bookkeeping(json.dumps(item), "q", "t") is None, item
    assert with_bookkeeping("not json", "q", "t") is None
    # a tag of the wrong type is not replaced: the message stays refused
    assert kombu_message(with_bookkeeping(json.dumps({**HAND_BUILT, "properties": {"delivery_tag": 7}}), "q", "t")) is None


def test_values_python_reads_come_back_as_they_were_read():
    raw = json.dumps(HAND_BUILT)[:-1] + ', "x": [1e400, NaN, 12345678901234567890123, [], {}, "\\ud800"]}'
    assert json.loads(with_bookkeeping(raw, "q", "t"))["x"][2:] == [12345678901234567890123, [], {}, "\ud800"]


def test_the_task_id_of_an_item_is_its_headers_or_its_protocol_1_bodys():
    assert item_task_id(json.dumps({**HAND_BUILT, "body": "abcde"})) == "task-1"
    p1 = base64.b64encode(json.dumps({"task": "t", "id": "p1"}).encode()).decode()
    assert item_task_id(json.dumps({"body": p1, "headers": ["x"], "properties": {"body_encoding": "base64"}})) == "p1"
    assert item_task_id(json.dumps({"body": json.dumps({"id": "p1-text"})})) == "p1-text"
    for item in ({"headers": {"id": "a\nb"}}, {"headers": {"id": ""}}, {"body": "!!", "properties": {"body_encoding": "base64"}}, [1]):
        assert item_task_id(json.dumps(item)) is None, item
    assert item_task_id("not json") is None


def test_why_an_item_is_dropped_is_told_as_what_it_lacks():
    assert why_dropped(json.dumps({"headers": {"id": "x"}}))[0] == "it has no body"
    assert why_dropped(json.dumps({"headers": ["x"], "properties": {"delivery_tag": "t", "delivery_info": {"exchange": "", "routing_key": "q"}}}))[0] == \
        "it has no body, and its headers are of type list, not an object"
    bad_base64 = with_bookkeeping(json.dumps({**HAND_BUILT, "body": "abcde"}), "q", "t")
    assert why_dropped(bad_base64) == ("its body is not valid base64, which its body_encoding says it is", json.loads(bad_base64)["properties"])
    assert why_dropped("\xff not json") == ("it is not JSON that kombu's decoder reads", None)


def test_a_message_is_routed_back_to_the_queue_it_was_read_from_unless_it_names_it_already():
    gocelery = {"properties": {"delivery_info": {"exchange": "celery", "routing_key": "celery", "priority": 0}}}
    route_back(gocelery, "collect")
    assert gocelery["properties"]["delivery_info"] == {"exchange": "", "routing_key": "collect", "priority": 0}
    celery = {"properties": {"delivery_info": {"exchange": "collect", "routing_key": "collect"}}}
    route_back(celery, "collect")
    assert celery["properties"]["delivery_info"] == {"exchange": "collect", "routing_key": "collect"}

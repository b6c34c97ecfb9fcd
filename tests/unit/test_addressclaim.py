"""The pure parts of a node's claim on its address (``wsnode.addressclaim``)."""

from __future__ import annotations

import json

from wsnode.addressclaim import claim_key, gone_from, holder


def test_a_claim_is_keyed_by_the_address():
    assert claim_key("10.0.0.5:8101") == "push:address:10.0.0.5:8101"


def test_the_holder_is_told_by_process_and_host_and_a_value_not_ours_as_it_is():
    assert holder(json.dumps({"host": "web-2", "pid": 41, "token": "ab"}).encode()) == "process 41 on host 'web-2'"
    assert holder(b"garbage") == "'garbage'"


def test_only_a_gone_process_of_this_host_gives_its_claim_up():
    value = json.dumps({"host": "web-2", "pid": 41, "token": "ab"})
    assert gone_from(value, "web-2", alive=lambda pid: False)
    assert not gone_from(value, "web-2", alive=lambda pid: True)
    assert not gone_from(value, "web-3", alive=lambda pid: False)  # another host's: it may live
    assert not gone_from("garbage", "web-2", alive=lambda pid: False)

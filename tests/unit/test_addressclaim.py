"""The pure parts of a node's claim on its address (``wsnode.addressclaim``)."""

from __future__ import annotations

import json

from wsnode.addressclaim import claim_key, gone_from, holder

HERE = {"host": "web-2", "boot": "b-1", "pidns": 4026531836}


def value(**changes) -> str:
    return json.dumps({**HERE, "pid": 41, "token": "ab", **changes})


def test_a_claim_is_keyed_by_the_address():
    assert claim_key("10.0.0.5:8101") == "push:address:10.0.0.5:8101"


def test_the_holder_is_told_by_process_and_host_and_a_value_not_ours_as_it_is():
    assert holder(value().encode()) == "process 41 on host 'web-2'"
    assert holder(b"garbage") == "'garbage'"


def test_a_gone_process_of_this_host_boot_and_namespace_gives_its_claim_up():
    assert gone_from(value(), HERE, 7, alive=lambda pid: False)
    assert not gone_from(value(), HERE, 7, alive=lambda pid: True)


def test_a_claim_with_this_processs_own_id_in_its_namespace_is_a_predecessors():
    assert gone_from(value(pid=1), {**HERE}, 1, alive=lambda pid: True)  # a container restarted in place: pid 1 again


def test_a_process_of_another_host_boot_or_namespace_cannot_be_told_gone():
    for other in ({"host": "web-3"}, {"boot": "b-2"}, {"pidns": 4026532000}):
        assert not gone_from(value(**other), HERE, 7, alive=lambda pid: False), other  # a live node another namespace cannot see
    assert not gone_from("garbage", HERE, 7, alive=lambda pid: False)

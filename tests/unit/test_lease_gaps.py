"""A lease Redis lost while the node's writes worked (a restart without persistence, a failover, a
FLUSHDB, an evicted route key): what the renewal's replies say (``wsnode.registry.lapsed_from``),
and which connections the node closes for it (``LeaseKeeper._close_unroutable``, a part of ``PushNode``), on a real node
without sockets and stand-in connections (those of ``test_node_lease_wait``)."""

from __future__ import annotations

import asyncio
import logging

import pytest

import launcher
from tests.unit.test_node_lease_wait import Connection
from wsnode.app import PushNode
from wsnode.leasekeeper import LEASE_LOST_REASON
from wsnode.closecodes import CloseCode, short_reason
from wsnode.registry import Lapsed, lapsed_from
from tests.unit.test_metrics_pure import sample


def test_the_renewals_replies_name_the_users_whose_lease_was_gone_across_script_calls():
    chunks = [["ann", "bob", "cid"], ["dan"], ["eve", "fay"]]
    assert lapsed_from(chunks, 0, [[2], [], [1, 2]]) == Lapsed(node=False, users=["bob", "eve", "fay"])
    assert lapsed_from(chunks, b"1", [[], [], []]) == Lapsed(node=True, users=[])
    assert lapsed_from([], 1, []) == Lapsed(node=True, users=[])
    assert not lapsed_from(chunks, 0, [[], [], []])
    with pytest.raises(ValueError, match="2 replies for 3"):
        lapsed_from(chunks, 0, [[], []])


def test_the_close_reason_fits_a_close_frame_and_says_to_resume():
    assert short_reason(LEASE_LOST_REASON) == LEASE_LOST_REASON and "since" in LEASE_LOST_REASON


@pytest.fixture
async def node():
    node = PushNode(launcher.free_port(), celery_app=object())
    yield node
    await node.redis.aclose()


def connect(node: PushNode, user: str, conn_id: str, bound: bool = True) -> Connection:
    conn = Connection(user, conn_id)
    conn.bound = bound
    node.hub.add(conn)
    return conn


async def test_only_the_bound_connections_of_users_whose_lease_went_are_closed_and_those_still_waiting_get_it_again(node, caplog):
    ann_phone, ann_laptop = connect(node, "ann", "a1"), connect(node, "ann", "a2")
    bob = connect(node, "bob", "b1")  # his lease is there
    cid_waiting = connect(node, "cid", "c1", bound=False)  # its first lease write in flight: no lease yet, rightly
    dan, dan_waiting = connect(node, "dan", "d1"), connect(node, "dan", "d2", bound=False)
    eve = connect(node, "eve", "e1")
    eve.close_with(CloseCode.PING_TIMED_OUT)  # closing already: left alone, not counted
    fay_waiting = connect(node, "fay", "f1", bound=False)
    node._leasing["fay"] = asyncio.get_running_loop().create_future()  # its first lease write queued: it writes the lease

    with caplog.at_level(logging.WARNING, logger="wsnode.app"):
        again = node._close_unroutable(Lapsed(node=False, users=["ann", "cid", "dan", "eve", "fay", "gone"]))

    assert [c.closes for c in (ann_phone, ann_laptop, dan)] == [[("closed", CloseCode.TRY_AGAIN_LATER)]] * 3
    assert not bob.closes and not cid_waiting.closes and not dan_waiting.closes and not fay_waiting.closes
    assert again == ["cid", "dan"]  # written again now (cid: its token checked again after its lease write, say); the closed ones resume with since
    assert sample(node.metrics, "push_node_leases_lost_total", lease="user") == 2
    assert sample(node.metrics, "push_node_leases_lost_total", lease="node") == 0
    [record] = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert "the leases of 2 users with connections here" in record.getMessage() and "closing 3 connections with 1013" in record.getMessage()


async def test_the_nodes_own_lease_gone_closes_every_bound_connection(node, caplog):
    ann, bob = connect(node, "ann", "a1"), connect(node, "bob", "b1")
    cid_waiting = connect(node, "cid", "c1", bound=False)

    with caplog.at_level(logging.WARNING, logger="wsnode.app"):
        again = node._close_unroutable(Lapsed(node=True, users=["bob", "cid"]))

    assert ann.closes == bob.closes == [("closed", CloseCode.TRY_AGAIN_LATER)]
    assert not cid_waiting.closes and again == ["cid"]
    assert sample(node.metrics, "push_node_leases_lost_total", lease="node") == 1
    assert sample(node.metrics, "push_node_leases_lost_total", lease="user") == 1
    [record] = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert "the node's own lease and the leases of 1 users" in record.getMessage() and "closing 2 connections" in record.getMessage()


async def test_nothing_bound_nothing_said(node, caplog):
    connect(node, "cid", "c1", bound=False)
    with caplog.at_level(logging.WARNING, logger="wsnode.app"):
        assert node._close_unroutable(Lapsed(node=True, users=["cid"])) == ["cid"]  # a node's first renewal finds no lease of its own
    assert not [r for r in caplog.records if r.levelno == logging.WARNING]
    assert sample(node.metrics, "push_node_leases_lost_total", lease="node") == 0

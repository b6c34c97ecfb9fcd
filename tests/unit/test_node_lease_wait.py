"""Tests of ``wsnode.app.PushNode.attach`` while a connection waits for its user's lease write: a
real node on a plain asyncio loop, its lease writes held back by holding the node's own
``_lease_writes`` lock, its Redis client pointed at a port where nothing listens (a real refused
connection, so the write fails once let go), and a stand-in connection that records how it was
closed (no socket)."""

from __future__ import annotations

import asyncio

import pytest
import redis.asyncio as aioredis

import launcher
from wsnode.app import PushNode
from wsnode.auth import Identity
from wsnode.closecodes import CloseCode
from wsnode.consumer import Delivery
from wsnode.registry import Leases
from wsnode.revocations import Revocation
from wsnode.session import Session


class Connection:
    """What the node uses of a ``PushHandler`` here.  ``close_with`` leaves a closing connection
    alone and ``refuse`` does not, as the handler's do; ``closes`` lists each close the node made."""

    def __init__(self, user_id: str, conn_id: str = "c1", max_backlog_bytes: int | None = None) -> None:
        self.conn_id, self.user_id = conn_id, user_id
        self.identity = Identity(user_id, token_id="jti-1", issued_at_us=1)
        self.session = Session(None, max_backlog_bytes=max_backlog_bytes)
        self.bound = False
        self.closes: list[tuple[str, int]] = []
        self.unsent_bytes = 0

    @property
    def closing(self) -> bool:
        return bool(self.closes)

    def close_with(self, code: CloseCode, reason: str | None = None) -> None:
        if not self.closing:
            self.closes.append(("closed", code))

    def refuse(self, code: CloseCode, reason: str | None = None, why: str | None = None) -> None:
        self.closes.append(("refused", code))


@pytest.fixture
async def node():
    node = PushNode(launcher.free_port(), celery_app=object())
    # Nothing listens there: the lease write, once it runs, fails as with Redis down.
    redis = aioredis.Redis.from_url(f"redis://127.0.0.1:{launcher.free_port()}/0", socket_connect_timeout=1)
    node.leases = Leases(redis, node.address, 30)
    yield node
    await redis.aclose()
    await node.redis.aclose()


async def waiting_for_its_lease(node: PushNode, conn: Connection) -> asyncio.Task:
    """``conn``'s attach, started and waiting for the lease write (the caller holds the lock)."""
    attaching = asyncio.ensure_future(node.attach(conn))
    await asyncio.sleep(0)
    assert node.hub.get(conn.conn_id) is conn and not conn.closing
    return attaching


def live(user: str, number: int, text: str) -> Delivery:
    return Delivery([{"id": f"018bcfe568000000{number:02x}a1b2c3", "to": [user], "data": text}])


async def test_a_connection_revoked_during_its_lease_write_is_refused_once_when_the_write_then_fails(node):
    conn = Connection("alice")
    async with node._lease_writes:
        attaching = await waiting_for_its_lease(node, conn)
        node._on_revocation(Revocation("alice", token_id="jti-1"))
    await attaching

    assert conn.closes == [("refused", CloseCode.UNAUTHORIZED)]


async def test_a_connection_whose_held_messages_overflow_during_its_lease_write_is_refused_and_leaves_the_hub(node):
    conn = Connection("alice", max_backlog_bytes=100)
    async with node._lease_writes:
        attaching = await waiting_for_its_lease(node, conn)
        node.deliver([live("alice", 1, "x" * 80), live("alice", 2, "y" * 80)])

        assert (conn.closes, node.hub.get(conn.conn_id)) == ([("refused", CloseCode.TRY_AGAIN_LATER)], None)
    await attaching

    assert (conn.closes, conn.bound) == ([("refused", CloseCode.TRY_AGAIN_LATER)], False)

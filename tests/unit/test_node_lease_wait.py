"""Tests of ``wsnode.app.PushNode.attach`` while a connection waits for its user's lease write: a
real node on a plain asyncio loop, its lease writes held back by holding the node's own
``_lease_writes`` lock, its Redis client pointed at a port where nothing listens (a real refused
connection, so the write fails once let go), and a stand-in connection that records how it was
closed (no socket)."""

from __future__ import annotations

import asyncio
import logging

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
        self.revocation_checks_seen = 0  # its token checked after the node's last catch-up (none)
        self.session = Session(None, max_backlog_bytes=max_backlog_bytes)
        self.bound = False
        self.closes: list[tuple[str, int]] = []
        self.unsent_bytes = 0
        self.levels: list[int | None] = []  # the log level each refusal asked for

    @property
    def closing(self) -> bool:
        return bool(self.closes)

    def close_with(self, code: CloseCode, reason: str | None = None) -> None:
        if not self.closing:
            self.closes.append(("closed", code))

    def refuse(self, code: CloseCode, reason: str | None = None, why: str | None = None, level: int | None = None) -> None:
        self.closes.append(("refused", code))
        self.levels.append(level)


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


async def test_a_connection_that_comes_after_a_failed_lease_write_writes_the_lease_again(node):
    """A write that failed is forgotten before the connections that waited for it wake up and
    leave: one that came in between found others in the hub and no write, and was bound with no
    lease (neither replayed nor routed what came until the next renewal)."""
    waiting, late = Connection("alice", "c1"), Connection("alice", "c2")
    seen = {}

    def in_between(_future) -> None:  # runs after the node forgot the write, before `waiting` wakes
        attaching = node.attach(late)
        try:
            attaching.send(None)  # runs up to its first wait
        except (StopIteration, AttributeError):  # bound at once (then the stand-in has no request to log)
            pass
        else:  # it waits for a write of its own
            seen["writing"] = node._leasing.get("alice")
            attaching.close()
        seen["bound at once"] = late.bound

    async with node._lease_writes:
        attaching = await waiting_for_its_lease(node, waiting)
        node._leasing["alice"].add_done_callback(in_between)
    await attaching

    assert waiting.closes == [("refused", CloseCode.TRY_AGAIN_LATER)]
    assert seen["bound at once"] is False
    assert seen["writing"] is not None
    with pytest.raises(Exception):  # the new write fails too: nothing listens there
        await seen["writing"]


async def test_a_connection_whose_check_began_before_a_catch_up_is_refused_with_1013_when_the_revocation_list_cannot_be_read(node):
    """Its token is read from the revocation list as it binds (a revocation the node missed may
    cover it); with Redis down it is refused as when its lease cannot be written."""
    bound, late = Connection("alice", "c1"), Connection("alice", "c2")
    node.hub.add(bound)
    bound.bound = True  # the user's lease is written: no lease write for `late`
    await node.redis.aclose()  # never used: a client of the settings' Redis
    node.redis = node.leases._redis  # nothing listens there
    node.revocation_checks = 1  # a catch-up began since `late`'s check did
    await node.attach(late)

    assert (late.closes, late.bound, node.hub.get("c2")) == ([("refused", CloseCode.TRY_AGAIN_LATER)], False, None)
    assert node.hub.get("c1") is bound


class RefusingLeases:
    """Leases whose write Redis refuses with ``error``."""

    def __init__(self, error: Exception) -> None:
        self.error = error

    async def register(self, users, node: bool = False) -> bool:
        raise self.error


@pytest.mark.parametrize("error, level", [
    (__import__("redis").exceptions.ConnectionError("Error 111 connecting"), logging.INFO),
    (__import__("redis").exceptions.NoPermissionError("NOPERM this user has no permissions to access one of the keys"), None),
    (__import__("redis").exceptions.ResponseError("WRONGTYPE Operation against a key holding the wrong kind of value"), None),
])
async def test_a_lease_write_redis_refuses_other_than_by_an_outage_is_a_warning_per_refused_connect(node, error, level):
    """Redis not answering is logged once per change by the PING (each refused connect at INFO);
    a refusal that PING and the renewal do not meet (rights on a key only a connect writes, a key
    of the wrong type) was at INFO only, every connect refused while the node said it was ready."""
    node.leases = RefusingLeases(error)
    conn = Connection("alice")
    await node.attach(conn)
    assert (conn.closes, conn.levels) == ([("refused", CloseCode.TRY_AGAIN_LATER)], [level])

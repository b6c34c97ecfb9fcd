"""A node's renewal against the session's real redis-server, when Redis lost leases while the
node's writes worked: the unroutable connections are closed before their leases are written
again (a real ``PushNode`` without sockets; the stand-in connections of ``test_node_lease_wait``)."""

from __future__ import annotations

import pytest
import redis as redis_lib
import redis.asyncio as aioredis

import launcher
from tests.unit.test_node_lease_wait import Connection
from wsnode.app import PushNode
from wsnode.closecodes import CloseCode
from wsnode.registry import NODES_KEY, Leases, route_key


class Watched(Connection):
    """Records, as it is closed, whether its user's lease on the node was in Redis then."""

    def __init__(self, user_id: str, conn_id: str, redis: redis_lib.Redis, node: str) -> None:
        super().__init__(user_id, conn_id)
        self._redis, self._node = redis, node
        self.leased_when_closed: list[bool] = []

    def close_with(self, code: CloseCode, reason: str | None = None) -> None:
        self.leased_when_closed.append(self._redis.zscore(route_key(self.user_id), self._node) is not None
                                       and self._redis.zscore(NODES_KEY, self._node) is not None)
        super().close_with(code, reason)


@pytest.fixture
async def node(redis_server):
    routes = redis_lib.Redis.from_url(redis_server.url(4))
    routes.flushdb()
    node = PushNode(launcher.free_port(), celery_app=object())
    client = aioredis.Redis.from_url(redis_server.url(4))
    node.leases = Leases(client, node.address, 30)
    node.routes = routes
    yield node
    await client.aclose()
    await node.redis.aclose()
    routes.flushdb()


async def test_a_renewal_closes_the_connections_whose_lease_went_before_writing_it_again(node):
    routes = node.routes
    ann = Watched("ann", "a1", routes, node.address)
    bob = Watched("bob", "b1", routes, node.address)
    cid = Watched("cid", "c1", routes, node.address)
    for conn in (ann, bob, cid):
        node.hub.add(conn)
    await node._renew()  # the node's first: writes its own lease
    await node._write_leases(["ann", "bob", "cid"])
    ann.bound = bob.bound = True  # cid: its token checked again after its lease write, say: left open
    await node._renew()
    assert not any(conn.closes for conn in (ann, bob, cid))

    routes.delete(route_key("ann"), route_key("cid"))  # Redis lost them (an evicted key, a failover...)
    await node._renew()

    assert ann.closes == [("closed", CloseCode.TRY_AGAIN_LATER)] and ann.leased_when_closed == [False]
    assert not bob.closes and not cid.closes
    assert routes.zscore(route_key("ann"), node.address) is None  # its connection closed: written by its next one
    assert routes.zscore(route_key("cid"), node.address) is not None  # written again after the close
    assert routes.zscore(route_key("bob"), node.address) is not None


async def test_the_nodes_own_lease_gone_closes_every_bound_connection_before_it_is_written_again(node):
    routes = node.routes
    ann, bob = Watched("ann", "a1", routes, node.address), Watched("bob", "b1", routes, node.address)
    for conn in (ann, bob):
        node.hub.add(conn)
    await node._renew()
    await node._write_leases(["ann", "bob"])
    ann.bound = bob.bound = True

    routes.flushdb()  # FLUSHDB, or a Redis restarted without persistence
    dan = Connection("dan", "d1")  # a first connection whose lease write comes now
    node.hub.add(dan)
    await node._write_leases(["dan"])  # finds the node's own lease gone

    assert ann.closes == bob.closes == [("closed", CloseCode.TRY_AGAIN_LATER)]
    assert ann.leased_when_closed == bob.leased_when_closed == [False]
    assert not dan.closes
    assert routes.zscore(NODES_KEY, node.address) is not None and routes.zscore(route_key("dan"), node.address) is not None

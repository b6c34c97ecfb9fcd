"""A node that stops (SIGTERM) or dies (SIGKILL): clients reconnect elsewhere and lose nothing."""

from __future__ import annotations

import asyncio
import signal
import time

from tests.integration.conftest import LEASE_TTL
from tests.integration.wsclient import dedup
from wsnode.app import REDIS_MAX_CONNECTIONS
from wsnode.closecodes import CloseCode
from wsnode.registry import NODES_KEY, route_key


async def test_sigterm_closes_clients_with_1001_and_releases_the_node_leases(cluster):
    node = cluster.start_node()
    address = f"127.0.0.1:{node.port}"
    clients = [await cluster.connect(f"sigterm-{i}", node.port) for i in range(3)]
    assert cluster.routes.zscore(route_key("sigterm-0"), address) is not None

    exit_code = await asyncio.to_thread(node.terminate, 15)
    closes = await asyncio.gather(*(c.closed() for c in clients))
    assert {code for code, _ in closes} == {CloseCode.GOING_AWAY}
    assert "reconnect elsewhere" in closes[0][1]
    assert exit_code == 0
    lease = cluster.routes.zscore(NODES_KEY, address)  # ended, or already forgotten by housekeeping
    assert lease is None or lease < time.time(), "the node's own lease still runs"
    assert all(cluster.routes.zscore(route_key(f"sigterm-{i}"), address) is None for i in range(3))


async def test_after_sigkill_the_lease_expires_dispatch_stops_routing_there_and_resume_recovers(cluster):
    node = cluster.start_node()
    client = await cluster.connect("killed-node-user", node.port)
    first = await cluster.collect("killed-node-user", {"n": 0})
    assert (await client.messages(1))[0]["id"] == first

    await asyncio.to_thread(node.kill)
    assert node.returncode == -signal.SIGKILL
    during = [await cluster.collect("killed-node-user", {"n": n}) for n in range(1, 4)]
    await asyncio.sleep(LEASE_TTL + 0.5)
    stranded = cluster.node_queue_length(node.port)
    after = [await cluster.collect("killed-node-user", {"n": n}) for n in range(4, 7)]
    assert cluster.node_queue_length(node.port) == stranded, "Dispatch still routes to a dead node"

    back = await cluster.connect("killed-node-user", cluster.node_ports[0], since=first)
    frames, _ = await back.until("resumed")
    assert [f["id"] for f in dedup(frames) if f["id"] != first and "n" in f["data"]] == during + after
    back.close()


async def test_hundreds_of_browsers_leaving_at_once_release_their_leases_over_a_few_redis_connections(cluster):
    node = cluster.start_node()
    address = f"127.0.0.1:{node.port}"
    users = [f"leaving-{i}" for i in range(150)]
    clients = await asyncio.gather(*(cluster.connect(user, node.port) for user in users))
    assert all(cluster.routes.zscore(route_key(user), address) is not None for user in users)

    for client in clients:
        client.close()
    deadline = time.monotonic() + 10  # the leases themselves run LEASE_TTL, and renew nothing once released
    while left := [user for user in users if cluster.routes.zscore(route_key(user), address) is not None]:
        assert time.monotonic() < deadline, f"{len(left)} leases still held 10 s after their users left"
        await asyncio.sleep(0.2)

    opened = [client for client in cluster.routes.client_list() if client["name"] == f"wsnode:{address}"]
    assert 0 < len(opened) <= REDIS_MAX_CONNECTIONS, f"the node opened {len(opened)} connections to Redis"
    await asyncio.to_thread(node.terminate, 15)

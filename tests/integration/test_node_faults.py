"""A node that stops (SIGTERM) or dies (SIGKILL): clients reconnect elsewhere and lose nothing."""

from __future__ import annotations

import asyncio
import signal
import time

from tests.integration.conftest import LEASE_TTL
from tests.integration.wsclient import dedup
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

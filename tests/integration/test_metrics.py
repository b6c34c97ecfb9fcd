"""``/metrics`` and ``/healthz`` of real push nodes and the real auth service.

Counters of the shared ``cluster`` are cumulative over the session, so the tests compare a scrape
taken before with one taken after.  The health test runs a node of its own (its routing Redis is
stopped and started again), so the shared cluster is never disturbed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import pytest
import redis as redis_lib
from prometheus_client.parser import text_string_to_metric_families

import launcher
import settings
from tests.integration.conftest import ADMIN_KEY, http_call
from tests.integration.wsclient import Client
from wsnode.closecodes import CloseCode
from wsnode.leasekeeper import LEASE_LOST_REASON
from wsnode.registry import NODES_KEY, route_key

Samples = dict[tuple[str, frozenset], float]


def get(url: str) -> tuple[int, bytes]:
    return http_call(url)


def scrape(port: int) -> Samples:
    status, body = get(f"http://127.0.0.1:{port}/metrics")
    assert status == 200, body
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(body.decode()) for s in family.samples}


def value(samples: Samples, name: str, **labels) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def closes(port: int, code: int) -> float:
    """How many bound connections the node on ``port`` closed with ``code``."""
    return value(scrape(port), "push_node_closed_connections_total", code=str(int(code)))


async def test_a_node_counts_the_connection_the_replay_the_delivered_message_its_latency_and_the_batch(cluster):
    port = cluster.node_ports[0]
    before = await asyncio.to_thread(scrape, port)
    client = await cluster.connect("metrics-user", port)
    message_id = await cluster.collect("metrics-user", {"metrics": True})
    (frame,) = await client.messages(1)
    assert frame["id"] == message_id
    after = await asyncio.to_thread(scrape, port)

    assert value(after, "push_node_connections") >= 1
    assert value(after, "push_node_users") >= 1
    assert value(after, "push_node_connects_total") == value(before, "push_node_connects_total") + 1
    assert value(after, "push_node_replays_total", outcome="served") == value(before, "push_node_replays_total", outcome="served") + 1
    assert value(after, "push_node_delivered_messages_total", kind="live") >= value(before, "push_node_delivered_messages_total", kind="live") + 1
    assert value(after, "push_node_delivery_latency_seconds_count") >= value(before, "push_node_delivery_latency_seconds_count") + 1
    assert value(after, "push_node_queue_batches_total") >= value(before, "push_node_queue_batches_total") + 1
    assert value(after, "push_node_ready") == 1
    assert value(after, "push_node_info", node=f"127.0.0.1:{port}") == 1
    client.close()


async def test_a_bad_token_is_closed_with_4401_and_counted_under_4401(cluster):
    port = cluster.node_ports[1]
    before = await asyncio.to_thread(scrape, port)
    client = await Client.connect(cluster.ws_url(port, "not-a-token"), expect_hello=False)
    code, _ = await client.closed()
    assert code == CloseCode.UNAUTHORIZED
    after = await asyncio.to_thread(scrape, port)
    assert value(after, "push_node_rejected_connections_total", code="4401") == value(before, "push_node_rejected_connections_total", code="4401") + 1
    assert value(after, "push_node_connects_total") == value(before, "push_node_connects_total")


async def test_auth_counts_the_tokens_it_issues_and_the_verifications_nodes_ask_for(cluster):
    before = await asyncio.to_thread(scrape, cluster.auth_port)
    client = await cluster.connect("metrics-auth-user", cluster.node_ports[0])  # a fresh token: not in any node's cache
    bad = await Client.connect(cluster.ws_url(cluster.node_ports[0], "still-not-a-token"), expect_hello=False)
    assert (await bad.closed())[0] == CloseCode.UNAUTHORIZED
    after = await asyncio.to_thread(scrape, cluster.auth_port)

    assert value(after, "auth_tokens_issued_total") == value(before, "auth_tokens_issued_total") + 1
    assert value(after, "auth_verifications_total", result="ok") == value(before, "auth_verifications_total", result="ok") + 1
    assert value(after, "auth_verifications_total", result="invalid") == value(before, "auth_verifications_total", result="invalid") + 1
    assert value(after, "auth_request_duration_seconds_count", route="/verify") >= value(before, "auth_request_duration_seconds_count", route="/verify") + 2
    client.close()


async def test_no_log_line_and_no_metrics_page_carries_a_token_or_a_secret(cluster):
    token = await asyncio.to_thread(cluster.token, "metrics-secret-check")
    client = await Client.connect(cluster.ws_url(cluster.node_ports[0], token), wait_resumed=True)
    forged = token[:-4] + ("AAAA" if not token.endswith("AAAA") else "BBBB")  # a bad signature: refused and logged
    bad = await Client.connect(cluster.ws_url(cluster.node_ports[1], forged), expect_hello=False)
    assert (await bad.closed())[0] == CloseCode.UNAUTHORIZED
    client.close()
    await asyncio.sleep(0.5)  # the disconnect is logged, and the log copiers catch up
    secrets = {"token": token, "forged token": forged, "admin key": ADMIN_KEY, "signing secret": settings.AUTH_SECRET}
    for port in (cluster.auth_port, *cluster.node_ports):
        _, body = await asyncio.to_thread(get, f"http://127.0.0.1:{port}/metrics")
        assert not [name for name, secret in secrets.items() if secret.encode() in body], f"/metrics of port {port}"
    logs = list(cluster.logs.glob("*.log"))
    assert {"auth.log", f"node-{cluster.node_ports[0]}.log"} <= {log.name for log in logs}
    for log in logs:
        text = log.read_text(errors="replace")
        assert not [name for name, secret in secrets.items() if secret in text], f"{log.name} logs a secret"



async def test_a_connection_is_logged_once_with_its_user_and_handshake_time_and_other_requests_in_the_access_log(cluster):
    port = cluster.node_ports[0]
    token = await asyncio.to_thread(cluster.token, "log-lines")
    client = await Client.connect(cluster.ws_url(port, token, since="0" * 24), wait_resumed=True)
    assert (await asyncio.to_thread(get, f"http://127.0.0.1:{port}/healthz"))[0] == 200
    client.close()
    await asyncio.sleep(0.5)  # the log copiers catch up
    text = cluster.logs.joinpath(f"node-{port}.log").read_text(errors="replace")
    conn = client.hello["conn"]
    connected = [line for line in text.splitlines() if f"conn={conn} " in line and " connected" in line]
    assert len(connected) == 1, connected
    assert re.search(rf"user=log-lines node=\S+ connected in \d+\.\d ms, since={'0' * 24}$", connected[0]), connected[0]
    assert "200 GET /healthz" in text  # the access log still has what is not an upgrade
    assert "101 GET /ws" not in text  # an upgrade is the connected line's (DEBUG in the access log)


# --- health ----------------------------------------------------------------------------------


class LoneNode(NamedTuple):
    """What :func:`lone_node_of` started."""

    registry: launcher.RedisServer
    auth_port: int
    port: int
    internal_port: int | None
    env: dict[str, str]


@contextlib.contextmanager
def lone_node_of(tmp_path: Path, internal_port: int | None = None) -> Iterator[LoneNode]:
    """One node (``--internal-port internal_port`` when given) with its own routing Redis (which
    the test stops) and its own broker Redis, plus auth; no worker (no replay ever answers, so
    REPLAY_TIMEOUT is long).  Lease renewal runs every 100 s: only the node's PING can notice an
    outage within the test."""
    registry = launcher.RedisServer(data_dir=tmp_path / "registry").start()
    broker = launcher.RedisServer(data_dir=tmp_path / "broker").start()
    auth_port, port = launcher.free_port(), launcher.free_port()
    env = launcher.cluster_env(registry.url(), tmp_path, auth_port, broker_url=broker.url(0), LEASE_TTL=300, REPLAY_TIMEOUT=300, LOG_LEVEL="INFO")
    services = []
    try:
        services.append(launcher.start_auth(env, auth_port, log_path=tmp_path / "auth.log"))
        services.append(launcher.start_node(env, port, log_path=tmp_path / "node.log", internal_port=internal_port))
        yield LoneNode(registry, auth_port, port, internal_port, env)
    except BaseException:
        for service in services:
            print(f"--- {service.name} ---\n{service.log_tail(30)}")
        raise
    finally:
        for service in reversed(services):
            service.terminate(timeout=10)
        broker.stop()
        registry.stop()


@pytest.fixture
def lone_node(tmp_path):
    """:func:`lone_node_of` without an internal port: ``(registry, auth_port, port)``."""
    with lone_node_of(tmp_path) as node:
        yield node.registry, node.auth_port, node.port


def health(port: int) -> tuple[int, dict]:
    status, body = get(f"http://127.0.0.1:{port}/healthz")
    return status, json.loads(body)


async def wait_for(check, what: str, timeout: float = 15.0):
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        result = await asyncio.to_thread(check)
        if result:
            return result
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"not {what} after {timeout:g} s")
        await asyncio.sleep(0.2)


def issue_token(auth_port: int, user: str) -> str:
    request = urllib.request.Request(
        f"http://127.0.0.1:{auth_port}/tokens", data=json.dumps({"user_id": user}).encode(),
        headers={"Authorization": f"Bearer {ADMIN_KEY}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())["token"]


async def test_healthz_is_503_naming_redis_while_redis_is_down_and_200_once_it_is_back(lone_node):
    registry, _, port = lone_node
    assert (await asyncio.to_thread(health, port))[0] == 200

    await asyncio.to_thread(registry.stop)
    status, body = await wait_for(lambda: (r := health(port))[0] == 503 and r, "503 while Redis is down")
    assert body["ready"] is False and body["redis"] is False and body["queue"] is True
    assert "Redis" in body["reason"]
    assert value(await asyncio.to_thread(scrape, port), "push_node_redis_up") == 0

    await asyncio.to_thread(registry.start)
    status, body = await wait_for(lambda: (r := health(port))[0] == 200 and r, "200 once Redis is back")
    assert body["ready"] is True and body["reason"] is None


async def test_a_node_whose_restarted_redis_lost_its_leases_closes_their_connections_as_soon_as_it_answers(lone_node):
    """Redis restarted without its data: Dispatch routed nothing to the node's users meanwhile.  As
    soon as Redis answers a PING the node renews (the next renewal is 100 s away), finds the leases
    gone, closes their connections with 1013 so that they resume with ``since``, and writes its own
    lease again; a connection's lease comes back with its next connection."""
    registry, auth_port, port = lone_node
    token = await asyncio.to_thread(issue_token, auth_port, "lease-back")
    client = await Client.connect(f"ws://127.0.0.1:{port}/ws?token={token}")
    routes = redis_lib.Redis.from_url(registry.url(1))
    assert routes.exists(route_key("lease-back"))

    await asyncio.to_thread(registry.stop)  # not persistent: the lease is gone with it
    await wait_for(lambda: health(port)[0] == 503, "503 while Redis is down")
    await asyncio.to_thread(registry.start)
    code, reason = await client.closed(timeout=15)
    assert (code, reason) == (CloseCode.TRY_AGAIN_LATER, LEASE_LOST_REASON)
    await wait_for(lambda: routes.zscore(NODES_KEY, f"127.0.0.1:{port}"), "the node's own lease written again")
    assert value(await asyncio.to_thread(scrape, port), "push_node_leases_lost_total", lease="user") == 1
    back = await Client.connect(f"ws://127.0.0.1:{port}/ws?token={token}")
    assert routes.exists(route_key("lease-back"))
    routes.close()
    back.close()


# --- the internal port -----------------------------------------------------------------------


async def test_with_an_internal_port_metrics_and_the_whole_healthz_answer_there_and_the_public_healthz_says_only_ready(tmp_path):
    """``--internal-port``: ``/metrics`` and ``/healthz`` with its reasons (which name Redis) answer
    on it; the public port (browsers') answers ``/healthz`` with the same status and only
    ``{"ready": ...}``, and no ``/metrics``, in an outage of Redis too."""
    with lone_node_of(tmp_path, internal_port=launcher.free_port()) as node:
        port, internal = node.port, node.internal_port
        assert await asyncio.to_thread(health, port) == (200, {"ready": True})
        status, body = await asyncio.to_thread(health, internal)
        assert status == 200 and body["ready"] is True and body["node"] == f"127.0.0.1:{port}" and body["redis"] is True
        assert (await asyncio.to_thread(get, f"http://127.0.0.1:{port}/metrics"))[0] == 404
        assert value(await asyncio.to_thread(scrape, internal), "push_node_redis_up") == 1

        await asyncio.to_thread(node.registry.stop)
        await wait_for(lambda: health(internal)[0] == 503, "503 on the internal port while Redis is down")
        assert await asyncio.to_thread(health, port) == (503, {"ready": False})
        status, body = await asyncio.to_thread(health, internal)
        assert status == 503 and "Redis" in body["reason"] and body["redis"] is False
        assert value(await asyncio.to_thread(scrape, internal), "push_node_redis_up") == 0

        await asyncio.to_thread(node.registry.start)
        await wait_for(lambda: health(port) == (200, {"ready": True}), "200 on the public port once Redis is back")
        # Browsers still connect on the public port.
        token = await asyncio.to_thread(issue_token, node.auth_port, "internal-port-user")
        client = await Client.connect(f"ws://127.0.0.1:{port}/ws?token={token}")
        client.close()

        # A second node given the same internal port stops at once, naming the option.
        second = launcher.free_port()
        done = await asyncio.to_thread(
            subprocess.run, [sys.executable, "-m", "wsnode", "--port", str(second), "--internal-port", str(internal)],
            env=node.env, cwd=launcher.REPO_ROOT, capture_output=True, text=True, timeout=60)
        assert done.returncode == 1, done.stderr[-2000:]
        assert f"cannot listen on 127.0.0.1:{internal} (--internal-port)" in done.stderr, done.stderr[-2000:]
        assert "Traceback" not in done.stderr, done.stderr[-2000:]
        routes = redis_lib.Redis.from_url(node.registry.url(1))
        assert routes.zscore(NODES_KEY, f"127.0.0.1:{second}") is None, "the node wrote its lease though it could not listen"
        routes.close()


def test_an_internal_port_that_is_the_public_port_is_refused_before_the_node_starts():
    port = launcher.free_port()
    done = subprocess.run([sys.executable, "-m", "wsnode", "--port", str(port), "--internal-port", str(port)],
                          cwd=launcher.REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stderr[-2000:]
    assert f"--internal-port {port} is --port too" in done.stderr, done.stderr[-2000:]

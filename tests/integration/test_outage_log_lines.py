"""An outage of a backend is logged once per change, with what to do, not once per request or
connection: a 20 s Redis outage with 30 users reconnecting wrote 360 ERROR lines in auth and
1,075 WARNING lines in two nodes (two per refused connect), which buried the lines that said what
was wrong."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.error
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

import launcher
from tests.integration.conftest import ADMIN_KEY, http_call, post_json
from tests.integration.wsclient import Client
from wsnode.closecodes import CloseCode


def http(port: int, path: str, body: dict | None = None, headers: dict | None = None) -> int:
    return http_call(f"http://127.0.0.1:{port}{path}", body, headers)[0]


def lines_at(log: str, level: str) -> list[str]:
    return [line for line in log.splitlines() if f" {level} " in line]


def test_auth_logs_its_redis_outage_once_as_an_error_and_each_refused_request_at_info(tmp_path):
    redis = launcher.RedisServer(data_dir=tmp_path / "redis").start()
    env = launcher.cluster_env(redis.url(0), tmp_path, launcher.free_port(), LOG_LEVEL="INFO")
    port = int(env["AUTH_PORT"])
    auth = launcher.start_auth(env, port, log_path=tmp_path / "auth.log")
    try:
        token_request = urllib.request.Request(f"http://127.0.0.1:{port}/tokens", data=json.dumps({"user_id": "alice"}).encode(),
                                               headers={"Authorization": f"Bearer {ADMIN_KEY}"})
        with urllib.request.urlopen(token_request, timeout=10) as answer:
            token = json.loads(answer.read())["token"]
        assert http(port, "/verify", {"token": "not-a-token"}) == 401
        redis.stop()
        assert [http(port, "/verify", {"token": token}) for _ in range(3)] == [503] * 3
        assert [http(port, "/healthz") for _ in range(2)] == [503] * 2
        auth.wait_log("health check:")
        log = (tmp_path / "auth.log").read_text(errors="replace")
        [error] = lines_at(log, "ERROR")
        assert "auth.app: Redis unavailable:" in error and "check REDIS_URL" in error, error
        assert log.count("cannot verify jti=") == 3
        assert not [line for line in lines_at(log, "WARNING") if "tornado.access" in line], lines_at(log, "WARNING")
        assert "INFO auth tornado.access: 401 POST /verify" in log  # a bad token: an expected event

        redis = launcher.RedisServer(port=redis.port, data_dir=tmp_path / "redis").start()
        assert http(port, "/healthz") == 200
        auth.wait_log("Redis answers again after")
        assert "5 requests failed meanwhile" in auth.log_tail(5)
    finally:
        auth.terminate()
        redis.stop()


def renewals_failed(port: int) -> float:
    """What the node on ``port`` counts as lease renewals that failed (its ``/metrics``)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
        body = answer.read().decode()
    return sum(sample.value for family in text_string_to_metric_families(body) for sample in family.samples
               if sample.name == "push_node_lease_renewal_failures_total")


def test_a_node_logs_its_lease_renewals_redis_outage_once_and_how_many_failed_once_it_is_back(tmp_path):
    """A renewal that fails is retried every LEASE_TTL/3 (10 s by default): each wrote the same
    WARNING for as long as Redis was down, "for 0 users" on an idle node."""
    redis = launcher.RedisServer(data_dir=tmp_path / "redis").start()
    env = launcher.cluster_env(redis.url(0), tmp_path, launcher.free_port(), LOG_LEVEL="INFO", LEASE_TTL=3)  # a renewal every second
    port = launcher.free_port()
    node = launcher.start_node(env, port, log_path=tmp_path / "node.log")
    try:
        redis.stop()
        deadline = time.monotonic() + 30
        while renewals_failed(port) < 4:
            if time.monotonic() > deadline:
                pytest.fail(f"fewer than 4 lease renewals failed within 30 s of Redis stopping:\n{node.log_tail(20)}")
            time.sleep(0.2)
        log = (tmp_path / "node.log").read_text(errors="replace")
        renewal_warnings = [line for line in lines_at(log, "WARNING") if "lease renewal failed for" in line]
        assert len(renewal_warnings) == 1 and "wsnode.app: node=" in renewal_warnings[0], renewal_warnings

        redis = launcher.RedisServer(port=redis.port, data_dir=tmp_path / "redis").start()
        node.wait_log("renewals failed meanwhile", timeout=20)
        failed = renewals_failed(port)
        log = (tmp_path / "node.log").read_text(errors="replace")
        [written] = [line for line in log.splitlines() if "renewals failed meanwhile" in line]
        assert " INFO " in written and "leases written for 0 users after " in written and f"; {failed:.0f} renewals failed meanwhile" in written, written
        assert len([line for line in lines_at(log, "WARNING") if "lease renewal failed for" in line]) == 1
    finally:
        node.terminate()
        redis.stop()


async def test_a_node_logs_auth_down_once_and_each_connect_it_refuses_at_info(cluster, tmp_path):
    auth_port = launcher.free_port()
    node = cluster.start_node(AUTH_URL=f"http://127.0.0.1:{auth_port}")
    token = await asyncio.to_thread(cluster.token, "auth-down-user")
    for _ in range(3):
        refused = await Client.connect(cluster.ws_url(node.port, token), expect_hello=False)
        assert (await refused.closed(15))[0] == CloseCode.TRY_AGAIN_LATER
    deadline = time.monotonic() + 10  # the last refusal's lines may be written after its close frame was read
    while (log := node.log_path.read_text(errors="replace")).count("rejected with 1013") < 3 and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    warnings = lines_at(log, "WARNING")
    assert [line for line in warnings if "auth unavailable" in line] == [next(line for line in warnings if "wsnode.auth: auth unavailable:" in line)], warnings
    assert not [line for line in warnings if "conn=" in line], warnings
    assert log.count("rejected with 1013: backend unavailable") == 3

    auth = launcher.start_auth(cluster.env, auth_port, name="auth-late", log_path=tmp_path / "auth.log")
    try:
        client = await Client.connect(cluster.ws_url(node.port, token))
        assert client.hello["user"] == "auth-down-user"
        client.close()
        node.wait_log("auth answers again at")
        assert "3 token checks failed meanwhile" in node.log_tail(20), node.log_tail(20)
    finally:
        auth.terminate()


async def test_auth_logs_its_redis_outage_once_when_tokens_it_refuses_without_redis_come_between(caplog):
    """A /verify of expired or bad tokens only reads nothing from Redis: it says nothing of Redis.
    It said "Redis answers again" during the outage, and the next request logged the outage's
    ERROR line again: one pair per such request in a reconnect storm of old tokens."""
    import logging

    import redis.asyncio

    from auth.app import AuthService

    secret, admin_key = "outage-test-secret-0123456789-abcdefghijklmnop", "outage-test-admin-key-0123456789"
    client = redis.asyncio.Redis(host="127.0.0.1", port=launcher.free_port(), socket_connect_timeout=1)
    service = AuthService(secret, admin_key, client, token_ttl=3600)
    base = f"http://127.0.0.1:{service.start(0, '127.0.0.1')}"

    async def post(path: str, body: dict, admin: bool = False) -> tuple[int, dict]:
        return await post_json(base + path, body, admin_key if admin else None)

    try:
        status, issued = await post("/tokens", {"user_id": "alice"}, admin=True)
        assert status == 200, issued
        caplog.set_level(logging.INFO, logger="auth.app")
        statuses = []
        for _ in range(3):
            statuses.append((await post("/verify", {"token": issued["token"]}))[0])
            statuses.append((await post("/verify", {"token": "not-a-token"}))[0])
            statuses.append((await post("/verify", {"tokens": ["not-a-token", "nor-this"]}))[0])
        assert statuses == [503, 401, 200] * 3
        errors = [r.getMessage() for r in caplog.records if r.name == "auth.app" and r.levelno >= logging.ERROR]
        assert len(errors) == 1 and errors[0].startswith("Redis unavailable:"), errors
        assert not [r for r in caplog.records if "Redis answers again" in r.getMessage()]
    finally:
        await service.stop()
        await client.aclose()


async def test_auth_logs_its_redis_outage_again_when_what_to_fix_changes(caplog):
    """Redis back within an outage but refusing auth (a changed password or ACL) is logged as an
    ERROR with what to fix; it was in INFO lines only (the outage's one ERROR said it did not answer)."""
    import logging

    import redis.asyncio

    from auth.app import AuthService
    from auth.revocations import RedisRefused, RevocationsUnavailable

    client = redis.asyncio.Redis(host="127.0.0.1", port=launcher.free_port())
    service = AuthService("outage-test-secret-0123456789-abcdefghijklmnop", "outage-test-admin-key-0123456789", client, token_ttl=3600)
    caplog.set_level(logging.INFO, logger="auth.app")
    try:
        for exc in [RevocationsUnavailable("Redis did not answer (ConnectionError)")] * 2 + [RedisRefused("WRONGPASS: fix REDIS_URL's password")] * 3:
            service.redis_failed(exc)
        errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
        assert len(errors) == 2 and "WRONGPASS" in errors[1], errors
        service.redis_answered()
        assert [r.getMessage() for r in caplog.records if r.getMessage().startswith("Redis answers again")][0].endswith("5 requests failed meanwhile")
    finally:
        await client.aclose()

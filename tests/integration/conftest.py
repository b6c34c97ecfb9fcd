"""A real local cluster for the integration tests: Redis, auth, a Celery worker, two push nodes.

Every process is a real one started with ``launcher``; its log goes to ``<DATA_DIR>/logs/`` and
the tail of each is printed when a test fails.  Tests that kill or stop a node start an extra one
(``cluster.start_node()``) so the shared nodes stay up for the other tests.
"""

from __future__ import annotations

import asyncio
import json
import os
import urllib.request
from pathlib import Path

import pytest
import redis as redis_lib
from celery import Celery

import launcher
from tests.conftest import TEST_AUTH_PORT, TEST_DATA_DIR
from tests.integration.wsclient import Client

LEASE_TTL = 3.0
ADMIN_KEY = "dev-admin-key-change-me"


class Cluster:
    def __init__(self, redis_server: launcher.RedisServer, workdir: Path, **extra_env) -> None:
        self.redis_server = redis_server
        self.workdir = workdir
        self.logs = workdir / "logs"
        self.auth_port = TEST_AUTH_PORT
        self.env = launcher.cluster_env(
            redis_server.url(), workdir, self.auth_port,
            broker_url=os.environ["BROKER_URL"], LEASE_TTL=LEASE_TTL, AUTH_CACHE_SECONDS=1, REPLAY_TIMEOUT=10, LOG_LEVEL="INFO", **extra_env,
        )
        self.services: list[launcher.Service] = []
        self.node_ports: list[int] = []
        self.business = Celery(broker=self.env["BROKER_URL"], backend=self.env["REDIS_URL"])
        self.routes = redis_lib.Redis.from_url(self.env["REDIS_URL"], decode_responses=True)
        self.broker_redis = redis_lib.Redis.from_url(self.env["BROKER_URL"])

    # --- processes ----------------------------------------------------------------------------

    def _log(self, name: str) -> Path:
        return self.logs / f"{name}.log"

    def start(self, nodes: int = 2) -> "Cluster":
        self.auth = launcher.start_auth(self.env, self.auth_port, log_path=self._log("auth"))
        self.services.append(self.auth)
        self.worker = self.start_worker()
        for _ in range(nodes):
            self.node_ports.append(self.start_node().port)
        return self

    def start_worker(self, name: str = "worker") -> launcher.Service:
        service = launcher.start_worker(self.env, name=name, log_path=self._log(name))
        self.services.append(service)
        return service

    def start_node(self, port: int | None = None) -> launcher.Service:
        port = port or launcher.free_port()
        service = launcher.start_node(self.env, port, log_path=self._log(f"node-{port}"))
        service.port = port
        self.services.append(service)
        return service

    def stop(self) -> None:
        for service in reversed(self.services):
            service.terminate(timeout=10)

    def log_tails(self, lines: int = 30) -> str:
        return "\n".join(f"--- {s.name} ---\n{s.log_tail(lines)}" for s in self.services)

    # --- what a browser and a business backend do ------------------------------------------------

    def token(self, user: str) -> str:
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.auth_port}/tokens", data=json.dumps({"user_id": user}).encode(),
            headers={"Authorization": f"Bearer {ADMIN_KEY}", "Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read())["token"]

    def revoke(self, body: dict) -> None:
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.auth_port}/revoke", data=json.dumps(body).encode(),
            headers={"Authorization": f"Bearer {ADMIN_KEY}", "Content-Type": "application/json"},
        )
        urllib.request.urlopen(request, timeout=10).close()

    def ws_url(self, port: int, token: str, since: str | None = None) -> str:
        return f"ws://127.0.0.1:{port}/ws?token={token}" + (f"&since={since}" if since else "")

    async def connect(self, user: str, port: int | None = None, since: str | None = None) -> Client:
        token = await asyncio.to_thread(self.token, user)
        return await Client.connect(self.ws_url(port or self.node_ports[0], token, since))

    def send(self, task: str = "tasks.collect", **kwargs):
        """Send by name, as business code that does not import this project does."""
        return self.business.send_task(task, kwargs=kwargs, queue="collect")

    async def collect(self, to, data, timeout: float = 20.0) -> str:
        return await asyncio.to_thread(self.send(to=to, data=data).get, timeout=timeout)

    async def collect_many(self, messages: list[dict], timeout: float = 30.0) -> list:
        return await asyncio.to_thread(self.send("tasks.collect_many", messages=messages).get, timeout=timeout)

    def node_queue_length(self, port: int) -> int:
        return self.broker_redis.llen(f"127.0.0.1:{port}")


@pytest.fixture(scope="session")
def cluster(redis_server):
    cluster = Cluster(redis_server, Path(TEST_DATA_DIR))
    try:
        cluster.start()
    except BaseException:
        print(cluster.log_tails())
        cluster.stop()
        raise
    yield cluster
    cluster.stop()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    cluster = item.funcargs.get("cluster") if hasattr(item, "funcargs") else None
    if report.failed and cluster is not None:
        report.sections.append(("process logs", cluster.log_tails()))

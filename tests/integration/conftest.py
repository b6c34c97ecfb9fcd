"""A real local cluster for the integration tests: Redis, auth, a Celery worker, two push nodes.

Every process is a real one started with ``launcher``; its log goes to ``<DATA_DIR>/logs/`` and
the tail of each is printed when a test fails.  Tests that kill or stop a node start an extra one
(``cluster.start_node()``) so the shared nodes stay up for the other tests.

The ``cluster`` fixture runs every test that uses it twice: with Redis as the Celery broker and
with RabbitMQ (in a private vhost made for the session with ``rabbitmqctl``).  Where no RabbitMQ
can be reached, the RabbitMQ half is skipped and says why.  ``.ci/run`` starts RabbitMQ when it
is installed but stopped.  ``TEST_AMQP_URL`` points the tests at another RabbitMQ server (its
vhost is then used as it is, so the tests run in one process: ``-n 0``).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import os
import shutil
import sqlite3
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis as redis_lib
from celery import Celery
from celery.exceptions import TimeoutError as ResultTimeout
from kombu import Connection, Exchange, Queue

import launcher
from tests.conftest import TEST_AUTH_PORT, TEST_DATA_DIR
from tests.integration.wsclient import Client

AMQP_BASE = os.environ.get("TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672")
LEASE_TTL = 3.0
REDELIVER_AFTER = 4.0
REDELIVER_ATTEMPTS = 2
HOUSEKEEPING_SECONDS = 1.0
ADMIN_KEY = "dev-admin-key-change-me"
#: Seconds a connection on an expired token stays open (production: 25): short, for the expiry tests;
#: every other test's tokens live an hour.
TOKEN_EXPIRY_GRACE = 1


def business_app(broker_url: str, backend_url: str | None = None) -> Celery:
    """The Celery app of a test's business process, which sends by name and reads results from
    ``backend_url``; its waits on the result backend are bounded, so that a test whose Redis is
    gone fails instead of hanging (Celery's defaults: no socket timeout, 20 reconnection attempts a
    second apart).  Pass it to :func:`release_results` before its result backend stops."""
    app = Celery(broker=broker_url, backend=backend_url)
    app.conf.update(redis_socket_timeout=10, redis_socket_connect_timeout=5,
                    result_backend_transport_options={"retry_policy": {"max_retries": 3, "interval_start": 0, "interval_step": 0.5, "interval_max": 1}})
    return app


#: Seconds each ``.get()`` of :func:`get_result` waits before the result is read again.
RESULT_REREAD_SECONDS = 2.0


def get_result(async_result, timeout: float, reread: float = RESULT_REREAD_SECONDS):
    """``async_result.get()`` until ``timeout`` has passed, asked again every ``reread`` seconds.
    Each ``get()`` reads the stored result first, then waits for its notice on the app's pub/sub
    connection to the result backend.  After a Redis restart, Celery's result consumer reconnects:
    it reads the stored results, then subscribes again, and never hears of a result published in
    between, so one ``get()`` waited its whole timeout for a result that was stored (the README
    says so to business code, beside "Pass a ``timeout`` to every ``.get()``")."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return async_result.get(timeout=max(0.01, min(reread, deadline - time.monotonic())))
        except ResultTimeout:
            if time.monotonic() >= deadline:
                raise


class LoneWorker:
    """What :func:`lone_worker` started: ``env``, the ``worker`` (a test that stops it itself sets it
    to None) and the ``business`` app."""

    def __init__(self, env: dict[str, str], worker: launcher.Service, business: Celery) -> None:
        self.env, self.worker, self.business = env, worker, business


@contextlib.contextmanager
def lone_worker(tmp_path: Path, queues: str, broker: str = "redis", **env_extra: object) -> Iterator[LoneWorker]:
    """A private Redis, one worker with one pool process on ``queues`` (its log in
    ``tmp_path / "worker.log"``) and a business app; all stopped on the way out.  ``broker``
    ``"amqp"``: a private vhost on the local RabbitMQ is the broker (:class:`RabbitVhost`, skipped
    where none can be had), removed on the way out; else the private Redis's database 0."""
    vhost = RabbitVhost().create() if broker == "amqp" else None
    redis_server = worker = business = None
    started = None
    try:
        redis_server = launcher.RedisServer(data_dir=tmp_path / "redis").start()
        env = launcher.cluster_env(redis_server.url(), tmp_path / "data", launcher.free_port(),
                                   broker_url=vhost.url if vhost is not None else None, **env_extra)
        worker = launcher.start_worker(env, queues=queues, concurrency=1, log_path=tmp_path / "worker.log")
        business = business_app(env["BROKER_URL"], env["REDIS_URL"])
        started = LoneWorker(env, worker, business)
        yield started
    finally:
        if business is not None:
            release_results(business)
            business.close()
        worker = started.worker if started is not None else worker
        if worker is not None:
            worker.terminate(timeout=30)
        if redis_server is not None:
            redis_server.stop()
        if vhost is not None:
            vhost.delete()


@contextlib.contextmanager
def private_business_app(tmp_path: Path) -> Iterator[tuple[launcher.RedisServer, Celery]]:
    """A private Redis, and a business app (:func:`business_app`) with its database 0 as the broker
    and 1 as the result backend; the app released (:func:`release_results`) and the Redis stopped on
    the way out."""
    server = launcher.RedisServer(data_dir=tmp_path / "redis").start()
    app = None
    try:
        app = business_app(server.url(0), server.url(1))
        yield server, app
    finally:
        if app is not None:
            release_results(app)
        server.stop()


def release_results(app: Celery) -> None:
    """Finalise ``app``'s results and drop its pub/sub connection to the result backend, while that
    Redis still runs.  An ``AsyncResult`` whose ``.get()`` raised lives as long as the app (the
    backend caches the exception, whose traceback holds the result), and the app as long as it is
    Celery's current one: until a later test makes another.  Collected after its Redis stopped,
    Celery 5.6's ``AsyncResult.__del__`` unsubscribes and reconnects, with Celery's defaults 20
    times a second apart, inside whatever test the garbage collector then runs in: a 19 s stall at
    a random point, and an "Exception ignored in AsyncResult.__del__" warning."""
    gc.collect()
    consumer = getattr(app.backend, "result_consumer", None)
    if consumer is not None and getattr(consumer, "_pubsub", None) is not None:
        consumer.stop()
        consumer._pubsub = None


class Cluster:
    def __init__(self, redis_server: launcher.RedisServer, workdir: Path, broker_url: str | None = None, auth_port: int | None = None, **extra_env) -> None:
        self.redis_server = redis_server
        self.workdir = workdir
        self.logs = workdir / "logs"
        self.auth_port = auth_port or TEST_AUTH_PORT
        self.env = launcher.cluster_env(
            redis_server.url(), workdir, self.auth_port,
            broker_url=broker_url or redis_server.url(0), **{
                "LEASE_TTL": LEASE_TTL, "AUTH_CACHE_SECONDS": 1, "REPLAY_TIMEOUT": 10, "LOG_LEVEL": "INFO",
                "REDELIVER_AFTER": REDELIVER_AFTER, "REDELIVER_ATTEMPTS": REDELIVER_ATTEMPTS, "HOUSEKEEPING_SECONDS": HOUSEKEEPING_SECONDS,
                "REDELIVER_SWEEP_SECONDS": 2, "RECEIPT_FLUSH_SECONDS": 0.2, "TOKEN_EXPIRY_GRACE": TOKEN_EXPIRY_GRACE, **extra_env},
        )
        self.services: list[launcher.Service] = []
        self.node_ports: list[int] = []
        self.business = business_app(self.env["BROKER_URL"], self.env["REDIS_URL"])
        self._results_lock = threading.Lock()
        self.routes = redis_lib.Redis.from_url(self.env["REDIS_URL"], decode_responses=True)

    # --- processes ----------------------------------------------------------------------------

    def _log(self, name: str) -> Path:
        return self.logs / f"{name}.log"

    def start(self, nodes: int = 2, **worker_kw) -> "Cluster":
        """Auth, a worker (``worker_kw``: ``launcher.start_worker``'s options) and ``nodes`` nodes."""
        self.auth = launcher.start_auth(self.env, self.auth_port, log_path=self._log("auth"))
        self.services.append(self.auth)
        self.worker = self.start_worker(**worker_kw)
        for _ in range(nodes):
            self.node_ports.append(self.start_node().port)
        return self

    def start_worker(self, name: str = "worker", **worker_kw) -> launcher.Service:
        service = launcher.start_worker(self.env, name=name, log_path=self._log(name), **worker_kw)
        self.services.append(service)
        return service

    def start_node(self, port: int | None = None, **env) -> launcher.Service:
        """One more node of this cluster; ``env`` overrides its settings (e.g. ``PING_INTERVAL=2``)."""
        port = port or launcher.free_port()
        service = launcher.start_node({**self.env, **{key: str(value) for key, value in env.items()}}, port, log_path=self._log(f"node-{port}"))
        service.port = port
        self.services.append(service)
        return service

    def stop(self, at_once: bool = False) -> None:
        """Stop every process: gracefully (SIGTERM, as an operator stops them), or ``at_once``
        (SIGKILL) for a private cluster whose Redis and broker are thrown away with it (a graceful
        stop of its worker and nodes took 4-7 s of each fault test's teardown)."""
        release_results(self.business)
        for service in reversed(self.services):
            if at_once:
                service.kill()
            else:
                service.terminate(timeout=10)

    def log_tails(self, lines: int = 30) -> str:
        return "\n".join(f"--- {s.name} ---\n{s.log_tail(lines)}" for s in self.services)

    # --- what a browser and a business backend do ------------------------------------------------

    def token(self, user: str, ttl: int | None = None) -> str:
        """A token for ``user`` from auth, living ``TOKEN_TTL`` or ``ttl`` seconds."""
        body = {"user_id": user} if ttl is None else {"user_id": user, "ttl": ttl}
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.auth_port}/tokens", data=json.dumps(body).encode(),
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

    async def connect(self, user: str, port: int | None = None, since: str | None = None, auto_ack: bool = True) -> Client:
        """A connected client; without ``since`` it has also read its inbox replay (``client.inbox``)."""
        token = await asyncio.to_thread(self.token, user)
        return await Client.connect(self.ws_url(port or self.node_ports[0], token, since), auto_ack=auto_ack, wait_resumed=since is None)

    def send(self, task: str = "tasks.collect", **kwargs):
        """Send by name, as business code that does not import this project does."""
        return self.business.send_task(task, kwargs=kwargs, queue="collect")

    async def collect(self, to, data, timeout: float = 20.0) -> str:
        return await self.result(self.send(to=to, data=data), timeout)

    async def collect_many(self, messages: list[dict], timeout: float = 30.0) -> list:
        return await self.result(self.send("tasks.collect_many", messages=messages), timeout)

    async def result(self, async_result, timeout: float):
        """:func:`get_result` on a thread, one thread at a time: Celery's Redis result consumer
        (one pub/sub connection per app) is not thread-safe."""
        def get():
            with self._results_lock:
                return get_result(async_result, timeout)

        return await asyncio.to_thread(get)

    def node_queue_length(self, port: int) -> int:
        """Messages waiting on a node's queue, on either broker (0 when the queue does not exist)."""
        with Connection(self.env["BROKER_URL"]) as conn:
            try:
                return conn.default_channel.queue_declare(queue=f"127.0.0.1:{port}", passive=True).message_count
            except conn.channel_errors:
                return 0

    def take_task_ids(self, name: str) -> list[str]:
        """Takes every message off a Celery queue (``collect``, ``dispatch``), on either broker, and
        returns their task ids, oldest first: for tests that look at what is left once the worker stopped."""
        with Connection(self.env["BROKER_URL"]) as conn:
            queue = Queue(name, Exchange(name, type="direct"), routing_key=name)(conn.default_channel)
            ids = []
            while (message := queue.get(no_ack=True)) is not None:
                ids.append(message.headers.get("id"))
            return ids

    def status(self, message_id: str) -> dict:
        return get_result(self.business.send_task("tasks.status", args=[message_id], queue="dispatch"), 20)

    @contextlib.contextmanager
    def store_locked(self) -> Iterator[None]:
        """The embedded store unavailable to the worker while the block runs, as a full disk or a
        long write would make it: its messages file locked by this process (``BEGIN EXCLUSIVE``)."""
        blocker = sqlite3.connect(self.workdir / "mongo" / "push" / "messages", isolation_level=None)
        blocker.execute("BEGIN EXCLUSIVE")
        try:
            yield
        finally:
            blocker.execute("ROLLBACK")
            blocker.close()


class RabbitVhost:
    """A private vhost on the local RabbitMQ for one cluster (``launcher.RabbitVhost``), removed
    afterwards; or the vhost of ``TEST_AMQP_URL`` as it is.  Skips when RabbitMQ cannot be had."""

    def __init__(self) -> None:
        base = urllib.parse.urlsplit(AMQP_BASE)
        self.own = base.path in ("", "/") and "TEST_AMQP_URL" not in os.environ
        self.vhost = launcher.RabbitVhost(AMQP_BASE, "push-test") if self.own else None
        self.url = self.vhost.url if self.vhost else AMQP_BASE

    def create(self) -> "RabbitVhost":
        try:
            with Connection(f"{AMQP_BASE.rstrip('/')}//" if self.own else AMQP_BASE, connect_timeout=3) as conn:
                conn.ensure_connection(max_retries=1)
        except Exception as exc:  # noqa: BLE001 - any failure means: no RabbitMQ here
            pytest.skip(f"RabbitMQ not reachable at {AMQP_BASE} ({exc}): start it (rabbitmq-server -detached; .ci/run does) or set TEST_AMQP_URL")
        if self.vhost:
            if shutil.which("rabbitmqctl") is None:
                pytest.skip("rabbitmqctl not found: cannot make a private vhost; set TEST_AMQP_URL to a vhost of your own")
            self.vhost.create()
        return self

    def delete(self) -> None:
        if self.vhost:
            self.vhost.delete()


def broker_url_for(kind: str, redis_server: launcher.RedisServer, request) -> str:
    """The broker URL of a ``kind`` ("redis" or "amqp") cluster; an amqp vhost is removed at teardown."""
    if kind == "redis":
        return redis_server.url(0)
    vhost = RabbitVhost().create()
    request.addfinalizer(vhost.delete)
    return vhost.url


def http_call(url: str, body=None, headers: dict | None = None, method: str | None = None, timeout: float = 10) -> tuple[int, bytes]:
    """A blocking HTTP request to ``url``: ``(status, body)``, an HTTP error's included.  ``body``:
    bytes as they are, anything else as JSON (GET when None, unless ``method`` says).  An error's
    response is closed here: left to the garbage collector, its close raised inside a later test."""
    data = body if body is None or isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method, headers=dict(headers or {}))
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.read()


def http_json(url: str, body=None, headers: dict | None = None, timeout: float = 10) -> tuple[int, dict]:
    """:func:`http_call` of an answer in JSON: ``(status, decoded body)``."""
    status, answer = http_call(url, body, headers, timeout=timeout)
    return status, json.loads(answer)


async def post_json(url: str, body: dict, bearer: str | None = None) -> tuple[int, dict]:
    """POST ``body`` as JSON to ``url`` (with ``Authorization: Bearer bearer`` when given) on the
    running loop: ``(status, decoded JSON reply)``, an HTTP error's included."""
    from tornado.httpclient import AsyncHTTPClient, HTTPClientError

    headers = {"Authorization": f"Bearer {bearer}"} if bearer else {}
    try:
        response = await AsyncHTTPClient().fetch(url, method="POST", body=json.dumps(body), headers=headers)
    except HTTPClientError as exc:
        return exc.code, json.loads(exc.response.body)
    return response.code, json.loads(response.body)


def start_or_explain(cluster: Cluster, **kwargs) -> Cluster:
    try:
        return cluster.start(**kwargs)
    except BaseException:
        print(cluster.log_tails())
        cluster.stop()
        raise


@pytest.fixture(scope="session", params=["redis", "amqp"])
def cluster(request, redis_server):
    cluster = Cluster(redis_server, Path(TEST_DATA_DIR), broker_url=broker_url_for(request.param, redis_server, request))
    cluster.broker = request.param
    start_or_explain(cluster)
    yield cluster
    cluster.stop()


@pytest.fixture(params=["redis", "amqp"])
def fault_cluster(request, tmp_path):
    """A private cluster for one fault test: its own persistent Redis (which the test may restart),
    worker, auth and two nodes, on the broker the parameter names."""
    redis_server = launcher.RedisServer(persistent=True, data_dir=tmp_path / "redis").start()
    request.addfinalizer(redis_server.stop)
    cluster = Cluster(redis_server, tmp_path, broker_url=broker_url_for(request.param, redis_server, request), auth_port=launcher.free_port(), VISIBILITY_TIMEOUT=8)
    cluster.broker = request.param
    start_or_explain(cluster)
    yield cluster
    cluster.stop(at_once=True)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        # The shared or fault cluster, else a test file's private one (``held_cluster``,
        # ``poisoned_cluster``...), alone or first in the tuple its fixture yields.  Told by its
        # method, not its class: test files import this module as ``tests.integration.conftest``,
        # a second copy beside the one pytest loads.
        def is_cluster(value) -> bool:
            return callable(getattr(value, "log_tails", None))

        funcargs = getattr(item, "funcargs", {})
        values = [funcargs.get("cluster"), funcargs.get("fault_cluster"), *funcargs.values()]
        cluster = next((value for value in values if is_cluster(value)), None) or next(
            (value[0] for value in values if isinstance(value, tuple) and value and is_cluster(value[0])), None)
        if cluster is not None:
            report.sections.append(("process logs", cluster.log_tails()))


def rabbit_counts(broker_url: str, queue: str) -> tuple[int, int]:
    """What RabbitMQ holds of ``queue`` in the vhost of ``broker_url``: its ready and its
    unacknowledged messages (``rabbitmqctl list_queues``; RabbitMQ lists no message by id)."""
    vhost = urllib.parse.unquote(urllib.parse.urlsplit(broker_url).path.lstrip("/"))
    out = subprocess.run(["rabbitmqctl", "-q", "list_queues", "-p", vhost, "name", "messages_ready", "messages_unacknowledged"],
                         check=True, capture_output=True, text=True, timeout=60).stdout
    for line in out.splitlines():
        fields = line.split()
        if len(fields) == 3 and fields[0] == queue:
            return int(fields[1]), int(fields[2])
    return 0, 0


class BrokerHolds:
    """What the broker at ``broker_url`` holds of a task sent to ``queue``: held unacknowledged by
    a worker, or waiting on the queue.  On Redis by the task's id (kombu's ``unacked`` hash, the
    queue's list); on RabbitMQ, which lists no message by id, by the queue's counts
    (:func:`rabbit_counts`): the callers' task is the only message there when they ask."""

    def __init__(self, broker_url: str, queue: str) -> None:
        self.url, self.queue = broker_url, queue
        self.redis = redis_lib.Redis.from_url(broker_url, socket_timeout=5) if broker_url.startswith(("redis://", "rediss://")) else None

    def unacked(self, task_id: str) -> bool:
        if self.redis is None:
            return rabbit_counts(self.url, self.queue)[1] > 0
        return task_id in unacked_task_ids(self.redis)

    def queued(self, task_id: str) -> bool:
        if self.redis is None:
            return rabbit_counts(self.url, self.queue)[0] > 0
        return task_id in {json.loads(raw)["headers"].get("id") for raw in self.redis.lrange(self.queue, 0, -1)}

    def holds(self, task_id: str) -> bool:
        """Queued or unacknowledged (one look at RabbitMQ's counts)."""
        if self.redis is None:
            return sum(rabbit_counts(self.url, self.queue)) > 0
        return self.unacked(task_id) or self.queued(task_id)


def unacked_task_ids(broker: redis_lib.Redis) -> set[str]:
    """The task ids of what a worker holds unacknowledged on the Redis broker (kombu's
    ``unacked`` hash: what the broker gives back if the worker stops)."""
    return {json.loads(raw)[0]["headers"].get("id") for raw in broker.hvals("unacked")}

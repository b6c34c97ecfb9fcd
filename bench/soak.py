#!/usr/bin/env python
"""Soak run: a private cluster under a churning workload for a long time, sampled for unbounded growth.

One command (run from anywhere; the repository root is found from this file)::

    python bench/soak.py [--minutes 15] [--every 30] [--users 200] [--ghosts 100] [--rate 100]
                         [--session 15,120] [--offline 1,15] [--no-restarts] [--json out.json] [--keep]

Not a test: it asserts nothing, it measures.  It starts a private cluster with ``launcher`` (its own
redis-server on a free port, auth, one Celery worker with its default concurrency, two push nodes on
free ports, a temporary ``DATA_DIR``, short ``RETENTION_SECONDS`` and ``REDELIVER_AFTER`` so that
retention and redelivery cycle within the run), then for ``--minutes``:

- one **client process** (asyncio, the ``websockets`` package) holds ``--users`` users whose
  connections come and go (sessions of 15-120 s, a few seconds offline between them), each with a
  profile: most reconnect with ``since=<last id>`` and some without, a fifth never ack, a few hold
  two connections, a few now and then send a garbage frame (closed 4500) or try a bad token (4401);
  tokens live 60-120 s (``POST /tokens`` ``ttl``): most users send a ``refresh`` frame before theirs
  expires, the others are closed with 4401 ``token expired``; every 20 seconds a
  user (or one token) is revoked (``POST /revoke``);
- one **sender process** (business code, by task name, no project import) sends about ``--rate``
  messages a second: ``tasks.collect`` to one user (online or one of ``--ghosts`` users who never
  connect), to a list of users, with a ``key`` now and then, ``tasks.collect_many``, a broadcast
  (``"*"``) every minute, and ``tasks.status`` / ``tasks.presence`` (waited for) every few seconds;
- once during the first half: node B is restarted (SIGTERM, started again on its port), and the
  worker is restarted (SIGTERM, started again).

Every ``--every`` seconds it samples: RSS, open file descriptors and threads of each process (redis,
auth, worker main and each pool process, each node); Redis ``used_memory``, ``DBSIZE`` of databases 0
(broker) and 1 (``REDIS_URL``), key counts per key pattern (ids, users, ports replaced by ``*``) with
the summed and largest length of the keys of each pattern; the sizes of the embedded store's files;
the nodes' ``/metrics`` connection and user gauges; the clients' own counts.

At the end (and on Ctrl-C) it stops everything it started, then prints a table per sampled quantity:
its first value, the value at half time, the last one, its slope over the second half of the run
(least squares, per minute: after warm-up and after the restarts) and ``GROWS`` where that slope adds
more than 10% over the second half while the workload is steady (connections and users are bounded
by the workload; what grows with the time elapsed, or with the connections or messages ever seen,
is suspect).  ``--json`` writes every sample.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import importlib.util
import json
import multiprocessing
import os
import random
import re
import shutil
import signal
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
for _p in (str(REPO_ROOT), str(REPO_ROOT / "bench")):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import common  # noqa: E402 - after the path set-up
from common import Cleanup, interrupt_on_signals  # noqa: E402

#: What the client process imports that the project's requirements.txt does not install (bench/requirements.txt does).
CLIENT_MODULE = "websockets"

ADMIN_KEY = os.environ.get("AUTH_ADMIN_KEY") or "dev-admin-key-change-me"
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback only, never a proxy

#: The cluster's settings for the soak: retention, redelivery and token expiry cycle within minutes.
SOAK_ENV = {
    "RETENTION_SECONDS": 300,
    "REDELIVER_AFTER": 5,
    "REDELIVER_ATTEMPTS": 5,
    "REDELIVER_SWEEP_SECONDS": 60,
    "TOKEN_EXPIRY_GRACE": 10,
    "AUTH_CACHE_SECONDS": 5,
}


# =============================================================================================
# HTTP to auth (blocking; the client process calls it on a thread pool)
# =============================================================================================

def _post(url: str, body: dict, admin: bool = True, timeout: float = 10.0) -> tuple[int, dict]:
    data = json.dumps(body).encode()
    headers = {"Content-Type": "application/json"}
    if admin:
        headers["Authorization"] = f"Bearer {ADMIN_KEY}"
    request = urllib.request.Request(url, data=data, headers=headers, method="POST")
    try:
        with _OPENER.open(request, timeout=timeout) as response:
            return response.status, json.loads(response.read() or b"{}")
    except urllib.error.HTTPError as exc:
        with exc:  # closes the response: left to the garbage collector, its close raised
            return exc.code, {}


def issue(auth_port: int, user: str, ttl: int) -> str:
    status, body = _post(f"http://127.0.0.1:{auth_port}/tokens", {"user_id": user, "ttl": ttl})
    if status != 200:
        raise RuntimeError(f"POST /tokens for {user}: {status}")
    return body["token"]


# =============================================================================================
# Client process: churning WebSocket users
# =============================================================================================

class Counts:
    """What the client process saw; written to a JSON file for the orchestrator.  Loop thread only."""

    def __init__(self) -> None:
        self.c: dict[str, int] = {}
        self.open = 0
        self.users_online: dict[str, int] = {}

    def add(self, name: str, n: int = 1) -> None:
        self.c[name] = self.c.get(name, 0) + n

    def snapshot(self) -> dict:
        return {"open": self.open, "users_online": sum(1 for v in self.users_online.values() if v > 0), **self.c}


def clients_main(stats_path: str, stop, auth_port: int, ports: list[int], users: int, seed: str,
                 session: tuple[float, float] = (15, 120), offline: tuple[float, float] = (1, 15)) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the orchestrator decides when we stop
    asyncio.run(_clients(stats_path, stop, auth_port, ports, users, seed, session, offline))


async def _clients(stats_path: str, stop, auth_port: int, ports: list[int], n_users: int, seed: str,
                   session_s: tuple[float, float], offline_s: tuple[float, float]) -> None:
    from concurrent.futures import ThreadPoolExecutor

    from websockets.asyncio.client import connect
    from websockets.exceptions import ConnectionClosed, InvalidStatus

    loop = asyncio.get_running_loop()
    http = ThreadPoolExecutor(8)
    counts = Counts()
    rng = random.Random(seed)
    stopping = asyncio.Event()
    current_tokens: dict[str, str] = {}

    async def token(user: str) -> str:
        tok = await loop.run_in_executor(http, issue, auth_port, user, rng.randint(60, 120))
        counts.add("tokens issued")
        current_tokens[user] = tok
        return tok

    async def sleep(seconds: float) -> bool:
        """Sleep, or return True early when the run stops."""
        try:
            await asyncio.wait_for(stopping.wait(), seconds)
            return True
        except asyncio.TimeoutError:
            return False

    def closed_code(exc: BaseException) -> str:
        rcvd = getattr(exc, "rcvd", None)
        return str(rcvd.code) if rcvd is not None else "1006"

    async def session(user: str, profile: dict, state: dict, primary: bool) -> None:
        port = rng.choice(ports)
        since = state.get("last") if primary and profile["resume"] else None
        tok = state["token"]
        url = f"ws://127.0.0.1:{port}/ws?token={tok}" + (f"&since={since}" if since else "")
        length = rng.uniform(*session_s)
        try:
            ws = await connect(url, open_timeout=15, ping_interval=None, max_size=None, close_timeout=5)
        except InvalidStatus as exc:
            counts.add(f"handshake {exc.response.status_code}")
            return
        except (OSError, asyncio.TimeoutError) as exc:
            counts.add(f"connect failed ({type(exc).__name__})")
            return
        counts.add("connections" + (" with since" if since else ""))
        counts.open += 1
        counts.users_online[user] = counts.users_online.get(user, 0) + 1
        end = loop.time() + length
        refresh_at = None
        refreshing = False
        try:
            while True:
                left = end - loop.time()
                if left <= 0 or stopping.is_set():
                    await ws.close()
                    counts.add("closed by client")
                    return
                if refresh_at is not None and loop.time() >= refresh_at and not refreshing:
                    refreshing = True
                    refresh_at = None
                    new = await token(user)
                    await ws.send(json.dumps({"type": "refresh", "token": new}))
                    counts.add("refresh sent")
                if profile["garbage"] and rng.random() < 0.01:
                    await ws.send("this is not JSON")
                    counts.add("garbage sent")
                if profile["pings"] and rng.random() < 0.05:
                    await ws.send('{"type":"ping"}')
                wait = min(left, 1.0) if refresh_at is None else max(0.05, min(left, 1.0, refresh_at - loop.time()))
                try:
                    raw = await asyncio.wait_for(ws.recv(), wait)
                except asyncio.TimeoutError:
                    continue
                frame = json.loads(raw)
                kind = frame.get("type")
                if kind == "message":
                    counts.add("messages")
                    mid = frame["id"]
                    if primary and (state.get("last") is None or mid > state["last"]):
                        state["last"] = mid
                    if profile["acks"] == "all" or (profile["acks"] == "half" and rng.random() < 0.5):
                        await ws.send('{"type":"ack","id":"%s"}' % mid)
                        counts.add("acks")
                elif kind == "hello":
                    if profile["refresh"]:
                        refresh_at = loop.time() + max(1.0, frame.get("expires_in", 60) - rng.uniform(5, 20))
                elif kind == "refreshed":
                    refreshing = False
                    counts.add("refreshed")
                    if profile["refresh"]:
                        refresh_at = loop.time() + max(1.0, frame.get("expires_in", 60) - rng.uniform(5, 20))
                elif kind == "resumed":
                    counts.add("resumed")
                    if primary and state.get("last") is None and frame.get("cursor"):
                        state["last"] = frame["cursor"]
                elif kind == "refresh_error":
                    refreshing = False
                    counts.add("refresh_error")
                    refresh_at = loop.time() + 2
                elif kind == "pong":
                    counts.add("pongs")
                else:
                    counts.add(f"frame {kind}")
        except ConnectionClosed as exc:
            counts.add(f"closed {closed_code(exc)}")
            if closed_code(exc) == "4401":
                state["token"] = None
        except (OSError, asyncio.TimeoutError) as exc:
            counts.add(f"error {type(exc).__name__}")
        finally:
            counts.open -= 1
            counts.users_online[user] -= 1
            try:
                await asyncio.wait_for(ws.close(), 5)
            except Exception:  # noqa: BLE001
                pass

    async def bad_token(user: str) -> None:
        port = rng.choice(ports)
        try:
            async with connect(f"ws://127.0.0.1:{port}/ws?token=not-a-token-{user}", open_timeout=15, ping_interval=None) as ws:
                await asyncio.wait_for(ws.recv(), 10)
        except ConnectionClosed as exc:
            counts.add(f"bad token closed {closed_code(exc)}")
        except Exception as exc:  # noqa: BLE001
            counts.add(f"bad token {type(exc).__name__}")

    async def user_loop(i: int) -> None:
        user = f"soak-u{i:04d}"
        r = random.Random(f"{seed}:{i}")
        profile = {
            "resume": r.random() < 0.7,
            "acks": "never" if r.random() < 0.2 else ("half" if r.random() < 0.15 else "all"),
            "dual": r.random() < 0.06,
            "garbage": r.random() < 0.05,
            "refresh": r.random() < 0.7,
            "pings": r.random() < 0.3,
        }
        state: dict = {"last": None, "token": None}
        if await sleep(r.uniform(0, 20)):  # spread the first connections
            return
        while not stopping.is_set():
            try:
                if profile["garbage"] and r.random() < 0.2:
                    await bad_token(user)
                if state["token"] is None or r.random() < 0.5:
                    state["token"] = await token(user)
                sessions = [session(user, profile, state, True)]
                if profile["dual"]:
                    sessions.append(session(user, profile, state, False))
                await asyncio.gather(*sessions)
            except Exception as exc:  # noqa: BLE001 - counted, the user goes on
                counts.add(f"user error {type(exc).__name__}")
            if await sleep(r.uniform(*offline_s)):
                return

    async def revoker() -> None:
        r = random.Random(f"{seed}:revoke")
        while not await sleep(20):
            user = f"soak-u{r.randrange(n_users):04d}"
            if r.random() < 0.5 or user not in current_tokens:
                body = {"user_id": user}
            else:
                body = {"token": current_tokens[user]}
            status, _ = await loop.run_in_executor(http, lambda: _post(f"http://127.0.0.1:{auth_port}/revoke", body))
            counts.add(f"revoke {'user' if 'user_id' in body else 'token'} {status}")

    async def reporter() -> None:
        while True:
            tmp = stats_path + ".tmp"
            with open(tmp, "w") as out:
                json.dump(counts.snapshot(), out)
            os.replace(tmp, stats_path)
            if stop.is_set():
                stopping.set()
            if stopping.is_set():
                return
            await asyncio.sleep(1)

    tasks = [asyncio.ensure_future(user_loop(i)) for i in range(n_users)]
    tasks.append(asyncio.ensure_future(revoker()))
    await reporter()
    await asyncio.wait(tasks, timeout=20)
    with open(stats_path, "w") as out:
        json.dump(counts.snapshot(), out)
    http.shutdown(wait=False, cancel_futures=True)


# =============================================================================================
# Sender process: the business code, by task name
# =============================================================================================

def sender_main(stats_path: str, stop, broker_url: str, backend_url: str, users: int, ghosts: int, rate: float, seed: str) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    from celery import Celery

    app = Celery(broker=broker_url, backend=backend_url)
    rng = random.Random(f"{seed}:sender")
    online = [f"soak-u{i:04d}" for i in range(users)]
    offline = [f"soak-ghost{i:04d}" for i in range(ghosts)]
    everyone = online + offline
    counts: dict[str, int] = {}
    last_ids: list = []

    def add(name: str, n: int = 1) -> None:
        counts[name] = counts.get(name, 0) + n

    def send(name: str, queue: str = "collect", keep: bool = False, **kwargs):
        try:
            result = app.send_task(name, queue=queue, ignore_result=not keep, **kwargs)
            add(f"sent {name}")
            return result
        except Exception as exc:  # noqa: BLE001
            add(f"send error {type(exc).__name__}")
            return None

    start = time.time()
    tick = 0.1
    n = 0
    budget = 0.0
    next_broadcast = start + 30
    next_query = start + 5
    next_write = start
    while not stop.is_set():
        now = time.time()
        budget += rate * tick
        while budget >= 1:
            n += 1
            pick = rng.random()
            if pick < 0.45:
                to = rng.choice(everyone)
                kwargs = {"to": to, "data": {"n": n, "t": now}}
                if rng.random() < 0.05:
                    kwargs["key"] = f"soak-{seed}-{n}"
                keep = rng.random() < 0.02
                result = send("tasks.collect", keep=keep, kwargs=kwargs)
                if keep and result is not None:
                    last_ids.append(result)
                n_msgs = 1
            elif pick < 0.70:
                n_msgs = rng.randint(2, 8)
                send("tasks.collect", kwargs={"to": rng.sample(everyone, n_msgs), "data": {"n": n}})
            else:
                n_msgs = rng.randint(10, 40)
                send("tasks.collect_many", kwargs={"messages": [{"to": rng.choice(everyone), "data": {"n": n, "i": j}} for j in range(n_msgs)]})
            budget -= n_msgs
            add("messages", n_msgs)
        if now >= next_broadcast:
            send("tasks.collect", kwargs={"to": "*", "data": {"broadcast": n}})
            next_broadcast = now + 60
        if now >= next_query:
            next_query = now + 5
            try:
                presence = app.send_task("tasks.presence", args=[rng.sample(everyone, 20)], queue="dispatch").get(timeout=20)
                add("presence ok")
                add("presence online", sum(1 for v in presence.values() if v))
            except Exception as exc:  # noqa: BLE001
                add(f"presence error {type(exc).__name__}")
            if last_ids:
                done = [r for r in last_ids if r.ready()]
                for r in done:
                    last_ids.remove(r)
                if done:
                    try:
                        mid = done[-1].get(timeout=1)
                        status = app.send_task("tasks.status", args=[mid], queue="dispatch").get(timeout=20)
                        add("status ok" if status.get("found") else "status not found")
                    except Exception as exc:  # noqa: BLE001
                        add(f"status error {type(exc).__name__}")
                del last_ids[:-500]
        if now >= next_write:
            next_write = now + 1
            with open(stats_path + ".tmp", "w") as out:
                json.dump(counts, out)
            os.replace(stats_path + ".tmp", stats_path)
        ahead = tick - (time.time() - now)
        if ahead > 0:
            time.sleep(ahead)
    with open(stats_path, "w") as out:
        json.dump(counts, out)


# =============================================================================================
# Sampling
# =============================================================================================

_PATTERNS = [
    (re.compile(r"^(auth:revoked:jti:).*"), r"\1*"),  # token ids
    (re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"), "*"),  # task ids, token ids
    (re.compile(r"soak-(u|ghost)\d+"), "*"),  # user names
    (re.compile(r"[0-9a-f]{24}"), "*"),  # message ids
    (re.compile(r"[0-9a-f]{32,}"), "*"),
    (re.compile(r"127\.0\.0\.1:\d+"), "HOST:*"),  # node addresses
    (re.compile(r"@[\w.-]+"), "@*"),  # worker names
    (re.compile(r"\d{4,}"), "*"),
]


def key_pattern(key: bytes) -> str:
    text = key.decode("utf-8", "backslashreplace")
    for regex, repl in _PATTERNS:
        text = regex.sub(repl, text)
    return "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in text)


_SIZE = {b"zset": "zcard", b"set": "scard", b"hash": "hlen", b"list": "llen", b"string": "strlen", b"stream": "xlen"}


def sample_redis(url_base: str) -> dict[str, float]:
    import redis

    out: dict[str, float] = {}
    for db in (0, 1):
        client = redis.Redis.from_url(f"{url_base}/{db}", socket_timeout=10)
        try:
            if db == 0:
                mem = client.info("memory")
                out["redis used_memory MB"] = mem["used_memory"] / 2**20
                out["redis clients"] = client.info("clients")["connected_clients"]
            out[f"redis db{db} DBSIZE"] = client.dbsize()
            keys = list(client.scan_iter(count=1000))
            pipe = client.pipeline(transaction=False)
            for key in keys:
                pipe.type(key)
            types = pipe.execute()
            pipe = client.pipeline(transaction=False)
            for key, kind in zip(keys, types):
                pipe.execute_command(_SIZE.get(kind, "exists").upper(), key)
            sizes = pipe.execute()
            per: dict[str, list[int]] = {}
            for key, size in zip(keys, sizes):
                per.setdefault(key_pattern(key), []).append(int(size or 0))
            for pattern, values in per.items():
                out[f"db{db} keys {pattern}"] = len(values)
                out[f"db{db} size max {pattern}"] = max(values)
                if len(values) > 1:
                    out[f"db{db} size sum {pattern}"] = sum(values)
        finally:
            client.close()
    return out


_CPU_SEEN: dict[int, tuple[float, float]] = {}  # pid -> (monotonic time, cpu seconds) at the previous sample


def sample_procs(procs: dict[str, int], worker_pid: int | None) -> dict[str, float]:
    """RSS, fds, threads and CPU (% of one core since the previous sample) of each process."""
    import psutil

    out: dict[str, float] = {}
    entries = list(procs.items())
    if worker_pid:
        try:
            children = sorted(psutil.Process(worker_pid).children(), key=lambda p: p.pid)
            entries += [(f"worker pool {i + 1}", c.pid) for i, c in enumerate(children)]
        except psutil.Error:
            pass
    for name, pid in entries:
        try:
            p = psutil.Process(pid)
            with p.oneshot():
                out[f"{name} RSS MB"] = p.memory_info().rss / 2**20
                out[f"{name} fds"] = p.num_fds()
                out[f"{name} threads"] = p.num_threads()
                t = p.cpu_times()
                cpu, now = t.user + t.system, time.monotonic()
            before = _CPU_SEEN.get(pid)
            _CPU_SEEN[pid] = (now, cpu)
            if before is not None and now > before[0]:
                out[f"{name} CPU %"] = 100 * (cpu - before[1]) / (now - before[0])
        except psutil.Error:
            pass
    return out


def sample_store(data_dir: Path) -> dict[str, float]:
    out: dict[str, float] = {}
    folder = data_dir / "mongo"
    if folder.is_dir():
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                out[f"store {path.relative_to(folder)} MB"] = path.stat().st_size / 2**20
    return out


def sample_metrics(name: str, port: int) -> dict[str, float]:
    samples = common.node_metrics(port, ("push_node_connections", "push_node_users")) or {}
    return {f"{name} {metric}": value for metric, value in samples.items()}


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


# =============================================================================================
# Analysis
# =============================================================================================

def slope(points: list[tuple[float, float]]) -> float | None:
    """Least-squares slope (value per second) of ``points`` [(t, v)]; None for fewer than 3."""
    if len(points) < 3:
        return None
    n = len(points)
    mt = sum(t for t, _ in points) / n
    mv = sum(v for _, v in points) / n
    den = sum((t - mt) ** 2 for t, _ in points)
    if den == 0:
        return None
    return sum((t - mt) * (v - mv) for t, v in points) / den


#: Below these absolute growths over the second half nothing is flagged, whatever the relative growth.
MIN_GROWTH = {"fds": 3, "threads": 2, "MB": 2.0, "DBSIZE": 20, "keys": 20, "size": 50}


def analyse(samples: list[dict], t_half: float) -> list[dict]:
    names: list[str] = []
    for s in samples:
        names.extend(k for k in s["values"] if k not in names)
    rows = []
    for name in names:
        series = [(s["t"], s["values"][name]) for s in samples if name in s["values"]]
        if not series:
            continue
        second = [(t, v) for t, v in series if t >= t_half]
        k = slope(second)
        at_half = second[0][1] if second else None
        growth = k * (second[-1][0] - second[0][0]) if k is not None and len(second) > 1 else 0.0
        floor = next((v for unit, v in MIN_GROWTH.items() if unit in name), 1)
        base = max(abs(at_half or 0), 1e-9)
        workload = name.startswith(("load: ", "clients ")) or "CPU %" in name or "push_node_" in name  # measures of the load, not suspects
        grows = not workload and k is not None and growth > floor and growth / base > 0.10
        rows.append({"name": name, "first": series[0][1], "half": at_half, "last": series[-1][1],
                     "slope_per_min": None if k is None else k * 60, "growth_second_half": growth, "grows": grows})
    return rows


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float) and not v.is_integer():
        return f"{v:,.2f}" if abs(v) < 100 else f"{v:,.0f}"
    return f"{int(v):,}"


def format_table(rows: list[dict]) -> str:
    header = ("quantity", "first", "half", "last", "slope/min (2nd half)", "")
    cells = [header] + [(r["name"], _fmt(r["first"]), _fmt(r["half"]), _fmt(r["last"]),
                         "-" if r["slope_per_min"] is None else f"{r['slope_per_min']:+,.2f}", "GROWS" if r["grows"] else "")
                        for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(header))]
    lines = ["| " + " | ".join(f"{c:<{w}}" if i == 0 else f"{c:>{w}}" for i, (c, w) in enumerate(zip(row, widths))) + " |" for row in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


# =============================================================================================
# The run
# =============================================================================================

class Soak:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.ctx = multiprocessing.get_context("spawn")
        self.tmp = Path(tempfile.mkdtemp(prefix="push-soak-"))
        self.logs = self.tmp / "logs"
        self.cleanup = Cleanup()
        self.cleanup.push("temporary folder", self._remove_tmp)
        self.stop_load = self.ctx.Event()
        self.samples: list[dict] = []
        self.events: list[tuple[float, str]] = []
        self.t0 = 0.0

    def _remove_tmp(self) -> None:
        if self.args.keep:
            print(f"logs kept in {self.logs}", file=sys.stderr)
        else:
            shutil.rmtree(self.tmp, ignore_errors=True)

    def start_cluster(self) -> None:
        import launcher

        self.redis = launcher.RedisServer(port=launcher.free_port(), data_dir=self.tmp / "redis")
        self.cleanup.push("redis", self.redis.stop)
        self.redis.start()
        self.auth_port = launcher.free_port()
        self.env = launcher.cluster_env(self.redis.url(), self.tmp, self.auth_port, LOG_LEVEL=self.args.log_level, **SOAK_ENV)
        self.auth = launcher.start_auth(self.env, self.auth_port, log_path=self.logs / "auth.log")
        self.cleanup.push("auth", lambda: self.auth.terminate(timeout=10))
        self.worker = self._start_worker()
        self.cleanup.push("worker", lambda: self.worker.terminate(timeout=60))
        self.ports = [launcher.free_port(), launcher.free_port()]
        self.nodes = {}
        for name, port in zip(("node A", "node B"), self.ports):
            self.nodes[name] = self._start_node(name, port)
            self.cleanup.push(name, lambda name=name: self.nodes[name].terminate(timeout=15))

    def _start_worker(self):
        import launcher

        return launcher.start_worker(self.env, log_path=self.logs / "worker.log")

    def _start_node(self, name: str, port: int):
        import launcher

        return launcher.start_node(self.env, port, log_path=self.logs / f"node-{port}.log")

    def restart_node(self, name: str) -> None:
        port = self.ports[list(self.nodes).index(name)]
        t = time.monotonic()
        self.nodes[name].terminate(timeout=15)
        self.nodes[name] = self._start_node(name, port)
        self.event(f"{name} restarted (SIGTERM, started again on :{port}) in {time.monotonic() - t:.1f} s")

    def restart_worker(self) -> None:
        t = time.monotonic()
        self.worker.terminate(timeout=60)
        self.worker = self._start_worker()
        self.event(f"worker restarted (SIGTERM, started again) in {time.monotonic() - t:.1f} s")

    def event(self, text: str) -> None:
        elapsed = time.monotonic() - self.t0
        self.events.append((elapsed, text))
        print(f"[{elapsed / 60:5.1f} min] {text}", file=sys.stderr)

    def start_load(self) -> None:
        self.client_stats = self.tmp / "clients.json"
        self.sender_stats = self.tmp / "sender.json"
        self.clients = self.ctx.Process(target=clients_main, name="soak-clients", daemon=True,
                                        args=(str(self.client_stats), self.stop_load, self.auth_port, self.ports, self.args.users, self.args.seed,
                                              self.args.session, self.args.offline))
        self.cleanup.push("clients", lambda: self._stop_proc(self.clients, 40))
        self.clients.start()
        self.sender = self.ctx.Process(target=sender_main, name="soak-sender", daemon=True,
                                       args=(str(self.sender_stats), self.stop_load, self.env["BROKER_URL"], self.env["REDIS_URL"],
                                             self.args.users, self.args.ghosts, self.args.rate, self.args.seed))
        self.cleanup.push("sender", lambda: self._stop_proc(self.sender, 30))
        self.sender.start()

    def _stop_proc(self, proc, timeout: float) -> None:
        self.stop_load.set()
        proc.join(timeout)
        if proc.is_alive():
            proc.kill()
            proc.join(5)

    def sample(self) -> dict:
        procs = {"redis": self.redis.service.pid, "auth": self.auth.pid, "worker main": self.worker.pid,
                 **{name: node.pid for name, node in self.nodes.items()}, "load: clients": self.clients.pid, "load: sender": self.sender.pid}
        values = sample_procs(procs, self.worker.pid)
        values.update(sample_redis(f"redis://127.0.0.1:{self.redis.port}"))
        values.update(sample_store(self.tmp))
        for name, port in zip(self.nodes, self.ports):
            values.update(sample_metrics(name, port))
        clients = read_json(self.client_stats)
        values["clients open connections"] = clients.get("open", 0)
        values["clients users online"] = clients.get("users_online", 0)
        entry = {"t": time.monotonic() - self.t0, "values": values, "clients": clients, "sender": read_json(self.sender_stats)}
        self.samples.append(entry)
        return entry

    def run(self) -> None:
        args = self.args
        print(f"soak dir {self.tmp} (logs in {self.logs})", file=sys.stderr)
        self.start_cluster()
        print(f"cluster up: redis :{self.redis.port}, auth :{self.auth_port}, worker pid {self.worker.pid}, "
              f"nodes :{self.ports[0]} :{self.ports[1]}", file=sys.stderr)
        self.t0 = time.monotonic()
        self.start_load()
        total = args.minutes * 60
        plan = [(0.25 * total, lambda: self.restart_node("node B")), (0.40 * total, self.restart_worker)] if args.restarts else []
        next_sample = 0.0
        while True:
            elapsed = time.monotonic() - self.t0
            if plan and elapsed >= plan[0][0]:
                plan.pop(0)[1]()
                continue
            if elapsed >= next_sample:
                entry = self.sample()
                v = entry["values"]
                print(f"[{elapsed / 60:5.1f} min] conns {v.get('clients open connections')}, users {v.get('clients users online')}, "
                      f"redis {v.get('redis used_memory MB', 0):.1f} MB, db1 {v.get('redis db1 DBSIZE')} keys, "
                      f"msgs received {entry['clients'].get('messages', 0):,}, sent {entry['sender'].get('messages', 0):,}", file=sys.stderr)
                next_sample += args.every
                if elapsed >= total:
                    break
            if not self.clients.is_alive() or not self.sender.is_alive():
                raise RuntimeError("the client or sender process died")
            time.sleep(min(1.0, max(0.05, next_sample - (time.monotonic() - self.t0))))
        self.duration = time.monotonic() - self.t0
        self.stop_load.set()


def _range(text: str) -> tuple[float, float]:
    low, _, high = text.partition(",")
    try:
        low_f, high_f = float(low), float(high or low)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not MIN,MAX (seconds)") from None
    if not 0 <= low_f <= high_f:
        raise argparse.ArgumentTypeError(f"{text!r}: expected 0 <= MIN <= MAX")
    return low_f, high_f


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Soak run of the push platform on a private local cluster: samples memory, keys and "
                                                 "file descriptors under churn and reports what keeps growing. Measures; asserts nothing.")
    parser.add_argument("--minutes", type=float, default=15, help="length of the run (default 15)")
    parser.add_argument("--every", type=float, default=30, help="seconds between samples (default 30)")
    parser.add_argument("--users", type=int, default=200, help="churning WebSocket users (default 200)")
    parser.add_argument("--ghosts", type=int, default=100, help="users messages are sent to who never connect (default 100)")
    parser.add_argument("--rate", type=float, default=100, help="messages a second the sender sends (default 100)")
    parser.add_argument("--session", type=_range, default=(15, 120), metavar="MIN,MAX", help="seconds a connection lasts, at random between these (default 15,120)")
    parser.add_argument("--offline", type=_range, default=(1, 15), metavar="MIN,MAX", help="seconds a user stays offline between connections (default 1,15)")
    parser.add_argument("--no-restarts", dest="restarts", action="store_false", help="do not restart node B and the worker")
    parser.add_argument("--seed", default="soak")
    parser.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    parser.add_argument("--json", type=Path, default=None, help="also write every sample and the table as JSON here")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder and its logs")
    args = parser.parse_args(argv)
    # The client process imports websockets (bench/requirements.txt, not the project's): without
    # it that process died at once and the run went on for its minutes with no client at all.
    if importlib.util.find_spec(CLIENT_MODULE) is None:
        parser.error(f"the client process needs the {CLIENT_MODULE} package, which is not installed: run "
                     "`pip install -r bench/requirements.txt` in the project's venv first")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    interrupt_on_signals()
    soak = Soak(args)
    started = datetime.datetime.now().astimezone()
    interrupted = False
    try:
        soak.run()
    except KeyboardInterrupt:
        interrupted = True
        print("interrupted: stopping the cluster", file=sys.stderr)
    finally:
        soak.cleanup.run(reraise=False)
    if not soak.samples:
        return 130 if interrupted else 1
    duration = soak.samples[-1]["t"]
    rows = analyse(soak.samples, duration / 2)
    last = soak.samples[-1]
    print()
    print(f"soak {started:%Y-%m-%d %H:%M %Z}, {duration / 60:.1f} min, {len(soak.samples)} samples every {args.every:g} s, "
          f"{os.cpu_count()} cores, {args.users} users (+{args.ghosts} never online), ~{args.rate:g} msg/s"
          + (" (interrupted)" if interrupted else ""))
    for elapsed, text in soak.events:
        print(f"  at {elapsed / 60:.1f} min: {text}")
    print(f"  clients: {json.dumps(last['clients'], sort_keys=True)}")
    print(f"  sender: {json.dumps(last['sender'], sort_keys=True)}")
    print()
    print(format_table(rows))
    flagged = [r["name"] for r in rows if r["grows"]]
    print(f"\n{len(flagged)} quantities grew by more than 10% over the second half: " + (", ".join(flagged) if flagged else "none"))
    if args.json:
        args.json.write_text(json.dumps({"date": started.isoformat(timespec="seconds"), "args": {k: str(v) for k, v in vars(args).items()},
                                         "events": soak.events, "samples": soak.samples, "rows": rows}, indent=1) + "\n")
    return 130 if interrupted else 0


if __name__ == "__main__":
    sys.exit(main())

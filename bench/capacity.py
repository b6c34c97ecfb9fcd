#!/usr/bin/env python
"""Connection capacity: many idle connections on ONE node, and the cost of one message to all of them.

One command (from anywhere)::

    python bench/capacity.py [--connections 10000] [--system both|ours|peer] [--per-process 5000] [--json out.json]

- ours: a private cluster started with ``launcher`` (redis-server, auth, one Celery worker with its default
  concurrency) and ONE push node (``python -m wsnode``); every connection is authenticated (one token per
  user from ``POST /tokens``, verified by the node against auth), then bound (``hello``) and resumed
  (``resumed``, after the node's replay request went through the worker). The clients ack every message,
  as the browser client does.
- peer: its own redis-server and ONE uvicorn process serving ``bench/peer_app.py`` (python-socketio with
  ``AsyncRedisManager``); Socket.IO connections (Engine.IO v4 over a raw WebSocket, ``40`` to join "/",
  the room joined in ``connect``).

RLIMIT_NOFILE is raised in the node (psutil's prlimit on its pid, right after it started) and in every
client process. Clients are spread over ``ceil(connections / --per-process)`` processes (Tornado's
client, one asyncio loop each); each keeps at most ``--in-flight`` connections between the TCP connect and
"ready" (ours: ``resumed``; peer: ``40``), so that the node's replay requests never wait longer than
REPLAY_TIMEOUT in the worker's queue.

Reported per system: node RSS before (started, idle) and after (every connection ready, then ``--idle``
s idle, over which the node's idle CPU is measured), KB per connection, time to connect them all (ours also: time until every connection is bound,
before its replay), then ONE message to everyone (ours ``tasks.collect`` with ``to="*"``; peer
``RedisManager(write_only=True).emit("message", data)`` with no room): wall time from the business call
until the last client received it, and the node's CPU time (user + system) until then and until
``--settle`` s later (ours includes then the acks coming back). Clients reached are counted once each
(a second receipt is a duplicate); the exit status is 1 when a connected client was not reached or
one got the message twice.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import math
import multiprocessing
import os
import platform
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from common import Cleanup, issue_tokens, peer_url, raise_nofile  # noqa: E402
from wsclients import stop_client_process, wait_pipe  # noqa: E402


# =============================================================================================
# Client processes
# =============================================================================================

def capacity_clients_main(conn, kind: str, targets: list[str], in_flight: int, timeout: float) -> None:
    """``targets``: ws URLs. Replies ("loaded",), waits for ("go",), connects everything, replies
    ("ready", ok, errors[:10], t_first_connect, t_last_bound, t_last_ready, rss); then ("take",) ->
    (records [(index, seq, t_send, t_recv)], closed) and ("stop",)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    raise_nofile(None, len(targets) + 1024)
    asyncio.run(_capacity_clients(conn, kind, targets, in_flight, timeout))


async def _capacity_clients(conn, kind: str, targets: list[str], in_flight: int, timeout: float) -> None:
    import psutil
    from wsclients import ClientSet

    loads, now = json.loads, time.time
    n = len(targets)
    clients = ClientSet(n)
    ready, sockets, settle = clients.ready, clients.sockets, clients.settle
    bound = [clients.loop.create_future() for _ in range(n)]
    times = {"bound": 0.0, "ready": 0.0}

    def callback(index: int):
        def on_message(raw) -> None:
            t_recv = now()
            if raw is None:
                clients.on_closed(index, bound[index])
                return
            if kind == "ours":
                frame = loads(raw)
                kind_ = frame.get("type")
                if kind_ == "message":
                    data = frame.get("data") or {}
                    clients.records.append((index, data.get("seq"), data.get("t"), t_recv))
                    clients.write(index, '{"type":"ack","id":"%s"}' % frame["id"])
                elif kind_ == "hello":
                    times["bound"] = max(times["bound"], t_recv)
                    settle(bound[index])
                elif kind_ == "resumed":
                    times["ready"] = max(times["ready"], t_recv)
                    settle(ready[index])
            else:
                if raw.startswith("42"):
                    event = loads(raw[2:])
                    data = event[1] if len(event) > 1 and isinstance(event[1], dict) else {}
                    clients.records.append((index, data.get("seq"), data.get("t"), t_recv))
                elif raw == "2":
                    clients.write(index, "3")
                elif raw.startswith("40"):
                    times["bound"] = times["ready"] = max(times["ready"], t_recv)
                    settle(bound[index])
                    settle(ready[index])
                elif raw.startswith("0"):
                    if sockets[index] is not None:
                        clients.write(index, "40")
                    else:
                        clients.early[index] = True
        return on_message

    def on_open(index: int) -> None:
        if clients.early[index]:
            clients.write(index, "40")

    conn.send(("loaded",))
    await clients.loop.run_in_executor(None, conn.recv)  # ("go",)
    t_first = now()
    errors = await clients.connect_all(targets, callback, timeout, in_flight=in_flight, on_open=on_open)
    conn.send(("ready", n - len(errors), errors[:10], t_first, times["bound"], times["ready"], psutil.Process().memory_info().rss))
    await clients.serve(conn, take=lambda: clients.take()[:2], linger=0.5)


class Clients:
    """Several capacity client processes driven together."""

    def __init__(self, ctx, kind: str, urls: list[str], per_process: int, in_flight: int, cleanup: Cleanup) -> None:
        k = max(1, math.ceil(len(urls) / per_process))
        self.procs, self.conns, self.offsets = [], [], []
        per_proc_flight = max(1, in_flight // k)
        for j in range(k):
            part = urls[j::k]
            conn, child = ctx.Pipe()
            proc = ctx.Process(target=capacity_clients_main, args=(child, kind, part, per_proc_flight, 60.0), name=f"{kind}-clients-{j}", daemon=True)
            cleanup.push(proc.name, lambda proc=proc, conn=conn: stop_client_process(proc, conn))
            proc.start()
            child.close()
            self.procs.append(proc)
            self.conns.append(conn)
        for conn in self.conns:
            if not wait_pipe(conn, 60):
                raise RuntimeError("a client process did not start within 60 s")
            conn.recv()

    def connect(self, deadline: float = 600.0) -> dict:
        t0 = time.time()
        for conn in self.conns:
            conn.send(("go",))
        replies = []
        for conn in self.conns:
            if not wait_pipe(conn, max(1.0, deadline - (time.time() - t0))):
                raise RuntimeError(f"clients did not connect within {deadline:g} s")
            replies.append(conn.recv())
        ok = sum(r[1] for r in replies)
        errors = [e for r in replies for e in r[2]]
        return {"connected": ok, "errors": errors[:10], "t_go": t0, "t_first": min(r[3] for r in replies),
                "t_last_bound": max(r[4] for r in replies), "t_last_ready": max(r[5] for r in replies),
                "client_rss": [r[6] for r in replies]}

    def take(self) -> tuple[list, list]:
        """What every process received since the last take: (records [(process number, index, seq,
        t_send, t_recv)], closed); an index counts within its process (process j holds urls[j::k])."""
        records, closed = [], []
        for conn in self.conns:
            conn.send(("take",))
        for j, conn in enumerate(self.conns):
            if not wait_pipe(conn, 60):
                raise RuntimeError("a client process stopped answering")
            r, c = conn.recv()
            records.extend((j, *record) for record in r)
            closed.extend(c)
        return records, closed


class BroadcastReceipts:
    """The receipts of one message to everyone (``seq``), by client: ``first`` maps each client
    reached, (process number, index), to the time it first got the message; ``duplicates`` counts
    its further receipts, ``other`` the receipts of other messages."""

    def __init__(self, seq: int) -> None:
        self.seq = seq
        self.first: dict[tuple[int, int], float] = {}
        self.duplicates = self.other = 0

    def add(self, records: list[tuple]) -> int:
        """``records`` from :meth:`Clients.take`; returns how many clients they reached first."""
        new = 0
        for process, index, seq, _, t_recv in records:
            if seq != self.seq:
                self.other += 1
            elif (process, index) in self.first:
                self.duplicates += 1
            else:
                self.first[(process, index)] = t_recv
                new += 1
        return new

    @property
    def reached(self) -> int:
        return len(self.first)


# =============================================================================================
# Orchestration
# =============================================================================================

def cpu_s(proc) -> float:
    t = proc.cpu_times()
    return t.user + t.system


def tree_cpu_s(proc) -> float:
    """CPU time of a process and its live children (a Celery worker and its pool)."""
    total = cpu_s(proc)
    for child in proc.children(recursive=True):
        try:
            total += cpu_s(child)
        except Exception:  # noqa: BLE001 - exited meanwhile
            pass
    return total


def measure(kind: str, args, ctx, folder: Path, cleanup: Cleanup) -> dict:
    import launcher
    import psutil

    phase = Cleanup()
    cleanup.push(f"{kind} system", phase.run)
    logs = folder / "logs"
    result: dict = {"system": kind, "connections": args.connections}
    t_start = time.time()
    redis = launcher.RedisServer(port=launcher.free_port(), data_dir=folder / "redis")
    phase.push("redis", redis.stop)
    redis.start()
    users = [f"cap-u{i:05d}" for i in range(args.connections)]
    if kind == "ours":
        auth_port = launcher.free_port()
        env = launcher.cluster_env(redis.url(), folder, auth_port, LOG_LEVEL=args.log_level)
        auth = launcher.start_auth(env, auth_port, log_path=logs / "auth.log")
        phase.push("auth", lambda: auth.terminate(10))
        worker = launcher.start_worker(env, log_path=logs / "worker.log")
        phase.push("worker", lambda: worker.terminate(15))
        port = launcher.free_port()
        node = launcher.start_node(env, port, log_path=logs / f"node-{port}.log")
        phase.push("node", lambda: node.terminate(20))
        t0 = time.time()
        tokens = issue_tokens(auth_port, users, threads=16)
        result["tokens_s"] = round(time.time() - t0, 1)
        urls = [f"ws://127.0.0.1:{port}/ws?token={t}" for t in tokens]
    else:
        port = launcher.free_port()
        node = common.start_peer_node(redis.url(0), port, logs / f"peer-{port}.log")
        phase.push("peer node", lambda: node.terminate(20))
        urls = [peer_url(port, u) for u in users]
    result["nofile"] = raise_nofile(node.pid, args.connections + 4096)
    nproc = psutil.Process(node.pid)
    time.sleep(2.0)
    result["rss_before_mb"] = round(nproc.memory_info().rss / 2**20, 1)
    print(f"  {kind}: node up (pid {node.pid}, RLIMIT_NOFILE {result['nofile']}, RSS {result['rss_before_mb']} MB) "
          f"in {time.time() - t_start:.0f} s; connecting {args.connections}", file=sys.stderr)
    clients = Clients(ctx, kind, urls, args.per_process, args.in_flight, phase)
    procs = {"redis": psutil.Process(redis.service.pid)}
    if kind == "ours":
        procs.update(worker=psutil.Process(worker.pid), auth=psutil.Process(auth.pid))
    procs.update({f"clients {j}": psutil.Process(p.pid) for j, p in enumerate(clients.procs)})
    base = {name: tree_cpu_s(p) for name, p in procs.items()}
    cpu0 = cpu_s(nproc)
    conn_info = clients.connect()
    result["connect_other_cpu_s"] = {name: round(tree_cpu_s(p) - base[name], 2) for name, p in procs.items()}
    result["client_processes"] = len(clients.procs)
    result["connected"] = conn_info["connected"]
    result["connect_errors"] = conn_info["errors"]
    result["connect_s"] = round(conn_info["t_last_ready"] - conn_info["t_first"], 2) if conn_info["t_last_ready"] else None
    result["bind_s"] = round(conn_info["t_last_bound"] - conn_info["t_first"], 2) if conn_info["t_last_bound"] else None
    result["connect_node_cpu_s"] = round(cpu_s(nproc) - cpu0, 2)
    result["client_rss_mb"] = [round(r / 2**20, 1) for r in conn_info["client_rss"]]
    print(f"  {kind}: {conn_info['connected']} connected in {result['connect_s']} s (bound in {result['bind_s']} s), node CPU "
          f"{result['connect_node_cpu_s']} s, others {result['connect_other_cpu_s']}; errors: {conn_info['errors'][:3]}", file=sys.stderr)
    cpu_idle0, t_idle0 = cpu_s(nproc), time.monotonic()
    time.sleep(args.idle)
    result["idle_node_cpu_pct"] = round(100 * (cpu_s(nproc) - cpu_idle0) / (time.monotonic() - t_idle0), 1)
    _, closed = clients.take()
    result["closed_while_idle"] = len(closed)
    result["closed_sample"] = closed[:5]
    rss_after = nproc.memory_info().rss
    result["rss_after_mb"] = round(rss_after / 2**20, 1)
    ok = conn_info["connected"] - len(closed)
    result["kb_per_connection"] = round((rss_after / 2**20 - result["rss_before_mb"]) * 1024 / ok, 1) if ok else None
    # one message to everyone
    if kind == "ours":
        from celery import Celery

        app = Celery(broker=env["BROKER_URL"])
        with app.producer_or_acquire() as producer:
            producer.connection.ensure_connection(max_retries=3)
        send = lambda data: app.send_task("tasks.collect", kwargs={"to": "*", "data": data}, queue="collect")  # noqa: E731
    else:
        import socketio

        manager = socketio.RedisManager(redis.url(0), write_only=True)
        manager.emit("warmup", {}, room="bench-nobody")
        send = lambda data: manager.emit("message", data)  # noqa: E731
    base = {name: tree_cpu_s(p) for name, p in procs.items()}
    cpu_before, m_send = cpu_s(nproc), time.monotonic()
    t_send = time.time()
    send({"t": t_send, "seq": 1, "u": None})
    receipts = BroadcastReceipts(1)
    deadline = time.time() + args.broadcast_timeout
    cpu_at_last = None
    while time.time() < deadline:
        records, closed = clients.take()
        if receipts.add(records):
            cpu_at_last = cpu_s(nproc)
        if receipts.reached >= ok:
            break
        time.sleep(0.05)
    time.sleep(args.settle)
    cpu_after = cpu_s(nproc)
    receipts.add(clients.take()[0])  # duplicates and stragglers of the settle
    t_last = max(receipts.first.values(), default=None)
    result["broadcast_received"] = receipts.reached
    result["broadcast_duplicates"] = receipts.duplicates
    result["broadcast_wall_s"] = round(t_last - t_send, 3) if t_last else None
    result["broadcast_first_ms"] = round(1000 * (min(receipts.first.values()) - t_send), 1) if receipts.first else None
    result["broadcast_node_cpu_s"] = round(cpu_at_last - cpu_before, 3) if cpu_at_last is not None else None
    result["broadcast_node_cpu_settled_s"] = round(cpu_after - cpu_before, 3)
    # the same, minus what the node burns idle over that time (pings, lease renewals)
    result["broadcast_node_cpu_net_s"] = round(cpu_after - cpu_before - result["idle_node_cpu_pct"] / 100 * (time.monotonic() - m_send), 3)
    result["broadcast_other_cpu_s"] = {name: round(tree_cpu_s(p) - base[name], 3) for name, p in procs.items()}
    result["rss_after_broadcast_mb"] = round(nproc.memory_info().rss / 2**20, 1)
    print(f"  {kind}: broadcast reached {receipts.reached} of {conn_info['connected']} connected ({ok} open), "
          f"{receipts.duplicates} duplicates, in {result['broadcast_wall_s']} s, node CPU "
          f"{result['broadcast_node_cpu_s']} s ({result['broadcast_node_cpu_settled_s']} s after {args.settle:g} s), "
          f"others {result['broadcast_other_cpu_s']}", file=sys.stderr)
    t_stop = time.time()
    phase.run()
    result["stop_s"] = round(time.time() - t_stop, 1)
    result["total_s"] = round(time.time() - t_start, 1)
    return result


ROWS = (("connected", "connected", "{:,}"), ("client processes", "client_processes", "{}"),
        ("node RSS before, MB", "rss_before_mb", "{:.1f}"), ("node RSS after, MB", "rss_after_mb", "{:.1f}"),
        ("KB per connection", "kb_per_connection", "{:.1f}"), ("time to connect all, s", "connect_s", "{:.1f}"),
        ("  of which until all bound (ours: hello), s", "bind_s", "{:.1f}"), ("node CPU while connecting, s", "connect_node_cpu_s", "{:.1f}"),
        ("node CPU while idle, % of a core", "idle_node_cpu_pct", "{:.1f}"), ("closed while idle", "closed_while_idle", "{}"),
        ("broadcast: clients reached", "broadcast_received", "{:,}"), ("broadcast: duplicates", "broadcast_duplicates", "{:,}"),
        ("broadcast: first receipt, ms", "broadcast_first_ms", "{:.1f}"),
        ("broadcast: wall until last receipt, s", "broadcast_wall_s", "{:.3f}"),
        ("broadcast: node CPU until last receipt, s", "broadcast_node_cpu_s", "{:.3f}"),
        ("broadcast: node CPU incl. the next --settle s, s", "broadcast_node_cpu_settled_s", "{:.3f}"),
        ("  the same minus the idle CPU over that time, s", "broadcast_node_cpu_net_s", "{:.3f}"))


def broadcast_failure(result: dict) -> str | None:
    """What went wrong with the broadcast of a ``measure`` result, if anything: a connected client
    not reached (closed while idle included), or reached twice."""
    problems = []
    if result["broadcast_received"] < result["connected"]:
        problems.append(f"the broadcast reached {result['broadcast_received']:,} of {result['connected']:,} connected clients "
                        f"({result['closed_while_idle']} closed while idle)")
    if result["broadcast_duplicates"]:
        problems.append(f"{result['broadcast_duplicates']:,} duplicate receipts (a client reached again)")
    return "; ".join(problems) or None


def format_table(results: list[dict]) -> str:
    header = ["", *[r["system"] for r in results]]
    if len(results) == 2:
        header.append("ours/peer")
    rows = [header]
    for title, key, fmt in ROWS:
        values = [r.get(key) for r in results]
        row = [title, *["-" if v is None else fmt.format(v) for v in values]]
        if len(results) == 2:
            a, b = values
            row.append(f"{a / b:.2f}" if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b else "-")
        rows.append(row)
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(header))]
    lines = ["| " + " | ".join(f"{c:<{w}}" if i == 0 else f"{c:>{w}}" for i, (c, w) in enumerate(zip(row, widths))) + " |" for row in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) if i == 0 else "-" * (w + 1) + ":" for i, w in enumerate(widths)) + "|")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Idle connections on one node and the cost of one message to all of them.")
    parser.add_argument("--connections", type=int, default=10000)
    parser.add_argument("--system", choices=("both", "ours", "peer"), default="both")
    parser.add_argument("--per-process", type=int, default=5000, help="connections per client process (default 5000)")
    parser.add_argument("--in-flight", type=int, default=100, help="connections being opened at once, all client processes together (default 100)")
    parser.add_argument("--idle", type=float, default=25.0, help="idle seconds after connecting, over which the node's idle CPU is measured, "
                        "before RSS is read (default 25: one ping period of both systems, two lease renewals of ours)")
    parser.add_argument("--settle", type=float, default=5.0, help="seconds after the broadcast's last receipt, still counted in its node CPU (default 5)")
    parser.add_argument("--broadcast-timeout", type=float, default=60.0)
    parser.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder and its logs")
    args = parser.parse_args(argv)
    if args.system in ("both", "peer") and (problem := common.peer_packages_problem("--system ours")):
        parser.error(problem)

    common.interrupt_on_signals()
    raise_nofile(None, 65536)
    ctx = multiprocessing.get_context("spawn")
    cleanup = Cleanup()
    tmp = Path(tempfile.mkdtemp(prefix="push-capacity-"))
    keep = args.keep
    started = datetime.datetime.now().astimezone()
    speed_before = common.speed_ms()
    results = []
    failed = []
    try:
        for kind in (("ours", "peer") if args.system == "both" else (args.system,)):
            print(f"--- {kind}: {args.connections} connections on one node", file=sys.stderr)
            results.append(measure(kind, args, ctx, tmp / kind, cleanup))
            if failure := broadcast_failure(results[-1]):
                failed.append(f"{kind}: {failure}")
                keep = True
    except KeyboardInterrupt:
        print("interrupted: stopping everything", file=sys.stderr)
        return 130
    except BaseException:
        keep = True
        raise
    finally:
        cleanup.run()
        if keep:
            print(f"logs kept in {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    speed_after = common.speed_ms()
    print()
    print(f"capacity {started:%Y-%m-%d %H:%M %Z}, {os.cpu_count()} cores, {args.connections} connections on one node, "
          f"{common.speed_line(speed_before, speed_after)}")
    print(format_table(results))
    if args.json:
        args.json.write_text(json.dumps({"date": started.isoformat(timespec="seconds"), "machine": {"cores": os.cpu_count(), "platform": platform.platform(),
                                                     "speed_ms": {"before": speed_before, "after": speed_after}},
                                         "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                                         "results": results}, indent=2, default=str) + "\n")
    if failed:
        print("\n" + "\n".join(failed), file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

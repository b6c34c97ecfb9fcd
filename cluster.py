"""``python cluster.py``: the whole platform on this machine, on 127.0.0.1, in one command.

Starts, in this order, and waits until each one answers:

- Redis: the one at ``REDIS_URL`` when it answers PING (then a Redis ``BROKER_URL`` must answer
  too), else a private one (on ``REDIS_URL``'s port when that URL is on this host and the port is
  free, so that the default URLs reach it; else on a free port) with its (append-only, persistent) data in
  ``DATA_DIR/redis``, also the broker unless ``BROKER_URL`` is RabbitMQ or a Redis that answers;
  one that refuses the login (a wrong password) stops the run, saying so;
- auth on ``AUTH_PORT`` (8000), the worker (collect and dispatch queues), two push nodes (8101 and
  8102, or ``--nodes``), Flower (5555, or ``--flower-port``; ``--no-flower`` skips it) and the demo
  page (8080, or ``--demo-port``; ``--no-demo`` skips it).

Then it prints the URLs and ready-to-paste commands to get a token and send a message, and echoes
every process's output behind a ``name |`` prefix.  Ctrl-C, SIGTERM or SIGHUP (the terminal closed) stops everything: nodes first,
then the worker, Flower, auth and the private Redis (a second Ctrl-C hurries: SIGKILL for the rest).
If a process dies, it says which, stops the rest and exits with 1; except a push node while another
one still runs: that is only reported (browsers, and the demo page, move to the other node).

Settings come from ``settings`` (never from ``os.environ`` here); the children get them through
``launcher.cluster_env``.  Main thread only, but for the renewal of the Redis claims
(:class:`RedisClaims`).
"""

from __future__ import annotations

import argparse
import json
import shlex
import signal
import socket
import sys
import threading
import time
import urllib.parse
from collections.abc import Callable
from pathlib import Path

import launcher
import startup

with startup.exit_on_bad_settings("cluster.py", __name__ == "__main__"):
    import redislogin
    import settings
    from tasks import storedisk
    from wsnode import addressclaim  # reads settings (through redislogin, for AddressClaim.wait)

#: How long each process may take to stop after SIGTERM before it is killed (the worker drains tasks).
STOP_TIMEOUT = {"worker": 30.0}
DEFAULT_STOP_TIMEOUT = 10.0


def _ports(text: str) -> tuple[int, ...]:
    try:
        ports = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of ports, e.g. 8101,8102") from None
    if not ports or any(not 0 < port < 65536 for port in ports):
        raise argparse.ArgumentTypeError(f"{text!r}: give at least one port, each between 1 and 65535")
    return ports


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Run the whole push platform on this machine (127.0.0.1).")
    parser.add_argument("--nodes", type=_ports, default=(8101, 8102), metavar="PORT,PORT",
                        help="ports of the push nodes, one node per port (default: 8101,8102)")
    parser.add_argument("--flower-port", type=settings.port_argument, default=5555, help="port of Flower (default: 5555)")
    parser.add_argument("--no-flower", action="store_true", help="do not start Flower")
    parser.add_argument("--demo-port", type=settings.port_argument, default=8080, help="port of the demo page (default: 8080)")
    parser.add_argument("--no-demo", action="store_true", help="do not start the demo page")
    return parser.parse_args(argv)


def redis_answers(url: str) -> bool:
    """True when the Redis at ``url`` answers PING within a second."""
    try:
        import redis

        return bool(redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=1).ping())
    except Exception:  # noqa: BLE001 - unreachable, refused: "not usable" (a wrong password is told before: redislogin)
        return False


#: Redis's own port, where a URL names none.
REDIS_DEFAULT_PORT = 6379


def private_redis_port(url: str, free: Callable[[int], bool] | None = None) -> int | None:
    """The port for the private Redis started when none answers at ``url`` (``REDIS_URL``): that
    URL's own, when it is a plain ``redis://`` URL on this host (``127.0.0.1`` or ``localhost``) and
    ``free(port)`` (default :func:`port_free`), so that the default URLs, business code's
    ``redis://127.0.0.1:6379/0`` among them, reach it, and it keeps its address and data from one
    start to the next; else None (any free port)."""
    parts = urllib.parse.urlsplit(url)
    try:
        port = parts.port or REDIS_DEFAULT_PORT
    except ValueError:
        return None
    if parts.scheme != "redis" or parts.hostname not in ("127.0.0.1", "localhost"):
        return None
    return port if (free or port_free)(port) else None


def port_free(port: int) -> bool:
    """Whether a server could listen on ``127.0.0.1:port`` now (as Redis binds: ``SO_REUSEADDR``,
    so that connections of a Redis just stopped, in TIME_WAIT, do not count)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


#: The key a running cluster claims in each Redis it uses (REDIS_URL's, or the private one it
#: started, and a Redis BROKER_URL's), for ``CLAIM_SECONDS``, renewed while it runs.
CLAIM_KEY = "push:cluster"
CLAIM_SECONDS = 30


class RedisClaims:
    """This cluster's claims on the Redis servers it shares with whatever else uses them.

    Two clusters on one Redis (a second one started with other ports, as the busy-port message
    said, but the same system Redis) share the ``collect`` queue and the routing registry: each
    worker stores what it takes in its own ``DATA_DIR``, and half of each cluster's messages went
    to the other's store and nodes, silently.  So a cluster claims the Redis it uses, and a second
    one stops at once, naming the first.  A claim of a process of this host that is gone (killed
    with SIGKILL) is taken over.

    Threading: the claims are renewed every ``CLAIM_SECONDS / 3`` on a daemon thread of their own,
    from the first claim taken until :meth:`give_up`, so that a start-up slower than
    ``CLAIM_SECONDS`` (a worker that takes long to answer on a loaded machine) cannot let them
    lapse before the main thread watches the processes.  redis-py's clients are safe to share
    between the two threads."""

    def __init__(self, data_dir: Path, auth_port: int) -> None:
        self.value = addressclaim.claim_value(data=str(data_dir), auth_port=auth_port)
        self.held: list[_Claim] = []
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None

    def take(self, variable: str, url: str) -> None:
        import redis

        client = redis.Redis.from_url(url, socket_connect_timeout=5, socket_timeout=5)
        claim = _Claim(client.register_script(addressclaim.TAKE), client.register_script(addressclaim.GIVE_UP), self.value)
        found = claim.take()
        if found is not None and addressclaim.gone(found):
            claim.give_up(found)
            found = claim.take()
        if found is not None:
            other = json.loads(found) if found.startswith(b"{") else {}
            raise launcher.LauncherError(
                f"another cluster uses the Redis at {variable}={settings.redact(url)} "
                f"({addressclaim.holder(found)}, data in {other.get('data', '?')}, auth on port {other.get('auth_port', '?')}): "
                "two clusters on one Redis share its queues and routes and lose each other's messages. Stop the other one, "
                "or give this one a Redis of its own: REDIS_URL and BROKER_URL to another Redis (or to one nothing answers at, "
                "for a private one), and its own DATA_DIR")
        self.held.append(claim)
        if self._renewer is None:
            self._renewer = threading.Thread(target=self._renew_until_given_up, name="cluster-claims", daemon=True)
            self._renewer.start()

    def _renew_until_given_up(self) -> None:
        while not self._stop.wait(CLAIM_SECONDS / 3):
            self.renew()

    def renew(self) -> None:
        """Extend the claims; a Redis that does not answer for a moment is left to the next renewal."""
        for claim in list(self.held):
            try:
                claim.take()
            except Exception:  # noqa: BLE001 - renewed at the next round; the claim lasts CLAIM_SECONDS
                pass

    def give_up(self) -> None:
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join()
        for claim in self.held:
            try:
                claim.give_up(self.value)
            except Exception:  # noqa: BLE001 - it ends by itself within CLAIM_SECONDS
                pass
        self.held.clear()


class _Claim:
    """The claim scripts (:mod:`wsnode.addressclaim`) on one Redis, for ``CLAIM_KEY``."""

    def __init__(self, take, give_up, value: str) -> None:
        self._take, self._give_up, self.value = take, give_up, value

    def take(self):
        return self._take(keys=[CLAIM_KEY], args=[self.value, CLAIM_SECONDS * 1000, "1"])

    def give_up(self, value: str | bytes) -> None:
        self._give_up(keys=[CLAIM_KEY], args=[value, addressclaim.RELEASED_MS])


def busy_ports(ports: list[int]) -> list[int]:
    """The ports in ``ports`` that something on 127.0.0.1 already listens on (or that repeat)."""
    busy = [port for i, port in enumerate(ports) if port in ports[:i]]
    for port in dict.fromkeys(ports):
        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the servers do
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                busy.append(port)
    return busy


class Cluster:
    """The processes this run started, with what is needed to stop them in order."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.data_dir = Path(settings.DATA_DIR).resolve()
        self.auth_port = settings.AUTH_PORT
        self.names = ["redis", "auth", "worker", *(f"node-{port}" for port in args.nodes), "flower", "demo"]
        self.width = max(map(len, [*self.names, "cluster"]))
        self.redis: launcher.RedisServer | None = None  # only when private
        self.services: dict[str, launcher.Service] = {}  # name -> Service, in start order
        self.broker_url = self.redis_url = ""
        self.claims = RedisClaims(self.data_dir, self.auth_port)

    def say(self, message: str) -> None:
        try:
            sys.stdout.write(f"{'cluster':<{self.width}} | {message}\n")
            sys.stdout.flush()
        except OSError:
            pass  # the terminal is gone (SIGHUP): stopping goes on without it

    def _echo(self, name: str) -> dict:
        """Service keywords: output echoed with a padded, coloured ``name |`` prefix."""
        return {"name": name, "width": self.width, "colour": self.names.index(name) if name in self.names else 0}

    def start(self) -> None:
        ports = [self.auth_port, *self.args.nodes, *([] if self.args.no_flower else [self.args.flower_port]),
                 *([] if self.args.no_demo else [self.args.demo_port])]
        busy = busy_ports(ports)
        if busy:
            raise launcher.LauncherError(
                f"port(s) {', '.join(map(str, busy))} already in use on 127.0.0.1 (another cluster still running?): "
                "stop what holds them, or choose others with AUTH_PORT=..., --nodes ..., --flower-port ... and --demo-port ..., "
                "and for a second cluster also REDIS_URL, BROKER_URL and DATA_DIR of its own (see the README's quick start)")
        self._check_data_dir()
        env = self._start_redis()
        self.say(f"starting auth on port {self.auth_port}")
        self._add(launcher.start_auth(env, self.auth_port, **self._echo("auth")))
        self.say("starting the worker (queues collect and dispatch)")
        self._add(launcher.start_worker(env, **self._echo("worker")))
        for port in self.args.nodes:
            self.say(f"starting a push node on port {port}")
            self._add(launcher.start_node(env, port, **self._echo(f"node-{port}")))
        if not self.args.no_flower:
            self.say(f"starting Flower on port {self.args.flower_port}")
            self._add(launcher.start_flower(env, self.args.flower_port, **self._echo("flower")))
        self.start_demo(env)

    def _check_data_dir(self) -> None:
        """Stop at once, saying what to fix, when ``DATA_DIR`` cannot be made or written (a file,
        a folder of another user): the private Redis and the worker's store keep their data there,
        and the folder's creation raised a traceback out of the start."""
        exc = storedisk.unwritable(self.data_dir)
        if exc is not None:
            raise launcher.LauncherError(f"DATA_DIR={settings.DATA_DIR!r} ({self.data_dir}) cannot hold the cluster's data "
                                         f"({exc.strerror or exc}): set DATA_DIR to a writable local folder")

    def _start_redis(self) -> dict[str, str]:
        """Use the Redis at REDIS_URL when it answers, else start a private one; return the children's env.
        One that refuses the login (a wrong password) stops the run: a private Redis in its place
        hid the mistake."""
        refused = redislogin.problem(settings.REDIS_URL)
        if refused is not None:
            raise launcher.LauncherError(redislogin.message([("REDIS_URL", settings.REDIS_URL, *refused)]))
        if redis_answers(settings.REDIS_URL):
            self._check_broker()
            self.claims.take("REDIS_URL", settings.REDIS_URL)
            if urllib.parse.urlsplit(settings.BROKER_URL).scheme in ("redis", "rediss"):
                self.claims.take("BROKER_URL", settings.BROKER_URL)
            self.say(f"using the Redis at {settings.redact(settings.REDIS_URL)}")
            self.broker_url, self.redis_url = settings.BROKER_URL, settings.REDIS_URL
            return launcher.cluster_env(settings.REDIS_URL, self.data_dir, self.auth_port, broker_url=self.broker_url,
                                        REDIS_URL=self.redis_url, RESULT_BACKEND=settings.RESULT_BACKEND)
        port = private_redis_port(settings.REDIS_URL)
        where = f"on port {port}, REDIS_URL's" if port else "on a free port"
        self.say(f"no Redis answers at {settings.redact(settings.REDIS_URL)}: starting a private one ({where}; data in {self.data_dir / 'redis'})")
        try:
            self.redis = launcher.RedisServer(port=port, data_dir=self.data_dir / "redis", persistent=True, echo=True, **self._echo("redis")).start()
        except launcher.LauncherError:
            if port is None:
                raise
            self.say(f"the private Redis could not listen on port {port} (taken meanwhile?): starting it on a free port")
            self.redis = launcher.RedisServer(data_dir=self.data_dir / "redis", persistent=True, echo=True, **self._echo("redis")).start()
        # Claimed as any other: the banner prints its address, and a second cluster given it
        # would share its queues and routes as on a system Redis.
        self.claims.take("REDIS_URL", self.redis.url(1))
        # BROKER_URL is kept when it is RabbitMQ, or a Redis that answers (set to one of the
        # reader's own: the business code they wrote sends there); else the private Redis's db 0.
        scheme = urllib.parse.urlsplit(settings.BROKER_URL).scheme
        keep = scheme in ("amqp", "amqps", "pyamqp") or (scheme in ("redis", "rediss") and redis_answers(settings.BROKER_URL))
        self.broker_url = settings.BROKER_URL if keep else self.redis.url(0)
        if urllib.parse.urlsplit(self.broker_url).scheme in ("redis", "rediss"):
            self.claims.take("BROKER_URL", self.broker_url)
        self.redis_url = self.redis.url(1)
        return launcher.cluster_env(self.redis.url(0), self.data_dir, self.auth_port, broker_url=self.broker_url)

    @staticmethod
    def _check_broker() -> None:
        """With the Redis at REDIS_URL in use, a Redis BROKER_URL must answer too.

        Setting REDIS_URL alone left BROKER_URL at its default (redis://127.0.0.1:6379/0): where
        nothing answered there, the worker retried it for the minute cluster.py waited for it, which
        then failed with "worker was not logging 'ready.'"; this names the variable at once instead.
        """
        broker = urllib.parse.urlsplit(settings.BROKER_URL)
        if broker.scheme not in ("redis", "rediss") or redis_answers(settings.BROKER_URL):
            return
        same = urllib.parse.urlsplit(settings.REDIS_URL)._replace(path="/0", query="", fragment="").geturl()
        raise launcher.LauncherError(
            f"the Redis at REDIS_URL={settings.redact(settings.REDIS_URL)} answers, but none at "
            f"BROKER_URL={settings.redact(settings.BROKER_URL)} (the Celery broker; its default is "
            f"redis://127.0.0.1:6379/0): set BROKER_URL too, e.g. BROKER_URL={settings.redact(same)} for the same "
            "Redis, or start the Redis it names")

    def start_demo(self, env: dict[str, str]) -> None:
        """The demo page (``python -m demo``) on ``--demo-port``, for every node; unless ``--no-demo``."""
        if self.args.no_demo:
            return
        self.say(f"starting the demo page on port {self.args.demo_port}")
        self._add(launcher.start_demo(env, self.args.demo_port, self.args.nodes, **self._echo("demo")))

    def _add(self, service: launcher.Service) -> None:
        self.services[service.name] = service

    def banner(self) -> str:
        auth = f"http://127.0.0.1:{self.auth_port}"
        key = settings.AUTH_ADMIN_KEY if settings.AUTH_ADMIN_KEY == settings.DEV_AUTH_ADMIN_KEY else "$AUTH_ADMIN_KEY"
        broker = self.broker_url if urllib.parse.urlsplit(self.broker_url).password is None else None
        python = sys.executable  # absolute: ./dev runs this from the repository, the reader's shell may be elsewhere
        send = ("from celery import Celery; "
                + ('import os; Celery(broker=os.environ["BROKER_URL"])' if broker is None else f"Celery(broker={json.dumps(broker)})")
                + """.send_task("tasks.collect", kwargs={"to": "alice", "data": {"text": "hello"}}, queue="collect")""")
        nodes = "  ".join(f"ws://127.0.0.1:{port}/ws" for port in self.args.nodes)
        lines = [
            "",
            "The push platform is running (Ctrl-C stops it):",
            f"  redis      {settings.redact(self.redis_url)}" + (" (private)" if self.redis else ""),
            f"  broker     {settings.redact(self.broker_url)}",
            f"  auth       {auth}",
            f"  push nodes {nodes}",
            *([] if self.args.no_flower else [f"  flower     http://127.0.0.1:{self.args.flower_port}"]),
            f"  data       {self.data_dir}",
            "",
            *([] if self.args.no_demo else [
                f"Open the demo page: http://127.0.0.1:{self.args.demo_port}",
                "  type a user name, Connect, then Send yourself a message; it arrives at once.",
                "  Kill the node the page is on, and watch it move to another one with nothing lost:",
                *(f"    kill -9 {service.pid}    # {name}" for name, service in self.services.items() if name.startswith("node-")),
                "",
            ]),
            "Get a token for alice:",
            f'  curl -s -X POST {auth}/tokens -H "Authorization: Bearer {key}" '  # double quotes: $AUTH_ADMIN_KEY expands
            """-H 'Content-Type: application/json' -d '{"user_id": "alice"}'""",
            "Connect as alice:",
            f"  ws://127.0.0.1:{self.args.nodes[0]}/ws?token=TOKEN",
            "Send alice a message:",
            f"  {shlex.quote(python)} -c {shlex.quote(send)}",
            "",
        ]
        return "\n".join(lines)

    def watch(self) -> str:
        """Block until one of our processes exits; return its name.

        A push node that exits while another one still runs is only reported: browsers move to
        the others (the demo page shows it), so killing a node is something to try, not a failure.
        """
        reported: set[str] = set()
        while True:
            nodes = [name for name in self.services if name.startswith("node-")]
            for name, service in self.processes():
                if service.alive or name in reported:
                    continue
                alive = [node for node in nodes if self.services[node].alive]
                if name in nodes and alive:
                    reported.add(name)
                    self.say(f"{name} exited with code {service.returncode}; still serving: {', '.join(alive)} "
                             "(browsers move there). Ctrl-C stops the cluster; start it again to get every node back")
                    continue
                return name
            time.sleep(0.5)

    def processes(self) -> list[tuple[str, launcher.Service]]:
        private = [("redis", self.redis.service)] if self.redis and self.redis.service else []
        return [*self.services.items(), *private]

    def stop(self) -> None:
        """Stop everything started: nodes, worker, flower, the rest, then the private Redis.

        A signal during the stop makes it hurry: what is left is killed instead of terminated.
        """
        hurry = threading.Event()

        def on_signal(signum: int, frame: object) -> None:
            hurry.set()
            self.say("hurrying: killing what is left")

        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, on_signal)
        # A closing terminal can send SIGHUP twice (the shell, then the kernel): the first began
        # this stop, a second must not turn it into SIGKILL for everything.
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        nodes = [name for name in self.services if name.startswith("node-")]
        order = [*nodes, "worker", "flower", *(n for n in reversed(self.services) if n not in (*nodes, "worker", "flower"))]
        for name in order:
            service = self.services.get(name)
            if service is None:
                continue
            was_alive = service.alive
            code = service.kill() if hurry.is_set() else service.terminate(STOP_TIMEOUT.get(name, DEFAULT_STOP_TIMEOUT), hurry)
            if was_alive:
                self.say(f"stopped {name} (exit code {code})")
        self.claims.give_up()
        if self.redis is not None:
            if hurry.is_set():
                self.redis.kill()
            else:
                self.redis.stop()
            self.say("stopped the private Redis")


#: Signals that stop the cluster.  SIGHUP too (unless ignored, as under nohup): the children run in
#: sessions of their own, so when the terminal closes only this process hears it, and without a
#: handler it died leaving them all.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def _raise_interrupt(signum: int, frame: object) -> None:
    launcher.interrupt_now_or_soon()  # (not inside subprocess.Popen, whose child would run on)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    for signum in STOP_SIGNALS:  # also when started with SIGINT ignored (&), but not SIGHUP under nohup
        if signum != signal.SIGHUP or signal.getsignal(signum) is not signal.SIG_IGN:
            signal.signal(signum, _raise_interrupt)
    cluster = Cluster(args)
    status = 0
    try:
        cluster.start()
        sys.stdout.write(cluster.banner() + "\n")
        sys.stdout.flush()
        died = cluster.watch()
        service = dict(cluster.processes())[died]
        cluster.say(f"{died} exited with code {service.returncode}: stopping the rest")
        status = 1
    except KeyboardInterrupt:
        cluster.say("stopping (Ctrl-C, SIGTERM or SIGHUP)")
    except launcher.LauncherError as exc:
        cluster.say(f"cannot start the cluster: {exc}")
        status = 1
    finally:
        signal.signal(signal.SIGHUP, signal.SIG_IGN)  # a second one (see Cluster.stop) must not abort the stop
        cluster.stop()
    return status


if __name__ == "__main__":
    sys.exit(main())

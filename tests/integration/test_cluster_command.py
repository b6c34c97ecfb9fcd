"""``python cluster.py``, the README's first command, run whole: a private Redis (none answers at
its ``REDIS_URL``), auth, the worker, two push nodes, Flower and the demo page.  The message its
banner tells the reader to send reaches a browser connected as its banner says; the signal of a
closed terminal (SIGHUP) stops every process it started."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
import urllib.request

import psutil
import pytest
import redis as redis_lib

import launcher
from tests.integration.wsclient import Client

READY = "Send alice a message:"

pytestmark = [pytest.mark.slow, pytest.mark.timeout(150)]


async def test_the_cluster_command_delivers_the_banners_message_and_sighup_stops_every_process(tmp_path):
    auth_port, node_a, node_b, flower, demo = (launcher.free_port() for _ in range(5))
    dead_redis = f"redis://127.0.0.1:{launcher.free_port()}"
    # A key of the reader's own: the banner prints $AUTH_ADMIN_KEY, which their shell expands.
    env = launcher.cluster_env(dead_redis, tmp_path / "data", auth_port, LOG_LEVEL="INFO", AUTH_ADMIN_KEY="a-key-of-the-readers-own")
    # cluster.py leaves SIGHUP alone when it starts with it ignored (nohup), as it would if the
    # suite itself ran under nohup: the terminal's default for it, as a reader's shell gives it.
    hup = signal.signal(signal.SIGHUP, signal.SIG_DFL)
    try:
        cluster = launcher.Service("cluster", [sys.executable, "cluster.py", "--nodes", f"{node_a},{node_b}", "--flower-port", str(flower),
                                                "--demo-port", str(demo)], env, log_path=tmp_path / "cluster.log").start()
    finally:
        signal.signal(signal.SIGHUP, hup)
    started: list[psutil.Process] = []
    try:
        cluster.wait_log(READY, timeout=90)
        lines = (tmp_path / "cluster.log").read_text().splitlines()
        send_line = lines[next(i for i, line in enumerate(lines) if READY in line) + 1]
        token_line = lines[next(i for i, line in enumerate(lines) if "Get a token for alice:" in line) + 1]
        started = psutil.Process(cluster.pid).children(recursive=True)
        names = " ".join(" ".join(p.cmdline()) for p in started)
        for part in ("redis-server", "-m auth", "worker worker", f"--port {node_a}", f"--port {node_b}", "flower", "-m demo"):
            assert part in names, f"{part!r} is not among cluster.py's processes: {names}"
        # On REDIS_URL's own port (free, on this host): the default URLs, business code's among them, reach it.
        assert f"  redis      {dead_redis}/1 (private)" in cluster.log_tail(2000), cluster.log_tail(60)

        # The banner's curl, as the reader's shell runs it (its arguments printed, one a line).
        said = subprocess.run(["bash", "-c", 'curl() { printf "%s\\n" "$@"; }; ' + token_line.strip()], env=env, capture_output=True, text=True, timeout=10)
        arguments = said.stdout.splitlines()
        assert arguments[arguments.index("-d") + 1] == json.dumps({"user_id": "alice"}), arguments
        headers = dict(arguments[n + 1].split(": ", 1) for n, argument in enumerate(arguments) if argument == "-H")
        assert headers["Authorization"] == "Bearer a-key-of-the-readers-own", arguments
        request = urllib.request.Request(f"http://127.0.0.1:{auth_port}/tokens", data=json.dumps({"user_id": "alice"}).encode(), headers=headers)
        with urllib.request.urlopen(request, timeout=10) as response:
            token = json.loads(response.read())["token"]
        client = await Client.connect(f"ws://127.0.0.1:{node_a}/ws?token={token}", wait_resumed=True)
        # The banner's own command, as a reader pastes it.
        # ... from another folder than the repository, where ./dev runs cluster.py.
        sent = subprocess.run(shlex.split(send_line), cwd=tmp_path, env={**env, "PYTHONPATH": ""}, capture_output=True, text=True, timeout=60)
        assert sent.returncode == 0, sent.stderr[-2000:]
        [message] = await client.messages(1)
        assert message["data"] == {"text": "hello"}
        client.close()

        os.kill(cluster.pid, signal.SIGHUP)
        assert cluster.wait(60) == 0, cluster.log_tail(60)
        assert "stopping (Ctrl-C, SIGTERM or SIGHUP)" in cluster.log_tail(2000)
        _, alive = psutil.wait_procs(started, timeout=5)
        assert not alive, f"still running after cluster.py stopped: {[' '.join(p.cmdline()) for p in alive]}"
    finally:
        cluster.kill()
        for child in started:
            try:
                child.kill()
            except psutil.NoSuchProcess:
                pass


def cluster_command(name: str, env: dict, log_path) -> launcher.Service:
    """``python cluster.py`` on one free node port, without Flower and the demo page, started."""
    return launcher.Service(name, [sys.executable, "cluster.py", "--nodes", str(launcher.free_port()), "--no-flower", "--no-demo"],
                            env, log_path=log_path).start()


def stopped_at_once(cluster: launcher.Service, timeout: float = 30) -> str:
    """The end of the log of a ``cluster.py`` that must stop at once with exit status 1 (stopped
    when it does not)."""
    try:
        assert cluster.wait(timeout) == 1, cluster.log_tail(60)
        return cluster.log_tail(60)
    finally:
        if cluster.alive:
            cluster.terminate(timeout=90)


def test_a_second_cluster_on_the_redis_of_a_running_one_stops_at_once_naming_it(tmp_path, redis_server):
    """Two clusters on one Redis (the second given other ports, as the busy-port message said,
    but the same system Redis) shared its queues and routes: each worker stored what it took in
    its own DATA_DIR, and half of each cluster's messages never reached the other's browsers."""
    redis_url, broker_url = redis_server.url(11), redis_server.url(12)

    def started(name: str) -> launcher.Service:
        env = launcher.cluster_env(redis_url, tmp_path / name, launcher.free_port(), broker_url=broker_url, REDIS_URL=redis_url)
        return cluster_command(name, env, tmp_path / f"{name}.log")

    first = started("first")
    try:
        first.wait_log(READY, timeout=90)
        second = started("second")
        out = stopped_at_once(second)
        assert f"another cluster uses the Redis at REDIS_URL={redis_url}" in out and "give this one a Redis of its own" in out, out
        assert str(tmp_path / "first") in out, out
        assert "starting auth" not in out, out
        assert first.alive
    finally:
        first.terminate(timeout=90)
    assert redis_lib.Redis.from_url(redis_url).get("push:cluster") in (None, b"released"), "the stopped cluster left its claim"


def test_a_second_cluster_on_the_private_redis_of_a_running_one_stops_at_once_naming_it(tmp_path):
    """The private Redis a cluster starts (none answered at its REDIS_URL) was not claimed: a
    second cluster given the Redis the first one's banner prints (REDIS_URL, and its db 0 as
    BROKER_URL) started, and the two shared its queues and routes, as on a system Redis."""
    first_env = launcher.cluster_env(f"redis://127.0.0.1:{launcher.free_port()}", tmp_path / "first", launcher.free_port())
    first = cluster_command("first", first_env, tmp_path / "first.log")
    try:
        first.wait_log(READY, timeout=90)
        banner = first.log_tail(400)
        [redis_url] = [line.split()[1] for line in banner.splitlines() if line.startswith("  redis ") and "(private)" in line]
        [broker_url] = [line.split()[1] for line in banner.splitlines() if line.startswith("  broker ")]
        env = launcher.cluster_env(redis_url, tmp_path / "second", launcher.free_port(), broker_url=broker_url, REDIS_URL=redis_url)
        second = cluster_command("second", env, tmp_path / "second.log")
        out = stopped_at_once(second)
        assert f"another cluster uses the Redis at REDIS_URL={redis_url}" in out, out
        assert str(tmp_path / "first") in out and "starting auth" not in out, out
        assert first.alive
    finally:
        first.terminate(timeout=90)
    assert first.returncode == 0, first.log_tail(60)


def test_the_clusters_claim_is_renewed_from_when_it_is_taken_not_only_once_the_cluster_watches(tmp_path, redis_server, monkeypatch):
    """The claim was renewed only by ``watch``, after every process answered: a start-up longer
    than ``CLAIM_SECONDS`` (a slow worker on a loaded machine) let it lapse, and a second cluster
    could start on the same Redis meanwhile."""
    import cluster

    monkeypatch.setattr(cluster, "CLAIM_SECONDS", 2)
    url = redis_server.url(13)
    client = redis_lib.Redis.from_url(url)
    client.delete(cluster.CLAIM_KEY)
    claims = cluster.RedisClaims(tmp_path, 1)
    claims.take("REDIS_URL", url)
    try:
        time.sleep(5)  # two and a half claim lifetimes, and no watch()
        assert client.get(cluster.CLAIM_KEY) == claims.value.encode(), "the claim lapsed while the cluster was starting"
        assert 0 < client.pttl(cluster.CLAIM_KEY) <= 2000
    finally:
        claims.give_up()
    assert client.get(cluster.CLAIM_KEY) in (None, b"released")
    time.sleep(1.5)  # the renewal stopped with give_up: nothing takes the claim again
    assert client.get(cluster.CLAIM_KEY) in (None, b"released")


def test_the_cluster_command_names_broker_url_at_once_when_only_redis_url_answers(tmp_path, redis_server):
    """REDIS_URL set to a Redis that answers, BROKER_URL to one that does not (a reader who set
    REDIS_URL alone has it at its default, 6379): cluster.py stops before starting anything, naming
    BROKER_URL, instead of waiting a minute for a worker that retries the broker."""
    dead_broker = f"redis://127.0.0.1:{launcher.free_port()}/0"
    env = launcher.cluster_env(redis_server.url(), tmp_path / "data", launcher.free_port(), broker_url=dead_broker)
    cluster = cluster_command("cluster", env, tmp_path / "cluster.log")
    out = stopped_at_once(cluster, 20)
    assert f"none at BROKER_URL={dead_broker}" in out, out
    assert f"BROKER_URL={redis_server.url(0)} for the same Redis" in out, out
    assert "starting auth" not in out, out


def test_the_cluster_command_with_a_data_dir_it_cannot_use_stops_at_once_saying_so(tmp_path):
    """DATA_DIR a file (or a folder it cannot write), no Redis answering: the private Redis's
    folder could not be made, and cluster.py ended in a traceback."""
    not_a_folder = tmp_path / "data"
    not_a_folder.write_text("a file")
    dead = f"redis://127.0.0.1:{launcher.free_port()}"
    env = launcher.cluster_env(f"{dead}/0", not_a_folder, launcher.free_port(), broker_url=f"{dead}/0", REDIS_URL=f"{dead}/1")
    cluster = cluster_command("cluster", env, tmp_path / "cluster.log")
    out = stopped_at_once(cluster, 20)
    assert f"cannot start the cluster: DATA_DIR={str(not_a_folder)!r}" in out and "set DATA_DIR to a writable local folder" in out, out
    assert "Traceback" not in out and "starting" not in out, out


def test_the_cluster_command_with_a_private_redis_keeps_a_redis_broker_url_that_answers(tmp_path, redis_server):
    """No Redis at REDIS_URL, a Redis BROKER_URL that answers (set to the reader's own, where the
    business code they wrote sends): cluster.py starts its private Redis for the rest, but keeps
    that broker, as it kept an amqp:// one; it used the private Redis's db 0 instead, and the
    business code's tasks waited on a broker no worker read."""
    broker = redis_server.url(5)
    env = launcher.cluster_env(f"redis://127.0.0.1:{launcher.free_port()}", tmp_path / "data", launcher.free_port(), broker_url=broker)
    cluster = cluster_command("cluster", env, tmp_path / "cluster.log")
    try:
        cluster.wait_log(READY, timeout=90)
        out = cluster.log_tail(400)
        assert "(private)" in out and f"  broker     {broker}\n" in out + "\n", out
    finally:
        cluster.terminate(timeout=60)
    assert cluster.returncode == 0, cluster.log_tail(60)

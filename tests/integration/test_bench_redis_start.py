"""bench/e2e.py and a real redis-server whose start failed: the server runs but never answers PING
(it is stuck opening its dump file, a FIFO nobody writes to), so ``RedisServer.start`` gives up
after its wait, stops the server it started (since 2026-12-05; before, ``stop_all`` had to) and
raises; no server is left running, and ``stop_all`` still removes the bench's folder."""

import argparse
import os
import sys
from pathlib import Path

import psutil
import pytest

import launcher

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
e2e = pytest.importorskip("e2e")


def _running(process: psutil.Process) -> bool:
    """Whether ``process`` still runs (a zombie nobody has reaped yet counts as gone)."""
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_e2e_stops_a_redis_server_whose_start_failed(monkeypatch):
    start = launcher.RedisServer.start
    monkeypatch.setattr(launcher.RedisServer, "start", lambda self, timeout=2.0: start(self, timeout))  # its PING wait, 20 s
    b = e2e.Bench(argparse.Namespace(users=1, log_level="INFO", flower=None, keep=False))
    data_dir = (b.tmp / "redis").resolve()  # where start_cluster runs redis-server
    data_dir.mkdir()
    os.mkfifo(data_dir / "dump.rdb")  # redis-server opens it at start, before it answers anything
    servers: list[psutil.Process] = []
    try:
        with pytest.raises(launcher.LauncherError, match="was not answering PING"):
            b.start_cluster()
        servers = [child for child in psutil.Process().children(recursive=True) if _running(child) and Path(child.cwd()) == data_dir]
        assert not servers, "the redis-server that did not answer was left running"
        b.stop_all()
        assert not b.tmp.exists()
    finally:
        for server in servers:
            if _running(server):  # left running: stopped here
                server.kill()
                server.wait(10)
        b.keep = False
        b._remove_tmp()

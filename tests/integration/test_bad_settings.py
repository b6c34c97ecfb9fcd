"""A bad setting stops every command with one line on stderr, ``PROG: error: MESSAGE`` naming the
variable, and exit status 2, without a traceback (``startup.py``); they printed the traceback of
``settings``' import, ten lines (seventy under ``celery``), with status 1.  Nothing is reached
before the refusal, so no Redis or broker is needed."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CELERY = [sys.executable, "-m", "celery", "-A", "worker"]

COMMANDS = {
    "node": ([sys.executable, "-m", "wsnode", "--port", "9999"], "python -m wsnode"),
    "auth": ([sys.executable, "-m", "auth"], "python -m auth"),
    "demo": ([sys.executable, "-m", "demo", "--port", "9999"], "python -m demo"),
    "cluster": ([sys.executable, "cluster.py"], "cluster.py"),
    "worker": ([*CELERY, "worker"], "celery -A worker"),
}


def run(argv: list[str], **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(argv, cwd=REPO, env={**os.environ, **env}, capture_output=True, text=True, timeout=60)


#: (variable, bad value, what the error says of it): a word where a number goes, and a number of
#: seconds too large for the timers it feeds (``BROKER_TIMEOUT`` of 10**10 s overflowed the socket
#: timeouts: the worker stopped with a traceback, and a node started and stayed not ready).
BAD_VALUES = [("PING_INTERVAL", "abc", "a whole number of seconds (invalid literal for int() with base 10: 'abc')"),
              ("BROKER_TIMEOUT", "10000000000", "a whole number of seconds (must be greater than 0 and at most 100000000)")]


@pytest.mark.parametrize("name, value, expected", BAD_VALUES, ids=["a word", "too large"])
@pytest.mark.parametrize("role", COMMANDS)
def test_a_bad_setting_stops_the_command_with_one_line_naming_it_and_status_2(role, name, value, expected):
    argv, prog = COMMANDS[role]
    done = run(argv, **{name: value})
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.splitlines() == [f"{prog}: error: {name}={value!r} is not valid: expected {expected}"], done.stderr[-2000:]


def test_auth_refusing_development_secrets_in_production_says_so_in_one_line_with_status_2():
    done = run(COMMANDS["auth"][0], PUSH_ENV="production")
    assert done.returncode == 2, done.stderr[-2000:]
    [line] = done.stderr.splitlines()
    assert line.startswith("python -m auth: error: PUSH_ENV=production but AUTH_SECRET, AUTH_ADMIN_KEY still hold the development value"), line


def test_importing_the_worker_outside_the_celery_command_still_raises_settings_error():
    """Only the commands turn it into an exit: a script or a test that imports the app gets the
    exception, to catch or to read in its traceback."""
    done = run([sys.executable, "-c", "import worker"], PING_INTERVAL="abc")
    assert done.returncode == 1 and "Traceback" in done.stderr, done.stderr[-2000:]
    assert done.stderr.splitlines()[-1].startswith("settings.SettingsError: PING_INTERVAL='abc' is not valid"), done.stderr[-2000:]


@pytest.mark.parametrize("value", ["127.0.0.1 ", "node\nb", "nœud"], ids=["a trailing space", "a line break", "not ASCII"])
def test_a_node_host_redis_cannot_name_a_client_by_stops_the_node_at_start(value):
    """``NODE_HOST='127.0.0.1 '`` (from a .env file) started a node that never wrote a lease:
    Redis refused its client name ``wsnode:127.0.0.1 :PORT``, /healthz said Redis was down, and
    every browser was closed with 1013."""
    done = run(COMMANDS["node"][0], NODE_HOST=value)
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.splitlines() == [f"python -m wsnode: error: NODE_HOST={value!r} is not valid: expected a host name or IP address "
                                        "(printable ASCII only, no spaces or line breaks, at most 253 characters)"]
    by_option = run([*COMMANDS["node"][0], "--host", value])
    assert by_option.returncode == 2 and "is not a host name or IP address" in by_option.stderr, by_option.stderr[-2000:]


@pytest.mark.parametrize("value", ["push-1.internal", "10.0.0.7", "[::1]", "node_b", "fe80::1%eth0", "Push-1.Example.COM."])
def test_host_names_and_ip_addresses_are_taken(value):
    import settings

    assert settings._host(value) == value


def test_a_worker_whose_data_dir_cannot_hold_the_store_stops_at_start_with_one_line(tmp_path, redis_server):
    """With the embedded store, a DATA_DIR that is a file (or a folder of another user) made a
    worker that said "ready" and failed every request at once, without retrying."""
    a_file = tmp_path / "not-a-folder"
    a_file.write_text("")
    done = run([*CELERY, "worker", "--pool", "solo"], DATA_DIR=str(a_file), MONGO_URL="", REDIS_URL=redis_server.url(14),
               BROKER_URL=redis_server.url(15), RESULT_BACKEND=redis_server.url(15))
    assert done.returncode == 2, done.stderr[-2000:]
    lines = [line for line in done.stderr.splitlines() if line.startswith("celery -A worker worker: error:")]
    assert len(lines) == 1 and f"DATA_DIR={str(a_file)!r}" in lines[0] and "cannot hold the message store" in lines[0], done.stderr[-2000:]
    assert "set DATA_DIR to a local folder the worker's user" in lines[0]

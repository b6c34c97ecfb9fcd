"""A Redis that starts refusing a running process: its password changed (``CONFIG SET
requirepass``, the connections then dropped, as a restart or a blip drops them), or its ACL user's
rights narrowed (``ACL SETUSER``, which takes effect on the connections already open).  Each
process said so as if Redis were down ("Redis did not answer ...; check that Redis is running",
"Redis unavailable", "Cannot connect ... Trying again"); now each says what Redis refused and
what to fix, in the words of the check at start (:mod:`redislogin`), and keeps retrying: once the
password is given back, it works again without a restart.

One private ``redis-server`` with a password for the module; each test gives the password back
(and the ACL user its rights) before it ends."""

from __future__ import annotations

import contextlib
import json
import time
import urllib.error
import urllib.request

import pytest
import redis as redis_lib

import launcher
from tests.integration.conftest import ADMIN_KEY

PASSWORD = "the-password"
USER, USER_PASSWORD = "push-app", "user-password"
LEAST_ACL = "~* &* +@all -@dangerous +info"

#: The start of the line :func:`redislogin.message` gives for a wrong password.
WRONG_PASSWORD = "Redis refused the user name and password of {name} (redis://:***@"

pytestmark = pytest.mark.timeout(90)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    server = launcher.RedisServer(data_dir=tmp_path_factory.mktemp("refusing"), password=PASSWORD).start()
    admin = _admin(server, PASSWORD)
    admin.execute_command("ACL", "SETUSER", USER, "on", f">{USER_PASSWORD}", *LEAST_ACL.split())
    admin.close()
    yield server
    server.stop()


def _admin(server: launcher.RedisServer, password: str) -> redis_lib.Redis:
    return redis_lib.Redis(port=server.port, password=password, single_connection_client=True, decode_responses=True)


@contextlib.contextmanager
def password_changed(server: launcher.RedisServer):
    """Redis takes another password from now on; every other client is disconnected, so each
    process logs in again (and is refused).  The password is given back on the way out."""
    admin = _admin(server, PASSWORD)
    admin.config_set("requirepass", "another-password")
    admin.client_kill_filter(_type="normal", skipme=True)
    admin.client_kill_filter(_type="pubsub")
    try:
        yield
    finally:
        admin.config_set("requirepass", PASSWORD)
        admin.close()


def http(port: int, path: str, body: dict | None = None, headers: dict | None = None) -> tuple[int, dict]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=None if body is None else json.dumps(body).encode(),
                                     headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def wait_for(check, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"not {what} within {timeout:g} s")
        time.sleep(0.2)


def test_auth_answers_a_changed_password_as_a_refusal_naming_redis_url_and_works_again_once_it_is_given_back(server, tmp_path):
    env = launcher.cluster_env(server.url(0), tmp_path, launcher.free_port(), LOG_LEVEL="INFO")
    port = int(env["AUTH_PORT"])
    auth = launcher.start_auth(env, port, log_path=tmp_path / "auth.log")
    try:
        status, issued = http(port, "/tokens", {"user_id": "alice"}, {"Authorization": f"Bearer {ADMIN_KEY}"})
        assert status == 200, issued
        with password_changed(server):
            status, health = http(port, "/healthz")
            assert status == 503 and health["status"] == "redis refused", health
            assert health["reason"].startswith(WRONG_PASSWORD.format(name="REDIS_URL")) and "correct them" in health["reason"], health
            status, verified = http(port, "/verify", {"token": issued["token"]})
            assert status == 503 and WRONG_PASSWORD.format(name="REDIS_URL") in verified["error"], verified
            assert "Redis is running" not in auth.log_tail(20)
            auth.wait_log("cannot verify jti=")
            assert WRONG_PASSWORD.format(name="REDIS_URL") in auth.log_tail(5)
        assert http(port, "/healthz") == (200, {"status": "ok"})
        assert http(port, "/verify", {"token": issued["token"]})[0] == 200
    finally:
        auth.terminate()

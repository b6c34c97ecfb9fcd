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
import shutil
import time
import urllib.error
import urllib.request

import pytest
import redis as redis_lib

import launcher
from tasks.ids import IdGenerator
from tests.integration.conftest import ADMIN_KEY, business_app, http_json, release_results

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
    return http_json(f"http://127.0.0.1:{port}{path}", body, headers)


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


def test_auth_whose_redis_user_may_not_read_the_revocation_list_answers_healthz_503_and_logs_its_error_once(server, tmp_path):
    """A user that may PING but not MGET (its rights narrowed): /healthz PINGed, answered 200 while
    every /verify answered 503, and each probe ended auth's outage, whose ERROR line the next
    /verify wrote again (one per probe, and "Redis answers again after 0 s" between them)."""
    env = launcher.cluster_env(server.url(0), tmp_path, launcher.free_port(), LOG_LEVEL="INFO",
                               REDIS_URL=f"redis://{USER}:{USER_PASSWORD}@127.0.0.1:{server.port}/1")
    port = int(env["AUTH_PORT"])
    auth = launcher.start_auth(env, port, log_path=tmp_path / "auth.log")
    admin = _admin(server, PASSWORD)
    try:
        status, issued = http(port, "/tokens", {"user_id": "alice"}, {"Authorization": f"Bearer {ADMIN_KEY}"})
        assert status == 200, issued
        admin.execute_command("ACL", "SETUSER", USER, "-mget")  # NOPERM at once, on the open connections too
        for _ in range(3):
            status, verified = http(port, "/verify", {"token": issued["token"]})
            assert status == 503 and "no permissions to run the 'mget' command" in verified["error"], verified
            status, body = health(port)
            assert status == 503 and body["status"] == "redis refused" and "'mget'" in body["reason"], body
        auth.wait_log("health check:")
        log = (tmp_path / "auth.log").read_text(errors="replace")
        assert log.count("auth.app: Redis unavailable:") == 1 and "Redis answers again" not in log, log
        admin.execute_command("ACL", "SETUSER", USER, "+@all", "-@dangerous", "+info")
        assert health(port) == (200, {"status": "ok"})
        auth.wait_log("Redis answers again after")
        assert "6 requests failed meanwhile" in auth.log_tail(5)
    finally:
        admin.execute_command("ACL", "SETUSER", USER, "+@all", "-@dangerous", "+info")
        admin.close()
        auth.terminate()


def health(port: int) -> tuple[int, dict]:
    return http(port, "/healthz")


def test_a_node_says_redis_refuses_its_password_in_healthz_and_its_log_lines_and_is_ready_again_once_it_is_given_back(server, tmp_path):
    env = launcher.cluster_env(server.url(0), tmp_path, launcher.free_port(), LOG_LEVEL="INFO", LEASE_TTL=3)
    port = launcher.free_port()
    node = launcher.start_node(env, port, log_path=tmp_path / "node.log")
    try:
        with password_changed(server):
            refused_both = WRONG_PASSWORD.format(name="REDIS_URL")
            # The queue consumer may see the refusal before the node's PING does (every
            # REDIS_PING_SECONDS): wait for both, not for the first of them.
            status, body = wait_for(lambda: ((answer := health(port))[0] == 503 and answer[1]["reason"].startswith(refused_both)
                                             and "BROKER_URL" in answer[1]["reason"] and answer),
                                    15, "503 naming both variables")
            assert body["reason"].startswith(refused_both) and "correct them" in body["reason"], body
            assert "queue consumer not connected to the broker: " + WRONG_PASSWORD.format(name="BROKER_URL") in body["reason"], body
            node.wait_log("lease renewal failed for 0 users (" + refused_both, timeout=10)
            node.wait_log("queue 127.0.0.1:%d: %s" % (port, WRONG_PASSWORD.format(name="BROKER_URL")), timeout=10)
            node.wait_log("no subscription to auth:revocations: " + refused_both, timeout=10)
        node.wait_http_ok(f"http://127.0.0.1:{port}/healthz", timeout=20)
        log = (tmp_path / "node.log").read_text()
        assert "Redis does not answer PING" not in log and "broker connection lost (invalid username-password pair" not in log
        assert log.count("no subscription to auth:revocations") == 1  # once per change of state, not per retry
    finally:
        node.terminate()


def test_a_node_whose_redis_users_rights_are_narrowed_says_what_to_grant_in_healthz_and_its_log(server, tmp_path):
    env = launcher.cluster_env(server.url(0), tmp_path, launcher.free_port(), LOG_LEVEL="INFO", LEASE_TTL=3,
                               REDIS_URL=f"redis://{USER}:{USER_PASSWORD}@127.0.0.1:{server.port}/1")
    port = launcher.free_port()
    node = launcher.start_node(env, port, log_path=tmp_path / "node.log")
    admin = _admin(server, PASSWORD)
    try:
        admin.execute_command("ACL", "SETUSER", USER, "-@scripting", "-ping")  # the lease scripts, PING: NOPERM on the open connections too
        status, body = wait_for(lambda: (answer := health(port))[0] == 503 and answer, 10, "503")
        assert body["reason"].startswith(f"the Redis user of REDIS_URL (redis://{USER}:***@127.0.0.1:{server.port}/1) may not run a command"), body
        assert "no permissions to run the" in body["reason"] and "+@all -@dangerous +info" in body["reason"], body
        node.wait_log("lease renewal failed for 0 users (the Redis user of REDIS_URL", timeout=10)
        node.wait_log("Redis refuses PING: the Redis user of REDIS_URL", timeout=10)
        time.sleep(2.5)  # another PING refused alike: no second line
        admin.execute_command("ACL", "SETUSER", USER, "+@all", "-@dangerous", "+info")
        node.wait_http_ok(f"http://127.0.0.1:{port}/healthz", timeout=10)
        log = (tmp_path / "node.log").read_text()
        assert log.count("Redis refuses PING") == 1 and "Redis does not answer PING" not in log
    finally:
        admin.execute_command("ACL", "SETUSER", USER, "+@all", "-@dangerous", "+info")
        admin.close()
        node.terminate()


def scrape(port: int, name: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
        text = answer.read().decode()
    return float(next(line.split()[-1] for line in text.splitlines() if line.startswith(name + " ")))


def test_a_node_whose_redis_user_loses_its_channels_stays_ready_and_says_it_hears_no_revocations(server, tmp_path):
    env = launcher.cluster_env(server.url(0), tmp_path, launcher.free_port(), LOG_LEVEL="INFO",
                               REDIS_URL=f"redis://{USER}:{USER_PASSWORD}@127.0.0.1:{server.port}/1")
    port = launcher.free_port()
    node = launcher.start_node(env, port, log_path=tmp_path / "node.log")
    admin = _admin(server, PASSWORD)
    try:
        node.wait_http_ok(f"http://127.0.0.1:{port}/healthz", timeout=10)
        wait_for(lambda: health(port)[1]["revocations"], 10, "subscribed")
        assert scrape(port, "push_node_revocations_subscribed") == 1
        admin.execute_command("ACL", "SETUSER", USER, "resetchannels")  # Redis drops the subscription it no longer allows
        node.wait_log("no subscription to auth:revocations: ", timeout=10)
        status, body = health(port)
        assert status == 200 and body["ready"] is True and body["revocations"] is False, body
        assert scrape(port, "push_node_revocations_subscribed") == 0
        admin.execute_command("ACL", "SETUSER", USER, "allchannels")
        wait_for(lambda: health(port)[1]["revocations"], 10, "subscribed again")
        assert scrape(port, "push_node_revocations_subscribed") == 1
    finally:
        admin.execute_command("ACL", "SETUSER", USER, "allchannels")
        admin.close()
        node.terminate()


def test_a_worker_says_redis_refuses_its_password_where_celery_said_cannot_connect_and_goes_on_once_it_is_given_back(server, tmp_path):
    env = launcher.cluster_env(server.url(0), tmp_path, launcher.free_port(), LOG_LEVEL="INFO", HOUSEKEEPING_SECONDS=1)
    worker = launcher.start_worker(env, concurrency=1, log_path=tmp_path / "worker.log")
    try:
        with password_changed(server):
            worker.wait_log("consumer: Cannot connect to redis://:**@127.0.0.1:%d/0: %s" % (server.port, WRONG_PASSWORD.format(name="BROKER_URL")),
                            timeout=15)
            worker.wait_log("housekeeping not scheduled this time: " + WRONG_PASSWORD.format(name="REDIS_URL"), timeout=10)
        worker.wait_log("Connected to redis://:**@", timeout=20)
        assert "Cannot connect to redis://:**@127.0.0.1:%d/0: invalid" % server.port not in (tmp_path / "worker.log").read_text()
    finally:
        worker.terminate()


def failures(log_path, task: str) -> list[str]:
    """Celery's lines (with the traceback) of each failure of ``task`` in a worker's log."""
    return [part.split("\n[")[0] for part in log_path.read_text().split(f"] Task {task}[")[1:] if "raised unexpected" in part.split("\n")[0]]


def test_a_collect_whose_redis_user_lost_its_rights_fails_saying_what_to_grant_in_the_log_and_its_result(server, tmp_path):
    redis_url = f"redis://{USER}:{USER_PASSWORD}@127.0.0.1:{server.port}/1"
    env = launcher.cluster_env(server.url(0), tmp_path, launcher.free_port(), LOG_LEVEL="INFO", REDIS_URL=redis_url, HOUSEKEEPING_SECONDS=1)
    worker = launcher.start_worker(env, concurrency=1, log_path=tmp_path / "worker.log")
    business = business_app(env["BROKER_URL"], redis_url)
    admin = _admin(server, PASSWORD)
    try:
        admin.execute_command("ACL", "SETUSER", USER, "-@scripting")  # Dispatch's route lookup
        result = business.send_task("tasks.collect", kwargs={"to": ["narrowed"], "data": {"n": 1}}, queue="collect")
        with pytest.raises(Exception) as failed:
            result.get(timeout=20)
        expected = f"the Redis user of REDIS_URL (redis://{USER}:***@127.0.0.1:{server.port}/1) may not run a command the platform needs"
        assert str(failed.value).startswith(expected), failed.value
        worker.wait_log(f"tasks.collect: a batch of 1 failed: {expected}", timeout=5)
        # tasks.dispatch (which Collect queues when its inline routing fails): Celery's own line
        message = {"id": IdGenerator().next_id(), "to": ["narrowed"], "data": {"n": 2}, "ts": time.time()}
        business.send_task("tasks.dispatch", args=[[message]], queue="dispatch")
        # Each task's own failure (housekeeping's, every second, came first on a loaded machine
        # and satisfied a wait for any "raised unexpected").
        for task in ("tasks.dispatch", "tasks.housekeeping"):
            worker.wait_ready(lambda task=task: len(failures(tmp_path / "worker.log", task)) > 0, timeout=20, what=f"done with a failed {task}")
        for task in ("tasks.dispatch", "tasks.housekeeping"):  # in each task's own traceback
            assert f"NoPermissionError: {expected}" in failures(tmp_path / "worker.log", task)[0], task
    finally:
        admin.execute_command("ACL", "SETUSER", USER, "+@all", "-@dangerous", "+info")
        admin.close()
        release_results(business)
        business.close()
        worker.terminate()


def test_a_node_whose_redis_certificate_is_replaced_by_one_its_ca_did_not_sign_says_so_in_healthz(tmp_path):
    """A server of its own: over TLS, restarted with a certificate of another CA."""
    if shutil.which("openssl") is None:
        pytest.skip("no openssl command to make the test's CAs with")
    ours, other = launcher.make_tls_files(tmp_path / "ca"), launcher.make_tls_files(tmp_path / "other-ca")
    try:
        tls = launcher.RedisServer(data_dir=tmp_path / "redis", tls=ours).start()
    except launcher.LauncherError as exc:
        if "tls-port" in str(exc):
            pytest.skip(f"this redis-server is built without TLS ({exc})")
        raise
    env = launcher.cluster_env(tls.url(0), tmp_path, launcher.free_port(), LOG_LEVEL="INFO", LEASE_TTL=3)
    port = launcher.free_port()
    node = launcher.start_node(env, port, log_path=tmp_path / "node.log")
    try:
        tls.tls = other
        tls.restart()
        status, body = wait_for(lambda: (answer := health(port))[0] == 503 and "BROKER_URL" in answer[1]["reason"] and answer,
                                15, "503 naming both variables")
        assert body["reason"].startswith("the TLS certificate of the Redis of REDIS_URL (rediss://127.0.0.1:"), body
        assert "did not verify (self-signed certificate in certificate chain): set ssl_ca_certs" in body["reason"], body
        assert "queue consumer not connected to the broker: the TLS certificate of the Redis of BROKER_URL" in body["reason"], body
    finally:
        node.kill()
        tls.stop()

"""The platform against a Redis as production runs it: with a password (``requirepass``), with an
ACL user of the least rights the README gives, and over TLS (``rediss://``, the server's
certificate checked against a CA this module makes).  Each runs a message end to end on real
processes (business ``send_task`` -> Collect -> Dispatch -> node -> a WebSocket client), and no
process writes the password in its log.  A wrong password stops auth, a node and the worker at
start with one line naming the variable; a certificate the CA did not sign, a node.

One private ``redis-server`` per kind of Redis, each shared by the module's tests of that kind."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys
import urllib.parse
import urllib.request

import pytest
import redis as redis_lib

import launcher
from tests.integration.conftest import Cluster, business_app, get_result, release_results, start_or_explain
from wsnode.closecodes import CloseCode

#: Every character a URL gives a meaning to, and a space: percent-encoded in the URLs (launcher.RedisServer.url).
PASSWORD = "p@ss:w/rd?#%&+ x"
#: The README's rights for the platform's Redis user (Configuration): every key and channel, every
#: command but Redis's @dangerous ones (KEYS, FLUSHDB, CONFIG, CLIENT LIST ...), except INFO,
#: which housekeeping reads.
LEAST_ACL = "~* &* +@all -@dangerous +info"

pytestmark = pytest.mark.timeout(120)


def _server(tmp_path_factory, name: str, **kw) -> launcher.RedisServer:
    return launcher.RedisServer(data_dir=tmp_path_factory.mktemp(name), **kw).start()


@pytest.fixture(scope="module")
def password_redis(tmp_path_factory):
    server = _server(tmp_path_factory, "requirepass", password=PASSWORD)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def acl_redis(tmp_path_factory):
    server = _server(tmp_path_factory, "acl", password=PASSWORD, user="push-app", acl=LEAST_ACL)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory):
    if shutil.which("openssl") is None:
        pytest.skip("no openssl command to make the test's CA with")
    return launcher.make_tls_files(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def tls_redis(tmp_path_factory, tls_files):
    try:
        server = _server(tmp_path_factory, "tls", password=PASSWORD, user="push-app", acl=LEAST_ACL, tls=tls_files)
    except launcher.LauncherError as exc:
        if "tls-port" in str(exc) and ("Bad directive" in str(exc) or "not supported" in str(exc).lower()):
            pytest.skip(f"this redis-server ({launcher.find_redis_server()}) is built without TLS: it refuses tls-port")
        raise
    yield server
    server.stop()


def start_cluster(server: launcher.RedisServer, tmp_path) -> Cluster:
    cluster = Cluster(server, tmp_path, broker_url=server.url(0), auth_port=launcher.free_port())
    return start_or_explain(cluster, nodes=1)


async def one_message_end_to_end(cluster: Cluster, user: str) -> None:
    client = await cluster.connect(user)
    message_id = await cluster.collect(user, {"through": user})
    assert await client.messages(1) == [{"type": "message", "id": message_id, "data": {"through": user}}]
    client.close()


def assert_password_not_logged(cluster: Cluster) -> None:
    forms = {PASSWORD, urllib.parse.quote(PASSWORD, safe=""), urllib.parse.quote(PASSWORD), PASSWORD.replace(" ", "+")}
    for log in cluster.logs.glob("*.log"):
        text = log.read_text(errors="replace")
        assert not [form for form in forms if form in text], f"{log.name} holds the password"


async def test_the_platform_delivers_through_a_redis_with_requirepass_and_a_password_full_of_url_characters(password_redis, tmp_path):
    cluster = start_cluster(password_redis, tmp_path)
    try:
        await one_message_end_to_end(cluster, "requirepass-user")
    finally:
        cluster.stop(at_once=True)
    assert_password_not_logged(cluster)


async def test_the_platform_delivers_revokes_and_keeps_house_as_an_acl_user_with_the_readmes_least_rights(acl_redis, tmp_path):
    cluster = start_cluster(acl_redis, tmp_path)
    try:
        await one_message_end_to_end(cluster, "acl-user")
        # auth's revocation list and announcement, the node's subscription
        client = await cluster.connect("acl-revoked")
        await asyncio.to_thread(cluster.revoke, {"user_id": "acl-revoked"})
        assert (await client.closed())[0] == CloseCode.UNAUTHORIZED
        # the worker's housekeeping (its lock, redelivery, the purge) ran under the same user
        cluster.worker.wait_ready(lambda: any("tasks.housekeeping[" in line and " succeeded " in line for line in cluster.worker.log_tail(2000).splitlines()),
                                  timeout=10, what="done with a housekeeping run")
    finally:
        cluster.stop(at_once=True)
    logs = "\n".join(log.read_text(errors="replace") for log in cluster.logs.glob("*.log"))
    assert "no permissions" not in logs.lower() and "NOPERM" not in logs
    assert_password_not_logged(cluster)


async def test_the_platform_delivers_over_tls_checking_the_servers_certificate_with_the_projects_broker_transport(tls_redis, tmp_path):
    cluster = start_cluster(tls_redis, tmp_path)
    try:
        # What the project's transport does and kombu's stock one does not: an item of a queue that
        # is not a message is dropped, where kombu's raised out of the worker's loop.
        redis_lib.Redis.from_url(cluster.env["BROKER_URL"]).lpush("collect", "not a kombu message")
        await one_message_end_to_end(cluster, "tls-user")
        cluster.worker.wait_log("dropped an item of queue 'collect' that is not a kombu message", timeout=10)
        # Flower's Broker page reads the TLS options from broker_use_ssl, and lists the queues.
        port = launcher.free_port()
        cluster.services.append(launcher.start_flower(cluster.env, port, log_path=cluster._log("flower")))
        page = await asyncio.to_thread(lambda: urllib.request.urlopen(f"http://127.0.0.1:{port}/broker", timeout=20).read().decode())
        assert '<td>collect</td>' in page and PASSWORD not in page and urllib.parse.quote(PASSWORD, safe="") not in page
    finally:
        cluster.stop(at_once=True)
    assert_password_not_logged(cluster)


def test_a_wrong_password_stops_auth_a_node_and_the_worker_at_start_with_one_line_naming_the_variable(password_redis, tmp_path):
    wrong = password_redis.url(0, password="not-the-password")
    env = launcher.cluster_env(wrong, tmp_path, launcher.free_port(), LOG_LEVEL="INFO")
    commands = {
        "auth": ([sys.executable, "-m", "auth"], "python -m auth: error: Redis refused the user name and password of REDIS_URL"),
        "node": ([sys.executable, "-m", "wsnode", "--port", str(launcher.free_port())],
                 "python -m wsnode: error: Redis refused the user name and password of REDIS_URL"),
        "worker": ([sys.executable, "-m", "celery", "-A", "worker", "worker", "-c", "1", "--without-gossip", "--without-mingle"],
                   "celery -A worker worker: error: Redis refused the user name and password of BROKER_URL"),
    }
    running = {name: subprocess.Popen(argv, cwd=launcher.REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for name, (argv, _) in commands.items()}
    try:
        for name, process in running.items():
            try:
                _, stderr = process.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                pytest.fail(f"{name} still runs 30 s after it started with a wrong password")
            errors = [line for line in stderr.splitlines() if ": error: " in line]
            assert process.returncode == 2 and len(errors) == 1, f"{name}: {process.returncode}\n{stderr[-3000:]}"
            assert errors[0].startswith(commands[name][1]) and "correct them" in errors[0], errors[0]
            assert "not-the-password" not in stderr and "Traceback" not in stderr, stderr[-3000:]
    finally:
        for process in running.values():
            if process.poll() is None:
                process.kill()
                process.communicate()


def test_a_node_given_another_ca_than_the_one_that_signed_redis_certificate_stops_with_one_line(tls_redis, tmp_path):
    other = launcher.make_tls_files(tmp_path / "other-ca")
    url = tls_redis.url(1).replace(urllib.parse.quote(str(tls_redis.tls.ca), safe=""), urllib.parse.quote(str(other.ca), safe=""))
    env = launcher.cluster_env(url, tmp_path, launcher.free_port(), LOG_LEVEL="INFO")
    done = subprocess.run([sys.executable, "-m", "wsnode", "--port", str(launcher.free_port())], cwd=launcher.REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 2, done.stderr[-3000:]
    assert "python -m wsnode: error: the TLS certificate of the Redis of REDIS_URL" in done.stderr and "set ssl_ca_certs" in done.stderr


@pytest.mark.parametrize("acl, command", [("~* &* +@all -@dangerous", "info"), (f"{LEAST_ACL} -@scripting", "eval")], ids=["info", "scripting"])
def test_a_worker_whose_redis_user_may_not_run_a_command_it_needs_stops_at_start_saying_what_to_grant(tmp_path, acl, command):
    """Housekeeping reads INFO server and errorstats: without INFO, every run failed with a
    traceback.  The leases, the routes and the pending marks are Lua scripts: a user without
    @scripting started, and each dispatch failed with a traceback."""
    with launcher.RedisServer(data_dir=tmp_path / "redis", password=PASSWORD, user="push-app", acl=acl) as server:
        env = launcher.cluster_env(server.url(0), tmp_path, launcher.free_port(), LOG_LEVEL="INFO")
        done = subprocess.run([sys.executable, "-m", "celery", "-A", "worker", "worker", "-c", "1", "--without-gossip", "--without-mingle"],
                              cwd=launcher.REPO_ROOT, env=env, capture_output=True, text=True, timeout=30)
    assert done.returncode == 2, done.stderr[-3000:]
    assert "celery -A worker worker: error: the Redis user of " in done.stderr and "(redis://push-app:***@" in done.stderr
    assert f"no permissions to run the '{command}' command" in done.stderr and "+@all -@dangerous +info" in done.stderr


def test_a_worker_whose_broker_is_its_redis_url_still_has_its_users_right_to_info_checked(tmp_path):
    """BROKER_URL and REDIS_URL the same URL: the login was tried once, for BROKER_URL, which needs
    no INFO, so the worker started and every housekeeping run failed with a traceback."""
    with launcher.RedisServer(data_dir=tmp_path / "redis", password=PASSWORD, user="push-app", acl="~* &* +@all -@dangerous") as server:
        env = launcher.cluster_env(server.url(0), tmp_path, launcher.free_port(), broker_url=server.url(1), LOG_LEVEL="INFO")
        assert env["BROKER_URL"] == env["REDIS_URL"]
        worker = subprocess.Popen([sys.executable, "-m", "celery", "-A", "worker", "worker", "-c", "1", "--without-gossip", "--without-mingle"],
                                  cwd=launcher.REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            _, stderr = worker.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            worker.kill()
            _, stderr = worker.communicate()
            pytest.fail(f"the worker still runs 30 s after it started with a Redis user denied INFO\n{stderr[-3000:]}")
    assert worker.returncode == 2, stderr[-3000:]
    assert "celery -A worker worker: error: the Redis user of" in stderr and "REDIS_URL" in stderr, stderr[-3000:]
    assert "no permissions to run the 'info' command" in stderr and "+info" in stderr


def test_a_node_whose_broker_url_names_a_kombu_credential_provider_starts(tmp_path):
    """kombu reads ``credential_provider`` (a class path) from a broker URL's query, which redis-py
    takes for an object: the login check at start failed on it with an AttributeError traceback,
    where the node had started; the URL is the broker library's to judge."""
    with launcher.RedisServer(data_dir=tmp_path / "redis") as server:
        broker = server.url(0) + "?credential_provider=redis.credentials.UsernamePasswordCredentialProvider"
        env = launcher.cluster_env(server.url(0), tmp_path, launcher.free_port(), broker_url=broker, LOG_LEVEL="INFO")
        node = launcher.start_node(env, launcher.free_port(), timeout=30)
        node.terminate()


def test_the_cluster_command_given_a_wrong_password_says_so_rather_than_start_a_private_redis(password_redis, tmp_path):
    env = launcher.cluster_env(password_redis.url(0, password="not-the-password"), tmp_path, launcher.free_port(), LOG_LEVEL="INFO")
    done = subprocess.run([sys.executable, "cluster.py", "--nodes", str(launcher.free_port()), "--no-flower", "--no-demo"],
                          cwd=launcher.REPO_ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1, done.stdout[-3000:]
    assert "cannot start the cluster: Redis refused the user name and password of REDIS_URL (redis://:***@" in done.stdout, done.stdout[-3000:]
    assert "private" not in done.stdout and "not-the-password" not in done.stdout + done.stderr


def test_a_plain_redis_url_to_a_redis_that_serves_tls_only_stops_a_node_saying_to_write_rediss(tls_redis, tmp_path):
    """Redis resets a plain connection to its TLS port: every process took that for an outage and
    waited for ever ("Redis did not answer ... check that Redis is running"), and cluster.py started
    a private Redis in its place."""
    plain = tls_redis.url(1).replace("rediss://", "redis://", 1).partition("?")[0]
    env = launcher.cluster_env(plain, tmp_path, launcher.free_port(), LOG_LEVEL="INFO")
    done = subprocess.run([sys.executable, "-m", "wsnode", "--port", str(launcher.free_port())], cwd=launcher.REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 2, done.stderr[-3000:]
    assert "python -m wsnode: error: the Redis of REDIS_URL (redis://push-app:***@" in done.stderr, done.stderr[-3000:]
    assert "serves TLS only" in done.stderr and "rediss://" in done.stderr and "Traceback" not in done.stderr


def test_a_worker_and_a_node_whose_redis_user_has_no_channels_stop_at_start_saying_what_to_grant(tmp_path):
    """Redis 7 gives a new user no channels (acl-pubsub-default resetchannels): without ``&*`` the
    worker died at start with Celery's "Unrecoverable error" traceback, and a node said it was ready
    while it could not hear a revocation and its replays timed out."""
    with launcher.RedisServer(data_dir=tmp_path / "redis", password=PASSWORD, user="push-app", acl="~* +@all -@dangerous +info") as server:
        env = launcher.cluster_env(server.url(0), tmp_path, launcher.free_port(), LOG_LEVEL="INFO")
        commands = {"worker": [sys.executable, "-m", "celery", "-A", "worker", "worker", "-c", "1", "--without-gossip", "--without-mingle"],
                    "node": [sys.executable, "-m", "wsnode", "--port", str(launcher.free_port())]}
        for name, argv in commands.items():
            done = subprocess.run(argv, cwd=launcher.REPO_ROOT, env=env, capture_output=True, text=True, timeout=30)
            assert done.returncode == 2, f"{name}: {done.stderr[-3000:]}"
            assert "no permissions to access one of the channels" in done.stderr and "&*" in done.stderr, done.stderr[-3000:]
            assert "Traceback" not in done.stderr, done.stderr[-3000:]


def test_a_worker_whose_user_loses_its_channel_rights_while_it_runs_reconnects_until_they_are_back(tmp_path):
    """A worker as the README starts it (Celery's mingle on: a hello PUBLISHed to the other workers
    at each connection).  The user's channels taken away (``ACL SETUSER ... resetchannels``) and its
    connections cut: the refused hello stopped the worker for good ("Unrecoverable error:
    OperationalError"), where the README says it goes on by itself once the rights are back."""
    with launcher.RedisServer(data_dir=tmp_path / "redis", password=PASSWORD, user="push-app", acl="~* &* +@all") as server:
        env = launcher.cluster_env(server.url(0), tmp_path, launcher.free_port(), LOG_LEVEL="INFO")
        worker = launcher.start_worker(env, concurrency=1, mingle=True, log_path=tmp_path / "worker.log")
        admin = redis_lib.Redis.from_url(server.url(1))
        business = business_app(server.url(0), server.url(1))
        try:
            admin.execute_command("ACL", "SETUSER", "push-app", "resetchannels")
            admin.execute_command("CLIENT", "KILL", "USER", "push-app", "SKIPME", "yes")
            worker.wait_log("lacks a right the worker uses", timeout=30)
            assert worker.alive
            admin.execute_command("ACL", "SETUSER", "push-app", "&*")
            # get_result: the business app's own connections are this user's, cut above as well.
            assert get_result(business.send_task("tasks.presence", args=[["nobody"]], queue="dispatch"), timeout=60) == {"nobody": []}
            assert worker.alive
        finally:
            release_results(business)
            business.close()
            admin.close()
            worker.terminate(10)
    log = (tmp_path / "worker.log").read_text(errors="replace")
    assert "Unrecoverable error" not in log
    assert "the broker refused a command on the worker's channel: this user has no permissions to access one of the channels" in log


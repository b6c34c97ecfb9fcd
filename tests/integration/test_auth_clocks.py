"""Auth's revocation list when clocks disagree: an in-process ``AuthService`` whose clock is not
Redis's (another host), against a private redis-server.

Revocation entries must outlive the tokens they cover by auth's clock, which decides whether a
token has expired; Redis expires keys by its own.  With absolute expiry times (EXAT), an auth
whose clock ran behind Redis's by N seconds had each entry vanish N seconds before its token
expired, and the revoked token verified again meanwhile.
"""

from __future__ import annotations

import time

import pytest
import redis.asyncio

import launcher
from auth.app import AuthService
from auth.revocations import CLOCK_MARGIN_SECONDS
from tests.integration.conftest import post_json

SECRET = "clock-test-secret-0123456789-abcdefghijklmnopqrstuvwxyz"
ADMIN_KEY = "clock-test-admin-key-0123456789"
#: How far auth's clock runs behind Redis's in these tests.
BEHIND = 30.0


@pytest.fixture(scope="module")
def redis_server():
    with launcher.RedisServer() as server:
        yield server


@pytest.fixture
async def auth_behind(redis_server):
    """An AuthService on a free port whose clock is ``BEHIND`` seconds behind Redis's; yields
    ``(base URL, Redis client)``."""
    client = redis.asyncio.Redis.from_url(redis_server.url(1))
    service = AuthService(SECRET, ADMIN_KEY, client, token_ttl=3600, clock=lambda: time.time() - BEHIND)
    port = service.start(0, "127.0.0.1")
    try:
        yield f"http://127.0.0.1:{port}", client
    finally:
        await service.stop()
        await client.flushdb()
        await client.aclose()


async def post(base: str, path: str, body: dict, admin: bool = False) -> tuple[int, dict]:
    return await post_json(base + path, body, ADMIN_KEY if admin else None)


@pytest.mark.parametrize("revoke", ["token", "user_id"])
async def test_a_revocation_outlives_its_token_by_auths_clock_when_auths_clock_is_behind_redis(auth_behind, revoke):
    base, client = auth_behind
    status, issued = await post(base, "/tokens", {"user_id": "quinn", "ttl": 2}, admin=True)
    assert status == 200, issued
    assert await post(base, "/revoke", {"token": issued["token"]} if revoke == "token" else {"user_id": "quinn"}, admin=True) == (200, {"revoked": "token" if revoke == "token" else "user"})

    # By auth's clock the token lives about 2 s more; by Redis's it expired 28 s ago.
    assert (await post(base, "/verify", {"token": issued["token"]}))[1] == {"error": "token revoked"}
    [key] = await client.keys("auth:revoked:jti:*" if revoke == "token" else "auth:revoked:user:quinn")
    left = await client.pttl(key)
    # The token's entry lasts its token's life plus the margin; the user's, TOKEN_TTL plus the margin.
    lives = 2 if revoke == "token" else 3600
    assert (lives + CLOCK_MARGIN_SECONDS - 2) * 1000 <= left <= (lives + CLOCK_MARGIN_SECONDS + 1) * 1000, left


async def test_auth_processes_on_hosts_five_seconds_apart_agree_on_revocations_by_redis_clock(redis_server):
    """Each auth process reads Redis's clock (``redisclock``, as ``python -m auth`` does): on
    their hosts' clocks, a revocation of a user through one 5 s behind missed the token another
    issued 0.5 s before, and through one 5 s ahead refused the user's new tokens for 5 s."""
    import redisclock

    client = redis.asyncio.Redis.from_url(redis_server.url(2))
    services, bases = [], {}
    try:
        for name, skew in (("on time", 0.0), ("behind", -5.0), ("ahead", 5.0)):
            clock = redisclock.RedisClock(name, wall=lambda skew=skew: time.time() + skew, host_within=redisclock.WARN_SECONDS)
            await redisclock.anchor_async(clock, client)
            assert clock.offset is not None and abs(clock.offset - skew) < 0.5
            service = AuthService(SECRET, ADMIN_KEY, client, token_ttl=3600, clock=clock.now)
            services.append(service)
            bases[name] = f"http://127.0.0.1:{service.start(0, '127.0.0.1')}"

        status, issued = await post(bases["on time"], "/tokens", {"user_id": "rae"}, admin=True)
        assert status == 200, issued
        time.sleep(0.5)
        assert (await post(bases["behind"], "/revoke", {"user_id": "rae"}, admin=True))[0] == 200
        assert (await post(bases["on time"], "/verify", {"token": issued["token"]}))[1] == {"error": "token revoked"}

        assert (await post(bases["ahead"], "/revoke", {"user_id": "sam"}, admin=True))[0] == 200
        time.sleep(1.1)  # tokens carry whole seconds: one issued a second later is after the cutoff
        status, again = await post(bases["on time"], "/tokens", {"user_id": "sam"}, admin=True)
        assert status == 200, again
        assert (await post(bases["ahead"], "/verify", {"token": again["token"]}))[0] == 200, "a token issued after the revocation"
    finally:
        for service in services:
            await service.stop()
        await client.flushdb()
        await client.aclose()

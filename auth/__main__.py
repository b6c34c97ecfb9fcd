"""``python -m auth``: run the Auth service until SIGTERM or SIGINT, then exit 0.

Main thread; the HTTP server and the Redis client live on the one asyncio loop of ``asyncio.run``.
Settings come from ``settings.py`` (``AUTH_PORT``, ``BIND_ADDRESS``, ``AUTH_SECRET``,
``AUTH_SECRET_PREVIOUS``, ``AUTH_ADMIN_KEY``, ``AUTH_ADMIN_KEY_PREVIOUS``, ``TOKEN_TTL``, ``REQUEST_TIMEOUT``, ``REDIS_URL``).  The service starts even when Redis is down:
``/healthz`` answers 503 and ``/verify`` refuses tokens until Redis is back; a Redis that refuses
its login (a wrong password in ``REDIS_URL``) stops it at start with one line (``redislogin``).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys

import redis.asyncio
import tornado.ioloop
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff

import startup

with startup.exit_on_bad_settings("python -m auth", __name__ == "__main__"):
    import redisclock
    import redislogin
    import settings
    from auth.app import AuthService
    from auth.revocations import RevocationsUnavailable

log = logging.getLogger("auth")

#: Seconds any one Redis call may take before the request gets a 503.
REDIS_TIMEOUT = 2.0


def connect_redis(url: str) -> redis.asyncio.Redis:
    """A client that fails fast (one quick retry) so an outage turns into 503s, not hung requests."""
    return redis.asyncio.Redis.from_url(
        url,
        socket_timeout=REDIS_TIMEOUT,
        socket_connect_timeout=REDIS_TIMEOUT,
        retry=Retry(ExponentialBackoff(cap=0.2, base=0.05), 1),
    )


async def serve() -> int:
    client = connect_redis(settings.REDIS_URL)
    # Tokens' iat and exp and revocation cutoffs by Redis's clock, which every auth process
    # shares (redisclock): an auth process whose host ran 5 s behind another's missed, in a
    # revocation, the tokens the other issued in the 5 s before it.
    clock = redisclock.RedisClock("auth", host_within=redisclock.WARN_SECONDS)
    await redisclock.anchor_async(clock, client)
    anchoring = tornado.ioloop.PeriodicCallback(lambda: redisclock.anchor_async(clock, client), redisclock.RETRY_SECONDS * 1000)
    anchoring.start()
    service = AuthService(settings.AUTH_SECRET, settings.AUTH_ADMIN_KEY, client, settings.TOKEN_TTL, clock=clock.now,
                          previous_secrets=settings.AUTH_SECRET_PREVIOUS, previous_admin_keys=settings.AUTH_ADMIN_KEY_PREVIOUS,
                          request_timeout=settings.REQUEST_TIMEOUT)
    # Handlers first: a SIGTERM that arrives once /healthz answers must stop the service cleanly.
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopping.set)
    try:
        try:
            port = service.start(settings.AUTH_PORT, settings.BIND_ADDRESS)
        except OSError as exc:
            log.error("cannot listen on %s:%d (%s): set AUTH_PORT to a free port or BIND_ADDRESS to a local address", settings.BIND_ADDRESS, settings.AUTH_PORT, exc)
            return 1
        log.info("listening on http://%s:%d (tokens live %ds)", settings.BIND_ADDRESS, port, settings.TOKEN_TTL)
        log_rotation()
        try:
            await service.revocations.ping()
        except RevocationsUnavailable as exc:
            log.warning("starting without Redis, /healthz answers 503 until it is back: %s", exc)
        await stopping.wait()
        log.info("stopping: no new connections, closing open ones")
        await service.stop()
        return 0
    finally:
        anchoring.stop()
        await client.aclose()


def log_rotation() -> None:
    """Say which previous secrets and admin keys are still accepted (how many: never the values)."""
    if settings.AUTH_SECRET_PREVIOUS:
        log.info("tokens signed with %d previous secret(s) of AUTH_SECRET_PREVIOUS still verify until they expire; new ones are "
                 "signed with AUTH_SECRET: remove them once TOKEN_TTL (%ds) has passed since every auth process signs with AUTH_SECRET "
                 "(auth_verifications_previous_secret_total then stays flat)", len(settings.AUTH_SECRET_PREVIOUS), settings.TOKEN_TTL)
    if settings.AUTH_ADMIN_KEY_PREVIOUS:
        log.info("%d previous admin key(s) of AUTH_ADMIN_KEY_PREVIOUS still accepted: remove them once every business backend sends "
                 "AUTH_ADMIN_KEY (auth_admin_previous_key_requests_total then stays flat)", len(settings.AUTH_ADMIN_KEY_PREVIOUS))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """No options (everything is a setting); ``--help`` says so, and any argument is refused rather
    than ignored: ``python -m auth --help`` used to start the service on ``AUTH_PORT``."""
    parser = argparse.ArgumentParser(
        prog="python -m auth",
        description="Run the auth service: it issues tokens (POST /tokens), verifies them for the push nodes (POST /verify) "
                    "and revokes them (POST /revoke), until SIGTERM or SIGINT.",
        epilog="It takes no options: its settings are environment variables (AUTH_PORT, BIND_ADDRESS, AUTH_SECRET, "
               "AUTH_SECRET_PREVIOUS, AUTH_ADMIN_KEY, AUTH_ADMIN_KEY_PREVIOUS, TOKEN_TTL, REQUEST_TIMEOUT, REDIS_URL, PUSH_ENV, LOG_LEVEL); "
               "see the README's Configuration.")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    parse_args(argv)
    settings.configure_logging("auth")
    try:
        settings.check_secrets()
    except settings.SettingsError as exc:  # PUSH_ENV=production with development or short secrets
        startup.refuse("python -m auth", exc)
    log.info("revocation list in Redis at %s", settings.redact(settings.REDIS_URL))
    # A Redis that refuses the login (a wrong password) stops auth with one line; one that does not
    # answer does not (/healthz answers 503 until it is back).
    redislogin.check("python -m auth", ("REDIS_URL",))
    code = asyncio.run(serve())
    log.info("stopped")
    return code


if __name__ == "__main__":
    sys.exit(main())

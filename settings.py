"""Every setting of the platform, read from the environment once, here and nowhere else.

Each value is converted to its type when this module is imported; a bad value stops the process
with an error that names the variable, the value it had, and the form that was expected (a
``SettingsError``, which each command turns into one line on stderr and exit status 2: ``startup.py``).
Every variable has a local default, so a development machine needs none of them.  The converters
are :mod:`settingtypes`'s (pure: a ValueError, which :func:`_read` makes a ``SettingsError`` naming
the variable); the masking of a URL's password in logs and errors, :mod:`redaction`'s.  Imported by
every process; any thread.

Import this module, never ``os.environ``::

    import settings
    settings.REDIS_URL
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Mapping
from typing import TypeVar

import redaction
import settingtypes
from redaction import shown
from settingtypes import (MAX_SECONDS, _choice, _connect_rate, _database_name, _host, _non_negative_float, _non_negative_int, _non_negative_ms,
                          _origins, _port, _positive_float, _positive_int, _positive_seconds, _result_backend, _url)

T = TypeVar("T")

log = logging.getLogger(__name__)

#: Named through this module by their callers: ``settings.redact(url)`` wherever a backend's
#: address is logged; the ``type`` of the command-line options that take a host or a port.
redact = redaction.redact
host_argument = settingtypes.host_argument
port_argument = settingtypes.port_argument

DEV_AUTH_SECRET = "dev-secret-change-me-in-production"
DEV_AUTH_ADMIN_KEY = "dev-admin-key-change-me"


class SettingsError(ValueError):
    """An environment variable holds a value the platform cannot use."""


def _read(env: Mapping[str, str], name: str, default: T, convert: Callable[[str], T], expected: str) -> T:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        return convert(raw)
    except (TypeError, ValueError) as exc:
        raise SettingsError(f"{name}={shown(raw)!r} is not valid: expected {expected} ({exc})") from None


def _secret_list(env: Mapping[str, str], name: str, current: str, admin_key: bool) -> tuple[str, ...]:
    """The comma-separated secrets (or admin keys) of ``name``, in order, without empty items,
    repeats, or ``current`` (the one in force, accepted anyway).  An error never shows the value.

    An item with whitespace around it is refused: ``old1, old2`` would be read as ``" old2"``, a
    different key, and the tokens it signed (or the backends that send it) refused after all.  An
    admin key outside ASCII is refused as ``AUTH_ADMIN_KEY`` is."""
    items = [item for item in (env.get(name) or "").split(",") if item]
    for number, item in enumerate(items, 1):
        which = f"{name} item {number} of {len(items)}" if len(items) > 1 else name
        if item != item.strip():
            raise SettingsError(f"{which} starts or ends with whitespace, so it would never match: separate the items with commas "
                                "alone, without spaces (a secret or key that holds a comma cannot be listed)")
        if admin_key and not item.isascii():
            raise SettingsError(f"{which} holds characters outside ASCII, which HTTP clients send in different encodings in the "
                                "Authorization header: an admin key must be ASCII")
    return tuple(item for number, item in enumerate(items) if item != current and item not in items[:number])


_env = os.environ

#: ``development`` (default) or ``production``; in production the auth service refuses to start with
#: development or short secrets (:func:`check_secrets`).
PUSH_ENV: str = _read(_env, "PUSH_ENV", "development", _choice("development", "production"), "development or production")

BROKER_URL: str = _read(_env, "BROKER_URL", "redis://127.0.0.1:6379/0", _url("redis", "rediss", "amqp", "amqps", "pyamqp"), "a redis:// or amqp:// URL")
REDIS_URL: str = _read(_env, "REDIS_URL", "redis://127.0.0.1:6379/1", _url("redis", "rediss", "unix"), "a redis:// URL")
#: Where Celery keeps task results (the message ids ``tasks.collect`` returns).
RESULT_BACKEND: str = _read(_env, "RESULT_BACKEND", REDIS_URL, _result_backend, "a Celery result backend URL")
MONGO_URL: str | None = _read(_env, "MONGO_URL", None, _url("mongodb", "mongodb+srv"), "a mongodb:// URL")
MONGO_DB: str = _read(_env, "MONGO_DB", "push", _database_name, "a MongoDB database name")
DATA_DIR: str = _read(_env, "DATA_DIR", "./data", str, "a folder path")

AUTH_URL: str = _read(_env, "AUTH_URL", "http://127.0.0.1:8000", _url("http", "https"), "an http:// URL").rstrip("/")
AUTH_PORT: int = _read(_env, "AUTH_PORT", 8000, _port, "a TCP port")
AUTH_SECRET: str = _read(_env, "AUTH_SECRET", DEV_AUTH_SECRET, str, "a long random string")
AUTH_ADMIN_KEY: str = _read(_env, "AUTH_ADMIN_KEY", DEV_AUTH_ADMIN_KEY, str, "a long random string")
# Checked here rather than by _read, whose error would print the key.  HTTP trims a header value,
# so a key that starts or ends with whitespace could never match any Authorization header.
if AUTH_ADMIN_KEY != AUTH_ADMIN_KEY.strip():
    raise SettingsError("AUTH_ADMIN_KEY starts or ends with whitespace (a trailing newline of a secret file?), which no Authorization "
                        "header can carry, so every admin request would be refused: remove the whitespace from the value")
# Auth reads header bytes as Latin-1 (Tornado): a key outside ASCII matches only clients that send
# it in Latin-1, never one that sends UTF-8 (curl, Go, Node), which gets 401 with the right key.
if not AUTH_ADMIN_KEY.isascii():
    raise SettingsError("AUTH_ADMIN_KEY holds characters outside ASCII, which HTTP clients send in different encodings in the "
                        "Authorization header, so the right key would be refused to some of them: use ASCII, such as "
                        "python -c 'import secrets; print(secrets.token_urlsafe(32))' prints")
#: Secrets ``AUTH_SECRET`` held before (comma-separated, newest first): tokens signed with them still
#: verify until they expire; new tokens are signed with ``AUTH_SECRET`` alone.  Drop them once
#: ``TOKEN_TTL`` has passed since auth stopped signing with them (README, "Rotating the secrets").
AUTH_SECRET_PREVIOUS: tuple[str, ...] = _secret_list(_env, "AUTH_SECRET_PREVIOUS", AUTH_SECRET, admin_key=False)
#: Admin keys accepted besides ``AUTH_ADMIN_KEY`` (comma-separated), while business backends move
#: to it.  ``AUTH_ADMIN_KEY`` stays the one key that this project's own clients (the demo) send.
AUTH_ADMIN_KEY_PREVIOUS: tuple[str, ...] = _secret_list(_env, "AUTH_ADMIN_KEY_PREVIOUS", AUTH_ADMIN_KEY, admin_key=True)
#: Lifetime of an issued token, in seconds.
TOKEN_TTL: int = _read(_env, "TOKEN_TTL", 3600, _positive_seconds, "a whole number of seconds")
#: How long a connection whose token expired stays open for the client to send a newer one
#: (``{"type": "refresh"}``) before the node closes it with 4401 "token expired" (Centrifugo's
#: ``client_expired_close_delay``).
TOKEN_EXPIRY_GRACE: float = _read(_env, "TOKEN_EXPIRY_GRACE", 25.0, _non_negative_float, "a number of seconds (0 or more)")
#: How long a push node trusts a verified token before asking auth again (bounds how long a revoked
#: token keeps opening connections on a node that saw it recently).
AUTH_CACHE_SECONDS: float = _read(_env, "AUTH_CACHE_SECONDS", 5.0, _non_negative_float, "a number of seconds (0 disables the cache)")

NODE_HOST: str = _read(_env, "NODE_HOST", "127.0.0.1", _host, "a host name or IP address")
#: Address every HTTP/WebSocket server of the platform listens on; ``0.0.0.0`` for every interface.
BIND_ADDRESS: str = _read(_env, "BIND_ADDRESS", "127.0.0.1", str, "a host name or IP address to listen on")
#: Comma-separated origins browsers may connect from, or ``*`` for any.
ALLOWED_ORIGINS: tuple[str, ...] = _read(_env, "ALLOWED_ORIGINS", ("*",), _origins, "a comma-separated list of origins such as https://app.example.com, or *")
#: A route lease (user -> node) lives this long unless its node renews it; renewed every third of it.
LEASE_TTL: float = _read(_env, "LEASE_TTL", 30.0, _positive_float, "a number of seconds")
#: Most WebSocket connections one push node holds; past it the node answers new handshakes with
#: HTTP 503 ("connect to another node").  0: no limit (Centrifugo's ``client_connection_limit``).
MAX_CONNECTIONS: int = _read(_env, "MAX_CONNECTIONS", 0, _non_negative_int, "a whole number (0 for no limit)")
#: Most connections one user holds on one push node; past it a new one is closed with 4429.
#: 0: no limit (Centrifugo's ``client_user_connection_limit``).
MAX_USER_CONNECTIONS: int = _read(_env, "MAX_USER_CONNECTIONS", 0, _non_negative_int, "a whole number (0 for no limit)")
#: Most connects one user may make in any window of seconds, across the whole cluster (every node
#: counts them in one log per user in Redis), as ``(COUNT, SECONDS)``; past it a new connection is
#: closed with 4429 "too many connects of this user, retry in N s".  None (``0``, the default): no
#: limit (Centrifugo PRO's per-user connection rate limits).
MAX_USER_CONNECTS: tuple[int, int] | None = _read(_env, "MAX_USER_CONNECTS", None, _connect_rate,
                                                  "0 (no limit) or COUNT/SECONDS, two whole numbers: 30/60 is at most 30 connects "
                                                  "of one user in any 60 seconds")
#: A push node pings each connection this often, in whole seconds ...
PING_INTERVAL: int = _read(_env, "PING_INTERVAL", 25, _positive_seconds, "a whole number of seconds")
#: ... and closes it (1000, "ping timed out") when its pong has not come this many seconds after
#: the ping (a dead peer goes within PING_INTERVAL + PING_TIMEOUT); at most PING_INTERVAL.
PING_TIMEOUT: int = _read(_env, "PING_TIMEOUT", 20, _positive_seconds, "a whole number of seconds")
if PING_TIMEOUT > PING_INTERVAL:
    raise SettingsError(f"PING_TIMEOUT={PING_TIMEOUT} is longer than PING_INTERVAL={PING_INTERVAL}: set it to at most the interval")
#: Seconds a push node (and auth) gives a client to send a request's headers (the WebSocket
#: handshake, ``/healthz``, ``/metrics``; auth's routes), and again its body, and keeps an idle
#: keep-alive connection open (Tornado's ``idle_connection_timeout`` is both; a node's connections
#: to auth are such, and its next token check connects again).  Behind a load balancer that keeps
#: idle connections to the nodes open longer (nginx's upstream ``keepalive_timeout``, 60 s; an AWS ALB's
#: idle timeout, 60 s), set it above that, or the balancer may send a request on a connection the
#: node is closing (a 502 now and then).
REQUEST_TIMEOUT: int = _read(_env, "REQUEST_TIMEOUT", 10, _positive_seconds, "a whole number of seconds")
#: Largest ``data`` a message may carry, serialised as JSON, in bytes; at most
#: ``MAX_MESSAGE_BYTES_LIMIT``, near what fits in one MongoDB document (16 MiB: BSON can take 6
#: times JSON's bytes, for a list of small numbers).  A message whose document would still be too
#: big (with many recipients) fails alone (``tasks.messages.document_problem``).
MAX_MESSAGE_BYTES_LIMIT = 2_000_000
MAX_MESSAGE_BYTES: int = _read(_env, "MAX_MESSAGE_BYTES", 65536, _positive_int, "a whole number of bytes")
if MAX_MESSAGE_BYTES > MAX_MESSAGE_BYTES_LIMIT:
    raise SettingsError(f"MAX_MESSAGE_BYTES={MAX_MESSAGE_BYTES} is over {MAX_MESSAGE_BYTES_LIMIT}: a message's document could pass MongoDB's "
                        "16 MiB limit; send large payloads as a reference (a URL) instead")
#: Largest frame a browser may send to a push node, in bytes (larger closes with 1009).  At least
#: ``MIN_FRAME_BYTES``: a ``refresh`` frame carries a whole token (about 2,260 bytes for the longest
#: auth issues, a user id of 128 characters outside the BMP), and a smaller limit closed every such
#: refresh with 1009, and its reconnect asked for a token again.
MIN_FRAME_BYTES = 2560
MAX_FRAME_BYTES: int = _read(_env, "MAX_FRAME_BYTES", 4096, _positive_int, "a whole number of bytes")
if MAX_FRAME_BYTES < MIN_FRAME_BYTES:
    raise SettingsError(f"MAX_FRAME_BYTES={MAX_FRAME_BYTES} is under {MIN_FRAME_BYTES}: a browser's refresh frame carries a whole token "
                        f"(up to about 2,260 bytes) and would close its connection with 1009; set it to {MIN_FRAME_BYTES} or more "
                        "(the default is 4096)")
#: A push node closes a connection with 4008 ("client too slow") when new messages come for it
#: while more than this many bytes written to it still wait for its socket to take them: a client
#: that stops reading cannot make the node hold its messages without bound.  It reconnects with
#: ``since`` and gets what it missed from the store.
CLIENT_QUEUE_MAX_BYTES: int = _read(_env, "CLIENT_QUEUE_MAX_BYTES", 1 << 20, _positive_int, "a whole number of bytes")
#: Most recipients one message may name.
MAX_RECIPIENTS: int = _read(_env, "MAX_RECIPIENTS", 10000, _positive_int, "a whole number")
#: How long messages are kept for ``since`` resume, in seconds.
RETENTION_SECONDS: int = _read(_env, "RETENTION_SECONDS", 86400, _positive_seconds, "a whole number of seconds")
#: A resume replays from this many milliseconds before the ``since`` id, so that messages collected
#: concurrently on other worker processes are not skipped; clients drop the repeats by id.
RESUME_OVERLAP_MS: int = _read(_env, "RESUME_OVERLAP_MS", 2000, _non_negative_ms, "a whole number of milliseconds")
#: Most messages one resume replays (the oldest beyond it are skipped and the client is told).
REPLAY_LIMIT: int = _read(_env, "REPLAY_LIMIT", 10000, _positive_int, "a whole number")
#: What a message frame adds to its ``data``'s JSON: ``{"type":"message","id":"<24 hex>","data":}``
#: (``wsnode.protocol.message_frame``; tests/unit/test_replay_bytes.py checks the two agree).
MESSAGE_FRAME_OVERHEAD = 58
#: Most bytes of message frames one opening replay sends (UTF-8, as the node writes them; the
#: oldest beyond it are left out, as beyond ``REPLAY_LIMIT``, and the client is told).  The default,
#: 16 MiB, changes nothing for ordinary messages (10,000 messages of 1.6 KB).  At least one
#: message's largest frame, ``MAX_MESSAGE_BYTES + MESSAGE_FRAME_OVERHEAD``, so that a replay can
#: always carry its newest message.
REPLAY_MAX_BYTES: int = _read(_env, "REPLAY_MAX_BYTES", 16 << 20, _positive_int, "a whole number of bytes")
if REPLAY_MAX_BYTES < MAX_MESSAGE_BYTES + MESSAGE_FRAME_OVERHEAD:
    raise SettingsError(f"REPLAY_MAX_BYTES={REPLAY_MAX_BYTES} is under one message's largest frame, MAX_MESSAGE_BYTES={MAX_MESSAGE_BYTES} "
                        f"plus {MESSAGE_FRAME_OVERHEAD}: a replay could not carry its newest message; set it to at least "
                        f"{MAX_MESSAGE_BYTES + MESSAGE_FRAME_OVERHEAD} (the default is {16 << 20}), or lower MAX_MESSAGE_BYTES")
#: For this long after a connection's opening replay, live copies of the messages it replayed are
#: dropped by the node (their dispatch was slower than the replay).
REPLAY_DEDUP_SECONDS: float = _read(_env, "REPLAY_DEDUP_SECONDS", 30.0, _positive_float, "a number of seconds")
#: How long a node waits for a replay before closing the connection with 1013 (try again).
REPLAY_TIMEOUT: float = _read(_env, "REPLAY_TIMEOUT", 15.0, _positive_float, "a number of seconds")
#: Acks are sent to the worker in batches at least this often (seconds) ...
RECEIPT_FLUSH_SECONDS: float = _read(_env, "RECEIPT_FLUSH_SECONDS", 0.5, _positive_float, "a number of seconds")
#: ... or as soon as this many are waiting.
RECEIPT_BATCH: int = _read(_env, "RECEIPT_BATCH", 1000, _positive_int, "a whole number")
#: ``tasks.collect`` requests are taken from the queue and run together, up to this many at once ...
COLLECT_BATCH: int = _read(_env, "COLLECT_BATCH", 100, _positive_int, "a whole number")
#: ... or as many as arrived within this many seconds (the most a lone message waits in the worker).
COLLECT_FLUSH_SECONDS: float = _read(_env, "COLLECT_FLUSH_SECONDS", 0.05, _positive_float, "a number of seconds")
#: ``user``: a request waits while a batch of its task that names one of its users runs, so that
#: one worker delivers a user's messages in the order it read them (tasks/batching.py); ``none``:
#: batches go beside each other whoever they name, in no order between them (more throughput when
#: every batch names the same users).
COLLECT_ORDER: str = _read(_env, "COLLECT_ORDER", "user", _choice("user", "none"), "user or none")

#: A message routed to a user who stays online but has not acked it after this many seconds is
#: re-dispatched (clients drop the repeat by id) ...
REDELIVER_AFTER: float = _read(_env, "REDELIVER_AFTER", 30.0, _positive_float, "a number of seconds")
#: ... at most this many times, at ages REDELIVER_AFTER x 1, 2, 4, ...; after that it waits for
#: the user's next connection (inbox or ``since``).
REDELIVER_ATTEMPTS: int = _read(_env, "REDELIVER_ATTEMPTS", 5, _positive_int, "a whole number")
#: The last attempt's age, REDELIVER_AFTER x 2**(REDELIVER_ATTEMPTS - 1), is a duration too: more
#: than MAX_SECONDS overflowed housekeeping's dates at every run (no redelivery at all from about 1,030).
_MOST_ATTEMPTS = int(math.log2(MAX_SECONDS / REDELIVER_AFTER)) + 1
if REDELIVER_ATTEMPTS > _MOST_ATTEMPTS:
    raise SettingsError(f"REDELIVER_ATTEMPTS={REDELIVER_ATTEMPTS} is too many for REDELIVER_AFTER={REDELIVER_AFTER:g}: the last redelivery "
                        f"would come at an age of {REDELIVER_AFTER:g} x 2^{REDELIVER_ATTEMPTS - 1} seconds, over {MAX_SECONDS:.0f}; "
                        f"set it to at most {_MOST_ATTEMPTS} (a message is kept RETENTION_SECONDS={RETENTION_SECONDS} anyway)")
#: Redelivery candidates are the deliveries Dispatch routed and no ack removed (kept in Redis); this
#: often, housekeeping also reads the store's unacked deliveries of the redelivery window into them,
#: for messages stored but never routed (Redis down longer than Dispatch's retries).  Each sweep reads
#: the messages stored since the previous one (a minute of overlap), up to REDELIVER_AFTER ago.
REDELIVER_SWEEP_SECONDS: float = _read(_env, "REDELIVER_SWEEP_SECONDS", 300.0, _positive_float, "a number of seconds")
#: How often one worker (elected through a Redis lock) runs ``tasks.housekeeping``: redelivery,
#: hand-back of dead nodes' queues, retention purge.
HOUSEKEEPING_SECONDS: float = _read(_env, "HOUSEKEEPING_SECONDS", 10.0, _positive_float, "a number of seconds")
#: Redis broker only: a task a worker took but did not acknowledge (it died) goes back to the queue
#: after this many seconds.  Keep it above the longest task; RabbitMQ needs no such setting.
VISIBILITY_TIMEOUT: int = _read(_env, "VISIBILITY_TIMEOUT", 60, _positive_seconds, "a whole number of seconds")
#: Redis broker only: each worker looks this often for such tasks to put back (kombu's
#: ``unacked_restore_interval``), so one comes back between VISIBILITY_TIMEOUT and this much later.
UNACKED_RESTORE_SECONDS: int = _read(_env, "UNACKED_RESTORE_SECONDS", 10, _positive_seconds, "a whole number of seconds")
#: A broker that stops answering without closing its connections (a network partition, a paused
#: server) is waited on at most this many seconds at a time (the libraries' defaults wait for ever):
#: a Redis broker's command (``socket_timeout``), a RabbitMQ write (``write_timeout``) and, half
#: of it, a wait for RabbitMQ's reply (``read_timeout``: a worker's warm shutdown makes eight);
#: a push node's queue connection has an AMQP heartbeat of this many seconds (lost after two
#: heartbeats with nothing from the broker).
BROKER_TIMEOUT: int = _read(_env, "BROKER_TIMEOUT", 10, _positive_seconds, "a whole number of seconds")
#: Redis broker only: kombu drops a BRPOP connection whose reply is this many seconds overdue
#: (its ``health_check_interval``, kombu's default; redis-py also pings a broker connection
#: unused this long before its next command).  A push node whose broker stopped answering is
#: thus told within about this plus ``BROKER_TIMEOUT``.
BROKER_HEALTH_CHECK_SECONDS: int = _read(_env, "BROKER_HEALTH_CHECK_SECONDS", 25, _positive_seconds, "a whole number of seconds")

LOG_LEVEL: str = _read(_env, "LOG_LEVEL", "INFO", _choice("DEBUG", "INFO", "WARNING", "ERROR"), "DEBUG, INFO, WARNING or ERROR")


#: Bytes a secret needs at least: an HS256 key as long as its hash (RFC 7518, section 3.2).
MIN_SECRET_BYTES = 32


def named_secrets(secret: str, admin_key: str, previous_secrets: tuple[str, ...] = (), previous_admin_keys: tuple[str, ...] = ()) -> list[tuple[str, str, str]]:
    """``(name, value, development value)`` of every secret and admin key given, a previous one
    named by its variable (and its place, when the variable lists several).  Pure."""
    named = [("AUTH_SECRET", secret, DEV_AUTH_SECRET), ("AUTH_ADMIN_KEY", admin_key, DEV_AUTH_ADMIN_KEY)]
    for name, values, dev in (("AUTH_SECRET_PREVIOUS", previous_secrets, DEV_AUTH_SECRET), ("AUTH_ADMIN_KEY_PREVIOUS", previous_admin_keys, DEV_AUTH_ADMIN_KEY)):
        named += [(f"{name} item {number} of {len(values)}" if len(values) > 1 else name, value, dev) for number, value in enumerate(values, 1)]
    return named


def secret_problems(named: list[tuple[str, str, str]]) -> list[str]:
    """What is wrong with the secrets of :func:`named_secrets`: development values, values
    shorter than :data:`MIN_SECRET_BYTES`, and a signing secret that is also an admin key; empty
    when nothing is.  Pure."""
    weak = [name for name, value, dev in named if value == dev]
    short = [f"{name} has {len(value.encode())}" for name, value, dev in named if value != dev and len(value.encode()) < MIN_SECRET_BYTES]
    # A signing secret that is also an admin key: every business backend holds the admin key (and
    # sends it in a header), and with it could sign tokens itself: for any user, living as long as
    # it likes, issued "later" than any user revocation, and never logged by auth.
    signing = [(name, value) for name, value, _ in named if name.startswith("AUTH_SECRET")]
    admin = [(name, value) for name, value, _ in named if name.startswith("AUTH_ADMIN_KEY")]
    shared = [f"{secret} and {key}" for secret, value in signing for key, other in admin if value == other]
    problems = []
    if weak:
        problems.append(f"{', '.join(weak)} still hold the development value")
    if short:
        problems.append(f"{' and '.join(short)} bytes, under the {MIN_SECRET_BYTES} a secret needs")
    if shared:
        problems.append(f"{', '.join(shared)} hold the same value (a signing secret must not be an admin key, which every "
                        "business backend holds: it could sign tokens itself)")
    return problems


def check_secrets() -> None:
    """Warn about development or short secrets; refuse them when ``PUSH_ENV=production``.  Every
    secret and admin key counts, the previous ones (``AUTH_SECRET_PREVIOUS``,
    ``AUTH_ADMIN_KEY_PREVIOUS``) too: each one verifies tokens or opens the admin routes.

    Called once by the auth service at start, after logging is set up: it alone holds them (the
    nodes ask it about each token; the workers never read them)."""
    problems = secret_problems(named_secrets(AUTH_SECRET, AUTH_ADMIN_KEY, AUTH_SECRET_PREVIOUS, AUTH_ADMIN_KEY_PREVIOUS))
    if not problems:
        return
    fix = "set them to long random strings, such as python -c 'import secrets; print(secrets.token_urlsafe(32))' prints"
    if PUSH_ENV == "production":
        raise SettingsError(f"PUSH_ENV=production but {'; '.join(problems)}: {fix}")
    log.warning("%s: fine on a laptop, never in production (set PUSH_ENV=production to enforce); %s", "; ".join(problems), fix)


#: Loggers kept at INFO or above whatever ``LOG_LEVEL`` says, because at DEBUG they log secrets:
#: Tornado's libcurl client (a push node's token checks) turns libcurl's verbose mode on and logs
#: every request's headers and body, so each browser's token (``POST /verify``) and the basic
#: authentication of an ``AUTH_URL`` that holds a password.
SECRET_LEAKING_LOGGERS = ("tornado.curl_httpclient",)


def configure_logging(role: str) -> None:
    """One logging set-up for every process: level from ``LOG_LEVEL``, role in each line; the
    :data:`SECRET_LEAKING_LOGGERS` never below INFO."""
    logging.basicConfig(level=LOG_LEVEL, format=f"%(asctime)s %(levelname)s {role} %(name)s: %(message)s")
    for name in SECRET_LEAKING_LOGGERS:
        logger = logging.getLogger(name)
        logger.setLevel(max(logger.getEffectiveLevel(), logging.INFO))

"""Whether Redis takes a process's login, checked once as the process starts.

A wrong password or user name in ``REDIS_URL``, ``BROKER_URL`` or ``RESULT_BACKEND``, a password
missing where Redis requires one, or a server certificate that ``ssl_ca_certs`` does not verify, is
no outage: waiting does not end it.  Each process took it for one all the same: auth started and
answered 503 ("Redis did not answer ...; check that Redis is running"), a push node retried its
leases, its queue and its subscription for ever ("broker connection lost"), and the worker's
consumer logged "Cannot connect ... Trying again" up to a hundred times.

So auth, each push node and the worker (``celery -A worker worker``, before its pool starts) first
log in to each Redis URL they use, with one ``PING``, one ``PUBLISH`` (every process uses
channels, which Redis 7 gives a new ACL user none of) and one ``EVAL`` (nodes and workers run Lua
scripts), and the worker ``INFO server`` on
``REDIS_URL``, which its housekeeping reads: a refusal (or a plain ``redis://`` URL to a Redis that
serves TLS only, which resets the connection) stops the process with one line
naming the variable and what to fix (``PROG: error: ...``, exit status 2, as a bad setting does:
:func:`startup.refuse`), the variables that share a refusal named together.  A Redis that does not answer at all passes: the process starts and waits
for it as before.  The URL is shown without its password (``settings.redact``), and redis-py's
message never holds it.  Main thread, at start only.

Once running, a Redis may start refusing all the same (its password or ACL user changed, the
user's rights narrowed, its certificate replaced): :func:`refused` and :func:`explain` tell such an
error, where one already happened, in the same words, for the processes' logs, answers and
``/healthz`` bodies (any thread: they read ``settings`` only).
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import urllib.parse
from collections.abc import Iterable, Iterator

import redis
from kombu.exceptions import KombuError
from redis.exceptions import AuthenticationError, NoPermissionError, RedisError

import redisfull
import settings
import startup

#: Seconds the check waits for Redis to answer (connect, then PING) before it lets the process start.
TIMEOUT = 5.0

#: How a password is written in a Redis URL, for the messages.
_URL_FORM = ("redis://USER:PASSWORD@host:port/db for an ACL user, redis://:PASSWORD@host:port/db for requirepass; "
             "percent-encode @ : / ? # % and spaces in them (%40 %3A %2F %3F %23 %25 %20)")


class LoginRefused(ValueError):
    """Redis refused a login the settings give (the message says which and what to fix)."""


def refusal(url: str, exc: BaseException) -> tuple[str, str] | None:
    """``(kind, detail)`` when ``exc``, raised by the first command on ``url``, is a refusal that
    waiting will not end: kind ``password`` (a wrong user name or password), ``no password`` (Redis
    requires one and the URL gives none), ``permission`` (the ACL user may not run PING, PUBLISH or INFO, or use every channel) or
    ``certificate`` (TLS: the server's certificate did not verify), and the detail as the library
    says it; None for anything else (Redis down, a timeout).  Pure."""
    text = " ".join(str(exc).split())
    if isinstance(exc, AuthenticationError):
        parts = urllib.parse.urlsplit(url)
        has_password = "@" in parts.netloc or any(key.lower() == "password" for key, _ in urllib.parse.parse_qsl(parts.query))
        return ("password" if has_password else "no password"), text
    if isinstance(exc, NoPermissionError):
        return "permission", text
    reason = exc
    while reason is not None and not isinstance(reason, ssl.SSLCertVerificationError):
        reason = reason.__cause__ or reason.__context__
    if reason is not None or "CERTIFICATE_VERIFY_FAILED" in text:
        return "certificate", getattr(reason, "verify_message", None) or text
    return None


#: What a Redis user that lacks a right is to be given.
RIGHTS_HINT = "give it the rights the README lists (Configuration, Redis users: ~* &* +@all -@dangerous +info)"

#: What to say for each kind of :func:`refusal`: ``{names}`` the variables (with their URLs, without
#: passwords), ``{detail}`` the library's words.
_MESSAGES = {
    "password": "Redis refused the user name and password of {names} ({detail}): correct them; " + _URL_FORM,
    "no password": "Redis requires a password, and {names} gives none ({detail}): write it in the URL; " + _URL_FORM,
    "permission": "the Redis user of {names} may not run a command the platform needs ({detail}): " + RIGHTS_HINT,
    "certificate": "the TLS certificate of the Redis of {names} did not verify ({detail}): set ssl_ca_certs in the URL to the CA "
                   "file that signed it (a percent-encoded path), and write the host as the certificate names it",
    "tls only": "the Redis of {names} serves TLS only, and a plain redis:// URL reaches it ({detail}): write "
                "rediss://...?ssl_cert_reqs=required&ssl_ca_certs=CA-FILE (a percent-encoded path; README, Configuration, "
                "Redis users, passwords and TLS)",
}


def message(refusals: list[tuple[str, str, str, str]]) -> str:
    """One line for the ``(name, url, kind, detail)`` refusals found, those of a kind together,
    each variable named with its URL without the password.  Pure."""
    parts = []
    for kind in dict.fromkeys(kind for _, _, kind, _ in refusals):
        these = [(name, url, detail) for name, url, k, detail in refusals if k == kind]
        names = " and ".join(f"{name} ({settings.redact(url)})" for name, url, _ in these)
        parts.append(_MESSAGES[kind].format(names=names, detail=these[0][2]))
    return "; and ".join(parts)


def refused(exc: BaseException, names: Iterable[str] = ("REDIS_URL",)) -> str | None:
    """While a process runs: the line of :func:`message` for the settings ``names`` when ``exc``,
    raised by a command on their Redis, is a :func:`refusal` (the password or user changed in
    Redis, the user's rights narrowed, its certificate replaced), or an error that wraps one (kombu's
    ``OperationalError``); None for anything else (Redis down, full, a timeout).  What waiting will
    not end, told as the check at start tells it, rather than as an outage.  Only where an error
    already happened.  Reads ``settings``."""
    holders = redis_urls(names)
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen and holders:
        seen.add(id(exc))
        found = [(name, url, *kind) for name, url in holders if (kind := refusal(url, exc)) is not None]
        if found:
            return message(found)
        exc = exc.__cause__ or exc.__context__
    return None


def explain(exc: BaseException, names: Iterable[str] = ("REDIS_URL",)) -> str:
    """``exc`` as text for a log line or an answer: :func:`refused`'s line when Redis refuses the
    login or the command of the settings ``names``, else :func:`redisfull.explain`'s (a full Redis
    named so, anything else as the library says it)."""
    return refused(exc, names) or redisfull.explain(exc)


def variables_of(exc: BaseException, redis_names: Iterable[str] = ("REDIS_URL",)) -> tuple[str, ...]:
    """The settings whose Redis ``exc`` came from, for :func:`refused`: ``BROKER_URL`` for kombu's
    errors (the broker's connection and publishes), else ``redis_names`` (the process's own redis-py
    clients).  Pure."""
    return ("BROKER_URL",) if isinstance(exc, KombuError) else tuple(redis_names)


def retold(exc: BaseException, names: Iterable[str]) -> BaseException:
    """``exc``, or, when it is a refusal (:func:`refused`), an error of its type (so retried, or
    not, as it is) whose message is the refusal's line, chained to it: for what a library logs by
    itself (Celery's ``Retry in 2s: ...``)."""
    line = refused(exc, names)
    if line is None:
        return exc
    try:
        again = type(exc)(line)
    except Exception:  # noqa: BLE001 - a type built otherwise: its own words, then
        return exc
    again.__cause__ = exc
    return again


@contextlib.contextmanager
def told_as_refusals() -> Iterator[None]:
    """Inside, an error that is a refusal (:func:`refused`, for the settings :func:`variables_of`
    names) is raised again as :func:`retold`'s (its type, so retried or not as before; what to fix
    as its message); any other error as it is.  For a task's body, so that Celery's retry or failure
    line says what to fix."""
    try:
        yield
    except Exception as exc:
        told = retold(exc, variables_of(exc))
        if told is exc:
            raise
        raise told from exc


#: The channel :func:`problem` publishes an empty message on: no one subscribes to it.
CHECK_CHANNEL = "push:login-check"


def speaks_tls(url: str) -> bool:
    """Whether the server at a ``redis://`` URL's host and port completes a TLS handshake (its
    certificate not checked): a Redis that serves TLS only resets a plain connection at its first
    command, which looks like an outage.  Only where such a reset happened."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or "localhost"
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    try:
        with socket.create_connection((host, parts.port or 6379), timeout=TIMEOUT) as raw, context.wrap_socket(raw, server_hostname=host):
            return True
    except (OSError, ValueError):
        return False


def problem(url: str, info: bool = False) -> tuple[str, str] | None:
    """Logs in to ``url`` (redis-py, which reads the URL as the platform's clients do) and sends
    PING, a PUBLISH on :data:`CHECK_CHANNEL` (every process needs channels: the revocation
    announcements, Celery's broadcasts and results), an ``EVAL`` (nodes and workers run Lua
    scripts: a user without ``@scripting`` failed each task with a traceback), and with ``info``
    ``INFO server``: the
    :func:`refusal`, or None when it works or Redis does not answer.  A plain ``redis://`` URL whose
    connection Redis closes at once is told as ``tls only`` when the port serves TLS."""
    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=TIMEOUT, socket_timeout=TIMEOUT)
    except (RedisError, ValueError):
        return None  # a URL redis-py reads otherwise than the libraries that use it: theirs to say
    try:
        client.ping()
        client.publish(CHECK_CHANNEL, "")
        client.eval("return 1", 0)  # the leases, routes and pending marks are Lua scripts
        if info:
            client.info("server")
    except RedisError as exc:
        found = refusal(url, exc)
        if found is None and type(exc) is redis.exceptions.ConnectionError and url.partition("://")[0] == "redis" and speaks_tls(url):
            return "tls only", " ".join(str(exc).split())
        return found
    except Exception:  # noqa: BLE001 - an option redis-py takes otherwise (kombu's credential_provider=): theirs to say
        return None
    finally:
        client.close()
    return None


def redis_urls(names: Iterable[str]) -> list[tuple[str, str]]:
    """``(name, url)`` of each setting among ``names`` that is a Redis URL (the first of a failover
    list; ``amqp://``, ``rpc://``, a ``redis+socket://`` backend and the like are left out).  Reads
    ``settings``."""
    found = []
    for name in names:
        url = getattr(settings, name).split(";", 1)[0].strip()
        if url.partition("://")[0] in ("redis", "rediss"):
            found.append((name, url))
    return found


def check(prog: str, names: Iterable[str], info: Iterable[str] = ()) -> None:
    """Stop the process (``PROG: error: ...``, exit status 2) when Redis refuses the login of one
    of the settings ``names``, or, for those also in ``info``, ``INFO`` (the worker's housekeeping
    reads ``INFO server`` and ``errorstats``: without it, a user denied Redis's @dangerous commands
    failed every run with a traceback).  Each URL is tried once (``RESULT_BACKEND`` is
    ``REDIS_URL``'s unless set), with ``INFO`` when any variable that holds it needs it (a
    ``BROKER_URL`` that is ``REDIS_URL`` too), named by that variable, else by the first that holds it."""
    info = set(info)
    shared: dict[str, list[str]] = {}
    for name, url in redis_urls(names):
        shared.setdefault(url, []).append(name)
    refusals = []
    for url, holders in shared.items():
        if (found := problem(url, info=any(name in info for name in holders))) is not None:
            refusals.append((min(holders, key=lambda name: name not in info), url, *found))
    if refusals:
        startup.refuse(prog, LoginRefused(message(refusals)))

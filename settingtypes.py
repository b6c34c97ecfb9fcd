"""The types a setting may take: each converter takes the text of an environment variable and returns
its value, or raises ValueError saying the form expected, which ``settings._read`` turns into a
``SettingsError`` that names the variable, the value it had (its password masked:
:func:`redaction.shown`) and that form.  Also the ``type`` of the command-line options that take a
host or a port (:func:`host_argument`, :func:`port_argument`).

Pure: it reads no environment (``settings`` is the only reader of ``os.environ``), only, for a
``rediss://`` URL, whether the files it names exist.  Any thread.
"""

from __future__ import annotations

import os
import re
import urllib.parse
from collections.abc import Callable

from redaction import password_split


#: The longest duration a setting may give, in seconds (over three years): the timers and waits
#: these feed overflow on an infinite or huge one (a scheduler thread that died at start, a node
#: that crashed on its first lease).
MAX_SECONDS = 1e8


def _bounded(value: float, positive: bool, most: float):
    """``value`` when it is above 0 (``positive``) or at least 0, and at most ``most``; else a
    ValueError saying the range (NaN is neither)."""
    if not (value > 0 if positive else value >= 0) or value > most:
        raise ValueError(f"must be greater than 0 and at most {most:.0f}" if positive else f"must be 0 or greater, and at most {most:.0f}")
    return value


def _positive_float(raw: str) -> float:
    return _bounded(float(raw), True, MAX_SECONDS)


def _non_negative_float(raw: str) -> float:
    return _bounded(float(raw), False, MAX_SECONDS)


def _non_negative_int(raw: str) -> int:
    value = int(raw)
    if value < 0:
        raise ValueError("must be 0 or greater")
    return value


def _positive_int(raw: str) -> int:
    value = int(raw)
    if value <= 0:
        raise ValueError("must be greater than 0")
    return value


def _positive_seconds(raw: str) -> int:
    """A whole number of seconds, 1 to ``MAX_SECONDS``: a larger one overflowed the socket timeouts
    and timers it feeds (``BROKER_TIMEOUT`` of 10**10 stopped the worker with a traceback)."""
    return _bounded(int(raw), True, MAX_SECONDS)


def _non_negative_ms(raw: str) -> int:
    """A whole number of milliseconds, 0 to ``MAX_SECONDS`` in milliseconds."""
    return _bounded(int(raw), False, MAX_SECONDS * 1000)


#: Bounds of ``MAX_USER_CONNECTS``: each connect within the window is one entry of the user's log in
#: Redis (about 45 bytes, 190 for a log's first, 125 past 128 entries), so the count bounds what one user's loop holds there; a window of a day
#: at most, as the log lives that long after the user's last connect.
MAX_CONNECTS_PER_WINDOW = 1000
MAX_CONNECT_WINDOW_SECONDS = 86400


def _connect_rate(raw: str) -> tuple[int, int] | None:
    """``MAX_USER_CONNECTS``: ``0`` (no limit, None) or ``COUNT/SECONDS``, two whole numbers: at
    most COUNT connects of one user in any SECONDS seconds, ``(COUNT, SECONDS)``."""
    text = raw.strip()
    if text == "0":
        return None
    count, slash, window = text.partition("/")
    if not slash:
        raise ValueError("no '/' between the count and the seconds")
    count, window = int(count), int(window)
    if not 1 <= count <= MAX_CONNECTS_PER_WINDOW:
        raise ValueError(f"the count must be 1 to {MAX_CONNECTS_PER_WINDOW}; 0 alone turns the limit off")
    if not 1 <= window <= MAX_CONNECT_WINDOW_SECONDS:
        raise ValueError(f"the seconds must be 1 to {MAX_CONNECT_WINDOW_SECONDS}")
    return count, window


def _database_name(raw: str) -> str:
    """A name MongoDB takes for a database (its limits page, "Restrictions on Database Names"):
    fewer than 64 bytes, and none of ``/\\. "$*<>:|?`` or NUL.  The embedded store made a folder
    of whatever it was given (``a/b`` a folder in a folder), while pymongo refused ``a.b`` with an
    error that named no variable, and MongoDB one of 64 bytes or more only at the first write."""
    bad = sorted({char for char in raw if char in '/\\. "$*<>:|?\0'})
    if bad:
        raise ValueError(f"MongoDB refuses {''.join(bad)!r} in a database name")
    if len(raw.encode()) >= 64:
        raise ValueError("MongoDB takes database names of fewer than 64 bytes")
    return raw


def _port(raw: str) -> int:
    value = int(raw)
    if not 0 < value < 65536:
        raise ValueError("must be between 1 and 65535")
    return value


_HOST = re.compile(r"[!-~]{1,253}")


def _host(raw: str) -> str:
    """A host name or IP address a node advertises: it names the node's queue and its Redis
    client (``wsnode:HOST:PORT``), and Redis refuses a client name with a space or a line break:
    ``NODE_HOST='127.0.0.1 '`` (from a .env file) left a node running that never wrote a lease,
    unready, every browser closed with 1013."""
    if not _HOST.fullmatch(raw):
        raise ValueError("printable ASCII only, no spaces or line breaks, at most 253 characters")
    return raw


def host_argument(text: str) -> str:
    """The ``type`` of ``python -m wsnode --host``: as ``NODE_HOST``."""
    import argparse

    try:
        return _host(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text!r} is not a host name or IP address: {exc}") from None


def port_argument(text: str) -> int:
    """The ``type`` of a command-line option that takes a TCP port (``python -m wsnode --port``):
    a port outside 1-65535 is refused there, where the socket would take it modulo 65536 (70000
    listened on 4464 while the node advertised, and named its queue, ``:70000``)."""
    import argparse

    try:
        return _port(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a TCP port: give a whole number between 1 and 65535") from None


def _url(*schemes: str) -> Callable[[str], str]:
    """A URL of one of ``schemes``; for one host (not MongoDB's lists), a port that is a number in
    range, and for Redis a database that is a number: redis-py raised a traceback naming no
    variable on ``:6379x``, and read ``/x`` as database 0, the broker's."""
    def convert(raw: str) -> str:
        for url in raw.split(";"):  # a broker URL may list failover brokers, as Celery reads it
            parts = urllib.parse.urlsplit(url.strip())
            if parts.scheme not in schemes:
                raise ValueError(f"scheme {parts.scheme!r} is not one of {', '.join(schemes)}")
            try:
                if parts.scheme not in ("mongodb", "mongodb+srv", "unix"):
                    parts.port  # raises ValueError: "Port could not be cast to integer value", "Port out of range 0-65535"
                database = parts.path.strip("/")
                if parts.scheme in ("redis", "rediss") and database and not database.isdigit():
                    raise ValueError(f"the database {parts.path!r} is not a number: end the URL with /0, /1 ...")
                if parts.scheme == "rediss":
                    _tls_options(parts.query)
            except ValueError:
                if password_split(url):  # the explanation would quote a piece of the password
                    raise ValueError("its port or database is not a number, the password seemingly holding '/', '?' or '#': "
                                     "percent-encode them in a URL (%2F, %3F, %23)") from None
                raise
        return raw

    return convert


#: The values of a ``rediss://`` URL's ``ssl_cert_reqs`` that redis-py, kombu and Celery's result
#: backend all read (kombu and Celery also take ``CERT_REQUIRED``..., which redis-py refuses).
TLS_CERT_REQS = ("required", "optional", "none")


def _tls_options(query: str) -> None:
    """Checks the query of a ``rediss://`` URL: ``ssl_cert_reqs`` must be there (without it
    kombu's broker connection does not check the server's certificate at all, only warns, and
    Celery's Redis result backend refuses the URL: the worker stopped at start, "Unrecoverable error"), and each file
    it names (``ssl_ca_certs``, ``ssl_certfile``, ``ssl_keyfile``) must be one: a missing one
    failed every connection with an SSL error that named no variable."""
    options = dict(urllib.parse.parse_qsl(query, keep_blank_values=True))
    reqs = options.get("ssl_cert_reqs")
    if reqs not in TLS_CERT_REQS:
        got = "none is given" if reqs is None else f"it is {reqs!r}"
        raise ValueError(f"a rediss:// URL needs ssl_cert_reqs=required (or optional, none) in its query, and {got}: "
                         "add ?ssl_cert_reqs=required, and &ssl_ca_certs=/path/to/ca.pem when Redis's certificate is not signed by a CA "
                         "of this system's")
    for name in ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile"):
        if name in options and not os.path.isfile(options[name]):
            raise ValueError(f"{name}={options[name]!r} is not a file: give the path of the PEM file (percent-encoded: / as %2F)")


#: The result backends Celery names by scheme (``celery.app.backends.BACKEND_ALIASES``, copied so
#: that importing settings does not import Celery; a unit test checks the copy).
RESULT_BACKEND_SCHEMES = frozenset({
    "rpc", "cache", "redis", "rediss", "sentinel", "mongodb", "db", "database", "elasticsearch", "cassandra",
    "couchbase", "couchdb", "cosmosdbsql", "riak", "file", "disabled", "consul", "dynamodb", "azureblockblob",
    "arangodb", "s3", "gs",
})


def _result_backend(raw: str) -> str:
    """A Celery result backend URL, ``scheme://...`` or ``scheme+driver://...`` (``db+postgresql://``),
    whose scheme Celery knows; a Redis URL is checked as ``REDIS_URL`` is.  A typo stopped the
    worker's first task with Celery's traceback, naming no variable."""
    scheme, sep, _ = raw.partition("://")
    if not sep:
        raise ValueError("no scheme: write it as a URL, e.g. redis://127.0.0.1:6379/1")
    backend = scheme.split("+", 1)[0]
    if backend not in RESULT_BACKEND_SCHEMES:
        raise ValueError(f"Celery has no result backend {backend!r}: one of {', '.join(sorted(RESULT_BACKEND_SCHEMES))}")
    if backend in ("redis", "rediss"):
        # Celery reads "redis+socket:///path" (a Unix socket) as the Redis backend with the URL after the +.
        _url("redis", "rediss", "socket")(raw.partition("+")[2] if "+" in scheme else raw)
    return raw


def _choice(*choices: str) -> Callable[[str], str]:
    def convert(raw: str) -> str:
        if raw not in choices:
            raise ValueError(f"not one of {', '.join(choices)}")
        return raw

    return convert


#: The port a browser leaves out of its ``Origin`` header, per scheme.
_DEFAULT_PORTS = {"http": 80, "https": 443}


def _origins(raw: str) -> tuple[str, ...]:
    """Origins as a browser sends them in its ``Origin`` header (``scheme://host[:port]``, in lower
    case, without the scheme's default port), or ``*``.  One written otherwise (without its
    scheme, with a path) was kept as given and matched no browser: the node started, and refused
    every handshake with 403."""
    origins = []
    for part in (part.strip().rstrip("/") for part in raw.split(",")):
        if part in ("", "*", "null"):  # "null": what a browser sends from a file:// page or a sandboxed frame
            if part:
                origins.append(part)
            continue
        parts = urllib.parse.urlsplit(part.lower())
        if not parts.scheme or not parts.hostname or parts.path or parts.query or parts.fragment or "@" in parts.netloc:
            raise ValueError(f"{part!r} is not an origin as browsers send it: write scheme://host[:port], e.g. https://app.example.com")
        host, port = parts.hostname, parts.port  # .port raises ValueError on a port that is not a number
        if not host.isascii():
            raise ValueError(f"{part!r} is not an origin as browsers send it: a browser sends a host outside ASCII in its "
                             "punycode form (xn--...), so write it so")
        # Rebuilt from the host and the port as numbers, as a browser writes them: a port written
        # with leading zeros (:08443) or left empty (host:) matched no Origin header.
        netloc = f"[{host}]" if ":" in host else host
        if port is not None and port != _DEFAULT_PORTS.get(parts.scheme):
            netloc = f"{netloc}:{port}"
        origins.append(f"{parts.scheme}://{netloc}")
    if not origins:
        raise ValueError("no origin in it")
    return tuple(origins)

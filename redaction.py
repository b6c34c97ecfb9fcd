"""What a URL may show of itself in a log line or an error: its password, and the query parameters
that may hold a secret, masked (:func:`redact`; ``settings.redact`` is this one).  Pure; any thread.

A URL whose password holds an unescaped ``/``, ``?`` or ``#`` is read by urlsplit as ending its
host there, so that the password would pass for a port, a path or a query: :func:`password_split`
tells such a URL, and :func:`shown` masks it too, for the errors of :mod:`settingtypes`.
"""

from __future__ import annotations

import urllib.parse


def shown(raw: str) -> str:
    """A bad value as an error may show it: a URL's password masked (:func:`redact`), also one
    holding an unescaped ``/``, ``?`` or ``#`` (urlsplit ends the host there, so redact finds no
    password: everything up to the URL's last ``@`` is taken as the user and password then)."""
    if "://" not in raw:
        return raw
    shown = []
    for part in raw.split(";"):
        if password_split(part):
            scheme, _, rest = part.partition("://")
            userinfo, _, after = rest.rpartition("@")
            part = f"{scheme}://{userinfo.partition(':')[0]}:***@{after}"
        try:
            shown.append(redact(part))
        except ValueError:
            return raw.partition("://")[0] + "://(not shown: it may hold a password)"
    return ";".join(shown)


def password_split(url: str) -> bool:
    """Whether ``url`` has an ``@`` past what urlsplit reads as its host: a ``user:password@``
    whose password holds an unescaped ``/``, ``?`` or ``#``, which urlsplit read as the port,
    path, query or fragment."""
    rest = url.partition("://")[2]
    userinfo = rest.rpartition("@")[0]
    try:
        netloc = urllib.parse.urlsplit(url.strip()).netloc
    except ValueError:
        return True
    return ":" in userinfo and "@" not in netloc


def _secret_parameter(name: str) -> bool:
    """Whether a URL's query parameter ``name`` may hold a secret: a password (redis-py's
    ``password`` and ``ssl_password``, MongoDB's ``tlsCertificateKeyFilePassword``), a secret or a
    token, or MongoDB's ``authMechanismProperties`` (``AWS_SESSION_TOKEN:...``).  Pure."""
    name = name.lower()
    return any(word in name for word in ("password", "secret", "token")) or name == "authmechanismproperties"


def redact(url: str) -> str:
    """``url`` without its password, for logs: ``redis://:secret@host/0`` -> ``redis://:***@host/0``;
    query parameters that may hold a secret (:func:`_secret_parameter`: redis-py's ``password=``
    of its ``unix://`` form, MongoDB's TLS key file password ...) are masked too."""
    # The parts are replaced in the text rather than joined again by urlunsplit, which drops the
    # "//" of an empty host ("rpc://", "unix:///run/redis.sock") and so named another URL.
    parts = urllib.parse.urlsplit(url)
    shown = url
    if parts.password is not None:
        shown = shown.replace(f"//{parts.netloc}", "//" + parts.netloc.replace(f":{parts.password}@", ":***@", 1), 1)
    if parts.query:
        query = urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
        masked = [(k, "***" if _secret_parameter(k) else v) for k, v in query]
        if masked != query:
            shown = shown.replace(f"?{parts.query}", "?" + urllib.parse.urlencode(masked, safe="*"), 1)
    return shown

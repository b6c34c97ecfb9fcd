"""What the demo page's forms send, checked and turned into platform values.  Pure.

- :func:`user_name`: the user name a person types to connect;
- :func:`recipients`: the "to" field of the send form (a user, a comma list, or ``*``);
- :func:`message_data`: the ``data`` of the message the send form collects;
- :func:`node_urls`: the WebSocket URLs of the push nodes, from ``--nodes`` and the page's host.

Errors are :class:`DemoInputError`, whose text is shown to the person as it is.
"""

from __future__ import annotations

import urllib.parse
from collections.abc import Iterable

from auth.tokens import forbidden_character

#: Longest user id the platform accepts (tasks/messages.py checks the same).
MAX_USER_CHARS = 128
#: Longest text the demo sends (the platform allows far more; a demo does not need it).
MAX_TEXT_CHARS = 2000


class DemoInputError(ValueError):
    """A form value the demo cannot use; the message says what was expected."""


def user_name(value: object) -> str:
    """A user id from the connect form: non-empty after trimming, at most 128 characters, no comma,
    and none of the characters no user id holds (whitespace, control, format: auth issues no token
    for such a name, and the page got a 502, then asked again and again)."""
    if not isinstance(value, str) or not value.strip():
        raise DemoInputError("type a user name, e.g. alice")
    name = value.strip()
    if len(name) > MAX_USER_CHARS:
        raise DemoInputError(f"a user name has at most {MAX_USER_CHARS} characters; this one has {len(name)}")
    if "," in name or name == "*":
        raise DemoInputError(f"{name[:40]!r} cannot be a user name: ',' separates users and '*' means everyone")
    if (char := forbidden_character(name)) is not None:
        raise DemoInputError(f"{name[:40]!r} cannot be a user name: it holds {char!r}, and user names have no whitespace, "
                             "control or format characters (write e.g. alice_smith)")
    return name


def token_ttl(value: object) -> int | None:
    """The optional lifetime of a token, in whole seconds (auth refuses one over its ``TOKEN_TTL``)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise DemoInputError("ttl is a whole number of seconds, 1 or more")
    return value


def recipients(value: object) -> str | list[str]:
    """The ``to`` of ``tasks.collect`` from the send form: ``"*"`` (everyone online), one user id,
    or ``"alice, bob"`` -> ``["alice", "bob"]`` (trimmed, repeats dropped, order kept)."""
    if not isinstance(value, str) or not value.strip():
        raise DemoInputError("say who gets the message: a user name, several separated by commas, or * for everyone online")
    if value.strip() == "*":
        return "*"
    names = [part.strip() for part in value.split(",")]
    if any(not name for name in names):
        raise DemoInputError(f"{value[:60]!r} has an empty name between commas: write e.g. alice, bob")
    users = list(dict.fromkeys(user_name(name) for name in names))
    return users[0] if len(users) == 1 else users


def message_data(text: object, to: str | list[str], sender: str | None = None) -> dict:
    """The ``data`` the demo collects: the text, who it was addressed to as typed, and the sender."""
    if not isinstance(text, str) or not text.strip():
        raise DemoInputError("type some text to send")
    if len(text) > MAX_TEXT_CHARS:
        raise DemoInputError(f"the demo sends at most {MAX_TEXT_CHARS} characters; this text has {len(text)}")
    shown = to if isinstance(to, str) else ", ".join(to)
    return {"text": text, "to": shown, "from": sender or "demo page"}


def node_urls(specs: Iterable[str], page_host: str) -> list[str]:
    """WebSocket URLs of the push nodes.

    Each spec is a port (``8101``: the node on the host the page was loaded from, so the page works
    from another machine when the cluster listens on one) or a full ``ws://`` / ``wss://`` URL, kept
    as it is.  ``page_host`` is the ``Host`` header of the page's request (``127.0.0.1:8080``).
    """
    hostname = urllib.parse.urlsplit(f"//{page_host}").hostname or "127.0.0.1"
    if ":" in hostname:
        hostname = f"[{hostname}]"  # IPv6
    urls = []
    for spec in specs:
        spec = str(spec).strip()
        if spec.isdigit():
            urls.append(f"ws://{hostname}:{int(spec)}/ws")
        elif urllib.parse.urlsplit(spec).scheme in ("ws", "wss"):
            urls.append(spec)
        else:
            raise DemoInputError(f"{spec!r} is not a node: give a port (8101) or a ws:// URL (ws://host:8101/ws)")
    return urls

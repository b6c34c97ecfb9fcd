"""Token checks against the auth service, with a short cache.  Loop thread only.

``verify(token)`` returns the token's :class:`Identity` (its user id, its id and issue time,
which :mod:`wsnode.revocations` needs, and its expiry, which :mod:`wsnode.expiry` needs), or raises :class:`AuthRejected` (close 4401: the client needs
a new token) or :class:`AuthUnavailable` (close 1013: try again later).  Verified tokens are cached
for ``cache_seconds`` keyed by a digest of the token (tokens themselves are never kept or logged),
so a revoked token keeps opening connections on this node for at most that long (no time at all
when the announcement of its revocation reaches the node: :meth:`AuthClient.forget`).

One request at a time (:class:`~wsnode.coalesce.Coalescer`): the tokens that come while a check
is in flight go together in the next one, as ``POST /verify {"tokens": [...]}`` (at most
``MAX_VERIFY_BATCH`` tokens, and requests side by side where their body would be longer than auth
reads, ``MAX_VERIFY_BODY_BYTES``); a lone token goes as ``{"token": ...}``.  A token longer than
any auth issues (``MAX_TOKEN_CHARS``) is refused without asking.  In a reconnect storm that makes
one request of many browsers' checks: the HTTP round trip per token was a quarter of the node
loop's samples (py-spy) and most of auth's CPU per connection; 6,000 connections at once took the
node 15 s of CPU and auth 7.3 s before, 11 s and 1.6 s after (``bench/HISTORY.md``).  An auth
from before the list form answers it 400 ("no 'token' field"): the node then checks one token per
request, as before, and says so once in its log.

The requests go through Tornado's libcurl client (pycurl), which keeps its connections to auth
open between requests: Tornado's default client opens and closes a TCP connection per request,
which in a reconnect storm costs the node and auth a connect and a close per browser and leaves a
TIME_WAIT socket behind each.  At most ``max_in_flight`` requests are in flight at once (one but
when checking one token per request); the others wait in the client's queue.  A connection that
auth closed (it restarted) is noticed by libcurl, which connects again.  Every failure to get an
answer (refused, reset, timed out) is libcurl's error 599, hence :class:`AuthUnavailable`; the
checks that waited for a check that got no answer (or a 503: auth cannot read its revocation list)
fail with it, without asking auth (an auth that answers nothing makes each request wait for the
whole ``timeout``).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from typing import NamedTuple

import pycurl
from cachetools import TTLCache
from tornado.curl_httpclient import CurlAsyncHTTPClient
from tornado.httpclient import HTTPClientError, HTTPResponse

from logtext import printable
from outage import Outage
from settings import redact
from wsnode.coalesce import Coalescer

log = logging.getLogger(__name__)

#: Tokens per ``POST /verify`` of the list form; auth's own limit (``auth.app.MAX_VERIFY_BATCH``).
MAX_VERIFY_BATCH = 100
#: Bytes of one ``POST /verify`` body; auth's own limit (``auth.app.MAX_BODY_BYTES``: it resets the
#: connection of a longer one).  A token of a user id of 128 characters outside the BMP has about
#: 2,200 characters, so the tokens that come together may need several requests.
MAX_VERIFY_BODY_BYTES = 64 * 1024
#: A longer token is not one auth issued (2,231 characters at most): refused here, without asking
#: auth.  In JSON a character takes at most 12 bytes, so one token always fits in one body.
MAX_TOKEN_CHARS = 4096


class Identity(NamedTuple):
    """What auth says of a good token.  ``token_id`` and ``issued_at_us`` are None from an auth
    of a version before they were in its answer: a connection without a ``token_id`` is closed by
    no revocation, and one without ``issued_at_us`` is taken as issued before any cutoff of its
    user (:func:`wsnode.revocations.covers`).
    ``expires_at`` (unix seconds) is None only from an auth that does not say it: such a
    connection never expires (:mod:`wsnode.expiry`)."""

    user_id: str
    token_id: str | None = None
    issued_at_us: int | None = None
    expires_at: int | None = None

    @classmethod
    def from_answer(cls, answer: dict) -> "Identity":
        """From one ``POST /verify`` answer; raises KeyError or TypeError for one without a user id."""
        user_id = answer["user_id"]
        if not isinstance(user_id, str):
            raise TypeError(f"user_id is a {type(user_id).__name__}")
        token_id, issued_at_us, expires_at = answer.get("token_id"), answer.get("issued_at_us"), answer.get("expires_at")
        return cls(user_id, token_id if isinstance(token_id, str) else None, _int_or_none(issued_at_us), _int_or_none(expires_at))

    def expired(self, now: float) -> bool:
        """Whether the token has expired at unix time ``now`` (auth's rule: at ``expires_at`` on)."""
        return self.expires_at is not None and now >= self.expires_at


def _int_or_none(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


class AuthError(Exception):
    """Base of the node's auth errors."""


class AuthRejected(AuthError):
    """The auth service said no: bad, expired or revoked token."""


class AuthUnavailable(AuthError):
    """The auth service could not be asked or gave an unusable answer.  ``unanswered``: it gave no
    answer at all (refused, reset, timed out: libcurl's 599) or answered 503 (it cannot read the
    revocation list): the checks waiting behind such a check fail with it, unasked."""

    def __init__(self, message: str, unanswered: bool = False) -> None:
        super().__init__(message)
        self.unanswered = unanswered


class AuthClient:
    def __init__(self, auth_url: str, cache_seconds: float, timeout: float = 5.0, max_cached: int = 100_000, max_in_flight: int = 10) -> None:
        self._verify_url = f"{auth_url}/verify"
        #: What errors and log lines say: ``AUTH_URL`` may carry a password (basic authentication).
        self._shown_url = redact(self._verify_url)
        self._timeout = timeout
        self._cache: TTLCache | None = TTLCache(max_cached, cache_seconds) if cache_seconds > 0 else None
        self._http = CurlAsyncHTTPClient(force_instance=True, max_clients=max_in_flight)
        self._checks: Coalescer[str, Identity] = Coalescer(self._check_many, max_items=MAX_VERIFY_BATCH)
        self._list_form = True  # False once auth said it does not know {"tokens": [...]}
        self._generation = 0  # bumped by forget(): an answer asked for before it is not cached
        #: Auth's outage, logged once (:meth:`_failed`, :meth:`_answered`), counted in token checks
        #: that failed.
        self._outage = Outage()

    def forget(self) -> None:
        """Drop every cached answer (a token was revoked: the next check of each asks auth), and
        keep out of the cache the answers of the checks in flight, which auth may have given
        before the revocation."""
        self._generation += 1
        if self._cache is not None:
            self._cache.clear()

    async def verify(self, token: str | None) -> Identity:
        if not token:
            raise AuthRejected("no token: connect with ?token=...")
        if len(token) > MAX_TOKEN_CHARS:
            raise AuthRejected(f"token invalid: longer than {MAX_TOKEN_CHARS} characters")
        digest = hashlib.blake2b(token.encode(), digest_size=16).digest()
        if self._cache is not None and (identity := self._cache.get(digest)) is not None:
            if identity.expired(time.time()):  # expired since it was cached: auth would say so
                raise AuthRejected("token expired")
            return identity
        generation = self._generation
        identity = await self._checks.submit(token)
        # A forget() meanwhile may have been for this very token: its answer is still returned (the
        # node refuses it as it binds, wsnode.revocations.RecentRevocations) but never cached, or
        # it would open connections for AUTH_CACHE_SECONDS after its revocation.
        if self._cache is not None and self._generation == generation:
            self._cache[digest] = identity
        return identity

    async def _check_many(self, tokens: list[str]) -> list[Identity | Exception]:
        """The identity, or the :class:`AuthError` to raise, per token; raises an :class:`AuthError`
        that holds for all of them.  When auth gave no answer (or a 503), the checks that came
        meanwhile fail with it, unasked: each request to an auth that accepts connections and
        answers nothing waits for the whole timeout, so a reconnect storm's last browsers waited
        (checks / ``MAX_VERIFY_BATCH``) timeouts for their 1013, and came back with more checks
        meanwhile.  Any other error (a 500 for one bad token of the list, a proxy's 502, an
        unexpected body) came at once: the next request is asked as usual."""
        asked = self._outage.asking()
        try:
            results = await self._check_tokens(tokens)
        except AuthUnavailable as exc:
            self._failed(exc, len(tokens), asked)
            if exc.unanswered:
                self._fail_waiting(exc, asked)
            raise
        failed = [result for result in results if isinstance(result, AuthUnavailable)]
        if any(isinstance(result, Identity) for result in results):
            # Auth answered a 200, which needs its Redis.  Not a 401: auth refuses an expired or
            # bad token without reading Redis, even while it answers 503 for every other one (a
            # 401 ended the outage, and the next 503 logged its WARNING again).
            self._answered(asked)
        if failed:
            self._failed(failed[0], len(failed), asked)
        unanswered = next((result for result in failed if result.unanswered), None)
        if unanswered is not None:
            self._fail_waiting(unanswered, asked)
        return results

    def _failed(self, cause: AuthUnavailable, tokens: int, asked_at: float) -> None:
        """``tokens`` checks failed for ``cause`` (asked at ``asked_at``): a WARNING when the first
        check of auth's outage fails, and none after it until :meth:`_answered` (each refused
        connection then gets an INFO line only: in a reconnect storm against a stopped auth, or one
        that cannot read Redis, there were two WARNING lines per connect).  Once per outage,
        whatever its cause: the fix the line says (auth running, its /healthz answering) is the
        same for each.  Checks asked before the last outage ended begin no new one
        (:meth:`outage.Outage.failed`)."""
        if self._outage.failed(count=tokens, asked_at=asked_at):
            log.warning("auth unavailable: %s; new connections are refused with 1013 and refreshes answered refresh_error until "
                        "it answers: check that auth runs at AUTH_URL and that its /healthz answers 200 (it needs its Redis)", cause)

    def _answered(self, asked_at: float) -> None:
        """Auth answered a check sent at ``asked_at`` with a 200: an INFO line when that ends an
        outage (one that began before it was sent: :meth:`outage.Outage.answered`)."""
        if (recovery := self._outage.answered(asked_at)) is not None:
            log.info("auth answers again at %s after %.0f s; %d token checks failed meanwhile (their connections got 1013)",
                     self._shown_url, recovery.seconds, recovery.failures)

    def _fail_waiting(self, cause: AuthUnavailable, asked_at: float) -> None:
        failed = self._checks.fail_waiting(AuthUnavailable(f"{cause} (while this token waited for that check: not asked)"))
        if failed:
            self._failed(cause, failed, asked_at)
            log.info("%d token checks that waited for auth failed unasked: the check before them got no answer or a 503 (%s)", failed, cause)

    async def _check_tokens(self, tokens: list[str]) -> list[Identity | Exception]:
        if len(tokens) == 1 or not self._list_form:
            return await self._check_each(tokens)
        parts = within_body(tokens, MAX_VERIFY_BODY_BYTES)
        if len(parts) == 1:
            return await self._check_list(tokens)
        # Side by side; a part whose request failed fails its own tokens only.
        answers = await asyncio.gather(*(self._check_list(part) for part in parts), return_exceptions=True)
        return [answer for part, got in zip(parts, answers) for answer in (got if isinstance(got, list) else [got] * len(part))]

    async def _check_list(self, tokens: list[str]) -> list[Identity | Exception]:
        """:meth:`_check_many` of tokens whose list fits in one request."""
        try:
            response = await self._post({"tokens": tokens})
        except HTTPClientError as exc:
            if exc.code != 400:
                raise _unavailable(exc, self._shown_url) from None
            # An auth from before the list form, or another refusal of the list: these tokens one
            # per request, and from now on every token if it was the former.
            if "no 'token' field" in _error_text(exc):
                self._list_form = False
                log.warning("auth at %s does not know POST /verify with a list of tokens (it answered: %s); checking one token "
                            "per request from now on: upgrade auth to check them together", self._shown_url, _error_text(exc))
            return await self._check_each(tokens)
        try:
            results = json.loads(response.body)["results"]
            if len(results) != len(tokens):
                raise ValueError(f"{len(results)} results for {len(tokens)} tokens")
            return [Identity.from_answer(result) if "user_id" in result else AuthRejected(printable(str(result["error"]))) for result in results]
        except (ValueError, KeyError, TypeError, RecursionError) as exc:
            raise AuthUnavailable(f"auth service gave an unexpected answer at {self._shown_url} ({exc})") from None

    async def _check_each(self, tokens: list[str]) -> list[Identity | Exception]:
        """One request per token (at most ``max_in_flight`` at once)."""
        return await asyncio.gather(*(self._check_one(token) for token in tokens), return_exceptions=True)

    async def _check_one(self, token: str) -> Identity:
        try:
            response = await self._post({"token": token})
        except HTTPClientError as exc:
            if exc.code == 401:
                raise AuthRejected(_error_text(exc)) from None
            raise _unavailable(exc, self._shown_url) from None
        try:
            return Identity.from_answer(json.loads(response.body))
        except (ValueError, KeyError, TypeError, RecursionError):
            raise AuthUnavailable(f"auth service gave an unexpected answer at {self._shown_url}") from None

    async def _post(self, body: dict) -> HTTPResponse:
        return await self._http.fetch(
            self._verify_url, method="POST", body=json.dumps(body),
            headers={"Content-Type": "application/json"}, request_timeout=self._timeout, connect_timeout=self._timeout,
            prepare_curl_callback=_small_buffers,
        )


def within_body(tokens: list[str], limit: int) -> list[list[str]]:
    """``tokens``, in order, cut into lists whose ``{"tokens": [...]}`` body (as :func:`json.dumps`
    writes it: ASCII) has at most ``limit`` bytes, or a single token where one alone is longer.  Pure."""
    empty = len(json.dumps({"tokens": []}))
    parts: list[list[str]] = [[]]
    size = empty
    for token in tokens:
        cost = len(json.dumps(token)) + 2  # with its ", " (the last has none: two bytes of slack)
        if parts[-1] and size + cost > limit:
            parts.append([])
            size = empty
        parts[-1].append(token)
        size += cost
    return parts


def _unavailable(exc: HTTPClientError, url: str) -> AuthUnavailable:
    if exc.code == 599:  # no HTTP answer: refused, reset, timed out (libcurl's message says which)
        return AuthUnavailable(f"auth service unreachable at {url}: {exc.message}", unanswered=True)
    return AuthUnavailable(f"auth service answered {exc.code} at {url}", unanswered=exc.code == 503)


def _small_buffers(curl: pycurl.Curl) -> None:
    """An answer of auth is a few hundred bytes: a 4 KB receive buffer per kept handle rather
    than libcurl's 16 KB (the handles live as long as the node)."""
    curl.setopt(pycurl.BUFFERSIZE, 4096)


def _error_text(exc: HTTPClientError) -> str:
    """The error of auth's answer, as one printable line (:func:`logtext.printable`): the node
    logs it and sends it as a close reason, and an auth of an earlier version quoted in it parts
    of a browser's token (its header, which nobody signed): a line break in it forged a line of
    the node's log, and a lone surrogate answered the handshake 500."""
    try:
        return printable(str(json.loads(exc.response.body)["error"]))
    except Exception:  # the reason is only informative
        return "token rejected"

"""Token checks against the auth service, with a short cache.  Loop thread only.

``verify(token)`` returns the user id, or raises :class:`AuthRejected` (close 4401: the client needs
a new token) or :class:`AuthUnavailable` (close 1013: try again later).  Verified tokens are cached
for ``cache_seconds`` keyed by a digest of the token (tokens themselves are never kept or logged),
so a revoked token keeps opening connections on this node for at most that long.

The requests go through Tornado's libcurl client (pycurl), which keeps its connections to auth
open between requests: Tornado's default client opens and closes a TCP connection per request,
which in a reconnect storm costs the node and auth a connect and a close per browser and leaves a
TIME_WAIT socket behind each.  At most ``max_in_flight`` checks are in flight at once; the others
wait in the client's queue.  A connection that auth closed (it restarted) is noticed by libcurl,
which connects again.  Every failure to get an answer (refused, reset, timed out) is libcurl's
error 599, hence :class:`AuthUnavailable`.
"""

from __future__ import annotations

import hashlib
import json
import logging

import pycurl
from cachetools import TTLCache
from tornado.curl_httpclient import CurlAsyncHTTPClient
from tornado.httpclient import HTTPClientError

log = logging.getLogger(__name__)


class AuthError(Exception):
    """Base of the node's auth errors."""


class AuthRejected(AuthError):
    """The auth service said no: bad, expired or revoked token."""


class AuthUnavailable(AuthError):
    """The auth service could not be asked or gave an unusable answer."""


class AuthClient:
    def __init__(self, auth_url: str, cache_seconds: float, timeout: float = 5.0, max_cached: int = 100_000, max_in_flight: int = 10) -> None:
        self._verify_url = f"{auth_url}/verify"
        self._timeout = timeout
        self._cache: TTLCache | None = TTLCache(max_cached, cache_seconds) if cache_seconds > 0 else None
        self._http = CurlAsyncHTTPClient(force_instance=True, max_clients=max_in_flight)

    async def verify(self, token: str | None) -> str:
        if not token:
            raise AuthRejected("no token: connect with ?token=...")
        digest = hashlib.blake2b(token.encode(), digest_size=16).digest()
        if self._cache is not None and (user := self._cache.get(digest)) is not None:
            return user
        try:
            response = await self._http.fetch(
                self._verify_url, method="POST", body=json.dumps({"token": token}),
                headers={"Content-Type": "application/json"}, request_timeout=self._timeout, connect_timeout=self._timeout,
                prepare_curl_callback=_small_buffers,
            )
        except HTTPClientError as exc:
            if exc.code == 401:
                raise AuthRejected(_error_text(exc)) from None
            if exc.code == 599:  # no HTTP answer: refused, reset, timed out (libcurl's message says which)
                raise AuthUnavailable(f"auth service unreachable at {self._verify_url}: {exc.message}") from None
            raise AuthUnavailable(f"auth service answered {exc.code} at {self._verify_url}") from None
        try:
            user = json.loads(response.body)["user_id"]
        except (ValueError, KeyError, TypeError):
            raise AuthUnavailable(f"auth service gave an unexpected answer at {self._verify_url}") from None
        if self._cache is not None:
            self._cache[digest] = user
        return user


def _small_buffers(curl: pycurl.Curl) -> None:
    """An answer of auth is a few hundred bytes: a 4 KB receive buffer per kept handle rather
    than libcurl's 16 KB (the handles live as long as the node)."""
    curl.setopt(pycurl.BUFFERSIZE, 4096)


def _error_text(exc: HTTPClientError) -> str:
    try:
        return json.loads(exc.response.body)["error"]
    except Exception:  # the reason is only informative
        return "token rejected"

"""HTTP handlers of the Auth service and the ``AuthService`` that wires them; loop thread only.

Every response is JSON.  Routes:

- ``POST /tokens``  (admin) ``{"user_id": "alice"}`` -> 200 ``{"token": "...", "expires_at": <int>}``; an
  optional ``"ttl"`` (whole seconds, 1 to ``TOKEN_TTL``) issues a shorter-lived token; any other
  field is a 400 naming it (ignored, a misspelt ``ttl`` gave a token of the default lifetime)
- ``POST /verify``  ``{"token": "..."}`` -> 200 ``{"user_id": "alice", "expires_at": <int>, "token_id": <jti>, "issued_at_us": <int>}``;
  401 ``{"error": "token expired" | "token invalid: <why>" | "token revoked"}``;
  503 when Redis cannot say whether the token is revoked.
  Or ``{"tokens": ["...", ...]}`` (1 to ``MAX_VERIFY_BATCH``) -> 200 ``{"results": [...]}``, one per
  token in order, each the single form's 200 or 401 body; 503 as above for the whole request.
  Push nodes send what came while their previous check was in flight as one such request.
- ``POST /revoke``  (admin) ``{"token": "..."}`` or ``{"user_id": "alice"}`` -> 200 ``{"revoked": "token" | "user"}``;
  503 when Redis cannot record it, or when it is recorded but not announced to the push nodes
  (``NOT_ANNOUNCED``: they would keep its open connections), and the caller must retry
- ``GET /healthz`` -> 200 ``{"status": "ok"}``, or 503 ``{"status": "redis unavailable"}`` (it reads
  Redis on every call as ``/verify`` does: revocations live there, so without reading them no token
  can be verified), or 503
  ``{"status": "redis refused", "reason": ...}`` when Redis refuses REDIS_URL's login or that read (its
  password or user changed, the user's rights narrowed, its certificate replaced), the reason
  naming the variable and the fix; the 503s of ``/verify`` and ``/revoke`` say so too
- ``GET /metrics`` -> Prometheus metrics (``auth.metrics``): tokens issued, verifications by result,
  revocations, requests and their latency by route

Admin routes need ``Authorization: Bearer <AUTH_ADMIN_KEY>``, or one of the previous admin keys
(``AUTH_ADMIN_KEY_PREVIOUS``), each compared in constant time (401 otherwise).  Tokens are signed
with ``AUTH_SECRET``; ``/verify`` and ``/revoke`` also accept tokens signed with a previous secret
(``AUTH_SECRET_PREVIOUS``), tried after the current one (``auth.tokens.verify``).  A body that is not
the JSON object a route expects gets 400 with ``{"error": ...}`` saying what was expected and what
arrived; a body over ``MAX_BODY_BYTES`` is refused by Tornado itself (bare 400, connection closed,
which a client still sending sees as a reset).
Tokens and keys are never logged: only user ids and token ids (jti).
"""

from __future__ import annotations

import hmac
import json
import logging
import time
from collections.abc import Callable, Sequence

import redis.asyncio
import tornado.httpserver
import tornado.httputil
import tornado.netutil
import tornado.web

import redisfull
from auth import tokens
from auth.metrics import AuthMetrics
from auth.revocations import CHANNEL, RedisFull, RedisRefused, RevocationNotAnnounced, Revocations, RevocationsUnavailable
from outage import Outage

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 64 * 1024
#: Tokens in one ``POST /verify`` of the list form (wsnode.auth sends at most as many, and no body
#: over ``MAX_BODY_BYTES``: 100 tokens of ASCII user ids fit in it, 29 of the longest do).
MAX_VERIFY_BATCH = 100
#: Addresses logged, at most, as sending a previous admin key (once each).
MAX_LOGGED_SENDERS = 1000
ROUTES_HELP = "POST /tokens, POST /verify, POST /revoke, GET /healthz, GET /metrics"
REDIS_DOWN = "cannot reach Redis to check or record revocations; retry later (operators: check REDIS_URL)"
#: The 503 body's error when Redis refuses auth's login or command (:class:`RedisRefused`), before what to fix.
REDIS_REFUSED = "Redis refuses auth's login or command, so revocations cannot be checked or recorded; retry later (operators: {})"
REDIS_FULL = f"Redis is full and refuses to record the revocation; retry later (operators: {redisfull.HINT})"
NOT_ANNOUNCED = ("revocation recorded but not yet announced to the push nodes, so connections already open with the revoked tokens stay open: "
                 f"retry the call, which announces it (operators: check that Redis answers and that REDIS_URL's user may publish on {CHANNEL})")


def matching_key(presented: bytes, keys: Sequence[bytes]) -> int | None:
    """The index in ``keys`` of the key equal to ``presented``, or None.  Each key is compared, in
    constant time (``hmac.compare_digest``), whichever matches: the time taken says nothing of
    which key, or which of its bytes, matched.  Pure."""
    matches = [hmac.compare_digest(presented, key) for key in keys]
    return matches.index(True) if True in matches else None


def _unavailable(exc: RevocationsUnavailable) -> str:
    """A 503 body's error for Redis not answering, or refusing REDIS_URL's login (what to fix)."""
    return REDIS_REFUSED.format(exc) if isinstance(exc, RedisRefused) else REDIS_DOWN


class Reject(tornado.web.HTTPError):
    """Ends a request with ``status`` and the JSON ``body``; raised from handlers."""

    def __init__(self, status: int, body: dict, headers: dict | None = None) -> None:
        super().__init__(status)
        self.body = body
        self.headers = headers or {}


access_log = logging.getLogger("tornado.access")


def _log_request(handler: tornado.web.RequestHandler) -> None:
    """Tornado's access log, at levels an operator can read in an outage, and without the query
    string (as on the nodes).  A 401 is INFO: on ``/verify`` it is a node asking about an expired
    or bad token, an expected event (one WARNING per browser reconnecting with an old token
    before); on an admin request the refusal has a WARNING line of its own.  A 503 is INFO: it is
    Redis unavailable, which :meth:`AuthService.redis_failed` logs once per change (an ERROR line
    per request before, two with ``cannot verify``).  Other 4xx are WARNING and 5xx ERROR, as
    Tornado's own."""
    status = handler.get_status()
    request = handler.request
    level = (logging.INFO if status < 400 or status in (401, 503)
             else logging.WARNING if status < 500 else logging.ERROR)
    access_log.log(level, "%d %s %s (%s) %.2fms", status, request.method, request.path, request.remote_ip, 1000 * request.request_time())


class AuthService:
    """The Auth HTTP server: ``start()`` on the loop, ``await stop()`` on the same loop.

    ``redis_client`` belongs to the caller, who closes it after ``stop()``.  ``metrics`` defaults to
    a new :class:`AuthMetrics` with a registry of its own.  ``previous_secrets`` still verify the
    tokens they signed, and ``previous_admin_keys`` still open the admin routes (a rotation).
    """

    def __init__(self, secret: str, admin_key: str, redis_client: redis.asyncio.Redis, token_ttl: int, clock: Callable[[], float] = time.time,
                 metrics: AuthMetrics | None = None, previous_secrets: Sequence[str] = (), previous_admin_keys: Sequence[str] = (),
                 request_timeout: float | None = None) -> None:
        self.secret = secret
        #: Seconds a client has to send a request's headers, and again its body, and that an idle
        #: keep-alive connection stays open (``REQUEST_TIMEOUT``, as on the nodes); None: Tornado's
        #: defaults, an hour for the headers and no limit for the body.
        self.request_timeout = request_timeout
        self.previous_secrets = tuple(previous_secrets)
        self.metrics = metrics if metrics is not None else AuthMetrics()
        self.admin_key = admin_key
        #: Every admin key accepted, as bytes, the current one first.
        self.admin_keys = tuple(key.encode() for key in (admin_key, *previous_admin_keys))
        #: Addresses already logged as sending a previous admin key (one line each, a bounded set).
        self._previous_key_senders: set[str] = set()
        self.token_ttl = token_ttl
        self.clock = clock
        self.revocations = Revocations(redis_client, token_ttl, clock)
        args = {"service": self}
        self.app = tornado.web.Application(
            [
                (r"/tokens", TokensHandler, args),
                (r"/verify", VerifyHandler, args),
                (r"/revoke", RevokeHandler, args),
                (r"/healthz", HealthHandler, args),
                (r"/metrics", MetricsHandler, args),
            ],
            default_handler_class=NotFoundHandler,
            default_handler_args=args,
            log_function=_log_request,
        )
        #: Redis's outage as seen by auth, logged once per change (:meth:`redis_failed`), counted in
        #: requests that failed.
        self._redis_outage = Outage()
        self._server: tornado.httpserver.HTTPServer | None = None

    def verify(self, token: object) -> tokens.Claims:
        """``tokens.verify`` with the current secret, then the previous ones, at the service's clock."""
        return tokens.verify(self.secret, token, self.clock(), self.previous_secrets)

    def previous_admin_key_used(self, remote_ip: str | None) -> None:
        """Count an admin request accepted with a previous admin key, and log its address once."""
        self.metrics.previous_admin_key_used()
        address = remote_ip or "?"
        if address not in self._previous_key_senders and len(self._previous_key_senders) < MAX_LOGGED_SENDERS:
            self._previous_key_senders.add(address)
            log.warning("admin request from %s accepted with a key of AUTH_ADMIN_KEY_PREVIOUS: move that backend to AUTH_ADMIN_KEY "
                        "(logged once per address; auth_admin_previous_key_requests_total counts them all)", address)

    def redis_failed(self, exc: RevocationsUnavailable, asked_at: float | None = None) -> None:
        """A request (asked at ``asked_at``, :meth:`redis_asking`) could not read Redis: an ERROR
        line the first time, with what to do; the requests after it log at INFO until
        :meth:`redis_answered`.  One asked before the last outage ended is of that outage, and
        begins no new one (:meth:`outage.Outage.failed`)."""
        # What to fix changes within one outage (Redis back, refusing a changed password or
        # rights: RedisRefused): logged again, or the fix was in INFO lines only.
        cause = str(exc) if isinstance(exc, RedisRefused) else type(exc).__name__
        if self._redis_outage.failed(cause, asked_at=asked_at):
            log.error("Redis unavailable: %s; /verify and /healthz answer 503 (nodes refuse new connections with 1013) "
                      "until it answers again", exc)

    def redis_asking(self) -> float:
        """When a request is about to read Redis: what :meth:`redis_answered` takes with its answer."""
        return self._redis_outage.asking()

    def redis_answered(self, asked_at: float | None = None) -> None:
        """Redis answered a request (asked at ``asked_at``, :meth:`redis_asking`): say so once after
        an outage that began before it was asked."""
        if (recovery := self._redis_outage.answered(asked_at)) is not None:
            log.info("Redis answers again after %.0f s; %d requests failed meanwhile", recovery.seconds, recovery.failures)

    def start(self, port: int, address: str) -> int:
        """Listen on ``address:port`` (port 0 picks a free one); returns the port bound."""
        if self._server is not None:
            raise RuntimeError("AuthService.start() called twice: call stop() first")
        sockets = tornado.netutil.bind_sockets(port, address)
        timeouts = {} if self.request_timeout is None else {"idle_connection_timeout": self.request_timeout, "body_timeout": self.request_timeout}
        self._server = tornado.httpserver.HTTPServer(self.app, max_body_size=MAX_BODY_BYTES, **timeouts)
        self._server.add_sockets(sockets)
        return sockets[0].getsockname()[1]

    async def stop(self) -> None:
        """Stop accepting connections, then close the open ones."""
        server, self._server = self._server, None
        if server is None:
            return
        server.stop()
        await server.close_all_connections()


class JsonHandler(tornado.web.RequestHandler):
    """Common ground: JSON in and out, admin check, errors as ``{"error": ...}``."""

    def initialize(self, service: AuthService) -> None:
        self.service = service

    def on_finish(self) -> None:
        self.service.metrics.request(self.request.path, self.get_status(), self.request.request_time())

    def set_default_headers(self) -> None:
        self.set_header("Content-Type", "application/json; charset=UTF-8")
        self.set_header("Cache-Control", "no-store")

    def write_error(self, status_code: int, **kwargs) -> None:
        exc = kwargs.get("exc_info", (None, None, None))[1]
        if isinstance(exc, Reject):
            for name, value in exc.headers.items():
                self.set_header(name, value)
            self.finish(exc.body)
        else:
            self.finish({"error": tornado.httputil.responses.get(status_code, "Unknown")})

    def require_admin(self) -> None:
        scheme, _, key = self.request.headers.get("Authorization", "").partition(" ")
        index = matching_key(key.strip().encode(), self.service.admin_keys)
        if scheme.lower() == "bearer" and index is not None:
            if index > 0:
                self.service.previous_admin_key_used(self.request.remote_ip)
            return
        problem = "missing" if not scheme else "not a Bearer key" if scheme.lower() != "bearer" else "the key does not match"
        log.warning("admin request %s %s from %s refused: %s", self.request.method, self.request.path, self.request.remote_ip, problem)
        raise Reject(401, {"error": f"expected header 'Authorization: Bearer <AUTH_ADMIN_KEY>': {problem}"}, {"WWW-Authenticate": 'Bearer realm="auth"'})

    def json_object(self, example: str) -> dict:
        try:
            body = json.loads(self.request.body)
        except (ValueError, RecursionError) as exc:
            raise Reject(400, {"error": f"expected a JSON object like {example}, got a body that is not JSON ({exc})"}) from None
        if not isinstance(body, dict):
            raise Reject(400, {"error": f"expected a JSON object like {example}, got a JSON {_json_type(body)}"})
        return body

    def only_fields(self, body: dict, allowed: Sequence[str], example: str, takes: str) -> None:
        """Refuse a body with fields this request does not take: a misspelt or guessed one
        (``"expires_in"`` for ``"ttl"``) was ignored, so the call did something else than asked
        (a token living ``TOKEN_TTL``) with a 200."""
        unknown = [name for name in body if name not in allowed]
        if unknown:
            shown = ", ".join(repr(name[:40]) for name in unknown[:5]) + (", ..." if len(unknown) > 5 else "")
            raise Reject(400, {"error": f"expected a JSON object like {example}, got the unknown field(s) {shown}: {takes}"})

    def string_field(self, body: dict, name: str, example: str) -> str:
        value = body.get(name)
        if not isinstance(value, str):
            got = f"no {name!r} field" if name not in body else f"{name!r} as a JSON {_json_type(value)}"
            raise Reject(400, {"error": f"expected a JSON object like {example}, got {got}"})
        return value


def _json_type(value: object) -> str:
    names = {dict: "object", list: "array", str: "string", bool: "boolean", int: "number", float: "number", type(None): "null"}
    return names.get(type(value), type(value).__name__)


class TokensHandler(JsonHandler):
    async def post(self) -> None:
        self.require_admin()
        body = self.json_object('{"user_id": "alice"}')
        user_id = self.string_field(body, "user_id", '{"user_id": "alice"}')
        self.only_fields(body, ("user_id", "ttl"), '{"user_id": "alice", "ttl": 60}',
                         f'POST /tokens takes "user_id" and optionally "ttl" (whole seconds, 1 to {self.service.token_ttl}, TOKEN_TTL)')
        ttl = self._ttl(body.get("ttl"))
        try:
            issued = tokens.issue(self.service.secret, user_id, self.service.clock(), ttl)
        except tokens.InvalidUserId as exc:
            raise Reject(400, {"error": str(exc)}) from None
        self.service.metrics.issued()
        log.info("issued token jti=%s user=%s expires_at=%d", issued.jti, user_id, issued.expires_at)
        self.finish({"token": issued.token, "expires_at": issued.expires_at})

    def _ttl(self, value: object) -> int:
        """The token's lifetime: ``TOKEN_TTL``, or a shorter ``ttl`` the backend asked for.  Never
        longer: a user's revocation is kept for ``TOKEN_TTL`` (``auth.revocations``), so it must
        outlive every token it covers."""
        if value is None:
            return self.service.token_ttl
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= self.service.token_ttl:
            raise Reject(400, {"error": f"ttl must be a whole number of seconds from 1 to {self.service.token_ttl} (TOKEN_TTL), "
                                        f"got {json.dumps(value)[:40]}"})
        return value


class VerifyHandler(JsonHandler):
    EXAMPLE = '{"token": "..."} or {"tokens": ["...", ...]}'

    async def post(self) -> None:
        body = self.json_object(self.EXAMPLE)
        if "tokens" in body and "token" not in body:
            answers = await self._verify(self._token_list(body["tokens"]))
            self.finish({"results": [answer for _, answer in answers]})
            return
        [(status, answer)] = await self._verify([self.string_field(body, "token", self.EXAMPLE)])
        if status != 200:
            raise Reject(status, answer)
        self.finish(answer)

    def _token_list(self, value: object) -> list[str]:
        if not isinstance(value, list) or not 1 <= len(value) <= MAX_VERIFY_BATCH or not all(isinstance(token, str) for token in value):
            got = (f"'tokens' as a JSON {_json_type(value)}" if not isinstance(value, list)
                   else f"a list of {len(value)} tokens" if not 1 <= len(value) <= MAX_VERIFY_BATCH
                   else "a list with an item that is not a string")
            raise Reject(400, {"error": f"expected a JSON object like {self.EXAMPLE}, with 1 to {MAX_VERIFY_BATCH} token strings; got {got}"})
        return value

    async def _verify(self, tokens_: list[str]) -> list[tuple[int, dict]]:
        """``(200, {"user_id", "expires_at", "token_id", "issued_at_us"})`` or ``(401, {"error"})`` per token, in order;
        raises 503 when Redis cannot say whether the signed ones are revoked (one MGET for all)."""
        answers: list[tuple[int, dict] | None] = []
        signed: list[tokens.Claims] = []
        refused: list[str] = []  # the results of the tokens refused here, counted once they are answered
        for token in tokens_:
            try:
                signed.append(self.service.verify(token))
                answers.append(None)
            except tokens.TokenExpired:
                refused.append("expired")
                answers.append((401, {"error": "token expired"}))
            except tokens.TokenInvalid as exc:
                refused.append("invalid")
                answers.append((401, {"error": f"token invalid: {exc}"}))
        asked = self.service.redis_asking()
        try:
            revoked = iter(await self.service.revocations.are_revoked(signed))
        except RevocationsUnavailable as exc:
            # The whole request is answered 503: each of its tokens counts as that, not as the
            # 401 it was never sent.
            for _ in tokens_:
                self.service.metrics.verified("unavailable")
            self.service.redis_failed(exc, asked)  # the outage's ERROR line, once; this request's at INFO
            log.info("cannot verify %s: %s", ", ".join(f"jti={claims.jti} user={claims.user_id}" for claims in signed), exc)
            raise Reject(503, {"error": _unavailable(exc)}) from None
        if signed:
            # Only a read says Redis answered: tokens refused here (expired, bad) read nothing, and
            # "answers again" for them mid-outage made the next request log the outage's ERROR again.
            self.service.redis_answered(asked)
        for result in refused:
            self.service.metrics.verified(result)
        claims_left = iter(signed)
        for index, answer in enumerate(answers):
            if answer is not None:
                continue
            claims = next(claims_left)
            if next(revoked):
                self.service.metrics.verified("revoked")
                log.info("refused revoked token jti=%s user=%s", claims.jti, claims.user_id)
                answers[index] = (401, {"error": "token revoked"})
            else:
                self.service.metrics.verified("ok")
                if claims.signed_with_previous:
                    self.service.metrics.verified_with_previous_secret()
                answers[index] = (200, {"user_id": claims.user_id, "expires_at": claims.expires_at, "token_id": claims.jti, "issued_at_us": claims.issued_at_us})
        return answers  # type: ignore[return-value]  # every None was filled


class RevokeHandler(JsonHandler):
    EXAMPLE = '{"token": "..."} or {"user_id": "alice"}'

    async def post(self) -> None:
        self.require_admin()
        body = self.json_object(self.EXAMPLE)
        fields = [name for name in ("token", "user_id") if name in body]
        if len(fields) != 1:
            got = "both 'token' and 'user_id'" if fields else "neither 'token' nor 'user_id'"
            raise Reject(400, {"error": f"expected a JSON object like {self.EXAMPLE}, got {got}"})
        self.only_fields(body, fields, self.EXAMPLE, f'POST /revoke takes "{fields[0]}" alone')
        try:
            if fields == ["token"]:
                await self._revoke_token(self.string_field(body, "token", self.EXAMPLE))
            else:
                await self._revoke_user(self.string_field(body, "user_id", self.EXAMPLE))
        except RevocationsUnavailable as exc:
            log.error("cannot record a revocation: %s", exc)
            raise Reject(503, {"error": REDIS_FULL if isinstance(exc, RedisFull) else _unavailable(exc)}) from None
        except RevocationNotAnnounced as exc:
            log.error("%s", exc)
            raise Reject(503, {"error": NOT_ANNOUNCED}) from None
        self.finish({"revoked": "token" if fields == ["token"] else "user"})

    async def _revoke_token(self, token: str) -> None:
        try:
            claims = self.service.verify(token)  # one signed with a previous secret is revoked alike (by jti)
        except tokens.TokenExpired as exc:
            # Dead for new connections already, but the connections open with it stay open for
            # TOKEN_EXPIRY_GRACE: revoked alike, they close now.  The entry in Redis is written
            # only while the token is within CLOCK_MARGIN_SECONDS of its expiry.
            claims = exc.claims
        except tokens.TokenInvalid as exc:
            raise Reject(400, {"error": f"token invalid: {exc}"}) from None
        await self.service.revocations.revoke_token(claims, claims.expires_at)
        self.service.metrics.revoked("token")
        log.info("revoked token jti=%s user=%s", claims.jti, claims.user_id)

    async def _revoke_user(self, user_id: str) -> None:
        try:
            tokens.check_user_id(user_id)
        except tokens.InvalidUserId as exc:
            raise Reject(400, {"error": str(exc)}) from None
        at = self.service.clock()
        await self.service.revocations.revoke_user(user_id, at)
        self.service.metrics.revoked("user")
        log.info("revoked every token of user=%s issued up to %.3f", user_id, at)


class HealthHandler(JsonHandler):
    async def get(self) -> None:
        asked = self.service.redis_asking()
        try:
            await self.service.revocations.ping()
        except RevocationsUnavailable as exc:
            self.service.redis_failed(exc, asked)  # the outage's ERROR line, once; each probe's at INFO
            log.info("health check: %s", exc)
            if isinstance(exc, RedisRefused):
                raise Reject(503, {"status": "redis refused", "reason": str(exc)}) from None
            raise Reject(503, {"status": "redis unavailable"}) from None
        self.service.redis_answered(asked)
        self.finish({"status": "ok"})


class MetricsHandler(JsonHandler):
    """``GET /metrics``: the service's registry in the format the scraper's ``Accept`` asks for."""

    def get(self) -> None:
        body, content_type = self.service.metrics.render(self.request.headers.get("Accept"))
        self.set_header("Content-Type", content_type)
        self.finish(body)


class NotFoundHandler(JsonHandler):
    def prepare(self) -> None:
        raise Reject(404, {"error": f"no such path {self.request.path!r}: expected one of {ROUTES_HELP}"})

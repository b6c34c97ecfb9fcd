"""Prometheus metrics of the Auth service, in a registry of its own (no global registry).

Loop thread only (handlers update them, ``GET /metrics`` renders them).  Every name starts with
``auth_``; the README lists them under "Metrics and health".  No I/O: tests drive
:class:`AuthMetrics` with plain calls and read its registry.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.exposition import choose_encoder

#: Route labels; any other path is counted as "other" (so a scan cannot add series).
ROUTES = ("/tokens", "/verify", "/revoke", "/healthz", "/metrics")
VERIFY_RESULTS = ("ok", "expired", "invalid", "revoked", "unavailable")
REVOKE_KINDS = ("token", "user")
REQUEST_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class AuthMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self._issued = Counter("auth_tokens_issued", "Tokens issued (POST /tokens answered 200).", registry=r)
        self._verified = Counter(
            "auth_verifications",
            "POST /verify answers about a token, by result: ok, expired, invalid, revoked (all three 401), "
            "unavailable (503: Redis could not say whether it is revoked).",
            ["result"], registry=r,
        )
        self._previous_secret = Counter(
            "auth_verifications_previous_secret",
            "Tokens POST /verify answered ok (200) that were signed with a previous secret (AUTH_SECRET_PREVIOUS), not AUTH_SECRET: "
            "browsers still use tokens from before the rotation.", registry=r)
        self._previous_admin_key = Counter(
            "auth_admin_previous_key_requests",
            "Admin requests (POST /tokens, POST /revoke) accepted with a previous admin key (AUTH_ADMIN_KEY_PREVIOUS), not AUTH_ADMIN_KEY: "
            "a business backend still sends the old key.", registry=r)
        self._revoked = Counter("auth_revocations", "Revocations recorded, by kind: one token, or every token of a user.", ["kind"], registry=r)
        self._requests = Counter("auth_requests", "HTTP requests answered, by route and status.", ["route", "status"], registry=r)
        self._duration = Histogram("auth_request_duration_seconds", "Seconds from a request's arrival to its answer, by route.", ["route"],
                                   buckets=REQUEST_BUCKETS, registry=r)
        for result in VERIFY_RESULTS:
            self._verified.labels(result=result)
        for kind in REVOKE_KINDS:
            self._revoked.labels(kind=kind)

    def issued(self) -> None:
        self._issued.inc()

    def verified(self, result: str) -> None:
        if result not in VERIFY_RESULTS:
            raise ValueError(f"verify result {result!r}: expected one of {', '.join(VERIFY_RESULTS)}")
        self._verified.labels(result=result).inc()

    def verified_with_previous_secret(self) -> None:
        self._previous_secret.inc()

    def previous_admin_key_used(self) -> None:
        self._previous_admin_key.inc()

    def revoked(self, kind: str) -> None:
        if kind not in REVOKE_KINDS:
            raise ValueError(f"revocation kind {kind!r}: expected one of {', '.join(REVOKE_KINDS)}")
        self._revoked.labels(kind=kind).inc()

    def request(self, path: str, status: int, seconds: float) -> None:
        route = path if path in ROUTES else "other"
        self._requests.labels(route=route, status=str(status)).inc()
        self._duration.labels(route=route).observe(seconds)

    def render(self, accept: str | None = None) -> tuple[bytes, str]:
        """The exposition for a request's ``Accept`` header: ``(body, content type)``."""
        encoder, content_type = choose_encoder(accept or "")
        return encoder(self.registry), content_type

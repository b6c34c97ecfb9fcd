"""Prometheus metrics of one push node, in a registry of its own (no global registry).

Loop thread only: the node updates them from the loop, and :class:`MetricsHandler` (``GET
/metrics``) renders them on the loop, so the gauges' callbacks (``track``) may read the hub.  Every
name starts with ``push_node_``; the README lists them under "Metrics and health".
:class:`NodeMetrics` does no I/O but read the clock: tests drive it with plain calls and read its
registry.
"""

from __future__ import annotations

import bisect
import itertools
import time
from collections.abc import Callable, Iterable

import tornado.web
from prometheus_client import CollectorRegistry, Counter, Gauge, Info
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import HistogramMetricFamily
from prometheus_client.utils import floatToGoString

from tasks.ids import MessageIdError, timestamp_ms
from wsnode.closecodes import CloseCode

#: Upper bounds (seconds) of the delivery latency buckets: milliseconds on a healthy cluster; the
#: top ones catch backlogs and redeliveries (sent again ``REDELIVER_AFTER`` = 30 s after collect).
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)

#: Label values of ``rejected``: the close codes a refusal uses after the upgrade, and the HTTP
#: statuses of a refusal before it (403: origin not allowed; 503: the node is draining or full).
REJECT_CODES = (CloseCode.UNAUTHORIZED, CloseCode.TOO_MANY_CONNECTIONS, CloseCode.BAD_REQUEST, CloseCode.TRY_AGAIN_LATER,
                CloseCode.GOING_AWAY, 403, 503)
#: Label values of ``closed``: codes the node closes accepted connections with.
CLOSE_CODES = (CloseCode.PING_TIMED_OUT, CloseCode.GOING_AWAY, CloseCode.TRY_AGAIN_LATER, CloseCode.SLOW_CLIENT, CloseCode.UNAUTHORIZED,
               CloseCode.BAD_REQUEST)
DELIVERY_KINDS = ("live", "replay")
REPLAY_OUTCOMES = ("served", "truncated", "failed")
#: Outcomes of a client's ``refresh`` (a newer token for its connection): ``ok``; ``rejected`` (bad,
#: expired, revoked or another user's token: closed with 4401); ``unavailable`` (auth could not be
#: asked: the client was told to try again); ``busy`` (one was already in flight).
REFRESH_OUTCOMES = ("ok", "rejected", "unavailable", "busy")


class LatencyHistogram:
    """A histogram collector for the delivery latency, which the node observes once per message
    written: prometheus_client's ``Histogram.observe`` took 0.53 µs a call here (a lock for the
    bucket's count and one for the sum), half of the 1.2 µs per message of :meth:`NodeMetrics.latencies`,
    about a tenth of a node's CPU per delivery in the batch benchmark.  This one finds the bucket with
    ``bisect`` and counts in a list, and renders the same ``_bucket``, ``_count`` and ``_sum`` series
    (not the ``_created`` one).  Loop thread only, like the rest of the module: the node observes on
    the loop and ``/metrics`` renders on the loop."""

    def __init__(self, name: str, documentation: str, buckets: Iterable[float], registry: CollectorRegistry) -> None:
        self._name = name
        self._documentation = documentation
        self._bounds = sorted(float(b) for b in buckets)
        self._counts = [0] * (len(self._bounds) + 1)  # per bucket, not cumulative; the last: over every bound
        self._sum = 0.0
        registry.register(self)

    def observe(self, seconds: float) -> None:
        # le is inclusive: the first bound at or above the value (bisect_left), as Histogram does
        self._counts[bisect.bisect_left(self._bounds, seconds)] += 1
        self._sum += seconds

    def collect(self):
        cumulative = list(itertools.accumulate(self._counts))
        family = HistogramMetricFamily(self._name, self._documentation)
        family.add_metric([], [*((floatToGoString(bound), count) for bound, count in zip(self._bounds, cumulative)), ("+Inf", cumulative[-1])],
                          self._sum)
        yield family


class NodeMetrics:
    """The metrics of the node that advertises ``node``; ``registry`` defaults to a new one."""

    def __init__(self, node: str, registry: CollectorRegistry | None = None, clock: Callable[[], float] = time.time) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self._clock = clock
        r = self.registry
        Info("push_node", "The address this node advertises (its queue's name).", registry=r).info({"node": node})
        self.connections = Gauge("push_node_connections", "WebSocket connections this node holds now, those whose lease is still being written included.", registry=r)
        self.users = Gauge("push_node_users", "Distinct users with at least one connection on this node now.", registry=r)
        self.ready = Gauge("push_node_ready", "1 while /healthz answers 200 (Redis and the queue consumer work, not draining, not full).", registry=r)
        self.redis_up = Gauge("push_node_redis_up", "1 while the routing Redis answered the last PING or lease write.", registry=r)
        self.queue_up = Gauge("push_node_queue_consumer_up", "1 while the queue consumer holds a broker connection.", registry=r)
        self.revocations = Gauge("push_node_revocations_subscribed", "1 while the node is subscribed to auth's revocations (auth:revocations).", registry=r)
        self.draining = Gauge("push_node_draining", "1 once the node is shutting down (SIGTERM).", registry=r)
        self._connects = Counter("push_node_connects", "Connections accepted and bound (after token check and lease write).", registry=r)
        self._disconnects = Counter("push_node_disconnects", "Bound connections that closed, for any reason.", registry=r)
        self._rejected = Counter(
            "push_node_rejected_connections",
            "Connection attempts refused, by close code (4401 bad token, 4429 MAX_USER_CONNECTIONS reached or MAX_USER_CONNECTS exceeded, 4500 bad request, "
            "1013 auth or Redis unavailable, the node full, or too many messages while the lease was written, 1001 the node began draining during the handshake) or by HTTP "
            "status before the upgrade (403 origin not allowed, "
            "503 draining or MAX_CONNECTIONS reached).",
            ["code"], registry=r,
        )
        self._closed = Counter(
            "push_node_closed_connections",
            "Bound connections the node closed, by close code (1000 ping timed out, 1001 drain, 1013 resume failed or "
            "backlog overflow, leases not written for LEASE_TTL or lost from Redis, or the queue connection to the broker "
            "given up on while consuming, 4008 client too slow, 4401 token revoked, expired or its refresh refused, 4500 bad client frame or too many acks).",
            ["code"], registry=r,
        )
        self._delivered = Counter(
            "push_node_delivered_messages",
            "Message frames written to sockets (one per connection), by kind: live (from the queue) or replay "
            "(an opening replay, with the live messages held back during it).",
            ["kind"], registry=r,
        )
        self._batches = Counter("push_node_queue_batches", "Batches the queue consumer handed to the loop.", registry=r)
        self._queue_messages = Counter("push_node_queue_messages", "wsnode.deliver messages read from the node queue (live and replay pages).", registry=r)
        self._latency = LatencyHistogram(
            "push_node_delivery_latency_seconds",
            "Seconds from collect (the millisecond timestamp in the message id, made by the worker) to the write "
            "to the first socket on this node; live messages only, one observation per message and node. Includes "
            "redeliveries; clock skew between worker and node hosts shifts it.",
            LATENCY_BUCKETS, r,
        )
        self._replays = Counter(
            "push_node_replays",
            "Opening replays, by outcome: served (complete), truncated (served, but reached past the retention, "
            "REPLAY_LIMIT or REPLAY_MAX_BYTES), failed (timed out or not requested; the client was closed with 1013).",
            ["outcome"], registry=r,
        )
        self._refreshes = Counter(
            "push_node_token_refreshes",
            "Token refreshes clients sent on open connections, by outcome: ok, rejected (closed with 4401), "
            "unavailable (auth could not be asked; the client retries), busy (one was already in flight).",
            ["outcome"], registry=r,
        )
        self._lease_failures = Counter("push_node_lease_renewal_failures", "Lease renewals that failed (Redis unavailable): leases expire unless a later one works.", registry=r)
        self._leases_lost = Counter(
            "push_node_leases_lost",
            "Leases that a lease write found gone or ended while the node's writes worked (Redis restarted without them, failed over, "
            "was flushed, or evicted them), counted when connections bound here were closed for it with 1013: lease=user per user, "
            "lease=node for the node's own lease (every connection here closed).",
            ["lease"], registry=r,
        )
        for code in REJECT_CODES:
            self._rejected.labels(code=str(int(code)))
        for code in CLOSE_CODES:
            self._closed.labels(code=str(int(code)))
        for kind in DELIVERY_KINDS:
            self._delivered.labels(kind=kind)
        for outcome in REPLAY_OUTCOMES:
            self._replays.labels(outcome=outcome)
        for outcome in REFRESH_OUTCOMES:
            self._refreshes.labels(outcome=outcome)
        for lease in ("user", "node"):
            self._leases_lost.labels(lease=lease)

    def track(self, connections: Callable[[], float], users: Callable[[], float], health: Callable[[], dict]) -> None:
        """Read the gauges from the node at each scrape: counts from the hub, the rest from
        ``health()`` (a dict with booleans ``ready``, ``redis``, ``queue``, ``revocations`` and
        ``draining``)."""
        self.connections.set_function(connections)
        self.users.set_function(users)
        self.ready.set_function(lambda: float(health()["ready"]))
        self.redis_up.set_function(lambda: float(health()["redis"]))
        self.queue_up.set_function(lambda: float(health()["queue"]))
        self.revocations.set_function(lambda: float(health()["revocations"]))
        self.draining.set_function(lambda: float(health()["draining"]))

    # --- events -------------------------------------------------------------------------------

    def connected(self) -> None:
        self._connects.inc()

    def disconnected(self) -> None:
        self._disconnects.inc()

    def rejected(self, code: int) -> None:
        self._rejected.labels(code=str(int(code))).inc()

    def closed(self, code: int) -> None:
        self._closed.labels(code=str(int(code))).inc()

    def batch(self, messages: int) -> None:
        """One consumer batch of ``messages`` queue messages."""
        self._batches.inc()
        self._queue_messages.inc(messages)

    def delivered(self, kind: str, frames: int) -> None:
        """``frames`` message frames written, ``kind`` "live" or "replay"."""
        if frames:
            self._delivered.labels(kind=kind).inc(frames)

    def latency(self, message_id: str, now: float | None = None) -> None:
        """Observe how long ago ``message_id`` was collected (0 if the clocks disagree); an id
        that is not a message id is ignored."""
        self.latencies((message_id,), now)

    def latencies(self, message_ids: Iterable[str], now: float | None = None) -> None:
        """:meth:`latency` of each of ``message_ids``, all at one time (one clock read for the
        messages of one write)."""
        now = self._clock() if now is None else now
        observe = self._latency.observe
        for message_id in message_ids:
            try:
                made = timestamp_ms(message_id) / 1000
            except MessageIdError:
                continue
            observe(max(0.0, now - made))

    def replay(self, outcome: str) -> None:
        """One opening replay ended: "served", "truncated" or "failed"."""
        if outcome not in REPLAY_OUTCOMES:
            raise ValueError(f"replay outcome {outcome!r}: expected one of {', '.join(REPLAY_OUTCOMES)}")
        self._replays.labels(outcome=outcome).inc()

    def refresh(self, outcome: str) -> None:
        """A client's token refresh ended: one of ``REFRESH_OUTCOMES``."""
        if outcome not in REFRESH_OUTCOMES:
            raise ValueError(f"refresh outcome {outcome!r}: expected one of {', '.join(REFRESH_OUTCOMES)}")
        self._refreshes.labels(outcome=outcome).inc()

    def lease_failure(self) -> None:
        self._lease_failures.inc()

    def leases_lost(self, node: bool, users: int) -> None:
        """A lease write found the node's own lease (``node``) or ``users`` users' leases gone."""
        if node:
            self._leases_lost.labels(lease="node").inc()
        if users:
            self._leases_lost.labels(lease="user").inc(users)

    # --- exposition ---------------------------------------------------------------------------

    def render(self, accept: str | None = None) -> tuple[bytes, str]:
        """The exposition for a request's ``Accept`` header: ``(body, content type)``."""
        encoder, content_type = choose_encoder(accept or "")
        return encoder(self.registry), content_type


class MetricsHandler(tornado.web.RequestHandler):
    """``GET /metrics``: the node's registry in the format the scraper's ``Accept`` asks for."""

    def initialize(self, metrics: NodeMetrics) -> None:
        self.metrics = metrics

    def get(self) -> None:
        body, content_type = self.metrics.render(self.request.headers.get("Accept"))
        self.set_header("Content-Type", content_type)
        self.finish(body)

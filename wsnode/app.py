"""Wiring of one push node: hub, leases, auth client, queue consumer and HTTP server; a connection's
admission (``attach``) and departure (``detach``).

Four parts of the node are modules of their own, each one concept (mixins of :class:`PushNode`):
its leases and the connections their gaps close (:mod:`wsnode.leasekeeper`), what it writes to its
connections and its replay requests (:mod:`wsnode.deliveries`), what it does about open
connections' tokens (:mod:`wsnode.tokenwatch`), and whether it is ready (``/healthz``) with the
PING of its Redis (:mod:`wsnode.health`).

:class:`PushNode` has explicit ``start()`` and ``stop()``, both coroutines run on the node's
IOLoop.  All its state is touched on the loop thread only, except:

- the queue consumer, which runs on its own thread and enters the loop through ``add_callback``;
- the publisher, a single thread that sends tasks to the worker (replay requests, receipts),
  because publishing to the broker blocks; it takes the replay requests the loop thread queued
  (:mod:`wsnode.replays`).

Shutdown (SIGTERM) is explicit: stop accepting connections; end this node's leases (Dispatch stops
routing here); close clients with 1001 ("reconnect elsewhere"); flush receipts; stop the consumer;
hand what is still queued for this node back to Dispatch; stop the publisher.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import logging
import os
import time

import redis.asyncio as aioredis
import tornado.netutil
import tornado.web
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError
from tornado.httpserver import HTTPServer
from tornado.ioloop import IOLoop, PeriodicCallback
from tornado.websocket import WebSocketClosedError

import redisfull
import redislogin
import settings
from outage import Outage
from tasks.queues import node_address
from tasks import publishing, wirejson
from tasks.reclaim import hand_back
from wsnode import connectrate, protocol
from wsnode.auth import AuthClient
from wsnode.closecodes import CloseCode
from wsnode.coalesce import Coalescer
from wsnode.consumer import NodeQueueConsumer
from wsnode.deliveries import REPLAY_REQUESTS_PER_TASK, Deliveries
from wsnode.expiry import ExpirySchedule
from wsnode.handler import PushHandler
from wsnode.health import REDIS_PING_SECONDS, HealthHandler, NodeHealth
from wsnode.hub import Hub
from wsnode.leasekeeper import LeaseKeeper
from wsnode.presence import node_name
from wsnode.metrics import MetricsHandler, NodeMetrics
from wsnode.pinger import PingSchedule
from wsnode.receipts import ReceiptBuffer
from wsnode.receipts import argsrepr as receipts_argsrepr
from wsnode.replays import ReplayRequests
from wsnode.revocations import RecentRevocations, RevocationListener
from wsnode.addressclaim import AddressClaim
from wsnode.registry import NODES_KEY, Leases
from wsnode.session import Session
from wsnode.tokenwatch import TokenWatch

log = logging.getLogger(__name__)
access_log = logging.getLogger("tornado.access")

class NodeStartError(RuntimeError):
    """The node cannot start; the message says why and what to do."""


#: A step of the shutdown that needs the broker gives up after this long (the broker may be down).
STOP_STEP_SECONDS = 10
#: The ids one ``ack`` frame may carry here, as many as fit in ``MAX_FRAME_BYTES`` (``hello``'s ``ack_ids``).
ACK_IDS = protocol.ack_ids_limit(settings.MAX_FRAME_BYTES)

#: Most connections the node opens to Redis.  Callers beyond it wait (up to 5 s) for one to be
#: free, so that thousands of browsers connecting or leaving at once never open thousands of Redis
#: connections (Redis refuses clients beyond its ``maxclients``, 10,000 by default, for everyone).
REDIS_MAX_CONNECTIONS = 16

#: Seconds a client has to send a request's headers, and again its body, before the node closes the
#: connection (Tornado's ``idle_connection_timeout``, which also bounds the headers, and
#: ``body_timeout``): ``settings.REQUEST_TIMEOUT``.  Tornado waits an hour for headers and for ever
#: for a body, so a client that opened connections and sent their handshakes a byte at a time, or
#: not at all (slowloris), held a socket and a file descriptor of the node each for that long.  A
#: browser sends its handshake in one packet; an upgraded WebSocket is no longer an HTTP request,
#: and is not affected.
REQUEST_TIMEOUT_SECONDS = settings.REQUEST_TIMEOUT

#: Files served at ``/static/``: the browser client ``push.js``.
STATIC_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")


def _log_request(handler: tornado.web.RequestHandler) -> None:
    """Tornado's access log without the query string: it carries the token.  A WebSocket upgrade
    (101) is logged at DEBUG: its ``connected`` line says the same with the user and the time it
    took, and in a reconnect storm a second line per connection was 6% of a node's CPU."""
    request = handler.request
    status = handler.get_status()
    level = logging.DEBUG if status == 101 else logging.INFO if status < 400 else logging.WARNING
    access_log.log(level, "%d %s %s (%s) %.2fms", status, request.method, request.path, request.remote_ip, 1000 * request.request_time())


class PushNode(LeaseKeeper, Deliveries, TokenWatch, NodeHealth):
    """One push node (see the module, which names its parts written apart: the mixins
    :class:`~wsnode.leasekeeper.LeaseKeeper`, :class:`~wsnode.deliveries.Deliveries`,
    :class:`~wsnode.tokenwatch.TokenWatch` and :class:`~wsnode.health.NodeHealth`)."""

    def __init__(self, port: int, host: str = settings.NODE_HOST, celery_app=None, internal_port: int | None = None) -> None:
        if celery_app is None:
            from worker import app as celery_app
        self.port = port
        #: ``--internal-port``: where ``/metrics`` and the whole ``/healthz`` answer instead of
        #: ``port``, whose ``/healthz`` then says only whether the node is ready (None: all on ``port``).
        self.internal_port = internal_port
        self.address = node_address(host, port)
        self.celery = celery_app
        self.hub = Hub()
        self.pings: PingSchedule[PushHandler] = PingSchedule(settings.PING_INTERVAL, settings.PING_TIMEOUT)
        self.expiries: ExpirySchedule[PushHandler] = ExpirySchedule(settings.TOKEN_EXPIRY_GRACE)
        self._refreshing: set[PushHandler] = set()  # connections whose refresh is being checked
        #: Handshakes whose token is being checked (before the upgrade): the drain answers them 503.
        self.checking: set[PushHandler] = set()
        self.max_connections = settings.MAX_CONNECTIONS
        #: The most ids one ``ack`` frame may carry here: what ``hello`` says (``ack_ids``), and
        #: what the handlers hold frames to (more closes with 4500).
        self.ack_ids = ACK_IDS
        self.max_user_connections = settings.MAX_USER_CONNECTIONS
        #: ``(COUNT, SECONDS)``: at most COUNT connects of one user in any SECONDS seconds, across
        #: the cluster (:mod:`wsnode.connectrate`); None: no limit.
        self.connect_rate = settings.MAX_USER_CONNECTS
        self.auth = AuthClient(settings.AUTH_URL, settings.AUTH_CACHE_SECONDS)
        self.redis = aioredis.Redis(connection_pool=aioredis.BlockingConnectionPool.from_url(
            settings.REDIS_URL, max_connections=REDIS_MAX_CONNECTIONS, timeout=5, socket_timeout=5, socket_connect_timeout=5,
            client_name=f"wsnode:{self.address}"))  # named in Redis' CLIENT LIST
        self.leases = Leases(self.redis, self.address, settings.LEASE_TTL)
        self.claim = AddressClaim(self.redis, self.address, settings.LEASE_TTL)
        #: Leases of users whose first connection here opened: one pipeline for all who opened meanwhile.
        self._new_leases: Coalescer[str, None] = Coalescer(self._register_new_leases)
        #: With ``MAX_USER_CONNECTS``, every new connection instead (its user's, one item each): its
        #: connect counted and, when its user needs one, its lease written, in one pipeline for all
        #: that opened meanwhile; each learns whether it was admitted (:meth:`_admit_connects`).
        self._connects: Coalescer[str, int | None] = Coalescer(self._admit_connects)
        #: The lease write of each user whose first connection here waits for it: a second
        #: connection of the user that opens meanwhile waits for the same write before its replay.
        self._leasing: dict[str, asyncio.Future] = {}
        #: Lease writes (new, renewed, written again) and the drain's release take turns, and none
        #: writes once the node drains: a write still in flight when the drain released the leases
        #: would have put the node's own lease back, and Dispatch would route to a queue that no
        #: one reads any more.
        self._lease_writes = asyncio.Lock()
        #: When the first of the leases of this node's bound connections ends unless written again
        #: (infinity: none bound since the last lapse).  Past it Dispatch routes nothing to them,
        #: and a device of their user on another node may ack what they miss, so redelivery would
        #: not send it again: :meth:`_check_leases` closes them, to resume from the store.  On the
        #: monotonic clock (``LEASE_TTL`` after the start of the last write that succeeded): a step of
        #: the wall clock is not a write that failed.  Redis counts the leases from its own clock when
        #: the write runs, after it started here, so they end no earlier than this says.
        self._leases_until = float("inf")
        #: The outage of the lease renewals, logged once per cause (:meth:`_renew`), counted in renewals.
        self._lease_outage = Outage()
        self.receipts = ReceiptBuffer(self._send_receipts, settings.RECEIPT_BATCH)
        self.draining = False
        self.redis_ok = False
        #: Whether the last write Redis refused was refused for lack of memory (``maxmemory``).
        self.redis_full = False
        #: What to fix when Redis refused the last PING or lease write because of REDIS_URL's login,
        #: its user's rights or its certificate (:func:`redislogin.refused`), else None.
        self.redis_refused: str | None = None
        #: What the last PING's refusal said (None: answered, or did not), so each is logged once.
        self._ping_refused: str | None = None
        #: The last PING was answered: its next failure is logged, even when a failed lease write
        #: set ``redis_ok`` False first (the PING line was then never written: health.py).
        self._ping_answered = False
        self.metrics = NodeMetrics(self.address)
        self.metrics.track(lambda: self.hub.connection_count, lambda: self.hub.user_count, self.health)
        self._publisher = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="publish")
        self._replays: ReplayRequests[tuple[PushHandler, dict]] = ReplayRequests(REPLAY_REQUESTS_PER_TASK)
        self._origins = settings.ALLOWED_ORIGINS
        self._consumer: NodeQueueConsumer | None = None
        self._server: HTTPServer | None = None
        self._internal_server: HTTPServer | None = None
        self._timers: list[PeriodicCallback] = []
        self._loop: IOLoop | None = None
        #: Leases of users whose last connection here closed: one release for all who left meanwhile.
        self._left: Coalescer[str, None] = Coalescer(self._release_leases)
        self._recent_revocations = RecentRevocations()
        #: Catch-ups begun (:meth:`_check_revocations`, after each subscription to revocations).  A
        #: token check records it as it begins (``PushHandler.revocation_checks_seen``): one that
        #: began before a catch-up may carry an answer auth gave before a revocation announced while
        #: the node was not subscribed, which the catch-up did not judge (the connection was not in
        #: the hub yet, or still had its previous token), so :meth:`attach` and :meth:`_refresh` read
        #: the revocation list for that one token.  Loop thread only.
        self.revocation_checks = 0
        self._revocations = RevocationListener(settings.REDIS_URL, f"wsnode:{self.address}:revocations", self._on_revocation, self._check_revocations)

    # --- lifecycle -------------------------------------------------------------------------

    def make_app(self) -> tornado.web.Application:
        """The public port's routes: with an internal port, ``/metrics`` is not one of them and
        ``/healthz`` says only whether the node is ready (:func:`wsnode.health.public_health`)."""
        internal = self.internal_port is not None
        return tornado.web.Application(
            [
                (r"/ws", PushHandler, {"node": self}),
                (r"/healthz", HealthHandler, {"node": self, "full": not internal}),
                *([] if internal else [(r"/metrics", MetricsHandler, {"metrics": self.metrics})]),
                (r"/static/(.*)", tornado.web.StaticFileHandler, {"path": STATIC_DIR}),
            ],
            # No websocket_ping_interval: Tornado's pings cost a Task per connection; the node's
            # own timer pings them instead (wsnode.pinger).
            websocket_max_message_size=settings.MAX_FRAME_BYTES,
            log_function=_log_request,
        )

    def make_internal_app(self) -> tornado.web.Application:
        """The internal port's routes (``--internal-port``): for scrapers and operators, not browsers."""
        return tornado.web.Application(
            [
                (r"/healthz", HealthHandler, {"node": self}),
                (r"/metrics", MetricsHandler, {"metrics": self.metrics}),
            ],
            log_function=_log_request,
        )

    def _serve(self, app: tornado.web.Application, sockets: list) -> HTTPServer:
        server = HTTPServer(app, max_buffer_size=1 << 20, idle_connection_timeout=REQUEST_TIMEOUT_SECONDS,
                            body_timeout=REQUEST_TIMEOUT_SECONDS)
        server.add_sockets(sockets)
        return server

    async def start(self) -> None:
        self._loop = IOLoop.current()
        log.info("node %s: redis %s, broker %s, auth %s", self.address, settings.redact(settings.REDIS_URL), settings.redact(settings.BROKER_URL), settings.redact(settings.AUTH_URL))
        # The port first: the queue is named by the address, so a second node started on a port in
        # use would otherwise consume the first one's queue before failing.  Connections wait in
        # the listen backlog until the server takes the sockets, once the consumer runs.
        sockets = self._bind(self.port, "--port")
        internal_sockets = self._bind(self.internal_port, "--internal-port") if self.internal_port is not None else []
        # The address before the lease and the queue: a node of another host given the same
        # NODE_HOST:PORT would read this one's queue (wsnode.addressclaim).
        await self.claim.wait()
        # The lease before the queue: housekeeping, deleting the queue of the node this address had
        # before, reads the lease after the deletion and declares the queue again for a node that
        # holds it (tasks.reclaim._delete): a node whose lease it missed declares its queue after.
        await self._renew()
        self._consumer = NodeQueueConsumer(self.celery, self.address, self._loop, self.deliver, hostname=node_name(self.address),
                                           on_lost=self._queue_connection_lost)
        self._consumer.start()
        self._server = self._serve(self.make_app(), sockets)
        if internal_sockets:
            self._internal_server = self._serve(self.make_internal_app(), internal_sockets)
        self._timers = [
            PeriodicCallback(self._renew, settings.LEASE_TTL / 3 * 1000),
            PeriodicCallback(self._ping_redis, REDIS_PING_SECONDS * 1000),
            PeriodicCallback(self.receipts.flush, settings.RECEIPT_FLUSH_SECONDS * 1000),
            PeriodicCallback(self._ping_tick, 1000),
            PeriodicCallback(self._close_expired, 1000),
        ]
        for timer in self._timers:
            timer.start()
        self._revocations.start()
        log.info("node %s listening on %s:%d", self.address, settings.BIND_ADDRESS, self.port)
        if self._internal_server is not None:
            log.info("node %s: /metrics and /healthz for operators on %s:%d (the internal port: keep it off the public network)",
                     self.address, settings.BIND_ADDRESS, self.internal_port)

    def _bind(self, port: int, flag: str) -> list:
        try:
            return tornado.netutil.bind_sockets(port, address=settings.BIND_ADDRESS)
        except OSError as exc:
            if flag == "--port":
                hint = (f"If another process holds the port (another push node would share this one's queue, "
                        f"{self.address!r}), stop it or give this node another --port; check BIND_ADDRESS otherwise")
            else:
                hint = f"Give this node an {flag} no other process holds; check BIND_ADDRESS otherwise"
            raise NodeStartError(f"node {self.address} cannot listen on {settings.BIND_ADDRESS}:{port} ({flag}): {exc.strerror or exc}. {hint}") from exc

    def _node_back(self, loop: asyncio.AbstractEventLoop) -> bool:
        """Whether a node holds this node's address again, for the hand-back of its queue at
        :meth:`stop`, which runs on an executor thread: this asks Redis on the loop.  The drain
        ended this node's own lease (score 0), so a lease there now is a node started again on the
        address, which reads the queue itself (:func:`tasks.reclaim.hand_back`); not asked when
        the drain could not end it."""
        score = asyncio.run_coroutine_threadsafe(self.redis.zscore(NODES_KEY, self.address), loop).result(STOP_STEP_SECONDS)
        return score is not None and score > 0

    async def stop(self) -> None:
        self.draining = True
        log.info("node=%s draining: refusing new connections, ending the leases of %d users, closing %d connections with 1001",
                 self.address, self.hub.user_count, self.hub.connection_count)
        if self._server is not None:
            self._server.stop()
        for timer in self._timers:
            timer.stop()
        released = False
        try:
            async with self._lease_writes:
                await self.leases.release_node(self.hub.users())
            released = True
        except RedisError as exc:
            log.warning("node=%s could not release leases (%s); they expire in %.0f s", self.address, exc, settings.LEASE_TTL)
        conns = self.hub.all()
        for conn in conns:
            if conn.bound:
                conn.close_with(CloseCode.GOING_AWAY)
            else:  # still waiting for its lease write: refused, as one whose token was being checked
                self._refuse_unbound(conn, CloseCode.GOING_AWAY, why="the node began draining while the lease was written")
        self.receipts.flush()
        loop = asyncio.get_running_loop()
        if self._consumer is not None:
            await loop.run_in_executor(None, self._consumer.stop)
        try:  # the queue is no longer read here: a node started again on the address may read it
            await self.claim.give_up()
        except RedisError as exc:
            log.warning("node=%s could not give up its address's claim (%s); it ends within %.0f s", self.address, exc, settings.LEASE_TTL)
        try:
            node_back = functools.partial(self._node_back, loop) if released else None
            handed = await asyncio.wait_for(loop.run_in_executor(None, functools.partial(
                hand_back, self.celery, self.address, node_back=node_back)), STOP_STEP_SECONDS)
            log.info("node=%s handed %d queued envelopes back to dispatch", self.address, handed)
        except Exception as exc:  # noqa: BLE001 - housekeeping hands them back once the lease is gone
            log.warning("node=%s could not hand back its queue (%r); housekeeping will", self.address, exc)
        # Acks that came meanwhile, from clients that had not yet seen their 1001 (the frame loop
        # reads until their close reply): the flush timer is stopped.
        self.receipts.flush()
        try:
            await asyncio.wait_for(loop.run_in_executor(None, self._publisher.shutdown), STOP_STEP_SECONDS)
        except asyncio.TimeoutError:
            # Drop what waits behind the send in flight: the executor's shutdown, and Python's exit,
            # join its thread, which would otherwise send the whole backlog (each send can take
            # 20 s against a broker that does not answer).  Unsent acks mean redeliveries, which
            # clients drop by id; unsent replay requests were for connections closed now.
            self._publisher.shutdown(wait=False, cancel_futures=True)
            log.warning("node=%s receipts or replay requests still unsent after %d s (broker down?); giving up on them", self.address, STOP_STEP_SECONDS)
        # A handshake whose token check finished meanwhile was refused with 1001 (attach); one
        # still waiting for auth would be cancelled with the loop, and answered 500.
        for handler in list(self.checking):
            handler.drained_during_check()
        await self._revocations.stop()
        await self.redis.aclose()
        # The internal port last: its /healthz said "draining" (503) and /metrics was scraped
        # throughout the drain.
        if self._internal_server is not None:
            self._internal_server.stop()
            await self._internal_server.close_all_connections()
        log.info("node=%s drained and stopped: closed %d connections", self.address, len(conns))

    # --- connections (loop thread) ------------------------------------------------------------

    def origin_allowed(self, origin: str) -> bool:
        return protocol.origin_allowed(origin, self._origins)

    @property
    def full(self) -> bool:
        """Whether the node holds ``MAX_CONNECTIONS`` connections: new handshakes get 503 before
        the upgrade, and one whose check was in flight when the node filled is closed with 1013
        as it binds (:meth:`attach`)."""
        return 0 < self.max_connections <= self.hub.connection_count

    def new_session(self, since: str | None) -> Session:
        """What a new connection is owed; the live messages it holds during its opening replay are
        bounded by ``CLIENT_QUEUE_MAX_BYTES``, as what a live connection leaves unread is."""
        return Session(since, max_backlog_bytes=settings.CLIENT_QUEUE_MAX_BYTES)

    async def attach(self, conn: PushHandler) -> None:
        if self.draining:
            conn.refuse(CloseCode.GOING_AWAY, why="the node began draining while the connection opened")
            return
        if self._recent_revocations.covering(conn.identity, time.monotonic()):
            conn.refuse(CloseCode.UNAUTHORIZED, "token revoked", why="token revoked while the connection opened")
            return
        if self.full:
            conn.refuse(CloseCode.TRY_AGAIN_LATER, "node full, connect to another node", why="the node filled while the connection opened (MAX_CONNECTIONS)")
            return
        if 0 < self.max_user_connections <= sum(1 for other in self.hub.of_user(conn.user_id) if not other.closing):
            conn.refuse(CloseCode.TOO_MANY_CONNECTIONS, why=f"the user holds {self.max_user_connections} connections here already (MAX_USER_CONNECTIONS)")
            return
        first = self.hub.add(conn)
        if self.connect_rate is not None:
            # Every connect is counted, with its lease written in the same script call when its
            # user needs one (the decision is made as the pipeline is sent: _admit_connects).
            waiting = self._connects.submit(conn.user_id)
        else:
            writing = self._leasing.get(conn.user_id)
            # A write when none of the user's other connections here has a lease: the first one, or
            # one that comes after a write failed, before the connections that waited for it are gone,
            # or while the others are closing (closed because their lease lapsed: _check_leases).
            if first or (writing is None and not self._open_bound(conn.user_id)):
                self._leasing[conn.user_id] = writing = asyncio.ensure_future(self._new_leases.submit(conn.user_id))
                writing.add_done_callback(functools.partial(self._leased, conn.user_id))
            waiting = None if writing is None else asyncio.shield(writing)
        if waiting is not None:
            # Also for a second connection of the user while the first one's lease is written: the
            # lease comes before the replay request, so that every message is either replayed or
            # routed live.
            try:
                retry_ms = await waiting
            except RedisError as exc:
                self._redis_failed(exc)  # the next PING says when it is back
                if self.hub.get(conn.conn_id) is not conn:
                    return  # refused while the lease was written (by the drain, a revocation...): told and counted once
                self.hub.remove(conn)
                # INFO when Redis did not answer or is full: that outage is a WARNING once per
                # change (health: PING, lease renewal).  Any other refusal (NOPERM on a key only a
                # connect writes, a WRONGTYPE, a script error) neither PING nor a renewal meets:
                # a WARNING each, or every connect failed at INFO with the node ready.
                quiet = isinstance(exc, (RedisConnectionError, RedisTimeoutError)) or redisfull.is_full(exc)
                conn.refuse(CloseCode.TRY_AGAIN_LATER, why=f"lease not written ({redislogin.explain(exc)})",
                            level=logging.INFO if quiet else None)
                return
            if self.hub.get(conn.conn_id) is not conn or conn.closing:
                return  # closed while the lease was written (by the drain, a revocation...): never bound, on_close unbinds it
            if retry_ms is not None:
                most, window = self.connect_rate
                self._refuse_unbound(conn, CloseCode.TOO_MANY_CONNECTIONS, connectrate.reason(retry_ms),
                                     why=f"{connectrate.reason(retry_ms)}: {most} connects in {window} s already (MAX_USER_CONNECTS={most}/{window})")
                return
            if self.draining:
                self._refuse_unbound(conn, CloseCode.GOING_AWAY, why="the node began draining while the lease was written")
                return
        # Rare (a catch-up began while auth checked the token): every other attach reads nothing more.
        if conn.revocation_checks_seen != self.revocation_checks and not await self._not_revoked_while_checked(conn):
            return
        conn.bound = True
        self.metrics.connected()
        self.pings.add(conn)
        self.expiries.set(conn, conn.identity.expires_at)
        log.info("conn=%s user=%s node=%s connected in %.1f ms%s", conn.conn_id, conn.user_id, self.address, 1000 * conn.request.request_time(),
                 f", since={conn.session.since}" if conn.session.since else "")
        conn.send([(None, protocol.hello_frame(self.address, conn.user_id, conn.conn_id, conn.identity.expires_at, time.time(), self.ack_ids))])
        self._request_replay(conn)

    def _ping_tick(self) -> None:
        """Every second: ping one slot's connections, close those that left a ping unanswered
        for ``settings.PING_TIMEOUT`` seconds (:mod:`wsnode.pinger`)."""
        self._check_leases()
        to_ping, timed_out = self.pings.tick()
        for conn in timed_out:
            self.pings.remove(conn)
            if conn.closing:
                continue  # closed already (4008, 4401...): no close of its own, and on_close follows
            log.info("conn=%s user=%s node=%s closed: no pong within %d s", conn.conn_id, conn.user_id, self.address, settings.PING_TIMEOUT)
            conn.close_with(CloseCode.PING_TIMED_OUT)
        for conn in to_ping:
            try:
                conn.ping(self.pings.payload)
            except WebSocketClosedError:
                self.pings.remove(conn)  # on_close follows

    def detach(self, conn: PushHandler) -> None:
        self.pings.remove(conn)
        self.expiries.remove(conn)
        self._refreshing.discard(conn)
        if conn.bound:
            self.metrics.disconnected()
        if self.hub.remove(conn):
            log.info("conn=%s user=%s node=%s disconnected (%s); last on this node", conn.conn_id, conn.user_id, self.address, conn.close_code)
            if not self.draining:
                IOLoop.current().spawn_callback(self._left.submit, conn.user_id)
        else:
            log.info("conn=%s user=%s node=%s disconnected (%s)", conn.conn_id, conn.user_id, self.address, conn.close_code)

    def answer(self, conn: PushHandler, frame: str) -> None:
        """Write the answer to a client's ``refresh`` or ``ping``, unless more than
        ``CLIENT_QUEUE_MAX_BYTES`` written to the connection are still unread: a client that sends
        them and reads none of the answers would have the node hold them all, so it is closed with
        4008, as for messages.  Nothing is written to a connection that is not bound (refused, or
        closed or closing, e.g. while auth was asked about its refresh)."""
        if self.hub.get(conn.conn_id) is not conn or conn.closing:
            return
        if conn.unsent_bytes > settings.CLIENT_QUEUE_MAX_BYTES:
            self._close_slow(conn, 1)
            return
        conn.send([(None, frame)])

    def _refuse_unbound(self, conn: PushHandler, code: CloseCode, reason: str | None = None, why: str | None = None) -> None:
        """Refuse a connection that is in the hub but not bound yet (it waits for its lease write):
        counted as rejected, as it never worked.  A refused connection's ``on_close`` does not
        unbind it, so it leaves the hub here, and its user's lease is released if it was the last."""
        if self.hub.remove(conn) and not self.draining:
            IOLoop.current().spawn_callback(self._left.submit, conn.user_id)
        conn.refuse(code, reason, why=why)

    # --- receipts ----------------------------------------------------------------------------

    def _send_receipts(self, batch: list[dict]) -> None:
        future = self._publisher.submit(self._publish_receipts, batch)
        future.add_done_callback(lambda f: not f.cancelled() and f.exception() and log.warning(
            "node=%s %d receipts not sent: %s; their messages stay unacked and are sent again after REDELIVER_AFTER "
            "(clients drop the repeats): check the broker at BROKER_URL", self.address, len(batch), f.exception()))

    def _publish_receipts(self, batch: list[dict]) -> None:
        """Publisher thread."""
        with publishing.producer(self.celery) as producer:
            self.celery.send_task("tasks.receipts", args=[batch], ignore_result=True, argsrepr=receipts_argsrepr(batch),
                                  serializer=wirejson.SERIALIZER, producer=producer)

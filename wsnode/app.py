"""Wiring of one push node: hub, leases, auth client, queue consumer and HTTP server.

:class:`PushNode` has explicit ``start()`` and ``stop()``, both coroutines run on the node's
IOLoop.  All its state is touched on the loop thread only, except:

- the queue consumer, which runs on its own thread and enters the loop through ``add_callback``;
- the publisher, a single thread that sends tasks to the worker (replay requests, receipts),
  because publishing to the broker blocks.

Shutdown (SIGTERM) is explicit: stop accepting connections; end this node's leases (Dispatch stops
routing here); close clients with 1001 ("reconnect elsewhere"); flush receipts; stop the consumer;
hand what is still queued for this node back to Dispatch; stop the publisher.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import logging
import time

import redis.asyncio as aioredis
import tornado.web
from redis.exceptions import RedisError
from tornado.httpserver import HTTPServer
from tornado.ioloop import IOLoop, PeriodicCallback

import settings
from tasks.queues import node_address
from tasks.reclaim import hand_back
from wsnode import protocol
from wsnode.auth import AuthClient
from wsnode.closecodes import CloseCode
from wsnode.consumer import Delivery, NodeQueueConsumer
from wsnode.handler import PushHandler
from wsnode.hub import Hub
from wsnode.receipts import ReceiptBuffer
from wsnode.registry import Leases
from wsnode.session import BacklogOverflow

log = logging.getLogger(__name__)

#: A step of the shutdown that needs the broker gives up after this long (the broker may be down).
STOP_STEP_SECONDS = 10


def _log_request(handler: tornado.web.RequestHandler) -> None:
    """Tornado's access log without the query string: it carries the token."""
    request = handler.request
    status = handler.get_status()
    level = logging.INFO if status < 400 else logging.WARNING
    logging.getLogger("tornado.access").log(level, "%d %s %s (%s) %.2fms", status, request.method, request.path, request.remote_ip, 1000 * request.request_time())


class HealthHandler(tornado.web.RequestHandler):
    def initialize(self, node: PushNode) -> None:
        self.node = node

    def get(self) -> None:
        status = self.node.health()
        self.set_status(200 if status["ready"] else 503)
        self.finish(status)


class PushNode:
    def __init__(self, port: int, host: str = settings.NODE_HOST, celery_app=None) -> None:
        if celery_app is None:
            from worker import app as celery_app
        self.port = port
        self.address = node_address(host, port)
        self.celery = celery_app
        self.hub = Hub()
        self.auth = AuthClient(settings.AUTH_URL, settings.AUTH_CACHE_SECONDS)
        self.redis = aioredis.Redis.from_url(settings.REDIS_URL, socket_timeout=5, socket_connect_timeout=5)
        self.leases = Leases(self.redis, self.address, settings.LEASE_TTL)
        self.receipts = ReceiptBuffer(self._send_receipts, settings.RECEIPT_BATCH)
        self.draining = False
        self.redis_ok = False
        self._publisher = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="publish")
        self._origins = settings.ALLOWED_ORIGINS
        self._consumer: NodeQueueConsumer | None = None
        self._server: HTTPServer | None = None
        self._timers: list[PeriodicCallback] = []
        self._loop: IOLoop | None = None

    # --- lifecycle -------------------------------------------------------------------------

    def make_app(self) -> tornado.web.Application:
        return tornado.web.Application(
            [(r"/ws", PushHandler, {"node": self}), (r"/healthz", HealthHandler, {"node": self})],
            websocket_ping_interval=25,
            websocket_ping_timeout=60,
            websocket_max_message_size=settings.MAX_FRAME_BYTES,
            log_function=_log_request,
        )

    async def start(self) -> None:
        self._loop = IOLoop.current()
        log.info("node %s: redis %s, broker %s, auth %s", self.address, settings.redact(settings.REDIS_URL), settings.redact(settings.BROKER_URL), settings.AUTH_URL)
        await self._renew()
        self._consumer = NodeQueueConsumer(self.celery, self.address, self._loop, self.deliver)
        self._consumer.start()
        self._server = HTTPServer(self.make_app(), max_buffer_size=1 << 20)
        self._server.listen(self.port, address=settings.BIND_ADDRESS)
        self._timers = [
            PeriodicCallback(self._renew, settings.LEASE_TTL / 3 * 1000),
            PeriodicCallback(self.receipts.flush, settings.RECEIPT_FLUSH_SECONDS * 1000),
        ]
        for timer in self._timers:
            timer.start()
        log.info("node %s listening on %s:%d", self.address, settings.BIND_ADDRESS, self.port)

    async def stop(self) -> None:
        self.draining = True
        if self._server is not None:
            self._server.stop()
        for timer in self._timers:
            timer.stop()
        try:
            await self.leases.release_node(self.hub.users())
        except RedisError as exc:
            log.warning("node %s: could not release leases (%s); they expire in %.0f s", self.address, exc, settings.LEASE_TTL)
        conns = self.hub.all()
        for conn in conns:
            conn.close_with(CloseCode.GOING_AWAY)
        self.receipts.flush()
        loop = asyncio.get_running_loop()
        if self._consumer is not None:
            await loop.run_in_executor(None, self._consumer.stop)
        try:
            handed = await asyncio.wait_for(loop.run_in_executor(None, hand_back, self.celery, self.address), STOP_STEP_SECONDS)
            log.info("node %s: handed %d queued envelopes back to dispatch", self.address, handed)
        except Exception as exc:  # noqa: BLE001 - housekeeping hands them back once the lease is gone
            log.warning("node %s: could not hand back its queue (%r); housekeeping will", self.address, exc)
        try:
            await asyncio.wait_for(loop.run_in_executor(None, self._publisher.shutdown), STOP_STEP_SECONDS)
        except asyncio.TimeoutError:
            log.warning("node %s: receipts or replay requests still unsent after %d s (broker down?); giving up on them", self.address, STOP_STEP_SECONDS)
        await self.redis.aclose()
        log.info("node %s stopped: closed %d connections", self.address, len(conns))

    # --- connections (loop thread) ------------------------------------------------------------

    def origin_allowed(self, origin: str) -> bool:
        return "*" in self._origins or origin.rstrip("/") in self._origins

    async def attach(self, conn: PushHandler) -> None:
        first = self.hub.add(conn)
        if first:
            try:
                await self.leases.register([conn.user_id])
            except RedisError as exc:
                log.warning("conn=%s user=%s refused: lease not written (%s)", conn.conn_id, conn.user_id, exc)
                self.hub.remove(conn)
                conn.close_with(CloseCode.TRY_AGAIN_LATER)
                return
        log.info("conn=%s user=%s connected to %s%s", conn.conn_id, conn.user_id, self.address, f" since={conn.session.since}" if conn.session.since else "")
        conn.send([(None, protocol.hello_frame(self.address, conn.user_id, conn.conn_id))])
        self._request_replay(conn)

    def detach(self, conn: PushHandler) -> None:
        if self.hub.remove(conn):
            log.info("conn=%s user=%s disconnected (%s); last on this node", conn.conn_id, conn.user_id, conn.close_code)
            if not self.draining:
                IOLoop.current().spawn_callback(self._release, conn.user_id)
        else:
            log.info("conn=%s user=%s disconnected (%s)", conn.conn_id, conn.user_id, conn.close_code)

    async def _release(self, user: str) -> None:
        try:
            await self.leases.release([user])
            if self.hub.of_user(user):  # reconnected while the release was in flight
                await self.leases.register([user])
        except RedisError as exc:
            log.warning("user=%s: lease not released (%s); it expires in %.0f s", user, exc, settings.LEASE_TTL)

    def _request_replay(self, conn: PushHandler) -> None:
        kwargs = {"node": self.address, "conn": conn.conn_id, "user": conn.user_id, "since": conn.session.since}
        future = self._publisher.submit(self.celery.send_task, "tasks.replay", kwargs=kwargs, ignore_result=True)
        loop = self._loop

        def sent(f: concurrent.futures.Future) -> None:
            if f.exception() is not None:
                loop.add_callback(self._replay_failed, conn, f"replay request not sent: {f.exception()}")

        future.add_done_callback(sent)
        loop.call_later(settings.REPLAY_TIMEOUT, self._replay_failed, conn, "replay timed out")

    def _replay_failed(self, conn: PushHandler, why: str) -> None:
        if conn.session.replaying and self.hub.get(conn.conn_id) is conn:
            log.warning("conn=%s user=%s: %s; closing so the client resumes again", conn.conn_id, conn.user_id, why)
            conn.close_with(CloseCode.TRY_AGAIN_LATER, "resume failed, reconnect with since")

    # --- delivery (loop thread) -------------------------------------------------------------

    def deliver(self, batch: list[Delivery]) -> None:
        """Write a batch from the queue to the sockets; called on the loop by the consumer."""
        for delivery in batch:
            if delivery.conn is not None:
                self._deliver_replay(delivery)
                continue
            for envelope in delivery.envelopes:
                frame = protocol.message_frame(envelope)
                to = envelope["to"]
                targets = self.hub.all() if to == "*" else itertools.chain.from_iterable(self.hub.of_user(user) for user in to)
                for conn in targets:
                    self._write_live(conn, envelope["id"], frame)

    def _write_live(self, conn: PushHandler, message_id: str, frame: str) -> None:
        try:
            frames = conn.session.live(message_id, frame)
        except BacklogOverflow as exc:
            log.warning("conn=%s user=%s: %s", conn.conn_id, conn.user_id, exc)
            conn.close_with(CloseCode.TRY_AGAIN_LATER, "too many messages during resume, reconnect with since")
            return
        conn.send(frames)

    def _deliver_replay(self, delivery: Delivery) -> None:
        conn = self.hub.get(delivery.conn)
        if conn is None:
            return  # closed meanwhile: its next resume asks again
        info = delivery.replay or {}
        items = [(e["id"], protocol.message_frame(e)) for e in delivery.envelopes]
        frames = conn.session.replay_page(items, bool(info.get("last")), int(info.get("count", 0)), bool(info.get("truncated")))
        conn.send(frames)
        if info.get("last"):
            IOLoop.current().call_later(settings.REPLAY_DEDUP_SECONDS, conn.session.forget_replayed)

    # --- leases, receipts, health -----------------------------------------------------------

    async def _renew(self) -> None:
        try:
            await self.leases.renew(self.hub.users())
            if not self.redis_ok:
                log.info("node %s: leases written for %d users", self.address, self.hub.user_count)
            self.redis_ok = True
        except RedisError as exc:
            if self.redis_ok:
                log.warning("node %s: lease renewal failed (%s); retrying every %.0f s", self.address, exc, settings.LEASE_TTL / 3)
            self.redis_ok = False

    def _send_receipts(self, batch: list[dict]) -> None:
        future = self._publisher.submit(self.celery.send_task, "tasks.receipts", args=[batch], ignore_result=True)
        future.add_done_callback(lambda f: f.exception() and log.warning("%d receipts not sent: %s", len(batch), f.exception()))

    def health(self) -> dict:
        consumer_ok = self._consumer is not None and self._consumer.connected
        return {
            "ready": self.redis_ok and consumer_ok and not self.draining,
            "node": self.address,
            "redis": self.redis_ok,
            "queue": consumer_ok,
            "draining": self.draining,
            "connections": self.hub.connection_count,
            "users": self.hub.user_count,
            "time": time.time(),
        }

"""What a push node writes to its connections, and how it asks for their replays: each batch its
queue brings (live messages, one write per connection per batch; a replay page for one connection),
the connections closed for a client that reads too slowly or for messages lost with the queue's
broker connection, and the replay requests of new connections, gathered into ``tasks.replay_many``
tasks that the publisher thread sends.

:class:`Deliveries` is a part of :class:`wsnode.app.PushNode` (a mixin, as
:class:`wsnode.tokenwatch.TokenWatch`), written apart because it is one concept: it uses the node's
``hub``, ``metrics``, ``address``, ``celery``, ``draining``, ``_loop``, ``_publisher``,
``_replays``, ``_refuse_unbound`` and, from :class:`wsnode.leasekeeper.LeaseKeeper`,
``_check_leases``, ``_open_bound`` and ``_close_to_resume``.  Loop thread only, but for
:meth:`Deliveries._send_replay_requests` (the publisher thread).
"""

from __future__ import annotations

import itertools
import logging
import weakref
from typing import TYPE_CHECKING

import settings
from tasks import publishing, wirejson
from tasks.ids import is_message_id
from wsnode import protocol
from wsnode.closecodes import CloseCode
from wsnode.consumer import Delivery
from wsnode.session import BacklogOverflow

if TYPE_CHECKING:
    from wsnode.handler import PushHandler

log = logging.getLogger("wsnode.app")  # the node's own log, as before this part was written apart

#: Most connections one ``tasks.replay_many`` answers, so that a reconnect storm is spread over the
#: worker processes rather than read by one.
REPLAY_REQUESTS_PER_TASK = 100

#: How long the first replay request of a round waits for others before the round is sent.  A task
#: costs the node about a millisecond to publish and a worker more to run, whatever it carries;
#: connections that open a few milliseconds apart (hundreds a second, after a node or a proxy
#: restarted) would otherwise get a task each.  It delays a new connection's opening replay, and
#: the live messages held back during it, by this much; nothing after that.
REPLAY_GATHER_SECONDS = 0.02

#: The close reason of the connections bound when the node gave up on its queue connection to the
#: broker while it consumed (:meth:`Deliveries._queue_connection_lost`).
QUEUE_LOST_REASON = "messages lost with the broker connection, reconnect with since"


class Deliveries:
    """What a push node writes to its connections, and its replay requests (see the module)."""

    def _request_replay(self, conn: PushHandler) -> None:
        """Queue ``conn``'s replay request; the publisher thread sends what is queued as
        ``tasks.replay_many`` (:mod:`wsnode.replays`)."""
        if self._replays.add((conn, {"conn": conn.conn_id, "user": conn.user_id, "since": conn.session.since})):
            self._loop.call_later(REPLAY_GATHER_SECONDS, self._start_replay_round)
        # A weak reference: the timer outlives most replays by seconds, and held every connection
        # that closed meanwhile (its stream, buffers and request) for REPLAY_TIMEOUT after it left.
        self._loop.call_later(settings.REPLAY_TIMEOUT, self._replay_timed_out, weakref.ref(conn))

    def _start_replay_round(self) -> None:
        try:
            self._publisher.submit(self._send_replay_requests)
        except RuntimeError:  # the publisher was shut down: the node stopped, its connections are closed
            pass

    def _send_replay_requests(self) -> None:
        """Publisher thread."""
        for batch in self._replays.batches():
            try:
                with publishing.producer(self.celery) as producer:
                    self.celery.send_task("tasks.replay_many", kwargs={"node": self.address, "requests": [request for _, request in batch]},
                                          ignore_result=True, serializer=wirejson.SERIALIZER, producer=producer)
            except Exception as exc:  # noqa: BLE001 - each connection is told, and closed to retry
                for conn, _ in batch:
                    self._loop.add_callback(self._replay_failed, conn, f"replay request not sent: {exc}")

    def _replay_timed_out(self, ref: weakref.ref) -> None:
        """``REPLAY_TIMEOUT`` after a replay request: the connection, if still open, is closed
        unless its replay ended (a connection gone meanwhile was freed: nothing to do)."""
        if (conn := ref()) is not None:
            self._replay_failed(conn, "replay timed out")

    @staticmethod
    def _forget_replayed(ref: weakref.ref) -> None:
        """``REPLAY_DEDUP_SECONDS`` after a replay ended: its connection, if still open, stops
        dropping live copies of the messages it replayed."""
        if (conn := ref()) is not None:
            conn.session.forget_replayed()

    def _replay_failed(self, conn: PushHandler, why: str) -> None:
        if conn.session.replaying and self.hub.get(conn.conn_id) is conn and not conn.closing:
            self.metrics.replay("failed")
            log.warning("conn=%s user=%s node=%s replay failed: %s; closing so the client resumes again", conn.conn_id, conn.user_id, self.address, why)
            conn.close_with(CloseCode.TRY_AGAIN_LATER, "resume failed, reconnect with since")

    def deliver(self, batch: list[Delivery]) -> None:
        """Write a batch from the queue to the sockets; called on the loop by the consumer, once
        per batch.  The frames each connection gets from the batch's live messages go in one
        write (:meth:`PushHandler.send`), in order; a replay page for a connection goes after
        what came before it in the batch.  Counts the batch, the frames written, and per live
        message written here the time since it was collected."""
        self.metrics.batch(len(batch))
        self._check_leases()
        outbox: dict[PushHandler, list[tuple[str | None, str]]] = {}
        for delivery in batch:
            if delivery.conn is not None:
                self._write_outbox(outbox)
                self._deliver_replay(delivery)
                continue
            for envelope in delivery.envelopes:
                frame = protocol.message_frame(envelope)
                to = envelope["to"]
                targets = self.hub.all() if to == "*" else itertools.chain.from_iterable(self.hub.of_user(user) for user in to)
                for conn in targets:
                    self._queue_live(outbox, conn, envelope["id"], frame)
        self._write_outbox(outbox)

    def _queue_live(self, outbox: dict, conn: PushHandler, message_id: str, frame: str) -> None:
        if conn.closing:
            return  # closed earlier in this batch (or going): on_close unbinds it
        try:
            frames = conn.session.live(message_id, frame)
        except BacklogOverflow as exc:
            reason = "too many messages during resume, reconnect with since"
            if not conn.bound:  # still waiting for its lease write: it never worked, it is refused
                self._refuse_unbound(conn, CloseCode.TRY_AGAIN_LATER, reason, why=f"{exc} while the lease was written")
                return
            log.warning("conn=%s user=%s node=%s: %s", conn.conn_id, conn.user_id, self.address, exc)
            conn.close_with(CloseCode.TRY_AGAIN_LATER, reason)
            return
        if frames:
            outbox.setdefault(conn, []).extend(frames)

    def _write_outbox(self, outbox: dict) -> None:
        """Write what ``outbox`` holds, one write per connection, and empty it.  A connection that
        has not taken more than ``CLIENT_QUEUE_MAX_BYTES`` of earlier writes gets nothing more:
        it is closed with 4008 and resumes from the store with ``since``."""
        written: set[str] = set()
        frames_written = 0
        for conn, frames in outbox.items():
            if conn.unsent_bytes > settings.CLIENT_QUEUE_MAX_BYTES:
                self._close_slow(conn, len(frames))
                continue
            sent = conn.send(frames)
            frames_written += len(sent)
            written.update(sent)
        outbox.clear()
        self.metrics.latencies(written)
        self.metrics.delivered("live", frames_written)

    def _close_slow(self, conn: PushHandler, frames: int) -> None:
        log.warning("conn=%s user=%s node=%s closed with %d: %d bytes written to it are not read yet (CLIENT_QUEUE_MAX_BYTES=%d); "
                    "%d frames not written, the client gets them with since", conn.conn_id, conn.user_id, self.address,
                    CloseCode.SLOW_CLIENT, conn.unsent_bytes, settings.CLIENT_QUEUE_MAX_BYTES, frames)
        conn.close_with(CloseCode.SLOW_CLIENT)

    def _deliver_replay(self, delivery: Delivery) -> None:
        conn = self.hub.get(delivery.conn)
        if conn is None or conn.closing:
            return  # closed meanwhile: its next resume asks again
        info = delivery.replay or {}
        items = [(e["id"], protocol.message_frame(e)) for e in delivery.envelopes]
        was_replaying = conn.session.replaying
        cursor = info.get("cursor")
        frames = conn.session.replay_page(items, bool(info.get("last")), int(info.get("count", 0)), bool(info.get("truncated")),
                                          cursor if is_message_id(cursor) else None)
        self.metrics.delivered("replay", len(conn.send(frames)))
        if info.get("last") and was_replaying:
            truncated = bool(info.get("truncated"))
            self.metrics.replay("truncated" if truncated else "served")
            log.info("conn=%s user=%s node=%s replay served: %d messages from %s%s", conn.conn_id, conn.user_id, self.address,
                     int(info.get("count", 0)), f"since={conn.session.since}" if conn.session.since else "the inbox",
                     ", truncated" if truncated else "")
        if info.get("last"):
            # A weak reference, as the replay timeout's: the timer held each connection's session
            # (the ids it replayed) for REPLAY_DEDUP_SECONDS after the connection left.
            self._loop.call_later(settings.REPLAY_DEDUP_SECONDS, self._forget_replayed, weakref.ref(conn))

    def _queue_connection_lost(self, why: str) -> None:
        """The queue consumer gave up on its broker connection, which stopped answering (or was
        reset) while it consumed (:mod:`wsnode.consumer`): what the broker had sent on it and the node had not read
        (a batch on its way: a network cut, a stalled broker) is gone from the broker.
        Redelivery would send such a message again only until another device of its user acks it,
        and a connection here that then got a newer message would resume after it: close the bound
        connections with 1013 now, before anything the next connection reads is written (the
        consumer calls this after what it read before the loss and before what it reads after), so
        that they resume with ``since`` and are replayed what they missed.  Connections still
        waiting for their lease write are left: their replay is read after it."""
        if self.draining:
            return
        conns = self._open_bound()
        log.warning("node=%s gave up on its queue connection to the broker, which stopped answering while the node consumed (%s): "
                    "what the broker had sent on it is lost; closing %d connections with %d so that they resume with since",
                    self.address, why, len(conns), CloseCode.TRY_AGAIN_LATER)
        self._close_to_resume(conns, QUEUE_LOST_REASON)

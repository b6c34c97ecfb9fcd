"""The replay timeout of a connection (``REPLAY_TIMEOUT``, :meth:`wsnode.deliveries.Deliveries._request_replay`)
does not keep a connection that closed alive: under churn the node held every connection that left
(its handler, stream, buffers and request) for ``REPLAY_TIMEOUT`` seconds after it did, which set
the node's memory high-water mark (780 closed handlers held right after 1,300 connects in six
seconds).  Nor does the timer that ends a replay's dedup window (``REPLAY_DEDUP_SECONDS``) keep the
connection's session.  Pure: a loop that never runs, a stand-in connection."""

from __future__ import annotations

import asyncio
import gc
import weakref

import settings
from wsnode.consumer import Delivery
from wsnode.deliveries import Deliveries
from wsnode.replays import ReplayRequests


class _Session:
    since = None
    replaying = True


class _Conn:
    def __init__(self, conn_id: str) -> None:
        self.conn_id, self.user_id, self.session = conn_id, "u", _Session()
        self.closed_with = None
        self.closing = False

    def close_with(self, code, reason=None) -> None:
        self.closed_with = code


class _Metrics:
    def __init__(self) -> None:
        self.replays: list[str] = []

    def replay(self, outcome: str) -> None:
        self.replays.append(outcome)


class _Hub(dict):
    def get(self, conn_id):  # noqa: D102 - the hub's lookup
        return dict.get(self, conn_id)


class _Node(Deliveries):
    def __init__(self, loop) -> None:
        self._loop = loop
        self._replays = ReplayRequests(100)
        self.hub = _Hub()
        self.metrics = _Metrics()
        self.address = "127.0.0.1:1"

    def _start_replay_round(self) -> None:
        pass


def _timers(loop) -> list:
    return [handle for handle in loop._scheduled if not handle.cancelled()]


def test_a_connection_gone_before_its_replay_timeout_is_not_held_by_it():
    loop = asyncio.new_event_loop()
    try:
        node = _Node(loop)
        conn = _Conn("c1")
        node._request_replay(conn)
        list(node._replays.batches())  # the request was sent
        ref = weakref.ref(conn)
        del conn
        gc.collect()
        assert ref() is None, "the replay timeout's timer still holds the closed connection"
        for handle in _timers(loop):  # the timer fires later and does nothing
            handle._run()
    finally:
        loop.close()


def test_an_open_connection_whose_replay_never_came_is_still_closed_at_the_timeout():
    loop = asyncio.new_event_loop()
    try:
        node = _Node(loop)
        conn = _Conn("c2")
        node.hub["c2"] = conn
        node._request_replay(conn)
        list(node._replays.batches())
        (timeout,) = [h for h in _timers(loop) if h.when() - loop.time() > settings.REPLAY_TIMEOUT / 2]
        timeout._run()
        assert conn.closed_with is not None
        assert node.metrics.replays == ["failed"]
    finally:
        loop.close()


class _ReplaySession(_Session):
    def __init__(self) -> None:
        self.forgotten = False

    def replay_page(self, items, last, count, truncated, cursor):
        return [frame for _, frame in items]

    def forget_replayed(self) -> None:
        self.forgotten = True


class _ReplayConn(_Conn):
    def __init__(self, conn_id: str) -> None:
        super().__init__(conn_id)
        self.session = _ReplaySession()

    def send(self, frames):
        return frames


def _replay_page(conn_id: str) -> Delivery:
    return Delivery(envelopes=[{"id": "0000000000001-aaaa", "to": ["u"], "data": {}}], conn=conn_id,
                    replay={"last": True, "count": 1})


class _CountingMetrics(_Metrics):
    def delivered(self, kind: str, frames: int) -> None:
        pass


def _replayed(loop, conn_id: str):
    """A node on ``loop`` that served a connection ``conn_id`` its last replay page: the node, the
    connection and the timer that ends the replay's dedup window."""
    node = _Node(loop)
    node.metrics = _CountingMetrics()
    conn = _ReplayConn(conn_id)
    node.hub[conn_id] = conn
    node._deliver_replay(_replay_page(conn_id))
    (dedup,) = [h for h in _timers(loop) if h.when() - loop.time() > settings.REPLAY_DEDUP_SECONDS / 2]
    return node, conn, dedup


def test_a_connection_gone_before_its_replayed_ids_are_forgotten_is_not_held_by_that_timer():
    loop = asyncio.new_event_loop()
    try:
        node, conn, dedup = _replayed(loop, "c3")
        del node.hub["c3"]
        ref, session = weakref.ref(conn), weakref.ref(conn.session)
        del conn
        gc.collect()
        assert ref() is None and session() is None, "the replay's dedup timer still holds the closed connection's session"
        dedup._run()  # fires later and does nothing
    finally:
        loop.close()


def test_an_open_connection_forgets_its_replayed_ids_after_the_dedup_window():
    loop = asyncio.new_event_loop()
    try:
        _, conn, dedup = _replayed(loop, "c4")
        assert not conn.session.forgotten
        dedup._run()
        assert conn.session.forgotten
    finally:
        loop.close()

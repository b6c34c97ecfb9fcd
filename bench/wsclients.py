"""The part every benchmark client process shares: many WebSocket connections on one asyncio loop
(Tornado's client), driven by the orchestrator over a multiprocessing pipe.

Each client process (``e2e.clients_main`` for ours, ``common.peer_clients_main`` for the peer,
``capacity.capacity_clients_main`` for both) speaks its own protocol in an ``on_message`` callback
per connection; :class:`ClientSet` holds the rest: the sockets, one "ready" future per connection,
what was received, opening the connections a few at a time, and the command loop (``("take",)`` ->
what arrived since the last take; ``("stop",)`` -> close everything and return).

Threading: everything runs on the loop, except the pipe reader (:meth:`ClientSet.serve`), which
hands each command to the loop and waits for its answer.

The orchestrator's side: :class:`ClientProcess` starts such a process and talks to it,
:func:`stop_client_process` stops one, :func:`wait_pipe` waits on a pipe without blocking signals.
"""

from __future__ import annotations

import asyncio
import functools
import threading
import time
from collections.abc import Callable


class ClientSet:
    """``n`` connections; index ``i`` is the ``i``-th target of the process.  Loop thread only,
    built inside the running loop."""

    def __init__(self, n: int) -> None:
        self.loop = asyncio.get_running_loop()
        self.sockets: list = [None] * n
        #: Set when the connection is ready to receive live messages (the system's own frame).
        self.ready = [self.loop.create_future() for _ in range(n)]
        #: Set when the server's greeting came before ``websocket_connect`` returned (the peer's
        #: open packet): the caller answers it once the socket is known.
        self.early = [False] * n
        self.records: list = []
        self.closed: list = []
        self.other: list = []
        #: The most ids an ``ack`` frame may carry on each connection (its hello's ``ack_ids``; 0:
        #: one frame per ack, as to a node that does not say it).
        self.ack_ids = [0] * n
        self._acks: dict[int, list[str]] = {}  # connection -> ids to ack at the next loop turn

    def ack(self, index: int, message_id: str) -> None:
        """Ack ``message_id`` on connection ``index`` as push.js does: where its hello said
        ``ack_ids``, the acks of the frames handled in this turn of the loop (those one read
        brought) go together at the next turn, in ``ids`` frames; else one frame each, now."""
        if not self.ack_ids[index]:
            self.write(index, '{"type":"ack","id":"%s"}' % message_id)
            return
        if not self._acks:
            self.loop.call_soon(self._send_acks)
        self._acks.setdefault(index, []).append(message_id)

    def _send_acks(self) -> None:
        acks, self._acks = self._acks, {}
        for index, ids in acks.items():
            most = self.ack_ids[index]
            for start in range(0, len(ids), most):
                part = ids[start:start + most]
                self.write(index, '{"type":"ack","id":"%s"}' % part[0] if len(part) == 1 else '{"type":"ack","ids":["%s"]}' % '","'.join(part))

    def write(self, index: int, text: str) -> None:
        """Send ``text`` as one masked text frame on connection ``index``, if it is open, with one
        stream write, as ``write_message`` does, without the asyncio Task that ``write_message``
        wraps each write in for callers that await it (none here: the clients send fire and
        forget): the client process of ``e2e.py``, which acks every message, spent about a sixth
        less CPU per message without it (2026-12-02, 23:50).  The frames on the wire are the
        same.  Tornado 6.6's protocol method (pinned); the stream consumes a failed write's
        error itself."""
        from tornado.iostream import StreamClosedError

        ws = self.sockets[index]
        proto = getattr(ws, "protocol", None)
        if proto is None or proto.is_closing():
            return
        try:
            proto._write_frame(True, 0x1, text.encode())
        except StreamClosedError:
            pass

    def on_closed(self, index: int, *also: asyncio.Future) -> None:
        """Record that connection ``index`` closed, and fail its ``ready`` (and ``also``) if not set."""
        ws = self.sockets[index]
        code, reason = getattr(ws, "close_code", None), getattr(ws, "close_reason", None)
        self.closed.append((index, code, reason))
        for fut in (self.ready[index], *also):
            if not fut.done():
                fut.set_exception(ConnectionError(f"closed before ready: {code} {reason}"))

    @staticmethod
    def settle(fut: asyncio.Future, value=None) -> None:
        if not fut.done():
            fut.set_result(value)

    async def connect_all(self, urls: list[str], callback: Callable[[int], Callable], timeout: float, in_flight: int = 20,
                          on_open: Callable[[int], None] | None = None, label: Callable[[int], str] = str) -> list[str]:
        """Open every connection, at most ``in_flight`` between the TCP connect and ``ready``;
        ``callback(index)`` makes each one's ``on_message``; ``on_open(index)`` runs once its socket
        is known.  Returns the errors, as ``"<label(index)>: <error>"``."""
        gate = asyncio.Semaphore(in_flight)

        async def connect(index: int) -> str | None:
            async with gate:
                try:
                    ws = await asyncio.wait_for(websocket_connect(urls[index], callback(index)), timeout)
                    self.sockets[index] = ws
                    if on_open is not None:
                        on_open(index)
                    await asyncio.wait_for(asyncio.shield(self.ready[index]), timeout)
                    return None
                except Exception as exc:  # noqa: BLE001 - reported to the orchestrator
                    return f"{label(index)}: {exc!r}"

        return [e for e in await asyncio.gather(*(connect(i) for i in range(len(urls)))) if e]

    async def run(self, conn, targets: list[tuple[str, str]], connect_timeout: float, on_frame: Callable[[int, str, float], None],
                  on_open: Callable[[int], None] | None = None) -> None:
        """A client process's life, whatever protocol it speaks: one connection per ``(user, url)``
        of ``targets``, each text frame handed to ``on_frame(index, frame, t_recv)`` with the time it
        was read (a closed connection is recorded here, :meth:`on_closed`), ``("ready", connected,
        errors)`` sent on ``conn`` once each connection is ready or failed, then the orchestrator's
        commands until ``("stop",)`` (:meth:`serve`)."""
        now, on_closed = time.time, self.on_closed

        def callback(index: int) -> Callable:
            def on_message(raw) -> None:
                t_recv = now()
                if raw is None:
                    on_closed(index)
                    return
                on_frame(index, raw, t_recv)
            return on_message

        errors = await self.connect_all([url for _, url in targets], callback, connect_timeout, on_open=on_open, label=lambda i: targets[i][0])
        conn.send(("ready", len(targets) - len(errors), errors))  # each connection is ready or has its error
        await self.serve(conn)

    def take(self) -> tuple[list, list, list]:
        """What arrived since the last take: (records, closed, other frames)."""
        taken = self.records, self.closed, self.other
        self.records, self.closed, self.other = [], [], []
        return taken

    async def serve(self, conn, take: Callable[[], object] | None = None, linger: float = 0.2) -> None:
        """Answer the orchestrator's commands on ``conn`` until ``("stop",)`` or until it goes
        away; ``take`` answers ``("take",)`` (default :meth:`take`)."""
        take = take or self.take

        async def handle(command: tuple):
            if command[0] == "take":
                return take()
            if command[0] == "stop":
                for ws in self.sockets:
                    if ws is not None:
                        ws.close()
                await asyncio.sleep(linger)
                return "stopped"
            raise ValueError(f"unknown command {command!r}")

        done = asyncio.Event()

        def control() -> None:
            try:
                while True:
                    command = conn.recv()
                    conn.send(asyncio.run_coroutine_threadsafe(handle(command), self.loop).result())
                    if command[0] == "stop":
                        break
            except (EOFError, OSError):
                pass  # the orchestrator went away
            finally:
                self.loop.call_soon_threadsafe(done.set)

        threading.Thread(target=control, name="control", daemon=True).start()
        await done.wait()


# --- the orchestrator's side -------------------------------------------------------------------

def websocket_connect(url: str, on_message_callback: Callable):
    """Tornado's ``websocket_connect(url, on_message_callback=...)``, with the push node's frame
    reader (:class:`wsnode.reader.BatchReadingProtocol`: every frame one read brought handled at
    once, instead of three awaited reads per frame) as the client's protocol: a client process
    holds hundreds of connections and reads every message, for both systems alike.  The e2e
    client process spent about a fifth less CPU per message with it (2026-12-02, 23:52, two
    runs each way).  Same frames, same checks (``tests/integration/test_reader.py`` runs the
    reader against Tornado's client)."""
    from tornado import httpclient

    request = httpclient._RequestProxy(httpclient.HTTPRequest(url), httpclient.HTTPRequest._DEFAULTS)
    return _batch_reading_connection()(request, on_message_callback=on_message_callback).connect_future


@functools.cache
def _batch_reading_connection() -> type:
    """Tornado's client connection class with :class:`wsnode.reader.BatchReadingProtocol`, made
    once per process (Tornado is imported only in the client processes)."""
    from tornado.websocket import WebSocketClientConnection

    from wsnode.reader import BatchReadingProtocol

    class Connection(WebSocketClientConnection):
        def get_websocket_protocol(self):
            return BatchReadingProtocol(self, mask_outgoing=True, params=self.params)

    return Connection


def wait_pipe(conn, timeout: float) -> bool:
    """``conn.poll(timeout)`` in short slices, so that Ctrl-C and SIGTERM are handled at once."""
    deadline = time.monotonic() + timeout
    while True:
        if conn.poll(min(0.25, max(0.0, deadline - time.monotonic()))):
            return True
        if time.monotonic() >= deadline:
            return False


def stop_client_process(proc, conn, timeout: float = 5.0) -> None:
    """Ask a client process to close its connections and exit; kill it if it does not."""
    if proc.is_alive():
        try:
            conn.send(("stop",))
            if conn.poll(timeout):
                conn.recv()
        except (OSError, EOFError):
            pass
        proc.join(timeout)
    if proc.is_alive():
        proc.kill()
        proc.join(timeout)


class ClientProcess:
    """A client process whose ``target(conn, targets, connect_timeout)`` answers as
    :meth:`ClientSet.serve` does, after a first ``("ready", connected, errors)``; started here and
    ready when this returns (raises when a connection failed).  ``cleanup``, when given, is a
    ``common.Cleanup`` that gets its stop."""

    def __init__(self, ctx, target, targets: list[tuple[str, str]], name: str, cleanup=None, connect_timeout: float = 20.0,
                 start_timeout: float = 120.0) -> None:
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=target, args=(child, targets, connect_timeout), name=name, daemon=True)
        if cleanup is not None:
            cleanup.push(name, self.stop)
        self.proc.start()
        child.close()
        if not wait_pipe(self.conn, start_timeout):
            raise RuntimeError(f"{name}: the client process did not connect within {start_timeout:.0f} s")
        _, connected, errors = self.conn.recv()
        if errors or connected != len(targets):
            raise RuntimeError(f"{name}: only {connected} of {len(targets)} clients connected; first errors: {errors[:5]}")

    @property
    def pid(self) -> int:
        return self.proc.pid

    def take(self) -> tuple[list, list, list]:
        self.conn.send(("take",))
        if not wait_pipe(self.conn, 60):
            raise RuntimeError("the client process stopped answering")
        return self.conn.recv()

    def stop(self) -> None:
        stop_client_process(self.proc, self.conn)

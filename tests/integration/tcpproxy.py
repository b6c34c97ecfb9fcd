"""A TCP forwarder on 127.0.0.1 that can play a network partition: :meth:`FreezableProxy.freeze`
stops moving bytes in both directions while every socket stays open (no FIN, no RST), as when a
peer stops answering without closing its connections; :meth:`FreezableProxy.thaw` moves them on
again.  While frozen, new connections complete their handshake (the listening socket's backlog)
but are not taken, so nothing answers them either.

Threads only, no dependency: one accept thread, and one thread per direction of each connection.
"""

from __future__ import annotations

import select
import socket
import struct
import threading
import urllib.parse


class FreezableProxy:
    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self._listener = socket.create_server(("127.0.0.1", 0), backlog=128)
        self.port = self._listener.getsockname()[1]
        self._running = threading.Event()  # set while bytes move
        self._running.set()
        self._closed = threading.Event()
        self._resets = 0  # connections taken before the latest reset() forward nothing more
        self._kept: set[socket.socket] = set()  # server sides cut_clients() leaves open
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._accepter = threading.Thread(target=self._accept, name=f"proxy-{self.port}", daemon=True)

    @classmethod
    def to_url(cls, url: str) -> tuple["FreezableProxy", str]:
        """A started proxy to the host and port of ``url`` (redis://, amqp://, http://), and ``url``
        pointed at the proxy instead."""
        parts = urllib.parse.urlsplit(url)
        proxy = cls(parts.hostname, parts.port).start()
        netloc = parts.netloc.rsplit("@", 1)
        host_port = f"127.0.0.1:{proxy.port}"
        return proxy, parts._replace(netloc=f"{netloc[0]}@{host_port}" if len(netloc) == 2 else host_port).geturl()

    def start(self) -> "FreezableProxy":
        self._accepter.start()
        return self

    def freeze(self) -> None:
        self._running.clear()

    def thaw(self) -> None:
        self._running.set()

    def reset(self) -> None:
        """Drop what is held (frozen) and reset every connection (RST), as a middlebox in the path
        that restarts: neither peer gets what was on its way.  New connections are taken again."""
        self._reset(keep_server_sides=False)

    def cut_clients(self) -> None:
        """Reset (RST) the client side of every connection and leave the server side open, as a
        NAT or load balancer that drops its state: the client sees its connections reset, the
        server never learns (a command it holds, a blocked ``BRPOP``, still answers into a
        connection nobody reads).  New connections are taken again."""
        self._reset(keep_server_sides=True)

    def upstream_addresses(self) -> set[str]:
        """``host:port`` of each of this proxy's connections to the target, open or kept by
        :meth:`cut_clients`, as the target sees them (Redis's ``CLIENT LIST`` ``addr``)."""
        with self._lock:
            upstreams = [*self._sockets[1::2], *self._kept]
        addresses = set()
        for sock in upstreams:
            try:
                host, port = sock.getsockname()[:2]
            except OSError:
                continue  # closed meanwhile
            addresses.add(f"{host}:{port}")
        return addresses

    def _reset(self, keep_server_sides: bool) -> None:
        self._resets += 1
        with self._lock:
            sockets, self._sockets = self._sockets, []
            if keep_server_sides:  # taken in pairs: [client, server, client, server ...]
                self._kept.update(sockets[1::2])
                sockets = sockets[0::2]
        for sock in sockets:
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                sock.close()
            except OSError:
                pass
        self._running.set()

    def close(self) -> None:
        self._closed.set()
        self._running.set()
        with self._lock:
            sockets, self._sockets = self._sockets, []
        for sock in [self._listener, *sockets, *self._kept]:
            try:
                sock.close()
            except OSError:
                pass

    def __enter__(self) -> "FreezableProxy":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _accept(self) -> None:
        while not self._closed.is_set():
            self._running.wait()
            if self._closed.is_set():
                return
            readable, _, _ = select.select([self._listener], [], [], 0.1)
            if not readable or not self._running.is_set():
                continue
            try:
                client, _ = self._listener.accept()
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                if "client" in locals():
                    client.close()
                continue
            upstream.settimeout(None)
            with self._lock:
                self._sockets += [client, upstream]
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    def _received(self, source: socket.socket, poll: float = 0.05):
        """What ``source`` sends, chunk by chunk, and ``b""`` every ``poll`` seconds while it sends
        nothing (so that a caller may act between chunks), until it closes or this proxy does: for
        subclasses whose ``_pump`` reads the bytes it forwards (a protocol's frames)."""
        while not self._closed.is_set():
            readable, _, _ = select.select([source], [], [], poll)
            data = source.recv(65536) if readable else b""
            if readable and not data:
                return
            yield data

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        resets = self._resets
        try:
            while not self._closed.is_set():
                self._running.wait()
                readable, _, _ = select.select([source], [], [], 0.1)
                if not readable:
                    continue
                data = source.recv(65536)
                if not data:
                    break
                self._running.wait()  # frozen meanwhile: hold what was read until thawed
                if self._resets != resets:
                    break  # reset meanwhile: what was held is gone
                sink.sendall(data)
        except (OSError, ValueError):
            pass
        finally:
            shut_both(*(sock for sock in (source, sink) if sock not in self._kept))


class BlackholeProxy(FreezableProxy):
    """A :class:`FreezableProxy` whose :meth:`blackhole` makes the connections open at that moment
    forward nothing more, either way, for good, with no FIN or RST to either side (a NAT or load
    balancer that forgot them); connections made after go through as usual."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._dead: set[socket.socket] = set()

    def blackhole(self) -> None:
        with self._lock:
            self._dead.update(self._sockets)

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            for data in self._received(source):
                if data and source not in self._dead:  # a dead one's bytes are read and dropped
                    sink.sendall(data)
        except (OSError, ValueError):
            pass
        if source not in self._dead:
            shut_both(source, sink)


def shut_both(*socks: socket.socket) -> None:
    """End both directions of each of ``socks`` (a pump's end: its peer sees the close)."""
    for sock in socks:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

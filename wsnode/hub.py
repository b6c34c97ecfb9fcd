"""This node's connections, grouped by user.  Loop thread only.

The hub is the only mutable registry of connections in the node.  A connection is anything with
``conn_id`` and ``user_id`` attributes (the WebSocket handler in production, plain objects in tests).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol


class Connection(Protocol):
    conn_id: str
    user_id: str


class Hub:
    def __init__(self) -> None:
        self._by_user: dict[str, dict[str, Connection]] = {}
        self._by_id: dict[str, Connection] = {}

    def add(self, conn: Connection) -> bool:
        """Bind ``conn``; True when it is its user's first connection on this node."""
        conns = self._by_user.setdefault(conn.user_id, {})
        conns[conn.conn_id] = conn
        self._by_id[conn.conn_id] = conn
        return len(conns) == 1

    def remove(self, conn: Connection) -> bool:
        """Unbind ``conn``; True when it was its user's last connection on this node."""
        if self._by_id.pop(conn.conn_id, None) is None:
            return False
        conns = self._by_user.get(conn.user_id, {})
        conns.pop(conn.conn_id, None)
        if conns:
            return False
        self._by_user.pop(conn.user_id, None)
        return True

    def get(self, conn_id: str) -> Connection | None:
        return self._by_id.get(conn_id)

    def of_user(self, user_id: str) -> list[Connection]:
        """A copy, so a caller may close connections while it iterates."""
        return list(self._by_user.get(user_id, {}).values())

    def all(self) -> list[Connection]:
        return list(self._by_id.values())

    def users(self) -> list[str]:
        return list(self._by_user)

    def __iter__(self) -> Iterator[Connection]:
        return iter(self.all())

    @property
    def connection_count(self) -> int:
        return len(self._by_id)

    @property
    def user_count(self) -> int:
        return len(self._by_user)

"""Routing decisions: which node gets which envelope.  Pure.

Dispatch looks the routes up in Redis (``wsnode.registry.RouteTable``) and hands them here; the plan
has one entry per node, so a batch costs one queue message per node, never one per recipient.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

BROADCAST = "*"


def recipients_of(messages: Iterable[Mapping[str, Any]]) -> list[str]:
    """Every user named by ``messages``, once each, broadcasts left out."""
    users: dict[str, None] = {}
    for message in messages:
        if message["to"] != BROADCAST:
            users.update(dict.fromkeys(message["to"]))
    return list(users)


def plan(messages: Iterable[Mapping[str, Any]], routes: Mapping[str, Iterable[str]], live_nodes: Iterable[str]) -> dict[str, list[dict]]:
    """Group ``messages`` by node.

    ``routes`` maps a user to the nodes holding a connection of theirs; ``live_nodes`` are the nodes
    whose own lease is current.  A route to a node that is not live is ignored, and a user with no
    route is skipped: the message waits in the store for that user's resume.  Each envelope keeps
    ``id``, ``data`` and ``ts`` and names only the recipients on that node; the messages keep their
    order within each node's list.
    """
    live = list(dict.fromkeys(live_nodes))
    live_set = set(live)
    out: dict[str, list[dict]] = {}
    for message in messages:
        if message["to"] == BROADCAST:
            targets = {node: BROADCAST for node in live}
        else:
            by_node: dict[str, list[str]] = {}
            for user in message["to"]:
                for node in routes.get(user, ()):
                    if node in live_set:
                        by_node.setdefault(node, []).append(user)
            targets = by_node
        for node, users in targets.items():
            out.setdefault(node, []).append({"id": message["id"], "to": users, "data": message["data"], "ts": message.get("ts")})
    return out

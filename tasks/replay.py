"""Replay: send a connecting browser what it missed.  Worker process only.

A push node asks for it whenever a browser connects: with ``since=<id>`` for every message after
that id, without it for the user's inbox (every message to them that no device acked).  The node registers the
user's route first and only then asks, so every message is either in this replay or routed live
(or both: clients drop repeats by id).  The replay starts ``RESUME_OVERLAP_MS`` before ``since``
so that messages collected at the same moment on another worker process are not skipped.  The
answer goes back through the node's own queue as ``wsnode.deliver`` pages addressed to one
connection; the last page says so, whether the retention or ``REPLAY_LIMIT`` cut it short, and
its ``cursor``: the smallest id of the millisecond the worker read the store in.  What was stored
after that read is routed live, so a client that got no message yet resumes from the cursor: without
it, a device that left before its first message came back to the inbox alone, which no longer holds
what another device of the user acked meanwhile.

Nodes send ``tasks.replay_many``: every connection that asked since the node's previous request,
in one task (a reconnect storm of thousands of browsers is then tens of tasks, not thousands),
answered with one publish batch.  ``tasks.replay`` (one connection) stays for nodes of earlier
versions: upgrade the workers before the nodes.
"""

from __future__ import annotations

import logging
import time

import settings
from tasks import ids
from tasks.dispatch import publish_all
from tasks.store import StoreUnavailable, get_store
from worker import app

log = logging.getLogger(__name__)

PAGE = 500


def _read(requests: list[tuple[str, str, str | None]]) -> tuple[list[tuple[list[dict], bool]], str]:
    """The envelopes of each ``(conn, user, since)``, and whether the retention or the limit cut
    them short: the inbox of each without ``since``, and those with ``since`` in one call
    (:meth:`tasks.store.Store.replays`: one read for all of them when it can); and the cursor, an
    id no later than the reads."""
    cursor = ids.lower_bound(int(time.time() * 1000))
    store = get_store()
    replies: list = [None] * len(requests)
    resumes = [(index, user, ids.lower_bound(ids.timestamp_ms(since) - settings.RESUME_OVERLAP_MS))
               for index, (_, user, since) in enumerate(requests) if since is not None]
    # Every connection here registered its route before the node asked: what is stored after the
    # first read below is routed to it live, so all the reads may share that read's index.
    with store.index_pinned():
        for index, (_, user, since) in enumerate(requests):
            if since is None:
                replies[index] = store.unacked(user, settings.REPLAY_LIMIT)
        for (index, _, _), reply in zip(resumes, store.replays([(user, after) for _, user, after in resumes], settings.REPLAY_LIMIT)):
            replies[index] = reply
    now = time.time()
    for index, (_, _, since) in enumerate(requests):
        if since is not None and past_retention(since, now, settings.RETENTION_SECONDS):
            envelopes, _ = replies[index]
            replies[index] = envelopes, True
    return replies, cursor


def past_retention(since: str, now: float, retention: float) -> bool:
    """Whether a resume from the message id ``since`` reaches further back than the store keeps
    messages: some of what came after it may have been purged, so the replay is ``truncated``
    however many messages it finds.  Pure."""
    return ids.timestamp_ms(since) < (now - retention) * 1000


def _pages(envelopes: list[dict], truncated: bool, cursor: str) -> list[tuple[list[dict], dict]]:
    """The pages of one connection's replay: ``(envelopes, replay info)`` each, at least one; the
    last one carries the ``cursor``.  Pure."""
    chunks = [envelopes[i : i + PAGE] for i in range(0, len(envelopes), PAGE)] or [[]]
    pages = [(chunk, {"last": number == len(chunks), "truncated": truncated, "count": len(envelopes)}) for number, chunk in enumerate(chunks, 1)]
    pages[-1][1]["cursor"] = cursor
    return pages


def _log_replayed(node: str, conn: str, user: str, since: str | None, pages: list[tuple[list[dict], dict]]) -> None:
    info = pages[-1][1]
    log.info("replayed %d messages to user=%s conn=%s on %s %s%s", info["count"], user, conn, node, f"since {since}" if since else "from the inbox", " (truncated)" if info["truncated"] else "")


@app.task(name="tasks.replay", ignore_result=True, autoretry_for=(StoreUnavailable,), retry_backoff=True, max_retries=3)
def replay(node: str, conn: str, user: str, since: str | None = None) -> None:
    """Send connection ``conn`` on ``node`` what ``user`` missed: with ``since``, every message
    after it; without, every message to the user that none of their devices acked (the inbox)."""
    _answer(node, [(conn, user, since)])


def parse_requests(requests: object) -> tuple[list[tuple[str, str, str | None]], list[str]]:
    """The well-formed ``{"conn", "user", "since"}`` items of a ``tasks.replay_many`` as
    ``(conn, user, since)``, and a description of each one left out.  Pure."""
    good, bad = [], []
    for item in requests if isinstance(requests, list) else [requests]:
        conn, user, since = (item.get(k) for k in ("conn", "user", "since")) if isinstance(item, dict) else (None, None, None)
        if isinstance(conn, str) and isinstance(user, str) and (since is None or ids.is_message_id(since)):
            good.append((conn, user, since))
        else:
            bad.append(f"{item!r:.120}")
    return good, bad


@app.task(name="tasks.replay_many", ignore_result=True, autoretry_for=(StoreUnavailable,), retry_backoff=True, max_retries=3)
def replay_many(node: str, requests: list[dict]) -> None:
    """:func:`replay` for several connections of ``node``: ``requests`` is ``[{"conn", "user",
    "since"}]``.  Every replay is read first and then all pages go out in one publish batch, so a
    store error sends nothing and the retry sends everything once."""
    good, bad = parse_requests(requests)
    for item in bad:
        log.error("tasks.replay_many from %s: dropped a malformed request %s (expected {conn, user, since})", node, item)
    _answer(node, good)


def _answer(node: str, requests: list[tuple[str, str, str | None]]) -> None:
    """Read the replay of every ``(conn, user, since)``, then publish all their pages in one batch."""
    read, cursor = _read(requests)
    replies = [(conn, user, since, _pages(*reply, cursor)) for (conn, user, since), reply in zip(requests, read)]
    publish_all([(node, envelopes, {"conn": conn, "replay": info}) for conn, _, _, pages in replies for envelopes, info in pages])
    for conn, user, since, pages in replies:
        _log_replayed(node, conn, user, since, pages)

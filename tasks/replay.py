"""Replay: send a connecting browser what it missed.  Worker process only.

A push node asks for it whenever a browser connects: with ``since=<id>`` for every message after
that id, without it for the user's inbox (every message to them that no device acked).  The node registers the
user's route first and only then asks, so every message is either in this replay or routed live
(or both: clients drop repeats by id).  The replay starts ``RESUME_OVERLAP_MS`` before ``since``
so that messages collected at the same moment on another worker process are not skipped.  The
answer goes back through the node's own queue as ``wsnode.deliver`` pages addressed to one
connection; the last page says so, and whether the retention or ``REPLAY_LIMIT`` cut it short.
"""

from __future__ import annotations

import logging

import settings
from tasks import ids
from tasks.dispatch import publish
from tasks.store import StoreUnavailable, get_store
from worker import app

log = logging.getLogger(__name__)

PAGE = 500


@app.task(name="tasks.replay", ignore_result=True, autoretry_for=(StoreUnavailable,), retry_backoff=True, max_retries=3)
def replay(node: str, conn: str, user: str, since: str | None = None) -> None:
    """Send connection ``conn`` on ``node`` what ``user`` missed: with ``since``, every message
    after it; without, every message to the user that none of their devices acked (the inbox)."""
    if since is None:
        envelopes, truncated = get_store().unacked(user, settings.REPLAY_LIMIT)
    else:
        after = ids.lower_bound(ids.timestamp_ms(since) - settings.RESUME_OVERLAP_MS)
        envelopes, truncated = get_store().replay(user, after, settings.REPLAY_LIMIT)
    pages = [envelopes[i : i + PAGE] for i in range(0, len(envelopes), PAGE)] or [[]]
    for number, page in enumerate(pages, 1):
        last = number == len(pages)
        publish(node, page, conn=conn, replay={"last": last, "truncated": truncated, "count": len(envelopes)})
    log.info("replayed %d messages to user=%s conn=%s on %s %s%s", len(envelopes), user, conn, node, f"since {since}" if since else "from the inbox", " (truncated)" if truncated else "")

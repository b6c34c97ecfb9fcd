"""Replay: send a connecting browser what it missed.  Worker process only.

A push node asks for it whenever a browser connects: with ``since=<id>`` for every message after
that id, without it for the user's inbox (every message to them that no device acked).  The node registers the
user's route first and only then asks, so every message is either in this replay or routed live
(or both: clients drop repeats by id).  The replay starts ``RESUME_OVERLAP_MS`` before ``since``
so that messages collected at the same moment on another worker process are not skipped.  The
answer goes back through the node's own queue as ``wsnode.deliver`` pages addressed to one
connection; the last page says so, whether the retention, ``REPLAY_LIMIT`` or ``REPLAY_MAX_BYTES``
cut it short, and its ``cursor``: the smallest id of the millisecond the worker read the store in.  What was stored
after that read is routed live, so a client that got no message yet resumes from the cursor: without
it, a device that left before its first message came back to the inbox alone, which no longer holds
what another device of the user acked meanwhile.

Nodes send ``tasks.replay_many``: every connection that asked since the node's previous request,
in one task (a reconnect storm of thousands of browsers is then tens of tasks, not thousands),
answered in publish batches of about ``REPLAY_MAX_BYTES`` as the replays are read (one batch for
all when they are small).  ``tasks.replay`` (one connection) stays for nodes of earlier
versions: upgrade the workers before the nodes.

A replay holds at most the newest ``REPLAY_LIMIT`` messages whose frames take at most
``REPLAY_MAX_BYTES`` together (:func:`newest_within`): what a node writes whole to a resuming
connection, whether its client reads or not.  The store reads the messages' data newest first and
stops once that budget is spent (:meth:`tasks.store.Store.each_replay`), and a task publishes
its replays as it reads them, once a batch reaches the budget (:func:`_answer`), so the worker holds
about two budgets per task (the batch and the replay it reads), not ``REPLAY_LIMIT`` messages of
``MAX_MESSAGE_BYTES``, nor one budget per connection (except the embedded engine's one read of at
most ``_EMBEDDED_RANGE_ROWS`` recent messages, which a task's replays share).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator

import settings
from tasks import ids
from tasks.dispatch import clock, publish_all
from tasks.queues import by_size
from tasks.store import BROADCAST, Cut, StoreUnavailable, get_store
from worker import app
from wsnode.protocol import message_frame
from wsnode.session import utf8_length

log = logging.getLogger(__name__)

PAGE = 500


def _read(store, requests: list[tuple[str, str, str | None]], cut: Cut) -> Iterator[tuple[int, tuple[list[dict], bool]]]:
    """``(index, (envelopes, truncated))`` of each ``(conn, user, since)`` of ``requests``, each read
    as it is taken, and whether the retention, the limit or the byte budget (``cut``) cut it short:
    the inbox of each without ``since``, then those with ``since`` (:meth:`tasks.store.Store.each_replay`:
    one read for all of them when it can).  Inside :meth:`tasks.store.Store.index_pinned`."""
    for index, (_, user, since) in enumerate(requests):
        if since is None:
            yield index, store.unacked(user, settings.REPLAY_LIMIT, cut)
    resumes = [(index, user, since) for index, (_, user, since) in enumerate(requests) if since is not None]
    wanted = [(user, ids.lower_bound(ids.timestamp_ms(since) - settings.RESUME_OVERLAP_MS)) for _, user, since in resumes]
    if wanted:
        wanted = reach_back(wanted, store.late_since(min(ids.timestamp_ms(after) for _, after in wanted), [user for user, _ in wanted]))
    for (index, _, since), (envelopes, truncated) in zip(resumes, store.each_replay(wanted, settings.REPLAY_LIMIT, cut)):
        yield index, (envelopes, truncated or past_retention(since, clock.now(), settings.RETENTION_SECONDS))


def reach_back(wanted: list[tuple[str, str]], late: list[tuple[str, list[str] | str, int]]) -> list[tuple[str, str]]:
    """Each ``(user, after_id)`` of ``wanted``, reaching back, when a message to that user (or a
    broadcast) with an id at or before ``after_id`` was routed at ``after_id``'s time or later
    (``late``: ``(id, to, routed at in ms)``, :meth:`tasks.store.Store.mark_late`), to just before
    the oldest such message.

    A message is routed late when Collect could not route it at once (the routing Redis
    unavailable: :func:`tasks.collect._hand_off` queues it for ``tasks.dispatch``, which retries
    for up to minutes) while later messages to the same user went out: a browser that saw one of
    those and left before the late one came resumes from a later id than the late one's, further
    than ``RESUME_OVERLAP_MS``.  Reaching back replays the messages in between again too, which
    clients drop by id; the replay's limits still apply (newest first).  Pure."""
    if not late:
        return wanted
    reached = []
    for user, after in wanted:
        after_ms = ids.timestamp_ms(after)
        older = [mid for mid, to, routed_ms in late
                 if routed_ms >= after_ms and mid <= after and (to == BROADCAST or user in to)]
        reached.append((user, ids.lower_bound(ids.timestamp_ms(min(older)) - 1) if older else after))
    return reached


class _Held:
    """The bytes of message frames the replays of one task read since its last publish: the
    :data:`tasks.store.Cut` it gives the store (:func:`newest_within` with ``REPLAY_MAX_BYTES``)
    counts every frame it measures, the kept ones and the first one it leaves out."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0

    def cut(self, newest_first: Iterable[dict]) -> tuple[list[dict], bool]:
        return newest_within(newest_first, self.max_bytes, self._size)

    def _size(self, envelope: dict) -> int:
        size = frame_bytes(envelope)
        self.bytes += size
        return size


def past_retention(since: str, now: float, retention: float) -> bool:
    """Whether a resume from the message id ``since`` reaches further back than the store keeps
    messages: some of what came after it may have been purged, so the replay is ``truncated``
    however many messages it finds.  Pure."""
    return ids.timestamp_ms(since) < (now - retention) * 1000


def frame_bytes(envelope: dict) -> int:
    """The bytes of the message frame a push node writes for ``envelope``: the node's own
    :func:`wsnode.protocol.message_frame`, measured in UTF-8 as the node measures what it writes
    (:func:`wsnode.session.utf8_length`).  The node builds it from the envelope this worker sends,
    which JSON carries unchanged, so this is the size the node writes (WebSocket's own header of
    2 to 10 bytes a frame aside, as ``CLIENT_QUEUE_MAX_BYTES`` leaves it aside too).  Pure."""
    return utf8_length(message_frame(envelope))


def newest_within(newest_first: Iterable[dict], max_bytes: int,
                  size: Callable[[dict], int] = frame_bytes) -> tuple[list[dict], bool]:
    """The newest envelopes of ``newest_first`` (given newest first) whose frames (``size``) take
    at most ``max_bytes`` together, returned oldest first, and True when older ones were left out
    (the replay is ``truncated``).  The newest is always kept, even alone over ``max_bytes``, so a
    replay carries at least its newest message; the kept ones are the newest in a row, with no gap
    between them and what comes live after.  Stops reading ``newest_first`` at the first envelope
    that does not fit, so a store that yields them as it reads them reads no further.  Pure."""
    kept: list[dict] = []
    total = 0
    for envelope in newest_first:
        total += size(envelope)
        if kept and total > max_bytes:
            kept.reverse()
            return kept, True
        kept.append(envelope)
    kept.reverse()
    return kept, False


def _pages(envelopes: list[dict], truncated: bool, cursor: str) -> list[tuple[list[dict], dict]]:
    """The pages of one connection's replay: ``(envelopes, replay info)`` each, at least one, of at
    most ``PAGE`` envelopes and about ``MAX_PUBLISH_BYTES`` of data (each page is one broker
    message, and a replay may take ``REPLAY_MAX_BYTES``, 16 MiB by default, over RabbitMQ 4's
    ``max_message_size``); the last one carries the ``cursor``.  Pure."""
    chunks = [run[i : i + PAGE] for run in by_size(envelopes) for i in range(0, len(run), PAGE)] or [[]]
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
    "since"}]``, answered in publish batches of about ``REPLAY_MAX_BYTES`` as they are read
    (:func:`_answer`)."""
    good, bad = parse_requests(requests)
    for item in bad:
        log.error("tasks.replay_many from %s: dropped a malformed request %s (expected {conn, user, since})", node, item)
    _answer(node, good)


def _answer(node: str, requests: list[tuple[str, str, str | None]]) -> None:
    """Read the replay of every ``(conn, user, since)`` and publish their pages as they are read,
    in batches of about ``REPLAY_MAX_BYTES`` of frames (and the last batch when all are read), so
    the worker holds a batch and the replay it reads, not every connection's.  A store error after
    a batch went out retries the task with every request: the node ignores the pages of a
    connection whose replay it finished (:meth:`wsnode.session.Session.replay_page`), so each gets
    its replay once."""
    cursor = ids.lower_bound(int(clock.now() * 1000))  # no later than the reads; Redis's clock, as the ids
    store = get_store()
    held = _Held(settings.REPLAY_MAX_BYTES)
    batch: list[tuple[str, str, str | None, list[tuple[list[dict], dict]]]] = []

    def publish() -> None:
        publish_all([(node, envelopes, {"conn": conn, "replay": info}) for conn, _, _, pages in batch for envelopes, info in pages])
        for conn, user, since, pages in batch:
            _log_replayed(node, conn, user, since, pages)
        batch.clear()
        held.bytes = 0

    # Every connection here registered its route before the node asked: what is stored after the
    # first read below is routed to it live, so all the reads may share that read's index.
    with store.index_pinned():
        for index, reply in _read(store, requests, held.cut):
            conn, user, since = requests[index]
            batch.append((conn, user, since, _pages(*reply, cursor)))
            del reply
            if held.bytes >= held.max_bytes:
                publish()
    if batch:
        publish()

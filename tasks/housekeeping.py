"""``tasks.housekeeping``: the platform's periodic work.  Worker process only.

One run (every ``HOUSEKEEPING_SECONDS``, sent by :mod:`tasks.scheduler` from exactly one worker):

1. **Redelivery.**  A delivery that no device acked is dispatched again to its user, if online
   (offline users get it from their inbox when they connect), each time its age crosses one of the
   thresholds ``REDELIVER_AFTER x 1, 2, 4, ...`` (``REDELIVER_ATTEMPTS`` of them): at most that
   many times, and clients drop the repeats by id.  The candidates come from Redis
   (:mod:`tasks.pending`: routed, not acked), so a run reads the store only for what is due.
   Crossings are counted since the previous run that sent its own (kept in Redis, moved once a run sent),
   so an outage of Redis, the store or the workers shorter than the last threshold (8 minutes by
   default) delays redelivery but skips none (past ``REDELIVER_LIMIT`` deliveries due in one run,
   the newest skip that threshold).  After a longer one, a run counts crossings over the last
   threshold's span only: a delivery whose every threshold passed earlier in the outage is not
   sent again (it stays in its user's inbox).  This
   recovers a message lost between the store and the browser while its user stays connected (a
   dropped queue message, a node that wrote and crashed).  Every ``REDELIVER_SWEEP_SECONDS`` a run
   also sweeps the store: its unacked deliveries to users online then become candidates too (a
   message stored but never routed, a Redis that lost the candidates).  A sweep reads only what the previous one did not
   (:func:`sweep_window`), and not the last ``REDELIVER_AFTER`` seconds' messages.
2. **Dead nodes.**  A node whose own lease ended more than ``LEASE_TTL`` ago (by Redis's clock, which
   every lease is written and judged by: :mod:`wsnode.registry`) has its queue handed
   back (:func:`tasks.reclaim.hand_back`) and deleted, and leaves the node list; unless a node
   wrote its lease at that address meanwhile (restarted on it), which keeps the queue.  Not while Redis
   has been up for less than ``2 x LEASE_TTL``: after a Redis restart every lease looks old until
   the nodes have renewed them.  Nor for ``2 x LEASE_TTL`` after Redis was seen refusing writes
   for lack of memory (:func:`refusals_settled`), or after runs resumed from a gap longer than
   ``LEASE_TTL`` (:func:`runs_unbroken_since`: Redis did not answer, or a failover): the nodes'
   lease renewals were refused or unanswered too.
3. **Retention.**  At most every 10 minutes, the store drops what is older than ``RETENTION_SECONDS``.
"""

from __future__ import annotations

import datetime
import functools
import logging
import os
import time

from redis import ConnectionError as RedisConnectionError
from redis import RedisError
from redis import TimeoutError as RedisTimeoutError

import redislogin
import settings
from redisclock import redis_time
from tasks import pending
from tasks.dispatch import _redis, clock, route
from tasks.ids import timestamp_ms
from tasks.reclaim import hand_back
from tasks.resultbackend import REFUSED_FOR_NOW
from tasks.store import StoreUnavailable, get_store
from worker import app
from wsnode.registry import NODES_KEY, RouteTable

log = logging.getLogger(__name__)

PURGE_LOCK = "push:purge-lock"
#: Held by the run in progress.  It expires after ``RUN_LOCK_PERIODS`` periods, so that a run whose
#: process died stops the next ones for that long only (a run slower than that may be overlapped).
RUN_LOCK = "push:housekeeping-run"
RUN_LOCK_PERIODS = 6
SWEEP_LOCK = "push:redeliver-sweep-lock"
LAST_RUN = "push:redeliver-last-run"
#: The time (in message ids, unix seconds) up to which the store has been swept.
SWEEP_MARK = "push:redeliver-sweep-mark"
#: A sweep reads again this much before the previous sweep's end.  A message's id (and its time) is
#: made just before the message is stored; a run that stores ids made long before (a task run again
#: after its worker died, a retry after the store was unavailable) routes those messages itself.
SWEEP_OVERLAP_SECONDS = 60.0
#: The retention is a day: purging every 10 minutes is precise enough, and on the embedded store
#: each purge reads every document.
PURGE_EVERY_SECONDS = 600
#: Most deliveries one run re-sends (the oldest first); the rest skip this threshold and are re-sent
#: at the next one (or come from the inbox on a reconnect).
REDELIVER_LIMIT = 20000
#: About how many deliveries a sweep checks against the leases per script call.
SWEEP_CHUNK = 5000
#: What the last run saw of the writes Redis refused for lack of memory: ``count`` (``INFO
#: errorstats``' ``errorstat_OOM``, since Redis started) and ``since``, when that count last changed.
OOM_SEEN = "push:housekeeping-oom-seen"
#: When the last run ended (``last``) and when its series of runs with no gap longer than
#: :func:`run_gap` began (``since``).
RUNS_SEEN = "push:housekeeping-runs-seen"
#: ``OOM_SEEN`` and ``RUNS_SEEN`` expire after a day without runs (then read as never seen).
GUARD_TTL = 86400

# Move LAST_RUN to this run's time (ARGV[1]) if it still holds what the run read (ARGV[2]; "" for
# none): a later run that moved it meanwhile is not moved back.
_ADVANCE = _redis.register_script(
    "local v = redis.call('get', KEYS[1]) "
    "if (v == false and ARGV[2] == '') or v == ARGV[2] then redis.call('set', KEYS[1], ARGV[1]) return 1 end return 0"
)
# Delete KEYS[1] only if it still holds ARGV[1] (this run's lock, not the next run's).
_RELEASE = _redis.register_script("if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end return 0")
# Remove a node from the list only if its lease is still the old one (it may have come back): one
# that ended by ARGV[2], a time by Redis's clock.
_FORGET_NODE = _redis.register_script(
    "local s = redis.call('zscore', KEYS[1], ARGV[1]) "
    "if s and tonumber(s) <= tonumber(ARGV[2]) then return redis.call('zrem', KEYS[1], ARGV[1]) end return 0"
)


def thresholds() -> list[float]:
    """The ages at which an unacked delivery is re-sent."""
    return [settings.REDELIVER_AFTER * 2**k for k in range(settings.REDELIVER_ATTEMPTS)]


def crossed(age_then: float, age_now: float, marks: list[float]) -> bool:
    """Whether a delivery's age crossed a threshold between the previous run and this one.  Pure."""
    return any(age_then < mark <= age_now for mark in marks)


def redeliver(now: float) -> int:
    """Re-send what crossed a threshold since the previous run (``LAST_RUN``), then move
    ``LAST_RUN`` to ``now``; returns how many deliveries went out.  It moves only once this run's
    redeliveries went out: a run that fails (the store or Redis unavailable) or dies (its worker
    process killed, where no ``except`` runs) leaves it, so the next run counts this run's
    crossings too.  It used to move first and be put back on a failure, so a killed run's
    crossings were never re-sent.  A run that dies between its sends and the move has them sent
    again by the next one, which clients drop by id."""
    raw = _redis.get(LAST_RUN)
    try:
        since = float(raw)
    except (TypeError, ValueError):  # the first run, or a value not written here
        since = now - settings.HOUSEKEEPING_SECONDS
    sent = _redeliver(now, since)
    _ADVANCE(keys=[LAST_RUN], args=[now, raw if raw is not None else ""], client=_redis)
    return sent


def redelivery_window(now: float, previous: float, marks: list[float]) -> tuple[float, float, float]:
    """``(start, end, gap)``: a run at ``now`` after one at ``previous`` reads the deliveries
    routed from ``start`` to ``end`` and counts the crossings of the last ``gap`` seconds, which
    is at most the last threshold's span: after a longer outage, what crossed its every threshold
    before that span is not read, and is pruned (it stays in the inbox).  Pure."""
    gap = min(max(now - previous, 0.0), marks[-1])
    return now - marks[-1] - gap, now - marks[0], gap


def _redeliver(now: float, previous: float) -> int:
    marks = thresholds()
    start, end, gap = redelivery_window(now, previous, marks)
    # Only the deliveries routed and not acked (pending, in Redis) whose age crossed a threshold
    # since the last run: a few seconds' worth per threshold, read without scanning the store.
    due = []
    for message_id, user in pending.between(_redis, start, end):
        age = now - timestamp_ms(message_id) / 1000
        if crossed(age - gap, age, marks):
            due.append((message_id, user))
    pending.prune(_redis, start)  # past the last threshold: never sent again
    if _redis.set(SWEEP_LOCK, "1", nx=True, ex=max(1, round(settings.REDELIVER_SWEEP_SECONDS))):
        sweep(start, now - marks[0])
    if len(due) > REDELIVER_LIMIT:
        log.warning("%d deliveries crossed a redelivery threshold; sending the oldest %d this run", len(due), REDELIVER_LIMIT)
        due = due[:REDELIVER_LIMIT]
    if not due:
        return 0
    store = get_store()
    unacked = store.not_acked(due)  # the store's receipts are the record: an ack's removal may have been missed
    pending.remove(_redis, set(due) - set(unacked))
    users_of: dict[str, list[str]] = {}
    for message_id, user in unacked:
        users_of.setdefault(message_id, []).append(user)
    if not users_of:
        return 0
    data = store.message_data(list(users_of))
    messages = [{"id": mid, "to": users, "data": data[mid], "ts": None} for mid, users in users_of.items() if mid in data]
    per_node = route(messages)
    sent = sum(len(e["to"]) for envelopes in per_node.values() for e in envelopes)
    if sent:
        log.info("redelivered %d unacked deliveries to online users", sent)
    return sent


def sweep_window(start: float, end: float, mark: float | None) -> tuple[float, float]:
    """The messages a sweep reads, by the time in their ids: from ``start`` (the oldest that can
    still cross a threshold) to ``end``; when an earlier sweep read up to ``mark``, only from
    ``SWEEP_OVERLAP_SECONDS`` before that.  Empty when the start is not before the end.  Pure."""
    if mark is not None:
        start = max(start, min(mark, end) - SWEEP_OVERLAP_SECONDS)
    return start, end


def sweep(start: float, end: float) -> int:
    """Add the store's unacked deliveries of the messages from ``start`` to ``end`` that no earlier
    sweep read (:func:`sweep_window`) to the redelivery candidates, those of users online now
    (:func:`mark_online`); returns how many were read.

    The caller ends the window ``REDELIVER_AFTER`` before now: a younger message is not due yet,
    and one that was routed is a candidate already.  On either store the read is a range of the
    message ids (the embedded store's table's primary key, MongoDB's ``_id`` index): the messages
    stored since the previous sweep, not the whole store."""
    mark = _redis.get(SWEEP_MARK)
    start, end = sweep_window(start, end, float(mark) if mark is not None else None)
    if start >= end:
        return 0
    utc = datetime.timezone.utc
    store = get_store()
    since = datetime.datetime.fromtimestamp(start, utc)
    deliveries = store.deliveries_between(since, datetime.datetime.fromtimestamp(end, utc))
    acked = store.acked_since(since) if deliveries else set()  # an ack comes after its message
    mark_online([pair for pair in deliveries if pair not in acked])
    _redis.set(SWEEP_MARK, repr(end))  # only once read: a sweep that failed is read again by the next
    return len(deliveries)


def mark_online(deliveries: list[tuple[str, str]]) -> None:
    """Make the ``(message id, user)`` deliveries whose user is online now (a lease on a live node:
    the users Dispatch routes to) redelivery candidates, in the leases' lookup script, which adds
    them in the same call (:meth:`wsnode.registry.RouteTable.lookup`).  A user offline now gets
    them from their inbox on connecting; as candidates they cost a read of the store at each
    threshold for nothing (a burst of messages to offline users used to keep the worker's pool
    busy redelivering to nobody)."""
    if not deliveries:
        return
    per_user: dict[str, list[tuple[str, str]]] = {}
    for pair in deliveries:
        per_user.setdefault(pair[1], []).append(pair)
    table = RouteTable(_redis)
    users: list[str] = []
    pairs: list[tuple[str, str]] = []
    for user, theirs in per_user.items():
        users.append(user)
        pairs += theirs
        if len(pairs) >= SWEEP_CHUNK:
            table.lookup(users, pending.PENDING_KEY, pending.marks(pairs))
            users, pairs = [], []
    if users:
        table.lookup(users, pending.PENDING_KEY, pending.marks(pairs))


def refusals_settled(count: int, seen: tuple[int, float] | None, now: float, settle: float) -> tuple[bool, tuple[int, float]]:
    """Whether Redis has refused no write for lack of memory (``maxmemory``) for ``settle``
    seconds, judged at ``now`` from ``count``, the refusals Redis counted since it started, and
    ``seen``, what the last run saw: ``(count, since)``, ``since`` the time the count last
    changed (None: never seen).  Returns the answer and what to keep for the next run.  Pure.

    A full Redis refuses the nodes' lease renewals, so after a fullness longer than ``LEASE_TTL``
    every node looks gone until it writes its lease again, which it does within ``LEASE_TTL / 3``
    of Redis having room; a housekeeping run just then handed back and deleted a live node's queue.
    Housekeeping cannot run while Redis is full (its lock is a write), so it sees a fullness only
    afterwards, as a count that changed: no node is reclaimed for ``settle`` seconds from then."""
    if seen is not None and seen[0] == count:
        return now - seen[1] >= settle, seen
    if seen is None and count == 0:
        return True, (0, 0.0)  # no refusal since Redis started
    return False, (count, now)


def run_gap() -> float:
    """The longest time between two runs that is no gap: ``LEASE_TTL``, or twice the period when
    runs are that far apart (then only a longer outage is seen as one)."""
    return max(settings.LEASE_TTL, 2 * settings.HOUSEKEEPING_SECONDS)


def runs_unbroken_since(last: float | None, since: float | None, now: float, gap: float) -> float:
    """When the series of runs that the one at ``now`` continues began: ``since``, unless the
    previous run ended (at ``last``) more than ``gap`` seconds ago, or is unknown.  Pure.

    Housekeeping holds its lock in Redis, so it does not run while Redis does not answer or
    refuses writes (an outage without a restart, a failover to a replica that was up all along),
    when the nodes cannot renew their leases either: once runs resume, every node cut off that
    long looks gone until it writes its lease again (within ``LEASE_TTL / 3``).  A gap for any
    other reason (every worker stopped) only delays taking a node for gone."""
    if last is None or since is None or now - last > gap:
        return now
    return since


def _nodes_may_be_judged(now: float) -> float | None:
    """Redis's clock (``TIME``, read in the same round trip), which the nodes' leases are judged
    by, when this run may take nodes for gone; else None.  It may when Redis has been up ``2 x
    LEASE_TTL``, refused no write for lack of memory for as long (:func:`refusals_settled`; a
    Redis older than 6.2 has no ``errorstats`` and counts as never full), and housekeeping's runs
    have gone on without a gap for as long (:func:`runs_unbroken_since`, from the end of the
    previous run, written by :func:`housekeeping`).  Otherwise live nodes may not have written
    again yet the leases Redis lost, refused or did not answer.  Two round trips."""
    settle = 2 * settings.LEASE_TTL
    with _redis.pipeline(transaction=False) as pipe:
        pipe.info("server").info("errorstats").hmget(OOM_SEEN, "count", "since").hmget(RUNS_SEEN, "last", "since").time()
        server, errorstats, (raw_count, raw_oom_since), (raw_last, raw_since), time_reply = pipe.execute()
    last = float(raw_last) if raw_last is not None else None
    since = runs_unbroken_since(last, float(raw_since) if raw_since is not None else None, now, run_gap())
    seen = (int(raw_count), float(raw_oom_since)) if raw_count is not None and raw_oom_since is not None else None
    settled, keep = refusals_settled(int(errorstats.get("errorstat_OOM", {}).get("count", 0)), seen, now, settle)
    with _redis.pipeline(transaction=False) as pipe:
        pipe.hset(RUNS_SEEN, "since", since).expire(RUNS_SEEN, GUARD_TTL)
        if keep != seen:
            pipe.hset(OOM_SEEN, mapping={"count": keep[0], "since": keep[1]}).expire(OOM_SEEN, GUARD_TTL)
        pipe.execute()
    if since == now and last is not None:
        log.warning("housekeeping did not run for %.0f s (Redis did not answer or refused writes, or no worker ran it): no node is taken for "
                    "gone for %.0f s, while the nodes write again the leases they could not", now - last, settle)
    if keep != seen and not settled:
        log.warning("Redis refused writes for lack of memory (maxmemory) since the last run: no node is taken for gone for %.0f s, "
                    "while the nodes write again the leases it refused", settle)
    if server["uptime_in_seconds"] >= settle and settled and now - since >= settle:
        return redis_time(time_reply)
    return None


def _run_ended() -> None:
    """Record the end of a run, from which :func:`runs_unbroken_since` measures the next one's gap
    (a slow run is no gap).  A Redis that does not answer now is what the next run sees as one."""
    try:
        with _redis.pipeline(transaction=False) as pipe:
            pipe.hset(RUNS_SEEN, "last", clock.now()).expire(RUNS_SEEN, GUARD_TTL).execute()
    except RedisError as exc:
        log.warning("housekeeping: the end of this run was not recorded (%s)", redislogin.explain(exc))


#: The node list, read by ``reclaim_dead_nodes`` again before and after deleting a queue.
_routes = RouteTable(_redis)


def reclaim_dead_nodes(now: float) -> int:
    """Hand back and delete the queue of every node whose own lease ended more than ``LEASE_TTL``
    ago by Redis's clock (read in :func:`_nodes_may_be_judged`'s round trip: ``now``, this
    worker's, is not compared with any lease), then forget the node; returns the envelopes
    handed back.  A node started again on such an address (or back from a cut-off from Redis)
    after the node list was read here keeps its queue: ``hand_back`` reads its lease again before
    and after deleting (:func:`tasks.reclaim._delete` says why that is enough), and
    ``_FORGET_NODE`` keeps it listed."""
    redis_now = _nodes_may_be_judged(now)
    if redis_now is None:
        return 0
    cutoff = redis_now - settings.LEASE_TTL
    handed = 0
    failed = None
    for raw, lease_end in _redis.zrangebyscore(NODES_KEY, "-inf", cutoff, withscores=True):
        node = raw.decode() if isinstance(raw, bytes) else raw
        try:
            handed += hand_back(app, node, delete=True, node_back=functools.partial(_routes.lease_ends_after, node, cutoff))
        except Exception as exc:  # noqa: BLE001 - the other dead nodes go on; this one is tried again next run
            log.error("node %s is gone, but its queue could not be handed back (%r): trying again at the next run", node, exc)
            failed = failed or exc
            continue
        if _FORGET_NODE(keys=[NODES_KEY], args=[node, cutoff]):
            if lease_end == 0:  # ended by the node's drain (Leases.release_node): expected, not a fault
                log.info("node %s drained: what was still queued for it was handed back and its queue deleted", node)
            else:
                log.warning("node %s is gone (no lease for %.0f s): its queue was handed back and deleted", node, settings.LEASE_TTL)
    if failed is not None:
        raise failed
    return handed


#: What a run meets while Redis or the store is away for a while (a restart, ``LOADING`` after
#: one, a failover, a full Redis): the next run, ``HOUSEKEEPING_SECONDS`` later, does the work.
#: Celery logs the run's failure with one of these at INFO, without a traceback (the task's
#: ``throws``), and each step's line is a WARNING: an ERROR line and Celery's traceback at every
#: run of a Redis restart read as a crash, beside the lines that say Redis is down.  A Redis that
#: refuses the login or rights (:func:`redislogin.refused`) is no passing trouble: its step's line
#: stays an ERROR, with what to fix.
PASSING_ERRORS = (RedisConnectionError, RedisTimeoutError, *REFUSED_FOR_NOW, StoreUnavailable)


@app.task(name="tasks.housekeeping", ignore_result=True, throws=PASSING_ERRORS)
def housekeeping() -> dict:
    """One run; skipped while another holds ``RUN_LOCK`` (a slow run is not overlapped by the next
    one, on another process).  Each step runs whatever the one before did: a failure is raised
    after the others ran (Flower shows the run failed), so that one step failing at every run
    stops none of the others.  A Redis that refuses REDIS_URL's or BROKER_URL's login, rights or
    certificate is raised as its error's type with :func:`redislogin.refused`'s line: Celery's
    failure line says what to fix."""
    with redislogin.told_as_refusals():
        return _housekeeping()


def _housekeeping() -> dict:
    me = f"{os.getpid()}:{time.time()}"
    if not _redis.set(RUN_LOCK, me, nx=True, px=max(1, int(RUN_LOCK_PERIODS * settings.HOUSEKEEPING_SECONDS * 1000))):
        log.info("housekeeping skipped: the run that holds %s has not ended", RUN_LOCK)
        return {"skipped": True}
    try:
        now = clock.now()  # Redis's, as the ids in the redelivery window, whichever worker runs this
        result: dict = {"purged": 0}
        failed = None
        for name, step in (("redelivered", redeliver), ("reclaimed", reclaim_dead_nodes)):
            try:
                result[name] = step(now)
            except Exception as exc:  # noqa: BLE001 - raised once the other steps ran
                refused = redislogin.refused(exc, redislogin.variables_of(exc))
                level = logging.WARNING if refused is None and isinstance(exc, PASSING_ERRORS) else logging.ERROR
                log.log(level, "housekeeping: %s failed: %s", step.__name__, refused or repr(exc))
                failed = failed or exc
        if _redis.set(PURGE_LOCK, "1", nx=True, ex=PURGE_EVERY_SECONDS):
            result["purged"] = get_store().purge()
        if failed is not None:
            raise failed
        return result
    finally:
        _run_ended()
        _RELEASE(keys=[RUN_LOCK], args=[me], client=_redis)

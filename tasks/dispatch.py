"""Dispatch: route stored messages to the push nodes that hold their recipients.

Worker process only.  Collect runs it inline (:func:`route`) right after storing; the
``tasks.dispatch`` task runs it when that failed, for handed-back queues, and for redelivery.  One
Redis round trip looks up every recipient's leases; the plan (``tasks.routing.plan``) groups the
envelopes by node; one ``wsnode.deliver`` message goes to each node's own queue.  A recipient with
no live route is skipped: the message waits in the store for that user's resume.  Each routed
(message, user) is recorded as pending in Redis until acked (:mod:`tasks.pending`, the
redelivery candidates), by the lookup's own script call, so before the publish.  Dispatch is
idempotent: running it twice delivers duplicates that clients drop by id, so it runs with
``acks_late`` and transient Redis, broker or store errors are retried with backoff.  It records the ``routed`` receipts of a batch in one insert,
after the publish: a store that refuses them (a full disk) is logged and not retried, since routing
again would publish the batch again.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import warnings

import redis
from celery.exceptions import AlwaysEagerIgnored
from kombu.exceptions import OperationalError

import redisclock
import redislogin
import settings
from tasks import ids, pending, publishing, routing, wirejson
from tasks.queues import DELIVER_TASK, by_size, deliver_argsrepr, node_queue
from tasks.resultbackend import REFUSED_FOR_NOW
from tasks.store import StoreError, StoreUnavailable, get_store
from worker import app
from wsnode.registry import RouteTable

log = logging.getLogger(__name__)

_redis = redis.Redis.from_url(settings.REDIS_URL, socket_timeout=5, socket_connect_timeout=5, health_check_interval=30)
# redis-py's pool re-creates its connections after a fork, so one client per module is safe under prefork.
#: The lease table every task of this worker process reads (Dispatch, tasks.presence).
routes = RouteTable(_redis)
#: Redis's clock (:mod:`redisclock`): what this worker's message ids, late routings, replay
#: cursors and housekeeping windows are timed by, so that workers on hosts whose clocks disagree
#: still agree on them.  The worker's main process anchors it before its pool forks
#: (``worker.py``), and every pool process keeps that one anchor for good (the monotonic clock is
#: the system's): two anchors differ by up to half a round trip, and pool processes that each
#: anchored on their own made ids 8 ms out of order on a loaded machine, where the host's one
#: clock had kept them in order.  A pool process that inherits no anchor (Redis down as the
#: worker started) anchors itself once Redis answers.
clock = redisclock.SyncRedisClock(_redis, "worker", resync=None)


#: How often a worker process declares a node's queue again before publishing to it.
DECLARE_EVERY_SECONDS = 60.0
_declared_at: dict[str, float] = {}  # per process: node -> time.monotonic() of its last declaration
_declared_lock = threading.Lock()  # guards _declared_at's writes (:func:`_declared`)
#: Nodes remembered in ``_declared_at`` past which those declared ``DECLARE_EVERY_SECONDS`` ago or
#: more (which would be declared again anyway) are forgotten: node addresses change with every
#: restart on a new host or pod, and a worker process lives for months.
MAX_DECLARED_NODES = 1024


def _declared(node: str, now: float) -> None:
    """Remember that ``node``'s queue was declared at ``now`` (``time.monotonic()``).  Any thread
    of the worker process (``-P threads`` publishes on several at once): the scan of the table runs
    under a lock.  ``list(table.items())`` was not enough: another thread could still change the
    table while it was copied ("dictionary changed size during iteration", once in a CI run of the
    four-thread test).  Called once a minute per node, so the lock costs nothing that counts."""
    with _declared_lock:
        _declared_at[node] = now
        if len(_declared_at) > MAX_DECLARED_NODES:
            for stale in [name for name, at in _declared_at.items() if now - at >= DECLARE_EVERY_SECONDS]:
                del _declared_at[stale]


def _is_node_address(name: str) -> bool:
    """Whether ``name`` is a node's address (``NODE_HOST:PORT``), so its queue's and exchange's name."""
    host, _, port = name.rpartition(":")
    return bool(host) and port.isdigit()


def _forget_in_kombu(producer) -> None:
    """Forget, in kombu, the node queues ``_declared_at`` forgot.  kombu's virtual transports (the
    Redis broker's) keep per connection every exchange and binding declared through it (its
    ``BrokerState``), and the Redis channel every queue's ``x-expires``, and never forget them: a
    worker process publishing to node after node (a node's address changes when it restarts on
    another host or pod) kept about 2.9 KB per address it ever declared, 8.6 MB for 3,000.  Run
    with ``producer`` in hand (its connection is this thread's while it is); only past
    ``MAX_DECLARED_NODES`` exchanges, and only for node addresses this process no longer
    remembers, which are declared again before the next publish to them (:func:`publish`).
    RabbitMQ's transport keeps no such record."""
    connection = getattr(producer, "connection", None)
    state = getattr(getattr(connection, "transport", None), "state", None)
    exchanges = getattr(state, "exchanges", None)
    if not isinstance(exchanges, dict) or len(exchanges) <= MAX_DECLARED_NODES:
        return
    with _declared_lock:
        gone = [name for name in exchanges if name not in _declared_at and _is_node_address(name)]
    expires = getattr(getattr(producer, "channel", None), "_expires", None)
    for name in gone:
        exchanges.pop(name, None)
        for key in state.queue_index.pop(name, ()):
            state.bindings.pop(key, None)
        if isinstance(expires, dict):
            expires.pop(name, None)


@contextlib.contextmanager
def _eager_warning_off():
    """A node's deliveries go on its queue even when business code runs collect eagerly
    (``task_always_eager`` in its tests): that is what ``send_task`` does, and what is meant here,
    so its ``AlwaysEagerIgnored`` warning is kept out of their test output (only then:
    ``catch_warnings`` is not thread-safe)."""
    if not app.conf.task_always_eager:
        yield
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", AlwaysEagerIgnored)
        yield


def publish(node: str, envelopes: list[dict], producer=None, **extra) -> None:
    """Put one ``wsnode.deliver`` batch on ``node``'s queue (through ``producer`` when given: see
    :func:`publish_all`).

    The queue is declared (created if missing) once a minute per worker process, not with every
    batch: kombu caches no declaration of a queue with ``x-expires``, and on the Redis broker each
    costs round trips (a sixth of a worker process's time).  The node declares its queue itself
    whenever it connects, so a queue lost with a Redis restart is back with the node.  Celery
    sends the message through the default exchange, the queue's name as its routing key: on the
    Redis broker straight to the queue's list, whatever bindings kombu lists in Redis; on RabbitMQ
    to the queue if it exists, and nowhere (dropped, with no error) if not.  The
    message's ``argsrepr`` (what Flower shows as its arguments) is a count and the first ids
    (:func:`~tasks.queues.deliver_argsrepr`)."""
    queue = node_queue(node)
    now = time.monotonic()
    due = now - _declared_at.get(node, -DECLARE_EVERY_SECONDS) >= DECLARE_EVERY_SECONDS
    try:
        with _eager_warning_off():
            app.send_task(
                DELIVER_TASK, args=[envelopes], kwargs=extra, queue=queue, producer=producer, ignore_result=True, add_to_parent=False,
                declare=[queue] if due else [], argsrepr=deliver_argsrepr(envelopes), kwargsrepr=repr(extra),
                serializer=wirejson.SERIALIZER,
            )
    except Exception:
        with _declared_lock:
            _declared_at.pop(node, None)  # declare again with the next batch
        raise
    if due:
        _declared(node, now)
        if producer is not None:
            _forget_in_kombu(producer)


def publish_all(messages: list[tuple[str, list[dict], dict]]) -> None:
    """Publish several ``wsnode.deliver`` messages, ``(node, envelopes, kwargs)`` each, in one
    kombu publish batch: on the Redis broker that is one round trip for all of them instead of a
    transaction each.  Either all are sent or this raises (kombu discards what it had not
    flushed), and the caller routes again.  On RabbitMQ each is confirmed (:mod:`tasks.publishing`)."""
    if not messages:
        return
    with publishing.producer(app) as producer:
        if len(messages) == 1:
            node, envelopes, extra = messages[0]
            publish(node, envelopes, producer=producer, **extra)
            return
        with producer.batch():
            for node, envelopes, extra in messages:
                publish(node, envelopes, producer=producer, **extra)


def route(messages: list[dict]) -> dict[str, list[dict]]:
    """Look the recipients up, publish one batch per node, and record the ``routed`` receipts;
    returns what went where.  The messages routed late are recorded first (:func:`mark_late`):
    Collect's that it could not route at once, a dead node's handed back, and housekeeping's
    redeliveries, among which the messages stored but never routed that its sweep found."""
    mark_late(messages, clock.now())
    deliveries = ((m["id"], user) for m in messages if m["to"] != routing.BROADCAST for user in m["to"])
    # The routed deliveries become pending in the lookup's round trip, before the publish: a batch
    # lost after this is redelivered.
    found, live = routes.lookup(routing.recipients_of(messages), pending.PENDING_KEY, pending.marks(deliveries))
    per_node = routing.plan(messages, found, live)
    now = time.time()
    routed = [{"id": e["id"], "user": user, "state": "routed", "at": now} for envelopes in per_node.values() for e in envelopes if e["to"] != routing.BROADCAST for user in e["to"]]
    publish_all([(node, run, {}) for node, envelopes in per_node.items() for run in by_size(envelopes)])
    if routed:
        try:
            get_store().record_receipts(routed)
        except StoreError as exc:
            # The messages are on their nodes' queues: raising would route them again (Collect
            # hands them to tasks.dispatch, which retries eight times), each time publishing them
            # anew, ten copies to each browser while the store refuses writes (a full disk).
            # Only tasks.status loses their `routed` state.
            log.warning("the routed receipts of %d deliveries were not recorded (%s); tasks.status will not show them routed", len(routed), exc)
    return per_node


def mark_late(messages: list[dict], now: float) -> None:
    """Record in the store the ``messages`` routed at ``now`` more than ``RESUME_OVERLAP_MS`` after
    their ids' time (:meth:`tasks.store.Store.mark_late`), before their route lookup, so that a
    browser that registers its route too late for this routing reads the record when it resumes
    (:func:`tasks.replay.reach_back`).  Nearly always none: a message is routed milliseconds after
    its id is made, unless Collect could not route it (queued for ``tasks.dispatch``) or its batch
    was held.  A store that refuses the record does not stop the routing: the browsers online get
    the messages, and one that resumes from a later id may not (each stays in its user's inbox)."""
    oldest = int(now * 1000) - settings.RESUME_OVERLAP_MS
    late = [{"id": m["id"], "to": m["to"]} for m in messages if ids.timestamp_ms(m["id"]) < oldest]
    if not late:
        return
    try:
        get_store().mark_late(late, now)
    except StoreError as exc:
        log.warning("%d messages routed %.1f s or more after their ids were made could not be recorded as routed late (%s): "
                    "a browser that saw a later message and resumes from its id will not get them (they stay in the inbox)",
                    len(late), settings.RESUME_OVERLAP_MS / 1000, exc)


#: What Dispatch retries: a routing that failed for one of these can simply run again.  A Redis over
#: ``maxmemory`` refuses the lookup's pending marks (``OutOfMemoryError``) until it has room again
#: (:mod:`redisfull`), one demoted to a replica by a failover (``ReadOnlyError``) until it is
#: promoted again or its address moves to the new primary, and a replica that serves no stale data
#: (``MasterDownError``) until its primary is back (:data:`tasks.resultbackend.REFUSED_FOR_NOW`);
#: a broker over ``maxmemory`` refuses the publish, which kombu raises as ``OperationalError``.
DISPATCH_RETRYABLE = (redis.ConnectionError, redis.TimeoutError, *REFUSED_FOR_NOW, OperationalError, StoreUnavailable)


@app.task(
    name="tasks.dispatch",
    ignore_result=True,
    acks_late=True,
    autoretry_for=DISPATCH_RETRYABLE,
    retry_backoff=True,
    retry_backoff_max=30,
    max_retries=8,
)
def dispatch(messages: list[dict]) -> None:
    """Route ``messages`` ([{"id", "to", "data", "ts"}], as stored by Collect) to their nodes; those
    without ``data`` (a hand-off too big for one broker message names them only) get theirs from
    the store, and one purged meanwhile is left out.  A
    Redis that refuses REDIS_URL's or BROKER_URL's login, rights or certificate is raised as its
    error's type (retried, or not, as that) with :func:`redislogin.refused`'s line
    (:func:`redislogin.told_as_refusals`): Celery's retry line says what to fix."""
    if named := [m["id"] for m in messages if "data" not in m]:
        stored = get_store().message_data(named)
        messages = [m if "data" in m else {**m, "data": stored[m["id"]], "ts": None} for m in messages if "data" in m or m["id"] in stored]
    with redislogin.told_as_refusals():
        per_node = route(messages)
    log.debug("dispatched %d messages to %d nodes", len(messages), len(per_node))

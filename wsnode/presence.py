"""The push node's presence in Celery's monitoring: Flower, ``celery inspect``, ``celery events``.

A push node is not a Celery worker, but it consumes a Celery queue of ``wsnode.deliver`` task
messages.  This module makes it show up as one, named ``wsnode@NODE_HOST:PORT``
(:func:`node_name`):

- it answers Celery's remote control on the pidbox mailbox as a worker does (``ping``,
  ``active_queues`` -> its own queue, so Flower's Broker page lists that queue and its backlog,
  ``stats``, ``registered``, ``conf``, ``clock``, the task lists (empty: a push node runs nothing
  else), ``heartbeat``, ``enable_events``, ``disable_events``); any other command is answered with
  an error that says a push node does not do it;
- it sends ``worker-online``, then ``worker-heartbeat`` every :data:`HEARTBEAT_SECONDS` (Celery's
  interval: monitors count a worker offline after two missed beats), and ``worker-offline`` when
  it stops;
- while task events are on (off by default, as in ``worker.py``; Flower turns them on with the
  ``enable_events`` broadcast, ``celery -A worker control disable_events`` turns them off), it sends
  ``task-received``, ``task-started`` and ``task-succeeded`` (or ``task-failed``) for every
  ``wsnode.deliver`` message the node wrote to its sockets, with that message's task id, so Flower's
  Tasks page lists each delivered batch.

Pure parts (no I/O, unit-tested): :func:`node_name`, :func:`queue_info`, :func:`broker_info`,
:func:`heartbeat_fields`, :func:`task_fields`, :func:`delivered_message`, :func:`delivery_events` and
:class:`ControlPanel` (the command handlers and the task-events switch).

Threading: :class:`Presence` runs its own broker connection on its own thread ("presence-NAME"):
nothing it does, or fails to do, can block or break delivery.  The queue consumer's thread only
calls :meth:`Presence.delivered`, which counts the batch and, while task events are on, puts the
batch on a bounded queue without ever blocking (when the queue is full the batch's events are
dropped); the presence thread builds and sends the events.  While task events are on, that costs
some CPU in the node's process, as Celery's task events do in a worker.  A broken presence
connection logs a warning and is re-opened with a doubling delay (0.5 s up to 30 s); delivery
goes on meanwhile.  On RabbitMQ that connection has AMQP heartbeats (``BROKER_TIMEOUT``, as the
queue consumer's), and the replies to remote control go out on it too, not on the app's pooled
producer connection: without them a path that silently dropped the connection (a NAT or load
balancer forgetting it) left the node out of Flower and ``celery inspect`` for the quarter of an
hour TCP takes to give up, while its queue consumer had reconnected within seconds.
"""

from __future__ import annotations

import logging
import os
import platform
import queue as queue_mod
import resource
import socket
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import celery

import redislogin
import settings
from tasks.queues import DELIVER_TASK, Delivery

log = logging.getLogger(__name__)

#: Celery node name prefix: a push node appears as ``wsnode@NODE_HOST:PORT``.
NODE_NAME_PREFIX = "wsnode"

#: Seconds between ``worker-heartbeat`` events: Celery's worker default (``celery.worker.heartbeat``).
HEARTBEAT_SECONDS = 2.0

#: How long the presence thread waits for a control message before it looks at its other work.
POLL_SECONDS = 0.25

#: Delivered batches waiting for their task events; beyond this they are dropped, never waited for.
MAX_PENDING_BATCHES = 1000

#: Task events per published event message (a list, as Celery's buffered ``task.multi``).
EVENTS_PER_MESSAGE = 96

#: Sent with every worker event, as Celery's ``SOFTWARE_INFO``.
SOFTWARE_INFO = {"sw_ident": "push-wsnode", "sw_ver": celery.__version__, "sw_sys": platform.system()}

#: The headers of a Celery protocol-2 message that Celery's ``task-received`` event carries.
_RECEIVED_HEADERS = {"args": "argsrepr", "kwargs": "kwargsrepr", "root_id": "root_id", "parent_id": "parent_id",
                     "eta": "eta", "expires": "expires"}


# --- pure parts --------------------------------------------------------------------------------

def node_name(address: str) -> str:
    """The Celery node name of the push node that advertises ``address``."""
    return f"{NODE_NAME_PREFIX}@{address}"


def queue_info(queue) -> dict:
    """A kombu ``Queue`` as Celery's ``active_queues`` reply describes one."""
    return dict(queue.as_dict(recurse=True))


def broker_info(info: dict) -> dict:
    """kombu's ``Connection.info()`` for a ``stats`` reply: without the password, and without the
    alternate URLs (which may carry one), as Celery's worker strips them."""
    return {key: value for key, value in info.items() if key not in ("password", "alternates")}


def heartbeat_fields(processed: int, active: int, loadavg: Iterable[float]) -> dict:
    """The fields of a ``worker-online`` / ``worker-heartbeat`` / ``worker-offline`` event."""
    return {"freq": HEARTBEAT_SECONDS, "active": active, "processed": processed, "loadavg": list(loadavg), **SOFTWARE_INFO}


def task_fields(headers: dict) -> dict | None:
    """What the events of one node-queue message need from its Celery headers (None without an id)."""
    headers = headers or {}
    task_id = headers.get("id")
    if not task_id:
        return None
    fields = {"uuid": task_id, "name": headers.get("task") or DELIVER_TASK, "retries": headers.get("retries") or 0}
    fields.update({field: headers.get(header) for field, header in _RECEIVED_HEADERS.items()})
    return fields


@dataclass
class DeliveredMessage:
    """One ``wsnode.deliver`` message the node handled: its task fields and what it carried."""

    task: dict
    envelopes: int
    replay: bool = False


def delivered_message(delivery: Delivery) -> DeliveredMessage | None:
    """What the task events of one consumed :class:`Delivery` need (None when it has no task id)."""
    task = task_fields(getattr(delivery.message, "headers", None) or {})
    return None if task is None else DeliveredMessage(task, len(delivery.envelopes), delivery.conn is not None)


def delivery_events(message: DeliveredMessage, received: float, started: float, finished: float,
                    error: str | None = None) -> list[tuple[str, dict]]:
    """Celery's task events for one delivered message, as ``(type, fields)``: received when the
    consumer took it, started when it was handed to the loop, succeeded (or failed) once written."""
    uuid = message.task["uuid"]
    events = [
        ("task-received", {**message.task, "timestamp": received}),
        ("task-started", {"uuid": uuid, "timestamp": started}),
    ]
    if error is None:
        what = f"{message.envelopes} envelopes" + (" (replay page)" if message.replay else "")
        events.append(("task-succeeded", {"uuid": uuid, "result": what, "runtime": max(finished - started, 0.0), "timestamp": finished}))
    else:
        events.append(("task-failed", {"uuid": uuid, "exception": error, "traceback": "", "timestamp": finished}))
    return events


def ok(value) -> dict:
    return {"ok": value}


def nok(value) -> dict:
    return {"error": value}


class _Handlers(dict):
    """kombu calls ``handlers[method](state, **arguments)``; an unknown method gets an answer too."""

    def __init__(self, panel: ControlPanel, handlers: dict) -> None:
        super().__init__(handlers)
        self._panel = panel

    def __missing__(self, method: str) -> Callable:
        return lambda _state, **_kwargs: self._panel.unsupported(method)


class ControlPanel:
    """Celery remote-control commands as a push node answers them.  No I/O: it reads what it is
    given, the time and the process's resource usage.  The task-events switch is read by the queue consumer's thread (:attr:`task_events`) and
    set by the presence thread; everything else runs on the presence thread."""

    def __init__(self, hostname: str, queue, *, consuming: Callable[[], bool], prefetch: int,
                 task_events: bool = False, clock: Callable[[], int] = lambda: 0, pid: int | None = None,
                 started: float | None = None) -> None:
        self.hostname = hostname
        self.queue = queue
        self._consuming = consuming
        self._prefetch = prefetch
        self._clock = clock
        self._pid = os.getpid() if pid is None else pid
        self._started = time.monotonic() if started is None else started
        self._task_events = threading.Event()
        if task_events:
            self._task_events.set()
        #: ``wsnode.deliver`` messages handled so far (written by the loop's thread only).
        self.processed = 0
        #: The broker connection's info, for ``stats`` (set by the presence thread once connected).
        self.broker: dict = {}
        #: Set by the ``heartbeat`` command: send one now.
        self.beat_now = False

    @property
    def task_events(self) -> bool:
        return self._task_events.is_set()

    def handlers(self) -> dict:
        commands = {
            "ping": self.ping, "active_queues": self.active_queues, "stats": self.stats, "registered": self.registered,
            "active": self.no_tasks, "reserved": self.no_tasks, "scheduled": self.no_tasks, "revoked": self.no_tasks,
            "query_task": self.query_task, "conf": self.conf, "clock": self.clock, "hello": self.hello,
            "heartbeat": self.heartbeat, "enable_events": self.enable_events, "disable_events": self.disable_events,
        }
        return _Handlers(self, {name: (lambda fun: lambda _state, **kwargs: fun(**kwargs))(fun) for name, fun in commands.items()})

    def ping(self, **_) -> dict:
        return ok("pong")

    def active_queues(self, **_) -> list[dict]:
        """The node's own queue while its consumer holds a broker connection, as a worker lists its queues."""
        return [queue_info(self.queue)] if self._consuming() else []

    def registered(self, **_) -> list[str]:
        return [DELIVER_TASK]

    def no_tasks(self, **_) -> list:
        """``active``, ``reserved``, ``scheduled``, ``revoked``: a batch is written within
        milliseconds, there is no pool, no ETA and nothing to revoke."""
        return []

    def query_task(self, **_) -> dict:
        return {}

    def stats(self, **_) -> dict:
        return {
            "total": {DELIVER_TASK: self.processed},
            "pid": self._pid,
            "clock": str(self._clock()),
            "uptime": int(time.monotonic() - self._started),
            "prefetch_count": self._prefetch,
            "pool": {"implementation": "push node (Tornado IOLoop)", "max-concurrency": 1, "processes": [self._pid]},
            "broker": dict(self.broker),
            "rusage": _rusage(),
        }

    def conf(self, **_) -> dict:
        return {"node_queue": self.queue.name, "prefetch_count": self._prefetch, "heartbeat_interval": HEARTBEAT_SECONDS,
                "task_events": self.task_events}

    def clock(self, **_) -> dict:
        return {"clock": self._clock()}

    def hello(self, **_) -> None:
        """Mingle's sync request: a push node has no revoked ids to share; None is skipped by mingle."""
        return None

    def heartbeat(self, **_) -> None:
        self.beat_now = True

    def enable_events(self, **_) -> dict:
        if self._task_events.is_set():
            return ok("task events already enabled")
        self._task_events.set()
        log.info("%s: task events enabled by remote", self.hostname)
        return ok("task events enabled")

    def disable_events(self, **_) -> dict:
        if not self._task_events.is_set():
            return ok("task events already disabled")
        self._task_events.clear()
        log.info("%s: task events disabled by remote", self.hostname)
        return ok("task events disabled")

    def unsupported(self, method: str) -> dict:
        log.info("%s: remote control %r ignored: a push node is not a Celery worker", self.hostname, method)
        return nok(f"{method!r} is not supported by push node {self.hostname}: it only delivers its queue "
                   f"{self.queue.name!r}; stop it with SIGTERM (it hands its queue back to dispatch)")


def _rusage() -> dict:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return {"utime": usage.ru_utime, "stime": usage.ru_stime, "maxrss": usage.ru_maxrss}


# --- the presence thread -------------------------------------------------------------------------

class Presence:
    """Keeps a push node present in Celery's monitoring, on its own thread and broker connection.

    ``start()`` and ``stop()`` from any thread but the IOLoop's (``stop`` joins the thread);
    :meth:`delivered` from the queue consumer's thread (never blocks, never raises); the rest runs
    on the presence thread.
    """

    def __init__(self, app, hostname: str, queue, *, consuming: Callable[[], bool], prefetch: int) -> None:
        self._app = app
        self.hostname = hostname
        self.panel = ControlPanel(hostname, queue, consuming=consuming, prefetch=prefetch,
                                  task_events=bool(app.conf.worker_send_task_events), clock=lambda: app.clock.value)
        self._records: queue_mod.Queue = queue_mod.Queue(MAX_PENDING_BATCHES)
        self._dropped = 0
        self._stopping = threading.Event()
        self._node = None
        self._thread = threading.Thread(target=self._run, name=f"presence-{hostname}", daemon=True)
        #: True while the presence connection works (read from any thread).
        self.online = False
        self._served = False  # this connection attempt made the node visible (presence thread)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 3.0) -> None:
        """Send what is pending and ``worker-offline``, then close; gives up after ``timeout`` (the
        thread is a daemon: one stuck on a dead broker does not keep the process alive)."""
        self._stopping.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def delivered(self, batch: list[Delivery], received: float, started: float, finished: float,
                  error: str | None = None) -> None:
        """The consumer handled ``batch`` (``error`` says why it failed): count it and, while task
        events are on, hand it to the presence thread, which builds and sends its events (the
        batch is done with: nothing changes it any more).  The loop's thread (the only caller);
        never blocks, never raises.  (``_dropped`` is a best-effort count: a lost increment only shortens a log line.)"""
        self.panel.processed += len(batch)
        if not self.panel.task_events:
            return
        try:
            self._records.put_nowait((batch, received, started, finished, error))
        except queue_mod.Full:
            self._dropped += 1

    # --- presence thread ------------------------------------------------------------------------

    def _run(self) -> None:
        """Connect, serve, and on any failure retry with a doubling delay, which starts again at
        0.5 s once serving worked (the node was visible: a connection that broke after working is
        retried soon, as the consumer's is; one that connects and then fails at once, e.g. a broker
        user without rights to the control or event exchanges, keeps backing off); the first
        failure in a row is a warning, the next ones (the broker is still down: the consumer says
        so too) debug."""
        delay, failures = 0.5, 0
        while not self._stopping.is_set():
            self._served = False
            try:
                with self._app.connection_for_read(heartbeat=settings.BROKER_TIMEOUT) as conn:
                    conn.ensure_connection(max_retries=1)
                    self._serve(conn)
            except Exception as exc:  # noqa: BLE001 - presence must never take the node down
                if self._stopping.is_set():
                    break
                if self._served:
                    delay, failures = 0.5, 0
                failures += 1
                log.log(logging.WARNING if failures == 1 else logging.DEBUG,
                        "%s: not visible to Celery monitoring (Flower) for now (%s); retrying in %.1f s; "
                        "delivery is not affected", self.hostname, redislogin.refused(exc, ("BROKER_URL",)) or repr(exc), delay)
            finally:
                self.online = False
            self._stopping.wait(delay)
            delay = min(delay * 2, 30.0)

    def _serve(self, conn) -> None:
        self.panel.broker = broker_info(conn.info())
        channel = conn.channel()
        mailbox = self._app.control.mailbox(conn)  # a copy, bound to this connection
        mailbox._producer_pool = None  # kombu's pidbox then replies with a producer on the node's channel
        self._node = mailbox.Node(self.hostname, handlers=self.panel.handlers(), channel=channel)
        consumer = self._node.listen(channel=channel, callback=self._on_control)
        dispatcher = self._app.events.Dispatcher(conn, hostname=self.hostname, enabled=True, buffer_while_offline=False,
                                                 buffer_group=["task"], buffer_limit=EVENTS_PER_MESSAGE)
        try:
            self._beat(dispatcher, "worker-online")
            log.info("%s: visible to Celery monitoring (Flower, celery inspect); task events %s",
                     self.hostname, "on" if self.panel.task_events else "off until Flower or `celery control enable_events` asks")
            self.online = self._served = True
            next_beat = time.monotonic() + HEARTBEAT_SECONDS
            while not self._stopping.is_set():
                try:
                    conn.drain_events(timeout=POLL_SECONDS)
                except socket.timeout:
                    pass
                conn.heartbeat_check()  # AMQP: raises once the broker's heartbeats stopped coming; others: nothing
                self._send_task_events(dispatcher)
                if self.panel.beat_now or time.monotonic() >= next_beat:
                    self.panel.beat_now = False
                    self._beat(dispatcher, "worker-heartbeat")
                    next_beat = time.monotonic() + HEARTBEAT_SECONDS
            self._send_task_events(dispatcher)
            self._beat(dispatcher, "worker-offline")
        finally:
            self.online = False
            dispatcher.close()
            for close in (consumer.cancel, channel.close):
                try:
                    close()
                except Exception:  # noqa: BLE001, S110 - the connection is being closed anyway
                    pass

    def _on_control(self, body, message) -> None:
        self._app.clock.forward()
        try:
            self._node.handle_message(body, message)
        except Exception as exc:  # noqa: BLE001 - one bad command must not end the presence
            log.warning("%s: remote control %r not answered: %r", self.hostname, (body or {}).get("method"), exc)

    def _beat(self, dispatcher, kind: str) -> None:
        dispatcher.send(kind, **heartbeat_fields(self.panel.processed, 0, _loadavg()))

    def _send_task_events(self, dispatcher) -> None:
        if self._dropped:
            dropped, self._dropped = self._dropped, 0
            log.warning("%s: task events of %d delivered batches dropped (the presence connection was behind)",
                        self.hostname, dropped)
        sent = False
        while True:
            try:
                batch, received, started, finished, error = self._records.get_nowait()
            except queue_mod.Empty:
                break
            if not self.panel.task_events:
                continue
            for message in map(delivered_message, batch):
                if message is None:
                    continue
                for kind, fields in delivery_events(message, received, started, finished, error):
                    dispatcher.send(kind, **fields)
                    sent = True
        if sent:
            dispatcher.flush(errors=False, groups=True)


def _loadavg() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return [0.0, 0.0, 0.0]

"""The task events of batched ``tasks.collect`` and ``tasks.collect_many`` requests, as Celery's
worker sends them for any task, so that Flower lists every request as a task of its own:
``task-received`` (and ``task-started``, through the request) from the worker's main process as a
batch goes to the pool, and each request's ``task-succeeded``, ``-failed`` or ``-retried`` from the
pool process that ran the batch (:func:`send_outcomes`).  Only while task events are on (Flower,
or ``celery control enable_events``).  Best effort, as every task event.

Thread rules: :func:`send_received` and :func:`sends_events` run on the worker's main process;
:func:`send_outcomes` in a pool process (one of its threads in ``-P threads``, under a lock).  Its
log lines are ``tasks.collectbatches``'s, as before this module was written apart.
"""

from __future__ import annotations

import logging
import threading

from celery.utils.saferepr import saferepr

from worker import app

log = logging.getLogger("tasks.collectbatches")


def send_received(req) -> None:
    """``req``'s task-received event, with the fields Celery's worker sends (its ``default``
    strategy): the reprs the sender put in the message's headers (cut at 1 KB), rather than the
    whole kwargs of a collect_many again, and its eta and expiry, which Flower shows.  Main process."""
    if not sends_events(req):
        return  # nothing to make the fields for
    req.send_event("task-received", name=req.name, args=req.argsrepr or saferepr(req.args, app.amqp.argsrepr_maxsize),
                   kwargs=req.kwargsrepr or saferepr(req.kwargs, app.amqp.kwargsrepr_maxsize),
                   root_id=req.root_id, parent_id=req.parent_id, retries=req.request_dict.get("retries", 0),
                   eta=req.eta and req.eta.isoformat(), expires=req.expires and req.expires.isoformat())


def sends_events(request) -> bool:
    """Whether the worker sends task events for ``request`` now: Celery's ``Request.send_event``
    test, and its dispatcher's, which sends only its ``groups`` (just ``worker``, the heartbeats,
    until Flower or ``celery control enable_events`` adds ``task``).  Main process."""
    eventer = getattr(request, "_eventer", None)
    if not (eventer and eventer.enabled and request.task.send_events):
        return False
    return not eventer.groups or "task" in eventer.groups


#: The event Celery sends for each outcome but success (``task-succeeded``, with the result).
_OUTCOME_EVENT = {"failed": "task-failed", "retry": "task-retried"}
#: This pool process's sender of task events (:func:`send_outcomes`), made on first use, and
#: the lock that its users take: in the threads pool (``-P threads``) batches of ``tasks.collect``
#: and ``tasks.collect_many`` run at once on two threads, and kombu's producers and connections
#: are not safe to share between threads.
_events = None
_events_lock = threading.Lock()


def outcome_text(kind: str, value: object, most: int) -> str:
    """What a request's outcome event carries: its result's ``saferepr``, or its error's type and
    text (``value`` an exception, or already a text), at most ``most`` characters, as Celery cuts
    a result in its events.  Pure."""
    if kind == "ok":
        return saferepr(value, most)
    return (f"{type(value).__name__}: {value}" if isinstance(value, BaseException) else str(value))[:most]


def send_outcomes(task, requests, outcomes: list[tuple[str, object]], runtime: float) -> None:
    """Pool process: each request's outcome event, as the worker's main process sends it for any
    Celery task, under the worker's name, so Flower shows every request as a task of its own.
    Best effort, like every task event: one that cannot be sent is logged."""
    global _events
    with _events_lock:
        try:
            if _events is None:
                _events = task.app.events.Dispatcher(task.app.connection_for_write(), hostname=requests[0].hostname, enabled=True)
            for req, (kind, value) in zip(requests, outcomes):
                text = outcome_text(kind, value, task.resultrepr_maxsize)
                if kind == "ok":
                    _events.send("task-succeeded", uuid=req.id, result=text, runtime=runtime)
                else:
                    _events.send(_OUTCOME_EVENT.get(kind, "task-failed"), uuid=req.id, exception=text, traceback="")
        except Exception as exc:  # noqa: BLE001 - events are for watching; the batch is done
            log.warning("%s: the outcome events of %d requests not sent (%s)", task.name, len(requests), exc)
            if _events is not None:
                try:
                    _events.close()
                except Exception:  # noqa: BLE001
                    pass
            _events = None

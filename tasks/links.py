"""Links, errbacks, chains and chords on the batched collect tasks.  Worker processes only.

Celery runs what a caller attached to a task (``apply_async(link=..., link_error=...)``, the
rest of a ``chain(...)``, the body of a ``chord(...)``) from its tracer, which celery-batches does
not use, and celery-batches' :class:`~celery_batches.SimpleRequest` drops the message's ``embed``
and group headers where they travel.  So ``tasks.collect`` and ``tasks.collect_many`` keep them on
their own request (:class:`CollectRequest`, made in the worker's main process and pickled to the
pool) and apply them here, after each request's outcome, as Celery's tracer does:

- a request that succeeds counts as a part of its chord (the result backend runs the chord's body
  once every part has returned), then applies each ``link`` with its result as the first argument,
  then the next task of its chain (the rest of the chain travels with it);
- a request that fails counts as a failed part of its chord (the backend then fails the body with
  a ``ChordError``), runs its ``link_error`` errbacks and marks the rest of its chain failed: all
  through the result backend's own ``mark_as_failure``, like any Celery task's;
- a request sent again (its batch could not reach the store) keeps them all, and its caller's
  ``reply_to`` and ``ignore_result``.

They run whether or not the request's result is stored (``ignore_result``), as with Celery.  A
link that cannot be sent is logged and does not fail the request: its message is stored and
routed by then.
"""

from __future__ import annotations

import logging

from celery import group, signature, states
from celery_batches import SimpleRequest

log = logging.getLogger(__name__)


class CollectRequest(SimpleRequest):
    """celery-batches' request plus what the message's ``embed`` and headers say should follow it.
    ``chord``, ``group`` and ``group_index`` are the names Celery's backends read on a request."""

    #: Signatures to apply with the result (``link``), in order.
    callbacks: list | None = None
    #: Signatures to run on failure (``link_error``).
    errbacks: list | None = None
    #: The rest of a chain, last task first (as Celery's protocol 2 carries it).
    chain: list | None = None
    root_id: str | None = None
    parent_id: str | None = None
    #: The chord's body, when this request is a part of a chord's header.
    chord: dict | None = None
    #: The group this request belongs to, and its place in it (a chord's header is a group).
    group: str | None = None
    group_index: int | None = None
    #: The name of the task the request is of (``name`` is the sender's ``shadow`` name when it
    #: gave one, as for Celery's own request); None: ``name``.  A batch may hold requests of both
    #: collect tasks, each parsed by this.
    task_name: str | None = None

    @classmethod
    def from_request(cls, request) -> "CollectRequest":
        simple = super().from_request(request)
        simple.task_name = request.task.name
        _, _, embed = request._payload
        embed = embed or {}
        simple.callbacks = embed.get("callbacks") or None
        simple.errbacks = embed.get("errbacks") or None
        simple.chain = embed.get("chain") or None
        simple.chord = embed.get("chord") or None
        simple.root_id = request.root_id
        simple.parent_id = request.parent_id
        simple.group = request.group
        simple.group_index = request.group_index
        return simple


def chord_part_done(app, req, retval) -> None:
    """Count ``req``, which succeeded with ``retval``, as a returned part of its chord, if it is
    one (what ``mark_as_done`` does for any task; with Celery's Redis backend the last part to
    return sends the chord's body)."""
    if getattr(req, "chord", None) is None:
        return
    try:
        app.backend.on_chord_part_return(req, states.SUCCESS, retval)
    except Exception:  # noqa: BLE001 - the message is stored and routed; only the chord's body is lost
        log.exception("%s %s: its chord's body could not be sent", req.name, req.id)


def apply_followers(app, req, retval) -> None:
    """Apply ``req``'s links with ``retval``, then the next task of its chain (what Celery's
    tracer does for a task that succeeded: ``_dispatch_callbacks_and_chain`` in
    ``celery.app.trace``)."""
    callbacks = getattr(req, "callbacks", None)
    chain = getattr(req, "chain", None)
    if not (callbacks or chain):
        return
    options = {"parent_id": req.id, "root_id": getattr(req, "root_id", None) or req.id}
    try:
        if callbacks:
            sigs = [signature(callback, app=app) for callback in callbacks]
            for grouped in (s for s in sigs if isinstance(s, group)):
                grouped.apply_async((retval,), **options)
            single = [s for s in sigs if not isinstance(s, group)]
            if len(single) == 1:
                single[0].apply_async((retval,), **options)
            elif single:
                group(single, app=app).apply_async((retval,), **options)
        if chain:
            signature(chain[-1], app=app).apply_async((retval,), chain=chain[:-1], **options)
    except Exception:  # noqa: BLE001 - the message is stored and routed; only what follows it is lost
        log.exception("%s %s: its link or the rest of its chain could not be sent", req.name, req.id)


def retry_options(req) -> dict:
    """What a request sent again must carry so that its links, errbacks and chain still follow,
    it still counts as the same part of its chord, it still expires when it was to (and keeps its
    priority, its stamps and its shadow name), and its result still goes where its caller waits: the ``reply_to`` queue of the
    ``rpc://`` backend (kept by Celery's own retry too; it named the worker's own, so the caller
    never got its ids), and nowhere when it was sent with ``ignore_result`` (the README promises
    no result then)."""
    options = {}
    if getattr(req, "reply_to", None):
        options["reply_to"] = req.reply_to
    if getattr(req, "ignore_result", False):
        options["ignore_result"] = True
    if getattr(req, "callbacks", None):
        options["link"] = req.callbacks
    if getattr(req, "errbacks", None):
        options["link_error"] = req.errbacks
    if getattr(req, "chain", None):
        options["chain"] = req.chain
    if getattr(req, "chord", None):
        options["chord"] = req.chord
    for name, option in (("root_id", "root_id"), ("parent_id", "parent_id"), ("group", "group_id"), ("group_index", "group_index")):
        if getattr(req, name, None) is not None:
            options[option] = getattr(req, name)
    # Kept as Celery's own retry keeps them: a request sent again without its ``expires`` was
    # stored and delivered once the store was back, however long after it expired.
    request_dict = getattr(req, "request_dict", None) or {}
    if (expires := request_dict.get("expires")) is not None:
        options["expires"] = expires
    if (priority := (getattr(req, "delivery_info", None) or {}).get("priority")) is not None:
        options["priority"] = priority
    # Also as Celery's retry (``Context.as_execution_options``): without its stamps a request sent
    # again was no longer revoked by ``revoke_by_stamped_headers``, and without its shadow it showed
    # under its task's name.  Celery sends each stamp as the option of its header's name.
    stamped, stamps = request_dict.get("stamped_headers"), request_dict.get("stamps")
    if stamped and isinstance(stamps, dict):
        options["stamped_headers"] = list(stamped)
        options.update({name: stamps.get(name) for name in stamped})
    if isinstance(shadow := request_dict.get("shadow"), str):
        options["shadow"] = shadow
    return options

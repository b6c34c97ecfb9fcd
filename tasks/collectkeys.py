"""The idempotency keys of ``tasks.collect`` and ``tasks.collect_many`` requests: what a request
whose key was used before is told, whether a stored message is the one a request carries again,
and when a key whose first run stored nothing is bound to new ids.

A request binds its key (the ``key`` business code gives ``tasks.collect``, else its task id after
:data:`TASK_KEY_PREFIX`) to its messages' ids in the store before it stores them
(:func:`tasks.collect._persist_and_dispatch_groups`).  All here is pure but :func:`_claim_afresh`,
which reads the store and binds keys again in it.  Worker process (a batch's, in the pool); any
thread.  Its log lines are ``tasks.collect``'s, as before this module was written apart.
"""

from __future__ import annotations

import logging
import time

from tasks import messages as validation
from tasks.storedocs import as_stored

log = logging.getLogger("tasks.collect")


#: The idempotency key of a request without a ``key`` of its own: its task id, after this.
TASK_KEY_PREFIX = "task:"


def key_reused(key: str, before: int, now: int) -> validation.InvalidMessage:
    """The error of a request whose idempotency key was bound before to another number of
    messages: a ``key`` the caller gave, or (``task:...``) the task id it chose.  Pure."""
    fix = "send each new request with a new task id (Celery's default: leave task_id unset)" if key.startswith(TASK_KEY_PREFIX) else "use a new key per task"
    return validation.InvalidMessage(f"idempotency key {key!r} was used before for {before} message(s), not {now}: {fix}")


def same_message(stored: dict, message: validation.Message) -> bool:
    """Whether the stored ``{"to", "data"}`` is ``message`` (recipients in any order).  Pure."""
    if message.to == validation.BROADCAST or stored["to"] == validation.BROADCAST:
        same_to = message.to == stored["to"]
    else:
        same_to = set(message.to) == set(stored["to"])
    return same_to and same_json(stored["data"], as_stored(message.data))


def _json_kind(value: object) -> str:
    """A value's JSON type, telling ``true`` from ``1`` and ``1`` from ``1.0`` (the store gives
    64-bit integers back as ``bson.Int64``, an int).  Pure."""
    return "bool" if isinstance(value, bool) else "int" if isinstance(value, int) else "float" if isinstance(value, float) else \
        "object" if isinstance(value, dict) else "array" if isinstance(value, (list, tuple)) else type(value).__name__


def same_json(a: object, b: object) -> bool:
    """Whether ``a`` and ``b`` are the same JSON value, object keys in any order.  Python's ``==``
    says ``true`` is ``1``, ``1`` is ``1.0`` and ``-0.0`` is ``0.0``: a key reused with such other
    data was taken as a retry of the same message and its warning never logged.  Pure."""
    if _json_kind(a) != _json_kind(b):
        return False
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same_json(a[key], b[key]) for key in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same_json(x, y) for x, y in zip(a, b))
    if isinstance(a, float):
        return repr(a) == repr(b)
    return a == b


def key_reused_for_another(key: str, message_id: str) -> str:
    """The warning for a request whose idempotency key names a stored message other than its own
    (other recipients or data): what happened, and the fix.  Pure."""
    if key.startswith(TASK_KEY_PREFIX):
        named = f"task id {key[len(TASK_KEY_PREFIX):]!r}"
        fix = "send each new request with a new task id (Celery's default: leave task_id unset)"
    else:
        named = f"key {key.removeprefix('key:')!r}"
        fix = "give each message a key of its own"
    return (f"{named} was used before for message {message_id}, to other recipients or with other data: "
            f"that message was sent again and this request's was not stored; {fix}")


#: A key bound this long ago to ids none of which is stored belongs to a run that failed or died
#: between the two writes (each store operation gives up after 5 s): any run of the request may
#: bind it anew.  Also the longest a request the worker sends again itself (which may bind anew at
#: once) takes, five retries with backoff, to fail (README: the caller then sends it again).
STALE_CLAIM_SECONDS = 30.0


def _claim_afresh(store, wanted: list[tuple[str, list[str]]], claimed: list[list[str]], retried) -> list[list[str]]:
    """``claimed``, with the keys whose earlier ids are none of them stored bound to this run's
    ids (``wanted``) instead: a key of ``retried`` at once, any other once it was claimed
    ``STALE_CLAIM_SECONDS`` ago.

    Such a request's first run claimed its key and then could not store its messages (the store
    unavailable, or its worker killed between the two writes).  Stored now under that run's ids,
    up to minutes old, they would fall before the ``since`` of a device that saw a message stored
    meanwhile and resumes from it: the replay (which reaches ``RESUME_OVERLAP_MS`` back) skipped
    them.  Their new ids are from now, and no caller saw the old ones (a request's ids are its
    result, stored once it succeeds).  A request this worker sent again (:func:`tasks.collect._retry`) may at
    once: the run that sent it has ended, so none is about to store the old ids.  Any other
    (redelivered after its worker died, or sent again by business code after it failed) only once
    the claim is too old to be a run still between its two writes."""
    stale: dict[str, tuple[list[str], list[str]]] = {}
    for (key, mine), bound in zip(wanted, claimed):
        if key not in stale and bound != mine and len(bound) == len(mine):
            stale[key] = (bound, mine)
    if not stale:
        return claimed
    stored = store.messages([mid for old, _ in stale.values() for mid in old], {"_id": 1})
    cutoff = time.time() - STALE_CLAIM_SECONDS
    tried = [(key, old, new, None if key in retried else cutoff) for key, (old, new) in stale.items() if not any(mid in stored for mid in old)]
    if not tried:
        return claimed
    rebound = store.rebind_keys(tried)
    for key in rebound:
        log.info("idempotency key %r: its first run stored none of its messages (%s); bound to new ids from now (%s)",
                 key, ", ".join(stale[key][0]), ", ".join(stale[key][1]))
    current = {key: stale[key][1] for key in rebound}
    # A key another run rebound first (the compare-and-set lost), or claimed too recently: its ids
    # as they are now, which may be that other run's (not the old ones, which that run no longer
    # stores: two ids for one message, delivered twice).
    lost = [(key, new) for key, _, new, _ in tried if key not in rebound]
    current.update(zip((key for key, _ in lost), store.claim_many(lost)))
    return [current.get(key, bound) for (key, _), bound in zip(wanted, claimed)]

"""Receipts: record what browsers acknowledged.  Worker process only.

Push nodes batch the ``{"type": "ack"}`` frames they receive and send them here every
``RECEIPT_FLUSH_SECONDS`` or ``RECEIPT_BATCH`` acks; one task is one ``insert_many`` of appended
records, so a retry is harmless (duplicates are ignored by id).
"""

from __future__ import annotations

import logging
import time

import redis

from tasks import pending
from tasks.dispatch import _redis
from tasks.ids import is_message_id
from tasks.messages import InvalidMessage, check_user_id
from tasks.store import StoreUnavailable, get_store
from worker import app

log = logging.getLogger(__name__)

STATES = ("written", "acked")
#: How far a receipt's time may be from the worker's clock (nodes' clocks drift; a receipt waits in
#: a node, or in the broker while the workers are down).  Beyond it the receipt is refused: a time
#: far ahead kept the embedded store from purging any receipt.
MAX_CLOCK_GAP_SECONDS = 86400.0


def parse_receipts(items: object, now: float) -> tuple[list[dict], list[str]]:
    """The well-formed receipts of a ``tasks.receipts`` (``{"id": a message id, "user": a user id,
    "state": "written" or "acked", "at": unix seconds within MAX_CLOCK_GAP_SECONDS of ``now``}``),
    and a description of each one left out.  An ack may carry its delivery's write too
    (``"written": unix seconds``, as a node sends an ack that came before it flushed the write's
    receipt: :class:`wsnode.receipts.ReceiptBuffer`): that is two receipts, the written one first.  Pure."""
    good, bad = [], []
    for item in items if isinstance(items, list) else [items]:
        problem = _receipt_problem(item, now)
        if problem is None and "written" in item:
            problem = _time_problem("written", item["written"], now) if item["state"] == "acked" else "only an ack carries a written time"
            if problem is None:
                good.append({"id": item["id"], "user": item["user"], "state": "written", "at": item["written"]})
        if problem is None:
            good.append(item)
        else:
            bad.append(f"{item!r:.120} ({problem})")
    return good, bad


def _receipt_problem(item: object, now: float) -> str | None:
    if not isinstance(item, dict):
        return "not an object"
    if not is_message_id(item.get("id")):
        return "id is not a message id"
    try:
        check_user_id(item.get("user"), "user")
    except InvalidMessage as exc:
        return str(exc)
    if item.get("state") not in STATES:
        return f"state is not one of {STATES}"
    return _time_problem("at", item.get("at"), now)


def _time_problem(name: str, at: object, now: float) -> str | None:
    # Compared, not subtracted: JSON's integers have any size, and one too large for a float made
    # math.isfinite and at - now raise OverflowError (the whole batch failed).  NaN compares false.
    if isinstance(at, bool) or not isinstance(at, (int, float)) or not now - MAX_CLOCK_GAP_SECONDS <= at <= now + MAX_CLOCK_GAP_SECONDS:
        return f"{name} is not a unix time within a day of the worker's clock"
    return None


@app.task(name="tasks.receipts", ignore_result=True, autoretry_for=(StoreUnavailable,), retry_backoff=True, max_retries=8)
def receipts(receipts: list[dict]) -> int:
    """``receipts``: [{"id": message id, "user": ..., "state": "acked", "at": unix seconds}].
    Acked deliveries also stop being redelivery candidates (:mod:`tasks.pending`).  A malformed
    item is logged and left out (it used to fail the whole batch, and its good acks with it)."""
    receipts, bad = parse_receipts(receipts, time.time())
    for item in bad:
        log.error("tasks.receipts: dropped a malformed receipt %s", item)
    recorded = get_store().record_receipts(receipts)
    try:
        pending.remove(_redis, [(r["id"], r["user"]) for r in receipts if r["state"] == "acked"])
    except redis.RedisError as exc:  # housekeeping checks the store's receipts before it redelivers
        log.warning("%d acks recorded but still listed as pending (%s)", len(receipts), exc)
    return recorded

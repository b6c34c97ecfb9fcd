"""Receipts: record what browsers acknowledged.  Worker process only.

Push nodes batch the ``{"type": "ack"}`` frames they receive and send them here every
``RECEIPT_FLUSH_SECONDS`` or ``RECEIPT_BATCH`` acks; one task is one ``insert_many`` of appended
records, so a retry is harmless (duplicates are ignored by id).
"""

from __future__ import annotations

import logging

import redis

from tasks import pending
from tasks.dispatch import _redis
from tasks.store import StoreUnavailable, get_store
from worker import app

log = logging.getLogger(__name__)


@app.task(name="tasks.receipts", ignore_result=True, autoretry_for=(StoreUnavailable,), retry_backoff=True, max_retries=8)
def receipts(receipts: list[dict]) -> int:
    """``receipts``: [{"id": message id, "user": ..., "state": "acked", "at": unix seconds}].
    Acked deliveries also stop being redelivery candidates (:mod:`tasks.pending`)."""
    recorded = get_store().record_receipts(receipts)
    try:
        pending.remove(_redis, [(r["id"], r["user"]) for r in receipts if r["state"] == "acked"])
    except redis.RedisError as exc:  # housekeeping checks the store's receipts before it redelivers
        log.warning("%d acks recorded but still listed as pending (%s)", len(receipts), exc)
    return recorded

"""Receipts: record what browsers acknowledged.  Worker process only.

Push nodes batch the ``{"type": "ack"}`` frames they receive and send them here every
``RECEIPT_FLUSH_SECONDS`` or ``RECEIPT_BATCH`` acks; one task is one ``insert_many`` of appended
records, so a retry is harmless (duplicates are ignored by id).
"""

from __future__ import annotations

from tasks.store import StoreUnavailable, get_store
from worker import app


@app.task(name="tasks.receipts", ignore_result=True, autoretry_for=(StoreUnavailable,), retry_backoff=True, max_retries=8)
def receipts(receipts: list[dict]) -> int:
    """``receipts``: [{"id": message id, "user": ..., "state": "acked", "at": unix seconds}]."""
    return get_store().record_receipts(receipts)

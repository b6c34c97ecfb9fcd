"""Revoking a collect, and its ``expires``, on a real worker: a ``tasks.collect`` revoked before
it runs, or past its ``expires``, is not stored or delivered and ends REVOKED, as any Celery task
(``CollectBatches.flush``).  Business code here knows the tasks by name only."""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta, timezone

import pytest
from celery.exceptions import TaskRevokedError


async def state_of(cluster, task_id: str, timeout: float = 20.0) -> str:
    """The task's state once it is no longer PENDING (or PENDING after ``timeout``)."""
    result = cluster.business.AsyncResult(task_id)
    for _ in range(int(timeout / 0.1)):
        if result.state != "PENDING":
            break
        await asyncio.sleep(0.1)
    return result.state


async def test_a_collect_past_its_expires_is_not_delivered_and_ends_revoked(cluster):
    client = await cluster.connect("expiring")
    stale = cluster.business.send_task("tasks.collect", kwargs={"to": "expiring", "data": "stale"}, queue="collect",
                                       expires=datetime.now(timezone.utc) - timedelta(seconds=1))
    await cluster.collect("expiring", "fresh")
    frames = await client.messages(1) + await client.quiet(1.0)
    assert [f["data"] for f in frames] == ["fresh"]
    assert await state_of(cluster, stale.id) == "REVOKED"
    with pytest.raises(TaskRevokedError):
        await cluster.result(stale, 5)
    client.close()


async def test_a_collect_revoked_during_its_countdown_is_not_delivered(cluster):
    client = await cluster.connect("cancelled")
    app = cluster.business
    kept = app.send_task("tasks.collect", kwargs={"to": "cancelled", "data": "kept"}, queue="collect", countdown=2)
    cancelled = app.send_task("tasks.collect", kwargs={"to": "cancelled", "data": "cancelled"}, queue="collect", countdown=2)
    await asyncio.to_thread(app.control.revoke, cancelled.id)
    kept_id = await cluster.result(kept, 20)
    frames = await client.messages(1) + await client.quiet(1.0)
    assert [(f["id"], f["data"]) for f in frames] == [(kept_id, "kept")]
    assert await state_of(cluster, cancelled.id) == "REVOKED"
    client.close()

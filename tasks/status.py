"""``tasks.status``: what happened to a message, for business code.  Worker process only.

``send_task("tasks.status", args=["<message id>"], queue="dispatch").get()`` returns::

    {"id": ..., "found": True, "to": [...] | "*", "collected_at": <unix s>,
     "recipients": {"alice": {"routed": <unix s>, "written": <unix s>, "acked": <unix s>}, ...}}

A state is absent until it happened: ``routed`` when Dispatch sent it to the user's node,
``written`` when the node wrote it to one of the user's sockets, ``acked`` when a device acked it.
Broadcasts list the users that got them.  An unknown or purged id gives ``{"id": ..., "found": False}``.
"""

from __future__ import annotations

from tasks.ids import id_problem
from tasks.messages import InvalidMessage, checked_arguments
from tasks.store import StoreUnavailable, get_store
from worker import app


# throws: a caller's bad id is logged as Celery logs an expected error (INFO, one line), not as a
# worker ERROR with a traceback; the task still fails with it.
@app.task(name="tasks.status", autoretry_for=(StoreUnavailable,), retry_backoff=True, max_retries=3, throws=(InvalidMessage,))
@checked_arguments("tasks.status")
def status(message_id: str) -> dict:
    if (problem := id_problem(message_id)) is not None:
        raise InvalidMessage(f"{message_id!r:.60} is not a message id ({problem}): pass the id tasks.collect returned, as it returned it")
    found = get_store().status(message_id)
    return {"id": message_id, "found": False} if found is None else dict(found, found=True)

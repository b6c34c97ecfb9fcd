"""The request of every task the worker runs: Celery's, refused as it is made when its eta parses
but is no time the worker's clock holds (:class:`Request`), and when an eta is due on that clock
(:func:`eta_timestamp`, which ``tasks.collect``'s held requests wait on too).

Celery's strategy logged such an eta with a traceback and ran a plain task at once, its eta
ignored; celery-batches rejected a collect and logged it only.  Refused here with
``InvalidTaskError``, the failure is stored and its task events sent by the worker's consumer
(:class:`tasks.taskmessages.Consumer`).  The plain tasks' request (:class:`tasks.lost.Request`)
extends this one, and ``tasks.collect``'s is it (``tasks.collectbatches.CollectBatches.Request``).

Worker main process (Celery makes a request on its event loop as the message is read); nothing is
shared between requests.
"""

from __future__ import annotations

from celery.exceptions import InvalidTaskError
from celery.utils.time import timezone
from celery.worker.request import Request as CeleryRequest
from kombu.asynchronous.timer import to_timestamp


def eta_timestamp(eta, utc: bool, app_timezone) -> float:
    """When a request whose ``eta`` (an aware datetime, as Celery's request reads it) is due, on
    the worker timer's clock, as Celery's strategy converts it (``utc``: the request's).  Raises
    OverflowError or ValueError for an eta that parses but is no time that clock holds (the year
    1 east of UTC).  Pure but for reading the clocks."""
    if utc:
        return to_timestamp(timezone.to_system(eta))
    return to_timestamp(eta, app_timezone)


class Request(CeleryRequest):
    """Celery's request of any task (the plain tasks' :class:`tasks.lost.Request` and
    ``tasks.collect``'s), refused as it is made when its eta parses but is no time the worker's
    clock holds: ``InvalidTaskError``, as Celery refuses an eta it cannot parse, so that
    :class:`~tasks.taskmessages.Consumer` stores the failure where its caller waits and sends its
    task events (:meth:`~tasks.taskmessages.Consumer.on_invalid_task`).  Celery's strategy logged it
    with a traceback and ran a plain task at once, its eta ignored; celery-batches rejected a
    collect and logged it only.
    Worker main process."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self._eta is not None:
            try:
                eta_timestamp(self._eta, self._utc, self._app.timezone)
            except (OverflowError, ValueError) as exc:
                raise InvalidTaskError(f"its eta {self._eta.isoformat()} cannot be read as a time ({exc}): "
                                       "send a countdown, or an eta within the years 1 to 9999 in UTC") from exc

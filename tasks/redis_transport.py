"""kombu's Redis transport, with one redis-py client object per channel instead of one per use.

kombu's Redis channel builds a new ``redis.Redis`` object every time it sends a group of
commands (``Channel.conn_or_acquire``): to record a task it delivered as unacknowledged, to
acknowledge it, for every publish batch, for every queue declaration.  The object is only a handle
on the channel's connection pool, but redis-py 8 fills a table of about 170 response callbacks in
each one, which costs about 0.15 ms of CPU on a fast machine (0.16 ms measured on the 2-core VM of
``bench/README.md``).  A worker's main process builds two of them per task it receives, and in
single-message mode that was about a quarter of its CPU per message.

:class:`Channel` builds that handle once, on first use, and hands the same one out ever after;
everything else is kombu's.  It is safe because kombu only calls commands and makes pipelines on
it (each takes a connection from the pool and gives it back) and never changes it; the channel's
own long-lived clients (``client`` for ``BRPOP``, ``subclient`` for pub/sub) are untouched.

``worker.py`` selects it (Celery's ``broker_transport``) when ``BROKER_URL`` is ``redis://``, for
every process that uses the app: workers, push nodes, Flower.  ``rediss://`` and ``amqp://`` keep
kombu's own transports (:func:`transport_for`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from kombu.transport import redis as kombu_redis

#: What Celery's ``broker_transport`` names for a ``redis://`` broker.
TRANSPORT = f"{__name__}:Transport"


def transport_for(broker_url: str) -> str | None:
    """The transport to configure for ``broker_url``: this module's for ``redis://``, else None
    (kombu picks its own from the URL).  Pure."""
    return TRANSPORT if broker_url.startswith("redis://") else None


class Channel(kombu_redis.Channel):
    _command_client = None

    @contextmanager
    def conn_or_acquire(self, client=None) -> Iterator:
        if client:
            yield client
            return
        if self._command_client is None:
            self._command_client = self._create_client()
        yield self._command_client


class Transport(kombu_redis.Transport):
    Channel = Channel

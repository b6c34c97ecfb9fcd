"""kombu's Redis transport, with one redis-py client object per channel instead of one per use.

kombu's Redis channel builds a new ``redis.Redis`` object every time it sends a group of
commands (``Channel.conn_or_acquire``): to record a task it delivered as unacknowledged, to
acknowledge it, for every publish batch, for every queue declaration.  The object is only a handle
on the channel's connection pool, but redis-py 8 fills a table of about 170 response callbacks in
each one, which costs about 0.15 ms of CPU on a fast machine (0.16 ms measured on the 2-core VM of
``bench/README.md``).  A worker's main process builds two of them per task it receives, and in
single-message mode that was about 30% of its CPU per message (``bench/README.md``).

:class:`Channel` builds that handle once, on first use, and hands the same one out ever after;
everything else is kombu's.  It is safe because kombu only calls commands and makes pipelines on
it (each takes a connection from the pool and gives it back) and never changes it; the channel's
own long-lived clients (``client`` for ``BRPOP``, ``subclient`` for pub/sub) are untouched.

``worker.py`` installs it (:func:`install`) as kombu's transport for ``redis://`` URLs, in every
process that imports the app: workers, push nodes, Flower (``celery -A worker flower``).  It
replaces the ``redis`` entry of kombu's alias table (``kombu.transport.TRANSPORT_ALIASES``), not
Celery's ``broker_transport`` setting: with the alias, connection URLs stay ``redis://...``, which
is what Flower's Broker page reads to find the queues (a class path there became the URL's
scheme, and the page answered 404).  ``rediss://`` and ``amqp://`` keep kombu's own transports.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import kombu.transport
from kombu.transport import redis as kombu_redis

#: kombu's alias that :func:`install` points at :class:`Transport`.
ALIAS = "redis"


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


def install() -> None:
    """Make ``redis://`` connections of this process use :class:`Transport`; idempotent.  Call it
    before the first broker connection: kombu caches the class of each alias on first use, so
    the cached entry is dropped too."""
    kombu.transport.TRANSPORT_ALIASES[ALIAS] = f"{__name__}:Transport"
    kombu.transport._transport_cache.pop(ALIAS, None)

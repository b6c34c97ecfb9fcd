"""The producer of the platform's own data messages: with publisher confirms on RabbitMQ.

What the workers and nodes publish that carries messages or their receipts goes through
:func:`producer`: Dispatch's ``wsnode.deliver`` batches (live and replay pages), Collect's hand-off
to ``tasks.dispatch`` and its retries of a request, housekeeping's hand-back of a dead node's queue,
and a node's ``tasks.receipts`` and ``tasks.replay_many``.  On RabbitMQ these producers' connections
have ``confirm_publish``: a publish returns once RabbitMQ acked it.  Without it a publish returned
once its bytes were written to the socket, and a connection that died a moment later lost the
message without an error (``tests/integration/test_publish_confirms.py``).  A publish that is not
confirmed raises, kombu sends it again on a new connection (Celery's
``task_publish_retry_policy``), and then it raises ``OperationalError``, which the callers retry.

Everything else keeps the app's own producers, without confirms: the task events Flower reads and
the replies to its remote-control commands are sent from the worker's main process, one publish
per event, and waiting for each ack there would hold its event loop (about 0.14 ms per event on
the 2-core VM of bench/README.md, and ``read_timeout`` per try under a RabbitMQ memory alarm).

On the Redis broker a publish already waits for Redis's reply: :func:`producer` is the app's own.

Any thread: kombu's producer pools are thread-safe.  A pool is made per process (the worker's pool
processes are forked).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

from kombu import pools

#: Transports whose publishes need confirms to be known received (py-amqp, librabbitmq).
CONFIRMING_TRANSPORTS = ("amqp", "pyamqp", "amqps", "librabbitmq")

#: (pid, id(app)) -> the app's confirming producer pool, or None on a broker that needs none.
_pools: dict[tuple[int, int], object] = {}


def confirms(app) -> bool:
    """Whether ``app``'s broker is RabbitMQ, whose publishes :func:`producer` confirms."""
    return app.connection_for_write().transport_cls in CONFIRMING_TRANSPORTS


def _confirming_pool(app):
    key = (os.getpid(), id(app))
    if key not in _pools:
        pool = None
        if confirms(app):
            pool = pools.producers[app.connection_for_write(transport_options={"confirm_publish": True})]
            pool.limit = app.pool.limit
        _pools[key] = pool
    return _pools[key]


@contextlib.contextmanager
def producer(app) -> Iterator[object]:
    """A producer for the platform's data messages, from a pool (``with producer(app) as p:
    app.send_task(..., producer=p)``): on RabbitMQ one whose connection confirms every publish,
    elsewhere the app's own."""
    pool = _confirming_pool(app)
    with (app.producer_or_acquire() if pool is None else pool.acquire(block=True)) as chosen:
        yield chosen

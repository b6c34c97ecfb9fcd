"""The queue topology, shared by the worker (which publishes) and the push nodes (which consume).

Pure: builds kombu objects, touches no connection.

- ``collect``: business messages (``tasks.collect``, ``tasks.collect_many``), and receipts.
- ``dispatch``: routing (``tasks.dispatch``) and resume requests (``tasks.replay``).
- one queue per push node, named by the address the node advertises (``NODE_HOST:PORT``), carrying
  ``wsnode.deliver`` messages: a batch of envelopes for the users that node holds.  A node queue
  left behind by a dead node expires on RabbitMQ (``x-expires``); on Redis it is bounded by the
  fact that Dispatch stops routing to a node once its lease is gone.
"""

from __future__ import annotations

from kombu import Exchange, Queue

COLLECT_QUEUE = "collect"
DISPATCH_QUEUE = "dispatch"

#: Name of the task a push node consumes from its own queue; the node, not a Celery worker, runs it.
DELIVER_TASK = "wsnode.deliver"

#: A node queue with no consumer for this long is deleted by RabbitMQ (milliseconds).
NODE_QUEUE_EXPIRES_MS = 10 * 60 * 1000


def node_address(host: str, port: int) -> str:
    return f"{host}:{port}"


def node_queue(address: str) -> Queue:
    """The queue of the push node that advertises ``address``; declared alike on both sides."""
    return Queue(
        address,
        Exchange(address, type="direct"),
        routing_key=address,
        durable=True,
        queue_arguments={"x-expires": NODE_QUEUE_EXPIRES_MS},
    )

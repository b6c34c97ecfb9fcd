"""The queue topology and the node-queue message format, shared by the worker (which publishes)
and the push nodes (which consume).

Pure: builds kombu objects and parses messages, touches no connection.

- ``collect``: business messages (``tasks.collect``, ``tasks.collect_many``).
- ``dispatch``: routing (``tasks.dispatch``), replays (``tasks.replay_many``, ``tasks.replay``), receipts
  (``tasks.receipts``), ``tasks.status``, ``tasks.presence`` and ``tasks.housekeeping``: short tasks that must not wait
  behind a backlog of business messages.
- one queue per push node, named by the address the node advertises (``NODE_HOST:PORT``), carrying
  ``wsnode.deliver`` messages: a batch of envelopes for the users that node holds.  A node queue
  left behind by a dead node expires on RabbitMQ (``x-expires``); on Redis it is bounded by the
  fact that Dispatch stops routing to a node once its lease is gone.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

from kombu import Exchange, Queue

import settings
from tasks import wirejson
from tasks.messages import MAX_USER_ID_CHARS
from tasks.routing import BROADCAST

COLLECT_QUEUE = "collect"
DISPATCH_QUEUE = "dispatch"

#: Name of the task a push node consumes from its own queue; the node, not a Celery worker, runs it.
DELIVER_TASK = "wsnode.deliver"

#: A node queue with no consumer for this long is deleted by RabbitMQ (milliseconds).
NODE_QUEUE_EXPIRES_MS = 10 * 60 * 1000


def node_address(host: str, port: int) -> str:
    return f"{host}:{port}"


@functools.lru_cache(maxsize=1024)
def node_queue(address: str) -> Queue:
    """The queue of the push node that advertises ``address``; declared alike on both sides.
    One object per address, so that kombu's cache of declared queues spares a declaration per
    publish."""
    return Queue(
        address,
        Exchange(address, type="direct"),
        routing_key=address,
        durable=True,
        queue_arguments={"x-expires": NODE_QUEUE_EXPIRES_MS},
    )


#: Message ids named in a ``wsnode.deliver``'s ``argsrepr``.
ARGSREPR_IDS = 3


def deliver_argsrepr(envelopes: list[dict]) -> str:
    """What Flower shows as a ``wsnode.deliver``'s arguments: the envelope count and the first
    message ids, instead of Celery's repr of every envelope (which costs a worker more than the
    publish itself).  Pure."""
    ids = [str(e.get("id")) for e in envelopes[:ARGSREPR_IDS]]
    more = ", ..." if len(envelopes) > ARGSREPR_IDS else ""
    return f"[<{len(envelopes)} envelope{'' if len(envelopes) == 1 else 's'}: {', '.join(ids)}{more}>]"


@dataclass
class Delivery:
    """One ``wsnode.deliver`` message: envelopes, and for a replay its connection and page info."""

    envelopes: list[dict]
    conn: str | None = None
    replay: dict | None = None
    message: object = field(default=None, repr=False)


class BadDelivery(ValueError):
    """A message on the node queue that is not a well-formed ``wsnode.deliver`` task."""


def parse_delivery(headers: dict, body: object) -> Delivery:
    """Check a decoded Celery protocol-2 message.  Pure."""
    task = (headers or {}).get("task")
    if task != DELIVER_TASK:
        raise BadDelivery(f"task {task!r} on a node queue: only {DELIVER_TASK} belongs here")
    if not (isinstance(body, (list, tuple)) and len(body) >= 2 and isinstance(body[0], (list, tuple)) and len(body[0]) == 1):
        raise BadDelivery("body is not [[envelopes], kwargs, embed]")
    envelopes, kwargs = body[0][0], body[1] or {}
    if not isinstance(kwargs, dict):
        raise BadDelivery("kwargs must be an object")
    if not isinstance(envelopes, list) or not all(isinstance(e, dict) and isinstance(e.get("id"), str) and "data" in e for e in envelopes):
        raise BadDelivery("envelopes must be a list of objects with a string id and data")
    conn, replay = kwargs.get("conn"), kwargs.get("replay")
    if conn is None:
        if not all(_recipients_ok(e.get("to")) for e in envelopes):
            raise BadDelivery("a live envelope needs to: a list of user ids (strings) or '*'")
    elif not isinstance(conn, str):
        raise BadDelivery("conn must be a connection id (a string)")
    elif not (replay is None or isinstance(replay, dict) and _count_ok(replay.get("count", 0))):
        raise BadDelivery("replay must be an object whose count is a whole number")
    # Checked here, whole, because the node writes a batch's deliveries in one pass: a bad value
    # found there would stop the pass, and the good deliveries of the batch with it.
    return Delivery(envelopes, conn, replay)


def _recipients_ok(to: object) -> bool:
    return to == "*" or isinstance(to, list) and all(isinstance(user, str) for user in to)


def _count_ok(count: object) -> bool:
    return isinstance(count, int) and not isinstance(count, bool)


#: Most bytes of data one broker message of envelopes carries (``wsnode.deliver``, and the
#: ``tasks.dispatch`` that hands messages to Dispatch): a broker refuses a message over its limit
#: (RabbitMQ's ``max_message_size``: 128 MiB in 3.x, 16 MiB from 4.0; Redis's ``proto-max-bulk-len``,
#: 512 MB), and whoever reads one holds it whole.  A batch of 1,000 messages of ``MAX_MESSAGE_BYTES``
#: (64 KiB, up to 2 MB) for one node was one message of 64 MiB, up to 2 GB; a redelivery run, up to
#: 20,000 deliveries.
MAX_PUBLISH_BYTES = 8 << 20
#: At most a user id's bytes in an envelope's ``to``: ``MAX_USER_ID_CHARS`` of UTF-8, quoted, with its comma.
_USER_BYTES = 4 * MAX_USER_ID_CHARS + 4


def by_size(envelopes: list[dict], most: int = MAX_PUBLISH_BYTES) -> list[list[dict]]:
    """``envelopes`` (``{"id", "to", "data", ...}``, or a replay's ``{"id", "data"}``) in order, in
    runs whose data and recipients take at most about ``most`` bytes (an envelope bigger than that
    alone).  Measures nothing when ``MAX_MESSAGE_BYTES`` each could not reach ``most``: the usual
    batch is one run, at no cost."""
    users = sum(len(_users(envelope)) for envelope in envelopes)
    if len(envelopes) * (settings.MAX_MESSAGE_BYTES + 64) + users * _USER_BYTES <= most:
        return [envelopes] if envelopes else []
    runs: list[list[dict]] = []
    run: list[dict] = []
    size = 0
    for envelope in envelopes:
        length = len(wirejson.dumps(envelope["data"])) + 64 + sum(len(user.encode()) + 4 for user in _users(envelope))
        if run and size + length > most:
            runs.append(run)
            run, size = [], 0
        run.append(envelope)
        size += length
    if run:
        runs.append(run)
    return runs


def _users(envelope: dict) -> list[str] | tuple[()]:
    """The user ids an envelope names: none for a broadcast, nor for a replay's (no ``to``)."""
    to = envelope.get("to", BROADCAST)
    return () if to == BROADCAST else to

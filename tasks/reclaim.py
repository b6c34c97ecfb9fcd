"""Hand back what waits on a push node's queue, so that nothing is stranded there.

Used by a draining node (on itself, at SIGTERM) and by ``tasks.housekeeping`` (on nodes whose lease
expired: killed or cut off).  Any thread; it opens its own broker connection.

Every live envelope found is re-dispatched with ``tasks.dispatch``, which routes it to its users'
current nodes (users not connected anywhere get it from their inbox or ``since`` when they come
back); replay pages are dropped, their connection is gone, and so are broadcasts' envelopes
(:func:`_re_dispatch` says why).  Messages are acked only after the
re-dispatch was published, so a crash in between repeats them (clients drop repeats by id).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from tasks import publishing, wirejson
from tasks.queues import by_size, node_queue, parse_delivery
from tasks.routing import BROADCAST
from wsnode.presence import node_name

log = logging.getLogger(__name__)

CHUNK = 500


def hand_back(app, address: str, delete: bool = False, limit: int = 100_000, node_back: Callable[[], bool] | None = None) -> int:
    """Re-dispatch everything on ``address``'s queue, ``limit`` (at most ``CHUNK``) messages at a time (each round is
    published and acked before the next is read, so memory stays bounded); returns the number of
    envelopes.  It reads at most as many messages as the queue held when it began: on Redis a round
    slower than ``VISIBILITY_TIMEOUT`` has its first messages put back on the queue by the
    workers, and reading on until the queue is empty might never end.  With ``delete`` the queue
    itself is deleted afterwards (its node is gone): what came back that way was handed back
    already.

    ``node_back`` (has a node written its lease at ``address`` since the one found ended?
    housekeeping's, and a draining node's own) guards against a node started again on that address
    meanwhile (a rolling restart): that node consumes the same queue, and what stands on it now
    is its own (live messages, in order behind those before; broadcasts, which are not handed
    back; its connections' replay pages).  It is asked before each round of at most ``CHUNK``
    messages, and the hand-back stops at once when a node is back, leaving the queue to it (a
    round read just before a node came back is still handed back: up to ``CHUNK`` messages that
    node may receive late or, for broadcasts and replay pages, not at all).  Asked again before
    the queue is deleted, it keeps the queue of a node back by then; and again after
    (:func:`_delete`), it declares the queue again for a node that came back in between."""
    queue = node_queue(address)
    handed = messages = 0
    with app.connection_for_write() as conn:
        conn.ensure_connection(max_retries=1)  # a broker that is down fails fast, never hangs
        bound = queue(conn.default_channel)
        # Declared (not passively: on Redis an empty queue has no key, and a passive declare of it
        # raised "404 NOT_FOUND", so every drained node's hand-back failed, and every housekeeping
        # run after it); the declaration returns its message count.
        _, waiting, _ = bound.queue_declare()
        back = False
        while messages < waiting:
            if node_back is not None and node_back():
                back = True
                log.info("stopped handing back %s's queue after %d of its %d messages: a node holds the address again and reads the rest",
                         address, messages, waiting)
                break
            taken = []
            while len(taken) < min(limit, CHUNK, waiting - messages) and (message := bound.get(no_ack=False, accept=["json"])) is not None:
                taken.append(message)
            if not taken:
                break
            handed += _re_dispatch(app, address, taken)
            messages += len(taken)
        if delete:
            if back or (node_back is not None and node_back()):
                log.info("kept the queue of %s: a node holds the address again", address)
            else:
                _delete(app, conn, bound, address, node_back)
    if handed or messages:
        log.info("handed back %d envelopes from %d messages on %s's queue", handed, messages, address)
    return handed


def _delete(app, conn, bound, address: str, node_back: Callable[[], bool] | None = None) -> None:
    """Delete a gone node's queue; on the Redis broker also the bindings kombu keeps in Redis, its
    queue's (``_kombu.binding.<address>``) and its presence's mailbox (a member of
    ``_kombu.binding.celery.pidbox``).  kombu's Redis transport deletes a queue's lists and
    bindings only for the bindings the deleting process declared itself, so declared here first;
    without that, each node killed on an address that never came back left its mailbox's binding
    in Redis for good (the mailbox table never expires while any worker or node lives), and its
    queue's binding for an hour.  RabbitMQ removes both by itself (``x-expires``, and Celery's
    mailbox queues are ``auto_delete``), though not the queue's exchange (:func:`_delete_exchange`).

    Then ``node_back`` is asked whether a node holds the address again, and if one does, its
    queue (and on Redis its mailbox's binding) is declared again.  That closes the race with a
    node starting on the address, by the order of each side's steps: a node writes its lease
    (``wsnode.app.PushNode.start``) before its consumer declares the queue, and this asks for the
    lease after the broker confirmed the deletion.  Either the answer is the node's new lease, and
    the queue is declared here, or the node wrote it after the question, so declared its queue
    after the deletion.  What stood on the queue when it went is lost (the messages published
    between the hand-back's reading and the deletion: redelivery covers them).  A node that
    declared its queue with no lease written (it started while Redis was down, or it is back from
    a cut-off from Redis) is not covered: on RabbitMQ the broker cancels its consumer, which
    declares the queue again (``wsnode.consumer``); on Redis its consumer reads on from the same
    list, and Dispatch's messages reach it anyway (Celery publishes them through the default
    exchange, straight to the list, never through the binding deleted here)."""
    if conn.transport.driver_type != "redis":
        bound.delete()
        if node_back is not None and node_back():
            bound.declare()  # its exchange and binding too: the exchange is not deleted
            log.info("declared the queue of %s again: a node came back on the address while it was deleted", address)
            return
        _delete_exchange(conn, address)
        return
    bound.declare()
    bound.delete()
    mailbox = app.control.mailbox.get_queue(node_name(address))(conn.default_channel)
    mailbox.declare()
    mailbox.delete()
    if node_back is not None and node_back():
        bound.declare()
        mailbox.declare()
        log.info("declared the queue of %s again: a node came back on the address while it was deleted", address)
    # kombu remembers, for the whole process, every fanout queue a channel bound; a worker process
    # forgetting node after node would keep one entry per node.
    conn.default_channel._fanout_queues.pop(mailbox.name, None)


def _delete_exchange(conn, address: str) -> None:
    """RabbitMQ: delete a gone node's exchange (its queue's, named as the queue), which RabbitMQ
    keeps when the queue goes: each node address that never came back left one durable exchange
    for good.  ``if_unused``: a node that declared its queue again meanwhile (one cut off from
    Redis, whose consumer RabbitMQ cancelled when the queue went) keeps it.  On a channel of its
    own, which the broker closes when it refuses."""
    channel = conn.channel()
    try:
        channel.exchange_delete(address, if_unused=True)
    except conn.channel_errors as exc:
        log.info("kept the exchange of %s's queue: %s", address, exc)
    finally:
        try:
            channel.close()
        except Exception:  # noqa: BLE001 - closed by the broker already
            pass


def _re_dispatch(app, address: str, taken: list) -> int:
    """Send the live envelopes of the queue messages ``taken`` to ``tasks.dispatch``, then ack them
    all; returns how many envelopes went.

    A broadcast's envelope (``"*"``: that node's users, whoever they were) is not sent again:
    Dispatch would route it to every live node, so every user online anywhere would get it a
    second time (and users who connected since, a broadcast sent before they came), once per node
    that died or drained with it queued.  Broadcasts are for the users online when they are sent and
    are never redelivered; the node's users get it by resuming with ``since`` (push.js does), as
    after any other missed broadcast."""
    envelopes = []
    broadcasts = 0
    for message in taken:
        try:
            delivery = parse_delivery(message.headers, message.decode())
        except Exception as exc:  # noqa: BLE001 - BadDelivery, kombu's DecodeError, ContentDisallowed...: acked below, as a node drops it
            log.error("dropped a malformed message from %s: %s", address, exc)
            continue
        if delivery.conn is None:
            for envelope in delivery.envelopes:
                if envelope.get("to") == BROADCAST:
                    broadcasts += 1
                else:
                    envelopes.append(envelope)
    if broadcasts:
        log.info("did not hand back %d broadcast envelope(s) from %s's queue: a broadcast is not sent again, "
                 "that node's users get it by resuming with since", broadcasts, address)
    with publishing.producer(app) as producer:
        for start in range(0, len(envelopes), CHUNK):
            for run in by_size(envelopes[start : start + CHUNK]):
                app.send_task("tasks.dispatch", args=[run], ignore_result=True, producer=producer, serializer=wirejson.SERIALIZER)
    for message in taken:
        message.ack()
    return len(envelopes)

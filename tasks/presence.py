"""``tasks.presence``: which of some users are online now, and on which push nodes.  Worker process only.

``send_task("tasks.presence", args=[["alice", "bob"]], queue="dispatch").get()`` returns
``{"alice": ["10.0.0.5:8101"], "bob": []}``: per user, in the order given, the nodes that hold a
connection of theirs now; an empty list means offline.  Business code asks it before choosing
another channel (an e-mail, a mobile push) for a user who is not connected: Centrifugo's
``presence``, python-socketio's ``get_participants``.

It reads the route leases Dispatch routes by (:class:`wsnode.registry.RouteTable`, one Redis
round trip for all the users) with Dispatch's rule (:func:`tasks.routing.plan`): a lease counts on a
node whose own lease is current.  So a user is online from the moment their first connection on a
node is bound until their last one there closes, and a node that died without releasing its
leases stops counting once its own lease lapsed (``LEASE_TTL``).  Devices are not counted: a user
with three tabs on one node is one node.
"""

from __future__ import annotations

import redis

import settings
from tasks import dispatch
from tasks.messages import InvalidMessage, check_user_id, checked_arguments
from tasks.resultbackend import REFUSED_FOR_NOW
from tasks.routing import BROADCAST
from worker import app


def users_of(value: object, most: int) -> tuple[str, ...]:
    """The users asked about: one user id or a list of them, without repeats.  Pure."""
    if value == BROADCAST or (isinstance(value, (list, tuple)) and BROADCAST in value):
        raise InvalidMessage('tasks.presence takes user ids; "*" is not one (the platform does not list everyone online)')
    if isinstance(value, str):
        return (check_user_id(value, "the user"),)
    if not isinstance(value, (list, tuple)) or not value:
        raise InvalidMessage(f"tasks.presence takes a user id or a non-empty list of user ids, got {value!r:.60}")
    users = tuple(dict.fromkeys(check_user_id(user, f"users[{index}]") for index, user in enumerate(value)))
    if len(users) > most:
        raise InvalidMessage(f"tasks.presence was asked about {len(users)} users; at most {most} per call (MAX_RECIPIENTS), split the list")
    return users


# autoretry_for: a Redis that does not answer, and one that refuses for now (a replica serving no
# stale data answers even this read with MASTERDOWN while its primary is down).
# throws: a caller's bad request is logged as Celery logs an expected error (INFO, one line), not
# as a worker ERROR with a traceback; the task still fails with it.
@app.task(name="tasks.presence", autoretry_for=(redis.ConnectionError, redis.TimeoutError, *REFUSED_FOR_NOW), retry_backoff=True, max_retries=3,
          throws=(InvalidMessage,))
@checked_arguments("tasks.presence")
def presence(users: str | list[str]) -> dict[str, list[str]]:
    wanted = users_of(users, settings.MAX_RECIPIENTS)
    found, live = dispatch.routes.lookup(wanted)
    current = set(live)
    return {user: sorted(node for node in found.get(user, ()) if node in current) for user in wanted}

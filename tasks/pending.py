"""Deliveries routed to an online user and not acked yet: the redelivery candidates, in Redis.

Worker processes only (synchronous ``redis.Redis``).  One sorted set, ``push:pending`` in the
``REDIS_URL`` database: member ``"<message id>:<user>"``, score = the message's time (from its id).

- Dispatch adds every (message, user) it routes, before it publishes, in the same script call as
  its route lookup (:func:`marks`, ``wsnode.registry.RouteTable.lookup``); routing the same
  delivery again changes nothing.  Every ``REDELIVER_SWEEP_SECONDS``
  housekeeping also adds the store's unacked deliveries of the messages stored since its previous
  sweep (a message stored whose routing never ran, because Redis was down longer than Dispatch
  retried).
- An ack removes it (:func:`remove`, from ``tasks.receipts``).
- Housekeeping reads the deliveries whose age may have crossed a redelivery threshold since its
  last run (:func:`between`), checks them against the store's ``acked`` receipts (the record of
  truth: a removal may have been missed while Redis was down), and drops what is older than the
  last threshold (:func:`prune`).

So a redelivery run costs what is due, not a scan of the store.  A Redis that loses its data loses
this set until the next sweep puts the store's unacked deliveries back.  The set holds only unacked deliveries younger than the last threshold
(``REDELIVER_AFTER x 2^(REDELIVER_ATTEMPTS - 1)``, 8 minutes by default), about 145 bytes each
(``INFO memory``, Redis 7.0, 200,000 of them).
"""

from __future__ import annotations

from collections.abc import Iterable

from tasks.ids import timestamp_ms

PENDING_KEY = "push:pending"
_CHUNK = 5000


def member(message_id: str, user: str) -> str:
    return f"{message_id}:{user}"


def parse(value: bytes | str) -> tuple[str, str]:
    """``(message id, user)`` of a member (user ids may contain ``:``, message ids never do)."""
    text = value.decode() if isinstance(value, bytes) else value
    message_id, _, user = text.partition(":")
    return message_id, user


def marks(pairs: Iterable[tuple[str, str]]) -> Marks:
    """The marks of the ``(message id, user)`` deliveries, for ``wsnode.registry.RouteTable.lookup``
    to add to :data:`PENDING_KEY` those it finds routed (Dispatch's record, in its lookup's round
    trip).  Pure."""
    return Marks(pairs)


class Marks:
    """The pending marks of deliveries, ``(user, member, score)``, made one user at a time as the
    lookup asks (:meth:`of`): a batch of 250 messages to 10,000 users each made 2.5 million of them
    at once, and its pool process grew to 5 GB.  Holds each user's message ids (the ids are the
    messages' own strings).  Pure."""

    __slots__ = ("_ids", "_count")

    def __init__(self, pairs: Iterable[tuple[str, str]]) -> None:
        self._ids: dict[str, list[str]] = {}
        self._count = 0
        for mid, user in pairs:
            self._ids.setdefault(user, []).append(mid)
            self._count += 1

    def __len__(self) -> int:
        return self._count

    def of(self, user: str) -> list[tuple[str, str, float]]:
        return [(user, member(mid, user), timestamp_ms(mid) / 1000) for mid in self._ids.get(user, ())]

    def __iter__(self):
        for user in self._ids:
            yield from self.of(user)


def remove(redis, pairs: Iterable[tuple[str, str]]) -> None:
    """Forget acked ``(message id, user)`` deliveries."""
    members = list(dict.fromkeys(member(mid, user) for mid, user in pairs))
    if not members:
        return
    pipe = redis.pipeline(transaction=False)
    for start in range(0, len(members), _CHUNK):
        pipe.zrem(PENDING_KEY, *members[start : start + _CHUNK])
    pipe.execute()


def between(redis, start: float, end: float) -> list[tuple[str, str]]:
    """The pending deliveries of messages from ``start`` to ``end`` (unix seconds), oldest first."""
    return [parse(value) for value in redis.zrangebyscore(PENDING_KEY, start, end)]


def prune(redis, before: float) -> int:
    """Drop the deliveries of messages older than ``before``; returns how many."""
    return redis.zremrangebyscore(PENDING_KEY, "-inf", f"({before}")

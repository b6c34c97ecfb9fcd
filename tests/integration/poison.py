"""Loaded into a test worker with ``--include tests.integration.poison``: a ``tasks.collect``
request whose data is ``{"poison": "kill"}``, and a ``tasks.presence`` request asking about the
user ``poison-kill``, kill the pool process that runs them (SIGKILL), as a request that made its
process run out of memory would get it killed.  A message whose data is
``{"poison": "redis-down"}`` shuts the cluster's Redis down (``SHUTDOWN``: it writes its files
and exits) once it is stored, right before it is first routed, as a Redis restart at that
moment would.  A message whose data is ``{"poison": "store-and-broker-down", "n": ...}`` finds
the store unavailable and its retry unsendable, once per ``n`` in each worker process, as a
MongoDB and a broker down at once would.  Nothing else changes."""

from __future__ import annotations

import os
import signal

import redis
from kombu.exceptions import OperationalError

import settings
from tasks import collect, presence
from tasks.store import StoreUnavailable

_store_and_dispatch = collect._persist_and_dispatch_groups
_users_of = presence.users_of
_route = collect.route
_shut_down_for: set[str] = set()  # per pool process: message ids Redis was shut down for
_retry_send = collect.collect.apply_async
_store_down_for: set[object] = set()  # per process: the "n" of the requests the store refused
_broker_down_for: set[object] = set()  # and of those whose retry was not sent


def _down_once(data, seen: set) -> bool:
    if isinstance(data, dict) and data.get("poison") == "store-and-broker-down" and data.get("n") not in seen:
        seen.add(data.get("n"))
        return True
    return False


def _dies_on_poison(groups, *args):
    if any(isinstance(message.data, dict) and message.data.get("poison") == "kill" for messages, _ in groups for message in messages):
        os.kill(os.getpid(), signal.SIGKILL)
    if [message for messages, _ in groups for message in messages if _down_once(message.data, _store_down_for)]:
        raise StoreUnavailable("the store does not answer (tests.integration.poison)")
    return _store_and_dispatch(groups, *args)


def _retry_unsendable(*args, **kwargs):
    if _down_once((kwargs.get("kwargs") or {}).get("data"), _broker_down_for):
        raise OperationalError("the broker does not answer (tests.integration.poison)")
    return _retry_send(*args, **kwargs)


def _dies_on_poison_user(value, most):
    if value == "poison-kill" or (isinstance(value, list) and "poison-kill" in value):
        os.kill(os.getpid(), signal.SIGKILL)
    return _users_of(value, most)


def _shuts_redis_down_first(docs):
    for doc in docs:
        if doc["data"] == {"poison": "redis-down"} and doc["id"] not in _shut_down_for:
            _shut_down_for.add(doc["id"])
            redis.Redis.from_url(settings.REDIS_URL).shutdown()
    return _route(docs)


collect._persist_and_dispatch_groups = _dies_on_poison
collect.route = _shuts_redis_down_first
collect.collect.apply_async = _retry_unsendable
presence.users_of = _dies_on_poison_user

"""Loaded into a test worker with ``--include tests.integration.poison``: a ``tasks.collect``
request whose data is ``{"poison": "kill"}``, and a ``tasks.presence`` request asking about the
user ``poison-kill``, kill the pool process that runs them (SIGKILL), as a request that made its
process run out of memory would get it killed.  Nothing else changes."""

from __future__ import annotations

import os
import signal

from tasks import collect, presence

_store_and_dispatch = collect._persist_and_dispatch_groups
_users_of = presence.users_of


def _dies_on_poison(groups):
    if any(isinstance(message.data, dict) and message.data.get("poison") == "kill" for messages, _ in groups for message in messages):
        os.kill(os.getpid(), signal.SIGKILL)
    return _store_and_dispatch(groups)


def _dies_on_poison_user(value, most):
    if value == "poison-kill" or (isinstance(value, list) and "poison-kill" in value):
        os.kill(os.getpid(), signal.SIGKILL)
    return _users_of(value, most)


collect._persist_and_dispatch_groups = _dies_on_poison
presence.users_of = _dies_on_poison_user

"""Loaded into a test worker with ``--include tests.integration.poison``: a ``tasks.collect``
request whose data is ``{"poison": "kill"}`` kills the pool process that stores it (SIGKILL), as
a request that made its process run out of memory would get it killed.  Nothing else changes."""

from __future__ import annotations

import os
import signal

from tasks import collect

_store_and_dispatch = collect._persist_and_dispatch_groups


def _dies_on_poison(groups):
    if any(isinstance(message.data, dict) and message.data.get("poison") == "kill" for messages, _ in groups for message in messages):
        os.kill(os.getpid(), signal.SIGKILL)
    return _store_and_dispatch(groups)


collect._persist_and_dispatch_groups = _dies_on_poison

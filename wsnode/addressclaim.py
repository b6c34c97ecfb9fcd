"""A push node's claim on its address, ``NODE_HOST:PORT``, in Redis: one node process per address.

The address is a node's identity: Dispatch routes to it, and its Celery queue is named by it.
Two nodes given the same one (two hosts that both left ``NODE_HOST`` at its default, with the same
``--port``) read one queue and split each other's messages, each delivering to its own
connections only what it happens to read: the rest reached their users only by redelivery, or not
at all once another device of theirs acked.  Binding the port catches a second node on the same
host only.

So each node process claims its address before it writes its lease or reads its queue: the key
``push:address:<address>`` holds a value of its own (the host, the process id and a random
token) for ``LEASE_TTL``, renewed with the node's leases and deleted by its drain.  A node that
finds another's value there waits, saying so, until it can take it: another node lives on the
address (give each its own ``NODE_HOST:PORT``), or one was killed without draining, whose claim
ends within ``LEASE_TTL`` (at once when it was a process of this host that is gone: a node
restarted where it was killed takes its address without waiting).  A renewal that finds another's value logs an error every time (the
claim lapsed while Redis did not answer, and another node took it).  A claim Redis lost (a
restart, a failover) is taken again.

asyncio, loop thread only; the claim's Redis client is the node's.
"""

from __future__ import annotations

import json
import os
import secrets
import socket

PREFIX = "push:address:"

#: Take or extend the claim: set when absent or ours, else leave it.  Returns the value found when
#: it is another's, else nil.  KEYS: the claim.  ARGV: our value, its length in milliseconds.
TAKE = """
local found = redis.call('get', KEYS[1])
if found and found ~= ARGV[1] then return found end
redis.call('set', KEYS[1], ARGV[1], 'px', ARGV[2])
return false
"""

#: Delete the claim when it is ours.  KEYS: the claim.  ARGV: our value.
GIVE_UP = """
if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end
return 0
"""


def claim_key(address: str) -> str:
    return PREFIX + address


def claim_value(host: str, **more) -> str:
    """This process's value for a claim: its host, its process id, a random token (and ``more``)."""
    return json.dumps({"host": host, "pid": os.getpid(), "token": secrets.token_hex(8), **more}, sort_keys=True)


def holder(value: bytes | str) -> str:
    """Who holds a claim, from its value, for the log.  Pure."""
    text = value.decode(errors="replace") if isinstance(value, bytes) else value
    try:
        found = json.loads(text)
        return f"process {found['pid']} on host {found['host']!r}"
    except (ValueError, KeyError, TypeError):
        return f"{text[:80]!r}"


def gone_from(value: bytes | str, host: str, alive) -> bool:
    """Whether a claim's value names a process of ``host`` that ``alive(pid)`` says is gone."""
    try:
        found = json.loads(value)
        return found["host"] == host and isinstance(found["pid"], int) and not alive(found["pid"])
    except (ValueError, KeyError, TypeError):
        return False


def process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's: alive
        return True
    return True


class AddressClaim:
    def __init__(self, redis, address: str, ttl: float) -> None:
        self.address = address
        self.key = claim_key(address)
        self.ttl_ms = max(1, int(ttl * 1000))
        self.host = socket.gethostname()
        self.value = claim_value(self.host)
        self._take = redis.register_script(TAKE)
        self._give_up = redis.register_script(GIVE_UP)

    async def take(self) -> str | None:
        """Take or extend the claim; None when it is this process's now, else who holds it."""
        found = await self._take(keys=[self.key], args=[self.value, self.ttl_ms])
        if found is not None and gone_from(found, self.host, process_alive):
            await self._give_up(keys=[self.key], args=[found])  # its own value only: not one taken meanwhile
            found = await self._take(keys=[self.key], args=[self.value, self.ttl_ms])
        return None if found is None else holder(found)

    async def give_up(self) -> None:
        """Delete the claim if it is still this process's (the drain)."""
        await self._give_up(keys=[self.key], args=[self.value])

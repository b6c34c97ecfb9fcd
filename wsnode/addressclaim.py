"""A push node's claim on its address, ``NODE_HOST:PORT``, in Redis: one node process per address.

The address is a node's identity: Dispatch routes to it, and its Celery queue is named by it.
Two nodes given the same one (two hosts that both left ``NODE_HOST`` at its default, with the same
``--port``) read one queue and split each other's messages, each delivering to its own
connections only what it happens to read: the rest reached their users only by redelivery, or not
at all once another device of theirs acked.  Binding the port catches a second node on the same
host only.

So each node process claims its address before it writes its lease or reads its queue: the key
``push:address:<address>`` holds a value of its own (where it runs, its process id and a random
token) for ``LEASE_TTL``, renewed with the node's leases and released by its drain once its
consumer stopped (a node waiting for the address takes a released claim at once).  A node that
finds another's value there waits, saying so, until it can take it: another node lives on the
address (give each its own ``NODE_HOST:PORT``), or one was killed without draining, whose claim
ends within ``LEASE_TTL`` (at once when it was a process of this host, boot and process-id
namespace that is gone: a node restarted where it was killed takes its address without
waiting; one restarted in a new container waits).  A renewal that finds another's value logs an
error every time (the claim lapsed while Redis did not answer, and another node took it).  A
claim Redis lost (a restart, a failover) is taken again by its holder at its next renewal; a
node waiting for the address takes an absent claim only once it stayed absent longer than a
renewal's interval, so that it does not take a living node's.  :meth:`AddressClaim.wait` is that
wait, as a node starts.

asyncio, loop thread only; the claim's Redis client is the node's.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import secrets
import socket
import time

from redis.exceptions import RedisError

import redislogin

log = logging.getLogger("wsnode.app")  # the node's own log, as before the wait was written here

PREFIX = "push:address:"
#: What a drain leaves in its claim for ``RELEASED_MS``: free at once, where a claim Redis lost (a
#: restart, a failover) may still be a living node's, which takes it again at its next renewal.
RELEASED = "released"
RELEASED_MS = 5000

#: Take or extend the claim: set when ours, released, or (ARGV[3] '1') absent.  Returns nil when
#: it is ours now, "" when absent and not taken, else the value found (another's).  KEYS: the
#: claim.  ARGV: our value, its length in milliseconds, '1' to take an absent claim.
TAKE = f"""
local found = redis.call('get', KEYS[1])
if found and found ~= ARGV[1] and found ~= '{RELEASED}' then return found end
if not found and ARGV[3] ~= '1' then return '' end
redis.call('set', KEYS[1], ARGV[1], 'px', ARGV[2])
return false
"""

#: Release the claim when it holds ARGV[1] (ours, or a gone process's).  KEYS: the claim.  ARGV:
#: that value, how long the release lasts in milliseconds.
GIVE_UP = f"""
if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('set', KEYS[1], '{RELEASED}', 'px', ARGV[2]) end
return 0
"""


def claim_key(address: str) -> str:
    return PREFIX + address


def _read(path: str) -> str:
    try:
        with open(path) as file:
            return file.read().strip()
    except OSError:
        return ""


def here() -> dict:
    """Where this process runs, as far as another process's claim can tell it apart: the host
    name, the kernel's boot, and the process-id namespace (containers of one host name, such as a
    container restarted with its name, each have their own)."""
    try:
        pidns = os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        pidns = 0
    return {"host": socket.gethostname(), "boot": _read("/proc/sys/kernel/random/boot_id"), "pidns": pidns}


def claim_value(**more) -> str:
    """This process's value for a claim: where it runs (:func:`here`), its process id, a random
    token (and ``more``)."""
    return json.dumps({**here(), "pid": os.getpid(), "token": secrets.token_hex(8), **more}, sort_keys=True)


def holder(value: bytes | str) -> str:
    """Who holds a claim, from its value, for the log.  Pure."""
    text = value.decode(errors="replace") if isinstance(value, bytes) else value
    try:
        found = json.loads(text)
        return f"process {found['pid']} on host {found['host']!r}"
    except (ValueError, KeyError, TypeError):
        return f"{text[:80]!r}"


def gone_from(value: bytes | str, where: dict, pid: int, alive) -> bool:
    """Whether a claim's value (not this process's) names a process that is gone: one of the same
    host, boot and process-id namespace as ``where`` that ``alive(pid)`` says is gone, or whose
    process id is this process's own ``pid`` (no other process of the namespace has it: that was
    a predecessor's).  A process elsewhere (a container restarted in a new namespace included)
    cannot be told gone: its claim is waited out.  Pure."""
    try:
        found = json.loads(value)
        if any(found[key] != where[key] for key in ("host", "boot", "pidns")) or not isinstance(found["pid"], int):
            return False
        return found["pid"] == pid or not alive(found["pid"])
    except (ValueError, KeyError, TypeError):
        return False


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's: alive
        return True
    return True


def gone(value: bytes | str) -> bool:
    """:func:`gone_from` for this process."""
    return gone_from(value, here(), os.getpid(), process_alive)


#: :meth:`AddressClaim.take`'s answer when the claim is absent and was not taken.
ABSENT = ""


class AddressClaim:
    def __init__(self, redis, address: str, ttl: float) -> None:
        self.address = address
        self.key = claim_key(address)
        self.ttl = ttl
        self.ttl_ms = max(1, int(ttl * 1000))
        self.value = claim_value()
        self._take = redis.register_script(TAKE)
        self._give_up = redis.register_script(GIVE_UP)

    async def take(self, absent_too: bool = True) -> str | None:
        """Take or extend the claim: None when it is this process's now; :data:`ABSENT` when it
        is absent and ``absent_too`` is False (a node that saw another's claim: Redis may have
        lost that node's, which it takes again at its next renewal); else who holds it."""
        args = [self.value, self.ttl_ms, "1" if absent_too else "0"]
        found = await self._take(keys=[self.key], args=args)
        if found and gone(found):
            await self._give_up(keys=[self.key], args=[found, RELEASED_MS])  # that value only: not one taken meanwhile
            found = await self._take(keys=[self.key], args=args)
        if found is None:
            return None
        return ABSENT if found == b"" or found == "" else holder(found)

    async def give_up(self) -> None:
        """Release the claim if it is still this process's (the drain): a node waiting for the
        address takes it at once."""
        await self._give_up(keys=[self.key], args=[self.value, RELEASED_MS])

    async def wait(self) -> None:
        """Wait until this process holds the claim, saying who holds it meanwhile: a warning at
        first (a node draining on the address releases it once it stops reading its queue), an
        error every 10 s from then on.  Redis unavailable before any other holder was seen: the
        node starts without it, as it starts without its leases, and the renewals take it; after,
        it goes on waiting.  A claim absent after another holder was seen (Redis lost it) is taken
        only once it stayed absent longer than that holder's renewal interval."""
        seen, absent_since, started = None, None, time.monotonic()
        next_error = started + 10
        renewal = self.ttl / 3 + 2
        while True:
            waited = time.monotonic() - started
            try:
                other = await self.take(absent_too=seen is None or (absent_since is not None and time.monotonic() - absent_since > renewal))
            except RedisError as exc:
                if seen is None:
                    log.warning("node=%s could not claim its address in Redis (%s): starting without; the lease renewals claim it",
                                self.address, redislogin.explain(exc))
                    return
                other = seen  # still waiting: Redis may have lost the holder's claim, not the holder
            if other is None:
                if seen is not None:
                    log.info("node=%s claimed its address after waiting %.0f s", self.address, waited)
                return
            if other == ABSENT:
                absent_since = absent_since or time.monotonic()
            else:
                absent_since = None
                if seen is None:
                    log.warning("node=%s: %s holds this address (%s in Redis): waiting for it; a node draining on the address "
                                "releases it once it stops reading its queue", self.address, other, self.key)
                seen = other
            if time.monotonic() >= next_error:
                next_error += 10
                log.error("node=%s: %s still holds this address (%s in Redis) after %.0f s, so this node waits before it reads "
                          "the address's queue. Two nodes with one NODE_HOST:PORT would split one queue: give each node its own "
                          "NODE_HOST (the address Dispatch reaches it at) or --port. A node killed without draining holds it for up "
                          "to LEASE_TTL=%g s", self.address, seen, self.key, waited, self.ttl)
            await asyncio.sleep(1.0)

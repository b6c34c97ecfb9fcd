"""How many ``ack`` frames a connection may send.  Pure; loop thread only.

An ack records a receipt in the store (through ``tasks.receipts``) and clears a redelivery
candidate in Redis, so a client that sent acks without bound (any well-formed id, as fast as its
socket takes them) would make the platform write without bound.  A client acks the message frames
it got, each once (push.js acks a repeat too: it came again because an earlier ack was lost), so
a connection may send one ack per message frame written to it (an ``ack`` frame with ``ids``
counts one per id), plus :data:`ACK_ALLOWANCE` for a
client that acks on a new connection what it read on the previous one.  Past that the node
closes the connection with 4500 (a client bug: :class:`~wsnode.closecodes.CloseCode`).
"""

from __future__ import annotations

#: Acks a connection may send beyond the message frames written to it.
ACK_ALLOWANCE = 100


class AckBudget:
    """One per connection: message frames written add to it, each ack takes one."""

    __slots__ = ("_left",)

    def __init__(self, allowance: int = ACK_ALLOWANCE) -> None:
        self._left = allowance

    def written(self, count: int) -> None:
        """``count`` message frames were written to the connection."""
        self._left += count

    def take(self, count: int = 1) -> bool:
        """``count`` acks came (one frame's): False, taking none, when the connection has fewer
        than that left to send."""
        if self._left < count:
            return False
        self._left -= count
        return True

"""The per-user connect rate limit (``MAX_USER_CONNECTS``): at most COUNT connects of one user in
any SECONDS seconds, across the whole cluster.  Pure: no I/O, unit-tested.

**Where it is counted.**  In Redis, one log per user (``push:connects:<user>``, a sorted set of the
times of the connects it admitted, by Redis's clock), so that a user's reconnect loop spread over
the nodes by a load balancer counts on every one of them.  The count and the decision are made by
the script that writes a new connection's lease (``wsnode.registry._ADMIT``), in the pipeline the
node sends anyway for it: a connect whose lease is written costs no round trip more.  A connect that
needs no lease (its user holds a bound connection on the node already) costs one that it did not
cost before, shared with every other connect of the same moment (``wsnode.coalesce``).

**The window slides.**  A connect is admitted while fewer than COUNT connects of its user were
admitted in the SECONDS seconds before it; a refused one is not recorded, so a client that keeps
trying is let in as soon as its oldest admitted connect leaves the window (the retry time its close
reason gives; when the log holds more than COUNT, admitted under a higher limit, as soon as all but
COUNT - 1 of them left), and not later.  Each admitted connect is one entry of the log, which expires SECONDS
seconds after its newest.

**The answer.**  The script answers, per user of a call, how many of its connects it admitted and,
when it refused some, in how many milliseconds the next one would be admitted; :func:`answers`
gives each connection its own answer (the first ones of the user in the call are admitted), and
:func:`reason` the close reason (4429) of a refused one.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

LOG_PREFIX = "push:connects:"

#: The close reason of a connection over the limit starts so (4429; the retry time follows).
REASON = "too many connects of this user"


def log_key(user: str) -> str:
    return LOG_PREFIX + user


def tally(users: list[str]) -> dict[str, int]:
    """How many connects each user has among ``users`` (one item per connection), in the order
    the users first appear."""
    counts: dict[str, int] = {}
    for user in users:
        counts[user] = counts.get(user, 0) + 1
    return counts


def answers(users: list[str], admitted: Mapping[str, tuple[int, int]]) -> list[int | None]:
    """Each connection's answer, in the order of ``users`` (one item per connection): None when it
    is admitted, else the milliseconds until its user's next connect would be.  ``admitted`` maps
    each user to the script's answer, ``(connects admitted, retry milliseconds)``: the user's first
    connects in ``users`` are those admitted."""
    left = {user: int(count) for user, (count, _) in admitted.items()}
    result: list[int | None] = []
    for user in users:
        if left[user] > 0:
            left[user] -= 1
            result.append(None)
        else:
            result.append(max(1, int(admitted[user][1])))
    return result


def retry_seconds(retry_ms: int) -> int:
    """Whole seconds a refused client waits: rounded up, at least 1 (a client that retries after
    this many is let in, unless another device of its user connected meanwhile)."""
    return max(1, math.ceil(retry_ms / 1000))


def reason(retry_ms: int) -> str:
    """The close reason of a connection over the limit (4429): short enough for a close frame."""
    return f"{REASON}, retry in {retry_seconds(retry_ms)} s"

"""An outage of a backend, logged once per change rather than once per request that meets it.

A 20 s Redis outage with 30 users reconnecting wrote 360 ERROR lines in auth and 1,075 WARNING
lines in two nodes, and a node's lease renewal logged a WARNING every third of ``LEASE_TTL`` for as
long as Redis was down: the lines that said what was wrong were buried.  So each place that meets
a backend's failures keeps an :class:`Outage` and asks it, at each failure, whether to log
(:meth:`Outage.failed`: the first failure of an outage, or one whose cause differs from the last
logged, which has another fix), and, when the backend answers again, what to say once
(:meth:`Outage.answered`: how long it lasted and how many failed meanwhile).

Used by auth for its Redis (:meth:`auth.app.AuthService.redis_failed`), by a push node for auth
(:class:`wsnode.auth.AuthClient`) and for its lease renewals (:class:`wsnode.leasekeeper.LeaseKeeper`).
Pure: it logs nothing itself (the caller writes its own line, at its own level) and reads only the
clock it is given.  Not thread-safe: each owner uses its own from one thread (the loop thread, in
auth and on the nodes).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable
from typing import NamedTuple


class Recovery(NamedTuple):
    """An outage that ended: ``seconds`` from its first failure to the answer that ended it (on the
    outage's clock), and ``failures``, what failed meanwhile (requests, token checks, renewals: the
    counts given to :meth:`Outage.failed`)."""

    seconds: float
    failures: int


class Outage:
    """One backend's outage as one user of it sees it (see the module).  ``clock`` is monotonic
    seconds: a step of the wall clock is no part of an outage."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        #: When the outage's first failure came (``clock()``); None while the backend answers.
        self._since: float | None = None
        self._failures = 0
        #: The cause of the failure last logged; kept after the outage ends, and of no effect then.
        self._cause: Hashable = None
        #: When the last outage ended (``clock()``, :meth:`answered`); None before the first.
        self._ended: float | None = None

    @property
    def down(self) -> bool:
        """Whether a failure came since the backend last answered."""
        return self._since is not None

    def failed(self, cause: Hashable = None, count: int = 1, asked_at: float | None = None) -> bool:
        """Count ``count`` failures of the backend; True when the caller is to log this one: the
        first of an outage, or the first whose ``cause`` differs from the previous one's (what to
        fix changed: Redis back but refusing a changed password).  A cause is whatever tells such
        fixes apart (a refusal's text, an exception's type); a caller whose fix never changes
        gives none, and is told to log the first failure only.

        A failure of a request sent before the last outage ended (``asked_at``, from
        :meth:`asking`) is of that outage, logged and over: it counts nothing and begins nothing,
        as :meth:`answered` ends nothing for an answer to a request sent before it began (a request
        sent while Redis was down that failed, at its timeout, after another request's answer had
        ended the outage began a new one, and logged its line again)."""
        if asked_at is not None and self._ended is not None and asked_at < self._ended:
            return False
        new = self._since is None or cause != self._cause
        if self._since is None:
            self._since = self._clock()
            self._failures = 0
        self._cause = cause
        self._failures += count
        return new

    def asking(self) -> float:
        """When a request is sent, on the outage's clock: what to give :meth:`answered` with its answer."""
        return self._clock()

    def answered(self, asked_at: float | None = None) -> Recovery | None:
        """The backend answered: the outage that this ends, for the caller's one line, or None when
        there was none (it answered before too, and nothing is to be logged).  An answer to a
        request sent before the outage's first failure (``asked_at``, from :meth:`asking`) says
        nothing of the backend now, and ends nothing: a slow request that began before Redis went
        down and was answered after another request failed ended that outage, and the next
        failure logged its line again."""
        if self._since is None or (asked_at is not None and asked_at < self._since):
            return None
        self._ended = self._clock()
        recovery = Recovery(self._ended - self._since, self._failures)
        self._since = None
        return recovery

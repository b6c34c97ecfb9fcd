"""When the worker hands buffered ``tasks.collect`` and ``tasks.collect_many`` requests to its
pool: at once while none of their task's batches runs, gathered while one does (group commit);
how many go in one batch (:func:`messages_in`); and a batch's time limits (:func:`batch_time_limits`).  Pure.

celery-batches on its own runs a batch every ``flush_interval`` seconds or every ``flush_every``
requests, so a request that comes alone waits up to the interval (50 ms by default) before
anything is done with it, even on an idle worker.  :class:`FlushGate` lets a batch go as soon as
no batch of ours is running, and holds requests while one is; when it returns, what gathered
meanwhile goes as the next batch.  An idle worker thus runs a lone request right away, and a busy
one runs bigger batches the busier it is (each claim, insert, route lookup and node message is
then shared by more requests), with no fixed wait in either case.  ``COLLECT_BATCH`` still caps a
batch and ``COLLECT_FLUSH_SECONDS`` still flushes what waits whatever the gate says (the timer and
count of celery-batches): the longest a request can be held, and what puts a second batch beside
a running one under load, on the pool's other processes, for requests of other users.

One batch at a time by default, not one per pool process: a batch has a fixed cost (Redis round
trips and a store commit), and letting a batch go whenever a process was free made the batches
small while the pool was busy; sending one task per message as fast as one process can
(``bench/compare.py``, 2026-12-02) that nearly doubled the platform's CPU per message and cut the
delivered rate by about a third, where one at a time kept the rate.

Per-user order (:func:`ordered_batches`): two batches that run beside each other (the timer's or
the count's flush beside a running one, or the pieces of a flush bigger than one batch) have no
order between them, each on its own pool process.  So a request waits, in order, behind a running
batch (or a batch cut before it in the same flush) that names one of its users, or every user
(``to="*"``), and behind an earlier request that waits; a request of other users goes beside.
One worker then delivers a user's messages in the order it read their requests from the broker,
which is the order one business process sent them.  A batch's own messages are published in
order, one pool process each, and a node reads its queue in order.

The two tasks share that order: ``tasks.collect`` and ``tasks.collect_many`` have a buffer and a
gate each, but a flush of one takes the other's requests that may run too, and cuts the batches
from both in the order read (one batch then holds requests of both tasks); a request also waits
behind a batch of the other task that names one of its users and runs, and behind a request of
either task read before it that has not run yet and is not in the flush (its ``earlier``: one
held by its task's rate limit).  Each request is numbered as it is read, across both tasks (:mod:`tasks.collectbatches`), so
that a flush knows which came first.  A request waits only for requests read before it, and for
batches that run, so the first request read never waits for anything but a running batch:
nothing waits in a circle.

Threading: the worker's main process, on its event loop.  ``started`` is called where the batch
is handed to the pool; ``finished`` from the pool's result callback, which the prefork and solo
pools run on the loop and the threads pool on one of its threads (a ``set.discard`` is atomic
under the GIL, and :class:`tasks.collectbatches.CollectBatches` schedules the next flush through the
hub's thread-safe ``call_soon``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TypeVar

T = TypeVar("T")

#: What :func:`request_users` answers for a request that names every user online (``to="*"``).
EVERYONE = None


def request_users(args: Sequence | None, kwargs: Mapping | None) -> frozenset[str] | None:
    """The users a ``tasks.collect`` or ``tasks.collect_many`` request names, read as the worker's
    main process has it (not validated): ``to`` of the request, or of each item of ``messages``
    (a ``collect_many`` takes its list as ``messages`` or as its one positional argument).
    :data:`EVERYONE` when one of them is ``"*"``.  What is not a user id is left out: the pool
    refuses such a request or item, which then sends nothing.  Pure."""
    kwargs = kwargs if isinstance(kwargs, Mapping) else {}
    messages = kwargs.get("messages")
    if messages is None and args and len(args) == 1:
        messages = args[0]
    if isinstance(messages, (list, tuple)):
        targets = [item.get("to") for item in messages if isinstance(item, Mapping)]
    else:
        targets = [kwargs.get("to")]
    users: set[str] = set()
    for to in targets:
        if to == "*":
            return EVERYONE
        if isinstance(to, str):
            users.add(to)
        elif isinstance(to, (list, tuple)):
            users.update(user for user in to if isinstance(user, str))
    return frozenset(users)


class _Claims:
    """Users taken by batches that run (or are cut to run), or by requests that wait."""

    def __init__(self, taken: Iterable[frozenset[str] | None] = ()) -> None:
        self.everyone = False
        self.users: set[str] = set()
        for users in taken:
            self.add(users)

    def add(self, users: frozenset[str] | None) -> None:
        if users is EVERYONE:
            self.everyone = True
        elif not self.everyone:
            self.users.update(users)

    def overlaps(self, users: frozenset[str] | None) -> bool:
        if users is EVERYONE:
            return self.everyone or bool(self.users)
        return self.everyone or not self.users.isdisjoint(users)

    def frozen(self) -> frozenset[str] | None:
        return EVERYONE if self.everyone else frozenset(self.users)


def ordered_batches(items: Sequence[T], users: Callable[[T], frozenset[str] | None], size: Callable[[T], int], limit: int,
                    running: Iterable[frozenset[str] | None] = (), earlier: Sequence[tuple[int, frozenset[str] | None]] = (),
                    read_at: Callable[[T], int] | None = None) -> tuple[list[tuple[list[T], frozenset[str] | None]], list[T]]:
    """``items`` (in the order the worker read them) cut, in order, into batches of at most
    ``limit`` in ``size`` (an item bigger than that goes alone and whole; one of no size counts as
    one) that may all start now, beside each other and beside the batches that run, whose users
    are ``running``; and the items that must wait, in order.  An item waits when a running batch,
    a batch cut before it here, or an item that waits names one of its ``users`` (or every user:
    :data:`EVERYONE`), and when one of ``earlier`` does that was read before it: ``earlier`` are
    (read number, users) of requests that have not started and are not among ``items`` (another
    task's), in read order, and ``read_at`` gives an item's read number (required with
    ``earlier``).  Returns ``([(batch, its users), ...], waiting)``.  Pure."""
    taken = _Claims(running)
    waiting_users = _Claims()
    ahead = iter(earlier)
    next_ahead = next(ahead, None)
    batches: list[tuple[list[T], frozenset[str] | None]] = []
    waiting: list[T] = []
    batch: list[T] = []
    batch_users = _Claims()
    total = 0
    for item in items:
        if next_ahead is not None:
            # the other task's requests read before this item have not run: they hold their users
            # from here on as a waiting item of this task does
            read = read_at(item)
            while next_ahead is not None and next_ahead[0] < read:
                waiting_users.add(next_ahead[1])
                next_ahead = next(ahead, None)
        named = users(item)
        n = max(1, size(item))
        if taken.overlaps(named) or waiting_users.overlaps(named) or (batch and total + n > limit and batch_users.overlaps(named)):
            # (the last: it does not fit in the batch it would follow, and would run beside it)
            waiting.append(item)
            waiting_users.add(named)
            continue
        if batch and total + n > limit:
            batches.append((batch, batch_users.frozen()))
            taken.add(batches[-1][1])
            batch, batch_users, total = [], _Claims(), 0
        batch.append(item)
        batch_users.add(named)
        total += n
    if batch:
        batches.append((batch, batch_users.frozen()))
    return batches, waiting


class FlushGate:
    """Counts the batches of one task that are in the pool and says whether another may go:
    while fewer than ``limit`` run (at least one)."""

    def __init__(self, limit: int = 1) -> None:
        self.limit = max(1, limit)
        self._running: set[object] = set()

    @property
    def running(self) -> int:
        """Batches handed to the pool and not returned yet."""
        return len(self._running)

    def may_flush(self) -> bool:
        """Whether a batch may go now."""
        return len(self._running) < self.limit

    def started(self) -> object:
        """A batch went to the pool; returns the token to pass to :meth:`finished`."""
        token = object()
        self._running.add(token)
        return token

    def finished(self, token: object) -> None:
        """The batch of ``token`` returned (or was lost with its pool process).  A token from
        before :meth:`reset` is ignored."""
        self._running.discard(token)

    def reset(self) -> None:
        """Forget the running batches: the consumer restarted, and those batches' requests are
        the broker's again (their results still come back, and are ignored here)."""
        self._running.clear()


def batch_time_limits(tasks, conf) -> tuple[float | None, float | None]:
    """(soft, hard) time limit of a batch of requests of ``tasks``: each task's own, else the
    worker's (``conf.task_soft_time_limit``, ``conf.task_time_limit``), the shortest of them, so
    that no request runs longer than its own task allows; None where none is set.  Pure."""
    def shortest(limits):
        limits = [limit for limit in limits if limit]
        return min(limits) if limits else None
    return (shortest(task.soft_time_limit or conf.task_soft_time_limit for task in tasks),
            shortest(task.time_limit or conf.task_time_limit for task in tasks))


def messages_in(request) -> int:
    """How many messages a request holds, for the size of a batch (main process: not validated):
    a ``tasks.collect_many`` takes its list as ``messages`` or as its one positional argument."""
    messages = (request.kwargs or {}).get("messages")
    if messages is None and request.args and len(request.args) == 1:
        messages = request.args[0]
    return len(messages) if isinstance(messages, (list, tuple)) else 1

"""How the platform's long-running processes (the Celery worker and its pool, the push nodes) use
Python's cyclic garbage collector.  Call :func:`tune` once a process has started and
:func:`freeze` once more after a forked child has set itself up; any thread.

CPython collects reference cycles in three generations.  A full (generation 2) collection walks
every object the collector tracks, and a worker process holds about 80,000 of them (Celery,
kombu, redis-py, the store's engine and their modules).  Under load each ``collect_many`` batch
makes thousands of short-lived dicts and lists, so collections ran every few hundred allocations
and some of a batch's objects, alive at that moment, were promoted to the older generations,
which then filled up and were walked in full.  Measured with ``gc.callbacks`` during
``bench/e2e.py --mode batch --messages 60000`` (2026-12-02): about 0.28 s of CPU in collections
per pool process (three or four full collections of some 50 ms each), about 10% of the pool's
CPU, and about 0.2 s per node.

Two changes, which CPython's documentation of :func:`gc.freeze` suggests for pre-forking servers:

- **freeze what start-up made**: :func:`gc.freeze` moves every object that exists then (modules,
  the Celery app, connections) to a permanent generation that collections skip.  The worker
  freezes before its pool forks (children also share those pages copy-on-write for longer),
  and each pool process again once its store is open.  Frozen objects are still freed by
  reference counting when they go; only a cycle among them would stay.
- **collect the youngest generation every 20,000 net allocations instead of 700** (2,000 from Python 3.13)
  (:data:`GEN0_THRESHOLD`): a batch's temporaries are freed by reference counting before a
  collection sees them, so they are no longer promoted.  The cost is that garbage cycles wait
  longer: at most that many young objects, a few megabytes.

With both, in the same run the pool processes ran no collection at all and each node spent
about 0.07 s in collections, most of it before it had started.  A/B over three alternated runs
of ``--messages 40000`` (``bench/HISTORY.md``): CPU per message x0.85 in the pool, x0.89 in the
nodes.
"""

from __future__ import annotations

import gc

#: Net allocations of tracked objects between two collections of the youngest generation
#: (CPython's default is 700; 2,000 from Python 3.13).  The older generations keep CPython's thresholds.
GEN0_THRESHOLD = 20_000


def tune() -> None:
    """Raise the youngest generation's threshold and freeze what exists now."""
    _, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(GEN0_THRESHOLD, gen1, gen2)
    freeze()


def freeze() -> None:
    """Move every object tracked now to the permanent generation (after a start-up step, or in
    a forked child once it has set itself up)."""
    gc.freeze()

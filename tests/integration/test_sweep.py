"""The redelivery sweep of ``tasks.housekeeping`` (messages stored but never routed become
redelivery candidates), run in this process against the session's real Redis and the store
(embedded, or the MongoDB at ``MONGO_URL``)."""

from __future__ import annotations

import time
import uuid

import pytest

import redis as redis_lib

from tasks import housekeeping, pending
from tasks.ids import IdGenerator
from tasks.store import StoreUnavailable, get_store
from tests.conftest import redis_now
from wsnode.registry import NODES_KEY, route_key


@pytest.fixture
def routes(redis_server, monkeypatch):
    """The sweep on a Redis database of its own: the shared cluster's workers run housekeeping on
    ``REDIS_URL``'s (every second in the tests), which moves the mark and prunes candidates."""
    client = redis_lib.Redis.from_url(redis_server.url(5))
    client.flushdb()
    monkeypatch.setattr(housekeeping, "_redis", client)
    yield client
    client.flushdb()


def stored(age: float, user: str, now: float) -> str:
    """Store a message to ``user`` whose id is ``age`` seconds old at ``now``, and never route it."""
    mid = IdGenerator(clock=lambda: now - age).next_id()
    get_store().insert_messages([{"id": mid, "to": [user], "data": {"age": age}}])
    return mid


def online(routes, *users: str, node: str = "10.0.0.1:8001") -> None:
    """Leases for ``users`` on a live ``node``, as a push node writes them (by Redis's clock)."""
    until = redis_now(routes) + 600
    routes.zadd(NODES_KEY, {node: until})
    for user in users:
        routes.zadd(route_key(user), {node: until})


def candidates(routes, users: set[str]) -> set[tuple[str, str]]:
    return {pair for pair in pending.between(routes, 0, time.time() + 60) if pair[1] in users}


def test_a_sweep_makes_stored_unacked_deliveries_candidates_and_leaves_the_newest_to_the_next(routes):
    now, tag = time.time(), uuid.uuid4().hex[:8]
    ann, bob, cid = (f"{name}-{tag}" for name in ("ann", "bob", "cid"))
    online(routes, ann, bob, cid)
    lost = stored(200, ann, now)
    acked = stored(150, bob, now)
    get_store().record_receipts([{"id": acked, "user": bob, "state": "acked", "at": now - 100}])
    young = stored(10, cid, now)

    housekeeping.sweep(now - 400, now - 30)

    assert candidates(routes, {ann, bob, cid}) == {(lost, ann)}, "the acked delivery and the one younger than the window's end are not candidates"
    assert float(routes.get(housekeeping.SWEEP_MARK)) == pytest.approx(now - 30, abs=1e-3)

    housekeeping.sweep(now - 400, now + 1)  # the next sweep, later

    assert candidates(routes, {ann, bob, cid}) == {(lost, ann), (young, cid)}


def test_a_sweep_reads_from_one_overlap_before_the_previous_sweeps_end(routes):
    now, tag = time.time(), uuid.uuid4().hex[:8]
    within, before = f"within-{tag}", f"before-{tag}"
    online(routes, within, before)
    housekeeping.sweep(now - 400, now - 100)  # reads up to now - 100
    late = stored(100 + housekeeping.SWEEP_OVERLAP_SECONDS / 2, within, now)  # stored late, inside the overlap
    missed = stored(100 + housekeeping.SWEEP_OVERLAP_SECONDS * 2, before, now)  # read by the first sweep (it was not there yet)

    housekeeping.sweep(now - 400, now - 30)

    assert candidates(routes, {within, before}) == {(late, within)}
    assert [e["id"] for e in get_store().unacked(before, 10)[0]] == [missed], "it stays in its user's inbox, replayed at the next connection"


def test_without_a_mark_a_sweep_reads_the_whole_window_again(routes):
    """After a Redis restart (the mark and the candidates gone) the first sweep reads it all."""
    now, tag = time.time(), uuid.uuid4().hex[:8]
    user = f"dan-{tag}"
    online(routes, user)
    old = stored(300, user, now)
    housekeeping.sweep(now - 400, now - 30)
    routes.delete(housekeeping.SWEEP_MARK, pending.PENDING_KEY)

    housekeeping.sweep(now - 400, now - 30)

    assert candidates(routes, {user}) == {(old, user)}


def test_a_sweep_leaves_the_deliveries_of_users_offline_now_to_their_inbox(routes):
    """Only a user online now (a lease on a live node) can be sent a message again; one offline gets
    it from the inbox on connecting.  The sweep made every unacked delivery a candidate, which a
    burst to offline users turned into tens of thousands of store reads per housekeeping run."""
    now, tag = time.time(), uuid.uuid4().hex[:8]
    here, away, stale = f"here-{tag}", f"away-{tag}", f"stale-{tag}"
    online(routes, here)
    online(routes, stale, node="10.0.0.9:8001")
    routes.zadd(NODES_KEY, {"10.0.0.9:8001": redis_now(routes) - 100})  # that node's own lease ended: it is dead
    sent = {user: [stored(age, user, now) for age in (200, 150)] for user in (here, away, stale)}

    housekeeping.sweep(now - 400, now - 30)

    assert candidates(routes, {here, away, stale}) == {(mid, here) for mid in sent[here]}
    assert [e["id"] for e in get_store().unacked(away, 10)[0]] == sent[away]


def test_a_sweep_checks_many_users_against_the_leases_in_chunks(routes, monkeypatch):
    monkeypatch.setattr(housekeeping, "SWEEP_CHUNK", 7)
    now, tag = time.time(), uuid.uuid4().hex[:8]
    users = [f"u{n}-{tag}" for n in range(20)]
    online(routes, *users[::2])
    sent = {user: stored(200, user, now) for user in users}

    housekeeping.sweep(now - 400, now - 30)

    assert candidates(routes, set(users)) == {(sent[user], user) for user in users[::2]}


def test_a_redelivery_run_that_fails_puts_its_start_back_so_the_next_run_skips_no_crossing(routes, monkeypatch):
    """Each run counts the threshold crossings since the previous run's time (``LAST_RUN``), which
    it moves first.  A run that failed (here the store is unavailable) used to leave it moved: what
    crossed a threshold during it was never re-sent."""
    now, user = time.time(), f"due-{uuid.uuid4().hex[:8]}"
    online(routes, user)
    routes.set(housekeeping.LAST_RUN, now - 1)
    mid = IdGenerator(clock=lambda: now - housekeeping.thresholds()[0] - 0.5).next_id()  # crossed the first threshold half a second ago
    routes.zadd(pending.PENDING_KEY, {member: score for _, member, score in pending.marks([(mid, user)])})

    class Unavailable:
        def not_acked(self, pairs):
            raise StoreUnavailable("the store does not answer (test)")

    monkeypatch.setattr(housekeeping, "get_store", Unavailable)
    monkeypatch.setattr(housekeeping, "sweep", lambda start, end: 0)
    with pytest.raises(StoreUnavailable):
        housekeeping.redeliver(now)
    assert float(routes.get(housekeeping.LAST_RUN)) == pytest.approx(now - 1, abs=1e-3)
    assert (mid, user) in candidates(routes, {user})  # still due for the next run


def test_a_redelivery_run_killed_midway_leaves_the_next_run_its_crossings(routes, monkeypatch):
    """A run killed (its worker process SIGKILLed, where no ``except`` runs: stood for here by an
    exception that is not an ``Exception``) left ``LAST_RUN`` at its own start, and the crossings
    of its period were never re-sent; the next run now counts from where the killed one did, and
    moves ``LAST_RUN`` once it has sent."""
    now = time.time()
    routes.set(housekeeping.LAST_RUN, now - 1)

    def killed(now, since):
        raise SystemExit("killed")

    monkeypatch.setattr(housekeeping, "_redeliver", killed)
    with pytest.raises(SystemExit):
        housekeeping.redeliver(now)
    assert float(routes.get(housekeeping.LAST_RUN)) == pytest.approx(now - 1, abs=1e-3)

    counted = []
    monkeypatch.setattr(housekeeping, "_redeliver", lambda now, since: counted.append((now, since)) or 3)
    assert housekeeping.redeliver(now + 1) == 3
    assert counted == [(now + 1, pytest.approx(now - 1, abs=1e-3))]
    assert float(routes.get(housekeeping.LAST_RUN)) == pytest.approx(now + 1, abs=1e-3)
    # A later run that moved it meanwhile is not moved back.
    monkeypatch.setattr(housekeeping, "_redeliver", lambda now, since: routes.set(housekeeping.LAST_RUN, now + 5) and 0)
    housekeeping.redeliver(now + 2)
    assert float(routes.get(housekeeping.LAST_RUN)) == pytest.approx(now + 7, abs=1e-3)


def test_a_housekeeping_run_is_skipped_while_another_holds_the_run_lock_and_releases_its_own(routes, monkeypatch):
    """Runs used to overlap when one took longer than HOUSEKEEPING_SECONDS (a large hand-back, a
    purge of the embedded store): two redelivery runs at once, and one that failed could not put
    its start back."""
    routes.set(housekeeping.RUN_LOCK, "another run", ex=60)
    routes.set(housekeeping.LAST_RUN, 1234.5)
    assert housekeeping.housekeeping.run() == {"skipped": True}
    assert float(routes.get(housekeeping.LAST_RUN)) == 1234.5  # this run did nothing
    routes.delete(housekeeping.RUN_LOCK)
    monkeypatch.setattr(housekeeping, "sweep", lambda start, end: 0)
    monkeypatch.setattr(housekeeping, "reclaim_dead_nodes", lambda now: 0)
    result = housekeeping.housekeeping.run()
    assert result["redelivered"] == 0 and result["reclaimed"] == 0
    assert float(routes.get(housekeeping.LAST_RUN)) > 1234.5
    assert not routes.exists(housekeeping.RUN_LOCK), "a run kept its lock"

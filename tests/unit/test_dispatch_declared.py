"""Pure tests of what a worker process remembers of the node queues it declared
(``tasks.dispatch._declared``): nothing is sent, no broker is needed."""

from __future__ import annotations

import pytest

from tasks import dispatch


@pytest.fixture
def declared(monkeypatch):
    table: dict[str, float] = {}
    monkeypatch.setattr(dispatch, "_declared_at", table)
    return table


def test_the_nodes_remembered_stay_bounded_as_addresses_come_and_go(declared):
    """A node's address changes when it restarts on another host or pod: a worker process that
    lives for months would otherwise remember every address it ever published to."""
    step = dispatch.DECLARE_EVERY_SECONDS / 10
    for n in range(20 * dispatch.MAX_DECLARED_NODES):
        dispatch._declared(f"10.0.{n // 250}.{n % 250}:8101", n * step)
    assert len(declared) <= dispatch.MAX_DECLARED_NODES


def test_a_node_declared_within_the_period_is_remembered_past_the_bound(declared):
    """Only what would be declared again anyway is forgotten: a node declared less than
    DECLARE_EVERY_SECONDS ago is not declared again before that, whatever the count."""
    now = 1000.0
    for n in range(dispatch.MAX_DECLARED_NODES + 10):
        dispatch._declared(f"node-{n}:8101", now)
    assert len(declared) == dispatch.MAX_DECLARED_NODES + 10
    dispatch._declared("late:8101", now + dispatch.DECLARE_EVERY_SECONDS)
    assert declared == {"late:8101": now + dispatch.DECLARE_EVERY_SECONDS}


def test_threads_of_one_process_remember_their_declarations_at_once_past_the_bound(declared):
    """Under ``-P threads`` the tasks of one process publish on several threads at once: one
    thread forgetting the stale nodes while another remembers one (or forgets the same ones) raised
    ``dictionary changed size during iteration`` (or ``KeyError``) after the batch was published,
    failing the task."""
    import sys
    import threading

    errors: list[BaseException] = []
    period = dispatch.DECLARE_EVERY_SECONDS

    def remember(thread: int) -> None:
        try:
            for n in range(3000):
                # Every call finds the table past its bound, most of it stale.
                dispatch._declared(f"10.{thread}.{n // 250}.{n % 250}:8101", (n // 100) * period)
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        threads = [threading.Thread(target=remember, args=(t,)) for t in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(interval)
    assert errors == []

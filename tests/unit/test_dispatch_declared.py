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


def test_kombus_own_record_of_the_node_queues_stays_bounded_as_addresses_come_and_go(declared, monkeypatch):
    """kombu's virtual transports (Redis) keep, per connection, every exchange and binding declared
    through it (``BrokerState``) and, on Redis, per channel every queue's ``x-expires``: a worker
    process that published to node after node kept about 2.9 KB per address it ever declared
    (+8.6 MB of RSS for 3,000 addresses, measured against a Redis broker), whatever
    ``_declared_at`` forgot.  Those of the nodes forgotten there are forgotten in kombu too."""
    from celery import Celery

    memory = Celery("declared-test", broker="memory://", set_as_current=False)
    monkeypatch.setattr(dispatch, "app", memory)
    monkeypatch.setattr(dispatch, "MAX_DECLARED_NODES", 20)
    monkeypatch.setattr(dispatch, "DECLARE_EVERY_SECONDS", 0.0)  # every node stale as soon as declared
    with memory.connection_for_write() as conn:
        state = conn.transport.state
        state.clear()
        for n in range(200):
            dispatch.publish_all([(f"10.1.{n // 250}.{n % 250}:8101", [{"id": "m", "to": "u", "data": 1}], {})])
        nodes = [name for name in state.exchanges if name.startswith("10.1.")]
        bound = {queue for queue, _, _ in state.bindings if queue.startswith("10.1.")}
        assert len(nodes) <= dispatch.MAX_DECLARED_NODES + 1, len(nodes)
        assert len(bound) <= dispatch.MAX_DECLARED_NODES + 1, len(bound)
        assert len([q for q in state.queue_index if q.startswith("10.1.")]) <= dispatch.MAX_DECLARED_NODES + 1
        state.clear()

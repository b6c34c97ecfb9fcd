"""Pure tests of ``wsnode.presence``: the replies a push node gives to Celery's remote control and
the events it sends, built from plain values; no broker, no thread started."""

from __future__ import annotations

import json
import types

from celery import Celery

from tasks.queues import DELIVER_TASK, Delivery, node_queue
from wsnode.presence import (
    HEARTBEAT_SECONDS,
    ControlPanel,
    DeliveredMessage,
    Presence,
    broker_info,
    delivered_message,
    delivery_events,
    heartbeat_fields,
    node_name,
    task_fields,
)

ADDRESS = "10.0.0.7:8101"
HEADERS = {"id": "task-1", "task": DELIVER_TASK, "argsrepr": "([{'id': 'm1'}],)", "kwargsrepr": "{}",
           "root_id": "root-1", "parent_id": "collect-1", "retries": 0, "eta": None, "expires": None, "lang": "py"}


def panel(consuming: bool = True, **kwargs) -> ControlPanel:
    return ControlPanel(node_name(ADDRESS), node_queue(ADDRESS), consuming=lambda: consuming, prefetch=512, **kwargs)


def call(p: ControlPanel, method: str, **arguments):
    """As kombu's pidbox Node calls a handler: ``handlers[method](state, **arguments)``."""
    return p.handlers()[method](None, **arguments)


def test_a_node_is_named_wsnode_at_its_address():
    assert node_name(ADDRESS) == "wsnode@10.0.0.7:8101"


def test_ping_answers_pong_as_a_celery_worker_does():
    assert call(panel(), "ping") == {"ok": "pong"}


def test_active_queues_lists_the_node_queue_while_its_consumer_is_connected():
    (queue,) = call(panel(consuming=True), "active_queues")
    assert queue["name"] == ADDRESS and queue["routing_key"] == ADDRESS and queue["exchange"]["name"] == ADDRESS


def test_active_queues_is_empty_while_the_consumer_has_no_broker_connection():
    assert call(panel(consuming=False), "active_queues") == []


def test_every_reply_is_json():
    p = panel()
    p.broker = {"hostname": "127.0.0.1", "transport": "redis"}
    for method in ("ping", "active_queues", "stats", "registered", "active", "reserved", "scheduled", "revoked", "conf", "clock"):
        json.dumps(call(p, method))


def test_stats_counts_delivered_messages_under_the_deliver_task():
    p = panel()
    p.processed = 7
    stats = call(p, "stats")
    assert stats["total"] == {DELIVER_TASK: 7}
    assert stats["prefetch_count"] == 512


def test_stats_carries_the_broker_info_flower_shows_in_its_broker_tab():
    p = panel()
    p.broker = {"hostname": "127.0.0.1", "transport": "amqp"}
    assert call(p, "stats")["broker"] == {"hostname": "127.0.0.1", "transport": "amqp"}


def test_broker_info_drops_the_password_and_the_alternate_urls():
    info = broker_info({"hostname": "h", "userid": "u", "password": "secret", "alternates": ["amqp://u:secret@h2"]})
    assert info == {"hostname": "h", "userid": "u"}


def test_the_only_registered_task_is_wsnode_deliver():
    assert call(panel(), "registered") == [DELIVER_TASK]


def test_task_lists_are_empty_even_with_flowers_safe_argument():
    p = panel()
    assert call(p, "active", safe=True) == [] and call(p, "reserved") == [] and call(p, "scheduled") == [] and call(p, "revoked") == []


def test_mingles_hello_gets_no_reply_to_sync_with():
    assert call(panel(), "hello", from_node="worker@host", revoked=[]) is None


def test_task_events_are_off_by_default():
    assert panel().task_events is False


def test_enable_events_turns_task_events_on_with_celerys_reply():
    p = panel()
    assert call(p, "enable_events") == {"ok": "task events enabled"}
    assert p.task_events is True
    assert call(p, "enable_events") == {"ok": "task events already enabled"}


def test_disable_events_turns_task_events_off_with_celerys_reply():
    p = panel(task_events=True)
    assert call(p, "disable_events") == {"ok": "task events disabled"}
    assert p.task_events is False
    assert call(p, "disable_events") == {"ok": "task events already disabled"}


def test_the_heartbeat_command_asks_for_a_heartbeat_now():
    p = panel()
    call(p, "heartbeat")
    assert p.beat_now is True


def test_an_unsupported_command_gets_an_error_that_names_it_and_the_node():
    reply = call(panel(), "pool_grow", n=2)
    assert "pool_grow" in reply["error"] and node_name(ADDRESS) in reply["error"]


def test_heartbeats_use_celerys_two_second_interval():
    fields = heartbeat_fields(processed=3, active=0, loadavg=(0.5, 0.25, 0.1))
    assert fields["freq"] == HEARTBEAT_SECONDS == 2.0
    assert fields["processed"] == 3 and fields["active"] == 0 and fields["loadavg"] == [0.5, 0.25, 0.1]


def test_task_fields_come_from_the_celery_message_headers():
    assert task_fields(HEADERS) == {"uuid": "task-1", "name": DELIVER_TASK, "args": HEADERS["argsrepr"], "kwargs": "{}",
                                    "root_id": "root-1", "parent_id": "collect-1", "retries": 0, "eta": None, "expires": None}


def test_a_message_without_a_task_id_has_no_task_fields():
    assert task_fields({"task": DELIVER_TASK}) is None


def test_a_delivered_message_is_received_started_then_succeeded_with_its_task_id():
    message = DeliveredMessage(task_fields(HEADERS), envelopes=2)
    events = delivery_events(message, received=10.0, started=10.5, finished=10.75)
    assert [kind for kind, _ in events] == ["task-received", "task-started", "task-succeeded"]
    assert {fields["uuid"] for _, fields in events} == {"task-1"}
    received, started, succeeded = (fields for _, fields in events)
    assert received["name"] == DELIVER_TASK and received["parent_id"] == "collect-1"
    assert (received["timestamp"], started["timestamp"], succeeded["timestamp"]) == (10.0, 10.5, 10.75)
    assert succeeded["runtime"] == 0.25 and succeeded["result"] == "2 envelopes"


def test_a_batch_that_failed_on_the_loop_is_reported_failed_with_the_error():
    message = DeliveredMessage(task_fields(HEADERS), envelopes=1)
    kind, fields = delivery_events(message, 1.0, 1.0, 2.0, error="RuntimeError('boom')")[-1]
    assert kind == "task-failed" and fields["exception"] == "RuntimeError('boom')"


def test_a_replay_page_says_so_in_its_result():
    message = DeliveredMessage(task_fields(HEADERS), envelopes=5, replay=True)
    assert delivery_events(message, 1.0, 1.0, 1.0)[-1][1]["result"] == "5 envelopes (replay page)"


def test_a_delivery_becomes_a_delivered_message_from_its_queue_message():
    delivery = Delivery([{"id": "m1", "data": 1, "to": ["u"]}], message=types.SimpleNamespace(headers=HEADERS))
    assert delivered_message(delivery) == DeliveredMessage(task_fields(HEADERS), 1, False)


def presence() -> Presence:
    app = Celery(broker="memory://")  # never connected: the thread is not started
    return Presence(app, node_name(ADDRESS), node_queue(ADDRESS), consuming=lambda: True, prefetch=512)


def delivery() -> Delivery:
    return Delivery([{"id": "m1", "data": 1, "to": ["u"]}], message=types.SimpleNamespace(headers=HEADERS))


def test_with_task_events_off_a_delivered_batch_is_only_counted():
    p = presence()
    p.delivered([delivery(), delivery()], 1.0, 1.0, 1.0)
    assert p.panel.processed == 2
    assert p._records.empty()


def test_with_task_events_on_a_delivered_batch_is_queued_for_the_presence_thread():
    p = presence()
    call(p.panel, "enable_events")
    batch = [delivery()]
    p.delivered(batch, 1.0, 2.0, 3.0, None)
    assert p._records.get_nowait() == (batch, 1.0, 2.0, 3.0, None)


def test_a_full_event_queue_drops_the_batch_instead_of_blocking_delivery():
    p = presence()
    call(p.panel, "enable_events")
    while not p._records.full():
        p._records.put_nowait(None)
    p.delivered([delivery()], 1.0, 1.0, 1.0)
    assert p._dropped == 1 and p.panel.processed == 1


class Waits:
    """The presence thread's stop event, recording each wait before a reconnection (without
    waiting); set after ``count``.  ``on_wait(n)``, when given, runs at the n-th wait."""

    def __init__(self, count: int, on_wait=None) -> None:
        self.waits: list[float] = []
        self._count = count
        self._on_wait = on_wait

    def is_set(self) -> bool:
        return len(self.waits) >= self._count

    def set(self) -> None:
        pass

    def wait(self, delay: float) -> bool:
        self.waits.append(delay)
        if self._on_wait is not None:
            self._on_wait(len(self.waits))
        return self.is_set()


def test_a_connection_that_fails_before_serving_worked_keeps_backing_off():
    """A broker that accepts the connection but on which serving fails at once (a user without
    rights to the control or event exchanges) is retried with a doubling delay, not every 0.5 s
    with a warning each time.  (Once serving worked, the delay starts again at 0.5 s:
    tests/integration/test_presence_reconnect.py.)"""
    p = presence()  # memory:// broker: connecting always works
    p._stopping = Waits(5)

    def serve(conn):
        raise ConnectionError("access refused to the pidbox exchange")

    p._serve = serve
    p._run()
    assert p._stopping.waits == [0.5, 1.0, 2.0, 4.0, 8.0]


"""kombu's Redis transport as ``tasks.redis_transport`` changes it, against real redis-servers: the
app uses it; publishing, consuming with acknowledgements and acking go through one client object;
a read takes a backlog and records every task it takes; a group of requests is acked in one round
trip; and the tasks a killed worker had read in bulk come back and run once."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import socket
import threading
import time
import uuid
from contextlib import contextmanager, nullcontext, suppress

import psutil
import pytest
import redis as redis_lib
from kombu import Exchange, Producer, Queue
from kombu.utils.json import dumps, loads

import launcher
from tasks import backlogread
from tasks.backlogread import kombu_message
from tasks.redis_transport import Channel, QoS, Transport, acknowledge
from tests.conftest import redis_version, skip_before_redis_7
from tests.integration.test_redis_full import over_maxmemory
from worker import app


def test_the_app_uses_it_on_a_redis_broker(redis_server):
    with app.connection_for_write() as conn:
        assert isinstance(conn.transport, Transport)
        assert isinstance(conn.default_channel, Channel)
        assert conn.as_uri().startswith("redis://")  # what Flower's Broker page reads


def test_publish_consume_and_ack_go_through_one_client_object(redis_server, monkeypatch):
    built = []
    original = Channel._create_client

    def counting(self, asynchronous=False):
        client = original(self, asynchronous=asynchronous)
        if not asynchronous:
            built.append(client)
        return client

    monkeypatch.setattr(Channel, "_create_client", counting)
    name = f"test-transport-{uuid.uuid4().hex[:8]}"
    queue = Queue(name, Exchange(name, type="direct"), routing_key=name)
    got = []
    with app.connection_for_write() as conn:
        channel = conn.channel()
        try:
            producer = Producer(channel)
            for n in range(5):
                producer.publish({"n": n}, exchange=queue.exchange, routing_key=name, declare=[queue], serializer="json")

            def on_message(body, message):
                got.append(body["n"])
                message.ack()

            with conn.Consumer([queue], channel=channel, callbacks=[on_message], accept=["json"]):
                while len(got) < 5:
                    conn.drain_events(timeout=5)
            with channel.conn_or_acquire() as client:
                unacked = client.hlen(channel.unacked_key)
                client.delete(name)
        finally:
            channel.close()

    assert sorted(got) == [0, 1, 2, 3, 4]
    assert unacked == 0  # every ack went through: nothing left to restore
    # kombu's own channel builds a client for each publish, each record of a delivery and each ack
    assert len(built) == 1


class _Request:
    """What :func:`acknowledge` uses of a Celery request: its message, and ``acknowledge()``
    acking that message once (as ``celery.worker.request.Request`` does)."""

    def __init__(self, message) -> None:
        self.message = message
        self.acknowledged = False

    def acknowledge(self) -> None:
        if not self.acknowledged:
            self.message.ack()
            self.acknowledged = True


@contextmanager
def _published(count: int, url: str | None = None):
    """``(connection, channel, queue)``: a channel of the app's broker connection (to ``url``
    when given) and a fresh queue holding ``count`` messages ``{"n": 0}``, ``{"n": 1}``...; the
    queue is deleted after."""
    name = f"test-transport-{uuid.uuid4().hex[:8]}"
    queue = Queue(name, Exchange(name, type="direct"), routing_key=name)
    with app.connection_for_write(url) as conn:
        channel = conn.channel()
        try:
            producer = Producer(channel)
            producer.maybe_declare(queue)
            for n in range(count):
                producer.publish({"n": n}, exchange=queue.exchange, routing_key=name, serializer="json")
            yield conn, channel, queue
        finally:
            with channel.conn_or_acquire() as client:
                client.delete(name)
            channel.close()


def _consume(conn, channel, queue, count):
    got = []
    with conn.Consumer([queue], channel=channel, callbacks=[lambda body, message: got.append(message)], accept=["json"]):
        while len(got) < count:
            conn.drain_events(timeout=5)
    return got


def _recorded(client, channel, tags):
    """Per tag: recorded as unacknowledged in kombu's hash and index."""
    return [bool(client.hexists(channel.unacked_key, t)) and client.zscore(channel.unacked_index_key, t) is not None for t in tags]


def test_acknowledge_acks_a_group_of_requests_in_one_round_trip(redis_server, monkeypatch):
    single = []
    original = QoS._remove_from_indices
    monkeypatch.setattr(QoS, "_remove_from_indices", lambda self, tag, pipe=None: single.append(tag) or original(self, tag, pipe))
    with _published(6) as (conn, channel, queue):
        messages = _consume(conn, channel, queue, 6)
        tags = [m.delivery_tag for m in messages]
        with channel.conn_or_acquire() as client:
            before = _recorded(client, channel, tags)
            requests = [_Request(m) for m in messages]
            requests[0].acknowledge()  # acked on its own before: skipped, not acked twice
            acknowledge(requests)
            acknowledge(requests)  # again: nothing left to do
            after = _recorded(client, channel, tags)
        forgotten = set(channel.qos._forgotten)

    assert before == [True] * 6
    assert after == [False] * 6
    assert all(m.acknowledged for m in messages)
    assert single == tags[:1]  # only the one acked on its own went through kombu's per-message removal
    assert not forgotten


def test_acknowledge_falls_back_to_one_ack_each_when_the_group_fails(redis_server, monkeypatch):
    def broken(self, tags):
        raise ConnectionError("Redis went away")

    monkeypatch.setattr(QoS, "forget", broken)
    with _published(1) as (conn, channel, queue):
        (message,) = _consume(conn, channel, queue, 1)
        acknowledge([_Request(message)])
        with channel.conn_or_acquire() as client:
            still_recorded = _recorded(client, channel, [message.delivery_tag])
    assert message.acknowledged and still_recorded == [False]


def test_messages_read_and_not_acked_go_back_in_their_order_when_the_channel_closes(redis_server):
    """What a worker had read and not started goes back to the queue when it stops (Celery's warm
    shutdown closes the channel).  kombu put it back oldest first, each to the end reads take from,
    so the next worker ran it newest first: a user's requests that one business process sent in
    order got their ids, and arrived, in reverse (a randomized run with a worker stopped under
    load: 104 pairs of one user's messages out of send order, all from one restored backlog)."""
    with _published(5) as (conn, channel, queue):
        channel.basic_qos(0, 10, False)
        got = _consume(conn, channel, queue, 5)
        channel.close()
        after_close = _queued(conn.default_channel, queue)

    assert [m.payload["n"] for m in got] == [0, 1, 2, 3, 4]
    assert after_close == [0, 1, 2, 3, 4]


def test_a_read_takes_the_backlog_up_to_the_prefetch_window_and_records_every_message(redis_server):
    got = []
    with _published(10) as (conn, channel, queue):
        channel.basic_qos(0, 4, False)
        with conn.Consumer([queue], channel=channel, callbacks=[lambda body, message: got.append(message)], accept=["json"]):
            conn.drain_events(timeout=5)  # one read
            first_read = [m.payload["n"] for m in got]
            with channel.conn_or_acquire() as client:
                left = client.llen(queue.name)
                recorded = _recorded(client, channel, [m.delivery_tag for m in got])
                requests = [_Request(m) for m in got]
                acknowledge(requests)
                while len(got) < 10:  # the window is full until its messages are acked
                    conn.drain_events(timeout=5)
                    requests += [_Request(m) for m in got[len(requests):]]
                    acknowledge(requests)
                after = _recorded(client, channel, [m.delivery_tag for m in got])

    assert first_read == [0, 1, 2, 3]  # the BRPOP's message and the 3 the window had room for, in order
    assert left == 6
    assert recorded == [True] * 4  # each one is brought back if the worker dies before it acks
    assert sorted(m.payload["n"] for m in got) == list(range(10))
    assert after == [False] * 10


def _queued(channel, queue) -> list[int]:
    """The ``n`` of the messages on ``queue``, in the order reads take them."""
    with channel.conn_or_acquire() as client:
        return [json.loads(base64.b64decode(json.loads(item)["body"]))["n"] for item in reversed(client.lrange(queue.name, 0, -1))]


def test_a_channel_closed_with_its_brpop_in_flight_delivers_that_message_alone_and_keeps_the_rest_queued(redis_server):
    """A close (Celery's consumer collecting its connection after an error) reads the ``BRPOP``
    in flight; that read took the backlog too, up to the prefetch window, delivered it, and the
    close's restore then pushed it all back: every message of it ran twice."""
    got = []
    with _published(0) as (conn, channel, queue):
        channel.basic_qos(0, 10, False)
        with conn.Consumer([queue], channel=channel, callbacks=[lambda body, message: got.append(body["n"])], accept=["json"]):
            with suppress(socket.timeout):
                conn.drain_events(timeout=0.3)  # leaves a BRPOP in flight
            with app.connection_for_write() as other:
                producer = Producer(other.default_channel)
                for n in range(10):
                    producer.publish({"n": n}, exchange=queue.exchange, routing_key=queue.name, serializer="json")
            time.sleep(0.2)
            channel.close()
        after = _queued(conn.default_channel, queue)
        with conn.default_channel.conn_or_acquire() as client:
            unacked = client.hlen(channel.unacked_key)

    assert got == [0]  # the message BRPOP brought, as kombu's own close delivers it
    assert sorted(after) == list(range(10)) and unacked == 0  # it too is back: its task never ran, nor acked


def test_messages_read_behind_one_whose_callback_raised_are_put_back_at_once_in_order(redis_server):
    """A read takes the backlog behind the message ``BRPOP`` brought; a callback that raised on one
    left those behind it recorded as unacknowledged and never delivered, back only after the
    visibility timeout (a minute), out of order, not even when the channel closed."""
    got = []

    def callback(body, message):
        got.append(body["n"])
        if body["n"] == 2:
            raise RuntimeError("this message's handling failed")

    with _published(10) as (conn, channel, queue):
        channel.basic_qos(0, 10, False)
        with conn.Consumer([queue], channel=channel, callbacks=[callback], accept=["json"]):
            with pytest.raises(RuntimeError):
                conn.drain_events(timeout=5)
            queued = _queued(channel, queue)
            with channel.conn_or_acquire() as client:
                # This queue's only: the session's worker shares the broker's unacked hash, and
                # a task of its own there at that moment counted too (4 == 3, once in CI).
                unacked = sum(1 for raw in client.hvals(channel.unacked_key) if json.loads(raw)[2] == queue.name)
        channel.close()
        after_close = _queued(conn.default_channel, queue)

    assert got == [0, 1, 2]
    assert queued == list(range(3, 10)) and unacked == 3  # those delivered stay the consumer's, as kombu's
    assert after_close == list(range(10))  # the close restores the three, in order, ahead of the rest


def test_on_redis_6_2_the_read_drops_the_script_flags_takes_the_backlog_and_warns_once_per_process(old_redis_server, monkeypatch, caplog):
    """Redis 6.2 does not compile the read script's ``#!lua flags=allow-oom``: the read runs it
    again without the line at once.  It returned nothing instead, so every channel's first read
    took one task (kombu's way), and each channel (one per broker reconnection) logged the warning."""
    monkeypatch.setattr(backlogread, "_warned_no_flags", False, raising=False)
    reads, recorded = [], []
    with caplog.at_level(logging.WARNING, logger="tasks.redis_transport"):
        for _ in range(2):  # two channels, as after a reconnection
            with _published(6, old_redis_server.url(0)) as (conn, channel, queue):
                channel.basic_qos(0, 4, False)
                got = []
                with conn.Consumer([queue], channel=channel, callbacks=[lambda body, message: got.append(message)], accept=["json"]):
                    conn.drain_events(timeout=5)  # one read
                    with channel.conn_or_acquire() as client:
                        recorded.append(_recorded(client, channel, [m.delivery_tag for m in got]))
                        acknowledge([_Request(m) for m in got])
                reads.append([m.payload["n"] for m in got])
    warnings = [r.getMessage() for r in caplog.records if "script flags" in r.getMessage()]

    assert redis_version(redis_lib.Redis.from_url(old_redis_server.url())) < (7,)
    assert reads == [[0, 1, 2, 3]] * 2
    assert recorded == [[True] * 4] * 2
    assert len(warnings) == 1, warnings
    assert "is lost" in warnings[0]


def test_on_redis_6_2_a_task_read_while_redis_is_over_maxmemory_is_lost(old_redis_server):
    """What the README says of a Redis older than 7: without allow-oom the read cannot record the
    task ``BRPOP`` took out of its list while Redis is full (nor can kombu's append), so the read
    fails and the task is neither in its queue nor recorded as unacknowledged.  (On Redis 7,
    ``test_redis_full.py`` shows such a task read and stored.)"""
    with _published(1, old_redis_server.url(0)) as (conn, channel, queue):
        with channel.conn_or_acquire() as client:
            with conn.Consumer([queue], channel=channel, callbacks=[lambda body, message: None], accept=["json"]):
                with over_maxmemory(client), pytest.raises(redis_lib.exceptions.OutOfMemoryError):
                    conn.drain_events(timeout=5)
            left = client.llen(queue.name)
            recorded = client.hlen(channel.unacked_key)
    assert (left, recorded) == (0, 0)


def test_with_celerys_disable_prefetch_a_worker_takes_one_task_per_pool_process(tmp_path):
    """Celery's worker_disable_prefetch (--disable-prefetch) replaces the task channel QoS's
    can_consume with one that says no while the worker holds a reserved task per pool process:
    a worker of 2 processes that runs nothing (its pool stopped) takes 2 tasks of a backlog of 10,
    one per read.  A read was sized by the prefetch window alone (200) and took all 10."""
    from tests.integration.conftest import Cluster

    redis_server = launcher.RedisServer(data_dir=tmp_path / "redis").start()
    cluster = Cluster(redis_server, tmp_path, auth_port=launcher.free_port())
    try:
        # A queue nobody sends to: the worker reads no task until it is told to consume collect.
        worker = cluster.start_worker("no-prefetch", queues=f"idle-{uuid.uuid4().hex[:8]}", concurrency=2, options=["--disable-prefetch"])
        pool = psutil.Process(worker.pid).children()
        assert len(pool) == 2, pool
        for process in pool:
            process.suspend()
        ids = {cluster.send(to=f"no-prefetch-{n}", data={"n": n}).id for n in range(10)}
        broker = redis_lib.Redis.from_url(cluster.env["BROKER_URL"])
        assert broker.llen("collect") == 10
        replies = cluster.business.control.add_consumer("collect", destination=[f"no-prefetch@{socket.gethostname()}"], reply=True, timeout=10)
        assert replies and all("ok" in answer for reply in replies for answer in reply.values()), replies
        deadline = time.monotonic() + 15
        while broker.llen("collect") > 8 and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(1)  # time for any further read to happen
        left = broker.llen("collect")
        taken = [loads(record)[0]["headers"]["id"] for record in broker.hvals("unacked")]
        worker.kill()
    finally:
        cluster.stop(at_once=True)
        redis_server.stop()

    assert left == 8
    assert len(taken) == 2 and set(taken) <= ids  # one task per pool process, each recorded as taken


def test_a_message_not_in_kombus_format_stays_in_the_queue_for_a_read_of_its_own(redis_server):
    with _published(1) as (conn, channel, queue):
        with channel.conn_or_acquire() as client:
            client.lpush(queue.name, b'{"not": "kombu"}')
            Producer(channel).publish({"n": 2}, exchange=queue.exchange, routing_key=queue.name, serializer="json")
            channel.basic_consume(queue.name, False, lambda message: None, "test-consumer")
            raw = client.rpop(queue.name).decode()  # what BRPOP would have brought
            payload = loads(raw)
            tag = payload["properties"]["delivery_tag"]
            taken = channel._take_more(queue.name.encode(), queue.name, raw, payload)
            left = client.lrange(queue.name, 0, -1)
            first_recorded = _recorded(client, channel, [tag])
            client.zrem(channel.unacked_index_key, tag)
            client.hdel(channel.unacked_key, tag)

    assert taken == []
    assert len(left) == 2 and left[-1] == b'{"not": "kombu"}'  # next to be read, then the message behind it
    assert loads(left[0])["properties"]["delivery_info"]["routing_key"] == queue.name
    assert first_recorded == [True]


def _shaped(body: object = "e30=", tag: object = "t", info: object = None, encoding: object = "base64") -> bytes:
    """An item in kombu's format, each part of which may be one kombu cannot read."""
    info = {"exchange": "", "routing_key": "q"} if info is None else info
    return json.dumps({"body": body, "properties": {"delivery_tag": tag, "delivery_info": info, "body_encoding": encoding}}).encode()


#: Tagged values kombu's decoder rebuilds, with a value its hook raises on (not a ValueError).
BAD_TAGGED = ['{"__type__": "decimal", "__value__": "x"}', '{"__type__": "bytes", "__value__": 5}']
GARBAGE = [b"\xff\xfe not json", b'{"not": "kombu"}', b"[1, 2]", b'{"properties": {"delivery_tag": "t"}}', b'{"__type__": "datetime", "__value__": 7}',
           *(t.encode() for t in BAD_TAGGED), b"[" * 5000 + b"]" * 5000,  # RecursionError
           _shaped(tag=["t"]), _shaped(tag=7), _shaped(info="celery")]
#: kombu's format, and a body its encoding does not decode: the read script takes them (it checks
#: the properties only), kombu's Message raised on them.
BAD_BODIES = [_shaped(body="!!!not base64"), _shaped(body="é"), _shaped(body=5), _shaped(encoding="rot13")]


#: kombu's format, with headers, a content type or a content encoding kombu's Message and decoder
#: raise on, out of a worker's loop (each stopped the worker: "Unrecoverable error").
BAD_ENVELOPES = [json.dumps({**json.loads(_shaped()), **fields}).encode()
                 for fields in ({"headers": ["task"]}, {"headers": "x"}, {"content-encoding": 5}, {"content-type": ["application/json"]})]


def test_what_is_not_a_kombu_message_is_told_apart():
    assert all(kombu_message(item.decode(errors="replace")) is None for item in GARBAGE + BAD_BODIES + BAD_ENVELOPES)
    message = '{"body": "e30=", "properties": {"delivery_tag": "t", "delivery_info": {"exchange": "", "routing_key": "q"}}}'
    assert kombu_message(message)["properties"]["delivery_tag"] == "t"
    assert kombu_message(_shaped().decode())["properties"]["delivery_tag"] == "t"
    assert kombu_message(_shaped(body="{}", encoding="utf-8").decode())["body"] == "{}"
    fine = {"headers": {"task": "x"}, "content-type": "application/json", "content-encoding": "utf-8"}
    assert kombu_message(json.dumps({**json.loads(_shaped()), **fine}))["headers"] == {"task": "x"}
    assert kombu_message(json.dumps({**json.loads(_shaped()), "headers": None, "content-type": None}))["headers"] is None


@pytest.mark.parametrize("no_ack", [False, True], ids=["acked", "no_ack"])
def test_items_of_a_queue_that_are_not_messages_are_dropped_and_the_messages_around_them_delivered(redis_server, no_ack, caplog):
    got = []
    with _published(3) as (conn, channel, queue):
        with channel.conn_or_acquire() as client:
            for item in GARBAGE + BAD_BODIES:  # read before the messages above (BRPOP reads the list's other end)
                client.rpush(queue.name, item)
            client.lpush(queue.name, GARBAGE[0])  # and some after them: behind a message, in the same read
            client.lpush(queue.name, *BAD_BODIES)
            Producer(channel).publish({"n": 3}, exchange=queue.exchange, routing_key=queue.name, serializer="json")

            def on_message(body, message):
                got.append(body["n"])
                if not no_ack:
                    message.ack()

            with caplog.at_level(logging.ERROR, logger="tasks.redis_transport"):
                with conn.Consumer([queue], channel=channel, callbacks=[on_message], accept=["json"], no_ack=no_ack):
                    deadline = time.monotonic() + 10
                    while len(got) < 4 and time.monotonic() < deadline:
                        try:
                            conn.drain_events(timeout=1)
                        except TimeoutError:
                            pass
            left = client.llen(queue.name)
            recorded = _recorded(client, channel, ["t"])  # the tag of every item in kombu's format here

    assert sorted(got) == [0, 1, 2, 3]
    assert left == 0
    assert recorded == [False]  # nothing dropped comes back
    dropped = [r.getMessage() for r in caplog.records if "is not a kombu message" in r.getMessage()]
    assert len(dropped) == len(GARBAGE) + 2 * len(BAD_BODIES) + 1, dropped
    assert all(f"dropped an item of queue {queue.name!r}" in line for line in dropped)


#: Members of a JSON object that Lua's cjson (the read script's parser) reads and Python's json
#: refuses (the last one holds a tab character inside a string).
LENIENT = ['"x": 0x10', '"x": inf', '"x": nan', '"x": "a\tb"']
#: Members that Python's json reads too and kombu's decoder raises on (no ValueError).
UNDECODABLE = [f'"x": {t}' for t in BAD_TAGGED]


def _variant(raw: str, tag: str, member: str) -> bytes:
    """The kombu message ``raw`` with the delivery tag ``tag`` and ``member`` (JSON or not) first."""
    message = json.loads(raw)
    message["properties"]["delivery_tag"] = tag
    return ("{" + member + ", " + json.dumps(message)[1:]).encode()


def _stored(client, channel, tag) -> bool:
    """Whether ``tag`` is in kombu's unacked hash or index."""
    return bool(client.hexists(channel.unacked_key, tag)) or client.zscore(channel.unacked_index_key, tag) is not None


def _drain(conn, channel, queue, got: list, count: int, during=None, read=lambda body: body["n"], seconds: float = 10, **consumer) -> None:
    """Consume ``queue`` into ``got`` (``read`` of each body: its ``n``), acking, until it holds
    ``count``, for ``seconds`` at most; within the context manager ``during`` (entered once the
    consumer declared the queue)."""
    def on_message(body, message):
        got.append(read(body))
        message.ack()

    with conn.Consumer([queue], channel=channel, callbacks=[on_message], accept=["json"], **consumer), during or nullcontext():
        deadline = time.monotonic() + seconds
        while len(got) < count and time.monotonic() < deadline:
            try:
                conn.drain_events(timeout=1)
            except TimeoutError:
                pass


def test_an_item_only_luas_json_reads_is_dropped_by_the_tag_the_read_script_recorded(redis_server, caplog):
    """The read script parses items with Lua's cjson, more lenient than Python's json: items in
    kombu's format that only cjson reads, behind the message BRPOP brought, are recorded by the
    script, then dropped here.  Their record was removed by the tag Python read from them, which
    raised (JSONDecodeError) out of the consumer's drain_events: the messages of that read were
    recorded and never delivered, and kombu's restore raised on those records at every scan.  So
    did items with a value kombu's decoder raises on with an error other than ValueError."""
    got = []
    with _published(1) as (conn, channel, queue):
        with channel.conn_or_acquire() as client:
            raw = client.lindex(queue.name, 0).decode()
            tags = [f"lenient-{uuid.uuid4().hex[:8]}" for _ in LENIENT + UNDECODABLE]
            client.lpush(queue.name, *(_variant(raw, tag, member) for tag, member in zip(tags, LENIENT + UNDECODABLE)))
            # and one Python reads, with a tag that is not UTF-8: Python reads another tag than the script's
            tags.append(f"latin-{uuid.uuid4().hex[:8]}-\xe9".encode("latin-1"))
            client.lpush(queue.name, _variant(raw, "TAG", '"x": 1').replace(b"TAG", tags[-1]))
            Producer(channel).publish({"n": 1}, exchange=queue.exchange, routing_key=queue.name, serializer="json")
            with caplog.at_level(logging.ERROR, logger="tasks.redis_transport"):
                _drain(conn, channel, queue, got, 2)
            left = client.llen(queue.name)
            stored = [_stored(client, channel, tag) for tag in tags]

    assert got == [0, 1]
    assert left == 0
    assert stored == [False] * len(tags)  # no record kombu's restore cannot read, or no ack removes
    dropped = [r.getMessage() for r in caplog.records if "is not a kombu message" in r.getMessage()]
    assert len(dropped) == len(tags), dropped


def test_a_message_whose_exchange_is_not_a_string_does_not_stop_the_read_script(redis_server):
    """An exchange of 1e999 (Python and Lua read it as inf): the script wrote the record with
    cjson.encode, which raises on inf, and a script that raises stops there, keeping what it did:
    the messages it had popped and not recorded were gone, neither in the list nor recorded.  It
    now goes back to the list, and Python reads it alone (its record says Infinity)."""
    got = []
    with _published(1) as (conn, channel, queue):
        with channel.conn_or_acquire() as client:
            message = json.loads(client.lindex(queue.name, 0))
            message["body"] = base64.b64encode(b'{"n": 1}').decode()
            message["properties"]["delivery_tag"] = tag = f"inf-{uuid.uuid4().hex[:8]}"
            message["properties"]["delivery_info"]["exchange"] = "EXCHANGE"
            client.lpush(queue.name, json.dumps(message).replace('"EXCHANGE"', "1e999"))
            Producer(channel).publish({"n": 2}, exchange=queue.exchange, routing_key=queue.name, serializer="json")
            _drain(conn, channel, queue, got, 3)
            left = client.llen(queue.name)
            stored = _stored(client, channel, tag)

    assert got == [0, 1, 2]
    assert left == 0 and not stored


def test_restore_removes_a_record_it_cannot_read_and_restores_the_others(redis_server, caplog):
    """A record kombu cannot read (one the read script left before it checked items as Python
    reads them): kombu's restore raised on it at every restore_visible scan, so the messages
    recorded before it (scanned after it) never came back."""
    with _published(1) as (conn, channel, queue):
        with channel.conn_or_acquire() as client:
            raw = client.rpop(queue.name).decode()  # a message taken and never acked
            tag, bad = loads(raw)["properties"]["delivery_tag"], f"bad-{uuid.uuid4().hex[:8]}"
            expired = time.time() - channel.qos.visibility_timeout - 10
            client.hset(channel.unacked_key, mapping={tag: dumps([loads(raw), queue.exchange.name, queue.name]),
                                                      bad: '[{"x": 0x10}, "", ""]'})
            client.zadd(channel.unacked_index_key, {tag: expired, bad: expired + 5})  # the bad one is scanned first
            with caplog.at_level(logging.ERROR, logger="tasks.redis_transport"):
                channel.qos.restore_visible(interval=1)
            back = [loads(item)["properties"]["delivery_tag"] for item in client.lrange(queue.name, 0, -1)]
            stored = [_stored(client, channel, t) for t in (tag, bad)]

    assert back == [tag]
    assert stored == [False, False]
    assert any(f"removed the unacked record of delivery tag {bad!r}" in r.getMessage() for r in caplog.records)


#: Scripts the server refuses with an arity error, as the read script's RPOP with a count on
#: Redis 3.x to 6.0, where RPOP takes the key alone: a command of fixed arity given one argument
#: more (the server's arity check: "Wrong number of args calling Redis command from script", "From
#: Lua script" before 7), and RPOP given one too many (its own check: "wrong number of arguments for
#: 'rpop' command").
ARITY_ERRORS = {"fixed-arity": "return redis.call('LLEN', KEYS[1], 1)", "rpop": "return redis.call('RPOP', KEYS[1], 1, 2)"}


@pytest.mark.parametrize("script", ARITY_ERRORS.values(), ids=ARITY_ERRORS.keys())
def test_a_server_without_rpops_count_turns_reads_of_several_off(redis_server, caplog, script):
    """What the script gets from Redis 3.x to 6.0 (RPOP has no count before 6.2): the read then
    stops trying, and kombu's append records the message (the check looked for "wrong number of
    arguments", the wording a client gets, not a script).  The server refuses a script of ours here
    as it refused the read script's RPOP."""
    with _published(1) as (conn, channel, queue):
        with channel.conn_or_acquire() as client:
            channel.basic_consume(queue.name, False, lambda message: None, "test-consumer")
            channel._take_script = client.register_script(script)
            raw = client.rpop(queue.name).decode()  # what BRPOP would have brought
            with caplog.at_level(logging.WARNING, logger="tasks.redis_transport"):
                taken = channel._take_more(queue.name.encode(), queue.name, raw, loads(raw))
            ok = channel._take_more_ok

    assert taken == [] and ok is False
    assert any("RPOP with a count needs Redis 6.2 or later" in r.getMessage() for r in caplog.records)


def test_the_read_script_never_replaces_a_record(redis_server):
    """An item with the tag of a message recorded already (here the one BRPOP brought) goes back
    to the list: its record would replace that message's, and dropping it would remove both."""
    with _published(1) as (conn, channel, queue):
        with channel.conn_or_acquire() as client:
            raw = client.lindex(queue.name, 0).decode()
            tag = loads(raw)["properties"]["delivery_tag"]
            client.lpush(queue.name, _variant(raw, tag, '"x": 0x10'))
            channel.basic_consume(queue.name, False, lambda message: None, "test-consumer")
            raw = client.rpop(queue.name).decode()  # what BRPOP would have brought
            taken = channel._take_more(queue.name.encode(), queue.name, raw, loads(raw))
            record = client.hget(channel.unacked_key, tag)
            left = client.llen(queue.name)
            client.zrem(channel.unacked_index_key, tag)
            client.hdel(channel.unacked_key, tag)

    assert taken == [] and left == 1
    assert record is not None and loads(record)[0]["properties"]["delivery_tag"] == tag  # that message's own record


def test_a_queue_read_without_acks_keeps_one_message_per_read(redis_server):
    got = []
    with _published(5) as (conn, channel, queue):
        with conn.Consumer([queue], channel=channel, callbacks=[lambda body, message: got.append(body["n"])], accept=["json"], no_ack=True):
            conn.drain_events(timeout=5)
            first_read = list(got)
    assert first_read == [0]


def test_a_channel_without_ack_emulation_delivers(redis_server):
    """With the transport option ack_emulation off, kombu's channel uses its plain QoS, which has
    no record of the messages a read recorded: the read looked it up after every delivery."""
    got = []
    name = f"test-transport-{uuid.uuid4().hex[:8]}"
    queue = Queue(name, Exchange(name, type="direct"), routing_key=name)
    with app.connection_for_write(transport_options={"ack_emulation": False}) as conn:
        channel = conn.channel()
        try:
            assert not isinstance(channel.qos, QoS)
            Producer(channel).publish({"n": 0}, exchange=queue.exchange, routing_key=name, declare=[queue], serializer="json")
            _drain(conn, channel, queue, got, 1)
        finally:
            with channel.conn_or_acquire() as client:
                client.delete(name)
            channel.close()
    assert got == [0]


def test_tasks_a_killed_worker_had_read_in_bulk_come_back_and_run_once(tmp_path):
    """A worker reads a backlog of tasks.collect in bulk, its pool never runs them (stopped), and
    it is killed: every task it took was recorded as it was read, so the next worker runs each one,
    and no business code sends anything again."""
    from tests.integration.conftest import Cluster

    redis_server = launcher.RedisServer(data_dir=tmp_path / "redis").start()
    cluster = Cluster(redis_server, tmp_path, auth_port=launcher.free_port(), VISIBILITY_TIMEOUT=2, UNACKED_RESTORE_SECONDS=1)
    try:
        worker = cluster.start_worker("bulk-reader")
        pool = psutil.Process(worker.pid).children()
        assert pool, "the worker has no pool processes"
        for process in pool:
            process.suspend()
        total = 300
        results = [cluster.send(to=f"bulk-{n % 7}", data={"n": n}) for n in range(total)]
        broker = redis_lib.Redis.from_url(cluster.env["BROKER_URL"])
        deadline = time.monotonic() + 30
        while broker.llen("collect") > total - 150 and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)
        # In one transaction (read apart, a task the worker took between the two counted twice),
        # and only the records of collect's tasks: the hash holds every queue's, and a
        # housekeeping run the worker's scheduler sent and its reader took was one more (301).
        left, records = broker.pipeline(transaction=True).llen("collect").hvals("unacked").execute()
        recorded = sum(json.loads(record)[0]["headers"]["task"] == "tasks.collect" for record in records)
        worker.kill()
        cluster.start_worker("after-the-kill")
        deadline = time.monotonic() + 60  # the visibility timeout, then the next worker's restore scan (1 s)
        while not all(r.ready() for r in results) and time.monotonic() < deadline:
            time.sleep(0.2)
        ids = [r.result for r in results if r.successful()]
    finally:
        cluster.stop(at_once=True)
        redis_server.stop()

    assert left <= total - 150  # the worker took a backlog (its prefetch window is 200)
    assert left + recorded == total  # every task out of the list was recorded as it was read
    assert len(ids) == total, f"{total - len(ids)} tasks never ran after the kill"
    assert len(set(ids)) == total  # each ran once


def test_celery_messages_pushed_without_kombus_bookkeeping_that_a_killed_worker_held_come_back_and_run_once(tmp_path):
    """Celery messages a producer that is not Celery pushed without ``delivery_tag`` and
    ``delivery_info`` (a hand-built ``LPUSH``), read by a worker that is then killed before its
    pool runs them: the transport supplied the tag before it recorded each as unacknowledged, so
    the record holds it, the next worker's restore brings each back, and each runs once.  They were
    dropped as "not a kombu message" and never ran."""
    from tests.integration.conftest import Cluster
    from tests.integration.test_bad_input import hand_built

    redis_server = launcher.RedisServer(data_dir=tmp_path / "redis").start()
    cluster = Cluster(redis_server, tmp_path, auth_port=launcher.free_port(), VISIBILITY_TIMEOUT=2, UNACKED_RESTORE_SECONDS=1)
    task_ids = [f"hand-built-{n}-{uuid.uuid4()}" for n in range(5)]
    try:
        worker = cluster.start_worker("hand-built-reader")
        for process in psutil.Process(worker.pid).children():
            process.suspend()
        broker = redis_lib.Redis.from_url(cluster.env["BROKER_URL"])
        broker.lpush("collect", *(hand_built(task_id, {"to": "hand-built", "data": n}) for n, task_id in enumerate(task_ids)))
        deadline = time.monotonic() + 30
        while broker.llen("collect") and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)
        records = [json.loads(record) for record in broker.hvals("unacked")]
        held = {record[0]["headers"]["id"]: record for record in records if record[0].get("headers", {}).get("id") in task_ids}
        worker.kill()
        cluster.start_worker("after-the-kill")
        results = [cluster.business.AsyncResult(task_id) for task_id in task_ids]
        deadline = time.monotonic() + 60  # the visibility timeout, then the next worker's restore scan (1 s)
        while not all(r.ready() for r in results) and time.monotonic() < deadline:
            time.sleep(0.2)
        ids = [r.result for r in results if r.successful()]
        log = cluster._log("hand-built-reader").read_text(errors="replace")
    finally:
        cluster.stop(at_once=True)
        redis_server.stop()

    assert "not a kombu message" not in log
    assert sorted(held) == sorted(task_ids), "every message read was recorded as unacknowledged"
    assert all(isinstance(record[0]["properties"]["delivery_tag"], str) and record[1:] == ["", "collect"] for record in held.values())
    assert all(record[0]["properties"]["delivery_info"] == {"exchange": "", "routing_key": "collect"} for record in held.values())
    assert len(ids) == len(task_ids), f"{len(task_ids) - len(ids)} tasks never ran after the kill"
    assert len(set(ids)) == len(task_ids)  # each ran once


def _close_wait(pid: int, port: int) -> list:
    """The sockets of process ``pid`` to ``port`` that the server closed and the process did not."""
    return [c for c in psutil.Process(pid).net_connections(kind="tcp") if c.status == psutil.CONN_CLOSE_WAIT and c.raddr and c.raddr.port == port]


def test_a_worker_keeps_no_socket_of_a_redis_that_restarted(tmp_path):
    """Each restart of the Redis broker left one more socket in CLOSE_WAIT in the worker's main
    process, for good: reconnecting, Celery closes the lost connection's channels, and kombu's
    close of the task channel first reads the BRPOP it had in flight, which raised on the closed
    connection, so the channel and its command connection were never released (its QoS stays
    referenced by a multiprocessing Finalize until then)."""
    from tests.integration.conftest import Cluster

    redis_server = launcher.RedisServer(data_dir=tmp_path / "redis").start()
    # No housekeeping: its scheduler's connections, idle between two periods, are in CLOSE_WAIT
    # for a while after a restart, until their next use.
    cluster = Cluster(redis_server, tmp_path, auth_port=launcher.free_port(), HOUSEKEEPING_SECONDS=3600)
    restarts, stuck = 4, []
    try:
        worker = cluster.start_worker("restarts", queues="dispatch", concurrency=1)
        for _ in range(restarts):
            redis_server.restart()
            # Read again: a task sent to the new server is taken once the worker connected again.
            cluster.business.send_task("tasks.status", args=["not-an-id"], queue="dispatch", ignore_result=True)
            broker = redis_lib.Redis.from_url(cluster.env["BROKER_URL"])
            deadline = time.monotonic() + 20
            while broker.llen("dispatch") and time.monotonic() < deadline:
                time.sleep(0.1)
            assert broker.llen("dispatch") == 0, f"the worker did not read again after a Redis restart:\n{worker.log_tail()}"
            broker.close()
        time.sleep(0.5)
        stuck = _close_wait(worker.pid, redis_server.port)
    finally:
        cluster.stop(at_once=True)
        redis_server.stop()

    assert len(stuck) <= 1, f"{len(stuck)} sockets in CLOSE_WAIT after {restarts} Redis restarts: {stuck}"


def _non_socket_fds(pid: int) -> list[str]:
    """What the open file descriptors of process ``pid`` that are not sockets are (``readlink``)."""
    fds = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue  # closed meanwhile
        if not target.startswith("socket:"):
            fds.append(target)
    return sorted(fds)


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="reads /proc/PID/fd")
def test_a_node_keeps_no_poller_of_a_redis_that_restarted(tmp_path):
    """Each restart of the Redis broker left one more ``anon_inode:[eventpoll]`` open in a push
    node: its consumer drops the lost connection (``Connection.collect``) and opens a new one, and
    kombu's Redis transport never closed the epoll its poller made, which waited for a full
    garbage collection (rare with ``gcpolicy``) to free the transport."""
    from tests.integration.conftest import Cluster

    redis_server = launcher.RedisServer(data_dir=tmp_path / "redis").start()
    cluster = Cluster(redis_server, tmp_path, auth_port=launcher.free_port(), HOUSEKEEPING_SECONDS=3600)
    restarts = 4
    try:
        node = cluster.start_node()
        health = f"http://127.0.0.1:{node.port}/healthz"
        time.sleep(1)
        before = _non_socket_fds(node.pid)
        for _ in range(restarts):
            redis_server.restart()
            time.sleep(0.5)  # /healthz may still answer 200 from before the node noticed
            node.wait_http_ok(health, timeout=20)
            time.sleep(1.0)  # the queue consumer connected again (it retries 0.5 s after a loss)
        after = _non_socket_fds(node.pid)
    finally:
        cluster.stop(at_once=True)
        redis_server.stop()

    grown = len(after) - len(before)
    assert grown <= 1, f"{grown} more non-socket fds after {restarts} Redis restarts: {before} -> {after}"



def test_an_item_only_luas_json_reads_is_dropped_while_redis_is_over_maxmemory(redis_server, caplog):
    """The read script records what it takes even over ``maxmemory`` (allow-oom); the removal of
    the record of an item dropped after it went in a MULTI, which Redis 7 refuses whole while
    full: it raised out of the read (the worker's loop connected again), and the messages of that
    read stayed recorded and undelivered until the visibility timeout."""
    got = []
    with _published(1) as (conn, channel, queue):
        with channel.conn_or_acquire() as client:
            skip_before_redis_7(client, "the read script cannot pass maxmemory (allow-oom), so a task read while Redis is full is lost")
            raw = client.lindex(queue.name, 0).decode()
            tag = f"lenient-{uuid.uuid4().hex[:8]}"
            client.lpush(queue.name, _variant(raw, tag, LENIENT[0]))
            Producer(channel).publish({"n": 1}, exchange=queue.exchange, routing_key=queue.name, serializer="json")
            # Full once the queue is declared: kombu's declaration counts the queue's lists in a MULTI.
            with caplog.at_level(logging.ERROR, logger="tasks.redis_transport"):
                _drain(conn, channel, queue, got, 2, during=over_maxmemory(client))
            stored = _stored(client, channel, tag)
    assert got == [0, 1]
    assert not stored


def _blocked_brpops(client, proxy) -> list[dict]:
    """The clients Redis holds blocked in a ``BRPOP`` that came through ``proxy`` (the session's
    Redis also serves this test process's other tests)."""
    through = proxy.upstream_addresses()
    return [c for c in client.client_list() if c.get("cmd") == "brpop" and "b" in c.get("flags", "") and c.get("addr") in through]


@contextmanager
def _a_brpop_left_blocked_by_a_nat(brpop_timeout: float = 8.0, url: str | None = None):
    """A consumer of a fresh queue, with one message it took and holds unacknowledged, whose
    connection to Redis goes through a proxy that then drops its state (``cut_clients``): the
    consumer's side is reset, and its next ``BRPOP``, sent before the cut, stays blocked in Redis
    for ``brpop_timeout`` (kombu sets it from ``polling_interval``).  Yields ``(channel, queue,
    blocked)``: the consumer's channel (its read failed on the reset; the caller closes it, as a
    worker does reconnecting), and what Redis holds blocked of the consumer's ``BRPOP`` calls (a
    callable)."""
    from tests.integration.tcpproxy import FreezableProxy

    direct_url = url or app.conf.broker_url
    proxy, proxied = FreezableProxy.to_url(direct_url)
    direct = redis_lib.Redis.from_url(direct_url)
    name = f"test-zombie-{uuid.uuid4().hex[:8]}"
    queue = Queue(name, Exchange(name, type="direct"), routing_key=name)
    try:
        with app.connection_for_write(proxied, transport_options={"polling_interval": brpop_timeout}) as conn:
            channel = conn.channel()
            Producer(channel).publish({"n": 0}, exchange=queue.exchange, routing_key=name, declare=[queue], serializer="json")
            held = []
            with conn.Consumer([queue], channel=channel, callbacks=[lambda body, message: held.append(message)], accept=["json"]):
                while not held:
                    conn.drain_events(timeout=5)
                with pytest.raises(socket.timeout):
                    conn.drain_events(timeout=0.3)  # the next BRPOP, sent and blocked
                blocked = lambda: _blocked_brpops(direct, proxy)  # noqa: E731
                deadline = time.monotonic() + 5
                while not blocked() and time.monotonic() < deadline:
                    time.sleep(0.05)
                assert blocked(), "the consumer's BRPOP never blocked in Redis"
                proxy.cut_clients()
                with pytest.raises(conn.connection_errors):
                    conn.drain_events(timeout=5)
                yield channel, queue, blocked
    finally:
        direct.delete(name)
        direct.close()
        proxy.close()


def _consume_fresh(queue: Queue, count: int) -> list:
    """Up to ``count`` bodies' ``n`` of ``queue``, read and acked on a new connection straight to
    Redis (:func:`_drain`)."""
    got: list = []
    with app.connection_for_write() as conn:
        channel = conn.channel()
        try:
            _drain(conn, channel, queue, got, count)
        finally:
            channel.close()
    return got


def test_a_brpop_a_nat_left_blocked_in_redis_is_ended_so_nothing_pushed_then_is_lost(redis_server, caplog):
    """A NAT or load balancer between a consumer and Redis drops its state: the consumer's
    connection is reset, Redis never learns, and holds the dropped connection's ``BRPOP`` blocked
    until its timeout.  Whatever anyone pushes to that queue meanwhile (a business process's task)
    went to that ``BRPOP``, whose answer nobody reads: lost.  Closing the channel, as a worker does
    reconnecting, now ends that client in Redis (``CLIENT KILL ID ... ADDR ...``): the message the
    channel held is pushed back at once, and a message pushed after the close is read."""
    with caplog.at_level(logging.INFO, logger="tasks.redis_transport"):
        with _a_brpop_left_blocked_by_a_nat() as (channel, queue, blocked):
            assert blocked(), "the dropped connection's BRPOP should still be blocked in Redis"
            closing = threading.Thread(target=channel.close)
            closing.start()
            closing.join(0.5)  # the BRPOP, blocked for 8 s, is still there unless the close ended it
            with app.connection_for_write() as conn:
                Producer(conn.default_channel).publish({"n": 1}, exchange=queue.exchange, routing_key=queue.name, serializer="json")
            closing.join(15)
            assert not blocked()
            got = _consume_fresh(queue, 2)
    assert sorted(got) == [0, 1]
    assert "ended the BRPOP of a lost broker connection" in caplog.text
    assert "waiting" not in caplog.text  # ended: nothing to wait out before pushing back


def test_where_redis_refuses_client_kill_the_close_waits_the_dropped_brpop_out(redis_server, caplog):
    """A Redis user without ``CLIENT KILL`` (an ACL, a managed service): the close cannot end the
    dropped connection's ``BRPOP``, so it waits for it to time out before pushing back what the
    channel held, which is then read again."""
    admin = redis_lib.Redis.from_url(app.conf.broker_url)
    user, password = f"nokill-{uuid.uuid4().hex[:6]}", uuid.uuid4().hex
    admin.acl_setuser(user, enabled=True, passwords=[f"+{password}"], keys=["*"], channels=["*"], commands=["+@all", "-client|kill"])
    url = redis_server.url().replace("redis://", f"redis://{user}:{password}@", 1) if "@" not in redis_server.url() else None
    if url is None:
        pytest.skip("the test Redis has a password of its own")
    try:
        with caplog.at_level(logging.INFO, logger="tasks.redis_transport"):
            with _a_brpop_left_blocked_by_a_nat(brpop_timeout=2.0, url=url) as (channel, queue, _):
                channel.close()
                got = _consume_fresh(queue, 1)
    finally:
        admin.acl_deluser(user)
        admin.close()
    assert got == [0]
    assert "could not end the BRPOP of a lost broker connection" in caplog.text
    assert "for the lost connection's BRPOP to time out" in caplog.text


async def test_a_node_consumer_ends_the_brpop_a_nat_left_blocked_so_a_delivery_pushed_then_is_read(redis_server, monkeypatch):
    """The same cut under a push node's queue consumer, which reads without acknowledgements and
    drops a lost connection without closing its channels (``collect``): the ``BRPOP`` left blocked
    in Redis took the next ``wsnode.deliver`` Dispatch pushed, and the node never had it (only
    housekeeping's redelivery, ``REDELIVER_AFTER`` later, would bring a stored message back).  The
    consumer's ``collect`` closes the channel, which now ends that client in Redis, before the
    consumer connects again."""
    from celery import Celery
    from tornado.ioloop import IOLoop

    from tasks.ids import IdGenerator
    from tasks.queues import DELIVER_TASK, node_queue
    from tests.integration.tcpproxy import FreezableProxy
    from wsnode import consumer as node_consumer

    monkeypatch.setattr(node_consumer, "TRANSPORT_OPTIONS", {**node_consumer.TRANSPORT_OPTIONS, "polling_interval": 8})
    proxy, proxied = FreezableProxy.to_url(app.conf.broker_url)
    direct = redis_lib.Redis.from_url(app.conf.broker_url)
    address = f"127.0.0.1:{launcher.free_port()}"
    got: list[str] = []
    consumer = node_consumer.NodeQueueConsumer(Celery(broker=proxied), address, IOLoop.current(),
                                               lambda batch: got.extend(e["id"] for d in batch for e in d.envelopes))

    async def until(condition, what: str, seconds: float = 10) -> None:
        deadline = time.monotonic() + seconds
        while not condition() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert condition(), what

    consumer.start()
    try:
        await until(lambda: consumer.connected and _blocked_brpops(direct, proxy), "the node's consumer never read its queue")
        first = {c["id"] for c in _blocked_brpops(direct, proxy)}
        proxy.cut_clients()
        await until(lambda: {c["id"] for c in _blocked_brpops(direct, proxy)} - first, "the consumer did not read again after the cut")
        message_id = IdGenerator().next_id()
        Celery(broker=app.conf.broker_url).send_task(DELIVER_TASK, args=[[{"id": message_id, "to": ["u1"], "data": {}, "ts": None}]],
                                                     queue=node_queue(address), declare=[], ignore_result=True)
        await until(lambda: message_id in got, "the delivery pushed after the reconnection went to the lost connection's BRPOP", 5)
    finally:
        await asyncio.to_thread(consumer.stop)
        direct.delete(node_queue(address).name)
        direct.close()
        proxy.close()


@pytest.mark.parametrize("read", ["backlog", "kombu's append"])
def test_a_message_naming_an_exchange_that_routes_nowhere_comes_back_to_its_queue_when_restored(redis_server, read):
    """gocelery (and other producers that are not Celery) push to a queue's list a message whose
    ``delivery_info`` names the exchange and routing key ``celery``, bound to nothing here.  kombu
    recorded those as the message's way back, and a restore (the worker stopping, or dying, with
    it unacknowledged) found no queue for them: "Restoring 1 unacknowledged message(s)", and it
    was gone.  The record now names the queue it was read from."""
    with _published(2) as (conn, channel, queue):
        with channel.conn_or_acquire() as client:
            message = json.loads(client.lindex(queue.name, 0))
            message["body"] = base64.b64encode(b'{"n": 9}').decode()
            message["properties"]["delivery_tag"] = str(uuid.uuid4())
            message["properties"]["delivery_info"] = {"priority": 0, "routing_key": "celery", "exchange": "celery"}
            client.rpush(queue.name, json.dumps(message))  # read first
        if read == "kombu's append":
            channel._take_more_ok = False
        channel.basic_qos(0, 10, False)
        got = _consume(conn, channel, queue, 3)  # none acked
        assert sorted(m.payload["n"] for m in got) == [0, 1, 9]
        channel.qos.restore_unacked_once()  # as a worker's channel does when it closes
        back = sorted(_queued(channel, queue))
        with channel.conn_or_acquire() as client:
            unacked = client.hlen(channel.unacked_key)

    assert back == [0, 1, 9], "a restored message was lost"
    assert unacked == 0


@pytest.mark.parametrize("headers", [None, [], ""], ids=["null", "empty list", "empty string"])
def test_a_message_whose_headers_are_null_comes_back_to_its_queue_when_restored(redis_server, headers):
    """gocelery pushes its messages with ``"headers": null`` (a protocol 1 message: the task's
    name and id are in its body), and a producer that is not Celery may push other empty headers
    without kombu's bookkeeping, which the read supplies.  kombu's Message reads such headers as
    ``{}`` and the worker runs the task; but kombu's restore marks the message it puts back with
    ``headers["redelivered"]``, which raised on them ("Could not restore message"): the record
    was removed and the message never came back, when the worker stopped or died holding it."""
    with _published(1) as (conn, channel, queue):
        gocelery = {"body": base64.b64encode(b'{"n": 8}').decode(), "headers": headers, "content-type": "application/json",
                    "content-encoding": "utf-8", "properties": {"body_encoding": "base64", "delivery_tag": str(uuid.uuid4()),
                                                                "delivery_info": {"priority": 0, "routing_key": "celery", "exchange": "celery"}}}
        without_bookkeeping = {**gocelery, "body": base64.b64encode(b'{"n": 9}').decode(), "properties": {"body_encoding": "base64"}}
        with channel.conn_or_acquire() as client:
            client.rpush(queue.name, json.dumps(gocelery), json.dumps(without_bookkeeping))  # read first
        channel.basic_qos(0, 10, False)
        got = _consume(conn, channel, queue, 3)  # none acked
        assert sorted(m.payload["n"] for m in got) == [0, 8, 9]
        channel.qos.restore_unacked_once()  # as a worker's channel does when it closes
        back = sorted(_queued(channel, queue))
        again = []
        _drain(conn, channel, queue, again, 3)  # acked

    assert back == [0, 8, 9], "a restored message was lost"
    assert sorted(again) == [0, 8, 9]


def test_the_hand_back_of_a_node_queue_reads_an_item_without_kombus_bookkeeping_and_skips_one_that_is_no_message(redis_server, caplog):
    """The hand-back of a node's queue (``tasks.reclaim``: a draining node's, housekeeping's of a
    dead node) reads it with ``basic_get``, kombu's ``_get``, not the ``BRPOP`` read: a
    ``wsnode.deliver`` pushed without kombu's ``delivery_tag`` (which a live node reads) raised
    KeyError out of kombu's Message, and an item that is no message raised out of kombu's decoder,
    after each was popped: it was lost, and nothing behind it was handed back in that run."""
    from tasks.queues import DELIVER_TASK
    from tasks.reclaim import hand_back
    from tests.integration.test_bad_input import hand_built

    address = f"127.0.0.1:hand-back-{uuid.uuid4().hex[:8]}"
    ids = [f"018bcfe5680000000{n}a1b2c3" for n in range(2)]
    client = redis_lib.Redis.from_url(app.conf.broker_url)
    client.lpush(address, hand_built(str(uuid.uuid4()), {}, task=DELIVER_TASK, args=[[{"id": ids[0], "to": ["u"], "data": 0}]]),
                 b"\xff\xfe not json",
                 hand_built(str(uuid.uuid4()), {}, task=DELIVER_TASK, args=[[{"id": ids[1], "to": ["u"], "data": 1}]]))
    try:
        with caplog.at_level(logging.ERROR, logger="tasks.redis_transport"):
            handed = hand_back(app, address)
        dispatched = []
        for item in client.lrange("dispatch", 0, -1):
            message = json.loads(item)
            envelopes = json.loads(base64.b64decode(message["body"]))[0][0]
            if any(envelope["id"] in ids for envelope in envelopes):
                dispatched += [envelope["id"] for envelope in envelopes]
                client.lrem("dispatch", 1, item)
        left = client.llen(address)
    finally:
        client.delete(address)

    assert handed == 2
    assert sorted(dispatched) == ids
    assert left == 0
    assert any("is not a kombu message" in r.getMessage() for r in caplog.records)


def test_a_backlog_of_messages_without_kombus_bookkeeping_is_read_in_order_without_popping_and_pushing_back(redis_server):
    """Messages a producer that is not Celery pushed without ``delivery_tag`` and
    ``delivery_info``, in a backlog with Celery's: the read script cannot take such a message (its
    tag is supplied in Python, before a ``BRPOP`` of its own reads it), and it popped up to 100
    items and pushed back all from that one on: about 100 list writes per message read from a
    backlog of them, each replicated and written to the AOF.  It now looks before it pops, and
    pops only what it takes; the order holds."""
    from tests.integration.test_bad_input import hand_built

    got = []
    with _published(0) as (conn, channel, queue):
        with channel.conn_or_acquire() as client:
            for n in range(60):
                if n % 3:
                    client.lpush(queue.name, hand_built(str(uuid.uuid4()), {}, args=[n]))
                else:
                    Producer(channel).publish([[n], {}, {}], exchange=queue.exchange, routing_key=queue.name, serializer="json")
            channel.basic_qos(0, 100, False)
            before = client.info("commandstats").get("cmdstat_rpush", {}).get("calls", 0)
            _drain(conn, channel, queue, got, 60, read=lambda body: body[0][0], seconds=20)
            pushed_back = client.info("commandstats").get("cmdstat_rpush", {}).get("calls", 0) - before
            left = client.llen(queue.name)

    assert got == list(range(60))
    assert left == 0
    assert pushed_back == 0


def test_a_message_whose_delivery_info_names_another_way_is_read_as_from_its_queue_and_a_retry_goes_back_there(redis_server):
    """gocelery names exchange and routing key ``celery`` in every message's ``delivery_info``,
    whatever list it pushes it onto.  Celery's retry of a task publishes it again to what its
    ``delivery_info`` names: bound to nothing here, the retry was dropped (kombu warns "no queues
    bound") and its caller waited for ever.  A message read from a queue now names the way back
    to it; one Celery sent names it already, and is left as it is."""
    name = f"test-transport-{uuid.uuid4().hex[:8]}"
    queue = Queue(name, Exchange(name, type="direct"), routing_key=name)
    gocelery = dumps({"body": base64.b64encode(b'{"n": 0}').decode(), "content-type": "application/json", "content-encoding": "utf-8",
                      "headers": None, "properties": {"body_encoding": "base64", "delivery_tag": str(uuid.uuid4()), "delivery_mode": 2,
                                                      "delivery_info": {"priority": 0, "exchange": "celery", "routing_key": "celery"}}})
    got = []
    with app.connection_for_write() as conn:
        channel = conn.channel()
        try:
            producer = Producer(channel)
            producer.maybe_declare(queue)
            producer.publish({"n": 1}, exchange=queue.exchange, routing_key=name, serializer="json")
            with channel.conn_or_acquire() as client:
                client.rpush(name, gocelery)  # read first: BRPOP pops the right end
            with conn.Consumer([queue], channel=channel, accept=["json"],
                               callbacks=[lambda body, message: (got.append((body["n"], dict(message.delivery_info))), message.ack())]):
                while len(got) < 2:
                    conn.drain_events(timeout=5)
            assert [(n, info["exchange"], info["routing_key"]) for n, info in got] == [(0, "", name), (1, name, name)]
            for n, info in got:  # as Celery's retry publishes the task again
                producer.publish({"n": n}, exchange=info["exchange"], routing_key=info["routing_key"], serializer="json")
            with channel.conn_or_acquire() as client:
                assert client.llen(name) == 2
        finally:
            with channel.conn_or_acquire() as client:
                client.delete(name)
            channel.close()


def test_basic_get_drops_an_empty_item_and_reads_the_message_behind_it(redis_server, caplog):
    """An empty string is an item a list may hold (a hand-built ``LPUSH ''``).  The ``BRPOP`` read
    logs and drops it as no message; ``basic_get`` (the hand-back of a node's queue) took it for
    the end of the queue: it answered nothing with messages still behind it, and the hand-back
    that met it first stopped there, and deleted a dead node's queue with them on it."""
    with _published(2) as (conn, channel, queue):
        with channel.conn_or_acquire() as client:
            client.rpush(queue.name, "")  # read first: basic_get pops the right end
        with caplog.at_level(logging.ERROR, logger="tasks.redis_transport"):
            got = [channel.basic_get(queue.name, no_ack=True) for _ in range(3)]
        with channel.conn_or_acquire() as client:
            left = client.llen(queue.name)

    assert [None if message is None else loads(message.body)["n"] for message in got] == [0, 1, None]
    assert left == 0
    assert any("not a kombu message (0 bytes)" in r.getMessage() for r in caplog.records)


def test_a_publish_whose_queue_declaration_outlasted_a_redis_restart_is_published_on_a_new_channel(tmp_path):
    """kombu's ``Producer._publish`` takes its channel, then declares the queue with retries of
    its own: Redis down at that declaration, the retry reconnected once Redis was back and closed
    the channel, on which the publish then raised ``AttributeError`` (no retry takes it: a Collect
    batch that handed its stored messages to ``tasks.dispatch`` during a Redis restart failed its
    requests).  The channel was open before Redis stopped, its queue not declared yet, as on a
    connection made just before a restart."""
    redis_server = launcher.RedisServer(data_dir=tmp_path / "redis").start()
    name = f"test-transport-{uuid.uuid4().hex[:8]}"
    queue = Queue(name, Exchange(name, type="direct"), routing_key=name)
    try:
        with app.connection_for_write(redis_server.url(0)) as conn:
            conn.default_channel  # connected, nothing declared yet
            producer = Producer(conn)
            redis_server.service.terminate()
            back = threading.Thread(target=lambda: (time.sleep(1.0), redis_server.start()))
            back.start()
            try:
                producer.publish({"n": 1}, exchange=queue.exchange, routing_key=name, declare=[queue], serializer="json", retry=True,
                                 retry_policy={"max_retries": 20, "interval_start": 0.3, "interval_step": 0.3, "interval_max": 0.3})
            finally:
                back.join()
        assert redis_lib.Redis.from_url(redis_server.url(0)).llen(name) == 1
    finally:
        redis_server.stop()

"""kombu's Redis transport with one client object per channel (``tasks.redis_transport``),
against the session's real redis-server: the app uses it, and publishing, consuming with
acknowledgements and acking all go through one client object."""

from __future__ import annotations

import uuid

from kombu import Exchange, Producer, Queue

from tasks.redis_transport import Channel, Transport
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

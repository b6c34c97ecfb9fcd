"""Which kombu transport a broker URL gets once ``tasks.redis_transport`` is installed (no server
needed: kombu builds the transport object without connecting)."""

from __future__ import annotations

import kombu
import pytest

from tasks import redis_transport


def test_redis_urls_get_the_transport_that_reuses_its_client_and_keep_their_scheme():
    redis_transport.install()
    redis_transport.install()  # idempotent
    with kombu.Connection("redis://127.0.0.1:6379/0") as conn:
        assert isinstance(conn.transport, redis_transport.Transport)
        # Flower's Broker page picks its queue reader by this URL's scheme.
        assert conn.as_uri().startswith("redis://") and conn.as_uri().endswith("127.0.0.1:6379/0")


@pytest.mark.parametrize("url", ["rediss://cache.example:6380/0", "amqp://guest:guest@127.0.0.1:5672//"])
def test_other_brokers_keep_kombus_own_transport(url):
    redis_transport.install()
    with kombu.Connection(url) as conn:
        assert not isinstance(conn.transport, redis_transport.Transport)

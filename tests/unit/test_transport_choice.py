"""Which transport the app configures for a broker URL (pure)."""

from __future__ import annotations

import pytest

from tasks.redis_transport import TRANSPORT, transport_for


def test_a_redis_broker_gets_the_transport_that_reuses_its_client():
    assert transport_for("redis://127.0.0.1:6379/0") == TRANSPORT == "tasks.redis_transport:Transport"


@pytest.mark.parametrize("url", ["rediss://cache.example:6380/0", "amqp://guest:guest@127.0.0.1:5672//", "pyamqp://h//"])
def test_other_brokers_keep_kombus_own_transport(url):
    assert transport_for(url) is None

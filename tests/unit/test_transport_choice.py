"""Which kombu transport a broker URL gets once ``tasks.redis_transport`` is installed (no server
needed: kombu builds the transport object without connecting)."""

from __future__ import annotations

import ssl

import kombu
import redis

from tasks import redis_transport


def test_redis_urls_get_the_transport_that_reuses_its_client_and_keep_their_scheme():
    redis_transport.install()
    redis_transport.install()  # idempotent
    with kombu.Connection("redis://127.0.0.1:6379/0") as conn:
        assert isinstance(conn.transport, redis_transport.Transport)
        # Flower's Broker page picks its queue reader by this URL's scheme.
        assert conn.as_uri().startswith("redis://") and conn.as_uri().endswith("127.0.0.1:6379/0")


def test_tls_redis_urls_get_it_too_with_the_ssl_options_of_their_query():
    redis_transport.install()
    url = "rediss://push-app:p%40ss@cache.example:6380/0?ssl_cert_reqs=required&ssl_ca_certs=%2Fetc%2Fpush%2Fca.pem"
    with kombu.Connection(url) as conn:
        assert isinstance(conn.transport, redis_transport.Transport)
        assert conn.as_uri().startswith("rediss://")  # Flower's Broker page: its RedisSsl reader
        assert conn.ssl == {"ssl_cert_reqs": ssl.CERT_REQUIRED, "ssl_ca_certs": "/etc/push/ca.pem"}
        assert (conn.userid, conn.password) == ("push-app", "p@ss")
        assert redis_transport.Transport.Channel.connection_class_ssl is redis.SSLConnection


def test_rabbitmq_keeps_kombus_own_transport():
    redis_transport.install()
    with kombu.Connection("amqp://guest:guest@127.0.0.1:5672//") as conn:
        assert not isinstance(conn.transport, redis_transport.Transport)


def test_a_tls_brokers_ssl_options_are_read_from_its_url_for_broker_use_ssl():
    url = "rediss://:pw@cache.example:6380/0?ssl_cert_reqs=required&ssl_ca_certs=%2Fetc%2Fpush%2Fca.pem"
    assert redis_transport.ssl_options(url) == {"ssl_cert_reqs": ssl.CERT_REQUIRED, "ssl_ca_certs": "/etc/push/ca.pem"}
    assert redis_transport.ssl_options(f"{url};rediss://other:6380/0") == redis_transport.ssl_options(url)
    assert redis_transport.ssl_options("redis://127.0.0.1:6379/0") is None
    assert redis_transport.ssl_options("amqps://guest:guest@mq.example:5671//") is None

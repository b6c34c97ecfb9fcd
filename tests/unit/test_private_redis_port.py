"""cluster.private_redis_port: where ``python cluster.py`` starts its private Redis when none
answers at REDIS_URL (pure: whether a port is free is asked of the function given)."""

import socket

import pytest

from cluster import REDIS_DEFAULT_PORT, port_free, private_redis_port


def free(port: int) -> bool:
    return True


def taken(port: int) -> bool:
    return False


@pytest.mark.parametrize(("url", "port"), [
    ("redis://127.0.0.1:6379/1", 6379),  # the default REDIS_URL: business code's default broker URL reaches it
    ("redis://localhost:6400/1", 6400),
    ("redis://127.0.0.1/1", REDIS_DEFAULT_PORT),
    ("redis://:secret@127.0.0.1:6381/1", 6381),
])
def test_redis_urls_own_port_on_this_host_when_free(url, port):
    assert private_redis_port(url, free) == port


@pytest.mark.parametrize("url", [
    "redis://10.0.0.5:6379/1",  # another host's: a private Redis here would not be what the URL names
    "rediss://127.0.0.1:6380/1",  # TLS: the private Redis serves plain TCP
    "unix:///run/redis.sock",
    "redis://127.0.0.1:notaport/1",
])
def test_a_free_port_for_any_other_url(url):
    assert private_redis_port(url, free) is None


def test_a_free_port_when_something_else_listens_on_the_urls():
    assert private_redis_port("redis://127.0.0.1:6379/1", taken) is None


def test_a_port_with_a_listener_is_not_free_and_one_without_is():
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        assert not port_free(port)
    assert port_free(port)

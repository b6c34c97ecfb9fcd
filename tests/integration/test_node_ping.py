"""The node's PING of its Redis (``PushNode._ping_redis``), on a real node on a plain asyncio loop
(no sockets of its own) and a real redis-server: what its log line says when Redis stops
answering, and that it is ready again once Redis answers."""

from __future__ import annotations

import contextlib
import logging
import os
import signal

import redis.asyncio as aioredis

import launcher
from wsnode.addressclaim import AddressClaim
from wsnode.app import PushNode
from wsnode.registry import Leases


async def node_on(server: launcher.RedisServer) -> PushNode:
    """A node (not started: no sockets of its own) whose Redis client, leases and address claim
    use ``server``: the renewal takes the claim too, and on the settings' Redis it failed alone."""
    node = PushNode(launcher.free_port(), celery_app=object())
    await node.redis.aclose()
    node.redis = aioredis.Redis.from_url(server.url(1), socket_timeout=30)
    node.leases = Leases(node.redis, node.address, 30)
    node.claim = AddressClaim(node.redis, node.address, 30)
    return node


@contextlib.asynccontextmanager
async def answered_node():
    """A node (:func:`node_on`) on a redis-server of its own, whose first PING was answered."""
    with launcher.RedisServer() as server:
        node = await node_on(server)
        try:
            await node._ping_redis()
            assert node.redis_ok
            yield node, server
        finally:
            await node.redis.aclose()


@contextlib.contextmanager
def not_answering(server: launcher.RedisServer):
    """``server`` stops answering (SIGSTOP), its sockets open; it goes on at the end."""
    os.kill(server.service.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(server.service.pid, signal.SIGCONT)


async def test_a_ping_that_gets_no_answer_says_so_in_its_log_line(caplog):
    # A ping with no answer raises asyncio.TimeoutError, whose text is empty: the line read "PING ()".
    async with answered_node() as (node, server):
        with not_answering(server), caplog.at_level(logging.WARNING, logger="wsnode.app"):
            await node._ping_redis()
        assert not node.redis_ok
        assert f"node={node.address} Redis does not answer PING (no answer within 2 s); not ready until it does" in caplog.messages


async def test_a_ping_that_fails_after_a_failed_lease_write_is_still_logged_once(caplog):
    # A lease write that failed first set redis_ok False: the PING's line, the one WARNING that says
    # Redis is down, was never written (the refusals it explains log at INFO).
    async with answered_node() as (node, server):
        with not_answering(server):
            node._redis_failed(ConnectionError("a lease write failed"))  # as app.py does when a lease write fails
            with caplog.at_level(logging.WARNING, logger="wsnode.app"):
                await node._ping_redis()
                await node._ping_redis()
        assert [m for m in caplog.messages if "Redis does not answer PING" in m] == [
            f"node={node.address} Redis does not answer PING (no answer within 2 s); not ready until it does"]

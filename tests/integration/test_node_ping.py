"""The node's PING of its Redis (``PushNode._ping_redis``), on a real node on a plain asyncio loop
(no sockets of its own) and a real redis-server: what its log line says when Redis stops
answering, and that it is ready again once Redis answers."""

from __future__ import annotations

import logging
import os
import signal

import redis.asyncio as aioredis

import launcher
from wsnode.addressclaim import AddressClaim
from wsnode.app import PushNode
from wsnode.registry import Leases


async def test_a_ping_that_gets_no_answer_says_so_in_its_log_line(caplog):
    # A ping with no answer raises asyncio.TimeoutError, whose text is empty: the line read "PING ()".
    with launcher.RedisServer() as server:
        node = PushNode(launcher.free_port(), celery_app=object())
        await node.redis.aclose()
        node.redis = aioredis.Redis.from_url(server.url(1), socket_timeout=30)
        node.leases = Leases(node.redis, node.address, 30)
        node.claim = AddressClaim(node.redis, node.address, 30)  # the renewal takes it too: on the old client it failed alone
        try:
            await node._ping_redis()
            assert node.redis_ok
            os.kill(server.service.pid, signal.SIGSTOP)  # stops answering, its sockets open
            try:
                with caplog.at_level(logging.WARNING, logger="wsnode.app"):
                    await node._ping_redis()
            finally:
                os.kill(server.service.pid, signal.SIGCONT)
            assert not node.redis_ok
            assert f"node={node.address} Redis does not answer PING (no answer within 2 s); not ready until it does" in caplog.messages
        finally:
            await node.redis.aclose()

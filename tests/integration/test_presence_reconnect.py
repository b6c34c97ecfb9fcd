"""The presence thread of a push node (``wsnode.presence.Presence``) reconnecting to a real broker:
a redis-server on a port of 127.0.0.1 that nothing listens on at first, started after a few failed
attempts and killed once the node is visible."""

from __future__ import annotations

import threading

from celery import Celery

import launcher
from tasks.queues import node_queue
from tests.unit.test_presence import Waits
from wsnode.presence import Presence, node_name

ADDRESS = "10.0.0.7:8101"


def test_a_broker_that_does_not_answer_is_retried_with_a_doubling_delay_which_starts_again_once_connected(tmp_path):
    """While no connection can be made the delay doubles (up to 30 s).  Once one is made it starts
    again at 0.5 s, also when serving then fails (the broker killed): it was reset only when
    serving ended without an error, so the node waited the doubled delay to be visible again."""
    port = launcher.free_port()
    redis_server = launcher.RedisServer(port=port, data_dir=tmp_path / "redis")
    app = Celery(broker=redis_server.url(0))
    p = Presence(app, node_name(ADDRESS), node_queue(ADDRESS), consuming=lambda: True, prefetch=512)
    killed, done = threading.Event(), threading.Event()

    def kill_once_visible() -> None:
        while not p.online:
            if done.wait(0.05):
                return
        redis_server.kill()
        killed.set()

    def on_wait(n: int) -> None:
        if n == 3:  # the 3rd attempt failed: the broker comes up now, and goes once the node is visible
            redis_server.start()
            threading.Thread(target=kill_once_visible, daemon=True).start()

    p._stopping = Waits(5, on_wait)
    try:
        p._run()
    finally:
        done.set()
        redis_server.stop()
    assert killed.is_set()  # the node was visible: a connection was made and served
    assert p._stopping.waits == [0.5, 1.0, 2.0, 0.5, 1.0]

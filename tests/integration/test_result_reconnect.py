"""The worker app's Redis result backend (``tasks.resultbackend``) reconnecting its subscription
after a Redis restart, on a real Redis watched with ``MONITOR``: code that imports this project and
waits on ``collect.delay(...).get()`` uses it."""

from __future__ import annotations

import concurrent.futures

import pytest
import redis as redis_lib
from celery.exceptions import TimeoutError as ResultTimeout

from tasks import resultbackend
from tests.integration.conftest import private_business_app


#: What the test sends when it has seen enough, to find the end of what ``MONITOR`` showed.
END = "end-of-watch"


def _commands_until_end(monitor) -> list[str]:
    """The commands ``MONITOR`` showed, up to the test's ``ECHO`` of :data:`END`."""
    seen = []
    while END not in (command := monitor.next_command()["command"]):
        seen.append(command)
    return seen


def test_a_get_across_a_redis_restart_subscribes_again_before_it_reads_the_stored_results(tmp_path):
    """Celery's reconnection read the stored results (``MGET``), then subscribed again: a result
    written in between was never heard of, and its ``.get()`` waited its whole timeout for a result
    that was stored.  Subscribed first, a result written after the read comes by its notice, and one
    written before by the read."""
    with private_business_app(tmp_path) as (server, app):
        resultbackend.install(app)
        result = app.AsyncResult("restart-straddler")
        with pytest.raises(ResultTimeout):
            result.get(timeout=0.2)  # subscribed to its notice
        server.restart()
        key = app.backend.get_key_for_task("restart-straddler").decode()
        watcher = redis_lib.Redis.from_url(server.url(1))
        with watcher.monitor() as monitor:
            with concurrent.futures.ThreadPoolExecutor(1) as pool, pytest.raises(ResultTimeout):
                pool.submit(result.get, timeout=3).result(timeout=60)  # nothing stores a result here
            watcher.echo(END)
            commands = [command.split()[0].strip('"').upper() for command in _commands_until_end(monitor) if key in command]
        assert "MGET" in commands, commands  # the reconnection read the stored results
        read = commands.index("MGET")
        assert "SUBSCRIBE" in commands[:read] and "SUBSCRIBE" not in commands[read:], commands
        watcher.close()

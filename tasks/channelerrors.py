"""Channel errors on a worker's broker connection once it has consumed: how long to wait before
connecting again, and what to tell the operator.  Pure.

A channel error is the broker refusing one command (RabbitMQ closing the channel with a code,
a Redis error reply) while the connection stays up.  ``broker_channel_error_retry`` (worker.py)
retries it as a lost connection, which is what a one-off needs: RabbitMQ's consumer timeout, a
Redis broker demoted to a replica for the length of a failover.  One that comes back at every
connection (a queue declared again with other arguments, a queue's key of another type in
Redis) was retried five times a second until it was fixed, each time with Celery's traceback.
:class:`ChannelErrorBackoff` spaces such retries out, and :func:`advice` says what is wrong.
"""

from __future__ import annotations

import re

import redisfull
import redislogin

#: Seconds before the second connection of a run of channel errors (the first is at once); each
#: next one waits twice as long, up to ``MAX_DELAY``.
FIRST_DELAY = 1.0
MAX_DELAY = 30.0
#: A worker that consumed this long since it last connected ends the run: its next channel error
#: is retried at once again.
STEADY_SECONDS = 30.0


class ChannelErrorBackoff:
    """The delay before each connection after a channel error.  Pure; the worker's main process.

    The first channel error of a run is retried at once; while the errors keep coming, each before
    the worker consumed ``steady`` seconds on a connection, the delay doubles from ``first`` up to
    ``cap``.  Connection errors are not counted (Celery's ``ensure_connected`` backs those off),
    but one that ends a connection that consumed ``steady`` seconds ends the run (:meth:`lost`).
    """

    def __init__(self, first: float = FIRST_DELAY, cap: float = MAX_DELAY, steady: float = STEADY_SECONDS) -> None:
        self.first, self.cap, self.steady = first, cap, steady
        #: Channel errors in the current run (0: none since the worker last consumed steadily).
        self.run = 0
        self._consuming_since: float | None = None

    def consuming(self, now: float) -> None:
        """The worker consumes again, on a new connection, from monotonic time ``now``."""
        self._consuming_since = now

    def lost(self, now: float) -> None:
        """The connection was lost (a connection error, not counted) at monotonic time ``now``: a
        connection that consumed ``steady`` seconds ends the run, as a channel error then would."""
        if self._consuming_since is not None and now - self._consuming_since >= self.steady:
            self.run = 0
        self._consuming_since = None

    def failed(self, now: float) -> float:
        """A channel error at monotonic time ``now``: seconds to wait before connecting again."""
        if self._consuming_since is not None and now - self._consuming_since >= self.steady:
            self.run = 0
        self._consuming_since = None
        self.run += 1
        return 0.0 if self.run == 1 else min(self.cap, self.first * 2 ** (self.run - 2))


_QUEUE = re.compile(r"for queue '([^']*)'|no queue '([^']*)'")
_EXCHANGE = re.compile(r"for exchange '([^']*)'|no exchange '([^']*)'")
_REDIS_KEY = re.compile(r"\((?:LLEN|BRPOP|RPOP|LPUSH|RPUSH|LRANGE|LREM) ([^ )]+)")


def _named(pattern: re.Pattern, text: str, default: str | None) -> str | None:
    match = pattern.search(text)
    return next((group for group in match.groups() if group), default) if match else default


def advice(error: object) -> str:
    """What a channel error means and what to do about it, from its text (py-amqp's
    ``PreconditionFailed: (50, 10): PRECONDITION_FAILED - ...``, redis-py's ``WRONGTYPE ...``).
    Pure."""
    text = str(error)
    if "inequivalent arg" in text:
        if _QUEUE.search(text):
            queue = _named(_QUEUE, text, "?")
            return (f"queue {queue!r} exists on the broker with other arguments than the worker declares (set once by another "
                    f"setting or client): delete it (rabbitmqctl delete_queue {queue}; what waits on it is lost) or declare it as before")
        exchange = _named(_EXCHANGE, text, "?")
        return (f"exchange {exchange!r} exists on the broker with another type or other arguments than the worker declares: "
                f"delete it (rabbitmqctl delete_exchange {exchange}) or declare it as before")
    if "delivery acknowledgement" in text and "timed out" in text:
        return ("a task stayed unacknowledged longer than RabbitMQ's consumer_timeout (a countdown or eta held that long): "
                "what the worker held comes back; set consumer_timeout (rabbitmq.conf) above your longest countdown")
    if "NOT_FOUND" in text:
        return "a queue or exchange the worker uses is missing on the broker (deleted while the worker ran?)"
    if "ACCESS_REFUSED" in text and "Login was refused" in text:  # RabbitMQ refusing the login itself, as the worker first connects
        return "the broker refused the worker's login: check the user name and password in BROKER_URL (rabbitmqctl list_users)"
    if "ACCESS_REFUSED" in text:
        return "the broker's user may not use a queue or exchange of the worker: grant it (rabbitmqctl set_permissions) on the vhost"
    if "RESOURCE_LOCKED" in text:
        return "a queue of the worker is held exclusively by another connection: stop the client holding it"
    if "WRONGTYPE" in text:
        key = _named(_REDIS_KEY, text, None)
        return (f"{f'key {key!r}' if key else 'a queue key (collect, dispatch, or one of their priority lists)'} of the Redis "
                "broker's database holds another type than the list the worker reads as a queue (written by hand or by another "
                f"program using that database?): see TYPE {key or '<key>'}, then delete or rename it")
    if "READONLY" in text or "read only replica" in text:  # redis-py's ReadOnlyError drops the "READONLY"
        return ("the Redis broker is a replica (a failover?): the worker connects again until it is a master, "
                "or point BROKER_URL at the master")
    if "Link with MASTER is down" in text:  # MASTERDOWN (redis-py's MasterDownError drops the word)
        return ("the Redis broker is a replica cut off from its primary that serves no stale data (replica-serve-stale-data no; "
                "a failover?): the worker connects again until it is in sync or promoted, or point BROKER_URL at the primary")
    if "no permissions" in text or "NOPERM" in text:  # redis-py's NoPermissionError drops the "NOPERM"
        return f"the Redis broker's user (BROKER_URL) lacks a right the worker uses: {redislogin.RIGHTS_HINT}; the worker connects again until it has it"
    if redisfull.is_full(error):  # by its text: redis-py's OutOfMemoryError drops the "OOM" of Redis's reply
        return redisfull.HINT
    return "the broker refused a command on the worker's channel"

"""A broker connection lost while its ``BRPOP`` waited: what a channel does so that no message
goes to that ``BRPOP``.  Part of :class:`tasks.redis_transport.Channel` (:class:`LostBrpop`).

On a reset Redis never saw (a NAT or load balancer dropping its state), Redis holds that ``BRPOP``
until its timeout, and a message pushed to its queues meanwhile goes into it, whose answer nobody
reads. The channel asks Redis, once per ``BRPOP`` connection, which client it is (``CLIENT INFO``),
and :meth:`tasks.redis_transport.Channel.close` ends that client (``CLIENT KILL``) before it pushes
back what it held unacknowledged; where Redis refuses, it waits the ``BRPOP`` out. Messages pushed
between the cut and the close can still go into it: only a transport that does not pop before it
holds could close that gap.

Like every kombu channel object, used from the thread that owns the connection only.  Logs as
``tasks.redis_transport``, the channel's logger.
"""

from __future__ import annotations

import logging
from time import monotonic, sleep

from kombu.utils.encoding import bytes_to_str
from redis.exceptions import ResponseError

log = logging.getLogger("tasks.redis_transport")

#: Seconds :meth:`tasks.redis_transport.Channel.close` allows, beyond ``brpop_timeout``, for a
#: ``BRPOP`` whose connection was lost to have reached Redis and timed out there, before it pushes
#: back what it held.
BRPOP_ANSWER_MARGIN = 0.5


class LostBrpop:
    """The part of :class:`tasks.redis_transport.Channel` that knows which client its ``BRPOP``
    connection is, and ends that client in Redis (or waits its ``BRPOP`` out) when the connection
    was lost unread, before the channel's close pushes back what it held."""

    #: When the ``BRPOP`` whose connection was lost unread was sent (``monotonic``), until
    #: :meth:`_wait_out_lost_brpop` waited it out.
    _brpop_lost_at: float | None = None
    #: ``(socket, id, addr)``: the connection the ``BRPOP`` goes on, as Redis names it (``CLIENT INFO``).
    _brpop_client: tuple | None = None
    #: ``(id, addr)`` of the connection whose ``BRPOP`` was lost unread, until the close ended it.
    _lost_brpop_client: tuple | None = None
    #: False once the server refused ``CLIENT INFO`` (older than 6.2, or an ACL): a lost ``BRPOP`` is then waited out.
    _client_info_ok = True

    def _identify_brpop_connection(self) -> None:
        """Ask Redis, once per connection, which client the ``BRPOP`` connection is (its id and the
        address Redis sees): what :meth:`close` ends in Redis if that connection is lost unread.
        One round trip on a connection that has just connected, before its first ``BRPOP``."""
        connection = self.client.connection
        sock = getattr(connection, "_sock", None)
        if self._brpop_client and self._brpop_client[0] is sock:
            return
        self._brpop_client = None
        if sock is None or not self._client_info_ok:
            return
        try:
            connection.send_command("CLIENT", "INFO")
            info = bytes_to_str(connection.read_response())
        except ResponseError as exc:  # Redis older than 6.2, or an ACL without CLIENT INFO
            self._client_info_ok = False
            log.info("Redis refused CLIENT INFO (%s): a broker connection lost while its BRPOP waits will be waited out, "
                     "not ended", exc)
            return
        fields = dict(part.split("=", 1) for part in info.split() if "=" in part)
        if fields.get("id") and fields.get("addr"):
            self._brpop_client = (sock, fields["id"], fields["addr"])

    def _wait_out_lost_brpop(self) -> None:
        """Before kombu's close pushes back what the channel holds unacknowledged: if the
        connection of a ``BRPOP`` it sent was lost unread, end that client in Redis
        (:meth:`_end_lost_brpop`), or else wait until Redis has answered it (its timeout,
        ``brpop_timeout``, from when it was sent, and a margin for its way there).  A reset that
        Redis never saw (a NAT or load balancer dropping its state, a half-open connection) leaves
        the ``BRPOP`` blocked in Redis: a message pushed meanwhile, pushed back by this close or sent
        by anyone, went to it, whose answer nobody reads, and was gone from the broker (seen: a
        refused message whose failure waited, ``tests/integration/test_refused_while_results_wait.py``;
        a message sent during the close, ``tests/integration/test_redis_transport.py``).  A worker
        reconnecting closes its channels, and so does a push node's consumer dropping a lost
        connection (kombu's ``collect``).  The wait only with something to push back (a push node
        reads without acknowledgements: never); at most ``brpop_timeout`` and the margin, on a
        reconnection."""
        lost_at, self._brpop_lost_at = self._brpop_lost_at, None
        lost_client, self._lost_brpop_client = self._lost_brpop_client, None
        if lost_at is None or self.closed or (lost_client is not None and self._end_lost_brpop(*lost_client)):
            return
        qos = getattr(self, "_qos", None)
        if qos is None or not qos._delivered:
            return
        wait = lost_at + (self.brpop_timeout or 0) + BRPOP_ANSWER_MARGIN - monotonic()
        if wait > 0:
            log.info("waiting %.1f s for the lost connection's BRPOP to time out in Redis before pushing back %d unacknowledged "
                     "message(s)", wait, len(qos._delivered))
            sleep(wait)  # at most brpop_timeout and the margin: lost_at is in the past

    def _end_lost_brpop(self, client_id: str, addr: str) -> bool:
        """End, in Redis, the client of a connection lost while its ``BRPOP`` waited (``CLIENT
        KILL`` by its id and address, which together name no other client, even on a Redis that
        restarted and numbers its clients from 1 again): from then on nothing pushed goes to that
        ``BRPOP``.  True once Redis answered (the client ended, or gone already: Redis saw the
        connection close); False where it refused (an ACL or a managed Redis without ``CLIENT
        KILL``) or cannot be reached, and the caller waits the ``BRPOP`` out instead."""
        for attempt in (1, 2):
            try:
                with self.conn_or_acquire() as client:
                    ended = client.client_kill_filter(_id=client_id, addr=addr, skipme=True)
                break
            except self.connection_errors as exc:
                if attempt == 1:
                    continue  # a pooled connection the same cut reset (now dropped): once more, on a new one
                error = exc
            except ResponseError as exc:
                error = exc
            log.info("could not end the BRPOP of a lost broker connection in Redis (CLIENT KILL ID %s ADDR %s: %s)",
                     client_id, addr, error)
            return False
        if ended:
            log.info("ended the BRPOP of a lost broker connection in Redis (client id %s, %s): nothing pushed from now "
                     "on goes to it", client_id, addr)
        return True

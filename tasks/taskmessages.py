"""What a worker needs of a message on its task queues before Celery handles it.  Worker main
process, on its event loop.

Celery's consumer reads a message's task name, task id and body without checking their shape.
Several shapes a message made by hand or by another client can have raised out of the worker's
event loop, which stopped the worker ("Unrecoverable error"), with every task it had read and not
run left to come back after the visibility timeout: a task name that is not a string (a list), an
unknown task without a task id, a body other than ``[args, kwargs, embed]``, a ``timelimit`` header
other than ``[hard, soft]`` (Celery unpacks it as a plain task's request goes to the pool), and (for
``tasks.collect``, whose batches read the arguments in this process) args and kwargs that are not
a list and an object.

:class:`Consumer`, the worker's consumer (Celery's ``worker_consumer`` setting), checks every
message's envelope first (:func:`tasks.envelopes.envelope_problem`) and refuses one it cannot run: the error is
logged, stored as the task's result when the message has a task id, and the message is discarded,
as Celery discards an invalid task message.  It also stores a result for the messages Celery
refuses itself and only logged (an unreadable ``eta`` or ``expires``, a content type the worker
does not accept, a body that does not decode), so that a caller waiting on one is told why instead
of waiting forever; and every task's request (:class:`tasks.taskrequest.Request`) refuses so an
eta that parses but is no time the worker's clock holds, which Celery ran at once.  A refused
message's failure is written on the failure writer's thread (:mod:`tasks.failurewriter`), which a
results Redis refusing writes for a while holds instead of the loop, and so is the
``NotRegistered`` of a message naming a task the worker does not know (Celery wrote it on the
loop); the message is discarded (rejected, or acknowledged for a body that does not decode) only
once its failure is written or given up.  So is the failure of a task whose item of a Redis queue
the broker channel dropped, as no message it can deliver (:meth:`Consumer.on_dropped_item`, from
:mod:`tasks.backlogread`).

:func:`tasks.envelopes.depth_problem` is for ``tasks.collect``'s strategy: its batches are pickled in this process
for the pool, and arguments nested near Python's recursion limit raised out of the loop there.

The consumer also decides what a channel error on its broker connection does
(:meth:`Consumer.on_connection_error_after_connected`): it stops a worker that never consumed
(the broker refused a queue it declares or consumes at start), and is retried once it has, at once
the first time and after a doubling delay while it keeps coming back (:mod:`tasks.channelerrors`).
One raised as the worker first connects, before it declares anything (a Redis over ``maxmemory``,
or a replica, refuses the transport's first write), is retried so too
(:meth:`Consumer.on_connection_error_before_connected`).  And on RabbitMQ, a queue of the worker
deleted while it consumes it (or whose leader moved) is declared and consumed again on the same
connection (:meth:`Consumer.on_consumer_cancelled`, :mod:`tasks.consumercancels`'s part of the
consumer).

The worker's decoder of JSON message bodies is :mod:`tasks.jsondecoder`'s.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import time
import warnings

from celery import signals
from celery.exceptions import CPendingDeprecationWarning, NotRegistered
from celery.utils.objects import Bunch
from celery.worker.consumer import Consumer as CeleryConsumer
from celery.worker.consumer.connection import Connection as ConnectionStep
from celery.worker.consumer.consumer import CONNECTION_ERROR, CONNECTION_RETRY, INVALID_TASK_ERROR, MESSAGE_DECODE_ERROR, UNKNOWN_TASK_ERROR, dump_body
from celery.worker.consumer.consumer import logger as celery_consumer_log
from celery.worker.state import maybe_shutdown
from kombu.exceptions import ContentDisallowed
from kombu.exceptions import OperationalError as LibraryOperationalError
from kombu.common import ignore_errors
from kombu.utils.encoding import safe_repr

import redislogin
from tasks.channelerrors import ChannelErrorBackoff, advice
from tasks.consumercancels import ConsumerCancels
from tasks.failurewriter import FailureWriter
from tasks.envelopes import content_type_problem, envelope_problem, not_a_kombu_message, not_a_task_message, not_run, raw_task_id, task_id_of
from tasks.messages import InvalidMessage

log = logging.getLogger(__name__)


def caller(reply_to: object, correlation_id: object) -> Bunch:
    """The request a result backend is given with the failure of a message that does not run:
    where its caller waits (the ``rpc://`` backend sends the result to the ``reply_to`` queue, and
    without it raised "RPC backend missing task request"), and nothing to follow it, as Celery's
    consumer passes for an unknown task.  Pure."""
    return Bunch(chord=None, errbacks=None, reply_to=reply_to, correlation_id=correlation_id)


def store_failure(backend, task_id: str | None, error: Exception, properties: dict | None = None) -> None:
    """Store ``error`` as the result of the task ``task_id`` (if any), which will not run;
    ``properties``: its message's, which say where its caller waits for it (:func:`caller`)."""
    if task_id is None:
        return
    properties = properties or {}
    try:
        backend.mark_as_failure(task_id, error, request=caller(properties.get("reply_to"), properties.get("correlation_id")))
    except Exception as exc:  # noqa: BLE001 - the message is dropped anyway; only its answer is lost
        log.warning("task %r: result not stored (%s)", task_id, exc)


def _not_celerys_connection_retry(record: logging.LogRecord) -> bool:
    return record.msg != CONNECTION_RETRY


@contextlib.contextmanager
def _without_celerys_warning():
    """Celery's consumer's "Connection to broker lost" warning (with the error's traceback) and
    its warning that long-running tasks are not cancelled on a connection loss, muted while it
    runs (the worker's main thread), for a reconnection already logged in one line."""
    celery_consumer_log.addFilter(_not_celerys_connection_retry)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", CPendingDeprecationWarning)
            yield
    finally:
        celery_consumer_log.removeFilter(_not_celerys_connection_retry)


def _told_refusal(record: logging.LogRecord) -> bool:
    """Celery's "Cannot connect to URL: ERROR. Trying again in ..." line, once per retry as before,
    with the error told as what to fix when the broker's Redis refuses BROKER_URL's login, rights or
    certificate (:func:`redislogin.refused`), which waiting alone does not end (the password changed
    in Redis while the worker runs).  Other lines pass as they are."""
    if record.msg == CONNECTION_ERROR and isinstance(record.args, tuple) and len(record.args) == 3:
        uri, exc, next_step = record.args
        if isinstance(exc, BaseException) and (line := redislogin.refused(exc, ("BROKER_URL",))) is not None:
            record.args = (uri, line, next_step)
    return True


def _broker_errors_unwrapped(start, consumer):
    """A consumer step's ``start`` that raises the transport's own error where kombu wrapped it in
    its ``OperationalError``, which Celery does not count as recoverable: the mingle step's hello
    to the other workers (a PUBLISH, sent on every connection) refused by a Redis whose user lost
    its channel rights (``&*``) stopped the worker for good ("Unrecoverable error"), where a refused
    command on the connection is retried (:meth:`Consumer.on_connection_error_after_connected`) and
    the worker goes on once the rights are back; a connection lost during it, likewise.  Every step
    but the connection's, which starts first."""

    @functools.wraps(start)
    def started(parent):
        try:
            return start(parent)
        except LibraryOperationalError as exc:
            cause = exc.__cause__
            if isinstance(cause, tuple(consumer.connection_errors) + tuple(consumer.channel_errors)):
                raise cause from None
            raise

    return started


class Consumer(ConsumerCancels, CeleryConsumer):
    """Celery's consumer, which refuses a message whose envelope it cannot run
    (:func:`envelope_problem`) and stores a result for every message it discards that has a
    task id."""

    #: Whether this worker ever got as far as consuming (Celery calls :meth:`on_ready` then, on
    #: every connection): never reset.
    _consumed = False
    #: Monotonic time before which :meth:`connect` does not connect again, or None.
    _connect_at: float | None = None
    #: The connection :meth:`connect` is making, until it returns it.
    _connecting = None
    #: Writes the failures of refused messages beside the loop (:meth:`_write_failure`); made by the first.
    _failure_writer: FailureWriter | None = None

    def __init__(self, *args, **kwargs):
        #: Spaces out the connections after channel errors that keep coming back.
        self.channel_error_backoff = ChannelErrorBackoff()
        celery_consumer_log.addFilter(_told_refusal)  # once: a filter already there is not added again
        super().__init__(*args, **kwargs)
        for step in self.steps:
            if not isinstance(step, ConnectionStep):  # its retries exhausted (broker_connection_max_retries) stop the worker, as ever
                step.start = _broker_errors_unwrapped(step.start, self)

    def on_ready(self):
        self._consumed = True
        self.channel_error_backoff.consuming(time.monotonic())
        self._watch_cancels()  # before the loop reads anything on this connection
        self._watch_dropped()
        super().on_ready()

    def add_task_queue(self, *args, **kwargs):
        super().add_task_queue(*args, **kwargs)  # `celery control add_consumer` (ConsumerCancels' watches its cancels)
        self._watch_dropped()

    def _watch_dropped(self) -> None:
        """Has the Redis transport's channel that reads the task queues hand each item it drops
        (one that is not a message kombu can deliver) that names a task id to
        :meth:`on_dropped_item`.  Only that transport's channels have ``on_dropped``.  The worker's
        main thread, before its loop reads the connection again."""
        channel = getattr(getattr(self, "task_consumer", None), "channel", None)
        if channel is not None and hasattr(channel, "on_dropped"):
            channel.on_dropped = self.on_dropped_item

    def on_dropped_item(self, queue: str, task_id: str, problem: str, properties: dict | None) -> None:
        """Stores the failure of the task ``task_id``, whose item of ``queue``'s Redis list the
        transport dropped (``problem``: why), so that its caller is told what was wrong and what
        to push instead of waiting for ever; on the failure writer's thread, as every refused
        message's.  The item is out of the list and unrecorded already (nothing to settle): a
        worker that stops before the write loses the failure, not a task.  The loop thread (the
        transport's read, within the event loop)."""
        error = not_a_kombu_message(queue, problem)
        log.error("task %r: its item of queue %r cannot be read (%s): storing that as its failure", task_id, queue, problem)
        self._writer().submit(task_id, error, properties, lambda: None)

    def _channel_error(self, exc) -> bool:
        """Whether ``exc`` is the broker refusing a command (a channel error), not a lost connection."""
        return isinstance(exc, tuple(self.channel_errors)) and not isinstance(exc, tuple(self.connection_errors))

    def on_connection_error_before_connected(self, exc):
        """An error raised by :meth:`connect` before the worker ever held a connection (Celery calls
        :meth:`on_connection_error_after_connected` once it did: its ``connection`` stays set).  On
        Redis the transport's first write, as it joins the event loop, is the lock of kombu's look
        for unacknowledged tasks to restore (``restore_visible``, a ``SET``), which a Redis over
        ``maxmemory`` refuses (``OutOfMemoryError``), and a replica too (``READONLY``): a channel
        error.  For a worker (re)started while Redis was full, Celery logged "Cannot connect to
        ..." and connected again at once, several times a second, with its ``RestartFreqExceeded``
        traceback every second, until Redis had room.  A channel error here is retried as one
        after the worker connected is: at once the first time, then after 1, 2, 4 ... up to 30 s
        (:class:`ChannelErrorBackoff`, waited in :meth:`connect`), each time with one line saying
        what is wrong and what to do (:func:`advice`).  A connection error keeps Celery's line: it
        gets here only once ``ensure_connected``, which backs it off, connected."""
        if not self._channel_error(exc):
            return super().on_connection_error_before_connected(exc)
        backoff = self.channel_error_backoff
        now = time.monotonic()
        delay = backoff.failed(now)
        self._connect_at = now + delay
        refusal = str(exc).rstrip(".")
        if backoff.run == 1:
            log.warning("the broker refused a command as the worker connected: %s. %s; connecting again now", refusal, advice(exc))
        else:
            log.error("the broker refused a command as the worker connected, again (%d times in a row): %s. %s; connecting again in %.0f s",
                      backoff.run, refusal, advice(exc), delay)

    def on_connection_error_after_connected(self, exc):
        """``broker_channel_error_retry`` (worker.py) takes a channel the broker closed for a lost
        connection, which is what RabbitMQ's consumer timeout needs: it comes while the worker
        consumes.  A channel error before this worker ever consumed (declaring its queues or
        starting its consumers: a queue declared before with other arguments, a vhost that refuses
        it access, a missing queue) comes back at every connection: retried, the worker
        reconnected five times a second for ever and never became ready.  Such an error stops the
        worker, as Celery's default did ("Unrecoverable error").

        Once the worker consumed, a channel error on a later connection, before it consumes again,
        is retried: it is what a failover looks like.  A Redis broker demoted to a replica ends the
        pending ``BRPOP`` (``UNBLOCKED``, while consuming) and answers the reconnection's first
        write with ``READONLY`` until it is promoted again or the broker's address moves to the new
        master; that stopped the worker ("Unrecoverable error: ReadOnlyError") where Celery's retry
        carries it over the failover.

        A channel error that keeps coming back after that (the queue deleted and declared again
        with other arguments, a queue's key in Redis set to a string) reconnected five times a
        second until it was fixed, each time with Celery's warning and traceback: the first of a
        run is retried at once, as before, and each next one after a doubling delay, up to 30 s
        (:class:`ChannelErrorBackoff`, waited in :meth:`connect`), with one line saying what is
        wrong and what to do (:func:`advice`) instead of Celery's traceback."""
        channel_error = self._channel_error(exc)
        if not self._consumed and channel_error:
            log.critical("the broker refused what the worker declares or consumes at start (%s): not retried. %s", exc, advice(exc))
            try:
                self.connection.collect()
            except Exception:  # noqa: BLE001 - the worker stops anyway
                pass
            raise exc
        if not channel_error:
            # Without this, a run of channel errors long fixed went on after a lost connection:
            # a channel error soon after the reconnection waited as the next of that run.
            self.channel_error_backoff.lost(time.monotonic())
            # One line, for what every broker restart or network blip does: Celery's came with
            # the error's traceback (three chained ones from redis-py) and its warning that
            # running tasks are not cancelled (the platform's choice: Celery's default).
            log.warning("consumer: Connection to broker lost (%s: %s). Trying to re-establish the connection...", type(exc).__name__, exc)
            with _without_celerys_warning():
                return super().on_connection_error_after_connected(exc)
        backoff = self.channel_error_backoff
        now = time.monotonic()
        delay = backoff.failed(now)
        if backoff.run == 1:
            super().on_connection_error_after_connected(exc)
            log.warning("the broker refused a command on the worker's channel: %s. %s; connecting again now", exc, advice(exc))
            return
        with _without_celerys_warning():
            super().on_connection_error_after_connected(exc)
        self._connect_at = now + delay
        log.error("the broker refused a command on the worker's channel again (%d times in a row): %s. %s; connecting again in %.0f s",
                  backoff.run, exc, advice(exc), delay)

    def connect(self):
        """Celery's, after the delay :meth:`on_connection_error_after_connected` or
        :meth:`on_connection_error_before_connected` set: the Connection step calls it in the
        worker's main thread, where Celery's own retries wait (its loop does not run between
        connections).  A warm or cold shutdown ends the wait, as it ends Celery's.

        A connection that fails after it connected, as it joins the event loop (a Redis over
        ``maxmemory`` refuses the transport's first write), is closed here: Celery never holds it
        (its ``connection`` is not set), and each such try left two clients open in Redis until
        garbage collection found them (a worker started while Redis was full: 12 more a second)."""
        connect_at, self._connect_at = self._connect_at, None
        if connect_at is not None:
            while (left := connect_at - time.monotonic()) > 0:
                maybe_shutdown()
                time.sleep(min(left, 0.25))
            maybe_shutdown()
        self._connecting = None
        try:
            return super().connect()
        except Exception:
            if self._connecting is not None:
                ignore_errors(self._connecting, self._connecting.close)
            raise
        finally:
            self._connecting = None

    def connection_for_read(self, heartbeat=None):
        """Celery's, kept for :meth:`connect` until it returns it."""
        self._connecting = super().connection_for_read(heartbeat=heartbeat)
        return self._connecting

    def create_task_handler(self, *args, **kwargs):
        on_task_received = super().create_task_handler(*args, **kwargs)

        def checked(message):
            try:
                body = message.payload  # decoded once: kombu keeps it for Celery
            except Exception:  # noqa: BLE001 - Celery's handler reports it (on_decode_error)
                return on_task_received(message)
            try:
                if (problem := content_type_problem(message.content_type, body)) is not None:
                    return self.refuse(message, body, InvalidMessage(f"not run: {problem}"))
                problem = envelope_problem(message.headers, body)
            except Exception as exc:  # noqa: BLE001 - a check that fails refuses that message alone, never stops the worker
                problem = f"it could not be checked ({exc!r:.200})"
            if problem is None:
                return on_task_received(message)
            self.refuse(message, body, not_a_task_message(problem))

        return checked

    def refuse(self, message, body, error: Exception) -> None:
        task_id = task_id_of(message.headers, body) or raw_task_id(body)
        log.error("refused a message of queue %r (task id %r): %s", (message.delivery_info or {}).get("routing_key"), task_id, error)
        self._failed(message, body, task_id, error, functools.partial(self._reject, message, error))

    def on_invalid_task(self, body, message, exc):
        """Celery's, but for its rejection of the message, which waits until the failure is
        written (:meth:`_failed`): Celery rejected it first."""
        celery_consumer_log.error(INVALID_TASK_ERROR, exc, dump_body(message, body), exc_info=True)  # Celery's line
        self._failed(message, body, task_id_of(message.headers, body), not_run(exc), functools.partial(self._reject, message, exc))

    def on_decode_error(self, message, exc):
        """Celery's, but for its acknowledgement of the message, which waits until the failure is
        written (:meth:`_failed`): Celery acknowledged it first."""
        celery_consumer_log.critical(MESSAGE_DECODE_ERROR, exc, message.content_type, message.content_encoding,  # Celery's line
                                     safe_repr(message.headers), dump_body(message, message.body), exc_info=True)
        # A protocol 1 message keeps its task id in the body that did not decode: its content
        # type refused ("application/json; charset=utf-8"), the id is read from it as JSON.
        error = not_run(exc) if isinstance(exc, ContentDisallowed) else InvalidMessage(
            f"not run: its body could not be decoded as {message.content_type} ({exc})")
        self._failed(message, None, task_id_of(message.headers, None) or raw_task_id(message.body), error,
                     functools.partial(message.ack_log_error, log, self.connection_errors))

    def on_unknown_task(self, body, message, exc):
        """Celery's, but for the write of its failure (``NotRegistered``), which waits on the
        failure writer's thread (:meth:`_write_failure`), and its rejection, which waits for the
        write: Celery rejected it first and wrote it on the loop.  Its ``task-failed`` event and
        ``task_unknown`` signal are Celery's.  An unknown task's message has a task id and a name
        (:func:`envelope_problem`)."""
        celery_consumer_log.error(UNKNOWN_TASK_ERROR, exc, dump_body(message, body), message.headers, message.delivery_info,
                                  exc_info=True)  # Celery's line
        fields = message.headers if isinstance(message.headers, dict) and "task" in message.headers else message.payload
        task_id, name = fields["id"], fields["task"]

        def written() -> None:
            message.reject_log_error(log, self.connection_errors)
            dispatcher = getattr(self, "event_dispatcher", None)
            if dispatcher is not None and dispatcher.enabled:
                dispatcher.send("task-failed", uuid=task_id, exception=f"NotRegistered({name!r})")
            signals.task_unknown.send(sender=self, message=message, exc=exc, name=name, id=task_id)

        self._write_failure(message, task_id, NotRegistered(name), written)

    def _reject(self, message, exc: Exception) -> None:
        """Drops ``message`` as Celery drops one it refuses.  The loop thread."""
        message.reject_log_error(log, self.connection_errors)
        signals.task_rejected.send(sender=self, message=message, exc=exc)

    def _failed(self, message, body, task_id: str | None, error: Exception, settle) -> None:
        """Stores ``error`` as the result of a message that will not run (:meth:`_write_failure`),
        then, back on the loop, sends its ``task-received`` and ``task-failed``
        (:meth:`_send_failed_events`) and acknowledges or rejects the message (``settle``).  The
        loop thread."""
        def written() -> None:
            self._send_failed_events(message, body, task_id, error)
            settle()

        self._write_failure(message, task_id, error, written)

    def _write_failure(self, message, task_id: str | None, error: Exception, then) -> None:
        """Stores ``error`` as the result of the task ``task_id`` on the failure writer's thread
        (:mod:`tasks.failurewriter`: the loop goes on reading other tasks while a results Redis
        that refuses for a while has it wait), then runs ``then`` on the loop, which settles the
        message: only once its failure is written or given up, so that a worker that stops
        meanwhile leaves it to the broker (as :meth:`refuse` always did; Celery, for the messages
        it refuses itself, acknowledged first).  Without a task id, ``then`` runs at once: nobody
        waits for its result.  The loop thread.

        A message whose broker connection was lost while its failure waited (the consumer's channel
        is another one now, or none) is not settled: the broker gives it back (RabbitMQ requeues
        what the connection held; the Redis transport restores it as the channel closes), and the
        next read refuses it again, with its events.  Settled on the channel that is gone, kombu
        logged a CRITICAL "Couldn't reject" with a traceback (RabbitMQ), or the Redis transport
        removed the unacked record of the copy given back (the same delivery tag)."""
        if task_id is None:
            then()
            return

        def on_its_channel() -> None:
            consumer = getattr(self, "task_consumer", None)
            if consumer is None or message.channel is not consumer.channel:
                log.info("task %s: its refused message's failure was written or given up after the broker connection it came on "
                         "was lost: the broker gives the message back, and the next read refuses it again", task_id)
                return
            then()

        self._writer().submit(task_id, error, message.properties, on_its_channel)

    def _writer(self) -> FailureWriter:
        """The failure writer, made by the first failure.  The loop thread."""
        if self._failure_writer is None:
            self._failure_writer = FailureWriter(
                lambda task_id, error, properties: store_failure(self.app.backend, task_id, error, properties), self.call_soon)
        return self._failure_writer

    def _send_failed_events(self, message, body, task_id: str | None, error: Exception) -> None:
        """With task events on, sends a refused message's ``task-received`` and ``task-failed``
        (none without a task id), so that Flower lists it with its reason (as Celery sends
        task-failed for a task it does not know).  Best effort.  The loop thread."""
        dispatcher = getattr(self, "event_dispatcher", None)
        if task_id is None or dispatcher is None or not dispatcher.enabled:
            return
        fields = message.headers if isinstance(message.headers, dict) and "task" in message.headers else body
        fields = fields if isinstance(fields, dict) else {}
        name, args, kwargs = (value if isinstance(value, str) else None for value in (fields.get(k) for k in ("task", "argsrepr", "kwargsrepr")))
        try:
            dispatcher.send("task-received", uuid=task_id, name=name, args=args or "", kwargs=kwargs or "", retries=0)
            dispatcher.send("task-failed", uuid=task_id, exception=f"{type(error).__name__}: {error}", traceback="")
        except Exception as exc:  # noqa: BLE001 - events are for watching; the failure is stored and logged
            log.warning("task %r: its task-failed event not sent (%s)", task_id, exc)

"""What the worker's consumer does when RabbitMQ cancels one of its consumers (the queue was deleted,
or its leader moved to another node): it declares the queue and consumes it again on the same
connection (:class:`ConsumerCancels`).

:class:`ConsumerCancels` is a part of :class:`tasks.taskmessages.Consumer` (a mixin), written apart
because it is one concept: it uses Celery's consumer's ``task_consumer`` and ``call_soon``, and
:meth:`~tasks.taskmessages.Consumer.on_ready` has it watch every new connection's consumers.  Only
py-amqp channels report a cancel: on the Redis broker it does nothing.

Worker main process: the watch is set on its main thread before the loop reads the connection;
py-amqp calls :meth:`ConsumerCancels.on_consumer_cancelled` wherever it reads the cancel, and the
queue is declared and consumed again on the loop.  Logs as ``tasks.taskmessages``, the consumer's
logger, so that operators' filters match what they matched before it was a module of its own.
"""

from __future__ import annotations

import functools
import logging

# The consumer's logger (tasks.taskmessages), as before this was a module of its own.
log = logging.getLogger("tasks.taskmessages")


class ConsumerCancels:
    """The part of :class:`tasks.taskmessages.Consumer` that consumes a queue again when RabbitMQ
    cancels its consumer (see the module docstring)."""

    def add_task_queue(self, *args, **kwargs):
        super().add_task_queue(*args, **kwargs)  # `celery control add_consumer`
        self._watch_cancels()

    def _watch_cancels(self) -> None:
        """Has py-amqp call :meth:`on_consumer_cancelled` when RabbitMQ cancels one of the task
        consumer's consumers, where it raised ConsumerCancelled (kombu's Consumer passes no
        ``on_cancel`` to ``basic_consume``; py-amqp keeps them in ``cancel_callbacks``, by consumer
        tag).  Only py-amqp channels have one: the Redis broker cancels no consumer.  The worker's
        main thread, before its loop reads the connection again."""
        consumer = self.task_consumer
        callbacks = getattr(getattr(consumer, "channel", None), "cancel_callbacks", None)
        if callbacks is None:
            return
        for name, tag in consumer._active_tags.items():
            callbacks[tag] = functools.partial(self.on_consumer_cancelled, consumer, name)

    def on_consumer_cancelled(self, consumer, name: str, tag: str) -> None:
        """RabbitMQ cancelled the consumer ``tag`` of queue ``name``: the queue was deleted (an
        operator purging it or declaring it with other arguments) or its leader
        moved to another node.  py-amqp raised ConsumerCancelled, which Celery took for a lost
        connection (a reconnection with its warning and traceback; the requests the worker held
        came back), and swallowed in the first tenth of a second on a connection (its loop's
        first drain): the worker then consumed nothing from the queue, silently, and nobody
        declared it again, so what was sent to it was dropped.

        py-amqp calls this wherever it reads the cancel, maybe within a wait for another reply:
        the queue is declared and consumed again from the worker's loop, next."""
        self.call_soon(self._consume_again, consumer, name, tag)

    def _consume_again(self, consumer, name: str, tag: str) -> None:
        """Declares queue ``name`` again, with its exchange, binding and arguments, and consumes it
        on the same channel, unless the worker connected again since, or stopped consuming it
        (``celery control cancel_consumer``).  A channel error (the queue declared again by
        someone else with other arguments) is one while consuming
        (:meth:`~tasks.taskmessages.Consumer.on_connection_error_after_connected`).
        The worker's main thread, on its loop."""
        queue = next((queue for queue in consumer.queues if queue.name == name), None)
        if (consumer is not self.task_consumer or queue is None or consumer._active_tags.get(name) != tag
                or not getattr(consumer.channel, "is_open", False)):
            return
        log.warning("queue %r was deleted on the broker while the worker consumed it, or its leader moved to another node "
                    "(RabbitMQ cancelled the worker's consumer): declaring and consuming it again", name)
        consumer.cancel_by_queue(name)  # forgets the tag; RabbitMQ answers the cancel of a consumer it no longer has
        consumer.add_queue(queue)  # declares it
        consumer.consume()  # the queues not consumed: this one
        self._watch_cancels()

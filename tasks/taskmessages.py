"""What a worker needs of a task message before Celery builds a request from it.  Worker main
process, on its event loop.

Celery builds a request from a message's headers and body without checking their shape: a
message made by hand or by another client whose body is not ``[args, kwargs, embed]``, or that
has no task id, raised out of the worker's event loop, which stopped the worker ("Unrecoverable
error"), with every task it had read and not run left to come back after the visibility timeout.
:func:`strategy`, every task's (:class:`CheckedTask`, the app's task class), and ``tasks.collect``'s
own refuse such a message first: its result, when it has a task id, says why; Celery logs it as
an invalid task message and discards it.  ``tasks.collect`` also refuses a request whose args and
kwargs are not a list and an object (:func:`arguments_problem`), which its batches read in this
process; other tasks fail such a request when they run, as Celery's do.
"""

from __future__ import annotations

import logging

from celery import Task
from celery.exceptions import InvalidTaskError
from celery.worker.strategy import default

from tasks.messages import InvalidMessage

log = logging.getLogger(__name__)


def body_problem(headers: object, body: object) -> str | None:
    """Why a message cannot become a Celery request of protocol 2 (headers with the task ``id``,
    a body ``[args, kwargs, embed]``), or None; a protocol 1 body (an object with ``args``) is
    Celery's to convert.  Pure."""
    if isinstance(body, dict) and "args" in body:
        return None
    if not isinstance(headers, dict) or not isinstance(headers.get("id"), str):
        return "its headers have no task id"
    if not isinstance(body, (list, tuple)) or len(body) != 3:
        return f"its body is of type {type(body).__name__}" + (f" with {len(body)} items" if isinstance(body, (list, tuple)) else "")
    return None


def arguments_problem(args: object, kwargs: object, embed: object) -> str | None:
    """Why a request's ``args``, ``kwargs`` and ``embed`` are not a list, an object and an object
    (or null), or None.  Pure."""
    if isinstance(args, (list, tuple)) and isinstance(kwargs, dict) and isinstance(embed, (dict, type(None))):
        return None
    return f"its args, kwargs and embed are of types {type(args).__name__}, {type(kwargs).__name__} and {type(embed).__name__}"


def not_a_task_message(problem: str) -> InvalidMessage:
    return InvalidMessage(f"not a Celery task message: {problem}; expected a body [args (a list), kwargs (an object), "
                          "embed (an object)]: send it with Celery's send_task or apply_async")


def fail_unrun(task: Task, task_id: object, error: Exception) -> None:
    """Log ``error`` and store it as the result of a request of ``task`` that will not run."""
    log.warning("%s %s rejected: %s", task.name, task_id, error)
    if not isinstance(task_id, str) or not task_id:
        return
    try:
        task.backend.mark_as_failure(task_id, error)
    except Exception as exc:  # noqa: BLE001 - the request is dropped anyway; only its answer is lost
        log.warning("%s %s: result not stored (%s)", task.name, task_id, exc)


def refuse_malformed(task: Task, message) -> None:
    """Raise ``InvalidTaskError`` (after :func:`fail_unrun`) if ``message`` cannot become a
    request: Celery's consumer then logs it and discards the message."""
    headers = message.headers
    problem = body_problem(headers, message.payload)
    if problem is not None:
        error = not_a_task_message(problem)
        fail_unrun(task, headers.get("id") if isinstance(headers, dict) else None, error)
        raise InvalidTaskError(str(error))


def strategy(task: Task, app, consumer, **kwargs):
    """Celery's default strategy, with :func:`refuse_malformed` first."""
    on_message = default(task, app, consumer, **kwargs)

    def checked(message, *args, **kw):
        refuse_malformed(task, message)
        return on_message(message, *args, **kw)

    return checked


class CheckedTask(Task):
    """The app's task class: Celery's, with :func:`strategy`."""

    Strategy = "tasks.taskmessages:strategy"

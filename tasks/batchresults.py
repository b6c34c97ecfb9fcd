"""The results of a batch of ``tasks.collect`` (or ``tasks.collect_many``) requests, written as
Celery's backend writes any task's: each request's message id (or ids) stored as its SUCCESS, all
of a batch's in one pipeline on the Redis backend; a failure stored with its errbacks run and its
chord and chain told (:mod:`tasks.links`); and :func:`while_redis_is_down`, the retry that such
writes (and Collect's routing) go by while Redis does not answer or refuses for now, as Celery's
backend retries any result write with ``result_backend_always_retry``.

Pool process (a batch's).  Its log lines are ``tasks.collect``'s, as before this module was
written apart.
"""

from __future__ import annotations

import logging
import time

from celery import states
from celery.backends.redis import RedisBackend
from celery.utils.time import get_exponential_backoff_interval

import redislogin
from worker import app

log = logging.getLogger("tasks.collect")


def store_result(req, value, failed: bool = False) -> None:
    """Store ``req``'s result (unless it asked for none) and, for a failure, count it as a failed
    part of its chord, run its errbacks and fail the rest of its chain (:mod:`tasks.links`), as
    Celery's backend does for any task.  A success's chord part is counted by the caller
    (:func:`tasks.links.chord_part_done`), whether or not its result is stored."""
    store = not getattr(req, "ignore_result", False)
    errbacks = failed and bool(getattr(req, "errbacks", None))
    chord = failed and getattr(req, "chord", None) is not None
    if not req.id or not (store or errbacks or chord):
        return
    try:
        if failed:
            # call_errbacks only with errbacks: celery-batches' own SimpleRequest (the tests' and
            # eager calls') has no such attribute, and Celery would fail on it after storing.
            app.backend.mark_as_failure(req.id, value, request=req, store_result=store, call_errbacks=errbacks)
        else:
            app.backend.store_result(req.id, value, states.SUCCESS, request=req)
    except Exception as exc:  # noqa: BLE001 - the message itself is stored and sent; only the answer is lost
        log.warning("%s %s: result not stored%s (%s)", req.name, req.id, " or its errbacks and chord not run" if errbacks or chord else "", exc)


def store_results(done: list[tuple[object, str]]) -> None:
    """Store each request's message id as its SUCCESS result.  With Celery's Redis backend, in
    one pipeline (SET with its expiry and PUBLISH per result, what ``mark_as_done`` sends, without its prior GET
    that only guards a SUCCESS against being overwritten: here a rerun writes the same id); with
    any other backend, ``mark_as_done`` one by one.

    While Redis cannot be reached (a restart), or refuses the write for now (full, or a replica:
    :func:`tasks.resultbackend.refused_for_now`), the pipeline is sent again as Celery's backend
    stores any task's result with ``result_backend_always_retry`` (``worker.py``): after a
    growing, jittered sleep, at most ``result_backend_max_retries`` times.  The batch waits that
    long, as any Celery task would; business code waiting for the ids gets them once Redis is back,
    instead of timing out and sending its messages again."""
    done = [(req, mid) for req, mid in done if req.id and not getattr(req, "ignore_result", False)]
    backend = app.backend
    if not isinstance(backend, RedisBackend) or not done:
        for req, message_id in done:
            store_result(req, message_id)
        return
    values = [(backend.get_key_for_task(req.id), backend.encode(meta)) for (req, _), meta in zip(done, success_metas(backend, done))]

    def attempt() -> None:
        with backend.client.pipeline(transaction=False) as pipe:
            for key, value in values:
                pipe.set(key, value, ex=backend.expires or None)
                pipe.publish(key, value)
            pipe.execute()

    # What Celery's backend retries as it writes any result (tasks.resultbackend): a Redis that does not
    # answer, is full, or is a replica (a failover's demotion refuses the SET, and still sends the
    # PUBLISH to the callers waiting now).
    while_redis_is_down(attempt, backend.exception_safe_to_retry,
                         f"{len(done)} results of {done[0][0].name}", "stored", redis_names=("RESULT_BACKEND",),
                         give_up="their messages are stored and sent; business code waiting for these ids gets none")


def while_redis_is_down(attempt, retryable, what: str, done: str, give_up: str | None = None, redis_names=("REDIS_URL",)) -> None:
    """Run ``attempt()``; while it raises an error that ``retryable(error)`` accepts (Redis or the
    broker does not answer, or is over ``maxmemory``: :mod:`redisfull`), sleep and run it again, as Celery's backend retries writing any
    task's result with ``result_backend_always_retry`` (``worker.py``): growing, jittered sleeps
    from ``result_backend_base_sleep_between_retries_ms`` up to
    ``result_backend_max_sleep_between_retries_ms``, at most ``result_backend_max_retries`` times
    (26 tries here: about 50 s of sleeps on average, plus what each try takes to fail).  Then, or
    for any other error of ``attempt()``, it raises that error; or, with ``give_up`` (what that
    means, for the log), logs it and returns.  What the sleep raises (a soft time limit,
    ``Terminated``) always propagates.

    Blocks the calling pool process meanwhile, as Celery's own retries do; ``what`` and ``done``
    name the work in the log ("12 stored messages", "routed or queued ..."); an error of a
    redis-py client there is told as one of the settings ``redis_names`` (kombu's as BROKER_URL's) when
    Redis refuses their login, rights or certificate (:func:`redislogin.explain`)."""
    backend = app.backend
    retries = 0
    while True:
        try:
            attempt()
        except Exception as exc:
            if not (backend.always_retry and retryable(exc)) or retries >= backend.max_retries:
                if give_up is None:
                    if retries:
                        log.warning("%s not %s after %d tries (%s)", what, done, retries + 1, redislogin.explain(exc, redislogin.variables_of(exc, redis_names)))
                    raise
                log.warning("%s not %s after %d tries (%s): %s", what, done, retries + 1, redislogin.explain(exc, redislogin.variables_of(exc, redis_names)), give_up)
                return
            retries += 1
            if retries == 1:
                log.warning("%s not %s yet (%s): trying again while Redis or the broker does not answer or is full", what, done, redislogin.explain(exc, redislogin.variables_of(exc, redis_names)))
            time.sleep(get_exponential_backoff_interval(backend.base_sleep_between_retries_ms, retries,
                                                        backend.max_sleep_between_retries_ms, True) / 1000)
            continue
        if retries:
            log.warning("%s %s after %d tries", what, done, retries + 1)
        return


def success_metas(backend, done: list[tuple[object, str]]) -> list[dict]:
    """The SUCCESS result meta of each ``(request, message id)``, as Celery's backend makes it
    (``_get_result_meta``, plus ``task_id``), with what the requests of a batch share (the time,
    the settings it reads) made once: per request it cost a quarter of storing the results.
    A request with a group, a parent or children, or ``result_extended`` on, gets Celery's own."""
    extended = backend.app.conf.find_value_for_key("extended", "result")
    shared = None
    metas = []
    for req, message_id in done:
        if extended or any(getattr(req, name, None) for name in ("group", "parent_id", "children")):
            meta = backend._get_result_meta(result=message_id, state=states.SUCCESS, traceback=None, request=req)
        else:
            if shared is None:
                shared = backend._get_result_meta(result=None, state=states.SUCCESS, traceback=None, request=req)
            meta = dict(shared, result=message_id)
        meta["task_id"] = req.id
        metas.append(meta)
    return metas

"""The Celery app: ``celery -A worker worker`` runs Collect and Dispatch, ``celery -A worker flower`` watches.

Queues (see ``tasks/queues.py``): with no ``-Q`` the worker consumes ``collect`` and ``dispatch``;
a deployment may split them, e.g. ``-Q collect`` on some workers and ``-Q dispatch`` on others.
Push nodes import this module only to *send* tasks (replay requests, receipts); they never run it
as a worker.
"""

from __future__ import annotations

import logging
import os

from celery import Celery
from celery.signals import after_setup_logger, worker_init, worker_process_init, worker_ready, worker_shutdown
from kombu import Exchange, Queue

import gcpolicy
import startup

# A bad setting ends `celery -A worker ...` with one line (startup.py); Celery reports any other
# error of its app's import with a traceback.  Imported otherwise, SettingsError is raised as is.
with startup.exit_on_bad_settings("celery -A worker", startup.imported_by_celery_command()):
    import redislogin
    import settings
    from tasks.queues import COLLECT_QUEUE, DISPATCH_QUEUE
    from tasks import jsondecoder, redis_transport, resultbackend, wirejson

log = logging.getLogger(__name__)

# `celery -A worker worker` logs at LOG_LEVEL, as the auth service and the nodes do, unless its
# --loglevel (-l) says otherwise: Celery's own default, WARNING, hid every INFO line (the backends
# at start, "ready.", the replays, "store checkpoint ... works again").  Celery's command line
# reads an option it was not given from CELERY_WORKER_LOGLEVEL (click's auto_envvar_prefix), and
# parses the worker's options only after it imported this module.
if startup.imported_by_celery_command():
    os.environ.setdefault("CELERY_WORKER_LOGLEVEL", settings.LOG_LEVEL)

# redis:// and rediss:// brokers: kombu's Redis transport with one client object per channel (tasks/redis_transport.py).
redis_transport.install()
# JSON objects shaped like kombu's encoded values that are none are kept as sent (tasks/jsondecoder.py).
jsondecoder.register_json()
# The platform's own messages (node-queue batches, receipts, replay requests) are encoded with orjson (tasks/wirejson.py).
wirejson.register()

app = Celery(
    "push",
    broker=settings.BROKER_URL,
    backend=settings.RESULT_BACKEND,
    # Celery's Task, whose requests are failed with LostWithItsProcess once their pool process died
    # under them three times, instead of going back to the queue for ever (tasks/lost.py).
    task_cls="tasks.lost:Task",
    include=["tasks.collect", "tasks.dispatch", "tasks.replay", "tasks.receipts", "tasks.status", "tasks.presence", "tasks.housekeeping"],
)
# A result that a Redis over maxmemory or demoted to a replica (READONLY) refuses is retried as one
# that Redis does not answer (tasks/resultbackend.py).
resultbackend.install(app)

app.conf.update(
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    # Each queue on its own direct exchange: a bare Queue("dispatch") would be bound to the
    # default exchange with the default routing key (collect's), which is misleading in the
    # worker's banner and would route anything published there with that key to both queues.
    task_queues=[Queue(name, Exchange(name, type="direct"), routing_key=name) for name in (COLLECT_QUEUE, DISPATCH_QUEUE)],
    task_default_queue=COLLECT_QUEUE,
    task_routes={
        "tasks.collect": {"queue": COLLECT_QUEUE},
        "tasks.collect_many": {"queue": COLLECT_QUEUE},
        # Receipts feed redelivery: they must not wait behind a backlog of business messages.
        "tasks.receipts": {"queue": DISPATCH_QUEUE},
        "tasks.dispatch": {"queue": DISPATCH_QUEUE},
        "tasks.replay": {"queue": DISPATCH_QUEUE},
        "tasks.replay_many": {"queue": DISPATCH_QUEUE},
        "tasks.status": {"queue": DISPATCH_QUEUE},
        "tasks.presence": {"queue": DISPATCH_QUEUE},
        "tasks.housekeeping": {"queue": DISPATCH_QUEUE},
    },
    # Every task is idempotent (see each one), so a task is acked only once it finished, and one
    # whose worker process died goes back to the queue instead of being lost.
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    # A pool process opens the store (MongoDB's indexes) before it tells the main process it is up
    # (_open_store), and Celery kills one not up within this many seconds (4 by default): with
    # MongoDB down or electing, each round trip of that open waits up to 5 s, so a pool process
    # started to replace one that died was killed before it could start, again and again, and the
    # worker ran nothing meanwhile, not even the tasks that need no store.
    worker_proc_alive_timeout=60.0,
    # tasks.collect runs in batches of up to COLLECT_BATCH requests, and with acks_late a batch
    # holds its requests unacked until it ends: the prefetch window (this times the number of
    # worker processes) must hold a batch and the next one.
    worker_prefetch_multiplier=max(4, settings.COLLECT_BATCH),
    # Celery's prefork pool, but a warm shutdown no longer forgets a job a pool process was already
    # sent (the stop waited 30 s more, the job ran again), nor leaves one half written, nor writes
    # to the full pipe of a process killed during the stop (either way the stop never ended):
    # tasks/prefork.py.
    worker_pool="tasks.prefork:TaskPool",
    # Results hold message ids for business code; an hour is plenty to read them.
    result_expires=3600,
    # Task events cost about a third of the worker's main process and a publish per task sent.
    # They stay off until someone watches: stock Flower turns them on in every worker when it
    # starts (its enable_events option, on by default), and `celery -A worker control
    # enable_events` does too.
    worker_send_task_events=False,
    task_send_sent_event=False,
    broker_connection_retry_on_startup=True,
    # A channel the broker closes with an error is taken for a lost connection: the worker connects
    # again, and what it held unacked comes back.  RabbitMQ closes a consumer's channel (406
    # PRECONDITION_FAILED) when a message stays unacked longer than its consumer_timeout (30 min by
    # default), which a request held for its countdown or eta does; Celery's default took that for
    # an "Unrecoverable error" and the worker exited, and every worker restarted after it read the
    # request again, held it, and exited again.  Only once the worker consumed: a channel error
    # before it first did (a queue declared before with other arguments, access refused) still
    # stops the worker, which retried it five times a second for ever; one on a reconnection after
    # that (a Redis broker demoted to a replica answers READONLY) is retried
    # (tasks.taskmessages.Consumer): at once the first time, then, while it keeps coming back
    # before the worker consumed 30 s again, after 1, 2, 4 ... up to 30 s (tasks.channelerrors),
    # where it reconnected five times a second.
    broker_channel_error_retry=True,
    # A result that cannot be written (Redis restarting) is retried, not turned into a failure
    # outside the task body: the task waits for Redis, 26 tries with about 50 s of sleeps in all
    # on average (sleeps of up to 0.2, 0.4, ... 5 s, each drawn at random below its bound: 106 s
    # at most) plus what each try takes to fail, then gives up.
    # A collect batch waits so too for its results, and for Redis or the broker to take messages
    # it stored (tasks.batchresults.while_redis_is_down).
    result_backend_always_retry=True,
    result_backend_max_retries=25,
    result_backend_base_sleep_between_retries_ms=100,
    result_backend_max_sleep_between_retries_ms=5000,
    broker_transport_options={
        # Redis broker: a task taken by a worker that died comes back after this many seconds.
        "visibility_timeout": settings.VISIBILITY_TIMEOUT,
        # kombu restores such tasks under a broker-wide lock; a process killed while holding it
        # (any worker or push node) would block every restore for kombu's default of 5 minutes.
        "unacked_mutex_expire": 15,
        # Each worker looks for such tasks every unacked_restore_interval (UNACKED_RESTORE_SECONDS,
        # kombu's 10 s by default), rather than on one look in ten (kombu's default throttle, so
        # about every 100 s).  Push nodes take no part (wsnode.consumer.TRANSPORT_OPTIONS).
        "unacked_restore_interval": settings.UNACKED_RESTORE_SECONDS,
        "unacked_restore_throttle": 1,
        # Redis broker: a command waits at most this many seconds for its reply.  kombu's default
        # is to wait for ever, so a broker that stopped answering without closing the connection
        # (a failover, a network partition, a paused server) held a push node's queue consumer
        # blocked while it still counted as connected, and its drain's hand-back, whose thread
        # the node's exit waits for, for ever.  Other transports ignore it.
        "socket_timeout": settings.BROKER_TIMEOUT,
        # Redis broker: a BRPOP whose reply is this overdue is dropped (a push node's queue
        # consumer waits on it without socket_timeout), and its next command times out; kombu's
        # default, 25 s, unless BROKER_HEALTH_CHECK_SECONDS says otherwise.
        "health_check_interval": settings.BROKER_HEALTH_CHECK_SECONDS,
        # RabbitMQ broker (py-amqp): a wait for the broker's reply gives up after this many
        # seconds, and a write after that many.  py-amqp's default is to wait for ever, and
        # Celery's warm shutdown cancels its consumers and closes its channels and connections
        # politely, each waiting for the broker's reply: a broker that stopped answering without
        # closing the connection (a network partition) held a worker's exit after SIGTERM for ever.
        # A stop makes eight such waits (about 40 s with BROKER_TIMEOUT's 10).  Waits for
        # messages have timeouts of their own; the Redis transport ignores these.
        "read_timeout": settings.BROKER_TIMEOUT / 2,
        "write_timeout": settings.BROKER_TIMEOUT,
        # Publisher confirms are not set here, app-wide: the platform's data messages are
        # published through tasks.publishing's producers, which confirm on RabbitMQ; task events
        # and remote-control replies, sent from the worker's event loop, do not wait for acks.
    },
    # Every network call has a timeout (redis-py and kombu default to none).
    redis_socket_timeout=10,
    redis_socket_connect_timeout=5,
    broker_connection_timeout=5,
    worker_hijack_root_logger=False,
    # Refuses a message Celery could not run, with its reason as its result, instead of stopping
    # the worker (Celery's consumer raised on some shapes of hand-made messages); and on RabbitMQ
    # declares and consumes again a queue deleted while it consumes it (its consumer cancelled).
    worker_consumer="tasks.taskmessages:Consumer",
)
# A rediss:// broker: its URL's ssl_* options (ssl_cert_reqs, ssl_ca_certs ...) also as Celery's
# broker_use_ssl, which Flower's Broker page reads (kombu takes them from the URL).  The result
# backend reads them from its own URL.
if (_broker_ssl := redis_transport.ssl_options(settings.BROKER_URL)) is not None:
    app.conf.broker_use_ssl = _broker_ssl


@after_setup_logger.connect
def _log_backends(logger, **_):
    logger.info("broker %s, results %s", settings.redact(settings.BROKER_URL), settings.redact(settings.RESULT_BACKEND))


_scheduler = None


@worker_init.connect
def _check_redis_logins(**_):
    """Main process, before the pool starts: a Redis that refuses the login of BROKER_URL,
    REDIS_URL or RESULT_BACKEND (a wrong password), or INFO to REDIS_URL's user, stops the worker with
    one line (:mod:`redislogin`);
    Celery's consumer logged "Cannot connect ... Trying again" up to a hundred times."""
    redislogin.check("celery -A worker worker", ("BROKER_URL", "REDIS_URL", "RESULT_BACKEND"), info=("REDIS_URL",))


@worker_init.connect
def _check_data_dir(**_):
    """Main process, before the pool starts: with the embedded store (``MONGO_URL`` unset), a
    ``DATA_DIR`` that cannot be made or written (a file, a folder of another user, a read-only
    file system) stops the worker with one line; the worker said ``ready`` and failed every
    request, without retrying."""
    if settings.MONGO_URL:
        return
    from tasks import storedisk

    problem = storedisk.folder_problem(settings.DATA_DIR)
    if problem is not None:
        startup.refuse("celery -A worker worker", ValueError(problem))


@worker_init.connect
def _anchor_clock(**_):
    """Main process, before the pool forks: anchor Redis's clock once (``tasks.dispatch.clock``),
    so that every pool process, also one that replaces another later, reads the same clock."""
    from tasks.dispatch import _redis, clock

    clock.sync()
    # Not kept open in this process, where nothing may use it for a long while (the scheduler's
    # first tick is HOUSEKEEPING_SECONDS away): after a Redis restart it sat in CLOSE_WAIT.
    _redis.connection_pool.disconnect()


@worker_init.connect
def _tune_gc(**_):
    """Main process, before the pool forks: see :mod:`gcpolicy`."""
    gcpolicy.tune()


@worker_ready.connect
def _on_ready(**_):
    """Start the housekeeping scheduler thread (main process only)."""
    global _scheduler
    from tasks.dispatch import _redis
    from tasks.scheduler import HousekeepingScheduler

    _scheduler = HousekeepingScheduler(app, _redis, settings.HOUSEKEEPING_SECONDS)
    _scheduler.start()


@worker_shutdown.connect
def _on_shutdown(**_):
    if _scheduler is not None:
        _scheduler.stop()


@worker_process_init.connect
def _open_store(**_):
    """Open the store (and create MongoDB's indexes) as each worker process starts, not on the
    first message; a store that cannot be opened now is retried by the first task that needs it."""
    from tasks.store import StoreError, get_store

    try:
        get_store()
    except StoreError as exc:
        log.error("message store not available at start: %s", exc)
    gcpolicy.freeze()  # what this process set up, as the main process did before the fork

"""The worker's app with ``worker_pool_restarts`` on, which Flower's Restart pool needs
(``celery -A tests.integration.poolrestart_app worker``, in test_held_requests.py)."""

from worker import app  # noqa: F401 - the app Celery finds here

app.conf.worker_pool_restarts = True

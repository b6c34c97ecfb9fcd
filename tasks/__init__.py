"""Celery tasks of the platform: Collect, Dispatch and the helpers the push nodes call.

The tasks run in the worker process (``celery -A worker worker``); the app lives in ``worker.py``.
"""

"""Which publishes wait for RabbitMQ's confirms (:mod:`tasks.publishing`): the platform's data
messages do, the app's own producers (task events, remote-control replies, business code's
sends through this app) do not.  No broker is needed: kombu connects lazily."""

from __future__ import annotations

from celery import Celery

from tasks import publishing


def test_on_rabbitmq_the_data_producer_confirms_and_the_apps_own_producers_do_not():
    app = Celery(broker="amqp://guest:guest@127.0.0.1:5672//", set_as_current=False)
    app.conf.broker_transport_options = {"read_timeout": 5}
    assert publishing.confirms(app)
    with publishing.producer(app) as producer:
        assert producer.connection.transport_options == {"read_timeout": 5, "confirm_publish": True}
    # Task events and control replies, sent from the worker's loop, must not wait for each ack.
    assert "confirm_publish" not in app.connection_for_write().transport_options
    with app.producer_or_acquire() as own:
        assert "confirm_publish" not in own.connection.transport_options
    with publishing.producer(app) as again:  # one pool per process and app, reused
        assert again.connection.transport_options["confirm_publish"] is True


def test_on_redis_the_data_producer_is_the_apps_own():
    app = Celery(broker="redis://127.0.0.1:1/0", set_as_current=False)
    assert not publishing.confirms(app)
    with publishing.producer(app) as producer:
        assert "confirm_publish" not in producer.connection.transport_options
        assert producer.connection.transport_cls == "redis"


def test_the_platforms_app_sets_no_confirms_app_wide():
    """Set in ``broker_transport_options``, confirms held the worker's event loop for each task
    event and control reply (Flower watching) and, under a RabbitMQ memory alarm, for
    ``read_timeout`` per try."""
    from worker import app

    assert "confirm_publish" not in app.conf.broker_transport_options

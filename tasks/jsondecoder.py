"""The worker's decoder of ``application/json`` message bodies: kombu's ``json`` decoder, but an
object shaped like one of kombu's encoded values (``__type__`` and ``__value__``) that is none is
kept as it was sent, where kombu's raised and failed the whole message (:func:`json_loads`).
``worker.py`` makes it the decoder of its process at import (:func:`register_json`); the encoder
stays kombu's (the platform's own messages are encoded by :mod:`tasks.wirejson`).

Pure but for :func:`register_json`, which sets kombu's serializer registry of the process (call it
once, at import, before any message is read); :func:`json_loads` is safe from any thread.
"""

from __future__ import annotations

from kombu import serialization
from kombu.utils import json as kombu_json


#: The keys of an object kombu's JSON encoder made from a date, UUID, decimal or bytes.
_TYPED_KEYS = frozenset(("__type__", "__value__"))


def _typed_value_or_object(obj: dict) -> object:
    """kombu's JSON object hook, which reads an object whose only keys are ``__type__`` and
    ``__value__`` as the date, UUID, decimal or bytes it encodes; one it cannot read so (a type it
    does not know, a value that is not one) was not made by its encoder and is kept as it is.
    kombu's raised, and failed the decoding of the whole message: a ``tasks.collect_many`` whose
    one item's data had that shape failed whole, with none of its other items stored.  Any other
    object is returned here, as kombu's hook returns it: calling that hook too cost a second
    Python call per object of every message the worker reads (a tenth of decoding a node's
    receipts).  Pure."""
    if obj.keys() != _TYPED_KEYS:
        return obj
    try:
        return kombu_json.object_hook(obj)
    except Exception:  # noqa: BLE001 - ValueError, TypeError, AttributeError, decimal's errors ...: not an encoded value
        return obj


def json_loads(data: bytes | str) -> object:
    """kombu's ``json`` decoder, with :func:`_typed_value_or_object` as its object hook."""
    return kombu_json.loads(data, object_hook=_typed_value_or_object)


def register_json() -> None:
    """Make :func:`json_loads` this process's decoder of ``application/json`` (kombu's ``json``
    serializer, its encoder unchanged).  Idempotent."""
    serialization.registry.register("json", kombu_json.dumps, json_loads, content_type="application/json", content_encoding="utf-8")

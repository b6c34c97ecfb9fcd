"""JSON for the messages the platform makes for itself, with orjson.

What the worker publishes to a push node (``wsnode.deliver`` batches), what a node sends back
(``tasks.receipts``, ``tasks.replay_many``), the frames a node writes to browsers, and the digests
that name receipt documents.  Every one of these is encoded once per message or per delivery, and
the standard library's encoder (kombu's ``json`` serializer is ``json.dumps`` with a custom
encoder) took about 1.9 µs per delivery to encode a node-queue batch and 2.2 µs per frame on the
2-core VM of ``bench/HISTORY.md``; orjson takes 0.12 and 0.31 (decoding: 1.45 -> 0.32 µs per
envelope, an ack frame 1.8 -> 0.9).

The output is plain JSON with content type ``application/json``: any JSON consumer reads it
(kombu's ``json`` decoder, Flower, a browser), and nothing changes on the wire but spacing and the
spelling of some floats (``1e16`` rather than ``1e+16``).  What orjson refuses (integers beyond 64
bits, types it does not know) falls back to the encoder that was used before, so no message that
encoded before fails now.

Business input is not decoded or validated here: the standard library's strict encoder decides
what a valid ``data`` is (``tasks.messages.encode_data``, which measures plain JSON with orjson
only where both encoders give the same verdict).

Pure, and safe from any thread.
"""

from __future__ import annotations

import json

import orjson
from kombu import serialization
from kombu.utils.json import dumps as _kombu_dumps

#: kombu serializer name for :func:`dumps`; pass it as ``serializer=`` when sending a task.
SERIALIZER = "wirejson"
CONTENT_TYPE = "application/json"

_compact_text = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode


def dumps(obj: object) -> bytes:
    """``obj`` as JSON bytes; kombu's own encoder for what orjson refuses."""
    try:
        return orjson.dumps(obj)
    except TypeError:  # orjson.JSONEncodeError is one
        return _kombu_dumps(obj).encode()


def text(obj: object) -> str:
    """``obj`` as compact JSON text, non-ASCII kept as is (a frame's ``data``); the standard
    library's encoder for what orjson refuses."""
    try:
        return orjson.dumps(obj).decode()
    except TypeError:
        return _compact_text(obj)


def loads(data: bytes | str) -> object:
    """Decode JSON; raises ValueError (``orjson.JSONDecodeError``) on anything else."""
    return orjson.loads(data)


def register() -> None:
    """Make :data:`SERIALIZER` known to kombu in this process: an encoder only, so every
    ``application/json`` message is still decoded by kombu's ``json`` decoder, and ``json`` stays
    the name kombu gives that content type (what it answers a request with).  Idempotent."""
    registry = serialization.registry
    name = registry.type_to_name.get(CONTENT_TYPE)
    registry.register(SERIALIZER, dumps, None, content_type=CONTENT_TYPE, content_encoding="utf-8")
    if name is not None:
        registry.type_to_name[CONTENT_TYPE] = name

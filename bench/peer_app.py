"""The peer that bench/compare.py and bench/capacity.py measure against: python-socketio behind uvicorn.

It is deployed as python-socketio documents it for several asyncio nodes: one ``AsyncServer`` per
uvicorn process, ``async_mode="asgi"``, with an ``AsyncRedisManager`` so that an external process can
emit with ``socketio.RedisManager(url, write_only=True).emit(...)``. Run it with::

    PEER_REDIS_URL=redis://127.0.0.1:6379/0 uvicorn peer_app:app --app-dir bench --port 8201 \
        --loop asyncio --no-access-log

Each connection joins a room named by its user id, taken from the ``user`` query parameter, in the
``connect`` handler. This is the peer's counterpart of our token: the bench does not measure
authentication on this side. ``GET /healthz`` answers 200 (an extra ASGI app beside Socket.IO's path).
Nothing here is part of the platform.
"""

from __future__ import annotations

import os
from urllib.parse import parse_qs

import socketio

REDIS_URL = os.environ.get("PEER_REDIS_URL", "redis://127.0.0.1:6379/0")

sio = socketio.AsyncServer(async_mode="asgi", client_manager=socketio.AsyncRedisManager(REDIS_URL))


@sio.event
async def connect(sid, environ, auth=None):
    user = parse_qs(environ.get("QUERY_STRING", "")).get("user", [""])[0]
    if not user:
        return False  # refused: the bench always names a user
    await sio.enter_room(sid, user)
    return None


async def _other(scope, receive, send):
    """``GET /healthz`` and the ASGI lifespan; 404 for anything else that is not Socket.IO's path."""
    if scope["type"] == "lifespan":
        while True:
            event = await receive()
            if event["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif event["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    if scope["type"] != "http":
        return
    ok = scope.get("path") == "/healthz"
    await send({"type": "http.response.start", "status": 200 if ok else 404, "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": b"ok" if ok else b"not found"})


app = socketio.ASGIApp(sio, other_asgi_app=_other)

"""The demo page and its small JSON API: a Tornado app, ``python -m demo``.  Loop thread only,
except the Celery calls, which run on a small thread pool.

**Demo only.** It gets tokens from the auth service with ``AUTH_ADMIN_KEY`` for any user name a
visitor types, so anyone who can open the page can read anyone's messages.  It refuses to start
when ``PUSH_ENV=production``.  A real backend hands a token only to the user it authenticated.

Routes (JSON bodies and answers):

- ``GET /`` the page (``demo/static/index.html``); ``GET /static/push.js`` the browser client, the
  same file the push nodes serve;
- ``GET /api/config`` -> ``{"nodes": ["ws://127.0.0.1:8101/ws", ...], "auth": ..., "send_example": ...}``;
- ``POST /api/token`` ``{"user": "alice"}`` (and optionally ``"ttl"``: seconds, for a shorter-lived token)
  -> ``{"user": "alice", "token": ..., "expires_at": ...}``
  (the auth service's ``POST /tokens``, with the admin key);
- ``POST /api/send`` ``{"to": "alice" | "alice, bob" | "*", "text": "hi", "from": "bob"}`` ->
  ``{"id": "<message id>", "to": ...}``: ``send_task("tasks.collect", queue="collect")`` as business
  code does, waiting up to ``SEND_TIMEOUT`` s for the message id;
- ``GET /healthz`` -> 200.

Errors answer ``{"error": "..."}`` with 400 (bad form value), 502 (auth refused, unreachable, silent
for ``AUTH_TIMEOUT`` s, or answering without a token) or 504 (no message id in time: is the worker
running?).
"""

from __future__ import annotations

import concurrent.futures
import ipaddress
import json
import logging
import os
import time
import urllib.parse

import tornado.httpclient
import tornado.web
from celery import Celery
from celery.exceptions import TimeoutError as ResultTimeout
from tornado.httpserver import HTTPServer
from tornado.ioloop import IOLoop

import settings
from demo import forms

log = logging.getLogger(__name__)

PAGE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")
#: Where the push nodes' ``/static/push.js`` lives; the demo serves the same file.
PUSH_JS_DIR = os.path.normpath(os.path.join(os.path.dirname(PAGE_DIR), os.pardir, "wsnode", "static"))
#: Seconds ``POST /api/send`` waits for ``tasks.collect`` to return the message id.
SEND_TIMEOUT = 15.0
#: Seconds a call to the auth service may take.
AUTH_TIMEOUT = 10.0
#: ``AUTH_URL`` as the page, the errors and the log show it: without its password, if it has one.
AUTH_URL_SHOWN = settings.redact(settings.AUTH_URL)


def local_host(host: str) -> bool:
    """Whether a request's ``Host`` names the demo by an IP address or ``localhost``, as one opens
    it (a name DNS could point anywhere, an attacker's rebound to this host included, is not).  Pure."""
    try:
        name = urllib.parse.urlsplit(f"//{host}").hostname or ""
    except ValueError:  # "[" and the like: no host at all
        return False
    if name == "localhost":
        return True
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


class JsonHandler(tornado.web.RequestHandler):
    def initialize(self, demo: Demo) -> None:
        self.demo = demo

    def set_default_headers(self) -> None:
        self.set_header("Cache-Control", "no-store")

    def prepare(self) -> None:
        """The API answers its own page only: a POST must say it is JSON, which a page of another
        origin cannot send without asking first (CORS, which this never allows), and one whose
        ``Origin`` is another page's is refused.  Without it, any site the developer visited
        could send a message to every user online, or get a token for any user, through a form
        or a ``no-cors`` fetch of ``text/plain``.  (curl and scripts send no ``Origin``.)"""
        if self.request.method != "POST":
            return
        if not local_host(self.request.host):
            # DNS rebinding: a page of another site whose name now resolves here is same-origin
            # by its Host, and could read the tokens it asks for.
            raise tornado.web.HTTPError(403, reason=f"Host {self.request.host[:100]!r} refused: open the demo at its address "
                                                    "(an IP address, or localhost)")
        origin = self.request.headers.get("Origin")
        if origin is not None and urllib.parse.urlsplit(origin).netloc != self.request.host:
            raise tornado.web.HTTPError(403, reason=f"cross-origin request from {origin[:100]!r} refused: the demo's API answers its own page only")
        content_type = self.request.headers.get("Content-Type", "").split(";")[0].strip().lower()
        if content_type != "application/json":
            raise tornado.web.HTTPError(415, reason="send the body as JSON, with Content-Type: application/json")

    def body(self) -> dict:
        try:
            value = json.loads(self.request.body or b"{}")
        except ValueError:
            raise tornado.web.HTTPError(400, reason="body is not JSON") from None
        if not isinstance(value, dict):
            raise tornado.web.HTTPError(400, reason="body must be a JSON object")
        return value

    def fail(self, status: int, error: str) -> None:
        self.set_status(status)
        self.finish({"error": error})

    def write_error(self, status_code: int, **kwargs) -> None:
        self.finish({"error": self._reason})


class ConfigHandler(JsonHandler):
    def get(self) -> None:
        nodes = forms.node_urls(self.demo.nodes, self.request.host)
        self.finish({"nodes": nodes, "auth": AUTH_URL_SHOWN, "send_example": self.demo.send_example()})


class TokenHandler(JsonHandler):
    async def post(self) -> None:
        try:
            body = self.body()
            user = forms.user_name(body.get("user"))
            ttl = forms.token_ttl(body.get("ttl"))
        except forms.DemoInputError as exc:
            return self.fail(400, str(exc))
        try:
            answer = await self.demo.token(user, ttl)
        except DemoBackendError as exc:
            log.warning("token for user=%s: %s", user, exc)
            return self.fail(exc.status, str(exc))
        self.finish({"user": user, **answer})


class SendHandler(JsonHandler):
    async def post(self) -> None:
        body = self.body()
        try:
            to = forms.recipients(body.get("to"))
            sender = forms.user_name(body["from"]) if body.get("from") else None
            data = forms.message_data(body.get("text"), to, sender)
        except forms.DemoInputError as exc:
            return self.fail(400, str(exc))
        try:
            message_id = await self.demo.send(to, data)
        except DemoBackendError as exc:
            log.warning("send to=%s: %s", to, exc)
            return self.fail(exc.status, str(exc))
        log.info("sent %s to %s", message_id, to)
        self.finish({"id": message_id, "to": to})


class HealthHandler(tornado.web.RequestHandler):
    def get(self) -> None:
        self.finish({"status": "ok"})


class PageHandler(tornado.web.RequestHandler):
    def get(self) -> None:
        self.set_header("Content-Type", "text/html; charset=utf-8")
        self.set_header("Cache-Control", "no-store")
        with open(os.path.join(PAGE_DIR, "index.html"), "rb") as page:
            self.finish(page.read())


class DemoBackendError(RuntimeError):
    """The auth service or the worker did not answer as needed; the message says what to check.
    ``status``: 502 (refused, unreachable or a wrong answer) or 504 (no message id in time)."""

    def __init__(self, message: str, status: int = 502) -> None:
        super().__init__(message)
        self.status = status


class Demo:
    """The demo server: ``start(port)`` on the loop, ``stop()`` on the same loop.

    ``nodes``: the push nodes the page connects to, as ports or ws:// URLs (see
    :func:`demo.forms.node_urls`).
    """

    def __init__(self, nodes: list[str], celery_app: Celery | None = None) -> None:
        self.nodes = [str(node) for node in nodes]
        self.celery = celery_app or Celery("demo", broker=settings.BROKER_URL, backend=settings.RESULT_BACKEND)
        self._pool = concurrent.futures.ThreadPoolExecutor(4, thread_name_prefix="demo-send")
        self._http = tornado.httpclient.AsyncHTTPClient()
        self._server: HTTPServer | None = None

    def make_app(self) -> tornado.web.Application:
        kw = {"demo": self}
        return tornado.web.Application([
            (r"/", PageHandler),
            (r"/api/config", ConfigHandler, kw),
            (r"/api/token", TokenHandler, kw),
            (r"/api/send", SendHandler, kw),
            (r"/healthz", HealthHandler),
            (r"/static/(push\.js)", tornado.web.StaticFileHandler, {"path": PUSH_JS_DIR}),
        ])

    def start(self, port: int, address: str = settings.BIND_ADDRESS) -> None:
        self._server = HTTPServer(self.make_app())
        self._server.listen(port, address=address)
        log.info("demo page on http://%s:%d (nodes %s, auth %s, broker %s)", address, port, ",".join(self.nodes),
                 AUTH_URL_SHOWN, settings.redact(settings.BROKER_URL))

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
        self._pool.shutdown(wait=False, cancel_futures=True)

    async def token(self, user: str, ttl: int | None = None) -> dict:
        """A token for ``user`` from the auth service (``POST /tokens`` with the admin key), living
        ``TOKEN_TTL`` or ``ttl`` seconds."""
        body = {"user_id": user} if ttl is None else {"user_id": user, "ttl": ttl}
        request = tornado.httpclient.HTTPRequest(
            f"{settings.AUTH_URL}/tokens", method="POST", body=json.dumps(body),
            headers={"Authorization": f"Bearer {settings.AUTH_ADMIN_KEY}", "Content-Type": "application/json"},
            request_timeout=AUTH_TIMEOUT, connect_timeout=AUTH_TIMEOUT)
        try:
            response = await self._http.fetch(request, raise_error=False)
        except (OSError, tornado.httpclient.HTTPClientError) as exc:
            # OSError: refused.  ``raise_error=False`` only turns HTTP status codes into responses:
            # no answer in AUTH_TIMEOUT, or a connection closed without one, still raises
            # (HTTPTimeoutError, HTTPStreamClosedError: HTTPClientError with code 599).
            raise DemoBackendError(f"the auth service at {AUTH_URL_SHOWN} cannot be reached ({exc}): is `python -m auth` running?") from None
        if response.code != 200:
            detail = (response.body or b"").decode(errors="replace")[:200] or str(response.error)
            raise DemoBackendError(f"the auth service at {AUTH_URL_SHOWN} answered {response.code}: {detail}"
                                   + (" (does AUTH_ADMIN_KEY match the auth service's?)" if response.code == 401 else ""))
        try:
            answer = json.loads(response.body)
            return {"token": answer["token"], "expires_at": answer["expires_at"]}
        except (ValueError, TypeError, KeyError):
            detail = (response.body or b"").decode(errors="replace")[:200]
            raise DemoBackendError(f"the auth service at {AUTH_URL_SHOWN} answered 200 without a token: {detail!r} "
                                   "(is AUTH_URL the address of `python -m auth`?)") from None

    async def send(self, to: str | list[str], data: dict) -> str:
        """Collect one message, as business code does; returns its id."""
        data = {**data, "sent_at": round(time.time(), 3)}
        try:
            return await IOLoop.current().run_in_executor(self._pool, self._collect, to, data)
        except ResultTimeout:
            raise DemoBackendError(f"no message id within {SEND_TIMEOUT:g} s: is the worker (`celery -A worker worker`) running?", 504) from None
        except Exception as exc:  # noqa: BLE001 - broker down, task failed: say so to the person
            raise DemoBackendError(f"the message was not collected: {type(exc).__name__}: {exc}") from None

    def _collect(self, to: str | list[str], data: dict) -> str:
        """Pool thread: publish ``tasks.collect`` and wait for its result (the message id)."""
        result = self.celery.send_task("tasks.collect", kwargs={"to": to, "data": data}, queue="collect")
        return result.get(timeout=SEND_TIMEOUT)

    def send_example(self) -> str:
        """The Python line that sends what the form sends, for a person to paste."""
        return ('from celery import Celery; Celery(broker="BROKER_URL").send_task("tasks.collect", '
                'kwargs={"to": "alice", "data": {"text": "hello"}}, queue="collect")').replace(
                    "BROKER_URL", settings.redact(settings.BROKER_URL))

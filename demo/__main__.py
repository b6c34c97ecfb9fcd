"""``python -m demo --port 8080 --nodes 8101,8102``: serve the demo page until SIGTERM or Ctrl-C.

Demo only: it hands a token to anyone who asks (see ``demo.app``), so it refuses to start when
``PUSH_ENV=production``.  Settings (``AUTH_URL``, ``AUTH_ADMIN_KEY``, ``BROKER_URL``,
``RESULT_BACKEND``, ``BIND_ADDRESS``) come from ``settings.py``.  Main thread.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys

import startup

with startup.exit_on_bad_settings("python -m demo", __name__ == "__main__"):
    import settings
    from demo import forms
    from demo.app import Demo

log = logging.getLogger("demo")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m demo", description="Serve the push platform's demo page (local try-outs only).")
    parser.add_argument("--port", type=settings.port_argument, default=8080, help="HTTP port of the page (default 8080)")
    parser.add_argument("--nodes", default="8101,8102", metavar="PORT|URL,...",
                        help="the push nodes the page connects to: ports on the page's host, or ws:// URLs (default 8101,8102)")
    args = parser.parse_args(argv)
    args.nodes = [part.strip() for part in args.nodes.split(",") if part.strip()]
    try:
        forms.node_urls(args.nodes, "127.0.0.1")
    except forms.DemoInputError as exc:
        parser.error(f"--nodes: {exc}")
    if not args.nodes:
        parser.error("--nodes: give at least one push node, e.g. --nodes 8101,8102")
    return args


async def serve(args: argparse.Namespace) -> int:
    demo = Demo(args.nodes)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    try:
        demo.start(args.port)
    except OSError as exc:
        log.error("cannot listen on %s:%d (%s): choose another port with --port", settings.BIND_ADDRESS, args.port, exc)
        return 1
    await stop.wait()
    demo.stop()
    log.info("stopped")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    settings.configure_logging("demo")
    if settings.PUSH_ENV == "production":
        log.error("PUSH_ENV=production: the demo page gives a token for any user name to anyone, so it does not run in production")
        return 2
    log.warning("demo only: this page gets a token for any user name it is asked for (AUTH_ADMIN_KEY); never expose it")
    return asyncio.run(serve(args))


if __name__ == "__main__":
    sys.exit(main())

"""``python -m wsnode --port PORT [--internal-port PORT]``: run one push node until SIGTERM or Ctrl-C."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal

import startup

with startup.exit_on_bad_settings("python -m wsnode", __name__ == "__main__"):
    import gcpolicy
    import redislogin
    import settings
    from wsnode.app import NodeStartError, PushNode

log = logging.getLogger("wsnode")


async def main(port: int, host: str, internal_port: int | None) -> None:
    node = PushNode(port, host, internal_port=internal_port)
    # Handlers first: a SIGTERM that arrives once /healthz answers must drain the node.
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await node.start()
    gcpolicy.tune()
    await stop.wait()
    log.info("node %s: stop requested", node.address)
    await node.stop()
    # Drained: a SIGTERM or Ctrl-C from now on (a second one, from a supervisor or an operator)
    # ends the process at once with status 0.  By default it came while the interpreter exited
    # (joining the consumer's and the publisher's threads), and killed it: status -15 for a clean
    # drain.  Here until the loop closes, then in the ``__main__`` block (:func:`_exit_drained`).
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, os._exit, 0)


def _exit_drained(signum, frame) -> None:
    """A SIGTERM or SIGINT after the drain ended: exit now, with status 0."""
    os._exit(0)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m wsnode", description="Run one push node.")
    parser.add_argument("--port", type=settings.port_argument, required=True, help="TCP port; the node's queue is named NODE_HOST:PORT")
    parser.add_argument("--host", type=settings.host_argument, default=settings.NODE_HOST, help="address advertised to Dispatch (default NODE_HOST)")
    parser.add_argument("--internal-port", type=settings.port_argument, default=None,
                        help="serve /metrics and the whole /healthz on this port instead (for scrapers and operators: keep it off "
                             "the public network); /healthz on --port then says only whether the node is ready")
    args = parser.parse_args()
    if args.internal_port == args.port:
        parser.error(f"--internal-port {args.internal_port} is --port too: give the internal port one of its own, or leave it out")
    settings.configure_logging(f"wsnode:{args.port}")
    # A Redis that refuses the login (a wrong password) stops the node with one line (redislogin).
    redislogin.check("python -m wsnode", ("REDIS_URL", "BROKER_URL"))
    # No secret is checked here: a node asks auth about each token and holds neither AUTH_SECRET
    # nor AUTH_ADMIN_KEY (give them to the auth service alone).
    try:
        asyncio.run(main(args.port, args.host, args.internal_port))
    except NodeStartError as exc:
        log.error("%s", exc)
        raise SystemExit(1) from None
    # The loop closed (and gave the signals back to their defaults) after the drain: see main().
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _exit_drained)

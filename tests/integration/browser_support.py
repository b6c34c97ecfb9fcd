"""What the demo and browser tests share: the demo page started against a test cluster, and
Debian's Chromium, installed when it is missing.

:func:`ensure_chromium` returns the path of a Chromium; when there is none and we run as root on
a machine with ``apt-get`` (CI: a clean clone on the same kind of machine), it installs Debian's
``chromium`` package first (``apt-get update`` and again when the first install fails).  Where it
cannot, it raises :class:`ChromiumUnavailable` with the reason, which the tests skip with.

Playwright drives it through ``executable_path``: no browser is downloaded.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import launcher
from tests.integration.conftest import http_call

CHROMIUM = "/usr/bin/chromium"
#: Flags the browser tests run Chromium with (headless, as root in a container, no GPU, quiet).
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
APT_TIMEOUT = 900


class ChromiumUnavailable(RuntimeError):
    """No Chromium here and none could be installed; the message says why and how to get one."""


def find_chromium() -> str | None:
    for candidate in (CHROMIUM, shutil.which("chromium")):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


def ensure_chromium() -> str:
    """The path of Chromium, installing Debian's ``chromium`` package when needed and possible."""
    found = find_chromium()
    if found:
        return found
    how = "install it (`sudo apt-get install -y chromium`) and run the tests again"
    if shutil.which("apt-get") is None:
        raise ChromiumUnavailable(f"no {CHROMIUM} and no apt-get to install it with: {how}")
    if os.geteuid() != 0:
        raise ChromiumUnavailable(f"no {CHROMIUM}, and only root can apt-get install it: {how}")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "chromium"]
    outputs = []
    for argv in (install, ["apt-get", "update"], install):
        try:
            done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=APT_TIMEOUT)
        except (OSError, subprocess.TimeoutExpired) as exc:
            outputs.append(f"$ {' '.join(argv)}: {exc}")
            continue
        outputs.append(f"$ {' '.join(argv)} -> exit {done.returncode}\n{done.stderr[-1500:]}")
        if argv is install and done.returncode == 0 and find_chromium():
            return find_chromium()
    raise ChromiumUnavailable(f"{CHROMIUM} is missing and apt-get could not install it:\n" + "\n".join(outputs))


class DemoPage:
    """The demo app (``python -m demo``) on a free port against ``cluster``, for the push nodes
    ``nodes`` (ports, tried in that order); its log is in the cluster's log folder."""

    def __init__(self, cluster, nodes: list[int], env: dict | None = None, name: str = "demo") -> None:
        self.port = launcher.free_port()
        self.nodes = list(nodes)
        self.service = launcher.start_demo(env or cluster.env, self.port, self.nodes, name=name,
                                           log_path=cluster.logs / f"{name}-{self.port}.log")
        cluster.services.append(self.service)  # its log tail joins the cluster's on a failure
        self.url = f"http://127.0.0.1:{self.port}"

    def page_url(self, user: str | None = None, node: int | None = None) -> str:
        query = "&".join(f"{key}={value}" for key, value in (("user", user), ("node", node)) if value is not None)
        return f"{self.url}/" + (f"?{query}" if query else "")

    def call(self, path: str, body: dict | None = None) -> tuple[int, dict]:
        """``GET`` (no body) or ``POST`` JSON to the demo; returns (status, JSON answer)."""
        status, answer = http_call(self.url + path, body, {"Content-Type": "application/json"}, timeout=30)
        return status, json.loads(answer or b"{}")

    def send(self, to: str, text: str) -> str:
        """Send through the demo's API, as the page's form does; returns the message id."""
        status, answer = self.call("/api/send", {"to": to, "text": text})
        assert status == 200, f"POST /api/send answered {status}: {answer}"
        return answer["id"]

    def stop(self) -> None:
        self.service.terminate(timeout=10)


def push_js() -> bytes:
    return Path(launcher.REPO_ROOT, "wsnode", "static", "push.js").read_bytes()

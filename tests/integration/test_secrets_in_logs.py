"""No log line of a push node carries a password of the URLs it is given: ``AUTH_URL`` may hold
one (``https://push:PASSWORD@auth.internal``, for an auth service behind a proxy that asks for
it; libcurl sends it as HTTP basic authentication), as ``REDIS_URL`` and ``BROKER_URL`` may."""

from __future__ import annotations

import asyncio

import pytest

import launcher
from tests.integration.wsclient import Client
from wsnode.closecodes import CloseCode

pytestmark = pytest.mark.parametrize("cluster", ["redis"], indirect=True)  # node-side only: one broker is enough

PASSWORD = "auth-url-password-d41f"


async def test_a_password_in_auth_url_is_not_logged_when_auth_answers_or_not(cluster):
    working = cluster.start_node(AUTH_URL=f"http://push:{PASSWORD}@127.0.0.1:{cluster.auth_port}")
    unreachable = cluster.start_node(AUTH_URL=f"http://push:{PASSWORD}@127.0.0.1:{launcher.free_port()}")
    token = await asyncio.to_thread(cluster.token, "auth-url-user")

    client = await Client.connect(cluster.ws_url(working.port, token))  # the password does not stop it working
    assert client.hello["user"] == "auth-url-user"
    client.close()
    refused = await Client.connect(cluster.ws_url(unreachable.port, token), expect_hello=False)
    assert (await refused.closed(15))[0] == CloseCode.TRY_AGAIN_LATER
    unreachable.wait_log("auth unavailable")

    for node in (working, unreachable):
        log = node.log_path.read_text(errors="replace")
        assert "auth http://push:***@127.0.0.1:" in log, log[-2000:]
        assert PASSWORD not in log, [line for line in log.splitlines() if PASSWORD in line]

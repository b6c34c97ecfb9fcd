"""``tasks.presence``, sent by name as business code does: which users are online now and on
which nodes, from the same leases Dispatch routes by (``tasks/presence.py``)."""

from __future__ import annotations

import asyncio
import signal

import pytest
from celery.exceptions import TimeoutError as CeleryTimeout

from tests.integration.conftest import LEASE_TTL


async def presence(cluster, users):
    return await cluster.result(cluster.business.send_task("tasks.presence", args=[users], queue="dispatch"), 20)


async def wait_presence(cluster, users, expected: dict, timeout: float = 10.0) -> dict:
    deadline = asyncio.get_running_loop().time() + timeout
    while (got := await presence(cluster, users)) != expected:
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"presence of {users}: {got}, expected {expected}")
        await asyncio.sleep(0.2)
    return got


async def test_presence_lists_each_users_nodes_in_the_order_asked_and_follows_connections_closing(cluster):
    node_a, node_b = (f"127.0.0.1:{port}" for port in cluster.node_ports)
    phone = await cluster.connect("pres-alice", cluster.node_ports[0])
    laptop = await cluster.connect("pres-alice", cluster.node_ports[1])
    tab = await cluster.connect("pres-bob", cluster.node_ports[0])
    second_tab = await cluster.connect("pres-bob", cluster.node_ports[0])

    got = await presence(cluster, ["pres-carol", "pres-alice", "pres-bob", "pres-alice"])

    assert got == {"pres-carol": [], "pres-alice": sorted([node_a, node_b]), "pres-bob": [node_a]}
    assert list(got) == ["pres-carol", "pres-alice", "pres-bob"]
    assert await presence(cluster, "pres-bob") == {"pres-bob": [node_a]}

    phone.close()
    tab.close()
    await wait_presence(cluster, ["pres-alice", "pres-bob"], {"pres-alice": [node_b], "pres-bob": [node_a]})  # bob's other tab
    laptop.close()
    second_tab.close()
    await wait_presence(cluster, ["pres-alice", "pres-bob"], {"pres-alice": [], "pres-bob": []})


async def test_a_user_on_a_node_that_died_is_offline_once_the_nodes_lease_lapsed(cluster):
    node = cluster.start_node()
    await cluster.connect("pres-stranded", node.port)
    assert await presence(cluster, ["pres-stranded"]) == {"pres-stranded": [f"127.0.0.1:{node.port}"]}

    await asyncio.to_thread(node.kill)
    assert node.returncode == -signal.SIGKILL

    await wait_presence(cluster, ["pres-stranded"], {"pres-stranded": []}, timeout=LEASE_TTL + 10)


@pytest.mark.parametrize("users, expected", [
    ("*", '"*" is not one'), ([], "non-empty list"), ([7], "users[0] must be a non-empty string user id"),
    ([f"u{n}" for n in range(10_001)], "at most 10000 per call (MAX_RECIPIENTS)"),
], ids=["star", "empty", "not a string", "too many"])
async def test_a_bad_presence_request_fails_with_a_clear_error(cluster, users, expected):
    result = cluster.business.send_task("tasks.presence", args=[users], queue="dispatch")
    with pytest.raises(Exception) as info:
        await asyncio.to_thread(result.get, timeout=20)
    assert not isinstance(info.value, CeleryTimeout)
    assert expected in str(info.value) and result.state == "FAILURE"


@pytest.mark.parametrize("cluster", ["redis"], indirect=True)
@pytest.mark.parametrize("task, args, kwargs", [
    ("tasks.presence", ["*"], {}), ("tasks.status", ["not-an-id"], {}),
    # Arguments the function does not take: Python's TypeError, logged as an ERROR with a traceback.
    ("tasks.status", [], {}), ("tasks.presence", [["ann"], "bob"], {}), ("tasks.status", [], {"id": "x"}),
], ids=["presence", "status", "status-no-argument", "presence-two-arguments", "status-unknown-keyword"])
async def test_a_callers_bad_request_is_logged_as_expected_in_one_line_not_as_an_error_with_a_traceback(cluster, task, args, kwargs):
    """A caller's mistake is the caller's, as for tasks.collect (one WARNING line, "rejected"): the
    worker logs it as Celery logs a task's declared ``throws``, at INFO, without a traceback, and
    the task still fails with the error."""
    result = cluster.business.send_task(task, args=args, kwargs=kwargs, queue="dispatch")
    with pytest.raises(Exception, match="InvalidMessage|not a message id|is not one|takes \\((message_id|users)\\)"):
        await asyncio.to_thread(result.get, timeout=20)
    assert result.state == "FAILURE"
    log = cluster._log("worker")
    deadline = asyncio.get_running_loop().time() + 10
    while not (lines := [line for line in log.read_text(errors="replace").splitlines() if f"{result.id}] raised" in line]):
        assert asyncio.get_running_loop().time() < deadline, f"the worker logged nothing about {result.id}"
        await asyncio.sleep(0.1)
    [line] = lines
    assert "INFO" in line and "raised expected: InvalidMessage" in line, line
    after = log.read_text(errors="replace").split(line, 1)[1].splitlines()[:1]
    assert not any("Traceback" in rest for rest in after), after

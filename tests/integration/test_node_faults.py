"""A node that stops (SIGTERM) or dies (SIGKILL): clients reconnect elsewhere and lose nothing."""

from __future__ import annotations

import asyncio
import functools
import json
import os
import signal
import socket
import sys
import time
import uuid

import pytest
import redis as redis_lib
import tornado.httpserver
import tornado.netutil
import tornado.web
from kombu import Connection
from tornado.httpclient import HTTPClientError
from tornado.websocket import websocket_connect

import launcher

from tests.integration.conftest import LEASE_TTL
from tests.integration.test_auth_cache import HeldVerifyHandler
from tests.integration.test_guarantees import wait_for
from tests.integration.test_metrics import closes, scrape, value
from tests.integration.tcpproxy import FreezableProxy
from tests.integration.wsclient import Client, client_close_frame, client_text_frame, dedup, raw_connect, read_data_frame
from tasks.ids import IdGenerator
from tasks.queues import DELIVER_TASK, node_queue
from tasks.reclaim import hand_back
from wsnode.app import REDIS_MAX_CONNECTIONS
from wsnode.closecodes import CloseCode
from tests.conftest import redis_now
from wsnode.registry import NODES_KEY, RouteTable, route_key


async def test_sigterm_closes_clients_with_1001_and_releases_the_node_leases(cluster):
    node = cluster.start_node()
    address = f"127.0.0.1:{node.port}"
    clients = [await cluster.connect(f"sigterm-{i}", node.port) for i in range(3)]
    assert cluster.routes.zscore(route_key("sigterm-0"), address) is not None

    exit_code = await asyncio.to_thread(node.terminate, 15)
    closes = await asyncio.gather(*(c.closed() for c in clients))
    assert {code for code, _ in closes} == {CloseCode.GOING_AWAY}
    assert "reconnect elsewhere" in closes[0][1]
    assert exit_code == 0
    lease = cluster.routes.zscore(NODES_KEY, address)  # ended, or already forgotten by housekeeping
    assert lease is None or lease < time.time(), "the node's own lease still runs"
    assert all(cluster.routes.zscore(route_key(f"sigterm-{i}"), address) is None for i in range(3))


@pytest.mark.parametrize("cluster", ["redis"], indirect=True)  # the node's own signal handling, whatever the broker
async def test_a_node_sent_sigterm_again_and_again_while_it_drains_and_exits_still_exits_with_0(cluster):
    """A supervisor or an operator that sends SIGTERM more than once: during the drain each is one
    stop request, and one that comes once the drain ended, while the interpreter exits (it joins
    the node's threads), ends the process at once with status 0.  It used to kill it by the
    signal, status -15, for a clean drain (a test that terminated a node right as its drain ended
    failed so).  SIGTERM every millisecond from the first until the node has exited."""
    node = cluster.start_node()

    def storm() -> int | None:
        sent = 0
        while node.alive:
            try:
                os.kill(node.pid, signal.SIGTERM)
            except ProcessLookupError:
                break
            sent += 1
            time.sleep(0.001)
        assert sent > 1, "the node exited at the first SIGTERM: nothing came while it drained and exited"
        return node.returncode

    assert await asyncio.to_thread(storm) == 0
    assert "drained and stopped" in cluster._log(f"node-{node.port}").read_text(errors="replace")


@pytest.mark.parametrize("cluster", ["redis"], indirect=True)  # the claim is in Redis whatever the broker
async def test_a_second_node_given_the_same_address_waits_for_the_first_to_drain_instead_of_splitting_its_queue(cluster):
    """Two hosts that both left NODE_HOST at its default, with the same --port (here two loopback
    addresses of this host): both read one queue, each delivering only the messages it read, to
    its own connections; the others reached their users only by redelivery.  Nothing said so."""
    first = cluster.start_node()
    user = f"one-address-{first.port}"
    client = await cluster.connect(user, first.port)
    log_path = cluster._log(f"node-{first.port}-twin")
    twin = launcher.Service(f"node-{first.port}-twin", [sys.executable, "-m", "wsnode", "--port", str(first.port)],
                            {**cluster.env, "BIND_ADDRESS": "127.0.0.2"}, log_path=log_path).start()
    cluster.services.append(twin)
    try:
        await asyncio.to_thread(twin.wait_log, "holds this address", 20)
        sent = [await cluster.collect(user, n) for n in range(10)]
        assert [f["id"] for f in await client.messages(10, timeout=5)] == sent, "the twin read some of the first node's messages"
        assert "consuming queue" not in log_path.read_text()
        # Redis loses the claim (a restart without persistence, a failover): the first node takes
        # it again at its next renewal, before the twin, which saw it held, takes an absent one.
        cluster.routes.delete(f"push:address:127.0.0.1:{first.port}")
        await asyncio.sleep(3 * LEASE_TTL)
        assert "consuming queue" not in log_path.read_text(), "the twin took a claim Redis lost while its holder lived"
        assert json.loads(cluster.routes.get(f"push:address:127.0.0.1:{first.port}"))["pid"] == first.pid

        await asyncio.to_thread(first.terminate, 15)
        await asyncio.to_thread(twin.wait_log, "claimed its address after waiting", 20)
        await asyncio.to_thread(twin.wait_log, "consuming queue", 20)
    finally:
        twin.terminate(timeout=15)
    assert "claimed its address after waiting" in log_path.read_text()


async def test_a_node_restarted_on_this_host_after_sigkill_takes_its_address_at_once(cluster):
    """The claim of a process of this host that is gone does not hold its successor back."""
    node = cluster.start_node()
    port = node.port
    node.kill()
    again = cluster.start_node(port)
    # Told by what it logs, not by how long the start took: a successor that waited for the gone
    # process's claim to lapse (LEASE_TTL) started well within the bound this used to assert.
    log = again.log_tail(200)
    assert "holds this address" not in log and "claimed its address after waiting" not in log, log[-2000:]
    await asyncio.to_thread(again.terminate, 15)


async def test_a_drained_node_hands_back_its_empty_queue_and_housekeeping_forgets_it(cluster):
    """On the Redis broker an empty queue has no key, and the passive declaration that read its
    length raised 404 NOT_FOUND: the drain's hand-back failed, and so did every housekeeping run
    after it (the node stayed listed, other dead nodes' queues were not handed back, the store
    was not purged)."""
    node = cluster.start_node()
    address = f"127.0.0.1:{node.port}"
    worker_log_at = cluster._log("worker").stat().st_size  # this test's lines only: an earlier node may have had the port

    def worker_log() -> str:
        with open(cluster._log("worker"), errors="replace") as log:
            log.seek(worker_log_at)
            return log.read()
    assert await asyncio.to_thread(node.terminate, 15) == 0
    log = cluster._log(f"node-{node.port}").read_text(errors="replace")
    assert "could not hand back its queue" not in log, log[-2000:]
    deadline = time.monotonic() + 3 * LEASE_TTL + 10  # housekeeping forgets it LEASE_TTL after its lease ended
    while cluster.routes.zscore(NODES_KEY, address) is not None:
        assert time.monotonic() < deadline, f"housekeeping never forgot the drained node {address}"
        await asyncio.sleep(0.5)
    # Not reported as a node that died: it said it was leaving.
    await wait_for(lambda: f"node {address} drained: " in worker_log(), 5, "the worker logging the drained node")
    assert f"node {address} is gone" not in worker_log()


async def test_after_sigkill_the_lease_expires_dispatch_stops_routing_there_and_resume_recovers(cluster):
    node = cluster.start_node()
    client = await cluster.connect("killed-node-user", node.port)
    first = await cluster.collect("killed-node-user", {"n": 0})
    assert (await client.messages(1))[0]["id"] == first

    await asyncio.to_thread(node.kill)
    assert node.returncode == -signal.SIGKILL
    during = [await cluster.collect("killed-node-user", {"n": n}) for n in range(1, 4)]
    await asyncio.sleep(LEASE_TTL + 0.5)
    stranded = cluster.node_queue_length(node.port)
    after = [await cluster.collect("killed-node-user", {"n": n}) for n in range(4, 7)]
    assert cluster.node_queue_length(node.port) == stranded, "Dispatch still routes to a dead node"

    back = await cluster.connect("killed-node-user", cluster.node_ports[0], since=first)
    frames, _ = await back.until("resumed")
    assert [f["id"] for f in dedup(frames) if f["id"] != first and "n" in f["data"]] == during + after
    back.close()


async def test_a_broadcast_left_on_a_dead_nodes_queue_is_not_sent_again_to_the_users_of_other_nodes(cluster):
    """Housekeeping hands a dead node's queue back to Dispatch.  A broadcast's envelope there went
    to every live node again: each user online elsewhere got the broadcast a second time (and one
    who connected since, a broadcast sent before it came).  It is left out, and logged.  The dead
    node is an address with a lease that ends in a second and nothing consuming its queue (a node
    killed, or stopped, consumes nothing either, but on Redis the broker hands it what was pushed
    while its read was blocked)."""
    watcher = await cluster.connect("broadcast-watcher", cluster.node_ports[0])
    address = f"dead-{uuid.uuid4().hex[:8]}:1"
    # A lease of 5 s: the broadcast must be routed while it lasts (a collect under a loaded
    # machine, as with ``pytest -n``, took more than the 1 s it was).
    cluster.routes.zadd(NODES_KEY, {address: redis_now(cluster.routes) + 5.0})
    message_id = await cluster.collect("*", {"broadcast": "once"})
    assert (await watcher.messages(1))[0]["id"] == message_id
    deadline = time.monotonic() + 3 * LEASE_TTL + 10  # housekeeping forgets it LEASE_TTL after its lease ended
    while cluster.routes.zscore(NODES_KEY, address) is not None:
        assert time.monotonic() < deadline, f"housekeeping never forgot the dead node {address}"
        await asyncio.sleep(0.5)
    log = f"did not hand back 1 broadcast envelope(s) from {address}'s queue"
    await wait_for(lambda: log in cluster._log("worker").read_text(errors="replace"), 10, "the worker's line about the broadcast it did not hand back")
    assert [f["id"] for f in await watcher.quiet(2.0) if f.get("type") == "message"] == [], "the broadcast reached a user of another node twice"
    watcher.close()


@pytest.mark.parametrize("cluster", ["redis"], indirect=True)  # RabbitMQ expires both by itself
async def test_housekeeping_removes_a_killed_nodes_bindings_from_the_redis_broker(cluster):
    """kombu's Redis transport keeps each queue's bindings in sets of its own, and deletes a
    queue's only when the deleting process had declared it: housekeeping's deletion of a killed
    node's queue left ``_kombu.binding.<address>`` for an hour and the node's mailbox binding
    (a member of ``_kombu.binding.celery.pidbox``, a set that never expires while any worker or
    node lives) for good, one more for each node killed on an address that never came back."""
    broker = redis_lib.Redis.from_url(cluster.env["BROKER_URL"])
    node = cluster.start_node()
    address = f"127.0.0.1:{node.port}"
    mailbox = f"\x06\x16\x06\x16wsnode@{address}.celery.pidbox".encode()
    await wait_for(lambda: broker.sismember("_kombu.binding.celery.pidbox", mailbox), 10, "the node's mailbox bound")
    assert broker.exists(f"_kombu.binding.{address}")

    await asyncio.to_thread(node.kill)
    deadline = time.monotonic() + 3 * LEASE_TTL + 10  # housekeeping forgets it LEASE_TTL after its lease ended
    while cluster.routes.zscore(NODES_KEY, address) is not None:
        assert time.monotonic() < deadline, f"housekeeping never forgot the killed node {address}"
        await asyncio.sleep(0.5)
    assert not broker.sismember("_kombu.binding.celery.pidbox", mailbox), "the killed node's mailbox binding is left in Redis"
    assert not broker.exists(f"_kombu.binding.{address}"), "the killed node's queue binding is left in Redis"
    assert broker.sismember("_kombu.binding.celery.pidbox", f"\x06\x16\x06\x16wsnode@127.0.0.1:{cluster.node_ports[0]}.celery.pidbox".encode())


@pytest.mark.parametrize("cluster", ["amqp"], indirect=True)
async def test_housekeeping_removes_a_killed_nodes_exchange_from_rabbitmq(cluster):
    """RabbitMQ keeps a queue's exchange when the queue is deleted (by housekeeping, or by
    ``x-expires``): each node killed on an address that never came back left its durable
    exchange for good.  The exchange of a live node's queue stays."""
    node = cluster.start_node()
    address = f"127.0.0.1:{node.port}"
    await asyncio.to_thread(node.kill)
    deadline = time.monotonic() + 3 * LEASE_TTL + 10  # housekeeping forgets it LEASE_TTL after its lease ended
    while cluster.routes.zscore(NODES_KEY, address) is not None:
        assert time.monotonic() < deadline, f"housekeeping never forgot the killed node {address}"
        await asyncio.sleep(0.5)
    with Connection(cluster.env["BROKER_URL"]) as conn:
        assert cluster.node_queue_length(node.port) == 0
        with pytest.raises(conn.channel_errors, match="NOT_FOUND"):
            conn.channel().exchange_declare(address, "direct", passive=True)
        conn.channel().exchange_declare(f"127.0.0.1:{cluster.node_ports[0]}", "direct", passive=True)  # a live node's: still there


@pytest.mark.parametrize("cluster", ["redis"], indirect=True)  # node-side only: one broker is enough
async def test_hundreds_of_browsers_leaving_at_once_release_their_leases_over_a_few_redis_connections(cluster):
    node = cluster.start_node()
    address = f"127.0.0.1:{node.port}"
    users = [f"leaving-{i}" for i in range(150)]
    clients = await asyncio.gather(*(cluster.connect(user, node.port) for user in users))
    assert all(cluster.routes.zscore(route_key(user), address) is not None for user in users)

    for client in clients:
        client.close()
    deadline = time.monotonic() + 10  # the leases themselves run LEASE_TTL, and renew nothing once released
    while left := [user for user in users if cluster.routes.zscore(route_key(user), address) is not None]:
        assert time.monotonic() < deadline, f"{len(left)} leases still held 10 s after their users left"
        await asyncio.sleep(0.2)

    opened = [client for client in cluster.routes.client_list() if client["name"] == f"wsnode:{address}"]
    assert 0 < len(opened) <= REDIS_MAX_CONNECTIONS, f"the node opened {len(opened)} connections to Redis"
    await asyncio.to_thread(node.terminate, 15)


# --- lease writes that Redis holds up -------------------------------------------------------------
# ``CLIENT PAUSE ... WRITE`` holds every write (the node's lease scripts, the broker's pushes) while
# reads go on: auth still checks tokens (it only reads the revocation list), and the test still
# reads the routes.

def pause_writes(cluster, ms: int) -> None:
    cluster.routes.execute_command("CLIENT", "PAUSE", ms, "WRITE")


def unpause(cluster) -> None:
    cluster.routes.execute_command("CLIENT", "UNPAUSE")


@pytest.mark.parametrize("cluster", ["redis"], indirect=True)  # node-side only: one broker is enough
async def test_a_second_connection_of_a_user_gets_hello_only_once_the_users_lease_is_written(cluster):
    """Only a user's first connection on a node waited for its lease: a second one that opened
    meanwhile got ``hello`` and asked for its replay with no lease written, and a message stored
    between the replay's read and the lease was neither replayed nor routed."""
    node = cluster.start_node()
    address = f"127.0.0.1:{node.port}"
    user = "second-while-leasing"
    tokens = [await asyncio.to_thread(cluster.token, user) for _ in range(2)]
    # Shorter than LEASE_TTL: a lease write held that long writes a lease that has ended already;
    # the node then closes the connections with 1013, and its next renewal leaves that lease out.
    pause_writes(cluster, 2000)
    try:
        first = asyncio.ensure_future(Client.connect(cluster.ws_url(node.port, tokens[0]), expect_hello=False, timeout=20))
        await asyncio.sleep(0.5)  # bound, its lease write held by Redis
        second = await Client.connect(cluster.ws_url(node.port, tokens[1]), expect_hello=False, timeout=20)
        hello = await second.next_frame(20)
        leased = cluster.routes.zscore(route_key(user), address)  # a read: answered during the pause
    finally:
        unpause(cluster)
    assert hello["type"] == "hello"
    assert leased is not None, "the second connection got hello before its user's lease was written"
    assert (await (await first).next_frame(10))["type"] == "hello"
    for client in (await first, second):
        client.close()
    await asyncio.to_thread(node.terminate, 15)


@pytest.mark.parametrize("cluster", ["redis"], indirect=True)
async def test_a_client_that_leaves_while_its_lease_is_written_is_not_bound_and_leaves_no_lease(cluster):
    """A client that closes its socket after the upgrade, while Redis holds its user's lease
    write: the node notices the close as the write returns, and neither binds the connection
    (no hello, no replay request, not counted as connected) nor keeps the lease it wrote."""
    node = cluster.start_node()
    address = f"127.0.0.1:{node.port}"
    user = "left-while-leasing"
    token = await asyncio.to_thread(cluster.token, user)
    before = await asyncio.to_thread(scrape, node.port)
    pause_writes(cluster, 2000)
    try:
        _, writer = await raw_connect(node.port, f"token={token}")  # upgraded: its lease write is held
        writer.close()
        await asyncio.sleep(0.5)  # the node sees the socket closed while the write is still held
    finally:
        unpause(cluster)
    deadline = time.monotonic() + 10
    while value(await asyncio.to_thread(scrape, node.port), "push_node_connections") != 0:
        assert time.monotonic() < deadline, "the connection of the client that left is still held"
        await asyncio.sleep(0.1)
    while cluster.routes.zscore(route_key(user), address) is not None:  # released once its last connection is gone
        assert time.monotonic() < deadline, "the lease of the user who left is still there"
        await asyncio.sleep(0.1)
    after = await asyncio.to_thread(scrape, node.port)
    assert value(after, "push_node_connects_total") == value(before, "push_node_connects_total")
    log = cluster._log(f"node-{node.port}").read_text(errors="replace")
    assert f"user={user}" in log, "the node never saw the connection: the test did not make the case it is about"
    assert not [line for line in log.splitlines() if f"user={user}" in line and " connected in " in line], \
        "the connection of the client that left while its lease was written was bound"
    await asyncio.to_thread(node.terminate, 15)


@pytest.mark.parametrize("cluster", ["redis"], indirect=True)
async def test_a_lease_write_held_up_past_the_start_of_a_drain_does_not_put_the_node_back(cluster):
    """A lease write that waited behind another when the drain released the node's leases ran after
    the release, and its script renewed the node's own lease: Dispatch went on routing to a queue
    that no one read any more.  Now nothing writes leases once the node drains, and that user's
    connection is closed with 1001 instead of being bound."""
    node = cluster.start_node()
    address = f"127.0.0.1:{node.port}"
    tokens = [await asyncio.to_thread(cluster.token, user) for user in ("drain-lease-x", "drain-lease-a")]
    pause_writes(cluster, 3000)
    try:
        x = asyncio.ensure_future(Client.connect(cluster.ws_url(node.port, tokens[0]), expect_hello=False, timeout=20))
        await asyncio.sleep(0.5)  # x's lease write is held by Redis
        a = asyncio.ensure_future(Client.connect(cluster.ws_url(node.port, tokens[1]), expect_hello=False, timeout=20))
        await asyncio.sleep(0.5)  # a's waits behind it
        os.kill(node.pid, signal.SIGTERM)
        await asyncio.sleep(0.5)  # the drain's release is held too
    finally:
        unpause(cluster)
    assert await asyncio.to_thread(node.terminate, 20) == 0
    lease = cluster.routes.zscore(NODES_KEY, address)
    assert lease is None or lease < time.time(), "a lease write after the drain put the node's own lease back"
    assert cluster.routes.zscore(route_key("drain-lease-a"), address) is None
    closed = [await client.closed(10) for client in (await x, await a)]
    assert [code for code, _ in closed] == [CloseCode.GOING_AWAY, CloseCode.GOING_AWAY]
    log = cluster._log(f"node-{node.port}").read_text(errors="replace")
    assert "user=drain-lease-a" in log and not [line for line in log.splitlines() if "user=drain-lease-a" in line and " connected in " in line], \
        "the connection the drain closed while its lease write waited was bound (counted, sent a replay request) afterwards"



@pytest.mark.parametrize("cluster", ["redis"], indirect=True)
async def test_an_ack_sent_before_the_client_saw_the_drains_1001_is_recorded(cluster):
    """The node reads a client's frames until its close reply, and records an ack among them; but
    the drain had flushed the receipts right after closing the connections, with the flush timer
    stopped, so such an ack was never sent and its message was redelivered."""
    node = cluster.start_node()
    user = "ack-during-drain"
    reader, writer = await raw_connect(node.port, f"token={await asyncio.to_thread(cluster.token, user)}")
    try:
        assert [json.loads((await read_data_frame(reader, 15))[1])["type"] for _ in range(2)] == ["hello", "resumed"]
        message_id = await cluster.collect(user, {"n": 1})
        assert json.loads((await read_data_frame(reader, 15))[1])["id"] == message_id
        os.kill(node.pid, signal.SIGTERM)
        while (frame := await read_data_frame(reader, 15)) is not None and frame[0] != 0x8:
            pass
        assert frame is not None and frame[1][:2] == CloseCode.GOING_AWAY.to_bytes(2, "big")
        writer.write(client_text_frame(json.dumps({"type": "ack", "id": message_id})) + client_close_frame())
        await writer.drain()
    finally:
        writer.close()
    assert await asyncio.to_thread(node.terminate, 20) == 0
    await wait_for(lambda: "acked" in cluster.status(message_id)["recipients"][user], 10, "the ack recorded")


@pytest.mark.parametrize("cluster", ["redis"], indirect=True)
async def test_a_connection_closed_already_is_not_closed_and_counted_again(cluster):
    """A connection the node closed (4500 here) stays in Tornado's hands until the client answers
    the close or 5 s pass; a revocation meanwhile counted a 4401 close too (a drain a 1001, a ping
    timeout a 1000), though no second close frame was sent."""
    node = cluster.start_node()
    user = "closed-then-revoked"
    reader, writer = await raw_connect(node.port, f"token={await asyncio.to_thread(cluster.token, user)}")
    healthy = await cluster.connect(user, node.port)  # the revocation closes it: proof it reached the node
    try:
        assert [json.loads((await read_data_frame(reader, 15))[1])["type"] for _ in range(2)] == ["hello", "resumed"]
        writer.write(client_text_frame("not json"))
        await writer.drain()
        opcode, payload = await read_data_frame(reader, 15)
        assert opcode == 0x8 and payload[:2] == CloseCode.BAD_REQUEST.to_bytes(2, "big")
        await asyncio.to_thread(cluster.revoke, {"user_id": user})  # the raw peer has not answered the close
        assert (await healthy.closed(10))[0] == CloseCode.UNAUTHORIZED
        assert await asyncio.to_thread(closes, node.port, CloseCode.UNAUTHORIZED) == 1  # the healthy one only
        assert await asyncio.to_thread(closes, node.port, CloseCode.BAD_REQUEST) == 1
    finally:
        writer.close()
        healthy.close()
    await asyncio.to_thread(node.terminate, 15)


@pytest.mark.parametrize("cluster", ["redis"], indirect=True)  # node-side only: one broker is enough
def test_a_node_on_a_port_in_use_exits_saying_so_and_leaves_that_addresss_queue_alone(cluster, tmp_path):
    """The queue is named by the address: a node that cannot listen must not consume it.  It
    started its consumer before it listened, took what was queued for the address, then died
    with Tornado's traceback."""
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    port = holder.getsockname()[1]
    address = f"127.0.0.1:{port}"
    with Connection(cluster.env["BROKER_URL"]) as conn:
        conn.Producer().publish({"not": "consumed"}, exchange=node_queue(address).exchange, routing_key=address,
                                declare=[node_queue(address)], retry=True)
    assert cluster.node_queue_length(port) == 1
    try:
        node = launcher.Service(f"node-{port}-busy", [sys.executable, "-m", "wsnode", "--port", str(port)], cluster.env,
                                log_path=tmp_path / "busy.log").start()
        code = node.wait(timeout=30)
        log = (tmp_path / "busy.log").read_text(errors="replace")
        assert code == 1, log[-2000:]
        assert f"node {address} cannot listen on 127.0.0.1:{port}" in log and "another --port" in log, log[-2000:]
        assert "Traceback" not in log, log[-2000:]
        assert cluster.node_queue_length(port) == 1, "the node consumed the queue of an address it could not listen on"
    finally:
        holder.close()
        with Connection(cluster.env["BROKER_URL"]) as conn:
            node_queue(address)(conn.default_channel).delete()


@pytest.mark.parametrize("cluster", ["redis"], indirect=True)  # the broker plays no part
async def test_a_handshake_whose_token_check_outlasts_the_drain_gets_503(cluster, tmp_path):
    """Its check waited for auth past the end of the drain: the node's loop ended with the
    handshake still waiting, which was cancelled and answered with HTTP 500.  The drain's end now
    answers such a handshake 503, as one that comes during the drain (a check that finishes
    during the drain gets 1001)."""
    seen: list[dict] = []
    release = asyncio.Event()  # never set before the node is gone: auth does not answer in time
    sockets = tornado.netutil.bind_sockets(0, "127.0.0.1")
    held_auth = tornado.httpserver.HTTPServer(tornado.web.Application([(r"/verify", HeldVerifyHandler, {"seen": seen, "release": release})]))
    held_auth.add_sockets(sockets)
    node_port = launcher.free_port()
    log_path = tmp_path / "node.log"
    node = await asyncio.to_thread(launcher.start_node, {**cluster.env, "AUTH_URL": f"http://127.0.0.1:{sockets[0].getsockname()[1]}"},
                                   node_port, log_path=log_path)
    try:
        attempt = asyncio.ensure_future(websocket_connect(cluster.ws_url(node_port, "user:drain-while-checked")))
        await wait_for(lambda: seen, 5, "the node never asked auth about the token")
        os.kill(node.pid, signal.SIGTERM)
        with pytest.raises(HTTPClientError) as refused:
            await asyncio.wait_for(attempt, 10)
        assert refused.value.code == 503
        assert b"node is draining" in refused.value.response.body
        # The node exits by itself once drained (a second SIGTERM, from terminate(), could come
        # as its loop ends, after its handler is gone, and kill it: exit status -15).
        assert await asyncio.to_thread(node.wait, 15) == 0, log_path.read_text()[-3000:]
    finally:
        node.terminate(5)
        release.set()
        held_auth.stop()
    log = log_path.read_text()
    assert "rejected with 503: the node drained while auth had not answered its token check" in log
    assert " 500 " not in log and "Traceback" not in log, log[-3000:]


async def test_a_node_whose_queue_is_deleted_consumes_it_again_and_delivers(cluster):
    """Housekeeping hands back and deletes the queue of a node whose lease lapsed, which a node
    cut off from Redis for a while may outlive.  On RabbitMQ the broker then cancels the node's
    consumer; the node says so, declares the queue again and reads on."""
    node = cluster.start_node()
    client = await cluster.connect("queue-deleted", node.port)
    await asyncio.to_thread(hand_back, cluster.business, f"127.0.0.1:{node.port}", True)
    if cluster.broker == "amqp":
        await asyncio.to_thread(node.wait_log, "RabbitMQ cancelled this node's consumer: the queue was deleted", 10)
        await asyncio.to_thread(node.wait_ready, lambda: node.log_tail(500).count("consuming queue") >= 2, 10, "consuming its queue again")
    sent = await cluster.collect("queue-deleted", {"after": "delete"})
    assert [m["id"] for m in await client.messages(1)] == [sent]
    await asyncio.to_thread(node.terminate, 15)


def _publish_undeclared(cluster, address: str, user: str) -> str:
    """A ``wsnode.deliver`` for ``user`` on ``address``'s queue, sent as Dispatch sends one when
    its declaration of the queue is not due (once a minute per worker process): without
    declaring the queue.  Not stored, so housekeeping never redelivers it.  Returns its id."""
    message_id = IdGenerator().next_id()
    cluster.business.send_task(DELIVER_TASK, args=[[{"id": message_id, "to": [user], "data": {"undeclared": True}, "ts": None}]],
                               queue=node_queue(address), declare=[], ignore_result=True)
    return message_id


def _bound_in_redis(cluster, address: str) -> tuple[bool, bool]:
    """Whether the Redis broker lists ``address``'s queue binding and its node's mailbox binding."""
    broker = redis_lib.Redis.from_url(cluster.env["BROKER_URL"])
    return (broker.sismember(f"_kombu.binding.{address}", f"{address}\x06\x16\x06\x16{address}".encode()),
            broker.sismember("_kombu.binding.celery.pidbox", f"\x06\x16\x06\x16wsnode@{address}.celery.pidbox".encode()))


async def test_a_node_started_on_an_address_being_reclaimed_keeps_its_queue(cluster):
    """Housekeeping read the node list while the address's old node was gone (drained, or
    killed), and a node started on it again before the queue was deleted (a rolling restart at
    that moment): the deletion took what stood on the new node's queue; on RabbitMQ it also
    cancelled the node's consumer, and what Dispatch published until the node declared the queue
    again (half a second later) was dropped; on Redis it took the queue's and the mailbox's
    bindings (which Celery's publishes do not use).  The lease is read again before the
    deletion, and the queue kept."""
    node = cluster.start_node()
    address = f"127.0.0.1:{node.port}"
    client = await cluster.connect("reclaimed-address", node.port)
    routes = RouteTable(cluster.routes)
    cutoff = redis_now(cluster.routes) - LEASE_TTL  # the run found the address's lease ended before this (by Redis's clock)
    await asyncio.to_thread(hand_back, cluster.business, address, True, node_back=functools.partial(routes.lease_ends_after, address, cutoff))
    sent = _publish_undeclared(cluster, address, "reclaimed-address")
    assert [m["id"] for m in await client.messages(1, timeout=3)] == [sent]
    if cluster.broker == "redis":
        assert _bound_in_redis(cluster, address) == (True, True)
    assert "RabbitMQ cancelled this node's consumer" not in node.log_tail(500)
    await asyncio.to_thread(node.terminate, 15)


async def test_a_node_started_on_an_address_while_its_queue_is_deleted_gets_it_declared_again(cluster):
    """The same race, closer: the node wrote its lease and declared its queue after housekeeping's
    last read of the lease before the deletion (ordered here by hand: that read is made before
    the node starts).  Housekeeping reads the lease once more after the deletion and declares the
    queue again (on Redis its bindings too), so what Dispatch publishes meanwhile waits for the
    node, whose consumer RabbitMQ cancelled."""
    port = launcher.free_port()
    address = f"127.0.0.1:{port}"
    routes = RouteTable(cluster.routes)
    cutoff = redis_now(cluster.routes) - LEASE_TTL
    answers = [routes.lease_ends_after(address, cutoff)]  # before the node started: no lease
    assert answers == [False]
    node = cluster.start_node(port)
    client = await cluster.connect("reclaimed-address-late", port)
    asked: list[bool] = []

    def node_back() -> bool:
        asked.append(answers.pop(0) if answers else routes.lease_ends_after(address, cutoff))
        return asked[-1]
    await asyncio.to_thread(hand_back, cluster.business, address, True, node_back=node_back)
    sent = _publish_undeclared(cluster, address, "reclaimed-address-late")
    assert [m["id"] for m in await client.messages(1, timeout=5)] == [sent]
    if cluster.broker == "redis":
        assert _bound_in_redis(cluster, address) == (True, True)
    else:  # the deletion did take the queue the node consumed
        assert "RabbitMQ cancelled this node's consumer" in node.log_tail(500)
    assert asked == [False, True]
    await asyncio.to_thread(node.terminate, 15)


@pytest.mark.parametrize("cluster", ["redis"], indirect=True)  # the routing Redis is cut off, not the broker
async def test_a_device_on_a_node_cut_off_from_redis_past_its_leases_resumes_and_gets_what_another_device_acked(cluster):
    """One user, two devices on two nodes; the second node loses Redis (a partition) for longer
    than ``LEASE_TTL``.  Dispatch then routes to the first node only, that device acks, and
    redelivery (per user, until an ack) never sends the message again: the second device, still
    open on its node, never got it, and once its node wrote its leases again it got the next
    messages, and would resume after them.  Now the node closes its connections with 1013 once
    their leases may have ended, and they resume with ``since``."""
    proxy, url = FreezableProxy.to_url(cluster.env["REDIS_URL"])
    try:
        cut = cluster.start_node(REDIS_URL=url)
        user = f"two-devices-{cut.port}"
        here = await cluster.connect(user, cluster.node_ports[0])
        there = await cluster.connect(user, cut.port)
        first = await cluster.collect(user, {"n": 0})
        assert [f["id"] for f in await there.messages(1)] == [first]
        proxy.freeze()
        code, reason = await there.closed(timeout=LEASE_TTL + 4)
        assert code == CloseCode.TRY_AGAIN_LATER and "since" in reason, (code, reason)
        during = await cluster.collect(user, {"n": 1})
        assert [f["id"] for f in await here.messages(2)][-1] == during  # the first, then this one: acked here
        proxy.thaw()
        back = await cluster.connect(user, cluster.node_ports[0], since=first)
        frames, _ = await back.until("resumed")
        assert during in [f["id"] for f in frames]
    finally:
        proxy.close()


@pytest.mark.parametrize("cluster", ["redis"], indirect=True)  # node-side only: one broker is enough
@pytest.mark.parametrize("lost", ["route", "node"])
async def test_a_device_whose_lease_redis_lost_while_its_node_wrote_resumes_and_gets_what_another_device_acked(cluster, lost):
    """One user, two devices on two nodes; Redis loses the second node's lease of the user
    (``route``: an evicted or flushed route key, a failover to a replica that lacked it) or that
    node's own lease (``node``) while the node's writes keep working.  Dispatch then routes to the
    first node only and that device acks, so redelivery never sends the message again; the second
    node's next renewal wrote the lease again and its device, never closed, got the next messages
    and would resume after them.  Now that renewal finds the lease gone and closes the device
    with 1013 before writing it again, and the device resumes with ``since``."""
    other = cluster.start_node()
    address = f"127.0.0.1:{other.port}"
    try:
        user = f"lost-{lost}-{other.port}"
        here = await cluster.connect(user, cluster.node_ports[0])
        there = await cluster.connect(user, other.port)
        first = await cluster.collect(user, {"n": 0})
        assert [f["id"] for f in await there.messages(1)] == [first]
        assert [f["id"] for f in await here.messages(1)] == [first]
        if lost == "route":
            assert cluster.routes.zrem(route_key(user), address) == 1
        else:
            assert cluster.routes.zrem(NODES_KEY, address) == 1
        during = await cluster.collect(user, {"n": 1})
        assert [f["id"] for f in await here.messages(1)] == [during]  # acked here
        code, reason = await there.closed(timeout=LEASE_TTL / 3 + 2)  # the next renewal
        assert code == CloseCode.TRY_AGAIN_LATER and "since" in reason, (code, reason)
        back = await cluster.connect(user, other.port, since=first)
        frames, _ = await back.until("resumed")
        assert during in [f["id"] for f in frames]
        assert f"found {'the leases of 1 users' if lost == 'route' else 'the node' + chr(39) + 's own lease'}" in other.log_tail(200)
        assert value(await asyncio.to_thread(scrape, other.port), "push_node_leases_lost_total", lease="user" if lost == "route" else "node") == 1
        for client in (here, back):
            client.close()
    finally:
        await asyncio.to_thread(other.terminate, 15)

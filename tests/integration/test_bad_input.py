"""Bad input gets a clear error or a documented close code; nothing partial is stored or sent."""

from __future__ import annotations

import asyncio
import base64
import json
import math
import re
import struct
import time
import uuid

import pytest
import redis as redis_lib
import tornado.httpclient
import tornado.websocket
from celery.exceptions import TimeoutError as CeleryTimeout
from kombu import Connection

import launcher
import settings
from auth.tokens import issue
from tasks.queues import node_queue
from tests.integration.conftest import Cluster, start_or_explain
from tests.integration.wsclient import Client, client_text_frame, raw_connect, read_server_frame
from tests.integration.test_metrics import closes, scrape, value
from wsnode.acks import ACK_ALLOWANCE
from wsnode.closecodes import CloseCode


async def _refused(cluster, url) -> tuple[int, str]:
    client = await Client.connect(url, expect_hello=False)
    return await client.closed()


async def test_a_garbage_token_is_closed_with_4401(cluster):
    code, reason = await _refused(cluster, cluster.ws_url(cluster.node_ports[0], "not-a-token"))
    assert code == CloseCode.UNAUTHORIZED and "invalid" in reason


@pytest.mark.parametrize("cluster", ["redis"], indirect=True)
async def test_acks_from_a_refused_connection_are_ignored_and_spoil_no_ones_receipts(cluster):
    """A connection refused with 4401 reads frames until the client's close frame comes.  Its acks
    were recorded under no user: beside a real user's ack of the same message, in one batch of
    receipts, that failed the whole batch (the user's ack was lost, and the message stayed due
    for redelivery)."""
    port = cluster.node_ports[0]
    client = await cluster.connect("acked-beside-refused", port, auto_ack=False)
    message_id = await cluster.collect("acked-beside-refused", {"n": 1})
    assert [frame["id"] for frame in await client.messages(1)] == [message_id]

    reader, writer = await raw_connect(port, "token=not-a-token")
    opcode, payload = await read_server_frame(reader)
    assert opcode == 0x8 and struct.unpack("!H", payload[:2])[0] == CloseCode.UNAUTHORIZED
    writer.write(b"".join(client_text_frame(json.dumps({"type": "ack", "id": message_id})) for _ in range(5)))
    await writer.drain()
    await client.send({"type": "ack", "id": message_id})  # in the same batch of receipts (RECEIPT_FLUSH_SECONDS)

    for _ in range(100):
        status = await asyncio.to_thread(cluster.status, message_id)
        if "acked" in status["recipients"]["acked-beside-refused"]:
            break
        await asyncio.sleep(0.1)
    else:
        pytest.fail(f"the user's ack was not recorded: {status}")
    assert "TypeError" not in cluster._log("worker").read_text(errors="replace")
    writer.close()
    client.close()


async def test_while_auth_is_down_connections_are_closed_with_1013_and_connect_again_once_it_is_back(cluster, tmp_path):
    auth_port = launcher.free_port()
    auth = launcher.start_auth(cluster.env, auth_port, name="auth-restarted", log_path=tmp_path / "auth.log")
    node_port = launcher.free_port()
    node = launcher.start_node({**cluster.env, "AUTH_URL": f"http://127.0.0.1:{auth_port}", "AUTH_CACHE_SECONDS": "0"}, node_port, log_path=tmp_path / "node.log")
    try:
        tokens = [await asyncio.to_thread(cluster.token, f"auth-down-{n}") for n in range(3)]
        first = await Client.connect(cluster.ws_url(node_port, tokens[0]))  # the node now holds a connection to auth
        auth.terminate()

        code, reason = await _refused(cluster, cluster.ws_url(node_port, tokens[1]))
        assert code == CloseCode.TRY_AGAIN_LATER and "try again later" in reason

        auth = launcher.start_auth(cluster.env, auth_port, name="auth-restarted", log_path=tmp_path / "auth.log")
        again = await Client.connect(cluster.ws_url(node_port, tokens[2]))
        assert again.hello["user"] == "auth-down-2"
        first.close()
        again.close()
    finally:
        node.terminate()
        auth.terminate()


async def test_a_missing_token_is_closed_with_4401(cluster):
    code, _ = await _refused(cluster, f"ws://127.0.0.1:{cluster.node_ports[0]}/ws")
    assert code == CloseCode.UNAUTHORIZED


async def test_an_expired_token_is_closed_with_4401(cluster):
    old = issue(settings.AUTH_SECRET, "expired-user", now=time.time() - 7200, ttl=60).token
    code, reason = await _refused(cluster, cluster.ws_url(cluster.node_ports[0], old))
    assert code == CloseCode.UNAUTHORIZED and "expired" in reason


async def test_a_token_signed_with_another_secret_is_closed_with_4401(cluster):
    forged = issue("not-the-secret-but-just-as-long-as-one-0123456789", "forger", now=time.time(), ttl=60).token
    code, _ = await _refused(cluster, cluster.ws_url(cluster.node_ports[0], forged))
    assert code == CloseCode.UNAUTHORIZED


async def test_a_revoked_token_stops_opening_connections_once_the_node_cache_expires(cluster):
    token = await asyncio.to_thread(cluster.token, "revoked-user")
    url = cluster.ws_url(cluster.node_ports[0], token)
    first = await Client.connect(url)  # works, and is now in the node's short cache
    await asyncio.to_thread(cluster.revoke, {"token": token})
    await asyncio.sleep(1.5)  # AUTH_CACHE_SECONDS=1 in the test cluster
    code, reason = await _refused(cluster, url)
    assert code == CloseCode.UNAUTHORIZED and "revoked" in reason
    first.close()


async def test_a_frame_that_is_not_json_closes_with_4500(cluster):
    client = await cluster.connect("garbage-sender")
    await client.send("{this is not json")
    code, reason = await client.closed()
    assert code == CloseCode.BAD_REQUEST and "JSON" in reason


async def test_a_binary_frame_closes_with_4500(cluster):
    client = await cluster.connect("binary-sender")
    await client.send(b"\x00\x01\x02")
    code, _ = await client.closed()
    assert code == CloseCode.BAD_REQUEST


async def test_a_text_frame_that_is_not_utf8_closes_with_4500(cluster):
    """Tornado dropped the connection without a close frame (1006: "reconnect"), and nothing
    was logged or counted."""
    client = await cluster.connect("not-utf8-sender")
    client.ws.protocol._write_frame(True, 0x1, b"{\"type\": \"ack\", \"id\": \"\xff\"}")
    code, reason = await client.closed()
    assert (code, reason) == (CloseCode.BAD_REQUEST, "text frame is not UTF-8: send JSON text")


async def test_an_unknown_frame_type_closes_with_4500(cluster):
    client = await cluster.connect("unknown-type-sender")
    await client.send({"type": "subscribe", "channel": "x"})
    code, reason = await client.closed()
    assert code == CloseCode.BAD_REQUEST and "subscribe" in reason


async def test_an_oversize_frame_closes_with_1009(cluster):
    client = await cluster.connect("oversize-sender")
    await client.send({"type": "ack", "id": "x" * 10_000})
    code, _ = await client.closed()
    assert code == CloseCode.MESSAGE_TOO_BIG


@pytest.mark.parametrize("cluster", ["redis"], indirect=True)  # the node's own reader: one broker is enough
async def test_a_client_still_sending_an_oversize_frame_gets_1009_and_not_a_reset(cluster):
    """The node closed the socket as soon as it had read the frame's header, with the rest of it
    unread: the reset that sent reached a client still writing the frame before the close frame
    did, and the client saw 1006 ("connection lost": Chromium half the time for 5 MB, Tornado's
    client every time) instead of the 1009 that says what is wrong."""
    port = cluster.node_ports[0]
    token = await asyncio.to_thread(cluster.token, "oversize-streamer")
    for _ in range(3):
        client = await Client.connect(cluster.ws_url(port, token))
        client.ws.write_message(json.dumps({"type": "ack", "id": "x" * 5_000_000})).add_done_callback(lambda f: f.exception())
        assert await client.closed(15) == (CloseCode.MESSAGE_TOO_BIG, "message too big")


@pytest.mark.parametrize("cluster", ["redis"], indirect=True)  # the node's own check: one broker is enough
async def test_acks_past_the_messages_written_and_the_allowance_close_with_4500(cluster):
    port = cluster.node_ports[0]
    client = await cluster.connect("over-acker", port)
    # Acks of messages this connection never got (a client that acks on a new connection what it
    # read on the previous one): ACK_ALLOWANCE of them are taken.
    for n in range(ACK_ALLOWANCE):
        await client.send({"type": "ack", "id": f"{n + 1:024x}"})
    # Still open: a message comes, and the client acks it (auto_ack), which its frame allowed.
    message_id = await cluster.collect("over-acker", {"n": 1})
    assert [frame["id"] for frame in await client.messages(1)] == [message_id]
    assert await client.quiet(0.5) == [] and client.ws.close_code is None
    closes_before = await asyncio.to_thread(closes, port, CloseCode.BAD_REQUEST)

    # One ack more than that closes the connection.
    await client.send({"type": "ack", "id": f"{999:024x}"})
    code, reason = await client.closed()

    assert (code, reason) == (CloseCode.BAD_REQUEST, "more acks than messages sent on this connection")
    assert await asyncio.to_thread(closes, port, CloseCode.BAD_REQUEST) == closes_before + 1


@pytest.mark.parametrize("cluster", ["redis"], indirect=True)
async def test_an_ack_frame_whose_ids_go_past_the_allowance_closes_with_4500_and_records_none_of_them(cluster):
    client = await cluster.connect("over-acker-in-one", cluster.node_ports[0], auto_ack=False)
    message_id = await cluster.collect("over-acker-in-one", {"n": 1})
    assert [frame["id"] for frame in await client.messages(1)] == [message_id]

    # One frame written allows ACK_ALLOWANCE + 1 acks: a frame of one more is refused whole.
    await client.send({"type": "ack", "ids": [message_id] + [f"{n + 1:024x}" for n in range(ACK_ALLOWANCE + 1)]})
    code, reason = await client.closed()

    assert (code, reason) == (CloseCode.BAD_REQUEST, "more acks than messages sent on this connection")
    await asyncio.sleep(1)  # past several receipt flushes (RECEIPT_FLUSH_SECONDS): nothing of that frame went
    assert "acked" not in cluster.status(message_id)["recipients"]["over-acker-in-one"]


@pytest.mark.parametrize("cluster", ["redis"], indirect=True)
async def test_an_ack_frame_of_more_ids_than_hellos_ack_ids_closes_with_4500_even_when_it_fits_the_frame_limit(cluster):
    client = await cluster.connect("over-ack-ids", cluster.node_ports[0], auto_ack=False)
    most = client.hello["ack_ids"]
    frame = json.dumps({"type": "ack", "ids": [f"{n + 1:024x}" for n in range(most + 1)]}, separators=(",", ":"))
    assert len(frame) <= settings.MAX_FRAME_BYTES  # written without spaces, one id more than hello said still fits

    await client.send(frame)
    code, reason = await client.closed()

    assert (code, reason) == (CloseCode.BAD_REQUEST, f"ack has {most + 1} ids: send at most hello's ack_ids ({most}) in one frame")


@pytest.mark.parametrize("cluster", ["redis"], indirect=True)
async def test_bad_frames_written_together_close_once_and_count_once(cluster):
    port = cluster.node_ports[1]
    client = await cluster.connect("bad-frames-together", port)
    closes_before = await asyncio.to_thread(closes, port, CloseCode.BAD_REQUEST)

    for n in range(20):
        client.ws.write_message(f"not json {n}")
    code, reason = await client.closed()

    assert (code, reason) == (CloseCode.BAD_REQUEST, "frame is not JSON")
    assert await asyncio.to_thread(closes, port, CloseCode.BAD_REQUEST) == closes_before + 1


async def test_a_since_that_is_not_a_message_id_closes_with_4500(cluster):
    token = await asyncio.to_thread(cluster.token, "bad-since")
    code, reason = await _refused(cluster, cluster.ws_url(cluster.node_ports[0], token, since="yesterday"))
    assert code == CloseCode.BAD_REQUEST and "since" in reason


async def test_a_token_or_since_whose_percent_escapes_are_not_utf8_is_refused_with_its_close_code(cluster):
    """Tornado decoded the query's arguments as UTF-8 and answered a ``%ff`` with HTTP 400 before
    the upgrade: neither the 401/403 nor the 4401 a bad token gets, nor the 4500 of a bad ``since``."""
    port = cluster.node_ports[0]
    token = await asyncio.to_thread(cluster.token, "not-utf8-since")
    code, reason = await _refused(cluster, cluster.ws_url(port, "%ff%fe"))
    assert code == CloseCode.UNAUTHORIZED and "invalid" in reason
    code, reason = await _refused(cluster, cluster.ws_url(port, token + "%ff"))
    assert code == CloseCode.UNAUTHORIZED and "invalid" in reason
    code, reason = await _refused(cluster, cluster.ws_url(port, token, since="%ff" * 24))
    assert code == CloseCode.BAD_REQUEST and "since" in reason


def _nested(levels: int) -> list:
    value: list = []
    for _ in range(levels - 1):
        value = [value]
    return value


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"data": {"x": 1}}, '"to" is missing'),
        ({"to": "", "data": 1}, "non-empty string"),
        ({"to": ["ok", 7], "data": 1}, '"to"[1]'),
        ({"to": "watcher-bad-input", "data": math.nan}, "not JSON"),
        ({"to": "watcher-bad-input", "data": "x" * 70_000}, "MAX_MESSAGE_BYTES"),
        ({"to": "watcher-bad-input"}, '"data" is missing'),
        ({"to": "watcher-bad-input", "data": 1, "priority": "high"}, "unexpected argument"),
        ({"to": "watcher-bad-input", "data": {"text": "\ud800"}}, '"data" is not valid Unicode'),  # it failed its whole batch
        ({"to": "watcher-bad-input", "data": 1, "key": "k\udfff"}, '"key" is not valid Unicode'),
        ({"to": "watcher-bad-input", "data": _nested(65)}, "more than 64 levels deep (MongoDB"),
        ({"to": "watcher-bad-input", "data": _nested(600)}, "more than 200 levels deep"),  # it stopped the worker, which could not pickle it
    ],
    ids=["no to", "empty to", "int in to", "NaN", "oversize", "no data", "unexpected", "surrogate", "surrogate key", "deep", "very deep"],
)
async def test_an_invalid_collect_fails_with_a_clear_error_and_sends_nothing(cluster, kwargs, expected):
    watcher = await cluster.connect("watcher-bad-input")
    result = cluster.send(**kwargs)
    with pytest.raises(Exception) as info:
        await asyncio.to_thread(result.get, timeout=20)
    assert not isinstance(info.value, CeleryTimeout)
    assert expected in str(info.value)
    assert result.state == "FAILURE"
    assert await watcher.quiet(0.7) == []
    assert f"{result.id}: result not stored" not in cluster._log("worker").read_text(errors="replace")
    watcher.close()


async def test_an_invalid_item_in_collect_many_rejects_only_that_item_with_its_index(cluster):
    client = await cluster.connect("many-user")
    results = await cluster.collect_many([
        {"to": "many-user", "data": 1},
        {"to": "many-user"},
        {"to": "many-user", "data": 3},
        "not an object",
    ])
    assert isinstance(results[0], str) and isinstance(results[2], str)
    assert results[1]["index"] == 1 and results[1]["error"].startswith("messages[1]:")
    assert results[3]["index"] == 3
    frames = await client.messages(2)
    assert [f["data"] for f in frames] == [1, 3]
    assert await client.quiet(0.5) == []
    client.close()


async def test_an_object_shaped_like_kombus_typed_values_rejects_at_most_its_own_collect_many_item(cluster):
    """kombu's JSON decoder reads an object whose only keys are ``__type__`` and ``__value__`` as
    the date, UUID, decimal or bytes it encodes.  One it could not read (a type it does not know, a
    value that is not one) failed the decoding of the whole message: a ``collect_many`` failed
    whole, every other item unstored, with "not run: its body could not be decoded" and no index.
    Such an object is no encoded value: it is kept as the caller sent it, and delivered."""
    client = await cluster.connect("typed-shapes")
    sent = [{"__type__": "uuid", "__value__": "not a uuid"}, {"__type__": "no-such-type", "__value__": 1}, 2,
            {"__type__": "datetime", "__value__": "2020-01-01T00:00:00"}]
    results = await cluster.collect_many([{"to": "typed-shapes", "data": data} for data in sent])
    assert all(isinstance(result, str) for result in results[:3]), results
    assert results[3]["index"] == 3 and "not JSON" in results[3]["error"]  # a datetime, as documented
    frames = await client.messages(3)
    assert [(f["id"], f["data"]) for f in frames] == list(zip(results[:3], sent[:3]))
    assert await client.quiet(0.5) == []
    client.close()


async def test_a_malformed_message_on_a_node_queue_is_dropped_and_the_node_keeps_delivering(cluster):
    port = cluster.node_ports[0]
    client = await cluster.connect("after-garbage", port)
    queue = node_queue(f"127.0.0.1:{port}")
    with Connection(cluster.env["BROKER_URL"]) as conn:
        producer = conn.Producer()
        producer.publish({"surprise": True}, exchange=queue.exchange, routing_key=queue.routing_key, declare=[queue], serializer="json")
        producer.publish("not even json", exchange=queue.exchange, routing_key=queue.routing_key, declare=[queue], content_type="application/json", content_encoding="utf-8")
        # a pickle is never unpickled (only JSON is accepted), whatever it holds
        producer.publish(b"\x80\x04K\x01.", exchange=queue.exchange, routing_key=queue.routing_key, declare=[queue],
                         content_type="application/x-python-serialize", content_encoding="binary")
    message_id = await cluster.collect("after-garbage", {"still": "works"})
    (frame,) = await client.messages(1)
    assert frame["id"] == message_id
    client.close()


async def test_a_delivery_with_bad_recipients_on_a_node_queue_does_not_take_the_good_ones_of_its_batch_with_it(cluster):
    """Well-formed task messages whose envelope names a user that is not a string, or whose replay
    count is not a number: the node dropped the whole batch they came in (a TypeError while writing
    it), good deliveries included.  Now each is refused alone as a malformed message."""
    port = cluster.node_ports[0]
    client = await cluster.connect("beside-bad-recipients", port)
    queue = node_queue(f"127.0.0.1:{port}")
    good = {"id": "018bcfe56800000001a1b2c3", "to": ["beside-bad-recipients"], "data": {"n": 1}}
    bad_live = {"id": "018bcfe56800000002a1b2c3", "to": [["beside-bad-recipients"]], "data": {"n": 2}}

    def deliver(envelopes, kwargs=None):
        return ([[envelopes], kwargs or {}, {"callbacks": None, "errbacks": None, "chain": None, "chord": None}],
                {"task": "wsnode.deliver", "id": f"t-{len(envelopes)}-{bool(kwargs)}", "lang": "py"})

    with Connection(cluster.env["BROKER_URL"]) as conn:
        producer = conn.Producer()
        for body, headers in (deliver([bad_live]), deliver([good], {"conn": client.hello["conn"], "replay": {"last": False, "count": None}}),
                              deliver([good])):
            producer.publish(body, headers=headers, exchange=queue.exchange, routing_key=queue.routing_key, declare=[queue], serializer="json")
    (frame,) = await client.messages(1)
    assert frame == {"type": "message", "id": good["id"], "data": good["data"]}
    assert await client.quiet() == []
    log = cluster._log(f"node-{port}").read_text(errors="replace")
    assert "a live envelope needs to: a list of user ids" in log and "replay must be an object whose count is a whole number" in log
    client.close()


async def test_items_of_the_redis_queues_that_are_not_messages_are_dropped_and_the_worker_and_node_go_on(tmp_path):
    """Something that is not a kombu message in the ``collect`` list or a node's list (pushed there
    by hand, or by a client of another protocol) once stopped the worker with "Unrecoverable error"."""
    redis_server = launcher.RedisServer(data_dir=tmp_path / "redis").start()
    cluster = Cluster(redis_server, tmp_path, auth_port=launcher.free_port())
    try:
        start_or_explain(cluster, nodes=1)
        port = cluster.node_ports[0]
        client = await cluster.connect("after-raw-garbage", port)
        broker = redis_lib.Redis.from_url(cluster.env["BROKER_URL"])
        for queue in ("collect", f"127.0.0.1:{port}"):
            # not JSON; JSON, not kombu's; kombu's, with a body its base64 encoding does not decode
            broker.lpush(queue, b"\xff\xfe not json", b'{"not": "kombu"}', json.dumps({
                "body": "abcde", "headers": {"task": "tasks.collect", "id": "x"},
                "properties": {"delivery_tag": "t", "body_encoding": "base64", "delivery_info": {"exchange": "", "routing_key": queue}}}))
        ids = [await cluster.collect("after-raw-garbage", {"n": n}, timeout=30) for n in range(3)]
        frames = await client.messages(3, timeout=30)
        assert [f["id"] for f in frames] == ids
        assert all(service.alive for service in cluster.services)  # the worker, auth and the node
        for log_name, queue in (("worker", "collect"), (f"node-{port}", f"127.0.0.1:{port}")):
            deadline = time.monotonic() + 10
            while (text := cluster._log(log_name).read_text(errors="replace")).count(f"dropped an item of queue {queue!r}") < 3 and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
            assert text.count(f"dropped an item of queue {queue!r} that is not a kombu message") == 3, log_name
        client.close()
    finally:
        cluster.stop(at_once=True)
        redis_server.stop()


def hand_built(task_id: str, kwargs: dict, task: str = "tasks.collect", args: list | None = None, **fields) -> str:
    """A Celery protocol 2 message as a producer that is not Celery pushes it onto a queue's Redis
    list: kombu's envelope without its bookkeeping (no ``delivery_tag``, no ``delivery_info``);
    ``fields`` replace the envelope's."""
    body = base64.b64encode(json.dumps([args or [], kwargs, {"callbacks": None, "errbacks": None, "chain": None, "chord": None}]).encode()).decode()
    return json.dumps({"body": body, "content-type": "application/json", "content-encoding": "utf-8",
                       "headers": {"lang": "py", "task": task, "id": task_id, "root_id": task_id, "parent_id": None, "group": None},
                       "properties": {"correlation_id": task_id, "body_encoding": "base64"}, **fields})


@pytest.mark.parametrize("fault_cluster", ["redis"], indirect=True)
async def test_a_celery_message_pushed_without_kombus_delivery_tag_and_delivery_info_runs_and_its_result_is_read(fault_cluster):
    """A producer that is not Celery (a hand-built ``LPUSH``) pushes a valid Celery message without
    kombu's bookkeeping properties: it was dropped as "not a kombu message", with no result, and its
    caller waited for ever.  The transport now supplies them as it reads it, on the worker's queues
    (several in a row, behind each other, and beside Celery's own messages) and on a node's."""
    cluster = fault_cluster
    port = cluster.node_ports[0]
    client = await cluster.connect("hand-built", port)
    broker = redis_lib.Redis.from_url(cluster.env["BROKER_URL"])
    task_ids = [f"hand-built-{n}-{uuid.uuid4()}" for n in range(3)]
    broker.lpush("collect", hand_built(task_ids[0], {"to": "hand-built", "data": 0}),
                 # properties null, and its body as JSON text (no body_encoding)
                 hand_built(task_ids[1], {"to": "hand-built", "data": 1}, properties=None,
                            body=json.dumps([[], {"to": "hand-built", "data": 1}, {"callbacks": None, "errbacks": None, "chain": None, "chord": None}])),
                 hand_built(task_ids[2], {"to": "hand-built", "data": 2}, properties={"body_encoding": "base64", "delivery_info": {"priority": 0}}))
    ids = [await cluster.result(cluster.business.AsyncResult(task_id), timeout=30) for task_id in task_ids]
    ids.append(await cluster.collect("hand-built", 3, timeout=30))
    frames = await client.messages(4, timeout=30)
    assert sorted((frame["id"], frame["data"]) for frame in frames) == sorted(zip(ids, range(4)))

    # a node's queue, read without acknowledgements: a hand-built wsnode.deliver is delivered too
    envelope = {"id": "018bcfe56800000003a1b2c3", "to": ["hand-built"], "data": {"n": 4}}
    broker.lpush(f"127.0.0.1:{port}", hand_built(f"deliver-{uuid.uuid4()}", {}, task="wsnode.deliver", args=[[envelope]]))
    (frame,) = await client.messages(1, timeout=30)
    assert frame == {"type": "message", "id": envelope["id"], "data": envelope["data"]}
    for log_name in ("worker", f"node-{port}"):
        assert "not a kombu message" not in cluster._log(log_name).read_text(errors="replace"), log_name
    client.close()


@pytest.mark.parametrize("fault_cluster", ["redis"], indirect=True)
async def test_an_item_that_cannot_be_delivered_but_names_a_task_id_fails_that_task_saying_what_to_push(fault_cluster):
    """An item of the ``collect`` list that is no message the worker can read (no body, a body
    that is not the base64 it says, headers that are not an object, a tag that is not a string)
    was dropped with no result: its caller waited for ever.  Where it names a task id (its
    headers', or its protocol 1 body's), that task now fails, saying what was wrong and what to
    push; the worker goes on."""
    cluster = fault_cluster
    broker = redis_lib.Redis.from_url(cluster.env["BROKER_URL"])
    task_ids = [str(uuid.uuid4()) for _ in range(4)]
    protocol_1 = base64.b64encode(json.dumps({"task": "tasks.collect", "id": task_ids[3], "args": [], "kwargs": {}}).encode()).decode()
    cases = [({"body": None}, "it has no body"),
             ({"body": "abcde"}, "its body is not valid base64, which its body_encoding says it is"),
             ({"properties": {"body_encoding": "base64", "delivery_tag": 7}}, "its properties' delivery_tag is of type int, not a string"),
             ({"headers": ["x"], "body": protocol_1}, "its headers are of type list, not an object")]  # its id in its protocol 1 body
    for task_id, (fields, _) in zip(task_ids, cases, strict=True):
        broker.lpush("collect", hand_built(task_id, {"to": "x", "data": 0}, **fields))
    for task_id, (_, said) in zip(task_ids, cases, strict=True):
        with pytest.raises(Exception, match=re.escape(f"not run: the item pushed to queue 'collect' is not a message the worker can read: {said}; push")):
            await cluster.result(cluster.business.AsyncResult(task_id), timeout=30)
    assert await cluster.collect("after-undeliverable", 1, timeout=30)
    assert cluster.worker.alive
    assert "Unrecoverable error" not in cluster._log("worker").read_text(errors="replace")


#: Headers Celery reads as the request is built or checked for revocation, in the worker's main
#: process, with (what it says) when they are not what Celery sends.
STAMP_AND_SHADOW_HEADERS = [
    ({"stamped_headers": 5, "stamps": {}}, "its stamped_headers header is 5, not a list of header names"),
    ({"stamped_headers": [["a"]], "stamps": {}}, "its stamped_headers header is [['a']], not a list of header names"),
    ({"stamped_headers": ["a"], "stamps": "a"}, "its stamps header is 'a', not an object"),
    ({"shadow": ["a"]}, "its shadow (the task name to show) is of type list"),
]


@pytest.mark.parametrize("fault_cluster", ["redis"], indirect=True)
async def test_stamp_and_shadow_headers_that_are_not_celerys_fail_their_task_and_the_worker_goes_on(fault_cluster):
    """A ``stamped_headers`` header that is not a list of names, ``stamps`` that is not an object,
    or a ``shadow`` name that is not a string (in a message made by hand or by another client)
    raised out of the worker's loop and stopped it ("Unrecoverable error"); on the Redis broker
    the message went back to its queue and stopped every worker started after it."""
    cluster = fault_cluster
    client = await cluster.connect("after-bad-stamps")
    bad, says = [], []
    with Connection(cluster.env["BROKER_URL"]) as conn:
        producer = conn.Producer()
        for queue, task, body in (("collect", "tasks.collect", [[], {"to": "after-bad-stamps", "data": 0}, {}]),
                                  ("dispatch", "tasks.status", [["0" * 24], {}, {}])):
            for headers, said in STAMP_AND_SHADOW_HEADERS:
                bad.append(str(uuid.uuid4()))
                producer.publish(body, exchange="", routing_key=queue, serializer="json", headers={"task": task, "id": bad[-1], "lang": "py", **headers})
                says.append(f"not a Celery task message: {said}")
    message_id = await cluster.collect("after-bad-stamps", {"n": 1}, timeout=30)
    assert [frame["id"] for frame in await client.messages(1, timeout=30)] == [message_id]
    for task_id, said in zip(bad, says, strict=True):
        with pytest.raises(Exception, match=re.escape(said)):
            await cluster.result(cluster.business.AsyncResult(task_id), timeout=30)
    assert cluster.worker.alive
    assert "Unrecoverable error" not in cluster._log("worker").read_text(errors="replace")
    client.close()


@pytest.mark.parametrize("fault_cluster", ["redis"], indirect=True)
async def test_a_task_id_that_is_not_valid_unicode_fails_alone_and_its_batch_mates_are_delivered(fault_cluster):
    """JSON's \\ud800 escapes carry a lone surrogate in a task id, which stock Celery sends: the
    batch stored its requests under keys made of their task ids, and that one key failed every
    request of the batch with UnicodeEncodeError (nothing stored or sent, the callers with
    ``ignore_result`` never told)."""
    cluster = fault_cluster
    client = await cluster.connect("beside-a-bad-id")
    with cluster.business.producer_or_acquire() as producer:
        good = [cluster.business.send_task("tasks.collect", kwargs={"to": "beside-a-bad-id", "data": n}, queue="collect", producer=producer) for n in range(3)]
        # As send_task sends it, without the AsyncResult, whose clean-up cannot encode the id either.
        amqp = cluster.business.amqp
        amqp.send_task_message(producer, "tasks.collect", amqp.create_task_message("bad-\ud800", "tasks.collect", [], {"to": "beside-a-bad-id", "data": "bad"}),
                               queue=amqp.queues["collect"])
        good += [cluster.business.send_task("tasks.collect", kwargs={"to": "beside-a-bad-id", "data": n}, queue="collect", producer=producer) for n in range(3, 6)]
    ids = [await cluster.result(result, timeout=30) for result in good]

    assert [(frame["id"], frame["data"]) for frame in await client.messages(6, timeout=30)] == list(zip(ids, range(6)))
    assert not await client.quiet(1.0)
    await asyncio.to_thread(cluster.worker.wait_log, "its id is not valid Unicode", 20)
    assert cluster.worker.alive
    client.close()


@pytest.mark.parametrize("fault_cluster", ["redis"], indirect=True)
async def test_a_task_id_or_argument_name_with_a_line_break_writes_no_line_of_its_own_into_the_workers_log(fault_cluster):
    """Task ids come from business code (a ``task_id`` of its own, to retry safely), and the
    worker logs them, with the names of unexpected arguments: one holding a line break wrote a
    line of its own, with any level and time."""
    cluster = fault_cluster
    forged = "[2026-12-06 22:00:00,000: ERROR/MainProcess] FORGED"
    client = await cluster.connect("beside-a-forged-id")
    with cluster.business.producer_or_acquire() as producer:
        amqp = cluster.business.amqp
        amqp.send_task_message(producer, "tasks.collect", amqp.create_task_message(f"req-1\n{forged} by id", "tasks.collect", [], {"to": "beside-a-forged-id", "data": "bad"}),
                               queue=amqp.queues["collect"])
        by_name = cluster.business.send_task("tasks.collect", kwargs={"to": "beside-a-forged-id", "data": 1, f"x\n{forged} by name": 1}, queue="collect", producer=producer)
        good = cluster.business.send_task("tasks.collect", kwargs={"to": "beside-a-forged-id", "data": 2}, queue="collect", producer=producer)
    message_id = await cluster.result(good, timeout=30)
    with pytest.raises(Exception, match="unexpected argument"):
        await cluster.result(by_name, timeout=30)

    assert [(frame["id"], frame["data"]) for frame in await client.messages(1, timeout=30)] == [(message_id, 2)]
    await asyncio.to_thread(cluster.worker.wait_log, "its id holds the control character '\\n'", 20)
    assert not any(line.lstrip().startswith(forged) for line in cluster.worker.log_tail(400).splitlines()), cluster.worker.log_tail(40)
    client.close()


@pytest.mark.parametrize("fault_cluster", ["redis"], indirect=True)
async def test_protocol_1_messages_whose_own_headers_celery_cannot_read_fail_alone_and_the_worker_goes_on(fault_cluster):
    """A protocol 1 message (the task's fields in its body) whose headers Celery lets override
    those fields: a ``timelimit`` of 5 or a list as ``shadow`` raised out of the worker's loop and
    stopped it ("Unrecoverable error"); a ``retries`` of ``"x"`` failed every request of its batch."""
    cluster = fault_cluster
    client = await cluster.connect("after-bad-p1-headers")
    cases = [("dispatch", "tasks.status", [["0" * 24], {}], {"timelimit": 5}, "its timelimit header is 5"),
             ("dispatch", "tasks.status", [["0" * 24], {}], {"shadow": ["x"]}, "its shadow (the task name to show) is of type list"),
             ("collect", "tasks.collect", [[], {"to": "after-bad-p1-headers", "data": 1}], {"shadow": ["x"]}, "its shadow (the task name to show) is of type list"),
             ("collect", "tasks.collect", [[], {"to": "after-bad-p1-headers", "data": 2}], {"retries": "x"}, "its retries header is 'x'")]
    bad = []
    with Connection(cluster.env["BROKER_URL"]) as conn:
        producer = conn.Producer()
        for queue, task, (args, kwargs), headers, _ in cases:
            bad.append(str(uuid.uuid4()))
            producer.publish({"task": task, "id": bad[-1], "args": args, "kwargs": kwargs}, exchange="", routing_key=queue, serializer="json", headers=headers)
    message_id = await cluster.collect("after-bad-p1-headers", {"n": 3}, timeout=30)

    assert [frame["id"] for frame in await client.messages(1, timeout=30)] == [message_id]
    for task_id, (*_, said) in zip(bad, cases, strict=True):
        with pytest.raises(Exception, match=re.escape(f"not a Celery task message: {said}")):
            await cluster.result(cluster.business.AsyncResult(task_id), timeout=30)
    assert cluster.worker.alive
    assert "Unrecoverable error" not in cluster._log("worker").read_text(errors="replace")
    client.close()


@pytest.mark.parametrize("fault_cluster", ["redis"], indirect=True)
async def test_items_in_kombus_format_with_headers_or_a_content_type_kombu_cannot_read_are_dropped_and_the_worker_goes_on(fault_cluster):
    """Items of a Redis queue in kombu's format whose headers are not an object, or whose content
    type or encoding is not a string, raised in kombu's Message and decoder, out of the worker's
    loop ("Unrecoverable error"); the worker put them back as it stopped, so every worker started
    after it stopped too."""
    cluster = fault_cluster
    port = cluster.node_ports[0]
    client = await cluster.connect("after-bad-envelopes", port)
    broker = redis_lib.Redis.from_url(cluster.env["BROKER_URL"])
    body = base64.b64encode(json.dumps([[], {"to": "after-bad-envelopes", "data": 0}, {}]).encode()).decode()
    bad = [{"headers": ["tasks.collect"]}, {"content-encoding": 5}, {"content-type": ["application/json"]}]
    for queue in ("collect", f"127.0.0.1:{port}"):
        for n, fields in enumerate(bad):
            item = {"body": body, "content-type": "application/json", "content-encoding": "utf-8",
                    "headers": {"task": "tasks.collect", "id": f"bad-envelope-{n}", "lang": "py"},
                    "properties": {"delivery_tag": f"bad-envelope-{queue}-{n}", "body_encoding": "base64",
                                   "delivery_info": {"exchange": "", "routing_key": queue}}}
            broker.lpush(queue, json.dumps({**item, **fields}))
    ids = [await cluster.collect("after-bad-envelopes", {"n": n}, timeout=30) for n in range(2)]
    assert [frame["id"] for frame in await client.messages(2, timeout=30)] == ids
    assert all(service.alive for service in cluster.services)
    for log_name, queue in (("worker", "collect"), (f"node-{port}", f"127.0.0.1:{port}")):
        deadline = time.monotonic() + 10
        while (text := cluster._log(log_name).read_text(errors="replace")).count(f"dropped an item of queue {queue!r}") < len(bad) and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        assert text.count(f"dropped an item of queue {queue!r} that is not a kombu message") == len(bad), log_name
    assert "Unrecoverable error" not in cluster._log("worker").read_text(errors="replace")
    client.close()


def verifications(auth_port: int) -> float:
    """How many tokens auth has answered ``POST /verify`` about, whatever the answer."""
    return sum(count for (name, _), count in scrape(auth_port).items() if name == "auth_verifications_total")


@pytest.mark.parametrize("cluster", ["redis"], indirect=True)  # node-side only: one broker is enough
async def test_a_handshake_from_an_origin_not_in_allowed_origins_gets_403_and_an_allowed_one_connects(cluster):
    """``ALLOWED_ORIGINS`` as written by hand (capitals, the scheme's default port) still lets its
    browsers in, in whatever case a client writes the origin, and refuses any other origin."""
    node = cluster.start_node(ALLOWED_ORIGINS="https://App.Example.com:443,http://localhost:3000")
    token = await asyncio.to_thread(cluster.token, "origin-user")

    async def handshake(origin: str | None, **headers: str):
        request = tornado.httpclient.HTTPRequest(cluster.ws_url(node.port, token), headers={**({"Origin": origin} if origin else {}), **headers})
        return await tornado.websocket.websocket_connect(request)

    verified_before = await asyncio.to_thread(verifications, cluster.auth_port)
    refused_before = value(await asyncio.to_thread(scrape, node.port), "push_node_rejected_connections_total", code="403")
    with pytest.raises(tornado.httpclient.HTTPClientError) as refused:
        await handshake("https://evil.example")
    assert refused.value.code == 403
    # Tornado refuses this one without asking check_origin: it went uncounted and unlogged.
    with pytest.raises(tornado.httpclient.HTTPClientError) as refused:
        await handshake(None, **{"Sec-Fetch-Site": "cross-site"})
    assert refused.value.code == 403
    # Refused before their token was checked: the node did not ask auth about them.
    assert await asyncio.to_thread(verifications, cluster.auth_port) == verified_before
    assert value(await asyncio.to_thread(scrape, node.port), "push_node_rejected_connections_total", code="403") == refused_before + 2
    for origin in ("https://app.example.com", "HTTPS://APP.example.com", "http://localhost:3000"):
        connection = await handshake(origin)
        assert json.loads(await connection.read_message())["type"] == "hello", origin
        connection.close()

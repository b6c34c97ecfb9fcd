"""Delivery guarantees on the shared cluster (both brokers): the inbox, redelivery, receipts and
status, and idempotent collect."""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest

from tasks.ids import IdGenerator
from tasks.store import Store
from tests.integration.conftest import HOUSEKEEPING_SECONDS, REDELIVER_AFTER, REDELIVER_ATTEMPTS


def unique(name: str) -> str:
    return f"{name}-{uuid.uuid4().hex[:6]}"


async def wait_for(check, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if result := await asyncio.to_thread(check):
            return result
        await asyncio.sleep(0.2)
    raise AssertionError(f"not within {timeout} s: {what}")


async def test_connecting_without_since_delivers_every_message_no_device_acked_in_order(cluster):
    user = unique("inbox")
    sent = [await cluster.collect(user, {"n": n}) for n in range(3)]  # the user is offline
    first = await cluster.connect(user)
    assert [m["id"] for m in first.inbox] == sent
    first.close()
    await wait_for(lambda: all("acked" in cluster.status(i)["recipients"][user] for i in sent), 10, "acks recorded")

    again = await cluster.connect(user)
    assert again.inbox == [], "acked messages are not in the inbox any more"
    again.close()


async def test_a_message_acked_on_one_device_is_not_in_another_devices_inbox(cluster):
    user = unique("two-phones")
    phone = await cluster.connect(user)
    message_id = await cluster.collect(user, "hello")
    assert (await phone.messages(1))[0]["id"] == message_id
    await wait_for(lambda: "acked" in cluster.status(message_id)["recipients"][user], 10, "ack recorded")
    tablet = await cluster.connect(user, cluster.node_ports[1])
    assert tablet.inbox == []
    phone.close()
    tablet.close()


async def test_one_ack_frame_of_several_ids_records_each_as_acked(cluster):
    """What push.js sends for the message frames one read brought, where hello says ``ack_ids``."""
    user = unique("batch-acker")
    phone = await cluster.connect(user, auto_ack=False)
    assert phone.hello["ack_ids"] == 145  # as many as fit in MAX_FRAME_BYTES, 4096 here
    sent = [await cluster.collect(user, {"n": n}) for n in range(3)]
    assert [f["id"] for f in await phone.messages(3)] == sent
    await phone.send({"type": "ack", "ids": sent})
    await wait_for(lambda: all("acked" in cluster.status(m)["recipients"][user] for m in sent), 10, "every ack of the frame recorded")
    tablet = await cluster.connect(user, cluster.node_ports[1])
    assert tablet.inbox == [] and phone.ws.close_code is None
    phone.close()
    tablet.close()


async def test_a_device_that_left_before_its_first_message_gets_what_another_device_acked_meanwhile(cluster):
    """The tablet connects, gets no message and leaves; the phone gets one and acks it; the tablet
    comes back.  Without ``since`` it got the inbox only, which no longer holds the phone's acked
    message: it never got it.  It resumes from its first ``resumed`` frame's cursor instead."""
    user = unique("left-early")
    tablet = await cluster.connect(user, cluster.node_ports[1])
    cursor = tablet.resumed.get("cursor")
    assert tablet.inbox == [] and isinstance(cursor, str), tablet.resumed
    tablet.close()
    phone = await cluster.connect(user)
    message_id = await cluster.collect(user, "while the tablet was away")
    assert (await phone.messages(1))[0]["id"] == message_id
    await wait_for(lambda: "acked" in cluster.status(message_id)["recipients"][user], 10, "ack recorded")
    back = await cluster.connect(user, cluster.node_ports[1], since=cursor)
    assert [m["id"] for m in await back.messages(1)] == [message_id]
    phone.close()
    back.close()


async def test_a_message_lost_before_dispatch_still_reaches_a_user_who_stays_online(cluster):
    user = unique("online")
    client = await cluster.connect(user)
    lost = {"id": IdGenerator().next_id(), "to": [user], "data": {"lost": "in transit"}}
    await asyncio.to_thread(lambda: Store.open().insert_messages([lost]))  # stored, never dispatched
    (frame,) = await client.messages(1, timeout=REDELIVER_AFTER + 4 * HOUSEKEEPING_SECONDS + 5)
    assert frame["id"] == lost["id"] and frame["data"] == {"lost": "in transit"}
    client.close()


async def test_an_unacked_message_is_redelivered_a_bounded_number_of_times(cluster):
    user = unique("never-acks")
    client = await cluster.connect(user, auto_ack=False)
    message_id = await cluster.collect(user, "ack me")
    last_threshold = REDELIVER_AFTER * 2 ** (REDELIVER_ATTEMPTS - 1)
    frames = await client.messages(1 + REDELIVER_ATTEMPTS, timeout=last_threshold + 4 * HOUSEKEEPING_SECONDS + 5)
    assert {f["id"] for f in frames} == {message_id}
    assert await client.quiet(REDELIVER_AFTER + 2 * HOUSEKEEPING_SECONDS) == [], "redelivered more often than REDELIVER_ATTEMPTS"
    client.close()


async def test_status_reports_when_a_message_was_routed_written_and_acked(cluster):
    user = unique("tracked")
    client = await cluster.connect(user)
    message_id = await cluster.collect([user, "tracked-offline"], {"track": True})
    await client.messages(1)

    status = await wait_for(lambda: (s := cluster.status(message_id))["recipients"][user].keys() >= {"routed", "written", "acked"} and s, 10, "all receipts")
    times = status["recipients"][user]
    assert status["found"] is True and status["to"] == [user, "tracked-offline"]
    assert status["collected_at"] <= times["routed"] <= times["written"] <= times["acked"]
    assert status["recipients"]["tracked-offline"] == {}
    client.close()


async def test_status_of_an_unknown_id_says_not_found(cluster):
    assert await asyncio.to_thread(cluster.status, "0" * 24) == {"id": "0" * 24, "found": False}


async def test_collect_with_the_same_key_returns_the_same_id_and_delivers_once(cluster):
    user = unique("keyed")
    client = await cluster.connect(user)
    key = unique("order")
    first = await asyncio.to_thread(cluster.send(to=user, data={"try": 1}, key=key).get, timeout=20)
    second = await asyncio.to_thread(cluster.send(to=user, data={"try": 2}, key=key).get, timeout=20)
    assert first == second
    frames = await client.messages(1) + await client.quiet(1.0)
    # The second call sends the stored message again (clients drop the repeat by id), never the new data.
    assert {f["id"] for f in frames} == {first}
    assert all(f["data"] == {"try": 1} for f in frames)
    client.close()


@pytest.mark.parametrize("cluster", ["redis"], indirect=True)
async def test_a_key_reused_for_other_data_is_logged_by_the_worker_and_a_retry_of_the_same_message_is_not(cluster):
    """The second message under a used key is never stored or sent (its call returns the first
    id): the worker says so, naming the key and the message sent instead; a retry is silent."""
    user, key = unique("rekeyed"), unique("order")
    first = await asyncio.to_thread(cluster.send(to=user, data={"v": 1}, key=key).get, timeout=20)
    retry = await asyncio.to_thread(cluster.send(to=[user], data={"v": 1}, key=key).get, timeout=20)
    other = await asyncio.to_thread(cluster.send(to=user, data={"v": 2}, key=key).get, timeout=20)
    assert first == retry == other
    log = cluster._log("worker")
    warning = f"key {key!r} was used before for message {first}, to other recipients or with other data"
    await wait_for(lambda: warning in log.read_text(errors="replace"), 10, "the worker's warning")
    assert log.read_text(errors="replace").count(warning) == 1  # the retry of the same message logged nothing

"""The message path end to end on real processes: business task -> worker -> node queue -> browser."""

from __future__ import annotations

import asyncio
import time

from tasks.ids import IdGenerator
from tasks.store import Store
from tests.integration.wsclient import dedup

USERS = 120
PER_USER = 5


async def test_each_of_120_users_across_two_nodes_gets_exactly_its_own_messages_in_order(cluster):
    users = [f"crowd-{i}" for i in range(USERS)]
    clients = await asyncio.gather(*(cluster.connect(u, cluster.node_ports[i % 2]) for i, u in enumerate(users)))
    assert {c.hello["node"] for c in clients} == {f"127.0.0.1:{p}" for p in cluster.node_ports}

    # The clients read (and ack) each message as it comes, as browsers do, while the tasks are
    # sent: a client that read nothing until every collect had returned (several seconds on a
    # loaded machine) got the batch's messages again once REDELIVER_AFTER (4 s) passed unacked.
    receiving = asyncio.gather(*(c.messages(PER_USER + 1, timeout=60) for c in clients))
    try:
        # One batch task carrying every user's sequence, then one per-message task per user.
        batch = [{"to": u, "data": {"user": u, "n": n}} for n in range(PER_USER) for u in users]
        ids = await cluster.collect_many(batch)
        assert all(isinstance(i, str) for i in ids) and len(set(ids)) == len(batch)
        singles = await asyncio.gather(*(cluster.collect(u, {"user": u, "n": PER_USER}) for u in users))
        received = await receiving
    finally:
        receiving.cancel()
    for user, client, frames in zip(users, clients, received):
        assert [f["data"] for f in frames] == [{"user": user, "n": n} for n in range(PER_USER + 1)]
    extras = await asyncio.gather(*(c.quiet(0.5) for c in clients))
    # On a loaded machine an ack can come after REDELIVER_AFTER (4 s here), and housekeeping sends
    # the message again (at least once: a client drops an id it has seen).  Nothing else may come.
    for user, frames, more in zip(users, received, extras):
        assert all(f["data"]["user"] == user and f["id"] in {g["id"] for g in frames} for f in more), \
            f"{user} received messages that were not addressed to them, or new ones: {more}"
    assert [f["id"] for f in received[0]] == sorted(f["id"] for f in received[0])
    assert singles[0] in {f["id"] for f in received[0]}
    for c in clients:
        c.close()


async def test_one_sender_mixing_collect_and_collect_many_without_waiting_keeps_each_users_order(cluster):
    """Messages to one user arrive in the order they were collected, whichever task carried them:
    one business process sends ``tasks.collect`` and ``tasks.collect_many`` interleaved, without
    waiting for any result, and each user gets its messages in the order sent (the worker reads
    them in that order, and a request waits for the other task's earlier requests of its users)."""
    users = [f"mixed-{i}" for i in range(4)]
    expected: dict[str, list[int]] = {u: [] for u in users}
    sends = []  # (task, kwargs) in send order
    for n in range(90):
        if n % 3 == 2:
            sends.append(("tasks.collect_many", {"messages": [{"to": u, "data": n} for u in users[n % 2::2]]}))
            for u in users[n % 2::2]:
                expected[u].append(n)
        else:
            user = users[n % len(users)]
            sends.append(("tasks.collect", {"to": user, "data": n}))
            expected[user].append(n)
    clients = await asyncio.gather(*(cluster.connect(u, cluster.node_ports[i % 2]) for i, u in enumerate(users)))
    receiving = asyncio.gather(*(c.messages(len(expected[u]), timeout=60) for u, c in zip(users, clients)))
    try:
        results = [cluster.send(task, **kwargs) for task, kwargs in sends]
        for result in results:
            await cluster.result(result, timeout=60)
        received = await receiving
    finally:
        receiving.cancel()
    for user, frames in zip(users, received):
        assert [f["data"] for f in frames] == expected[user], user
    assert not any(await asyncio.gather(*(c.quiet(0.3) for c in clients)))
    for c in clients:
        c.close()


async def test_a_user_with_devices_on_both_nodes_gets_every_message_on_each(cluster):
    phone = await cluster.connect("two-devices", cluster.node_ports[0])
    laptop = await cluster.connect("two-devices", cluster.node_ports[1])
    sent = [await cluster.collect("two-devices", {"n": n}) for n in range(3)]
    for device in (phone, laptop):
        assert [f["id"] for f in await device.messages(3)] == sent
    phone.close()
    laptop.close()


async def test_a_list_of_recipients_reaches_each_listed_user_and_no_one_else(cluster):
    a = await cluster.connect("list-a", cluster.node_ports[0])
    b = await cluster.connect("list-b", cluster.node_ports[1])
    outsider = await cluster.connect("list-outsider", cluster.node_ports[0])
    message_id = await cluster.collect(["list-a", "list-b", "list-offline"], {"to": "list"})
    for client in (a, b):
        (frame,) = await client.messages(1)
        assert frame == {"type": "message", "id": message_id, "data": {"to": "list"}}
    assert await outsider.quiet() == []
    for c in (a, b, outsider):
        c.close()


async def test_a_broadcast_reaches_every_user_online_on_both_nodes(cluster):
    clients = [await cluster.connect(f"everyone-{i}", cluster.node_ports[i % 2]) for i in range(4)]
    message_id = await cluster.collect("*", {"all": True})
    for client in clients:
        frames = [f for f in await client.messages(1)]
        assert frames[0]["id"] == message_id
    for c in clients:
        c.close()


async def test_collect_returns_the_id_the_browser_receives(cluster):
    client = await cluster.connect("id-check")
    message_id = await cluster.collect("id-check", "plain string data")
    (frame,) = await client.messages(1)
    assert frame["id"] == message_id and frame["data"] == "plain string data"
    client.close()


async def test_a_collect_sent_with_ignore_result_is_delivered_and_leaves_no_result(cluster):
    client = await cluster.connect("no-result")
    ignored = cluster.business.send_task("tasks.collect", kwargs={"to": "no-result", "data": {"n": 1}}, queue="collect", ignore_result=True)
    kept = cluster.send(to="no-result", data={"n": 2})
    kept_id = await cluster.result(kept, 20)
    frames = await client.messages(2)
    assert [f["data"] for f in frames] == [{"n": 1}, {"n": 2}] and frames[1]["id"] == kept_id
    await asyncio.sleep(0.5)  # a result stored late would be there by now
    backend = cluster.business.backend
    assert backend.client.exists(backend.get_key_for_task(kept.id)), "a result is stored where it is asked for"
    assert not backend.client.exists(backend.get_key_for_task(ignored.id))
    client.close()


async def test_resume_with_since_delivers_what_was_missed_in_order_then_live_messages(cluster):
    client = await cluster.connect("resumer", cluster.node_ports[0])
    first = await cluster.collect("resumer", {"n": 0})
    assert (await client.messages(1))[0]["id"] == first
    client.close()
    missed = [await cluster.collect("resumer", {"n": n}) for n in range(1, 6)]

    back = await cluster.connect("resumer", cluster.node_ports[1], since=first)
    frames, resumed = await back.until("resumed")
    assert resumed["since"] == first and resumed["truncated"] is False
    # The replay starts RESUME_OVERLAP_MS before `since`, so it may repeat `first` and broadcasts.
    assert [f["id"] for f in dedup(frames) if f["id"] != first and "n" in f["data"]] == missed
    live = await cluster.collect("resumer", {"n": 6})
    assert [f["id"] for f in await back.messages(1)] == [live]
    back.close()


async def test_a_resume_from_before_the_retention_says_truncated_with_what_is_still_stored(cluster):
    """Messages older than ``RETENTION_SECONDS`` may be purged: a resume from further back cannot
    know what it misses, so its ``resumed`` frame says ``truncated``, though it found few messages."""
    stored = await cluster.collect("back-after-days", {"n": 1})
    days_ago = IdGenerator(clock=lambda: time.time() - 3 * 86_400).next_id()  # the cluster keeps messages a day (the default)
    back = await cluster.connect("back-after-days", cluster.node_ports[0], since=days_ago)
    frames, resumed = await back.until("resumed")
    assert resumed["since"] == days_ago and resumed["truncated"] is True
    assert stored in [f["id"] for f in frames]
    back.close()


async def test_messages_collected_while_a_resume_runs_are_neither_lost_nor_out_of_order(cluster):
    client = await cluster.connect("racer")
    first = await cluster.collect("racer", {"n": 0})
    await client.messages(1)
    client.close()
    before = [await cluster.collect("racer", {"n": n}) for n in range(1, 20)]

    async def stream():
        return [await cluster.collect("racer", {"n": n}) for n in range(20, 60)]

    streaming = asyncio.create_task(stream())
    await asyncio.sleep(0.05)
    back = await cluster.connect("racer", since=first)
    during = await streaming
    frames = await back.messages(len(before) + len(during), timeout=30)
    frames += [f for f in await back.quiet(1.0) if f["type"] == "message"]
    seen = [f["id"] for f in dedup(frames) if f["id"] != first and "n" in f["data"]]
    assert seen == before + during
    back.close()


async def test_acks_are_recorded_as_receipts_in_the_store(cluster):
    client = await cluster.connect("acker")
    message_id = await cluster.collect("acker", {"ack": "me"})
    (frame,) = await client.messages(1)
    await client.send({"type": "ack", "id": frame["id"]})
    assert await client.quiet(0.3) == [], "an ack frame is answered with nothing"
    store = Store.open()  # the worker's store: the same DATA_DIR (or MONGO_URL) as this process
    for _ in range(50):
        if store.not_acked([(message_id, "acker")]) == []:
            break
        await asyncio.sleep(0.1)
    else:
        raise AssertionError("the ack was not recorded within 5 s")
    client.close()

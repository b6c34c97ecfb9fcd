"""Links, errbacks, chains and chords on ``tasks.collect`` and ``tasks.collect_many``, on a real worker:
what follows a collect runs as it would after any Celery task (``tasks/links.py``), though the
collect tasks run in batches.  Business code here knows the tasks by name only; the followers are
Celery's built-in ``celery.accumulate`` (returns its arguments) and ``tasks.status``."""

from __future__ import annotations

import asyncio

from celery import chain, chord

from tasks.ids import is_message_id


def followed(cluster, name: str, **options):
    """A signature of ``name`` on the business app, with its task id fixed now, so the test can
    wait for its result."""
    sig = cluster.business.signature(name, **options)
    sig.freeze()
    return sig


async def test_a_link_on_collect_runs_with_the_message_id(cluster):
    client = await cluster.connect("linked")
    link = followed(cluster, "celery.accumulate", queue="collect")
    sent = cluster.business.send_task("tasks.collect", kwargs={"to": "linked", "data": 1}, queue="collect", link=link)
    message_id = await cluster.result(sent, 20)
    assert is_message_id(message_id)
    assert await cluster.result(cluster.business.AsyncResult(link.id), 20) == [message_id]
    assert (await client.messages(1))[0]["id"] == message_id
    client.close()


async def test_a_link_runs_when_the_caller_ignores_the_collects_result(cluster):
    link = followed(cluster, "celery.accumulate", queue="collect")
    sent = cluster.business.send_task("tasks.collect", kwargs={"to": "nobody-here", "data": 1}, queue="collect", link=link, ignore_result=True)
    (message_id,) = await cluster.result(cluster.business.AsyncResult(link.id), 20)
    assert is_message_id(message_id)
    backend = cluster.business.backend
    assert not backend.client.exists(backend.get_key_for_task(sent.id))


async def test_a_link_on_collect_many_runs_with_the_list_of_ids(cluster):
    link = followed(cluster, "celery.accumulate", queue="collect")
    sent = cluster.business.send_task("tasks.collect_many", kwargs={"messages": [{"to": "a", "data": 1}, {"to": "b"}]}, queue="collect", link=link)
    ids = await cluster.result(sent, 20)
    assert is_message_id(ids[0]) and ids[1]["index"] == 1
    assert await cluster.result(cluster.business.AsyncResult(link.id), 20) == [ids]


async def test_a_chain_from_collect_to_status_gives_the_messages_status(cluster):
    client = await cluster.connect("chained")
    app = cluster.business
    steps = chain(app.signature("tasks.collect", kwargs={"to": "chained", "data": "x"}, queue="collect"),
                  app.signature("tasks.status", queue="dispatch"))
    status = await cluster.result(steps.apply_async(), 20)
    frame = (await client.messages(1))[0]
    assert status["id"] == frame["id"] and status["found"] is True and status["to"] == ["chained"]
    client.close()


async def test_a_link_error_on_an_invalid_collect_runs_with_its_task_id_and_the_link_does_not(cluster):
    link = followed(cluster, "celery.accumulate", queue="collect")
    errback = followed(cluster, "celery.accumulate", queue="collect")
    sent = cluster.business.send_task("tasks.collect", kwargs={"to": [], "data": 1}, queue="collect", link=link, link_error=errback)
    # An errback whose task takes one argument is sent the failed task's id, as Celery does.
    assert await cluster.result(cluster.business.AsyncResult(errback.id), 20) == [sent.id]
    assert sent.failed()
    assert cluster.business.AsyncResult(link.id).state == "PENDING"


async def test_a_chain_whose_collect_fails_marks_its_next_task_failed(cluster):
    app = cluster.business
    result = chain(app.signature("tasks.collect", kwargs={"to": [], "data": 1}, queue="collect"),
                   app.signature("tasks.status", queue="dispatch")).apply_async()
    # The chain's result is its last task's.  Read it alone (without its parent, whose failure
    # ``get`` would raise first): Celery's backend marks it failed with the collect's error, so
    # whoever waits on that task id is not left waiting.
    last = app.AsyncResult(result.id)
    for _ in range(200):
        if last.state != "PENDING":
            break
        await asyncio.sleep(0.1)
    assert last.state == "FAILURE" and "empty list" in str(last.result)


async def wait_until_done(async_result, seconds: float = 20.0):
    for _ in range(int(seconds * 10)):
        if async_result.state != "PENDING":
            return async_result
        await asyncio.sleep(0.1)
    raise AssertionError(f"{async_result.id} still PENDING after {seconds} s")


async def test_a_chord_of_collects_runs_its_body_with_their_results_in_order(cluster):
    """celery-batches does not count a request as a part of its chord (its request's ``chord`` is a
    TODO), so the body never ran: ``tasks/links.py`` counts it, as Celery's backend does."""
    first, second = await cluster.connect("chord-a"), await cluster.connect("chord-b")
    app = cluster.business
    header = [app.signature("tasks.collect", kwargs={"to": "chord-a", "data": 1}, queue="collect"),
              app.signature("tasks.collect_many", kwargs={"messages": [{"to": "chord-b", "data": 2}, {"to": "chord-b", "data": 3}]},
                            queue="collect")]
    result = chord(header)(app.signature("celery.accumulate", queue="collect"))
    (parts,) = await cluster.result(result, 20)
    assert [frame["id"] for frame in await first.messages(1)] == [parts[0]]
    assert [frame["id"] for frame in await second.messages(2)] == parts[1]
    assert is_message_id(parts[0]) and all(is_message_id(part) for part in parts[1])
    first.close()
    second.close()


async def test_a_chord_whose_collect_fails_fails_its_body_and_still_sends_the_valid_messages(cluster):
    client = await cluster.connect("chord-ok")
    app = cluster.business
    header = [app.signature("tasks.collect", kwargs={"to": "chord-ok", "data": 1}, queue="collect"),
              app.signature("tasks.collect", kwargs={"to": [], "data": 1}, queue="collect")]
    result = chord(header)(app.signature("celery.accumulate", queue="collect"))
    body = await wait_until_done(app.AsyncResult(result.id))
    # Celery's Redis backend fails the body with a ChordError naming the part that failed.
    assert body.state == "FAILURE" and "ChordError" in repr(body.result) and "empty list" in str(body.result)
    assert [frame["data"] for frame in await client.messages(1)] == [1]
    client.close()


async def test_a_chord_runs_its_body_when_its_parts_ignore_their_results(cluster):
    app = cluster.business
    header = [app.signature("tasks.collect", kwargs={"to": f"chord-{n}", "data": n}, queue="collect", ignore_result=True) for n in range(3)]
    result = chord(header)(app.signature("celery.accumulate", queue="collect"))
    (parts,) = await cluster.result(result, 20)
    assert len(parts) == 3 and all(is_message_id(part) for part in parts)

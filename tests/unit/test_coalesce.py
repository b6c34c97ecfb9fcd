"""Tests of ``wsnode.coalesce.Coalescer`` on a plain asyncio loop: a recording flush, no sockets."""

from __future__ import annotations

import asyncio

import pytest

from wsnode.coalesce import Coalescer


class Recorder:
    """A flush that records its calls and waits for the test to let each one finish."""

    def __init__(self, fail_with: dict[int, Exception] | None = None) -> None:
        self.calls: list[list[str]] = []
        self.release = asyncio.Event()
        self._fail_with = fail_with or {}

    async def __call__(self, items: list[str]) -> None:
        self.calls.append(items)
        await self.release.wait()
        error = self._fail_with.get(len(self.calls) - 1)
        if error is not None:
            raise error


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_items_submitted_while_a_call_runs_go_together_into_the_next_call():
    flush = Recorder()
    coalescer = Coalescer(flush)
    first = asyncio.create_task(coalescer.submit("a"))
    await settle()
    later = [asyncio.create_task(coalescer.submit(item)) for item in "bcd"]
    await settle()
    assert flush.calls == [["a"]] and len(coalescer) == 3
    flush.release.set()
    await asyncio.gather(first, *later)
    assert flush.calls == [["a"], ["b", "c", "d"]]
    assert len(coalescer) == 0


async def test_a_lone_item_is_flushed_at_once_and_its_caller_returns_after_the_call():
    flush = Recorder()
    flush.release.set()
    coalescer = Coalescer(flush)
    await asyncio.wait_for(coalescer.submit("only"), 1)
    assert flush.calls == [["only"]]


async def test_the_error_of_a_call_reaches_each_of_its_callers_and_the_next_call_still_runs():
    flush = Recorder(fail_with={1: ConnectionError("redis down")})
    coalescer = Coalescer(flush)
    first = asyncio.create_task(coalescer.submit("a"))
    await settle()
    failing = [asyncio.create_task(coalescer.submit(item)) for item in "bc"]
    await settle()
    flush.release.set()
    await first
    for task in failing:
        with pytest.raises(ConnectionError, match="redis down"):
            await task
    await asyncio.wait_for(coalescer.submit("d"), 1)  # the coalescer is not stuck after a failure
    assert flush.calls == [["a"], ["b", "c"], ["d"]]


async def test_a_call_carries_at_most_max_items():
    flush = Recorder()
    coalescer = Coalescer(flush, max_items=2)
    first = asyncio.create_task(coalescer.submit("a"))
    await settle()
    later = [asyncio.create_task(coalescer.submit(item)) for item in "bcde"]
    await settle()
    flush.release.set()
    await asyncio.gather(first, *later)
    assert flush.calls == [["a"], ["b", "c"], ["d", "e"]]


async def test_a_caller_that_stops_waiting_leaves_the_others_theirs():
    flush = Recorder()
    coalescer = Coalescer(flush)
    first = asyncio.create_task(coalescer.submit("a"))
    await settle()
    gone = asyncio.create_task(coalescer.submit("b"))
    kept = asyncio.create_task(coalescer.submit("c"))
    await settle()
    gone.cancel()
    flush.release.set()
    await asyncio.gather(first, kept)
    assert gone.cancelled()
    assert flush.calls == [["a"], ["b", "c"]]


def test_max_items_must_be_positive():
    with pytest.raises(ValueError, match="max_items"):
        Coalescer(Recorder(), max_items=0)


async def test_each_caller_gets_its_own_items_result_and_an_exception_result_is_raised_to_its_caller_only():
    async def answer(items: list[str]) -> list:
        await asyncio.sleep(0)
        return [ValueError(f"no {item}") if item.startswith("bad") else item.upper() for item in items]

    coalescer: Coalescer[str, str] = Coalescer(answer)
    first = asyncio.create_task(coalescer.submit("a"))
    await settle()
    later = [asyncio.create_task(coalescer.submit(item)) for item in ("b", "bad-c", "d")]
    results = await asyncio.gather(first, *later, return_exceptions=True)
    assert results[0] == "A" and results[1] == "B" and results[3] == "D"
    assert isinstance(results[2], ValueError) and str(results[2]) == "no bad-c"


async def test_a_flush_that_returns_the_wrong_number_of_results_fails_every_caller_of_that_call():
    async def short(items: list[str]) -> list:
        return items[:-1]

    coalescer: Coalescer[str, str] = Coalescer(short)
    with pytest.raises(RuntimeError, match="returned 0 results for 1 items"):
        await asyncio.wait_for(coalescer.submit("a"), 1)


async def test_fail_waiting_raises_to_the_callers_not_yet_carried_and_leaves_the_running_call_alone():
    flush = Recorder()
    coalescer = Coalescer(flush)
    running = asyncio.create_task(coalescer.submit("a"))
    await settle()
    waiting = [asyncio.create_task(coalescer.submit(item)) for item in ("b", "c")]
    await settle()

    assert coalescer.fail_waiting(RuntimeError("auth did not answer")) == 2
    flush.release.set()

    assert await running is None
    for task in waiting:
        with pytest.raises(RuntimeError, match="auth did not answer"):
            await task
    assert flush.calls == [["a"]]
    assert len(coalescer) == 0

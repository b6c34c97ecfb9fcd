"""``tests.integration.wsclient.within``: the test clients' timeout, which never drops a cancel.

Python 3.11's ``asyncio.wait_for`` returns a result that arrives in the loop iteration of a cancel
and drops the cancel: a reconnecting test browser (``tests.integration.browser.Browser``) left
running by a failed test then read on instead of stopping, and the test process's teardown,
which cancels what is left once, waited for it for ever.
"""

from __future__ import annotations

import asyncio

import pytest

from tests.integration.wsclient import within


async def _cancel_as_the_result_arrives(read) -> asyncio.Task:
    loop = asyncio.get_running_loop()
    frame = loop.create_future()
    task = asyncio.create_task(read(frame))
    await asyncio.sleep(0)  # the task waits for the frame
    frame.set_result("frame")  # the frame arrives...
    task.cancel()  # ...in the same loop iteration as the cancel
    await asyncio.wait({task})
    return task


async def test_a_cancel_that_lands_with_the_result_cancels():
    task = await _cancel_as_the_result_arrives(lambda frame: within(frame, 3600))
    assert task.cancelled()


async def test_the_result_comes_back_and_a_late_one_times_out():
    loop = asyncio.get_running_loop()
    ready = loop.create_future()
    ready.set_result(7)
    assert await within(ready, 1) == 7
    with pytest.raises(TimeoutError):
        await within(loop.create_future(), 0.05)

"""``tests.integration.browser.Browser`` ends once cancelled, even where a wait dropped the cancel.

Python 3.11's ``asyncio.wait_for`` returns a result that arrives in the loop iteration of a cancel,
and drops the cancel.  A test browser left running by a failed test then read on and connected
again, and the test process's teardown, which cancels what is left once, waited for it for ever.
"""

from __future__ import annotations

import asyncio

from tests.integration.browser import Browser


async def _read_then_check(browser: Browser, frame: asyncio.Future) -> str:
    result = await asyncio.wait_for(frame, 3600)  # a read, as the browser's client makes it
    browser._going_on()
    return result


async def test_a_browser_whose_read_dropped_the_cancel_stops_at_its_next_check():
    loop = asyncio.get_running_loop()
    browser = Browser(cluster=None, user="u", ports=[1])
    frame = loop.create_future()
    task = asyncio.create_task(_read_then_check(browser, frame))
    await asyncio.sleep(0)  # the task waits for the frame
    frame.set_result("frame")  # the frame arrives...
    task.cancel()  # ...in the same loop iteration as the cancel
    await asyncio.wait({task})
    assert task.cancelled()


async def test_a_browser_goes_on_until_stopped():
    browser = Browser(cluster=None, user="u", ports=[1])
    assert browser._going_on() is True
    browser._stop.set()
    assert browser._going_on() is False

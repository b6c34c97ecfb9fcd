"""What a browser does, for the fault tests: a client that stays connected through faults, and
business code that streams messages through them.

:class:`Browser` reconnects the way the browser client does: after a close or a failed connect it
waits a jittered, doubling backoff (0.1 s up to 1.6 s), picks the next node that answers, and
resumes with ``since`` = the newest id it has seen (or, before it saw any, with its inbox).  It acks
every message and keeps every message frame it read, repeats included.
"""

from __future__ import annotations

import asyncio
import random
from collections import defaultdict

from tests.integration.wsclient import Client
from wsnode.closecodes import CloseCode


class Browser:
    def __init__(self, cluster, user: str, ports: list[int], first: int = 0) -> None:
        self.cluster = cluster
        self.user = user
        self.ports = list(ports)
        self._next = first
        self.messages: list[dict] = []
        self.connections = 0
        self.closes: list[int | None] = []
        self._stop = asyncio.Event()
        self._client: Client | None = None
        self._task: asyncio.Task | None = None
        self._token: str | None = None

    @property
    def last_id(self) -> str | None:
        return max((m["id"] for m in self.messages), default=None)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def connected(self, timeout: float = 45.0) -> None:
        """Wait until the first connection finished its opening replay."""
        deadline = asyncio.get_running_loop().time() + timeout
        while self.connections == 0:
            if asyncio.get_running_loop().time() > deadline:
                raise TimeoutError(f"{self.user} never connected")
            await asyncio.sleep(0.05)

    async def stop(self) -> None:
        self._stop.set()
        if self._client is not None:
            self._client.close()
        if self._task is not None:
            await asyncio.wait_for(self._task, 10)

    def _going_on(self) -> bool:
        """Whether to go on reading or connecting: not once :meth:`stop` was called, and never once
        the task was cancelled, even where a wait dropped the cancel.  Python 3.11's
        ``asyncio.wait_for`` returns a result that arrives in the loop iteration of a cancel and
        drops the cancel (which is also what keeps a frame read at its timeout from being lost:
        the test client keeps it).  A failed test leaves its browsers running, and the event
        loop's teardown cancels them once, then waits for them to end: one that read a close
        frame so went on connecting and reading, and the test process waited for it for ever."""
        if asyncio.current_task().cancelling():
            raise asyncio.CancelledError
        return not self._stop.is_set()

    async def _run(self) -> None:
        delay = 0.1
        while self._going_on():
            port = self.ports[self._next % len(self.ports)]
            self._next += 1
            try:
                if self._token is None:
                    self._token = await asyncio.to_thread(self.cluster.token, self.user)
                url = self.cluster.ws_url(port, self._token, self.last_id)
                self._client = await Client.connect(url, timeout=5)
                self.connections += 1
                delay = 0.1
                while self._going_on():
                    frame = await self._client.next_frame(timeout=3600)
                    if frame["type"] == "message":
                        self.messages.append(frame)
            except (ConnectionError, OSError, asyncio.TimeoutError, TimeoutError) as exc:
                code = self._client.ws.close_code if self._client is not None else None
                self.closes.append(code)
                if code == CloseCode.UNAUTHORIZED:
                    self._token = None
                if code in {c.value for c in CloseCode if not c.reconnect}:
                    raise AssertionError(f"{self.user}: closed with terminal code {code}: {exc}")
            finally:
                self._client = None
            if self._going_on():
                await asyncio.sleep(delay * random.uniform(0.5, 1.5))
                delay = min(delay * 2, 1.6)


async def _send(cluster, kwargs: dict):
    while True:
        try:
            return await asyncio.to_thread(cluster.business.send_task, "tasks.collect", kwargs=kwargs, queue="collect", retry=False)
        except Exception:  # noqa: BLE001 - the broker is down: business code retries
            await asyncio.sleep(0.2)


async def stream(cluster, users: list[str], per_user: int, rate: float) -> list:
    """Send ``per_user`` messages to each user, one ``tasks.collect`` each, at about ``rate`` per
    second, round robin over the users; data is ``{"u": user, "n": n}``.  Every message carries an
    idempotency key, so a send that fails (a broker restart) is simply sent again.  Returns
    ``[(kwargs, AsyncResult)]`` for :func:`confirm`."""
    interval = 1.0 / rate
    loop = asyncio.get_running_loop()
    start = loop.time()
    sent = []
    for n in range(per_user):
        for user in users:
            kwargs = {"to": user, "data": {"u": user, "n": n}, "key": f"{user}:{n}"}
            sent.append((kwargs, await _send(cluster, kwargs)))
            ahead = start + len(sent) * interval - loop.time()
            if ahead > 0:
                await asyncio.sleep(ahead)
    return sent


async def confirm(cluster, sent: list, timeout: float = 30.0, attempts: int = 3) -> int:
    """What business code that needs the guarantee does: wait for each collect's id and send again,
    with the same key, a collect that gave none in time (a worker killed after taking it from a
    Redis broker, before running it, loses it).  ``timeout`` bounds each round as a whole.
    Returns how many had to be sent again.

    Each round reads the results' states from the backend, all of them every 0.2 s, rather than
    ``get()`` one after the other: after a round's deadline each ``get()`` waited at least one of
    Celery's 1 s drain intervals for a result its pub/sub message had not brought yet (20 s more
    on the worker-SIGKILL test's Redis broker)."""
    resent = 0
    pending = sent
    loop = asyncio.get_running_loop()
    for _ in range(attempts):
        deadline = loop.time() + timeout
        waiting = pending
        while True:
            waiting = await asyncio.to_thread(lambda items: [(kwargs, result) for kwargs, result in items if not result.ready()], waiting)
            if not waiting or loop.time() >= deadline:
                break
            await asyncio.sleep(0.2)
        # No id in time, or a failure: send it again, the key makes that safe.
        late = {result.id for _, result in waiting}
        again = [(kwargs, await _send(cluster, kwargs)) for kwargs, result in pending if result.id in late or not result.successful()]
        resent += len(again)
        if not again:
            return resent
        pending = again
    raise AssertionError(f"{len(pending)} collects never returned an id, even after {attempts} sends")


def check_exactly_once(browsers: list[Browser], per_user: int) -> dict:
    """Every browser got each of its ``per_user`` messages under exactly one id, nothing else.
    Returns counts for the report (repeats dropped by id, reconnections)."""
    problems = []
    repeats = 0
    for browser in browsers:
        ids_of: dict[int, set[str]] = defaultdict(set)
        seen: set[str] = set()
        for frame in browser.messages:
            if frame["id"] in seen:
                repeats += 1
                continue
            seen.add(frame["id"])
            data = frame["data"]
            if data.get("u") != browser.user:
                problems.append(f"{browser.user} got {data!r} addressed to someone else")
                continue
            ids_of[data["n"]].add(frame["id"])
        missing = sorted(set(range(per_user)) - set(ids_of))
        doubled = {n: ids for n, ids in ids_of.items() if len(ids) > 1}
        if missing:
            problems.append(f"{browser.user} is missing n={missing[:10]}{'...' if len(missing) > 10 else ''} ({len(missing)} in all)")
        if doubled:
            problems.append(f"{browser.user} got n={sorted(doubled)[:5]} under several ids: {list(doubled.values())[:2]}")
    assert not problems, "\n".join(problems[:20])
    return {"repeats_dropped": repeats, "reconnections": sum(b.connections for b in browsers) - len(browsers)}


async def wait_complete(browsers: list[Browser], per_user: int, timeout: float) -> None:
    """Wait until every browser holds every one of its messages (or the timeout passes)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while asyncio.get_running_loop().time() < deadline:
        if all(len({m["data"]["n"] for m in b.messages if m["data"].get("u") == b.user}) >= per_user for b in browsers):
            return
        await asyncio.sleep(0.25)

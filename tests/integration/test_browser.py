"""push.js and the demo page in a real browser: headless Chromium (Debian's ``chromium``) driven by
Playwright, against a real cluster and the demo app.

Chromium is installed by the ``chromium_path`` fixture when it is missing (as root, with apt-get:
see ``browser_support.ensure_chromium``); the tests skip, saying why, only where that fails.  The
first test may therefore take a few minutes longer, hence the generous timeout.  They run on the
Redis-broker cluster only: the browser does not see the broker.
"""

from __future__ import annotations

import contextlib
import json
import time
import uuid

import pytest
from playwright.sync_api import Page, sync_playwright

from tests.integration.browser_support import CHROMIUM_ARGS, ChromiumUnavailable, DemoPage, ensure_chromium, push_js
from wsnode.closecodes import CloseCode

pytestmark = pytest.mark.timeout(900)  # the first test may apt-get install Chromium

REDIS_ONLY = pytest.mark.parametrize("cluster", ["redis"], indirect=True)
WAIT_MS = 30_000


@pytest.fixture(scope="session")
def chromium_path() -> str:
    try:
        return ensure_chromium()
    except ChromiumUnavailable as exc:
        pytest.skip(f"no Chromium for the browser tests: {exc}")


@pytest.fixture(scope="module")
def browser(chromium_path):
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium_path, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def pages(browser):
    """Opens pages in a fresh browser context (one per test); console errors are kept for failures."""
    context = browser.new_context()
    context.set_default_timeout(WAIT_MS)
    errors: list[str] = []

    def open_page(url: str) -> Page:
        page = context.new_page()
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.goto(url)
        return page

    yield open_page
    context.close()
    assert not errors, f"the page threw: {errors}"


def unique(name: str) -> str:
    return f"{name}-{uuid.uuid4().hex[:6]}"


def wait_live(page: Page, node_port: int | None = None) -> None:
    """Wait until the page's client is live; on ``node_port`` when given."""
    page.wait_for_function("window.demo.client && window.demo.client.state === 'live'")
    if node_port is not None:
        assert page.text_content("#node") == f"127.0.0.1:{node_port}"


def wait_count(page: Page, count: int) -> list[dict]:
    """Wait until the page has received ``count`` messages (after de-duplication); return them."""
    page.wait_for_function("n => window.demo.received.length >= n", arg=count)
    return page.evaluate("window.demo.received")


def wait_own(page: Page, user: str, count: int) -> list[dict]:
    """Wait until the page holds ``count`` messages sent to ``user`` alone; return those.

    A resume replays from a little before ``since``, broadcasts included, so a page that resumed
    may also show a ``*`` message another test sent just before: those are left out (and anything
    addressed to someone else fails the test)."""
    page.wait_for_function("([user, n]) => window.demo.received.filter(m => m.data.to === user).length >= n", arg=[user, count])
    received = page.evaluate("window.demo.received")
    strangers = [m for m in received if m["data"]["to"] not in (user, "*")]
    assert not strangers, f"{user}'s page shows messages addressed to others: {strangers}"
    return [m for m in received if m["data"]["to"] == user]


@contextlib.contextmanager
def blank_demo(cluster, pages):
    """The demo page and its backend, for a test that starts PushClients of its own on the page."""
    demo = DemoPage(cluster, cluster.node_ports)
    try:
        page = pages(demo.page_url())
        page.wait_for_function("window.demo.config !== null")
        yield demo, page
    finally:
        demo.stop()


def start_client(page: Page, name: str, url: str, user: str, ttl: int | None = None, **options) -> None:
    """A PushClient of ``user`` on ``url`` started on the demo page as ``window[name]``, with tokens
    from the demo backend (living ``ttl`` seconds when given) and ``options``; the data of its
    messages collect in ``window[name].got``."""
    page.evaluate("""([name, url, user, ttl, options]) => {
        const client = new PushClient(Object.assign({
            url, onMessage: (data) => client.got.push(data),
            getToken: () => fetch("api/token", {method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(ttl ? {user, ttl} : {user})}).then(r => r.json()).then(a => a.token),
        }, options));
        client.got = [];
        window[name] = client;
        client.start();
    }""", [name, url, user, ttl, options])


def texts(received: list[dict]) -> list[str]:
    return [item["data"]["text"] for item in received]


def test_push_js_follows_the_close_code_table_and_backs_off_within_bounds(pages):
    page = pages("about:blank")
    page.add_script_tag(content=push_js().decode())
    policy = page.evaluate("codes => codes.map(c => PushClient.closePolicy(c).action)", [int(c) for c in CloseCode])
    for code, action in zip(CloseCode, policy):
        expected = "stop" if not code.reconnect else "new-token" if code == CloseCode.UNAUTHORIZED else "reconnect"
        assert action == expected, f"{code!r}: push.js does {action}, the table says {expected}"
    assert page.evaluate("[1006, 4000, 4499, 4999].map(c => PushClient.closePolicy(c).action)") == ["reconnect", "reconnect", "reconnect", "stop"]
    # Each delay is drawn between half the step and the step; the step doubles up to the cap.
    bounds = page.evaluate("[0, 1, 2, 3, 10].map(a => [PushClient.backoffDelay(a, 500, 30000, 0), PushClient.backoffDelay(a, 500, 30000, 1)])")
    assert bounds == [[250, 500], [500, 1000], [1000, 2000], [2000, 4000], [15000, 30000]]
    # A token's refresh comes refreshAheadMs before its expiry (at most halfway), and earlier again
    # by up to half refreshAheadMs (at most a quarter of what is left), never within a second.
    refresh = page.evaluate("[[3600000, 60000], [100000, 60000], [3000, 60000], [1000, 60000]].map(([left, ahead]) => "
                            "[PushClient.refreshDelay(left, ahead, 0), PushClient.refreshDelay(left, ahead, 1)])")
    assert refresh == [[3540000, 3510000], [50000, 25000], [1500, 1000], [1000, 1000]]


#: A WebSocket stand-in that only records the sockets push.js opens and closes: for the client's
#: own bookkeeping, which no server takes part in.
RECORDING_WEBSOCKET = """
window.opened = [];
window.WebSocket = class {
  constructor(url) { this.url = url; this.readyState = 0; this.closed = false; window.opened.push(this); }
  close(code) { this.closed = true; this.closeCode = code; this.readyState = 3; }
  send(data) { (this.sent = this.sent || []).push(JSON.parse(data)); }
};
"""


def recording_page(pages, *scripts: str) -> Page:
    """A blank page with push.js on a recording WebSocket (``window.opened``): the client's
    sockets, driven by hand.  ``scripts`` go in first."""
    page = pages("about:blank")
    for script in (*scripts, RECORDING_WEBSOCKET, push_js().decode()):
        page.add_script_tag(content=script)
    return page


def test_push_js_stopped_while_it_connects_opens_no_socket_and_a_restart_opens_one(pages):
    """``stop()`` from ``onStatus`` while the client connects, or ``stop(); start()`` while it
    waits for ``getToken``, left the earlier attempt going on: a socket opened after ``stop()``
    (messages handed to a stopped page), or two sockets, one of them never closed."""
    page = recording_page(pages)
    stopped_on_connecting = page.evaluate("""() => {
        const client = new PushClient({url: "ws://127.0.0.1:9/ws", token: "t", onStatus: s => { if (s.state === "connecting") client.stop(); }});
        client.start();
        return [client.state, window.opened.length];
    }""")
    assert stopped_on_connecting == ["stopped", 0]
    restarted = page.evaluate("""async () => {
        window.opened = [];
        const waiting = [];
        const client = new PushClient({url: "ws://127.0.0.1:9/ws", getToken: () => new Promise(resolve => waiting.push(resolve))});
        client.start();
        client.stop();
        client.start();
        waiting.forEach(resolve => resolve("t"));
        await new Promise(resolve => setTimeout(resolve, 50));
        const open = window.opened.filter(ws => !ws.closed).length;
        client.stop();
        return [window.opened.length, open];
    }""")
    assert restarted == [1, 1]


def test_push_js_reports_a_stop_by_the_page_with_no_close_code_and_keeps_the_code_that_stopped_it(pages):
    """``stop()`` reported ``code: 1000`` whatever had happened: a page could not tell its own stop
    from a node's close with 1000 (``ping timed out``), and a ``stop()`` after the node's 4500
    reported a second ``stopped``, with 1000.  A stop by the page now has no code (the node still
    sees 1000); once stopped, ``stop()`` reports nothing."""
    page = recording_page(pages)
    seen = page.evaluate("""() => {
        const stopped = [];
        const onStatus = s => { if (s.state === "stopped") stopped.push(["code" in s, s.code === undefined ? null : s.code, s.reason]); };
        const byPage = new PushClient({url: "ws://a.invalid/ws", token: "t", onStatus});
        byPage.start();
        window.opened[0].onmessage({data: JSON.stringify({type: "hello", node: "a", user: "u", conn: "c", expires_in: 3600})});
        byPage.stop();
        byPage.stop();
        const byNode = new PushClient({url: "ws://a.invalid/ws", token: "t", onStatus});
        byNode.start();
        window.opened[1].onclose({code: 4500, reason: "bad request"});
        byNode.stop();
        const never = new PushClient({url: "ws://a.invalid/ws", token: "t", onStatus});
        never.stop();
        return {stopped, sent: window.opened[0].closeCode, states: [byPage.state, byNode.state, never.state]};
    }""")
    assert seen["stopped"] == [[False, None, "stopped by the page"], [True, CloseCode.BAD_REQUEST, "bad request"]]
    assert seen["sent"] == 1000
    assert seen["states"] == ["stopped", "stopped", "idle"]


def test_push_js_stopped_by_a_4401_without_get_token_reports_the_nodes_reason(pages):
    """A client given ``token`` and no ``getToken`` stops at a 4401, and README says its
    ``stopped`` status has the code and reason that stopped it; the reason was push.js's own
    ("token refused and no getToken option to get a new one"), so a page could not tell an
    expired token from a revoked one."""
    page = recording_page(pages)
    stopped = page.evaluate("""() => {
        const stopped = [];
        const onStatus = s => { if (s.state === "stopped") stopped.push([s.code, s.reason]); };
        for (const reason of ["token expired", "token revoked"]) {
            const client = new PushClient({url: "ws://a.invalid/ws", token: "t", onStatus});
            client.start();
            window.opened[window.opened.length - 1].onclose({code: 4401, reason});
        }
        return stopped;
    }""")
    assert stopped == [[CloseCode.UNAUTHORIZED, "token expired"], [CloseCode.UNAUTHORIZED, "token revoked"]]


def test_push_js_retries_a_get_token_that_never_settles(pages):
    """A ``getToken`` whose request stalls left the client waiting for ever, with no retry."""
    page = recording_page(pages)
    states = page.evaluate("""async () => {
        let calls = 0;
        const states = [];
        const client = new PushClient({url: "ws://127.0.0.1:9/ws", connectTimeoutMs: 100, initialMs: 50,
                                       getToken: () => { calls += 1; return calls === 1 ? new Promise(() => {}) : "t"; },
                                       onStatus: s => states.push(s.state)});
        client.start();
        await new Promise(resolve => setTimeout(resolve, 600));
        client.stop();
        return [calls, states.slice(0, 4), window.opened.length > 0];
    }""")
    assert states == [2, ["token", "waiting", "token", "connecting"], True]


def test_push_js_reports_a_failed_get_token_as_what_it_was_and_backs_off_on_the_same_url(pages):
    """A ``getToken`` that threw, rejected, gave no token or never settled was reported as
    ``waiting`` with code 4401, which no node had sent.  It is now ``waiting`` with no code, a
    reason that says what went wrong and the ``error``; the client still tries again on the same
    URL after a backoff step."""
    page = recording_page(pages)
    page.evaluate("""() => {
        let calls = 0;
        window.waiting = [];
        const answers = [() => Promise.reject(new Error("auth down")), () => null, () => new Promise(() => {}), () => "t"];
        window.client = new PushClient({url: ["ws://a.invalid/ws", "ws://b.invalid/ws"], connectTimeoutMs: 100, initialMs: 20,
                                        getToken: () => answers[calls++](),
                                        onStatus: s => { if (s.state === "waiting" && window.opened.length === 0) window.waiting.push(
                                            ["code" in s, s.reason, s.error ? s.error.message : null, s.url, s.next, s.retryIn, s.wasConnected]); }});
        window.client.start();
    }""")
    # Only the waits before the first socket count: nothing answers that socket, so 100 ms after it
    # opened the client waits again ("no hello within 100 ms"), which a loaded machine let in before
    # the list was read (a CI run of 2026-12-06).
    page.wait_for_function("window.opened.length === 1")
    waiting = page.evaluate("window.waiting")
    url = page.evaluate("window.opened[0].url")
    page.evaluate("window.client.stop()")
    a = "ws://a.invalid/ws"
    assert [w[:5] + [w[6]] for w in waiting] == [
        [False, "getToken failed: auth down", "auth down", a, a, False],
        [False, "getToken gave no token", None, a, a, False],
        [False, "getToken failed: no answer within 100 ms", "no answer within 100 ms", a, a, False],
    ]
    # The backoff steps of attempts 0, 1, 2 (20 ms doubling): each delay between half and all of one.
    assert [20 * 2 ** n / 2 <= w[5] <= 20 * 2 ** n for n, w in enumerate(waiting)] == [True] * 3
    assert url.startswith(a + "?token=t")


def test_push_js_reports_a_get_token_that_gave_no_string_as_such_when_it_refreshes(pages):
    """A refresh whose ``getToken`` gave the auth service's whole answer, not the token in it, sent
    ``[object Object]`` to the node (closed with 4401 ``refresh refused: token invalid``); ``onError``
    now says what ``getToken`` gave and what to return, nothing is sent, and it is tried again."""
    page = recording_page(pages)
    seen = page.evaluate("""async () => {
        const until = async (check) => { for (let i = 0; i < 300 && !check(); i++) await new Promise(r => setTimeout(r, 10)); };
        const errors = [];
        const client = new PushClient({url: "ws://a.invalid/ws", token: "t", refreshRetryMs: 50,
                                       getToken: () => Promise.resolve({token: "t2", expires_at: 1}),
                                       onError: e => errors.push([e.type, e.reason])});
        client.start();
        const ws = window.opened[0];
        ws.readyState = 1;
        ws.onmessage({data: JSON.stringify({type: "hello", node: "a", user: "u", conn: "c", expires_in: 0})});  // refresh in 1 s
        await until(() => errors.length > 0);
        const state = client.state;
        client.stop();
        return {errors, sent: ws.sent || [], state};
    }""")
    assert seen["errors"][0] == ["refresh", 'getToken gave an object, not a token string: return its token field '
                                            '(the auth service\'s answer holds the token in "token")']
    assert seen["sent"] == [] and seen["state"] == "connected"


def test_push_js_started_again_backs_off_from_the_first_step(pages):
    """The backoff of a run carried over to the next ``start()``: a page that stops its client (a
    tab hidden, a "Disconnect" button) after a flaky spell and starts it again waited up to
    ``maxMs`` after its first failed connect, where a new run starts from ``initialMs``."""
    page = recording_page(pages)
    delays = page.evaluate("""async () => {
        const until = async (check) => { for (let i = 0; i < 1000 && !check(); i++) await new Promise(r => setTimeout(r, 10)); };
        const delays = [];
        const client = new PushClient({url: "ws://a.invalid/ws", token: "t", initialMs: 10, maxMs: 100000,
                                       onStatus: s => { if (s.state === "waiting") delays.push(s.retryIn); }});
        client.start();
        for (let n = 1; n <= 5; n++) {
            window.opened[n - 1].onclose({code: 1006, reason: ""});
            await until(() => window.opened.length > n);
        }
        client.stop();
        client.start();
        window.opened[window.opened.length - 1].onclose({code: 1006, reason: ""});
        client.stop();
        return delays;
    }""")
    assert len(delays) == 6
    assert 80 <= delays[4] <= 160  # the fifth failure in a row: the fifth step
    assert 5 <= delays[5] <= 10, f"the first failure after start() waited {delays[5]} ms, not the first step: {delays}"


def test_push_js_refused_for_its_users_connect_rate_waits_the_time_the_node_gives_before_it_tries_again(pages):
    """4429 for ``MAX_USER_CONNECTS`` says "retry in N s", and every node refuses the user until
    then: push.js waits that long (and up to ``initialMs`` more, so a user's tabs do not come back in
    the same instant) where its backoff step is shorter, instead of trying each URL again and again
    within it; the per-node 4429 (``MAX_USER_CONNECTIONS``) keeps the backoff step."""
    page = recording_page(pages)
    waits = page.evaluate("""async () => {
        const until = async (check) => { for (let i = 0; i < 1000 && !check(); i++) await new Promise(r => setTimeout(r, 10)); };
        const waits = [];
        const client = new PushClient({url: ["ws://a.invalid/ws", "ws://b.invalid/ws"], token: "t", initialMs: 500, maxMs: 30000,
                                       onStatus: s => { if (s.state === "waiting") waits.push([s.code, s.retryIn, s.next]); }});
        client.start();
        await until(() => window.opened.length > 0);
        window.opened[0].onclose({code: 4429, reason: "too many connects of this user, retry in 3 s"});
        client.stop();
        client.start();
        await until(() => window.opened.length > 1);
        window.opened[1].onclose({code: 4429, reason: "too many connections of this user on this node"});
        client.stop();
        return waits;
    }""")
    assert [code for code, _, _ in waits] == [4429, 4429]
    assert 3000 <= waits[0][1] <= 3500 and waits[0][2] == "ws://b.invalid/ws", waits  # the next URL, not before the 3 s
    assert 250 <= waits[1][1] <= 500, waits  # the first backoff step
    assert page.evaluate("[[4429, 'too many connects of this user, retry in 12 s'], [4429, 'too many connections of this user on this node'], "
                         "[1013, 'retry in 3 s'], [4429, '']].map(([c, r]) => PushClient.retryAfterMs(c, r))") == [12000, 0, 0, 0]


def test_push_js_back_online_still_waits_the_time_a_4429_gave(pages):
    """The ``online`` event (or the tab shown again) cuts a backoff step short, but not the "retry
    in N s" of a 4429, until which every node refuses the user: it reconnected within
    ``goAwayJitterMs``, a handshake and a token check spent on another 4429."""
    page = recording_page(pages)
    seen = page.evaluate("""async () => {
        const pause = ms => new Promise(resolve => setTimeout(resolve, ms));
        const client = new PushClient({url: ["ws://a.invalid/ws", "ws://b.invalid/ws"], token: "t", initialMs: 50, maxMs: 50, goAwayJitterMs: 20});
        client.start();
        const closedAt = Date.now();
        window.opened[0].onclose({code: 4429, reason: "too many connects of this user, retry in 1 s"});
        await pause(50);
        window.dispatchEvent(new Event("online"));
        await pause(500);
        const early = window.opened.length;
        for (let i = 0; i < 200 && window.opened.length < 2; i++) await pause(10);
        const after = Date.now() - closedAt;
        client.stop();
        return {early, opened: window.opened.length, after};
    }""")
    assert seen["early"] == 1, f"reconnected before the 4429's 1 s: {seen}"
    assert seen["opened"] == 2 and seen["after"] >= 1000, seen


def test_push_js_refreshed_with_no_expiry_sends_no_more_refreshes(pages):
    """A ``refreshed`` frame whose ``expires_in`` is null (an auth that gives no expiry: the token
    never expires) left the timer of the refresh's answer armed: push.js then called getToken and
    sent another refresh every ``refreshRetryMs + connectTimeoutMs``, for the connection's life."""
    page = recording_page(pages)
    seen = page.evaluate("""async () => {
        const until = async (check) => { for (let i = 0; i < 500 && !check(); i++) await new Promise(r => setTimeout(r, 10)); };
        const calls = [], errors = [];
        const client = new PushClient({url: "ws://a.invalid/ws", refreshRetryMs: 40, connectTimeoutMs: 60,
                                       getToken: () => { calls.push(Date.now()); return "t" + calls.length; }, onError: e => errors.push(e.reason)});
        client.start();
        await until(() => window.opened.length > 0);
        const ws = window.opened[0];
        ws.readyState = 1;
        ws.onmessage({data: JSON.stringify({type: "hello", node: "a", user: "u", conn: "c", expires_in: 0})});  // refresh in 1 s
        const refreshes = () => (ws.sent || []).filter(frame => frame.type === "refresh").length;
        await until(() => refreshes() > 0);
        ws.onmessage({data: JSON.stringify({type: "refreshed", expires_at: null, expires_in: null})});
        await new Promise(r => setTimeout(r, 600));
        const seen = {refreshes: refreshes(), calls: calls.length, errors, state: client.state};
        client.stop();
        return seen;
    }""")
    assert seen == {"refreshes": 1, "calls": 2, "errors": [], "state": "connected"}, seen  # getToken: the connect, the one refresh


def test_push_js_ignores_a_frame_that_is_json_but_no_object(pages):
    """``null`` (JSON, but no frame) threw a TypeError out of the socket's ``onmessage`` into the
    page; numbers, strings and lists were ignored, as is what push.js does not know."""
    page = recording_page(pages)
    seen = page.evaluate("""() => {
        const client = new PushClient({url: "ws://a.invalid/ws", token: "t"});
        client.start();
        const ws = window.opened[0];
        const thrown = [];
        for (const text of ["null", "3", '"hello"', "[]", "true"]) {
            try { ws.onmessage({data: text}); } catch (e) { thrown.push(text + ": " + e); }
        }
        ws.onmessage({data: JSON.stringify({type: "hello", node: "a", user: "u", conn: "c", expires_in: 3600})});
        const state = client.state;
        client.stop();
        return {thrown, state};
    }""")
    assert seen == {"thrown": [], "state": "connected"}, seen


def sinces_after(pages, *connections: list[dict]) -> list[str | None]:
    """The ``since`` of each connection push.js opens when each of ``connections`` (the frames a
    node sends after ``hello``) ends with a 1006: one more than given."""
    page = recording_page(pages)
    return page.evaluate("""async (connections) => {
        const until = async (check) => { for (let i = 0; i < 1000 && !check(); i++) await new Promise(r => setTimeout(r, 10)); };
        const hello = {type: "hello", node: "a", user: "u", conn: "c", expires_in: 3600};
        const client = new PushClient({url: "ws://a.invalid/ws", token: "t", initialMs: 5, maxMs: 10});
        client.start();
        for (let n = 0; n < connections.length; n++) {
            await until(() => window.opened.length > n);
            const ws = window.opened[n];
            for (const frame of [hello, ...connections[n]]) ws.onmessage({data: JSON.stringify(frame)});
            ws.onclose({code: 1006, reason: ""});
        }
        await until(() => window.opened.length > connections.length);
        client.stop();
        return window.opened.map(ws => new URL(ws.url).searchParams.get("since"));
    }""", list(connections))


def resumed(since: str | None, replayed: int, cursor: str) -> dict:
    return {"type": "resumed", "since": since, "replayed": replayed, "truncated": False, "cursor": cursor}


def test_push_js_that_has_seen_no_message_resumes_from_the_cursor_of_its_first_resumed_frame(pages):
    """A device that left before its first message came back without ``since``, to the inbox,
    which no longer holds what another device of the user acked meanwhile: it never got those.
    It now resumes from the ``cursor`` the node sent; once it has seen a message, from that."""
    assert sinces_after(pages,
                        [resumed(None, 0, "0190f00000000000000000aa")],
                        [resumed("0190f00000000000000000aa", 0, "0190f10000000000000000aa"),
                         {"type": "message", "id": "0190f20000000000000000bb", "data": 1}],
                        ) == [None, "0190f00000000000000000aa", "0190f20000000000000000bb"]


def test_push_js_whose_inbox_replay_brought_only_older_messages_resumes_from_the_cursor(pages):
    """It resumed from the newest message of its inbox replay, an old one unacked, and its next
    connection then replayed everything after it, what other devices acked since included.  The
    cursor counts when it is later than every message seen, never going back to an earlier one."""
    assert sinces_after(pages,
                        [{"type": "message", "id": "0190e00000000000000000bb", "data": 1}, resumed(None, 1, "0190f00000000000000000aa")],
                        [{"type": "message", "id": "0190f50000000000000000bb", "data": 2},
                         resumed("0190f00000000000000000aa", 1, "0190f10000000000000000aa")],
                        ) == [None, "0190f00000000000000000aa", "0190f50000000000000000bb"]


def test_push_js_does_not_go_back_to_a_node_that_said_going_away_while_another_url_works(pages):
    """After A's 1001 the client moves to B; when B's connect then fails, it used to go back to A
    (the next URL, though A was still skipped for ``awayMs``) and be refused by a draining node,
    where trying B again is what a load balancer would do.  ``stop()`` forgets the node."""
    page = recording_page(pages)
    tried = page.evaluate("""async () => {
        const pause = ms => new Promise(resolve => setTimeout(resolve, ms));
        const client = new PushClient({url: ["ws://a.invalid/ws", "ws://b.invalid/ws"], token: "t", initialMs: 20, goAwayJitterMs: 10});
        client.start();
        const a = window.opened[0];
        a.onmessage({data: JSON.stringify({type: "hello", node: "a", user: "u", conn: "c", expires_in: 3600})});
        const node = client.node;
        a.onclose({code: 1001, reason: "node shutting down"});
        await pause(50);
        window.opened[1].onclose({code: 1006, reason: ""});
        await pause(100);
        const urls = window.opened.map(ws => new URL(ws.url).host);
        window.opened[2].onmessage({data: JSON.stringify({type: "hello", node: "b", user: "u", conn: "c", expires_in: 3600})});
        const live = client.node;
        client.stop();
        return [node, urls.slice(0, 3), live, client.node, client.state];
    }""")
    assert tried == ["a", ["a.invalid", "b.invalid", "b.invalid"], "b", None, "stopped"]


def test_push_js_pings_an_idle_connection_and_reconnects_when_nothing_answers(pages):
    """A browser cannot see WebSocket pings: a connection whose network went away looked live for
    as long as the operating system kept it.  After ``idleMs`` without a frame push.js sends a
    ``ping``; any frame within ``pongTimeoutMs`` keeps the connection, none makes it count as lost."""
    page = recording_page(pages)
    seen = page.evaluate("""async () => {
        const pause = ms => new Promise(resolve => setTimeout(resolve, ms));
        const states = [];
        const client = new PushClient({url: ["ws://a.invalid/ws", "ws://b.invalid/ws"], token: "t", idleMs: 200, pongTimeoutMs: 200,
                                       initialMs: 20, onStatus: s => states.push([s.state, s.code, s.reason])});
        client.start();
        const a = window.opened[0];
        a.readyState = 1;
        a.onmessage({data: JSON.stringify({type: "hello", node: "a", user: "u", conn: "c", expires_in: 3600, ping: true})});
        await pause(300);
        const first = (a.sent || []).slice();
        a.onmessage({data: JSON.stringify({type: "pong"})});
        await pause(150);
        const afterPong = [a.closed, window.opened.length];
        await pause(700);
        client.stop();
        return {first, afterPong, closed: a.closed, opened: window.opened.length, pings: client.stats.pings,
                lost: states.filter(s => s[0] === "waiting")};
    }""")
    assert seen["first"] == [{"type": "ping"}]
    assert seen["afterPong"] == [False, 1], "a pong did not keep the connection"
    assert seen["closed"] and seen["opened"] == 2 and seen["pings"] == 2
    assert seen["lost"] == [["waiting", 1006, "no frame within 200 ms of a ping"]]


def test_push_js_does_not_ping_a_node_whose_hello_does_not_say_it_answers_pings(pages):
    """A node of an earlier version closes a connection that sends a ``ping`` with 4500, which
    push.js takes for a client bug and stops for good: during a rolling upgrade, a page that got
    the new push.js from one node and connected to an old one would stop."""
    page = recording_page(pages)
    sent = page.evaluate("""async () => {
        const client = new PushClient({url: "ws://old.invalid/ws", token: "t", idleMs: 50, pongTimeoutMs: 50});
        client.start();
        const ws = window.opened[0];
        ws.readyState = 1;
        ws.onmessage({data: JSON.stringify({type: "hello", node: "old", user: "u", conn: "c", expires_in: 3600})});
        await new Promise(resolve => setTimeout(resolve, 300));
        const result = [ws.sent || [], ws.closed, client.state, client.stats.pings];
        client.stop();
        return result;
    }""")
    assert sent == [[], False, "connected", 0]


def test_push_js_replaces_a_kept_token_at_once_after_failed_connects(pages):
    """A page whose network was down long enough for its token to expire came back to a 4401 and
    then waited another backoff step (up to ``maxMs``) before it asked ``getToken``, as if new
    tokens kept being refused: the step counted the failed connects before.  A kept token refused
    is now replaced at once; a token ``getToken`` just gave that is refused still backs off."""
    page = recording_page(pages)
    seen = page.evaluate("""async () => {
        const until = async (check) => { for (let i = 0; i < 1000 && !check(); i++) await new Promise(r => setTimeout(r, 10)); };
        const waits = [];
        let calls = 0;
        const client = new PushClient({url: "ws://a.invalid/ws", token: "kept", initialMs: 20, maxMs: 100000, tokenJitterMs: 50,
                                       getToken: () => "new" + (++calls),
                                       onStatus: s => { if (s.state === "waiting") waits.push([s.code, s.retryIn]); }});
        client.start();
        for (let n = 1; n <= 4; n++) {
            window.opened[n - 1].onclose({code: 1006, reason: ""});
            await until(() => window.opened.length > n);
        }
        window.opened[4].onclose({code: 4401, reason: "token expired"});
        await until(() => window.opened.length > 5);
        window.opened[5].onclose({code: 4401, reason: "token revoked"});
        client.stop();
        return {waits, tokens: window.opened.map(ws => new URL(ws.url).searchParams.get("token"))};
    }""")
    assert seen["tokens"] == ["kept"] * 5 + ["new1"]
    assert seen["waits"][4][0] == CloseCode.UNAUTHORIZED and seen["waits"][4][1] <= 50, f"a kept token refused waited a backoff step: {seen['waits']}"
    assert seen["waits"][5][0] == CloseCode.UNAUTHORIZED and 160 <= seen["waits"][5][1] <= 320  # a backoff step, as before


def test_push_js_spreads_its_get_token_calls_after_a_mass_revocation_over_token_jitter_ms(pages):
    """A revocation that closes many connections with 4401 at once (many users banned, a secret
    changed without listing the old one) made every page call ``getToken`` in the same instant,
    a burst on the business backend as large as the revocation.  Each page now calls it after a
    random delay of at most ``tokenJitterMs`` (1 s), which is all a single page waits more."""
    page = recording_page(pages)
    seen = page.evaluate("""async () => {
        const until = async (check) => { for (let i = 0; i < 1000 && !check(); i++) await new Promise(r => setTimeout(r, 10)); };
        const calls = [], waits = [], clients = [];
        for (let n = 0; n < 20; n++) {
            const client = new PushClient({url: "ws://a.invalid/ws", token: "kept", getToken: () => { calls.push(performance.now()); return "new"; },
                                           onStatus: s => { if (s.state === "waiting") waits.push([s.code, s.retryIn]); }});
            client.start();
            clients.push(client);
        }
        const sockets = window.opened.slice();
        sockets.forEach(ws => ws.onmessage({data: JSON.stringify({type: "hello", node: "a", user: "u", conn: "c", expires_in: 3600})}));
        const revokedAt = performance.now();
        sockets.forEach(ws => ws.onclose({code: 4401, reason: "token revoked"}));
        await until(() => calls.length >= 20);
        clients.forEach(client => client.stop());
        return {waits, calls: calls.map(at => at - revokedAt), jitter: PushClient.DEFAULTS.tokenJitterMs};
    }""")
    assert len(seen["waits"]) == 20 and {code for code, _ in seen["waits"]} == {CloseCode.UNAUTHORIZED}
    delays = sorted(retry for _, retry in seen["waits"])
    calls = sorted(seen["calls"])
    assert delays[-1] - delays[0] >= 300, f"the 20 pages' getToken calls were not spread: {delays}"
    assert 0 <= delays[0] and delays[-1] <= 1000, f"a page waited more than tokenJitterMs: {delays}"
    # The calls follow the delays (within a loaded machine's timer lateness; the bound is the delays').
    assert len(calls) == 20 and calls[-1] - calls[0] >= 300 and calls[-1] <= 1000 + 1000, f"getToken called at {calls} ms"
    assert seen["jitter"] == 1000  # the documented default


def test_push_js_gets_a_new_token_before_reconnecting_once_its_token_has_expired(pages):
    """A reconnect after the token expired (the node's ``hello`` said when) connected with it all
    the same: a handshake and a check with auth for a sure 4401, for every page that comes back
    after an outage longer than its tokens.  It now asks ``getToken`` first; a token still valid
    is kept."""
    page = recording_page(pages)
    tokens = page.evaluate("""async () => {
        const until = async (check) => { for (let i = 0; i < 1000 && !check(); i++) await new Promise(r => setTimeout(r, 10)); };
        let calls = 0;
        const client = new PushClient({url: "ws://a.invalid/ws", token: "kept", initialMs: 5, maxMs: 10, getToken: () => "new" + (++calls)});
        client.start();
        for (const [n, expiresIn] of [[0, 3600], [1, 0.05]]) {
            window.opened[n].onmessage({data: JSON.stringify({type: "hello", node: "a", user: "u", conn: "c", expires_in: expiresIn})});
            await new Promise(r => setTimeout(r, 100));
            window.opened[n].onclose({code: 1006, reason: ""});
            await until(() => window.opened.length > n + 1);
        }
        client.stop();
        return window.opened.map(ws => new URL(ws.url).searchParams.get("token"));
    }""")
    assert tokens == ["kept", "kept", "new1"]


def test_push_js_tells_the_page_when_a_token_refresh_fails(pages):
    """A refresh whose ``getToken`` failed (the user logged out, the backend down), or that the
    node answered ``refresh_error``, was retried in silence, the error dropped: the page learnt
    nothing until the node closed the connection with 4401 when the token expired.  ``onError``
    now gets each failure; the connection goes on and the refresh is tried again."""
    page = recording_page(pages)
    seen = page.evaluate("""async () => {
        const until = async (check) => { for (let i = 0; i < 300 && !check(); i++) await new Promise(r => setTimeout(r, 10)); };
        const errors = [];
        let calls = 0;
        const client = new PushClient({url: "ws://a.invalid/ws", token: "t", refreshRetryMs: 50,
                                       getToken: () => ++calls === 1 ? Promise.reject(new Error("logged out")) : "t" + calls,
                                       onError: e => errors.push([e.type, e.reason, e.error ? e.error.message : null, e.retryIn])});
        client.start();
        const ws = window.opened[0];
        ws.readyState = 1;
        ws.onmessage({data: JSON.stringify({type: "hello", node: "a", user: "u", conn: "c", expires_in: 0})});  // refresh in 1 s
        await until(() => (ws.sent || []).length > 0);
        ws.onmessage({data: JSON.stringify({type: "refresh_error", reason: "auth unavailable"})});
        const state = client.state;
        client.stop();
        return {errors, sent: ws.sent, state};
    }""")
    assert [e[:3] for e in seen["errors"]] == [["refresh", "getToken failed: logged out", "logged out"],
                                               ["refresh", "refresh_error: auth unavailable", None]]
    assert 0 <= seen["errors"][0][3] <= 50 and 0 <= seen["errors"][1][3] <= 100  # two backoff steps, full jitter
    assert seen["sent"] == [{"type": "refresh", "token": "t2"}] and seen["state"] == "connected"


def test_push_js_backs_off_between_failed_token_refreshes_with_full_jitter(pages):
    """A failed refresh (``getToken`` failed, or the node answered ``refresh_error``) was tried
    again every ``refreshRetryMs``, for as long as the failures went on: an auth or backend that
    was down got every page's refresh at that steady pace, all pages of one outage in step.  The
    retries now back off: the step doubles from ``refreshRetryMs`` up to ``refreshMaxMs``, each
    delay drawn between 0 and the step (full jitter), and a refresh the node takes starts over."""
    page = recording_page(pages, "Math.random = () => 0.5;")  # each delay: half its step
    seen = page.evaluate("""async () => {
        const until = async (check) => { for (let i = 0; i < 500 && !check(); i++) await new Promise(r => setTimeout(r, 10)); };
        const hello = {type: "hello", node: "a", user: "u", conn: "c", expires_in: 0};  // refresh in 1 s
        const errors = [], calls = [];
        let failing = true;
        const client = new PushClient({url: "ws://a.invalid/ws", token: "t", refreshRetryMs: 40, refreshMaxMs: 200,
                                       getToken: () => { calls.push(Date.now()); return failing ? Promise.reject(new Error("down")) : "t" + calls.length; },
                                       onError: e => errors.push([e.reason, e.retryIn])});
        client.start();
        const ws = window.opened[0];
        ws.readyState = 1;
        ws.onmessage({data: JSON.stringify(hello)});
        await until(() => errors.length >= 5);
        failing = false;
        await until(() => (ws.sent || []).length >= 1);
        ws.onmessage({data: JSON.stringify({type: "refresh_error", reason: "auth unavailable"})});
        await until(() => ws.sent.length >= 2);
        failing = true;
        ws.onmessage({data: JSON.stringify({type: "refreshed", expires_at: 0, expires_in: 0})});  // next refresh in 1 s
        await until(() => errors.length >= 7);
        client.stop();
        const gaps = calls.slice(1, 5).map((at, n) => at - calls[n]);
        const bounds = [0, 1, 2, 3, 4].map(a => [PushClient.backoffDelay(a, 40, 200, 0, true), PushClient.backoffDelay(a, 40, 200, 1, true)]);
        return {errors, gaps, bounds, sent: ws.sent.length};
    }""")
    retry_in = [retry for _, retry in seen["errors"]]
    # getToken failed five times (steps 40, 80, 160, 200, 200 ms), then the node's refresh_error
    # (200, capped), then, after a refresh the node took, getToken again: back to the first step.
    assert retry_in == [20, 40, 80, 100, 100, 100, 20], f"refresh retries did not back off: {seen['errors']}"
    assert seen["errors"][5][0] == "refresh_error: auth unavailable" and seen["sent"] == 2
    assert seen["bounds"] == [[0, 40], [0, 80], [0, 160], [0, 200], [0, 200]], "not full jitter: each delay is drawn in [0, step]"
    # Each getToken call came after the delay onError announced.
    assert all(gap >= retry - 5 for gap, retry in zip(seen["gaps"], retry_in)), f"calls {seen['gaps']} ms apart, announced {retry_in}"


def test_push_js_backs_off_between_refreshes_the_node_never_answers_and_keeps_the_connection(pages):
    """A refresh the node never answers (neither ``refreshed`` nor ``refresh_error``) is a failed
    refresh: after ``refreshRetryMs + connectTimeoutMs`` without an answer it is tried again after
    the same backoff step as a ``refresh_error`` (full jitter, doubling up to ``refreshMaxMs``),
    which ``onError`` announces, and the connection goes on (no reconnect).  It was sent again at
    once, with ``retryIn: 0`` announced, at the steady pace of the answer's wait for as long as the
    node kept silent: a getToken call and a refresh from every page of such a node, in step."""
    page = recording_page(pages, "Math.random = () => 0.5;")  # each delay: half its step
    seen = page.evaluate("""async () => {
        const until = async (check) => { for (let i = 0; i < 500 && !check(); i++) await new Promise(r => setTimeout(r, 10)); };
        const errors = [], calls = [];
        const client = new PushClient({url: "ws://a.invalid/ws", token: "t", refreshRetryMs: 40, refreshMaxMs: 200, connectTimeoutMs: 60,
                                       getToken: () => { calls.push(Date.now()); return "t" + calls.length; },
                                       onError: e => errors.push([e.reason, e.retryIn])});
        client.start();
        const ws = window.opened[0];
        ws.readyState = 1;
        ws.onmessage({data: JSON.stringify({type: "hello", node: "a", user: "u", conn: "c", expires_in: 0})});  // refresh in 1 s
        await until(() => errors.length >= 4);
        const state = client.state;
        client.stop();
        const gaps = calls.slice(1, 5).map((at, n) => at - calls[n]);
        return {errors, gaps, sent: ws.sent.length, opened: window.opened.length, state};
    }""")
    assert [reason for reason, _ in seen["errors"]] == ["no answer to refresh within 100 ms"] * 4
    retry_in = [retry for _, retry in seen["errors"]]
    assert retry_in == [20, 40, 80, 100], f"unanswered refreshes did not back off: {seen['errors']}"
    # Each refresh waited 100 ms for its answer, then the delay onError announced before getToken.
    assert all(gap >= 100 + retry - 5 for gap, retry in zip(seen["gaps"], retry_in)), f"calls {seen['gaps']} ms apart, announced {retry_in}"
    assert seen["opened"] == 1 and seen["state"] == "connected", "an unanswered refresh made the client reconnect"


#: Lists the network and visibility listeners a page holds on ``window`` and ``document``
#: (``window.listening()``, their event types, sorted), to show that none stays behind a stopped client.
COUNTED_LISTENERS = """
window.listeners = new Map();
for (const target of [window, document]) {
  const add = target.addEventListener, remove = target.removeEventListener;
  target.addEventListener = function (type, fn, options) { window.listeners.set(fn, type); return add.call(this, type, fn, options); };
  target.removeEventListener = function (type, fn, options) { window.listeners.delete(fn); return remove.call(this, type, fn, options); };
}
window.listening = () => [...window.listeners.values()].filter(type => ["online", "offline", "visibilitychange"].includes(type)).sort();
"""


#: Keeps the ids of the timers a page has pending (``window.timers``): set and neither fired nor cleared.
TRACKED_TIMERS = """
window.timers = new Set();
const setTimer = window.setTimeout, clearTimer = window.clearTimeout;
window.setTimeout = function (fn, ms, ...args) {
  const id = setTimer.call(window, (...a) => { window.timers.delete(id); fn(...a); }, ms, ...args);
  window.timers.add(id);
  return id;
};
window.clearTimeout = function (id) { window.timers.delete(id); return clearTimer.call(window, id); };
"""


def test_push_js_stops_for_good_when_get_token_says_the_user_is_logged_out(pages):
    """A page had no way to tell push.js that its user logged out: a ``getToken`` that failed was
    retried with backoff for ever, before a connect and for a refresh alike.  A ``getToken`` that
    throws ``PushClient.UnauthorizedError`` (centrifuge-js's convention) now stops the client for
    good: ``stopped`` with reason ``unauthorized``, its connection closed, no timer or listener
    left, no further ``getToken`` call; a later ``start()`` asks ``getToken`` again."""
    page = recording_page(pages, COUNTED_LISTENERS, TRACKED_TIMERS)
    seen = page.evaluate("""async () => {
        const pause = ms => new Promise(resolve => setTimeout(resolve, ms));
        const until = async (check) => { for (let i = 0; i < 200 && !check(); i++) await pause(10); };
        const hello = expiresIn => JSON.stringify({type: "hello", node: "a", user: "u", conn: "c", expires_in: expiresIn, ping: true});
        const stoppedOf = statuses => statuses.filter(s => s.state === "stopped").map(s =>
            ["code" in s, s.reason, s.error instanceof PushClient.UnauthorizedError, s.error && s.error.name]);
        const seen = {};

        // A connection revoked (4401); the page's backend says the user is logged out.
        let loggedIn = false, calls = 0;
        const statuses = [], errors = [];
        const revoked = new PushClient({url: "ws://a.invalid/ws", token: "kept", tokenJitterMs: 20,
                                        getToken: () => { calls += 1; if (!loggedIn) throw new PushClient.UnauthorizedError(); return "new" + calls; },
                                        onStatus: s => statuses.push(s), onError: e => errors.push(e)});
        revoked.start();
        window.opened[0].readyState = 1;
        window.opened[0].onmessage({data: hello(3600)});
        window.opened[0].onclose({code: 4401, reason: "token revoked"});
        await until(() => revoked.state === "stopped");
        await pause(300);
        seen.revoked = {state: revoked.state, stopped: stoppedOf(statuses), calls, opened: window.opened.length,
                        timers: window.timers.size, listening: window.listening(), errors: errors.length};
        loggedIn = true;
        revoked.start();
        await until(() => window.opened.length > 1);
        seen.restartedWith = new URL(window.opened[1].url).searchParams.get("token");
        revoked.stop();

        // An open connection whose refresh finds the user logged out; the error is another copy
        // of push.js's UnauthorizedError (a page that bundles it twice): known by its name.
        const statuses2 = [], errors2 = [];
        const foreign = Object.assign(new Error("logged out"), {name: "UnauthorizedError"});
        const refreshing = new PushClient({url: "ws://a.invalid/ws", token: "t", idleMs: 60000,
                                           getToken: () => Promise.reject(foreign),
                                           onStatus: s => statuses2.push(s), onError: e => errors2.push(e)});
        refreshing.start();
        const ws = window.opened[window.opened.length - 1];
        ws.readyState = 1;
        ws.onmessage({data: hello(0)});  // a refresh in 1 s
        await until(() => refreshing.state === "stopped");
        await pause(300);
        seen.refresh = {state: refreshing.state, stopped: stoppedOf(statuses2), closed: [ws.closed, ws.closeCode],
                        opened: window.opened.length, timers: window.timers.size, listening: window.listening(), errors: errors2.length};
        return seen;
    }""")
    assert seen["revoked"] == {"state": "stopped", "stopped": [[False, "unauthorized", True, "UnauthorizedError"]], "calls": 1,
                               "opened": 1, "timers": 0, "listening": [], "errors": 0}, f"after a 4401: {seen['revoked']}"
    assert seen["restartedWith"] == "new2", "start() after a log-out reused the token it had or asked no new one"
    assert seen["refresh"] == {"state": "stopped", "stopped": [[False, "unauthorized", False, "UnauthorizedError"]], "closed": [True, 1000],
                               "opened": 3, "timers": 0, "listening": [], "errors": 0}, f"on a refresh: {seen['refresh']}"


def test_push_js_started_again_after_a_log_out_resumes_nothing_of_the_user_who_left(pages):
    """The README's flow after a log-out is ``start()`` again once a user logged in, maybe another
    one on the same page: the client kept the stream position and the ids seen of the user who
    left, so the next user connected with ``since`` = the previous user's newest id (the node
    replayed none of the new user's older unacked messages: the inbox was skipped) and a message
    sent to both users was dropped as a repeat, though the new user had never seen it."""
    page = recording_page(pages)
    seen = page.evaluate("""async () => {
        const pause = ms => new Promise(resolve => setTimeout(resolve, ms));
        const until = async (check) => { for (let i = 0; i < 200 && !check(); i++) await pause(10); };
        const hello = user => JSON.stringify({type: "hello", node: "a", user, conn: "c", expires_in: 3600});
        let user = "ann";
        const got = [];
        const client = new PushClient({url: "ws://a.invalid/ws", token: "ann-token", tokenJitterMs: 20,
                                       getToken: () => { if (user === null) throw new PushClient.UnauthorizedError(); return user + "-token"; },
                                       onMessage: (data, message) => got.push([user, message.id])});
        client.start();
        const first = window.opened[0];
        first.readyState = 1;
        first.onmessage({data: hello("ann")});
        first.onmessage({data: JSON.stringify({type: "message", id: "0190f00000000000000000aa", data: "to ann and bob"})});
        user = null;  // ann logged out: her token is revoked
        first.onclose({code: 4401, reason: "token revoked"});
        await until(() => client.state === "stopped");
        user = "bob";
        client.start();
        await until(() => window.opened.length > 1);
        const second = window.opened[1];
        second.readyState = 1;
        second.onmessage({data: hello("bob")});
        second.onmessage({data: JSON.stringify({type: "message", id: "0190f00000000000000000aa", data: "to ann and bob"})});
        client.stop();
        const url = new URL(second.url);
        return {token: url.searchParams.get("token"), since: url.searchParams.get("since"), got};
    }""")
    assert seen["token"] == "bob-token"
    assert seen["since"] is None, f"bob's connection resumed from ann's stream: since={seen['since']}"
    assert seen["got"] == [["ann", "0190f00000000000000000aa"], ["bob", "0190f00000000000000000aa"]], seen["got"]


def test_push_js_back_online_reconnects_at_once_and_pings_an_open_connection(pages):
    """A page whose network went away waited out its backoff (up to ``maxMs``, 30 s) after the
    network came back, and kept a connection the network change may have killed until its idle
    ping.  The browser's ``online`` event now cuts the wait short and pings an open connection;
    the listener goes when the client stops, however often a page starts and stops one."""
    page = recording_page(pages, COUNTED_LISTENERS)
    seen = page.evaluate("""async () => {
        const pause = ms => new Promise(resolve => setTimeout(resolve, ms));
        const waits = [];
        const client = new PushClient({url: "ws://a.invalid/ws", token: "t", initialMs: 60000, maxMs: 60000, goAwayJitterMs: 20,
                                       idleMs: 60000, onStatus: s => { if (s.state === "waiting") waits.push(s.retryIn); }});
        client.start();
        window.opened[0].onclose({code: 1006, reason: ""});
        await pause(50);
        const before = window.opened.length;
        window.dispatchEvent(new Event("online"));
        await pause(100);
        const after = window.opened.length;
        const ws = window.opened[after - 1];
        ws.readyState = 1;
        ws.onmessage({data: JSON.stringify({type: "hello", node: "a", user: "u", conn: "c", expires_in: 3600, ping: true})});
        window.dispatchEvent(new Event("online"));
        ws.onmessage({data: JSON.stringify({type: "pong"})});  // answered: the next online event pings again
        window.dispatchEvent(new Event("online"));
        const sent = (ws.sent || []).slice();
        const running = window.listening();
        client.stop();
        for (let n = 0; n < 50; n++) { client.start(); client.stop(); }
        const stoppedByNode = new PushClient({url: "ws://a.invalid/ws", token: "t"});
        stoppedByNode.start();
        window.opened[window.opened.length - 1].onclose({code: 4500, reason: "bad request"});
        return {waits, before, after, sent, running, left: window.listening()};
    }""")
    assert seen["waits"][0] >= 30_000 and (seen["before"], seen["after"]) == (1, 2), f"the online event did not cut the wait short: {seen}"
    assert seen["sent"] == [{"type": "ping"}, {"type": "ping"}], "a ping answered kept the next online event from pinging"
    assert seen["running"] == ["online", "visibilitychange"] and seen["left"] == [], f"listeners left behind: {seen}"


#: Makes ``document.visibilityState`` the page's to set: ``window.show("hidden" | "visible")`` sets
#: it and fires ``visibilitychange``, as a browser does when the tab is hidden or shown.
VISIBILITY = """
window.visibility = "visible";
Object.defineProperty(document, "visibilityState", {configurable: true, get: () => window.visibility});
Object.defineProperty(document, "hidden", {configurable: true, get: () => window.visibility === "hidden"});
window.show = state => { window.visibility = state; document.dispatchEvent(new Event("visibilitychange")); };
"""


def test_push_js_tab_shown_again_reconnects_at_once_and_pings_an_open_connection(pages):
    """A hidden tab's timers are throttled (Chrome runs them once a minute after five minutes
    hidden), so a reconnect waiting a backoff step, or the idle ping that would notice a connection
    that died meanwhile, came minutes after the user looked at the tab again.  The tab shown again
    (``visibilitychange`` to visible) now does what the ``online`` event does: the wait is cut
    short and an open connection is pinged; the tab hidden does nothing."""
    page = recording_page(pages, COUNTED_LISTENERS, VISIBILITY)
    seen = page.evaluate("""async () => {
        const pause = ms => new Promise(resolve => setTimeout(resolve, ms));
        const client = new PushClient({url: "ws://a.invalid/ws", token: "t", initialMs: 60000, maxMs: 60000, goAwayJitterMs: 20, idleMs: 60000});
        client.start();
        const running = window.listening();
        window.opened[0].onclose({code: 1006, reason: ""});  // a wait of 30 to 60 s
        window.show("hidden");  // no reason to hurry
        await pause(50);
        const hidden = window.opened.length;
        window.show("visible");
        await pause(100);
        const shown = window.opened.length;
        const ws = window.opened[shown - 1];
        ws.readyState = 1;
        ws.onmessage({data: JSON.stringify({type: "hello", node: "a", user: "u", conn: "c", expires_in: 3600, ping: true})});
        window.show("hidden");
        const sentHidden = (ws.sent || []).length;
        window.show("visible");
        const sent = (ws.sent || []).slice();
        client.stop();
        return {running, hidden, shown, sentHidden, sent, left: window.listening()};
    }""")
    assert (seen["hidden"], seen["shown"]) == (1, 2), f"showing the tab did not cut the reconnect's wait short: {seen}"
    assert seen["sentHidden"] == 0 and seen["sent"] == [{"type": "ping"}], f"showing the tab did not ping the open connection: {seen}"
    assert seen["running"] == ["online", "visibilitychange"] and seen["left"] == [], f"listeners: {seen}"


@REDIS_ONLY
def test_a_page_for_a_name_no_token_can_be_issued_for_stops_and_says_why_instead_of_asking_again(cluster, pages):
    """``?user=`` skips the form's checks: a name with a space gets 400 from ``/api/token``, which
    the page passed to push.js as a plain error, so push.js asked for a token again and again."""
    demo = DemoPage(cluster, cluster.node_ports)
    try:
        page = pages(demo.page_url("bad%20name"))
        page.wait_for_function("window.demo.client && window.demo.client.state === 'stopped'")
        time.sleep(3.0)  # push.js's first retry would come within this
        statuses = page.evaluate("window.demo.statuses.map((s) => [s.state, s.reason || null])")
        assert statuses[-1] == ["stopped", "unauthorized"] and "waiting" not in [state for state, _ in statuses], statuses
        assert "cannot be a user name" in page.text_content("#connect-error")
    finally:
        demo.stop()


@REDIS_ONLY
def test_two_users_on_two_nodes_each_see_only_their_own_messages(cluster, pages):
    demo = DemoPage(cluster, cluster.node_ports)
    try:
        ann, ben = unique("ann"), unique("ben")
        port_a, port_b = cluster.node_ports
        page_a = pages(demo.page_url(ann, port_a))
        page_b = pages(demo.page_url(ben, port_b))
        wait_live(page_a, port_a)
        wait_live(page_b, port_b)

        # Ann sends Ben a message with the page's form, as a person would.
        page_a.fill("#to", ben)
        page_a.fill("#text", "hello from ann's form")
        page_a.click("#send")
        page_a.wait_for_function("document.querySelector('#send-result').textContent.startsWith('collected as')")
        sent = {
            "for ann": demo.send(ann, "for ann"),
            "for ben": demo.send(ben, "for ben"),
            "for both": demo.send(f"{ann}, {ben}", "for both"),
            "for everyone": demo.send("*", "for everyone"),
            "last for ann": demo.send(ann, "last for ann"),
            "last for ben": demo.send(ben, "last for ben"),
        }
        got_a, got_b = wait_count(page_a, 4), wait_count(page_b, 5)
        assert texts(got_a) == ["for ann", "for both", "for everyone", "last for ann"]
        assert texts(got_b) == ["hello from ann's form", "for ben", "for both", "for everyone", "last for ben"]
        assert [m["id"] for m in got_a] == [sent[t] for t in texts(got_a)]
        assert got_b[0]["data"]["from"] == ann
        assert page_a.locator("#messages tr[data-id]").count() == 4
        assert page_b.locator(f"#messages tr[data-id='{sent['for ben']}']").count() == 1
        assert {m["node"] for m in got_a} == {f"127.0.0.1:{port_a}"} and {m["node"] for m in got_b} == {f"127.0.0.1:{port_b}"}
    finally:
        demo.stop()


@REDIS_ONLY
def test_a_page_whose_node_is_killed_moves_to_another_node_and_loses_nothing(cluster, pages):
    doomed = cluster.start_node()
    demo = DemoPage(cluster, [doomed.port, *cluster.node_ports])
    try:
        user = unique("kim")
        page = pages(demo.page_url(user, doomed.port))
        wait_live(page, doomed.port)
        ids = [demo.send(user, f"m{n}") for n in range(3)]
        wait_own(page, user, 3)

        doomed.kill()  # SIGKILL: no goodbye, the browser sees the connection drop (1006)
        ids += [demo.send(user, f"m{n}") for n in range(3, 6)]  # while the page is reconnecting
        page.wait_for_function(f"window.demo.client.state === 'live' && window.demo.client.node !== '127.0.0.1:{doomed.port}'")
        ids += [demo.send(user, f"m{n}") for n in range(6, 8)]
        received = wait_own(page, user, 8)

        assert texts(received) == [f"m{n}" for n in range(8)]  # each once, in order
        assert [m["id"] for m in received] == ids
        new_node = page.text_content("#node")
        assert new_node in {f"127.0.0.1:{port}" for port in cluster.node_ports}
        assert {m["node"] for m in received[6:]} == {new_node}
        closes = page.evaluate("window.demo.statuses.filter(s => s.state === 'waiting').map(s => [s.code, s.wasConnected])")
        assert closes[0] == [1006, True]
        resumes = page.evaluate("window.demo.statuses.filter(s => s.state === 'live').map(s => s.since)")
        assert resumes[:2] == [None, ids[2]]  # the inbox first, then after the last id it saw
        # The resume replays from a little before ``since``, the since message included: push.js
        # dropped at least that repeat, and the page lists every id once.
        assert page.evaluate("window.demo.client.stats.duplicates") >= 1
        for message_id in ids:
            assert page.locator(f"#messages tr[data-id='{message_id}']").count() == 1
    finally:
        demo.stop()


@REDIS_ONLY
def test_a_page_on_a_node_going_away_reconnects_at_once_to_another_node(cluster, pages):
    draining = cluster.start_node()
    demo = DemoPage(cluster, [draining.port, *cluster.node_ports])
    try:
        user = unique("gus")
        page = pages(demo.page_url(user, draining.port))
        wait_live(page, draining.port)
        first = demo.send(user, "before")
        wait_own(page, user, 1)

        assert draining.terminate(timeout=20) == 0  # SIGTERM: the node closes its clients with 1001
        page.wait_for_function(f"window.demo.client.state === 'live' && window.demo.client.node !== '127.0.0.1:{draining.port}'")
        second = demo.send(user, "after")
        received = wait_own(page, user, 2)

        assert [(m["id"], m["data"]["text"]) for m in received] == [(first, "before"), (second, "after")]
        waiting = page.evaluate("window.demo.statuses.filter(s => s.state === 'waiting')")
        assert waiting[0]["code"] == CloseCode.GOING_AWAY
        assert waiting[0]["next"] != f"ws://127.0.0.1:{draining.port}/ws"
        assert waiting[0]["retryIn"] <= page.evaluate("PushClient.DEFAULTS.goAwayJitterMs")  # no backoff
    finally:
        demo.stop()


@REDIS_ONLY
def test_push_js_gets_a_new_token_after_4401_and_stops_for_good_after_4500(cluster, pages):
    with blank_demo(cluster, pages) as (_, page):
        url = f"ws://127.0.0.1:{cluster.node_ports[0]}/ws"
        user = unique("tok")
        page.evaluate("""([url, user]) => {
            const statuses = [];
            window.refreshed = new PushClient({
                url, token: "not-a-token", onStatus: (s) => statuses.push(Object.assign({}, s)),
                getToken: () => fetch("api/token", {method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify({user})}).then(r => r.json()).then(a => a.token),
            });
            window.refreshed.statuses = statuses;
            window.refreshed.start();
        }""", [url, user])
        page.wait_for_function("window.refreshed.state === 'live'")
        refreshed = page.evaluate("({stats: window.refreshed.stats, codes: window.refreshed.statuses.filter(s => s.state === 'waiting').map(s => s.code)})")
        assert refreshed["codes"] == [CloseCode.UNAUTHORIZED]
        assert refreshed["stats"]["tokens"] == 1 and refreshed["stats"]["connections"] == 1

        token = cluster.token(user)
        page.evaluate("""([url, token]) => {
            window.broken = new PushClient({url, token, since: "not-a-message-id", getToken: () => { throw new Error("not asked"); }});
            window.broken.start();
        }""", [url, token])
        page.wait_for_function("window.broken.state === 'stopped'")
        page.wait_for_timeout(2000)  # four times the first backoff step: a reconnect would have happened
        stats = page.evaluate("window.broken.stats")
        assert stats["attempts"] == 1 and stats["connections"] == 0 and stats["tokens"] == 0
        assert page.evaluate("window.broken.state") == "stopped"


@REDIS_ONLY
def test_push_js_whose_get_token_gives_the_whole_auth_answer_opens_no_socket_and_says_to_return_its_token_field(cluster, pages):
    """``getToken: () => fetch(...).then(r => r.json())``, the backend's answer rather than the token
    in it: push.js connected with ``token=[object Object]`` and got 4401 ``token invalid: malformed
    (Not enough segments)`` on every try, which says nothing of the mistake (and cost auth a check
    each time).  It now opens no socket and reports, as a failed ``getToken``, what it gave."""
    with blank_demo(cluster, pages) as (_, page):
        url = f"ws://127.0.0.1:{cluster.node_ports[0]}/ws"
        page.evaluate("""([url, user]) => {
            window.whole = new PushClient({url, initialMs: 50, getToken: () => fetch("api/token", {method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify({user})}).then(r => r.json()),
                                           onStatus: (s) => { if (s.state === "waiting") (window.whole.waits = window.whole.waits || []).push([s.code, s.reason]); }});
            window.whole.start();
        }""", [url, unique("whole")])
        page.wait_for_function("(window.whole.waits || []).length >= 2")
        waits, stats = page.evaluate("[window.whole.waits, window.whole.stats]")
        page.evaluate("window.whole.stop()")
        assert waits[0] == [None, 'getToken gave an object, not a token string: return its token field (the auth service\'s answer holds the token in "token")']
        assert stats["attempts"] == 0 and stats["tokens"] == 0


@REDIS_ONLY
def test_push_js_refreshes_its_token_on_the_open_connection_before_it_expires(cluster, pages):
    with blank_demo(cluster, pages) as (demo, page):
        url = f"ws://127.0.0.1:{cluster.node_ports[1]}/ws"
        user = unique("fresh")
        # Tokens of 3 s: push.js refreshes each between a half and a quarter of the way through
        # (refreshAheadMs is more than half; refreshDelay).
        start_client(page, "fresh", url, user, ttl=3)
        page.wait_for_function("window.fresh.state === 'live'")
        # Each refresh comes at least 1 s after the one before: six take 6 s, past the first
        # token's expiry (3 to 4 s, auth rounds it up to a second) and the 1 s grace.
        page.wait_for_function("window.fresh.stats.refreshes >= 6", timeout=60000)
        stats = page.evaluate("window.fresh.stats")
        assert stats["connections"] == 1 and stats["attempts"] == 1, f"push.js reconnected instead of refreshing: {stats}"
        assert stats["tokens"] >= 7
        demo.send(user, "after the refreshes")
        page.wait_for_function("window.fresh.got.length >= 1")
        assert [item["text"] for item in page.evaluate("window.fresh.got")] == ["after the refreshes"]
        assert page.evaluate("window.fresh.state") == "live" and page.evaluate("window.fresh.stats.connections") == 1


@REDIS_ONLY
def test_push_js_acks_a_replay_in_frames_of_ids_and_the_node_records_each_ack(cluster, pages):
    """The node's hello says ``ack_ids`` (145: as many as fit in ``MAX_FRAME_BYTES``): the acks of
    the inbox replay, whose frames come together, go in ``ids`` frames of at most that many
    instead of one frame each, every message acked once, and no frame too big for the node."""
    count = 160
    with blank_demo(cluster, pages) as (demo, page):
        user = unique("ida")
        # While the user is offline: the inbox.
        ids = cluster.send("tasks.collect_many", messages=[{"to": user, "data": {"text": f"m{n}"}} for n in range(count)]).get(timeout=30)
        sent: list[dict] = []
        page.on("websocket", lambda ws: ws.on("framesent", lambda payload: sent.append(json.loads(payload))))
        start_client(page, "ida", f"ws://127.0.0.1:{cluster.node_ports[0]}/ws", user)
        page.wait_for_function("n => window.ida.got.length >= n", arg=count)
        assert [item["text"] for item in page.evaluate("window.ida.got")] == [f"m{n}" for n in range(count)]
        deadline = time.monotonic() + 20
        while not all("acked" in cluster.status(m)["recipients"][user] for m in ids):
            assert time.monotonic() < deadline, "not every message of the replay was recorded acked within 20 s"
            time.sleep(0.2)

        acks = [frame for frame in sent if frame.get("type") == "ack"]
        acked = [message_id for frame in acks for message_id in frame.get("ids", [frame.get("id")])]
        assert sorted(acked) == sorted(ids), f"each message acked once: {acks}"
        assert any(len(frame.get("ids", ())) > 1 for frame in acks), f"no ack frame of several ids: {acks}"
        assert max(len(frame.get("ids", ())) for frame in acks) <= 145 and len(acks) < count
        assert page.evaluate("window.ida.state") == "live" and page.evaluate("window.ida.stats.connections") == 1


@REDIS_ONLY
def test_push_js_keeps_an_idle_connection_to_a_real_node_that_answers_its_pings(cluster, pages):
    with blank_demo(cluster, pages) as (demo, page):
        url = f"ws://127.0.0.1:{cluster.node_ports[0]}/ws"
        user = unique("idle")
        start_client(page, "idle", url, user, idleMs=200, pongTimeoutMs=1000)
        page.wait_for_function("window.idle.state === 'live'")
        page.wait_for_function("window.idle.stats.pings >= 8")  # about 2 s: twice the pong timeout
        stats = page.evaluate("window.idle.stats")
        assert stats["connections"] == 1 and stats["attempts"] == 1, f"push.js took the node's connection for lost: {stats}"
        demo.send(user, "after the pings")
        page.wait_for_function("window.idle.got.length >= 1")
        assert [item["text"] for item in page.evaluate("window.idle.got")] == ["after the pings"]
        page.evaluate("window.idle.stop()")

/*
 * push.js: the browser client of the push platform.  No dependencies; served by every push node
 * at /static/push.js.  Load it with a <script> tag (it defines window.PushClient) or require() it.
 *
 *   const push = new PushClient({
 *     url: ["wss://push-a.example.com/ws", "wss://push-b.example.com/ws"], // one URL, or several
 *     getToken: () => fetch("/push-token", {method: "POST"}).then(r => {
 *       if (r.status === 401) throw new PushClient.UnauthorizedError();  // logged out: stop for good
 *       return r.json();
 *     }).then(b => b.token),
 *     onMessage: (data, message) => console.log(message.id, data),
 *     onStatus: (status) => console.log(status.state, status.node || "", status.code || ""),
 *     onError: (error) => console.warn(error.type, error.reason),  // a token refresh that failed
 *   });
 *   push.start();
 *
 * What it does (the README's "Browser client" section says the same):
 *
 * - Connects to ws://NODE/ws?token=T, then reconnects after every close or failed connect, with
 *   ``since`` = the greatest message id it has seen, so the node replays what it missed.
 * - Acks every message frame once the page's onMessage returned ({"type": "ack", "id": ...}, or
 *   where the node's hello says ack_ids, the acks of a burst together: {"type": "ack", "ids": [...]}),
 *   drops repeats by id (a resume replays a little before ``since``), and hands messages to the page
 *   in the order the node sends them, which is the order they were collected.
 * - Several URLs act like a load balancer in front of the nodes: it starts with the first, and
 *   moves to the next after a failed connect or a close.  A node that closed with 1001 ("going
 *   away") is skipped for ``awayMs``: when every other URL fails too, the client stays on the one
 *   it has rather than going back to it; with one URL it waits a backoff step instead of coming
 *   straight back.
 * - Close codes, as the README's table says:
 *     1001           reconnect now (another URL), with since;
 *     4401           call getToken() for a new token, then reconnect: within tokenJitterMs when
 *                    the refused token was a kept one (spread, as a mass revocation closes many
 *                    pages at once), with backoff when tokens just got keep being refused;
 *     4500-4999      a client bug: stop, report state "stopped", never reconnect;
 *     anything else  (1006 connection lost, 1009, 1011, 1013, 4000-4499 ...): reconnect after a
 *                    jittered exponential backoff (initialMs doubling up to maxMs, each delay drawn
 *                    between half of it and all of it), on the next URL; after a 4429 whose reason
 *                    says "retry in N s" (the user's connect rate, MAX_USER_CONNECTS, which every
 *                    node applies), not before N s (and up to initialMs more): retryAfterMs.
 *   The backoff starts over once a connection has stayed live (past its "resumed" frame) for
 *   healthyMs, and on each start().  A getToken() that fails before a connect (throws, rejects,
 *   gives no token or does not settle in connectTimeoutMs) is reported as "waiting" with no code
 *   (no socket closed), its reason and error, and tried again on the same URL after a backoff step.
 * - Token refresh: the hello frame says when the connection's token expires (expires_in).  Before
 *   that (refreshAheadMs before, at most halfway through what is left, and earlier again by a
 *   random part of up to half refreshAheadMs, so that pages whose tokens expire together spread
 *   their refreshes: refreshDelay) it calls getToken() and
 *   sends the new token ({"type": "refresh", "token": ...}) on the open connection, which goes on
 *   with it; the node answers "refreshed" with the new expiry, and the next refresh is scheduled
 *   from it.  When the node could not check the token ("refresh_error": auth unavailable), did
 *   not answer within refreshRetryMs + connectTimeoutMs, or getToken() failed, it tries again after a backoff step (refreshRetryMs doubling up to
 *   refreshMaxMs, each delay drawn between 0 and the step: full jitter, so that the pages of one
 *   auth or backend outage do not all retry in step), and tells the page through onError
 *   ({type: "refresh", reason, error, retryIn}): the connection goes on meanwhile, until the node
 *   closes it with 4401 once the token expired.  Without getToken there is no refresh:
 *   the node closes the connection with 4401 once the token expired (after TOKEN_EXPIRY_GRACE).
 *   A reconnect after the token expired (by what the node said) gets a new one before it connects.
 * - Logged out: a getToken() that throws (or rejects with) PushClient.UnauthorizedError (or any
 *   error named "UnauthorizedError", such as another copy of push.js's), before a
 *   connect or for a refresh, stops the client for good, as centrifuge-js does: the open
 *   connection (if any) is closed, every timer and listener goes, the token is dropped, and
 *   onStatus gets state "stopped" with reason "unauthorized" and the error (no code: no node
 *   closed anything).  start() again (once a user logged in) asks getToken for a token first,
 *   and starts from that user's inbox (the stream position and the ids seen are dropped too).
 * - Liveness: after idleMs without a frame it sends {"type": "ping"}; the node answers "pong"
 *   (only to a node whose hello frame says "ping": true; an earlier node would close with 4500).  A
 *   connection that brings no frame within pongTimeoutMs of a ping is closed and counts as lost
 *   (1006): the client reconnects, as after any lost connection.
 * - Back online: the browser's "online" event (the network came back, a laptop woke up) cuts a
 *   reconnect that waits a backoff step short (it goes within goAwayJitterMs instead), and on an
 *   open connection that answers pings sends one at once, so a connection the network change
 *   killed is noticed within pongTimeoutMs.  The tab shown again ("visibilitychange" to visible)
 *   does the same: a hidden tab's timers are throttled (to once a minute in Chrome), so a
 *   reconnect's wait or the idle ping that would notice a dead connection may be minutes late.
 *   The listeners are added by start() and removed when the client stops (stop(), or a close code
 *   that stops it): a page may start and stop clients freely.
 *
 * Threading: browsers run all of this on the page's one event loop.
 */
(function (root, factory) {
  "use strict";
  var PushClient = factory();
  if (typeof module === "object" && module.exports) {
    module.exports = PushClient;
  } else {
    root.PushClient = PushClient;
  }
})(typeof self !== "undefined" ? self : this, function () {
  "use strict";

  var DEFAULTS = {
    initialMs: 500, // first backoff step (a delay is drawn in [step/2, step])
    maxMs: 30000, // backoff cap
    healthyMs: 5000, // a connection live this long resets the backoff
    awayMs: 30000, // how long a URL that said 1001 is skipped
    goAwayJitterMs: 500, // after a 1001, reconnect within this (spreads a drained node's clients)
    tokenJitterMs: 1000, // after a 4401, call getToken within this (spreads the pages of a mass revocation)
    connectTimeoutMs: 10000, // a handshake (or a getToken call) not done in this time counts as a failed one
    dedupWindow: 10000, // how many message ids are remembered to drop repeats
    refreshAheadMs: 60000, // refresh the token this long before it expires (at most half its remaining life)
    refreshRetryMs: 5000, // first backoff step after a failed refresh (getToken failed, or the node said refresh_error)
    refreshMaxMs: 30000, // cap of the refresh retries' backoff (each delay is drawn in [0, step])
    idleMs: 25000, // after this long without a frame, send a ping (0: never)
    pongTimeoutMs: 10000, // a connection that brings no frame this long after a ping is lost: reconnect
  };

  /**
   * What a page's getToken throws (or rejects with) when the user is logged out, so that the
   * client stops for good instead of retrying: ``throw new PushClient.UnauthorizedError()``.
   */
  class UnauthorizedError extends Error {
    constructor(message) {
      super(message || "unauthorized: the user is logged out");
      this.name = "UnauthorizedError";
    }
  }

  /**
   * Whether ``error`` says the user is logged out: an UnauthorizedError of this copy of push.js,
   * or of another (a page that bundles push.js twice throws the class of the copy it imports):
   * by its name.
   */
  function loggedOut(error) {
    return error instanceof UnauthorizedError || (!!error && error.name === "UnauthorizedError");
  }

  /**
   * Run ``callback`` in a task of its own, after the tasks already queued (the message events of
   * frames that came together): a MessageChannel message where there is one (every browser, and
   * Node.js), else a timer of 0 ms.  Callbacks run in the order they were queued.
   */
  var nextTask = (function () {
    if (typeof MessageChannel === "undefined") return function (callback) { setTimeout(callback, 0); };
    var queued = [];
    var channel = null; // made at the first call: an open port would keep a Node.js process running
    return function (callback) {
      if (!channel) {
        channel = new MessageChannel();
        channel.port1.onmessage = function () {
          var next = queued.shift();
          if (next) next();
        };
        if (channel.port1.unref) channel.port1.unref(); // Node.js: nor does it once used
      }
      queued.push(callback);
      channel.port2.postMessage(null);
    };
  })();

  /** ``promise``, or a rejection once ``ms`` passed without it settling (a getToken whose request stalls). */
  function within(promise, ms) {
    var timer;
    var late = new Promise(function (resolve, reject) {
      timer = setTimeout(function () { reject(new Error("no answer within " + ms + " ms")); }, ms);
    });
    return Promise.race([Promise.resolve(promise), late]).finally(function () { clearTimeout(timer); });
  }

  /**
   * What to do after a close with ``code`` (1006 when the connection failed or was lost).
   * Returns {action: "reconnect" | "new-token" | "stop", soon: bool}: ``soon`` means "do not back
   * off on the first try" (1001 and a first 4401).
   */
  function closePolicy(code) {
    if (code >= 4500 && code <= 4999) return { action: "stop", soon: false };
    if (code === 4401) return { action: "new-token", soon: true };
    if (code === 1001) return { action: "reconnect", soon: true };
    return { action: "reconnect", soon: false };
  }

  /**
   * The delay before retry ``attempt`` (0 = first), step = initial * 2^attempt, capped at maxMs:
   * in [step/2, step] (reconnects), or in [0, step] with ``full`` jitter (token refresh retries,
   * which may come early: the open connection goes on meanwhile).
   */
  function backoffDelay(attempt, initialMs, maxMs, random, full) {
    var step = Math.min(maxMs, initialMs * Math.pow(2, Math.min(attempt, 30)));
    var r = random === undefined ? Math.random() : random;
    return full ? r * step : step / 2 + r * (step / 2);
  }

  /**
   * The least delay a close asks for: a 4429 for the user's connect rate (MAX_USER_CONNECTS) says
   * "retry in N s", and every node refuses the user until then; 0 for any other close.
   */
  function retryAfterMs(code, reason) {
    var found = code === 4429 && /retry in (\d+) s/.exec(reason || "");
    return found ? Number(found[1]) * 1000 : 0;
  }

  /**
   * The delay before refreshing a token that expires in ``remainingMs``: ``aheadMs`` before its
   * expiry (at most halfway through what is left), and earlier again by a random part of up to
   * half ``aheadMs`` (at most a quarter of what is left), so that the pages whose tokens were
   * issued together (all reconnected after a node went down) do not all ask the backend for a
   * token in the same second; never under a second, so a backend that hands out the same token
   * until it expires is not asked at ever shorter intervals as the expiry nears.
   */
  function refreshDelay(remainingMs, aheadMs, random) {
    var r = random === undefined ? Math.random() : random;
    var ahead = Math.min(aheadMs, remainingMs / 2) + r * Math.min(aheadMs / 2, remainingMs / 4);
    return Math.max(1000, remainingMs - ahead);
  }

  /** ``spec`` (ws:, wss:, http:, https: or a path relative to the page) as a ws:/wss: URL object. */
  function socketUrl(spec) {
    var base = typeof location !== "undefined" ? location.href : undefined;
    var url = new URL(spec, base);
    if (url.protocol === "http:") url.protocol = "ws:";
    if (url.protocol === "https:") url.protocol = "wss:";
    if (url.protocol !== "ws:" && url.protocol !== "wss:") {
      throw new Error("PushClient: " + spec + " is not a ws://, wss://, http:// or https:// URL");
    }
    return url;
  }

  function PushClient(options) {
    if (!(this instanceof PushClient)) return new PushClient(options);
    options = options || {};
    var urls = options.url || options.urls;
    if (!urls || (Array.isArray(urls) && urls.length === 0)) {
      throw new Error("PushClient: give url: one ws://HOST/ws URL, or a list of them");
    }
    if (!options.token && typeof options.getToken !== "function") {
      throw new Error("PushClient: give token (a string) or getToken (a function returning a token or a Promise of one)");
    }
    this.urls = (Array.isArray(urls) ? urls : [urls]).map(function (u) { return socketUrl(u).href; });
    this.options = {};
    for (var key in DEFAULTS) this.options[key] = options[key] === undefined ? DEFAULTS[key] : options[key];
    this.onMessage = options.onMessage || function () {};
    this.onStatus = options.onStatus || function () {};
    this.onError = options.onError || function () {};
    this._getToken = options.getToken || null;
    this._token = options.token || null;
    /** When this._token expires by the page's clock (from the node's expires_in), 0 when not known. */
    this._tokenExpiresAt = 0;
    /** The greatest message id seen: the next connection resumes after it. */
    this.lastId = options.since || null;
    /** The node of the current connection (from its hello frame), or null. */
    this.node = null;
    /** Counters, for pages that show them: connects tried, connections that got hello, repeats
     * dropped, tokens got from getToken, refreshes the node took, pings sent. */
    this.stats = { attempts: 0, connections: 0, duplicates: 0, tokens: 0, refreshes: 0, pings: 0 };
    this._index = 0;
    this._attempt = 0;
    this._away = {}; // url -> time until which it is skipped
    this._seen = new Set();
    this._seenOrder = [];
    this._ws = null;
    this._timer = null;
    this._timerAt = 0; // when this._timer fires
    this._notBefore = 0; // when a 4429's "retry in N s" lets it connect again (0: no such wait)
    this._conn = null; // the bookkeeping of this._ws (see _connect)
    this._running = false;
    var client = this;
    this._onOnline = function () { client._wake(); };
    this._onVisible = function () { if (document.visibilityState === "visible") client._wake(); };
    // Bumped by stop(): a _connect or _retry of an earlier run (one that waited for getToken, or
    // whose onStatus called stop() and start()) sees it changed and gives up.
    this._generation = 0;
    this._state = "idle";
  }

  /** The longest delay setTimeout takes as it is (a longer one fires at once). */
  var MAX_TIMER_MS = 2147483647;

  PushClient.closePolicy = closePolicy;
  PushClient.backoffDelay = backoffDelay;
  PushClient.retryAfterMs = retryAfterMs;
  PushClient.refreshDelay = refreshDelay;
  PushClient.DEFAULTS = DEFAULTS;
  PushClient.UnauthorizedError = UnauthorizedError;

  /** Connect, and keep connected until stop() or a terminal close code.  A new run backs off from the first step. */
  PushClient.prototype.start = function () {
    if (this._running) return this;
    this._running = true;
    this._attempt = 0;
    this._listen(true);
    this._connect();
    return this;
  };

  /**
   * Close the connection (the node sees code 1000) and never reconnect.  onStatus gets state
   * "stopped" with no code, as no close code stopped it: the page did.  Once stopped (by a
   * terminal close code, or before start()) it reports nothing: the status that stopped it stands.
   */
  PushClient.prototype.stop = function () {
    var wasRunning = this._running;
    this._halt("client stopped");
    if (wasRunning) this._status({ state: "stopped", reason: "stopped by the page" });
    return this;
  };

  /**
   * Stop running: no listener, no timer (the reconnect's, the connection's hello, refresh and
   * ping timers), and the connection closed with 1000 and ``reason``.  Every path that stops the
   * client goes through here; a _connect or _retry still under way sees the generation changed.
   */
  PushClient.prototype._halt = function (reason) {
    this._running = false;
    this._listen(false);
    this._generation += 1;
    clearTimeout(this._timer);
    this._timer = null;
    var conn = this._conn;
    if (conn) {
      clearTimeout(conn.helloTimer);
      clearTimeout(conn.refreshTimer);
      clearTimeout(conn.pingTimer);
    }
    this._conn = null;
    if (this._ws) {
      var ws = this._ws;
      this._ws = null;
      try { ws.close(1000, reason); } catch (e) { /* already closing */ }
    }
    this.node = null;
  };

  /**
   * getToken said the user is logged out (it threw UnauthorizedError): stop for good, without the
   * token, which a later start() must not reuse, nor the stream position and the ids seen: the
   * user who logs in next (maybe another one) starts from their inbox, and a message sent to both
   * is not a repeat for them.
   */
  PushClient.prototype._unauthorized = function (error, url) {
    this._token = null;
    this._tokenExpiresAt = 0;
    this.lastId = null;
    this._seen = new Set();
    this._seenOrder = [];
    this._halt("unauthorized");
    this._status({ state: "stopped", reason: "unauthorized", error: error, url: url });
  };

  /** The global that fires the browser's "online" event (the window, or a worker's self), if any. */
  function eventTarget() {
    return typeof self !== "undefined" && self && typeof self.addEventListener === "function" ? self : null;
  }

  /**
   * Add (on) or remove the client's listeners, the global's "online" and the document's
   * "visibilitychange" (none in a worker): one each while it runs, none once it stopped.
   */
  PushClient.prototype._listen = function (on) {
    var method = on ? "addEventListener" : "removeEventListener";
    var target = eventTarget();
    if (target) target[method]("online", this._onOnline);
    if (typeof document !== "undefined" && document && typeof document.addEventListener === "function") {
      document[method]("visibilitychange", this._onVisible);
    }
  };

  /**
   * The browser is back online, or the tab is shown again (its timers, throttled while it was
   * hidden, may be minutes late).  A reconnect waiting a backoff step goes now (within
   * goAwayJitterMs, so a network that comes back for many pages at once does not bring them all in
   * the same instant), the backoff itself unchanged, but never before the "retry in N s" of a
   * 4429 (the node refuses the user everywhere until then); an open connection that answers
   * pings gets one now, as the network change (or the sleep) may have killed it without a word.
   */
  PushClient.prototype._wake = function () {
    if (!this._running) return;
    var self = this;
    if (this._timer !== null) {
      var soon = Math.max(Math.random() * this.options.goAwayJitterMs, this._notBefore - Date.now());
      if (this._timerAt - Date.now() > soon) {
        clearTimeout(this._timer);
        this._timerAt = Date.now() + soon;
        this._timer = setTimeout(function () { self._connect(); }, soon);
      }
      return;
    }
    var ws = this._ws;
    var conn = this._conn;
    var answered = !conn || !conn.pingSentAt || conn.lastFrameAt >= conn.pingSentAt; // no ping of its own in flight
    if (ws && conn && conn.pings && answered && ws.readyState === 1) this._ping(ws, conn);
  };

  Object.defineProperty(PushClient.prototype, "state", { get: function () { return this._state; } });

  PushClient.prototype._status = function (status) {
    this._state = status.state;
    status.node = status.node === undefined ? this.node : status.node;
    try {
      this.onStatus(status);
    } catch (e) {
      if (typeof console !== "undefined") console.error("PushClient onStatus threw", e);
    }
  };

  /** What a failed getToken() call says: it threw or rejected with ``error``, or gave nothing. */
  function tokenFailure(error) {
    return error === undefined ? "getToken gave no token" : "getToken failed: " + (error && error.message ? error.message : String(error));
  }

  /**
   * Why what getToken gave is not a token, or null when it is one (a string).  The auth service's
   * whole answer ({token, expires_at}), passed on by the page's endpoint, was sent to the node as
   * "[object Object]" and refused with 4401 "token invalid: malformed", again on every try.
   */
  function notAToken(token) {
    if (typeof token === "string") return null;
    var kind = Array.isArray(token) ? "an array" : typeof token === "object" ? "an object" : "a " + typeof token;
    var fix = token && typeof token === "object" && typeof token.token === "string"
      ? "return its token field (the auth service's answer holds the token in \"token\")" : "return the token itself";
    return "getToken gave " + kind + ", not a token string: " + fix;
  }

  /** Tell the page of an error that changes no state (a refresh that failed) through onError. */
  PushClient.prototype._error = function (error) {
    try {
      this.onError(error);
    } catch (e) {
      if (typeof console !== "undefined") console.error("PushClient onError threw", e);
    }
  };

  PushClient.prototype._connect = async function () {
    this._timer = null;
    if (!this._running) return;
    var generation = this._generation;
    var url = this.urls[this._index % this.urls.length];
    var fresh = false; // the token was got for this connect (not kept from an earlier connection or the token option)
    // A kept token the node said has expired by now would only be refused (4401), after a check
    // with auth: get a new one first.
    if (this._token && this._getToken && this._tokenExpiresAt && Date.now() >= this._tokenExpiresAt) this._token = null;
    if (!this._token) {
      this._status({ state: "token", url: url });
      if (!this._running || generation !== this._generation) return; // onStatus stopped (and maybe restarted) it
      var token = null;
      var error;
      try {
        token = await within(this._getToken(), this.options.connectTimeoutMs);
      } catch (e) {
        error = e;
      }
      if (!this._running || generation !== this._generation) return; // a stale attempt's token is not kept
      if (loggedOut(error)) {
        this._unauthorized(error, url);
        return;
      }
      var wrong = token ? notAToken(token) : null;
      if (token && !wrong) {
        this._token = token;
        this._tokenExpiresAt = 0;
        this.stats.tokens += 1;
        fresh = true;
      }
      if (!this._token) {
        // No close code: no socket was opened.  Same URL (not the node's fault), after a backoff step.
        this._retry({ reason: wrong || tokenFailure(error), error: error, url: url }, { action: "reconnect", soon: false, stay: true }, false);
        return;
      }
    }
    var target = socketUrl(url);
    target.searchParams.set("token", this._token);
    if (this.lastId) target.searchParams.set("since", this.lastId);
    else target.searchParams.delete("since");
    this.stats.attempts += 1;
    this._status({ state: "connecting", url: url, node: null });
    if (!this._running || generation !== this._generation) return; // onStatus stopped (and maybe restarted) it
    var ws;
    try {
      ws = new WebSocket(target.href);
    } catch (e) {
      this._retry({ code: 1006, reason: String(e), url: url }, closePolicy(1006), false);
      return;
    }
    this._ws = ws;
    var self = this;
    var conn = { url: url, resumedAt: 0, hello: false, freshToken: fresh, pings: false, ackIds: 0, acks: null, refreshSent: false, refreshFailures: 0, helloTimer: null, refreshTimer: null, pingTimer: null, lastFrameAt: 0, pingSentAt: 0 };
    this._conn = conn;
    conn.helloTimer = setTimeout(function () {
      if (self._ws === ws && !conn.hello) {
        try { ws.close(); } catch (e) { /* not open yet */ }
        self._closed(ws, conn, 1006, "no hello within " + self.options.connectTimeoutMs + " ms");
      }
    }, this.options.connectTimeoutMs);
    ws.onmessage = function (event) {
      conn.lastFrameAt = Date.now();
      if (self._ws === ws) self._frame(ws, conn, event.data);
    };
    ws.onclose = function (event) {
      clearTimeout(conn.helloTimer);
      clearTimeout(conn.refreshTimer);
      clearTimeout(conn.pingTimer);
      if (self._ws === ws) self._closed(ws, conn, event.code, event.reason);
    };
    ws.onerror = function () { /* always followed by close, which carries the code */ };
  };

  PushClient.prototype._frame = function (ws, conn, text) {
    var frame;
    try {
      frame = JSON.parse(text);
    } catch (e) {
      return; // not ours to judge: the node only sends JSON
    }
    if (frame === null || typeof frame !== "object") return; // JSON, but no frame of ours (null has no type)
    if (frame.type === "hello") {
      conn.hello = true;
      this.node = frame.node;
      this.stats.connections += 1;
      this._expiresIn(frame.expires_in);
      this._status({ state: "connected", url: conn.url, user: frame.user, conn: frame.conn });
      this._scheduleRefresh(ws, conn, frame.expires_in);
      // Only a node whose hello says it answers pings gets them: an earlier one closes with 4500.
      conn.pings = this.options.idleMs > 0 && frame.ping === true;
      if (conn.pings) this._watch(ws, conn, this.options.idleMs);
      // Only a node whose hello says ack_ids takes several acks in one frame: an earlier one closes with 4500.
      conn.ackIds = typeof frame.ack_ids === "number" && frame.ack_ids >= 1 ? Math.floor(frame.ack_ids) : 0;
    } else if (frame.type === "refreshed") {
      conn.refreshSent = false;
      conn.refreshFailures = 0;
      this.stats.refreshes += 1;
      this._expiresIn(frame.expires_in);
      this._scheduleRefresh(ws, conn, frame.expires_in);
    } else if (frame.type === "refresh_error") {
      conn.refreshSent = false;
      var retryIn = this._refreshRetryIn(conn);
      this._error({ type: "refresh", reason: "refresh_error: " + frame.reason, retryIn: retryIn });
      if (this._ws === ws) this._refreshLater(ws, conn, retryIn); // unless onError stopped it
    } else if (frame.type === "resumed") {
      conn.resumedAt = Date.now();
      // The next connection resumes from the node's cursor when it is later than every message
      // seen: not from the inbox (no message seen yet), which no longer holds what another
      // device of the user acks meanwhile, nor from the newest message of an inbox replay, which
      // may be old, and after which a resume would replay what other devices acked since.  Every
      // message before the cursor was in this replay (or was cut by its REPLAY_LIMIT or REPLAY_MAX_BYTES).
      if (typeof frame.cursor === "string" && (!this.lastId || frame.cursor > this.lastId)) this.lastId = frame.cursor;
      this._status({ state: "live", url: conn.url, since: frame.since, replayed: frame.replayed, truncated: frame.truncated });
    } else if (frame.type === "message") {
      var id = frame.id;
      if (this._seen.has(id)) {
        this.stats.duplicates += 1;
      } else {
        this._remember(id);
        if (!this.lastId || id > this.lastId) this.lastId = id;
        try {
          this.onMessage(frame.data, { id: id, data: frame.data, node: this.node });
        } catch (e) {
          if (typeof console !== "undefined") console.error("PushClient onMessage threw", e);
        }
      }
      // A repeat is acked too: it came again because an earlier ack was lost.
      this._ack(ws, conn, id);
    }
    // Other frame types: ignored, as the protocol asks.
  };

  /**
   * Acks.  Where the node's hello says ack_ids, the acks of the message frames handled before the
   * next task of the page's event loop (a burst: a resume's replay, the frames one network read
   * brought) go together, as {"type": "ack", "ids": [...]} frames of at most ack_ids ids, so that
   * the node reads and parses one frame instead of one per message; a lone ack goes as
   * {"type": "ack", "id": ...}, as it always does to a node of an earlier version.  The next task
   * is a MessageChannel message, which background tabs do not throttle as they do timers (a
   * delay past REDELIVER_AFTER would have the message sent again).  An ack not sent because the
   * socket closed meanwhile is made good by redelivery, as any lost ack is.
   */
  PushClient.prototype._ack = function (ws, conn, id) {
    if (!conn.ackIds) {
      if (ws.readyState === 1) ws.send(JSON.stringify({ type: "ack", id: id }));
      return;
    }
    if (conn.acks) {
      conn.acks.push(id);
      return;
    }
    conn.acks = [id];
    nextTask(function () {
      var ids = conn.acks;
      conn.acks = null;
      if (ws.readyState !== 1) return;
      for (var i = 0; i < ids.length; i += conn.ackIds) {
        var part = ids.slice(i, i + conn.ackIds);
        ws.send(JSON.stringify(part.length === 1 ? { type: "ack", id: part[0] } : { type: "ack", ids: part }));
      }
    });
  };

  /**
   * Liveness: a browser's JavaScript never sees WebSocket pings, and a connection whose network
   * went away (a laptop that slept, a Wi-Fi change) can look open for many minutes.  After idleMs
   * without a frame it sends {"type": "ping"}, which the node answers {"type": "pong"}; when no
   * frame at all comes within pongTimeoutMs of it, the connection counts as lost (1006) and the
   * client reconnects.  One timer per connection, re-armed from the time of the last frame rather
   * than reset on each one; a timer a background tab delays only delays the check, as any frame
   * that came meanwhile counts.
   */
  PushClient.prototype._watch = function (ws, conn, delay) {
    clearTimeout(conn.pingTimer);
    var self = this;
    var o = this.options;
    conn.pingTimer = setTimeout(function () {
      conn.pingTimer = null;
      if (self._ws !== ws) return;
      var now = Date.now();
      if (conn.pingSentAt && conn.lastFrameAt < conn.pingSentAt) {
        var wait = conn.pingSentAt + o.pongTimeoutMs - now;
        if (wait > 0) {
          self._watch(ws, conn, wait);
          return;
        }
        try { ws.close(); } catch (e) { /* closing already */ }
        self._closed(ws, conn, 1006, "no frame within " + o.pongTimeoutMs + " ms of a ping");
        return;
      }
      conn.pingSentAt = 0;
      var idle = conn.lastFrameAt + o.idleMs - now;
      if (idle > 0) {
        self._watch(ws, conn, idle);
        return;
      }
      self._ping(ws, conn);
    }, Math.min(delay, MAX_TIMER_MS));
  };

  /** Send a ping on ``ws`` and close it as lost when no frame comes within pongTimeoutMs. */
  PushClient.prototype._ping = function (ws, conn) {
    if (ws.readyState === 1) ws.send(JSON.stringify({ type: "ping" }));
    this.stats.pings += 1;
    conn.pingSentAt = Date.now();
    this._watch(ws, conn, this.options.pongTimeoutMs);
  };

  /** The token in use expires in ``expiresIn`` seconds (null: the node does not know). */
  PushClient.prototype._expiresIn = function (expiresIn) {
    this._tokenExpiresAt = typeof expiresIn === "number" ? Date.now() + expiresIn * 1000 : 0;
  };

  /** Schedule the refresh of ``conn``'s token, which expires in ``expiresIn`` seconds (by the node's clock). */
  PushClient.prototype._scheduleRefresh = function (ws, conn, expiresIn) {
    if (typeof expiresIn !== "number" || !this._getToken) {
      // A token that never expires (expires_in null): no refresh, and none of the timer a refresh
      // sent left waiting for its answer, which would send another every refreshRetryMs.
      clearTimeout(conn.refreshTimer);
      conn.refreshTimer = null;
      return;
    }
    this._refreshLater(ws, conn, refreshDelay(expiresIn * 1000, this.options.refreshAheadMs));
  };

  /** The delay before the next try of ``conn``'s refresh, which just failed: a backoff step with full jitter. */
  PushClient.prototype._refreshRetryIn = function (conn) {
    var delay = backoffDelay(conn.refreshFailures, this.options.refreshRetryMs, this.options.refreshMaxMs, undefined, true);
    conn.refreshFailures += 1;
    return Math.round(delay);
  };

  PushClient.prototype._refreshLater = function (ws, conn, delay) {
    clearTimeout(conn.refreshTimer);
    var self = this;
    // setTimeout runs a delay past 2^31 - 1 ms (24.8 days) at once: a longer one re-arms from there.
    var step = Math.min(delay, MAX_TIMER_MS);
    conn.refreshTimer = setTimeout(function () {
      if (step < delay) self._refreshLater(ws, conn, delay - step);
      else self._refresh(ws, conn);
    }, step);
  };

  /** Get a new token and send it on the open connection; the next connection uses it too. */
  PushClient.prototype._refresh = async function (ws, conn) {
    conn.refreshTimer = null;
    if (this._ws !== ws || !this._getToken) return;
    if (conn.refreshSent) {
      // No answer ("refreshed" or "refresh_error") to the refresh sent: a failed refresh, tried
      // again after a backoff step as after refresh_error (it was sent again at once, every time).
      conn.refreshSent = false;
      var waited = this._refreshRetryIn(conn);
      this._error({ type: "refresh", reason: "no answer to refresh within " + (this.options.refreshRetryMs + this.options.connectTimeoutMs) + " ms", retryIn: waited });
      if (this._ws === ws) this._refreshLater(ws, conn, waited); // unless onError stopped it
      return;
    }
    var generation = this._generation;
    var token = null;
    var error;
    try {
      token = await within(this._getToken(), this.options.connectTimeoutMs);
    } catch (e) {
      error = e;
      token = null;
    }
    if (loggedOut(error)) {
      // Logged out: stop, whether or not this connection is still the current one (a reconnect
      // under way would otherwise go on with the token it kept).
      if (this._running && generation === this._generation) this._unauthorized(error, conn.url);
      return;
    }
    if (this._ws !== ws || ws.readyState !== 1) return; // closed meanwhile: the reconnect gets its own
    var wrong = token ? notAToken(token) : null;
    if (!token || wrong) {
      var retryIn = this._refreshRetryIn(conn);
      this._error({ type: "refresh", reason: wrong || tokenFailure(error), error: error, retryIn: retryIn });
      if (this._ws === ws) this._refreshLater(ws, conn, retryIn);
      return;
    }
    this.stats.tokens += 1;
    this._token = token;
    this._tokenExpiresAt = 0; // until the node's "refreshed" says
    ws.send(JSON.stringify({ type: "refresh", token: token }));
    conn.refreshSent = true;
    // Its answer ("refreshed" or "refresh_error") replaces this; without one, it failed (above).
    this._refreshLater(ws, conn, this.options.refreshRetryMs + this.options.connectTimeoutMs);
  };

  PushClient.prototype._remember = function (id) {
    this._seen.add(id);
    this._seenOrder.push(id);
    while (this._seenOrder.length > this.options.dedupWindow) this._seen.delete(this._seenOrder.shift());
  };

  PushClient.prototype._closed = function (ws, conn, code, reason) {
    this._ws = null;
    this._conn = null;
    this.node = null;
    if (!this._running) return;
    var healthy = conn.resumedAt > 0 && Date.now() - conn.resumedAt >= this.options.healthyMs;
    if (healthy) this._attempt = 0;
    this._retry({ code: code, reason: reason || "", url: conn.url, freshToken: conn.freshToken }, closePolicy(code), conn.hello);
  };

  PushClient.prototype._retry = function (closed, policy, hadHello) {
    var o = this.options;
    var generation = this._generation;
    if (policy.action === "stop") {
      this._halt("client stopped");
      this._status({ state: "stopped", code: closed.code, reason: closed.reason, url: closed.url });
      if (typeof console !== "undefined") console.error("PushClient: closed with " + closed.code + " (" + closed.reason + "): a client bug, not reconnecting");
      return;
    }
    var delay;
    this._notBefore = 0;
    if (policy.action === "new-token") {
      this._token = null;
      if (!this._getToken) {
        this._halt("client stopped");
        this._status({ state: "stopped", code: closed.code, reason: closed.reason, url: closed.url });
        if (typeof console !== "undefined") console.error("PushClient: closed with 4401 (" + closed.reason + ") and no getToken option to get a new token: not reconnecting");
        return;
      }
      // Same URL; soon the first time, and whenever the refused token is one it kept (from an
      // earlier connection or the token option: expired while the network was down, revoked),
      // however many failed connects came before; backing off when new tokens keep being refused.
      // Soon is within tokenJitterMs, not at once: a revocation of many users (or of a secret)
      // closes every page of theirs in the same instant, and each calls getToken on your backend.
      delay = this._attempt === 0 || !closed.freshToken ? Math.random() * o.tokenJitterMs : backoffDelay(this._attempt - 1, o.initialMs, o.maxMs);
    } else {
      if (closed.code === 1001) this._away[closed.url] = Date.now() + o.awayMs;
      var next = policy.stay ? { index: this._index, fresh: false } : this._nextUrl(closed.url);
      this._index = next.index;
      if (policy.soon && next.fresh) delay = Math.random() * o.goAwayJitterMs;
      else delay = backoffDelay(this._attempt, o.initialMs, o.maxMs);
      // Spread over initialMs: a user's other tabs were refused with the same N, and the window
      // frees one connect at a time.
      var after = retryAfterMs(closed.code, closed.reason);
      if (after > delay) delay = Math.min(MAX_TIMER_MS, after + Math.random() * o.initialMs);
      if (after > 0) this._notBefore = Date.now() + after; // _wake keeps to it too
    }
    this._attempt += 1;
    var status = { state: "waiting", reason: closed.reason, url: closed.url,
      next: this.urls[this._index % this.urls.length], retryIn: Math.round(delay), wasConnected: hadHello };
    if (closed.code !== undefined) status.code = closed.code; // none when getToken failed: no socket closed
    if (closed.error !== undefined) status.error = closed.error;
    this._status(status);
    if (!this._running || generation !== this._generation) return; // onStatus stopped (and maybe restarted) it
    var self = this;
    this._timerAt = Date.now() + delay;
    this._timer = setTimeout(function () { self._connect(); }, delay);
  };

  /** The URL after ``url`` that is not being avoided (fresh); when all others are, ``url`` itself
   * unless it is avoided too, else the one whose avoidance ends first (not fresh: backoff). */
  PushClient.prototype._nextUrl = function (url) {
    var n = this.urls.length;
    var from = this.urls.indexOf(url);
    var now = Date.now();
    for (var step = 1; step <= n; step++) {
      var i = (from + step) % n;
      if (this.urls[i] !== url && !(this._away[this.urls[i]] > now)) return { index: i, fresh: true };
    }
    // Every other URL is being avoided: stay on this one, unless it said 1001 too; then take the
    // one avoided for the least time (the 1001 of a node that drains and comes back is oldest).
    if (!(this._away[url] > now)) return { index: from, fresh: false };
    var best = from;
    for (var j = 0; j < n; j++) {
      if ((this._away[this.urls[j]] || 0) < (this._away[this.urls[best]] || 0)) best = j;
    }
    return { index: best, fresh: false };
  };

  return PushClient;
});

// The gateway's browser client: one ES module, no dependencies, no build step.
//
//   import { connect } from "https://gateway.example.com/client.js";
//   const client = connect({ url: "wss://gateway.example.com/ws", token: fetchToken });
//   client.on("event", (e) => render(e));
//   client.on("message", ({ message }) => renderAnswer(message.id, message.text));
//   client.on("resume", (r) => { if (!r.recovered) reloadState(); });
//   await client.rpc("cancel_run", { run_id });   // to the backend, answered to this tab only
//
// What it guarantees to the application: events in `seq` order, never twice, across any
// number of reconnects; messages (a model's answer streamed as appends) kept whole, each
// change applied once, a resume's snapshot replacing what was there; a reconnect resumes
// with `since`, and a resume the gateway cannot prove complete is surfaced
// (`recovered: false`); the token is refreshed in-band before it expires; subscriptions are
// sent again on every new connection. Where a network refuses WebSocket upgrades, it falls
// back to the gateway's server-sent event stream (`/sse`) with the same guarantees.

/** The version of this client; the gateway serves it with an `X-Gateway-Client-Version` header. */
export const VERSION = "0.1.0";

/**
 * An agent event, as the reference handler forwards it.
 * @typedef {object} GatewayEvent
 * @property {"event"} type
 * @property {number} seq Strictly increasing per identity. Below 2^53, so exact in a Number.
 * @property {string} kind e.g. `agent_started`, `tool_executing`, `agent_completed`
 * @property {unknown} payload Sensitive values replaced by `"[redacted]"`.
 * @property {string} [run_id]
 * @property {string} [thread_id]
 * @property {"started" | "tools_running" | "completed" | "error"} [run_state]
 */

/**
 * A message that grows (AI output streams): a model's answer published as a create, appends
 * and an end, kept whole by the client. A `create` or `snapshot` frame replaces it (a new
 * object), an `append` adds to its `text` and an `end` sets its `status` (the same object).
 * @typedef {object} GatewayMessage
 * @property {string} id The publisher's message id.
 * @property {string} text The text so far.
 * @property {"streaming" | "complete" | "cancelled" | "failed"} status
 * @property {string} kind The kind its create was published with (default `message`).
 * @property {string} [run_id]
 * @property {string} [thread_id]
 * @property {unknown} [payload] Its create's payload, sensitive values redacted.
 * @property {number} seq The `seq` of its latest change this client applied.
 * @property {boolean} partial True when the text may lack a part: the client saw an append
 *   or end of a message whose create it never got (a connection with `since: null` that
 *   joined mid-stream), or a resume was `recovered: false` while it streamed. The next
 *   `snapshot` (a reconnect with `since`) makes it whole again.
 */

/**
 * One change to a message, as the `message` notification reports it.
 * @typedef {object} MessageChange
 * @property {"create" | "append" | "end" | "snapshot"} op
 * @property {GatewayMessage} message The message after the change.
 * @property {string} text What the frame carried: for `append` the text added, for
 *   `create` and `snapshot` the whole text, for `end` nothing.
 */

/**
 * The gateway's answer to a reconnect with `since`.
 * @typedef {object} Resume
 * @property {"gateway.resumed"} type
 * @property {boolean} recovered True: every event after `since` follows, none missing.
 *   False: events may be missing; reload the state from the application.
 * @property {number} since
 * @property {number} replayed How many events the gateway replays.
 * @property {number | null} head
 * @property {number | null} earliest
 * @property {null | "evicted" | "unknown_position" | "too_many"} reason
 */

/**
 * Why a call (`client.rpc`) failed. `code` is the gateway's (`backend_error`, `timeout`,
 * `unavailable`, `bad_answer`, `answer_too_large`, `rpc_disabled`, `invalid_rpc`,
 * `too_large`, `rate_limited`, `too_many_calls`, `busy`) or the client's own:
 * `not_connected` (nothing was sent), `not_supported` (the connection is an SSE stream,
 * which cannot send: nothing was sent), `disconnected` (the connection ended before the
 * answer: the backend may or may not have run the call) and `no_answer` (none within the
 * call's `timeoutMs`).
 */
export class RpcError extends Error {
  /** @param {{code: string, reason?: string, status?: number, data?: unknown}} frame */
  constructor(frame) {
    super(frame.reason ?? frame.code);
    this.name = "RpcError";
    /** @type {string} */ this.code = frame.code;
    /** The backend's HTTP status, for `backend_error`. @type {number | undefined} */
    this.status = frame.status;
    /** The backend's JSON answer, for `backend_error` when it sent one. @type {unknown} */
    this.data = frame.data;
  }
}

/**
 * @typedef {"connecting" | "open" | "reconnecting" | "closed"} State
 *
 * @typedef {object} Status
 * @property {State} state
 * @property {number} [attempt] Reconnect attempts since a connection last stayed up for
 *   10 s (the backoff grows with it).
 * @property {number} [delayMs] When `reconnecting`: the wait before the next attempt.
 * @property {number} [code] The close code that ended the previous connection.
 * @property {string} [reason] Its close reason.
 */

/**
 * @typedef {object} ClientOptions
 * @property {string} url The gateway's WebSocket endpoint, e.g. `wss://host/ws`.
 * @property {() => string | Promise<string>} token Returns a connect token (JWT). Called
 *   before every connection and before every in-band refresh, so it can fetch a fresh one.
 * @property {number | null} [since] Resume position for the first connection: the `seq` of
 *   the last event (or message change) the application has, `0` for everything the gateway
 *   retains (a reloaded page rebuilding what it showed, streaming answers included), or `null`
 *   (the default) for live events only.
 * @property {number} [refreshBeforeSecs] Refresh the token this long before it expires
 *   (default 60; at most half of the token's remaining lifetime).
 * @property {number} [backoffMinMs] First reconnect delay bound (default 500).
 * @property {number} [backoffMaxMs] Largest reconnect delay bound (default 30000).
 * @property {Iterable<GatewayMessage>} [messages] The messages the application kept with
 *   `since` (what `client.messages` held, e.g. stored across a page reload): a message that
 *   did not change after `since` gets no snapshot on the resume, and its later appends
 *   continue the text given here.
 * @property {number} [maxMessages] Ended messages kept in `messages`, the least recently
 *   changed dropped first (default 100); as many streaming ones again at most.
 * @property {"auto" | "websocket" | "sse"} [transport] `auto` (the default) uses a
 *   WebSocket and, when one cannot open (a proxy that refuses upgrades), the gateway's SSE
 *   stream, staying with whichever opened. Over SSE the client cannot send: subscriptions
 *   travel in the stream's query (a change reconnects, resuming with `since`), a token is
 *   refreshed by reconnecting with it, and `rpc()` rejects with `not_supported`.
 * @property {string} [sseUrl] The SSE endpoint; by default `url` with `ws(s):` made
 *   `http(s):` and a trailing `/ws` made `/sse`.
 * @property {typeof WebSocket} [WebSocket] A WebSocket implementation outside browsers.
 * @property {typeof EventSource} [EventSource] An EventSource implementation outside browsers.
 */

/**
 * @typedef {object} ClientEvents
 * @property {GatewayEvent} event Each event, in order, once.
 * @property {MessageChange} message Each change to a message, in `seq` order with the
 *   events, once.
 * @property {Resume} resume After every reconnect with `since`.
 * @property {Status} status Connection state changes.
 * @property {{expiresAt: number}} refresh The gateway accepted a refreshed token.
 * @property {{reason: string}} refresh_failed The gateway refused a refreshed token, the
 *   token callback failed (tried again every 5 s), or it returned no newer token.
 * @property {Record<string, unknown>} frame Any other frame: the handler's `welcome`,
 *   `subscribed`, `pong`, `error`, and the gateway's `gateway.event_too_large`.
 * @property {{message: string}} error The token callback failed, or a frame was not JSON.
 */

/**
 * Close codes after which reconnecting would only repeat the failure: the server's idle
 * timeout (1000), invalid UTF-8 (1007), token, identity, rate and protocol-policy errors
 * (1008), a message too big (1009), and an operator's disconnect (4001: a logout, a
 * suspended account). Everything else (1001 drain, 1006 network, 1011 guest fault, 4000 slow
 * client, ...) reconnects with backoff and resumes.
 */
const FINAL_CLOSE_CODES = new Set([1000, 1007, 1008, 1009, 4001]);

/** Our own close code for `reconnect()`: not one the gateway sends. */
const RECONNECT_CODE = 4100;

/** A connection that stayed up this long resets the backoff. */
const STABLE_MS = 10000;

/** `setTimeout` fires at once past this (about 24.8 days). */
const MAX_TIMER_MS = 2 ** 31 - 1;

export class GatewayClient {
  /** @type {ClientOptions} */ #options;
  /** The transport the next connection uses (or the current one uses).
   * @type {"websocket" | "sse"} */
  #transport;
  /** @type {string | null} */ #sseUrl;
  /** @type {{[K in keyof ClientEvents]?: Set<(value: ClientEvents[K]) => void>}} */
  #listeners = {};
  /** @type {WebSocket | null} */ #socket = null;
  /** @type {number | null} */ #lastSeq;
  /** @type {Set<string>} */ #threads = new Set();
  /** By id, least recently changed first: what the application reads as `messages`.
   * @type {Map<string, GatewayMessage>} */
  #messages = new Map();
  /** @type {State} */ #state = "closed";
  #attempt = 0;
  #stopped = true;
  /** Bumped by every open, close and reconnect: an open still awaiting its token that finds
   * another generation gives up, so there is never more than one socket. */
  #generation = 0;
  /** A reconnect is scheduled and not yet started. */
  #waiting = false;
  #openedAt = 0;
  /** @type {ReturnType<typeof setTimeout> | undefined} */ #retryTimer;
  /** @type {ReturnType<typeof setTimeout> | undefined} */ #refreshTimer;
  /** Expiry (seconds) of the token the connection holds now. */
  #expiresAt = 0;
  /** Whether any connection opened: from then on a reconnect always resumes. */
  #everOpen = false;
  /** Whether `auto` fell back to SSE once already (later switches wait the backoff). */
  #triedSse = false;
  /** Which transports have opened: one that has is kept through a few failed opens (an
   * outage fails both), one that never has is left at its first. */
  #worked = { websocket: false, sse: false };
  /** Opens failed in a row. */
  #failedOpens = 0;
  /** A token a refresh fetched for the SSE stream it reopens. @type {string | null} */
  #freshToken = null;
  /** Calls waiting for their answer, by id; they belong to the connection that sent them.
   * @type {Map<string, {resolve: (data: unknown) => void, reject: (err: RpcError) => void, timer: ReturnType<typeof setTimeout>}>} */
  #calls = new Map();
  #callCount = 0;
  #onOnline = () => {
    if (this.#waiting) this.#retrySoon(0);
  };

  /** @param {ClientOptions} options */
  constructor(options) {
    if (!options || typeof options.url !== "string" || typeof options.token !== "function") {
      throw new TypeError("GatewayClient needs { url, token }");
    }
    this.#options = {
      refreshBeforeSecs: 60, backoffMinMs: 500, backoffMaxMs: 30000, maxMessages: 100, transport: "auto", ...options,
    };
    const transport = this.#options.transport;
    if (!["auto", "websocket", "sse"].includes(transport ?? "")) {
      throw new TypeError(`transport must be "auto", "websocket" or "sse", not ${transport}`);
    }
    const hasEventSource = typeof (options.EventSource ?? globalThis.EventSource) === "function";
    this.#sseUrl = hasEventSource ? (options.sseUrl ?? sseUrlOf(options.url)) : null;
    if (transport === "sse" && !this.#sseUrl) {
      throw new TypeError(hasEventSource
        ? "transport \"sse\" needs sseUrl when url does not end in /ws"
        : "transport \"sse\" needs an EventSource implementation (the EventSource option)");
    }
    // Without an SSE endpoint (or an EventSource) to fall back to, `auto` is WebSocket only.
    this.#transport = transport === "sse" ? "sse" : "websocket";
    this.#lastSeq = options.since ?? null;
    for (const message of options.messages ?? []) this.#messages.set(message.id, { ...message });
  }

  /** The `seq` of the last event or message change delivered to the application (or the
   * `since` given). */
  get lastSeq() {
    return this.#lastSeq;
  }

  /** @returns {State} */
  get state() {
    return this.#state;
  }

  /** The transport in use, or the one the next connection tries.
   * @returns {"websocket" | "sse"} */
  get transport() {
    return this.#transport;
  }

  /**
   * The messages seen, by id, least recently changed first: every one still streaming and
   * the `maxMessages` (100) that ended last. The application reads it; the client changes it.
   * @returns {ReadonlyMap<string, GatewayMessage>}
   */
  get messages() {
    return this.#messages;
  }

  /** The thread ids subscribed to; sent again on every new connection. */
  get threads() {
    return [...this.#threads];
  }

  /**
   * Calls `listener` for each `type` notification; returns a function that stops it.
   * @template {keyof ClientEvents} K
   * @param {K} type
   * @param {(value: ClientEvents[K]) => void} listener
   * @returns {() => void}
   */
  on(type, listener) {
    const set = (this.#listeners[type] ??= new Set());
    set.add(listener);
    return () => set.delete(listener);
  }

  /** Opens the connection (again, after `close()` or a final close code). */
  connect() {
    if (!this.#stopped) return this;
    this.#stopped = false;
    this.#attempt = 0;
    globalThis.addEventListener?.("online", this.#onOnline);
    void this.#open();
    return this;
  }

  /** Closes the connection for good (code 1000); `connect()` starts again. */
  close() {
    this.#stopped = true;
    this.#generation += 1;
    this.#freshToken = null;
    this.#waiting = false;
    globalThis.removeEventListener?.("online", this.#onOnline);
    clearTimeout(this.#retryTimer);
    clearTimeout(this.#refreshTimer);
    const socket = this.#detach();
    socket?.close(1000, "client closed");
    this.#setStatus({ state: "closed", code: 1000, reason: "client closed" });
  }

  /** Drops the connection and opens a new one at once, resuming from `lastSeq`. */
  reconnect() {
    if (this.#stopped) return;
    // The old socket is let go at once: whatever it still delivers comes again through the
    // resume, and a dead network cannot hold the new connection behind a closing handshake.
    this.#generation += 1;
    this.#detach()?.close(RECONNECT_CODE, "client reconnect");
    this.#attempt = 0;
    this.#retrySoon(0, RECONNECT_CODE, "client reconnect");
  }

  /**
   * Sends one frame to the handler. Returns false when not connected (nothing is queued:
   * frames are commands for the live connection).
   * @param {Record<string, unknown>} frame
   */
  send(frame) {
    if (this.#socket?.readyState !== 1 || this.#socket instanceof SseSocket) return false;
    this.#socket.send(JSON.stringify(frame));
    return true;
  }

  /**
   * Calls `method` on the application's backend through the gateway (`[rpc] url`), which
   * adds the verified identity and signs the request. Resolves with the backend's JSON
   * answer; rejects with an {@link RpcError}. A call is not retried or resent after a
   * reconnect: whether to call again is the application's choice.
   * @param {string} method Letters, digits and `_ . : / -`, e.g. `cancel_run`.
   * @param {unknown} [data]
   * @param {{timeoutMs?: number}} [options] Give up (`no_answer`) after this long
   *   (default 30000); the gateway's own `rpc.timeout_ms` usually answers first.
   * @returns {Promise<unknown>}
   */
  rpc(method, data = null, { timeoutMs = 30000 } = {}) {
    const id = `c${++this.#callCount}`;
    if (this.#socket instanceof SseSocket) {
      return Promise.reject(new RpcError({
        code: "not_supported", reason: "calls need a WebSocket; this connection is an SSE stream",
      }));
    }
    if (!this.send({ type: "rpc", id, method, data })) {
      return Promise.reject(new RpcError({ code: "not_connected", reason: "not connected" }));
    }
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this.#calls.delete(id);
        reject(new RpcError({ code: "no_answer", reason: `no answer within ${timeoutMs} ms` }));
      }, timeoutMs);
      this.#calls.set(id, { resolve, reject, timer });
    });
  }

  /** Subscribes to one thread's events, now and on every later connection. */
  subscribe(/** @type {string} */ threadId) {
    if (this.#threads.has(threadId)) return;
    this.#threads.add(threadId);
    this.#sendOrReconnect({ type: "subscribe", thread_id: threadId });
  }

  unsubscribe(/** @type {string} */ threadId) {
    if (!this.#threads.delete(threadId)) return;
    this.#sendOrReconnect({ type: "unsubscribe", thread_id: threadId });
  }

  /** An SSE stream takes its subscriptions from its query: a new one carries the change. */
  #sendOrReconnect(/** @type {Record<string, unknown>} */ frame) {
    if (this.#socket instanceof SseSocket) this.reconnect();
    else this.send(frame);
  }

  async #open() {
    const generation = ++this.#generation;
    const current = () => !this.#stopped && generation === this.#generation;
    this.#setStatus({ state: this.#attempt === 0 ? "connecting" : "reconnecting", attempt: this.#attempt });
    let token = this.#freshToken;
    this.#freshToken = null;
    try {
      token ??= await this.#options.token();
    } catch (err) {
      if (!current()) return;
      this.#emit("error", { message: `token callback failed: ${err}` });
      this.#scheduleRetry(undefined, undefined);
      return;
    }
    if (!current()) return;
    this.#detach()?.close(RECONNECT_CODE, "client reconnect");
    const sse = this.#transport === "sse";
    /** @type {WebSocket | SseSocket} */
    let socket;
    try {
      const url = new URL(sse ? String(this.#sseUrl) : this.#options.url);
      url.searchParams.set("access_token", token);
      // Until an event has arrived there is no position to resume from; `since=0` then
      // asks for everything retained, so that nothing published during a drop is lost.
      const since = this.#lastSeq ?? (this.#everOpen ? 0 : null);
      if (since !== null) url.searchParams.set("since", String(since));
      if (sse) {
        // What a WebSocket client sends once open, a stream gets in its query.
        for (const threadId of this.#threads) {
          url.searchParams.append("frame", JSON.stringify({ type: "subscribe", thread_id: threadId }));
        }
        socket = new SseSocket(url.toString(), this.#options.EventSource ?? globalThis.EventSource);
      } else {
        const Socket = this.#options.WebSocket ?? globalThis.WebSocket;
        socket = new Socket(url.toString());
      }
    } catch (err) {
      // A malformed url: retrying cannot help.
      this.#emit("error", { message: `cannot open ${sse ? "an SSE stream" : "a WebSocket"}: ${err}` });
      this.#stopped = true;
      this.#setStatus({ state: "closed" });
      return;
    }
    this.#socket = socket;
    this.#expiresAt = tokenExpiry(token);
    let opened = false;
    socket.onopen = () => {
      opened = true;
      this.#worked[sse ? "sse" : "websocket"] = true;
      this.#failedOpens = 0;
      this.#everOpen = true;
      this.#openedAt = Date.now();
      this.#setStatus({ state: "open", attempt: this.#attempt });
      if (!sse) for (const threadId of this.#threads) this.send({ type: "subscribe", thread_id: threadId });
      this.#scheduleRefresh();
    };
    socket.onmessage = (message) => this.#receive(message.data);
    socket.onclose = (close) => {
      if (this.#socket !== socket) return;
      this.#detach();
      if (this.#stopped) return;
      // A server that accepts and then closes at once must meet a growing backoff, so only
      // a connection that lasted resets it.
      if (this.#openedAt && Date.now() - this.#openedAt >= STABLE_MS) this.#attempt = 0;
      this.#openedAt = 0;
      // `auto`: a transport that could not even open (a proxy refusing upgrades, or one
      // that cuts streams) gives way to the other; the first switch to SSE is tried at once.
      if (!opened && this.#options.transport === "auto" && this.#sseUrl) {
        this.#failedOpens += 1;
        if (!this.#worked[sse ? "sse" : "websocket"] || this.#failedOpens >= 3) {
          this.#failedOpens = 0;
          this.#transport = sse ? "websocket" : "sse";
          if (!sse && !this.#triedSse) {
            this.#triedSse = true;
            this.#retrySoon(0, close.code, close.reason);
            return;
          }
        }
      }
      if (FINAL_CLOSE_CODES.has(close.code)) {
        this.#stopped = true;
        globalThis.removeEventListener?.("online", this.#onOnline);
        this.#setStatus({ state: "closed", code: close.code, reason: close.reason });
      } else {
        this.#scheduleRetry(close.code, close.reason);
      }
    };
  }

  /** @param {unknown} data */
  #receive(data) {
    let frame;
    try {
      frame = JSON.parse(String(data));
    } catch {
      this.#emit("error", { message: "a frame that is not JSON" });
      return;
    }
    switch (frame?.type) {
      case "event":
        if (this.#isNew(frame.seq)) this.#emit("event", frame);
        return;
      case "message":
        // One sequence with the events: a resume's snapshot comes at the message's latest
        // seq, and only changes past it follow, so a text is never applied twice.
        if (typeof frame.message_id !== "string") break;
        if (this.#isNew(frame.seq)) this.#applyMessage(frame);
        return;
      case "gateway.event_too_large":
        // The event's place in the order: it was delivered, as a marker.
        if (this.#isNew(frame.seq)) this.#emit("frame", frame);
        return;
      case "gateway.resumed":
        // Nothing is replayed and live events follow `head`. They may be numbered below
        // `lastSeq` (another node, another clock), so the position starts over from there.
        if (!frame.recovered) {
          this.#lastSeq = typeof frame.head === "number" ? frame.head : null;
          // Appends may have been missed: what follows is added to a text with a hole.
          for (const message of this.#messages.values()) {
            if (message.status === "streaming") message.partial = true;
          }
        }
        this.#emit("resume", frame);
        return;
      case "gateway.refreshed":
        this.#expiresAt = frame.expires_at;
        this.#emit("refresh", { expiresAt: frame.expires_at });
        this.#scheduleRefresh();
        return;
      case "gateway.refresh_failed":
        this.#emit("refresh_failed", { reason: frame.reason });
        this.#scheduleRefresh(5000);
        return;
      case "rpc_result":
      case "rpc_error": {
        const call = this.#calls.get(frame.id);
        if (!call) return; // given up on (no_answer): the answer is late, not lost
        this.#calls.delete(frame.id);
        clearTimeout(call.timer);
        if (frame.type === "rpc_result") call.resolve(frame.data);
        else call.reject(new RpcError(frame));
        return;
      }
    }
    this.#emit("frame", frame);
  }

  /** Applies one message frame to `messages` and tells the application. */
  #applyMessage(/** @type {Record<string, any>} */ frame) {
    const id = frame.message_id;
    const text = typeof frame.text === "string" ? frame.text : "";
    let message = this.#messages.get(id);
    if (frame.op === "create" || frame.op === "snapshot" || !message) {
      message = {
        id, text, status: frame.status ?? "streaming", kind: frame.kind, seq: frame.seq,
        partial: frame.op !== "create" && frame.op !== "snapshot",
      };
      for (const key of ["run_id", "thread_id", "payload"]) {
        if (frame[key] !== undefined) message[key] = frame[key];
      }
    } else {
      if (frame.op === "append") message.text += text;
      if (typeof frame.status === "string") message.status = frame.status;
      message.seq = frame.seq;
    }
    // Moved to the end: the map stays ordered by last change, the oldest dropped first.
    this.#messages.delete(id);
    this.#messages.set(id, message);
    this.#dropOldMessages();
    this.#emit("message", { op: frame.op, message, text });
  }

  /** Keeps at most `maxMessages` ended messages, and as many streaming ones. */
  #dropOldMessages() {
    const max = this.#options.maxMessages ?? 100;
    if (this.#messages.size <= max) return;
    let streaming = 0;
    for (const message of this.#messages.values()) if (message.status === "streaming") streaming += 1;
    let ended = this.#messages.size - streaming;
    for (const [id, message] of this.#messages) {
      if (ended <= max && streaming <= max) return;
      const open = message.status === "streaming";
      if (open ? streaming > max : ended > max) {
        this.#messages.delete(id);
        if (open) streaming -= 1;
        else ended -= 1;
      }
    }
  }

  /** Whether an event's `seq` is past the last one delivered; if so it becomes the last. */
  #isNew(/** @type {unknown} */ seq) {
    if (typeof seq !== "number") return true;
    if (this.#lastSeq !== null && seq <= this.#lastSeq) return false;
    this.#lastSeq = seq;
    return true;
  }

  /** Sends a fresh token before the one in use expires. */
  #scheduleRefresh(atLeastMs = 1000) {
    clearTimeout(this.#refreshTimer);
    if (!this.#expiresAt) return;
    const left = this.#expiresAt * 1000 - Date.now();
    const margin = Math.min((this.#options.refreshBeforeSecs ?? 60) * 1000, left / 2);
    const delay = Math.min(MAX_TIMER_MS, Math.max(atLeastMs, left - margin));
    this.#refreshTimer = setTimeout(() => void this.#refresh(), delay);
  }

  async #refresh() {
    const socket = this.#socket;
    let token;
    try {
      token = await this.#options.token();
    } catch (err) {
      if (socket !== this.#socket) return;
      this.#emit("refresh_failed", { reason: `token callback failed: ${err}` });
      this.#scheduleRefresh(5000);
      return;
    }
    if (socket !== this.#socket || socket?.readyState !== 1) return;
    if (tokenExpiry(token) <= this.#expiresAt) {
      // Sending the same token again would only repeat; the connection ends at its expiry.
      this.#emit("refresh_failed", { reason: "the token callback returned no newer token" });
      return;
    }
    // A stream cannot be told a new token: a new stream is opened with it (and resumes).
    if (socket instanceof SseSocket) {
      this.#freshToken = token;
      this.reconnect();
      return;
    }
    this.send({ type: "gateway.refresh", access_token: token });
  }

  /** @param {number | undefined} code @param {string | undefined} reason */
  #scheduleRetry(code, reason) {
    // Full jitter: a node's worth of clients dropped at once spread their reconnects.
    const { backoffMinMs = 500, backoffMaxMs = 30000 } = this.#options;
    const bound = Math.min(backoffMaxMs, backoffMinMs * 2 ** Math.min(this.#attempt, 16));
    this.#attempt += 1;
    this.#retrySoon(Math.floor(Math.random() * bound), code, reason);
  }

  /** @param {number} delayMs @param {number} [code] @param {string} [reason] */
  #retrySoon(delayMs, code, reason) {
    clearTimeout(this.#retryTimer);
    this.#waiting = true;
    this.#setStatus({ state: "reconnecting", attempt: this.#attempt, delayMs, code, reason });
    this.#retryTimer = setTimeout(() => {
      this.#waiting = false;
      if (!this.#stopped) void this.#open();
    }, delayMs);
  }

  /** Forgets the current socket, so that nothing it still delivers reaches the app. */
  #detach() {
    const socket = this.#socket;
    this.#socket = null;
    clearTimeout(this.#refreshTimer);
    // Answers come on the connection that asked; a new one will never bring them.
    for (const call of this.#calls.values()) {
      clearTimeout(call.timer);
      call.reject(new RpcError({ code: "disconnected", reason: "the connection ended before the answer" }));
    }
    this.#calls.clear();
    if (socket) socket.onopen = socket.onmessage = socket.onclose = null;
    return socket;
  }

  /** @param {Status} status */
  #setStatus(status) {
    this.#state = status.state;
    this.#emit("status", status);
  }

  /**
   * @template {keyof ClientEvents} K
   * @param {K} type
   * @param {ClientEvents[K]} value
   */
  #emit(type, value) {
    for (const listener of this.#listeners[type] ?? []) {
      try {
        listener(value);
      } catch (err) {
        // One listener's bug must not stop delivery to the others, or the order.
        setTimeout(() => {
          throw err;
        });
      }
    }
  }
}

/**
 * An SSE stream with the part of the WebSocket interface the client uses: `readyState`,
 * `onopen`, `onmessage`, `onclose` (with the gateway's close code, from its `close` event)
 * and `close()`. The EventSource's own reconnecting is turned off: the client reconnects
 * with its backoff, a fresh token and `since`, as it does for a WebSocket.
 */
class SseSocket {
  /** @type {EventSource} */ #source;
  readyState = 0;
  /** @type {(() => void) | null} */ onopen = null;
  /** @type {((message: {data: string}) => void) | null} */ onmessage = null;
  /** @type {((close: {code: number, reason: string}) => void) | null} */ onclose = null;

  /** @param {string} url @param {typeof EventSource} Source */
  constructor(url, Source) {
    if (typeof Source !== "function") throw new TypeError("no EventSource implementation");
    const source = (this.#source = new Source(url));
    source.onopen = () => {
      this.readyState = 1;
      this.onopen?.();
    };
    source.onmessage = (message) => this.onmessage?.({ data: message.data });
    // Not JSON, so the client reports it instead of dropping it silently.
    source.addEventListener("binary", (message) => this.onmessage?.({ data: `binary:${message.data}` }));
    source.addEventListener("close", (message) => {
      let close = {};
      try {
        close = JSON.parse(message.data);
      } catch {}
      this.#end(close?.code ?? 1006, close?.reason ?? "");
    });
    // A stream that fails or ends without a `close` event: as a WebSocket's 1006.
    source.onerror = () => this.#end(1006, "event stream failed");
  }

  #end(/** @type {number} */ code, /** @type {string} */ reason) {
    if (this.readyState === 3) return;
    this.readyState = 3;
    this.#source.close();
    this.onclose?.({ code, reason });
  }

  close() {
    this.readyState = 3;
    this.#source.close();
  }
}

/** The SSE endpoint beside a WebSocket one (`.../ws` to `.../sse`), or null. */
function sseUrlOf(/** @type {string} */ wsUrl) {
  try {
    const url = new URL(wsUrl);
    if (!url.pathname.endsWith("/ws")) return null;
    url.protocol = url.protocol === "wss:" ? "https:" : url.protocol === "ws:" ? "http:" : url.protocol;
    url.pathname = url.pathname.replace(/\/ws$/, "/sse");
    return url.toString();
  } catch {
    return null;
  }
}

/**
 * Creates a client and connects it.
 * @param {ClientOptions} options
 */
export function connect(options) {
  return new GatewayClient(options).connect();
}

/** A JWT's `exp` (seconds), or 0 when it cannot be read. */
function tokenExpiry(/** @type {string} */ token) {
  try {
    const part = token.split(".")[1].replace(/-/g, "+").replace(/_/g, "/");
    const exp = JSON.parse(atob(part.padEnd(part.length + ((4 - (part.length % 4)) % 4), "="))).exp;
    return typeof exp === "number" ? exp : 0;
  } catch {
    return 0;
  }
}

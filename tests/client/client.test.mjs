// The browser client's state machine under `node --test`, with a scripted WebSocket (and a
// scripted EventSource for the SSE transport): the
// races and edge cases a real browser test cannot time (run by tests/tests/browser.rs).
// The happy paths run against the real gateway in Chromium.

import { test } from "node:test";
import assert from "node:assert/strict";
import { copyFile, mkdtemp } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { pathToFileURL } from "node:url";

// The module as served, under a name Node loads as an ES module.
const copy = join(await mkdtemp(join(tmpdir(), "gateway-client-")), "client.mjs");
await copyFile(new URL("../../host/web/client.js", import.meta.url), copy);
const { GatewayClient, RpcError } = await import(pathToFileURL(copy).href);

// The `online` event of a browser window.
const windowEvents = new EventTarget();
globalThis.addEventListener = windowEvents.addEventListener.bind(windowEvents);
globalThis.removeEventListener = windowEvents.removeEventListener.bind(windowEvents);

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));
const jwt = (exp) => `h.${Buffer.from(JSON.stringify({ sub: "a", exp })).toString("base64url")}.s`;
const inSecs = (secs) => Math.floor(Date.now() / 1000) + secs;

/** A WebSocket the test drives; every instance is kept in `sockets`. */
function scriptedSockets() {
  const sockets = [];
  class ScriptedSocket {
    constructor(url) {
      this.url = new URL(url);
      this.readyState = 0;
      this.sent = [];
      this.closedWith = null;
      sockets.push(this);
    }
    send(data) {
      this.sent.push(JSON.parse(data));
    }
    close(code, reason) {
      this.closedWith = [code, reason];
      this.readyState = 3;
    }
    open() {
      this.readyState = 1;
      this.onopen?.();
    }
    receive(frame) {
      this.onmessage?.({ data: JSON.stringify(frame) });
    }
    drop(code, reason = "") {
      this.readyState = 3;
      this.onclose?.({ code, reason });
    }
    get live() {
      return this.closedWith === null && this.readyState !== 3 && this.onmessage !== null;
    }
  }
  return { sockets, ScriptedSocket };
}

/** An EventSource the test drives; every instance is kept in `sources`. */
function scriptedSources() {
  const sources = [];
  class ScriptedEventSource {
    constructor(url) {
      this.url = new URL(url);
      this.readyState = 0;
      this.onopen = null;
      this.onmessage = null;
      this.onerror = null;
      this.listeners = {};
      this.closed = false;
      sources.push(this);
    }
    addEventListener(type, fn) {
      (this.listeners[type] ??= []).push(fn);
    }
    close() {
      this.closed = true;
      this.readyState = 2;
    }
    open() {
      this.readyState = 1;
      this.onopen?.({ type: "open" });
    }
    message(frame) {
      this.onmessage?.({ type: "message", data: JSON.stringify(frame) });
    }
    named(type, data) {
      for (const fn of this.listeners[type] ?? []) fn({ type, data });
    }
    /** A stream that failed (a refused request, a cut connection). */
    error() {
      this.onerror?.({ type: "error" });
    }
    /** The frames the stream's query carries for the handler. */
    get frames() {
      return this.url.searchParams.getAll("frame").map((frame) => JSON.parse(frame));
    }
  }
  return { sources, ScriptedEventSource };
}

async function until(what, condition, ms = 3000) {
  const end = Date.now() + ms;
  while (!condition()) {
    if (Date.now() > end) throw new Error(`${what}: not within ${ms} ms`);
    await sleep(2);
  }
}

test("events reach the app in order, once, across a reconnect that resumes with since", async () => {
  const { sockets, ScriptedSocket } = scriptedSockets();
  const client = new GatewayClient({ url: "ws://gw/ws", token: () => jwt(inSecs(3600)), WebSocket: ScriptedSocket, backoffMinMs: 1 });
  const seen = [];
  client.on("event", (e) => seen.push(e.seq));
  client.connect();
  await until("a socket", () => sockets.length === 1);
  assert.equal(sockets[0].url.searchParams.get("since"), null, "live only at first");
  sockets[0].open();
  for (const seq of [10, 11, 11, 12]) sockets[0].receive({ type: "event", seq });
  sockets[0].drop(1006);
  await until("a reconnect", () => sockets.length === 2);
  assert.equal(sockets[1].url.searchParams.get("since"), "12");
  sockets[1].open();
  for (const seq of [12, 13]) sockets[1].receive({ type: "event", seq });
  assert.deepEqual(seen, [10, 11, 12, 13]);
  client.close();
});

test("a reconnect before any event asks for everything retained", async () => {
  const { sockets, ScriptedSocket } = scriptedSockets();
  const client = new GatewayClient({ url: "ws://gw/ws", token: () => jwt(inSecs(3600)), WebSocket: ScriptedSocket, backoffMinMs: 1 });
  client.connect();
  await until("a socket", () => sockets.length === 1);
  sockets[0].open();
  sockets[0].drop(1001);
  await until("a reconnect", () => sockets.length === 2);
  assert.equal(sockets[1].url.searchParams.get("since"), "0");
  client.close();
});

test("an unrecoverable resume moves the position to the new head", async () => {
  const { sockets, ScriptedSocket } = scriptedSockets();
  const client = new GatewayClient({ url: "ws://gw/ws", token: () => jwt(inSecs(3600)), WebSocket: ScriptedSocket, since: 500, backoffMinMs: 1 });
  const seen = [];
  const resumes = [];
  client.on("event", (e) => seen.push(e.seq));
  client.on("resume", (r) => resumes.push(r.recovered));
  client.connect();
  await until("a socket", () => sockets.length === 1);
  assert.equal(sockets[0].url.searchParams.get("since"), "500");
  sockets[0].open();
  // Another node, whose numbers are below ours: its live events must not be dropped.
  sockets[0].receive({ type: "gateway.resumed", recovered: false, since: 500, replayed: 0, head: 40, earliest: 30, reason: "unknown_position" });
  sockets[0].receive({ type: "event", seq: 41 });
  assert.deepEqual(resumes, [false]);
  assert.deepEqual(seen, [41]);
  assert.equal(client.lastSeq, 41);
  client.close();
});

test("subscriptions are sent again on every connection", async () => {
  const { sockets, ScriptedSocket } = scriptedSockets();
  const client = new GatewayClient({ url: "ws://gw/ws", token: () => jwt(inSecs(3600)), WebSocket: ScriptedSocket, backoffMinMs: 1 });
  client.connect();
  await until("a socket", () => sockets.length === 1);
  sockets[0].open();
  client.subscribe("t1");
  client.subscribe("t2");
  client.unsubscribe("t1");
  sockets[0].drop(4000, "slow client");
  await until("a reconnect", () => sockets.length === 2);
  sockets[1].open();
  assert.deepEqual(sockets[1].sent, [{ type: "subscribe", thread_id: "t2" }]);
  client.close();
});

test("final close codes stop the client; others reconnect", async () => {
  for (const [code, final] of [[1000, true], [1007, true], [1008, true], [1009, true], [4001, true], [1001, false], [1006, false], [1011, false], [4000, false]]) {
    const { sockets, ScriptedSocket } = scriptedSockets();
    const client = new GatewayClient({ url: "ws://gw/ws", token: () => jwt(inSecs(3600)), WebSocket: ScriptedSocket, backoffMinMs: 1 });
    client.connect();
    await until("a socket", () => sockets.length === 1);
    sockets[0].open();
    sockets[0].drop(code, "why");
    await sleep(20);
    assert.equal(sockets.length, final ? 1 : 2, `close code ${code}`);
    assert.equal(client.state === "closed", final, `close code ${code}: ${client.state}`);
    client.close();
  }
});

test("never two live sockets: online during a connect, close+connect and reconnect during the token wait", async () => {
  {
    const { sockets, ScriptedSocket } = scriptedSockets();
    const client = new GatewayClient({ url: "ws://gw/ws", token: () => jwt(inSecs(3600)), WebSocket: ScriptedSocket, backoffMinMs: 1 });
    client.connect();
    await until("a socket", () => sockets.length === 1);
    sockets[0].open();
    sockets[0].drop(1006);
    await until("a reconnect", () => sockets.length === 2);
    windowEvents.dispatchEvent(new Event("online")); // the reconnect is already connecting
    await sleep(20);
    assert.equal(sockets.filter((s) => s.live).length, 1);
    client.close();
  }
  {
    const { sockets, ScriptedSocket } = scriptedSockets();
    const client = new GatewayClient({ url: "ws://gw/ws", token: () => sleep(10).then(() => jwt(inSecs(3600))), WebSocket: ScriptedSocket });
    client.connect();
    client.close();
    client.connect();
    client.reconnect();
    await sleep(60);
    assert.equal(sockets.length, 1, "one socket for the last request only");
    client.close();
  }
});

test("the backoff grows against a server that accepts and closes at once", async () => {
  const { sockets, ScriptedSocket } = scriptedSockets();
  const client = new GatewayClient({ url: "ws://gw/ws", token: () => jwt(inSecs(3600)), WebSocket: ScriptedSocket, backoffMinMs: 1, backoffMaxMs: 1 << 20 });
  const attempts = [];
  client.on("status", (s) => s.delayMs !== undefined && attempts.push(s.attempt));
  client.connect();
  for (let i = 1; i <= 5; i++) {
    await until(`socket ${i}`, () => sockets.length === i, 10000);
    sockets[i - 1].open();
    sockets[i - 1].receive({ type: "welcome" });
    sockets[i - 1].drop(1011, "guest fault: trap");
  }
  assert.deepEqual(attempts, [1, 2, 3, 4, 5]);
  client.close();
});

test("close() stops everything: no retry after a failed token, no refresh polling", async () => {
  {
    const { ScriptedSocket } = scriptedSockets();
    const client = new GatewayClient({ url: "ws://gw/ws", token: () => sleep(10).then(() => { throw new Error("offline"); }), WebSocket: ScriptedSocket });
    client.connect();
    client.close();
    await sleep(40);
    assert.equal(client.state, "closed");
  }
  {
    const { sockets, ScriptedSocket } = scriptedSockets();
    let calls = 0;
    const token = () => {
      calls += 1;
      return calls === 1 ? jwt(inSecs(2)) : sleep(20).then(() => { throw new Error("offline"); });
    };
    const client = new GatewayClient({ url: "ws://gw/ws", token, WebSocket: ScriptedSocket });
    client.connect();
    await until("a socket", () => sockets.length === 1);
    sockets[0].open();
    await until("a refresh attempt", () => calls === 2, 5000);
    client.close();
    await sleep(5500);
    assert.equal(calls, 2, "no refresh after close()");
  }
});

test("a refresh sends a newer token in-band, and never the same one again", async () => {
  const { sockets, ScriptedSocket } = scriptedSockets();
  let exp = inSecs(2);
  const client = new GatewayClient({ url: "ws://gw/ws", token: () => jwt(exp), WebSocket: ScriptedSocket });
  const failures = [];
  client.on("refresh_failed", (f) => failures.push(f.reason));
  client.connect();
  await until("a socket", () => sockets.length === 1);
  sockets[0].open();
  exp = inSecs(3600);
  await until("a refresh", () => sockets[0].sent.length === 1, 5000);
  assert.deepEqual(sockets[0].sent[0], { type: "gateway.refresh", access_token: jwt(exp) });
  sockets[0].receive({ type: "gateway.refreshed", expires_at: exp });
  client.close();

  const fixed = scriptedSockets();
  const only = jwt(inSecs(2));
  const stuck = new GatewayClient({ url: "ws://gw/ws", token: () => only, WebSocket: fixed.ScriptedSocket });
  stuck.on("refresh_failed", (f) => failures.push(f.reason));
  stuck.connect();
  await until("a socket", () => fixed.sockets.length === 1);
  fixed.sockets[0].open();
  await until("a refresh attempt", () => failures.length === 1, 5000);
  assert.match(failures[0], /no newer token/);
  assert.equal(fixed.sockets[0].sent.length, 0);
  stuck.close();
});

test("a token valid for months does not refresh at once", async () => {
  const { sockets, ScriptedSocket } = scriptedSockets();
  let calls = 0;
  const client = new GatewayClient({ url: "ws://gw/ws", token: () => { calls += 1; return jwt(inSecs(90 * 24 * 3600)); }, WebSocket: ScriptedSocket });
  client.connect();
  await until("a socket", () => sockets.length === 1);
  sockets[0].open();
  await sleep(100);
  assert.equal(calls, 1);
  client.close();
});

test("one listener's exception reaches neither the client nor the other listeners", async () => {
  const { sockets, ScriptedSocket } = scriptedSockets();
  const client = new GatewayClient({ url: "ws://gw/ws", token: () => jwt(inSecs(3600)), WebSocket: ScriptedSocket });
  const seen = [];
  client.on("event", () => {
    throw new Error("app bug");
  });
  client.on("event", (e) => seen.push(e.seq));
  client.connect();
  await until("a socket", () => sockets.length === 1);
  sockets[0].open();
  // The client rethrows a listener's error from a timer of its own, so that it is reported
  // without unwinding the delivery loop: catch those timers here.
  const rethrown = [];
  const realSetTimeout = globalThis.setTimeout;
  globalThis.setTimeout = (fn, ms) => (ms === undefined ? rethrown.push(fn) : realSetTimeout(fn, ms));
  try {
    sockets[0].receive({ type: "event", seq: 1 });
    sockets[0].receive({ type: "event", seq: 2 });
  } finally {
    globalThis.setTimeout = realSetTimeout;
  }
  assert.deepEqual(seen, [1, 2]);
  assert.equal(rethrown.length, 2);
  assert.throws(rethrown[0], /app bug/);
  client.close();
});

// Messages (AI output streams): a model's answer as frames of one message that grows.
const message = (seq, op, text, status = "streaming", extra = {}) => ({
  type: "message", op, message_id: "m1", text, status, seq, kind: "assistant", ...extra,
});

test("a message grows by appends, a snapshot replaces it, an end sets its status", async (t) => {
  const { sockets, ScriptedSocket } = scriptedSockets();
  const client = new GatewayClient({ url: "ws://gw/ws", token: () => jwt(inSecs(3600)), WebSocket: ScriptedSocket });
  t.after(() => client.close()); // also when an assertion fails: no timer left behind
  const changes = [];
  client.on("message", (c) => changes.push([c.op, c.text, c.message.text, c.message.status, c.message.seq]));
  const frames = [];
  client.on("frame", (f) => frames.push(f.type));
  client.connect();
  await until("a socket", () => sockets.length === 1);
  sockets[0].open();
  sockets[0].receive(message(1, "create", "", "streaming", { run_id: "r1", thread_id: "t1", payload: { model: "m" } }));
  const created = client.messages.get("m1");
  assert.deepEqual(created, {
    id: "m1", text: "", status: "streaming", kind: "assistant", seq: 1, partial: false,
    run_id: "r1", thread_id: "t1", payload: { model: "m" },
  });
  sockets[0].receive(message(3, "append", "Hel"));
  sockets[0].receive(message(4, "append", "lo"));
  assert.equal(client.messages.get("m1"), created, "an append changes the same object");
  assert.equal(created.text, "Hello");
  // A snapshot is the whole message: it replaces the text, it is not added to it.
  sockets[0].receive(message(6, "snapshot", "Hello, wor", "streaming", { run_id: "r1", payload: { model: "m" } }));
  const replaced = client.messages.get("m1");
  assert.notEqual(replaced, created, "a snapshot is a new object");
  assert.equal(replaced.text, "Hello, wor");
  sockets[0].receive(message(7, "append", "ld"));
  sockets[0].receive(message(8, "end", "", "complete"));
  assert.deepEqual(changes, [
    ["create", "", "", "streaming", 1],
    ["append", "Hel", "Hel", "streaming", 3],
    ["append", "lo", "Hello", "streaming", 4],
    ["snapshot", "Hello, wor", "Hello, wor", "streaming", 6],
    ["append", "ld", "Hello, world", "streaming", 7],
    ["end", "", "Hello, world", "complete", 8],
  ]);
  assert.equal(client.messages.get("m1").partial, false);
  assert.equal(client.lastSeq, 8, "message frames advance the position");
  // A frame without a message id is no message: the application sees it as a frame.
  sockets[0].receive({ type: "message", op: "append", text: "x", seq: 9 });
  assert.deepEqual(frames, ["message"]);
  assert.equal(client.lastSeq, 8);
});

test("message changes are deduplicated with the events, across a reconnect", async (t) => {
  const { sockets, ScriptedSocket } = scriptedSockets();
  const client = new GatewayClient({ url: "ws://gw/ws", token: () => jwt(inSecs(3600)), WebSocket: ScriptedSocket, backoffMinMs: 1 });
  t.after(() => client.close()); // also when an assertion fails: no timer left behind
  const seen = [];
  client.on("event", (e) => seen.push(["event", e.seq]));
  client.on("message", (c) => seen.push([c.op, c.message.seq]));
  client.connect();
  await until("a socket", () => sockets.length === 1);
  sockets[0].open();
  sockets[0].receive({ type: "event", seq: 10 });
  sockets[0].receive(message(11, "create", "The"));
  sockets[0].receive(message(13, "append", " answer"));
  sockets[0].receive(message(13, "append", " answer")); // the same frame again
  sockets[0].receive({ type: "event", seq: 12 }); // below the message's last change
  sockets[0].drop(1006);
  await until("a reconnect", () => sockets.length === 2);
  assert.equal(sockets[1].url.searchParams.get("since"), "13", "resumes after the message's append");
  sockets[1].open();
  sockets[1].receive({ type: "gateway.resumed", recovered: true, since: 13, replayed: 2, head: 16, earliest: 10, reason: null });
  // A gateway that sent what the client has: nothing of it is applied twice.
  sockets[1].receive(message(11, "create", "The"));
  sockets[1].receive(message(13, "append", " answer"));
  // The message changed during the drop: one snapshot with the text so far, then the rest.
  sockets[1].receive({ type: "event", seq: 14 });
  sockets[1].receive(message(16, "snapshot", "The answer is"));
  sockets[1].receive(message(17, "append", " 42."));
  sockets[1].receive(message(17, "append", " 42."));
  sockets[1].receive(message(18, "end", "", "complete"));
  assert.deepEqual(seen, [
    ["event", 10], ["create", 11], ["append", 13], ["event", 14], ["snapshot", 16], ["append", 17], ["end", 18],
  ]);
  assert.equal(client.messages.get("m1").text, "The answer is 42.");
  assert.equal(client.messages.get("m1").status, "complete");
  assert.equal(client.lastSeq, 18);
});

test("a message whose start was not seen is marked partial until a snapshot", async (t) => {
  const { sockets, ScriptedSocket } = scriptedSockets();
  const client = new GatewayClient({ url: "ws://gw/ws", token: () => jwt(inSecs(3600)), WebSocket: ScriptedSocket, backoffMinMs: 1 });
  t.after(() => client.close()); // also when an assertion fails: no timer left behind
  client.connect();
  await until("a socket", () => sockets.length === 1);
  sockets[0].open();
  // Live only (`since: null`): this connection joined after the create.
  sockets[0].receive(message(5, "append", "lo"));
  assert.deepEqual([client.messages.get("m1").text, client.messages.get("m1").partial], ["lo", true]);
  sockets[0].drop(1006);
  await until("a reconnect", () => sockets.length === 2);
  sockets[1].open();
  sockets[1].receive(message(6, "snapshot", "Hello"));
  assert.deepEqual([client.messages.get("m1").text, client.messages.get("m1").partial], ["Hello", false]);
  // A resume that cannot be trusted: appends may be missing from the streaming message.
  sockets[1].drop(1006);
  await until("a reconnect", () => sockets.length === 3);
  sockets[2].open();
  sockets[2].receive({ type: "gateway.resumed", recovered: false, since: 6, replayed: 0, head: 9, earliest: 8, reason: "evicted" });
  assert.equal(client.messages.get("m1").partial, true);
  sockets[2].receive(message(10, "append", "!"));
  assert.deepEqual([client.messages.get("m1").text, client.messages.get("m1").partial], ["Hello!", true]);
});

test("messages are bounded: the oldest ended ones are dropped, streaming ones kept", async (t) => {
  const { sockets, ScriptedSocket } = scriptedSockets();
  const client = new GatewayClient({ url: "ws://gw/ws", token: () => jwt(inSecs(3600)), WebSocket: ScriptedSocket, maxMessages: 3 });
  t.after(() => client.close()); // also when an assertion fails: no timer left behind
  client.connect();
  await until("a socket", () => sockets.length === 1);
  sockets[0].open();
  let seq = 0;
  const frame = (id, op, status = "streaming") => ({ ...message((seq += 1), op, "", status), message_id: id });
  sockets[0].receive(frame("open-1", "create"));
  for (let i = 1; i <= 5; i++) {
    sockets[0].receive(frame(`done-${i}`, "create"));
    sockets[0].receive(frame(`done-${i}`, "end", "complete"));
  }
  assert.deepEqual([...client.messages.keys()], ["open-1", "done-3", "done-4", "done-5"]);
  for (let i = 2; i <= 5; i++) sockets[0].receive(frame(`open-${i}`, "create"));
  assert.deepEqual([...client.messages.keys()], ["done-3", "done-4", "done-5", "open-3", "open-4", "open-5"]);
  // A change makes a message the most recent again; a fourth streaming one (done-6's
  // create) drops the oldest streaming one, its end the oldest ended one.
  sockets[0].receive(frame("done-3", "snapshot", "complete"));
  sockets[0].receive(frame("done-6", "create"));
  sockets[0].receive(frame("done-6", "end", "cancelled"));
  assert.deepEqual([...client.messages.keys()], ["done-5", "open-4", "open-5", "done-3", "done-6"]);
});

test("messages kept with since continue where they were", async (t) => {
  const { sockets, ScriptedSocket } = scriptedSockets();
  const kept = { id: "m1", text: "Hel", status: "streaming", kind: "assistant", seq: 7, partial: false };
  const client = new GatewayClient({ url: "ws://gw/ws", token: () => jwt(inSecs(3600)), WebSocket: ScriptedSocket, since: 7, messages: [kept] });
  t.after(() => client.close());
  client.connect();
  await until("a socket", () => sockets.length === 1);
  assert.equal(sockets[0].url.searchParams.get("since"), "7");
  sockets[0].open();
  sockets[0].receive({ type: "gateway.resumed", recovered: true, since: 7, replayed: 0, head: 7, earliest: 1, reason: null });
  // Nothing changed after 7, so no snapshot: the next append continues the kept text.
  sockets[0].receive(message(8, "append", "lo"));
  assert.deepEqual(client.messages.get("m1"), { ...kept, text: "Hello", seq: 8 });
  assert.equal(kept.text, "Hel", "the application's object is copied, not changed");
});

// The SSE transport: a stream the client cannot send on, opened where a WebSocket cannot.

/** Runs `body` with no EventSource on globalThis, whatever this Node version has. */
async function withoutGlobalEventSource(body) {
  const had = Object.getOwnPropertyDescriptor(globalThis, "EventSource");
  Object.defineProperty(globalThis, "EventSource", { value: undefined, writable: true, configurable: true });
  try {
    return await body();
  } finally {
    if (had) Object.defineProperty(globalThis, "EventSource", had);
    else delete globalThis.EventSource;
  }
}

test("auto: a WebSocket that cannot open gives way at once to SSE, which keeps the order and resumes", async (t) => {
  const { sockets, ScriptedSocket } = scriptedSockets();
  const { sources, ScriptedEventSource } = scriptedSources();
  const token = jwt(inSecs(3600));
  const client = new GatewayClient({
    url: "ws://gw/ws", token: () => token, WebSocket: ScriptedSocket, EventSource: ScriptedEventSource, backoffMinMs: 1,
  });
  t.after(() => client.close());
  const seen = [];
  const statuses = [];
  client.on("event", (e) => seen.push(e.seq));
  client.on("status", (s) => statuses.push(s));
  client.connect();
  await until("a socket", () => sockets.length === 1);
  assert.equal(client.transport, "websocket", "auto starts with a WebSocket");
  sockets[0].drop(1006); // a proxy that refuses upgrades: it never opened
  await until("an event stream", () => sources.length === 1);
  assert.equal(sockets.length, 1, "the WebSocket is not tried again");
  assert.equal(client.transport, "sse");
  const url = sources[0].url;
  assert.equal(`${url.origin}${url.pathname}`, "http://gw/sse", "derived from ws://gw/ws");
  assert.equal(url.searchParams.get("access_token"), token);
  assert.equal(url.searchParams.get("since"), null, "no event seen yet: live only");
  // At once: no backoff, and the attempt counter did not grow.
  assert.deepEqual(statuses.filter((s) => s.state === "reconnecting"), [
    { state: "reconnecting", attempt: 0, delayMs: 0, code: 1006, reason: "" },
  ]);
  sources[0].open();
  assert.equal(client.state, "open");
  for (const seq of [1, 2, 2, 3]) sources[0].message({ type: "event", seq });
  sources[0].error();
  assert.equal(sources[0].closed, true, "the EventSource's own reconnecting is stopped");
  await until("a new stream", () => sources.length === 2);
  assert.equal(sockets.length, 1, "still SSE: it worked");
  assert.equal(client.transport, "sse");
  assert.equal(sources[1].url.searchParams.get("since"), "3");
  assert.equal(sources[1].url.searchParams.get("access_token"), token);
  sources[0].message({ type: "event", seq: 99 }); // the old stream is let go
  sources[1].open();
  sources[1].message({ type: "gateway.resumed", recovered: true, since: 3, replayed: 1, head: 4, earliest: 1, reason: null });
  for (const seq of [3, 4]) sources[1].message({ type: "event", seq });
  assert.deepEqual(seen, [1, 2, 3, 4]);
  assert.equal(client.lastSeq, 4);
});

test("auto: a transport that worked is kept through two failed opens; one that never did is left at once", async (t) => {
  {
    const { sockets, ScriptedSocket } = scriptedSockets();
    const { sources, ScriptedEventSource } = scriptedSources();
    const client = new GatewayClient({
      url: "ws://gw/ws", token: () => jwt(inSecs(3600)), WebSocket: ScriptedSocket, EventSource: ScriptedEventSource, backoffMinMs: 1,
    });
    t.after(() => client.close());
    client.connect();
    // A WebSocket that opened, then an outage: three failed opens before the switch.
    await until("a socket", () => sockets.length === 1);
    sockets[0].open();
    sockets[0].receive({ type: "event", seq: 5 });
    sockets[0].drop(1006);
    for (let i = 1; i <= 3; i++) {
      await until(`socket ${i + 1}`, () => sockets.length === i + 1, 5000);
      assert.equal(sources.length, 0, `after ${i - 1} failed opens the WebSocket is kept`);
      sockets[i].drop(1006);
    }
    await until("an event stream", () => sources.length === 1, 5000);
    assert.equal(sockets.length, 4);
    assert.equal(client.transport, "sse");
    assert.equal(sources[0].url.searchParams.get("since"), "5", "the switch resumes");
    // SSE opened once: kept through two failed opens, left on the third.
    sources[0].open();
    sources[0].error();
    for (let i = 1; i <= 3; i++) {
      await until(`stream ${i + 1}`, () => sources.length === i + 1, 5000);
      assert.equal(sockets.length, 4, `after ${i - 1} failed SSE opens SSE is kept`);
      assert.equal(client.transport, "sse");
      sources[i].error(); // before it opened
    }
    await until("a WebSocket again", () => sockets.length === 5, 5000);
    assert.equal(sources.length, 4);
    assert.equal(client.transport, "websocket");
    assert.equal(sockets[4].url.searchParams.get("since"), "5");
    client.close();
  }
  {
    // Neither ever opened: each failure switches to the other.
    const { sockets, ScriptedSocket } = scriptedSockets();
    const { sources, ScriptedEventSource } = scriptedSources();
    const client = new GatewayClient({
      url: "ws://gw/ws", token: () => jwt(inSecs(3600)), WebSocket: ScriptedSocket, EventSource: ScriptedEventSource, backoffMinMs: 1,
    });
    t.after(() => client.close());
    const retries = [];
    client.on("status", (s) => s.delayMs !== undefined && retries.push(s.attempt));
    client.connect();
    await until("a socket", () => sockets.length === 1);
    sockets[0].drop(1006);
    await until("a stream", () => sources.length === 1);
    sources[0].error();
    await until("a WebSocket", () => sockets.length === 2, 5000);
    assert.equal(client.transport, "websocket");
    sockets[1].drop(1006);
    await until("a stream", () => sources.length === 2, 5000);
    assert.equal(client.transport, "sse");
    assert.equal(sockets.length, 2);
    // Only the first switch to SSE is at once (attempt 0); the later ones wait the backoff.
    assert.deepEqual(retries, [0, 1, 2]);
    client.close();
  }
});

test("SSE: subscriptions travel in the stream's query, a change reconnects with since, nothing is sent", async (t) => {
  const { sources, ScriptedEventSource } = scriptedSources();
  const client = new GatewayClient({
    url: "ws://gw/ws", token: () => jwt(inSecs(3600)), EventSource: ScriptedEventSource, transport: "sse", backoffMinMs: 1,
  });
  t.after(() => client.close());
  assert.equal(client.transport, "sse");
  client.subscribe("t1");
  client.connect();
  await until("a stream", () => sources.length === 1);
  assert.deepEqual(sources[0].frames, [{ type: "subscribe", thread_id: "t1" }]);
  sources[0].open();
  assert.equal(client.send({ type: "ping" }), false, "a stream cannot send");
  client.subscribe("t1"); // already subscribed: nothing changes
  sources[0].message({ type: "event", seq: 7 });
  await sleep(20);
  assert.equal(sources.length, 1);
  client.subscribe("t2");
  assert.equal(sources[0].closed, true);
  await until("a new stream", () => sources.length === 2);
  assert.deepEqual(sources[1].frames, [{ type: "subscribe", thread_id: "t1" }, { type: "subscribe", thread_id: "t2" }]);
  assert.equal(sources[1].url.searchParams.get("since"), "7");
  // A change while the stream is still connecting also reconnects with it.
  client.unsubscribe("t1");
  await until("a new stream", () => sources.length === 3);
  assert.equal(sources[1].closed, true);
  assert.deepEqual(sources[2].frames, [{ type: "subscribe", thread_id: "t2" }]);
  assert.equal(sources[2].url.searchParams.get("since"), "7");
  sources[2].open();
  assert.equal(client.send({ type: "subscribe", thread_id: "t3" }), false);
  assert.deepEqual(client.threads, ["t2"]);
});

test("SSE: the close event carries the gateway's code: 4001 is final, 1001 reconnects", async (t) => {
  {
    const { sources, ScriptedEventSource } = scriptedSources();
    const client = new GatewayClient({
      url: "ws://gw/ws", token: () => jwt(inSecs(3600)), EventSource: ScriptedEventSource, transport: "sse", backoffMinMs: 1,
    });
    t.after(() => client.close());
    const statuses = [];
    client.on("status", (s) => statuses.push(s));
    client.connect();
    await until("a stream", () => sources.length === 1);
    sources[0].open();
    sources[0].named("close", JSON.stringify({ code: 4001, reason: "disconnected: x" }));
    assert.equal(sources[0].closed, true);
    sources[0].error(); // the stream ending after its close event is no second close
    await sleep(20);
    assert.equal(sources.length, 1, "no reconnect");
    assert.equal(client.state, "closed");
    assert.deepEqual(statuses.at(-1), { state: "closed", code: 4001, reason: "disconnected: x" });
  }
  {
    const { sources, ScriptedEventSource } = scriptedSources();
    const client = new GatewayClient({
      url: "ws://gw/ws", token: () => jwt(inSecs(3600)), EventSource: ScriptedEventSource, transport: "sse", backoffMinMs: 1,
    });
    t.after(() => client.close());
    const statuses = [];
    client.on("status", (s) => statuses.push(s));
    const errors = [];
    client.on("error", (e) => errors.push(e.message));
    client.connect();
    await until("a stream", () => sources.length === 1);
    sources[0].open();
    sources[0].message({ type: "event", seq: 3 });
    // A binary frame is not JSON: reported, not dropped silently.
    sources[0].named("binary", "AP8B");
    assert.deepEqual(errors, ["a frame that is not JSON"]);
    sources[0].named("close", JSON.stringify({ code: 1001, reason: "draining" }));
    await until("a reconnect", () => sources.length === 2);
    assert.ok(statuses.some((s) => s.state === "reconnecting" && s.code === 1001 && s.reason === "draining"));
    assert.equal(sources[1].url.searchParams.get("since"), "3");
    client.close();
  }
});

test("SSE: rpc() rejects with not_supported and sends nothing", async (t) => {
  const { sockets, ScriptedSocket } = scriptedSockets();
  const { sources, ScriptedEventSource } = scriptedSources();
  const client = new GatewayClient({
    url: "ws://gw/ws", token: () => jwt(inSecs(3600)), WebSocket: ScriptedSocket, EventSource: ScriptedEventSource, backoffMinMs: 1,
  });
  t.after(() => client.close());
  client.connect();
  await until("a socket", () => sockets.length === 1);
  sockets[0].drop(1006);
  await until("a stream", () => sources.length === 1);
  const notSupported = (err) => err instanceof RpcError && err.code === "not_supported";
  await assert.rejects(client.rpc("cancel_run", { run_id: "r1" }), notSupported, "while the stream connects");
  sources[0].open();
  await assert.rejects(client.rpc("cancel_run", { run_id: "r1" }), notSupported);
  await sleep(20);
  assert.equal(sources.length, 1, "the stream is kept");
  assert.equal(client.state, "open");
  assert.equal(sockets[0].sent.length, 0);
});

test("SSE: a token is refreshed by a new stream with it, not in-band", async (t) => {
  const { sources, ScriptedEventSource } = scriptedSources();
  let calls = 0;
  const first = jwt(inSecs(2)); // refreshed about a second after the stream opens
  const fresh = jwt(inSecs(3600));
  const token = () => {
    calls += 1;
    return calls === 1 ? first : fresh;
  };
  const client = new GatewayClient({ url: "ws://gw/ws", token, EventSource: ScriptedEventSource, transport: "sse" });
  t.after(() => client.close());
  const statuses = [];
  client.on("status", (s) => statuses.push(s));
  const failures = [];
  client.on("refresh_failed", (f) => failures.push(f.reason));
  client.connect();
  await until("a stream", () => sources.length === 1);
  assert.equal(sources[0].url.searchParams.get("access_token"), first);
  sources[0].open();
  sources[0].message({ type: "event", seq: 9 });
  await until("a stream with the fresh token", () => sources.length === 2, 5000);
  assert.equal(sources[0].closed, true);
  assert.equal(sources[1].url.searchParams.get("access_token"), fresh);
  assert.equal(sources[1].url.searchParams.get("since"), "9", "the new stream resumes");
  assert.ok(statuses.some((s) => s.state === "reconnecting" && s.code === 4100), "a reconnect");
  sources[1].open();
  await sleep(100);
  assert.equal(sources.length, 2, "a token valid for an hour is not refreshed at once");
  assert.deepEqual(failures, []);
});

test("SSE: a refresh whose token callback fails or gives no newer token keeps the stream", async (t) => {
  const { sources, ScriptedEventSource } = scriptedSources();
  const same = jwt(inSecs(2)); // due for a refresh about a second after the stream opens
  let calls = 0;
  const token = () => {
    calls += 1;
    if (calls === 2) throw new Error("token service down");
    return same; // a token cached until it expires: never newer
  };
  const client = new GatewayClient({ url: "ws://gw/ws", token, EventSource: ScriptedEventSource, transport: "sse" });
  t.after(() => client.close());
  const failures = [];
  client.on("refresh_failed", (f) => failures.push(f.reason));
  client.connect();
  await until("a stream", () => sources.length === 1);
  sources[0].open();
  await until("the failed callback reported", () => failures.length === 1, 5000);
  assert.match(failures[0], /token service down/);
  await until("the same token reported as no newer", () => failures.length === 2, 8000);
  assert.match(failures[1], /no newer token/);
  assert.equal(sources.length, 1, "the stream was kept: no reconnect with an old token");
  assert.equal(sources[0].closed, false);
});

test("transport websocket never falls back; sse needs an EventSource; auto without one stays a WebSocket", async (t) => {
  {
    const { sockets, ScriptedSocket } = scriptedSockets();
    const { sources, ScriptedEventSource } = scriptedSources();
    const client = new GatewayClient({
      url: "ws://gw/ws", token: () => jwt(inSecs(3600)), WebSocket: ScriptedSocket, EventSource: ScriptedEventSource,
      transport: "websocket", backoffMinMs: 1,
    });
    t.after(() => client.close());
    client.connect();
    for (let i = 1; i <= 4; i++) {
      await until(`socket ${i}`, () => sockets.length === i, 5000);
      sockets[i - 1].drop(1006); // never opened
    }
    await until("socket 5", () => sockets.length === 5, 5000);
    assert.equal(sources.length, 0);
    assert.equal(client.transport, "websocket");
    client.close();
  }
  await withoutGlobalEventSource(async () => {
    assert.throws(
      () => new GatewayClient({ url: "ws://gw/ws", token: () => "x", transport: "sse" }),
      (err) => err instanceof TypeError && /EventSource/.test(err.message),
    );
    const { sockets, ScriptedSocket } = scriptedSockets();
    const client = new GatewayClient({ url: "ws://gw/ws", token: () => jwt(inSecs(3600)), WebSocket: ScriptedSocket, backoffMinMs: 1 });
    t.after(() => client.close());
    const errors = [];
    client.on("error", (e) => errors.push(e.message));
    assert.equal(client.transport, "websocket");
    client.connect();
    for (let i = 1; i <= 3; i++) {
      await until(`socket ${i}`, () => sockets.length === i, 5000);
      sockets[i - 1].drop(1006); // never opened
    }
    await until("socket 4", () => sockets.length === 4, 5000);
    assert.deepEqual(errors, []);
    assert.notEqual(client.state, "closed");
    assert.equal(client.transport, "websocket");
    sockets[3].open();
    assert.equal(client.state, "open");
    client.close();
  });
});

test("the SSE endpoint: derived from url, or sseUrl; sse without one is refused", async (t) => {
  const { ScriptedEventSource, sources } = scriptedSources();
  const options = { token: () => jwt(inSecs(3600)), EventSource: ScriptedEventSource, transport: "sse" };
  const urls = [];
  for (const [url, sseUrl] of [["wss://gw.example/base/ws?x=1", undefined], ["ws://gw/socket", "https://gw/stream"]]) {
    const client = new GatewayClient({ ...options, url, sseUrl });
    t.after(() => client.close());
    client.connect();
    await until("a stream", () => sources.length === urls.length + 1);
    const { origin, pathname, searchParams } = sources.at(-1).url;
    urls.push([`${origin}${pathname}`, searchParams.get("x")]);
    client.close();
  }
  assert.deepEqual(urls, [["https://gw.example/base/sse", "1"], ["https://gw/stream", null]]);
  assert.throws(() => new GatewayClient({ ...options, url: "ws://gw/socket" }), TypeError);
  assert.throws(() => new GatewayClient({ ...options, url: "ws://gw/ws", transport: "polling" }), TypeError);
});

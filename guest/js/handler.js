// The reference handler in JavaScript (componentize-js): the same frames and rules as the
// Rust one in guest/src, as one ES module. State lives in module variables: each connection
// has its own instance, so its own copy of them, freed when the connection ends.
//
// Built by `make guests` with componentize-js and its WASI features disabled, so the
// component imports only the world (see docs/guest-guide.md for what that leaves out).

import { ackContext, emit } from "gateway:handler/connection@0.2.0";

const MAX_SUBSCRIPTIONS = 64;
const MAX_THREAD_ID_BYTES = 256;
const MAX_TRACKED_RUNS = 256;
const WITHHELD = "[redacted: payload could not be inspected]";
// The kind of the events that carry message ops (AI output streams) from the gateway.
const MESSAGE_KIND = "gateway.message";

// A key is sensitive when, lower-cased with `-` and `_` dropped, it ends with one of these:
// the Rust handler's list (guest/src/handler.rs), checked by tests/fixtures/redaction-corpus.json.
const SENSITIVE_SUFFIXES = [
  "password", "passwords", "passwd", "passphrase", "pwd", "secret", "secrets", "token", "apikey",
  "apikeys", "accesskey", "secretkey", "privatekey", "authorization", "cookie", "cookies",
  "credential", "credentials",
];
// In a name/value list (`{"name":"Authorization","value":"..."}`), the members that name and
// the members that the name covers.
const NAME_FIELDS = new Set(["name", "key"]);
const VALUE_FIELDS = new Set(["value", "values"]);
// Levels of JSON inside string values inspected; a deeper one withholds the payload.
const MAX_EMBEDDED = 4;
// Nesting `parseExact` follows, as serde_json's in the Rust handler.
const MAX_DEPTH = 128;

let connectionId = "";
let userId = "";
const subscriptions = new Set();
const runs = new Map();
const counters = {
  frames_in: 0, events_in: 0, events_out: 0, events_filtered: 0, redactions: 0, payloads_withheld: 0,
};

function send(value) {
  emit({ tag: "text", val: JSON.stringify(value) });
}

function error(reason) {
  send({ type: "error", reason });
}

export function init(ctx) {
  ackContext(ctx.connectionId, ctx.userId);
  connectionId = ctx.connectionId;
  userId = ctx.userId;
  send({ type: "welcome", connection_id: connectionId, user_id: userId, expires_at: Number(ctx.expiresAt) });
}

export function onClientMessage(frame) {
  counters.frames_in += 1;
  if (frame.tag !== "text") return error("binary frames are not supported");
  let msg;
  try {
    msg = JSON.parse(frame.val);
  } catch {
    return error("expected a JSON object");
  }
  if (msg === null || typeof msg !== "object" || Array.isArray(msg)) return error("expected a JSON object");
  const thread = typeof msg.thread_id === "string" ? msg.thread_id : null;
  switch (msg.type) {
    case "ping":
      return pong();
    case "subscribe":
    case "unsubscribe":
      if (thread === null) return error("thread_id is required");
      if (new TextEncoder().encode(thread).length > MAX_THREAD_ID_BYTES) {
        return error("thread_id is longer than 256 bytes");
      }
      if (msg.type === "subscribe") {
        if (subscriptions.size >= MAX_SUBSCRIPTIONS && !subscriptions.has(thread)) {
          return error("too many subscriptions");
        }
        subscriptions.add(thread);
      } else {
        subscriptions.delete(thread);
      }
      return send({ type: `${msg.type}d`, thread_id: thread, threads: [...subscriptions].sort() });
    default:
      return error("unknown message type");
  }
}

function pong() {
  const runStates = {};
  for (const [id, run] of runs) runStates[id] = { ...run };
  send({
    type: "pong", connection_id: connectionId, user_id: userId, ...counters,
    subscriptions: [...subscriptions].sort(), runs: runStates,
  });
}

export function onEvent(event) {
  counters.events_in += 1;
  const thread = event.threadId ?? null;
  if (subscriptions.size > 0 && !(thread !== null && subscriptions.has(thread))) {
    counters.events_filtered += 1;
    return;
  }
  const message = event.kind === MESSAGE_KIND ? messageFrame(event) : null;
  if (message !== null) {
    counters.events_out += 1;
    emit({ tag: "text", val: message });
    return;
  }
  const state = event.runId == null ? null : track(event.runId, event.kind);
  // Built as text so that the payload goes out as it came but for what was redacted: no
  // number is re-printed (digits beyond 2^53 included).
  let frame = `{"type":"event","seq":${event.seq},"kind":${JSON.stringify(event.kind)},"payload":${redacted(event.payload)}`;
  if (event.runId != null) frame += `,"run_id":${JSON.stringify(event.runId)}`;
  if (thread !== null) frame += `,"thread_id":${JSON.stringify(thread)}`;
  if (state !== null) frame += `,"run_state":"${state}"`;
  counters.events_out += 1;
  emit({ tag: "text", val: `${frame}}` });
}

// A message op (AI output streams) as a `type:"message"` frame: the gateway hands it over as
// an event of kind `gateway.message` whose payload is `{"id","op","text","status","kind",
// "payload"?}`. The text goes as published (a secret split over appends could not be
// recognised in one of them anyway); the create's payload is redacted like an event's. Null
// when the envelope is not one (the event is then forwarded as it is).
function messageFrame(event) {
  let envelope;
  try {
    envelope = decode(event.payload);
  } catch {
    return null;
  }
  if (envelope === null || typeof envelope !== "object" || Array.isArray(envelope)) return null;
  const fields = ["id", "op", "status", "kind", "text"].map((name) => envelope[name]);
  if (!fields.every((value) => typeof value === "string")) return null;
  const [id, op, status, kind, text] = fields.map((value) => JSON.stringify(value));
  let frame = `{"type":"message","op":${op},"message_id":${id},"text":${text},"status":${status},"seq":${event.seq},"kind":${kind}`;
  if (event.runId != null) frame += `,"run_id":${JSON.stringify(event.runId)}`;
  if (event.threadId != null) frame += `,"thread_id":${JSON.stringify(event.threadId)}`;
  const payload = envelope.payload;
  if (payload !== undefined && payload !== null) frame += `,"payload":${redacted(encode(payload, event.payload))}`;
  return `${frame}}`;
}

export function onClose(_reason) {}

// Hibernation: when the connection idles, the gateway keeps these bytes and drops this
// instance; `restore` rebuilds the state in a fresh one before the next frame or event.
const SAVED_VERSION = 1;

export function save() {
  const state = {
    v: SAVED_VERSION, connection_id: connectionId, user_id: userId,
    subscriptions: [...subscriptions], runs: [...runs], counters,
  };
  return new TextEncoder().encode(JSON.stringify(state));
}

export function restore(ctx, saved) {
  ackContext(ctx.connectionId, ctx.userId);
  const state = JSON.parse(new TextDecoder().decode(saved));
  if (state.v !== SAVED_VERSION || state.connection_id !== ctx.connectionId || state.user_id !== ctx.userId) {
    throw "saved state is of another version or connection";
  }
  connectionId = state.connection_id;
  userId = state.user_id;
  for (const thread of state.subscriptions) subscriptions.add(thread);
  for (const [id, run] of state.runs) runs.set(id, run);
  Object.assign(counters, state.counters);
}

function track(runId, kind) {
  if (!runs.has(runId) && runs.size >= MAX_TRACKED_RUNS) {
    // Forget a finished run first; if none is finished, the oldest.
    let victim = [...runs].find(([, r]) => finished(r.state))?.[0] ?? runs.keys().next().value;
    runs.delete(victim);
  }
  const run = runs.get(runId) ?? { state: "started", tools_running: 0, events: 0 };
  runs.set(runId, run);
  run.events += 1;
  switch (kind) {
    case "agent_started":
      run.state = "started";
      run.tools_running = 0;
      break;
    case "tool_executing":
    case "tool_started":
      if (!finished(run.state)) {
        run.tools_running += 1;
        run.state = "tools_running";
      }
      break;
    case "tool_completed":
    case "tool_error":
      if (!finished(run.state)) {
        run.tools_running = Math.max(0, run.tools_running - 1);
        if (run.tools_running === 0) run.state = "started";
      }
      break;
    case "agent_completed":
      run.state = "completed";
      run.tools_running = 0;
      break;
    case "agent_error":
      run.state = "error";
      run.tools_running = 0;
      break;
  }
  return run.state;
}

function finished(state) {
  return state === "completed" || state === "error";
}

function normalise(key) {
  return key.replace(/[-_]/g, "").toLowerCase();
}

function sensitive(key) {
  return sensitiveNormalised(normalise(key));
}

// One regular expression for all suffixes: one call per name, not one per suffix.
const SENSITIVE_END = new RegExp(`(?:${SENSITIVE_SUFFIXES.join("|")})$`);

function sensitiveNormalised(norm) {
  return SENSITIVE_END.test(norm);
}

// Every sensitive name, normalised, contains one of these; an escape (`\u0074oken`) could
// hide one, so a text with a backslash is always parsed.
const STEMS = ["pass", "pwd", "secret", "apikey", "accesskey", "privatekey", "token", "authorization", "cookie", "credential"];

function mayHoldSecret(text) {
  const norm = normalise(text);
  return text.includes("\\") || STEMS.some((stem) => norm.includes(stem));
}

// The payload as JSON text with sensitive values replaced at any depth: unchanged when no
// name can be sensitive or none was; withheld whole when it cannot be inspected, since a
// secret could be anywhere in it.
function redacted(payload) {
  if (!mayHoldSecret(payload)) return payload;
  let box;
  let count;
  try {
    // Boxed, so that a payload that is one string holding JSON is redacted in place too.
    box = [decode(payload)];
    count = redact(box, 0);
  } catch {
    counters.payloads_withheld += 1;
    return JSON.stringify(WITHHELD);
  }
  if (count === 0) return payload;
  counters.redactions += count;
  return encode(box[0], payload);
}

// Replaces the sensitive values inside a parsed array or object, in place; returns how many.
// Throws when JSON inside strings is nested past MAX_EMBEDDED.
function redact(container, embedded) {
  let count = 0;
  if (Array.isArray(container)) {
    for (let i = 0; i < container.length; i += 1) count += redactInside(container, i, embedded);
    return count;
  }
  const keys = Object.keys(container);
  const norms = keys.map(normalise);
  const named = norms.some(
    (norm, i) => NAME_FIELDS.has(norm) && typeof container[keys[i]] === "string" && sensitive(container[keys[i]]),
  );
  keys.forEach((key, i) => {
    if (sensitiveNormalised(norms[i]) || (named && VALUE_FIELDS.has(norms[i]))) {
      put(container, key, "[redacted]");
      count += 1;
    } else {
      count += redactInside(container, key, embedded);
    }
  });
  return count;
}

// The value at `slot`, itself not sensitive: an array or object is walked, and a string may
// hold JSON.
function redactInside(container, slot, embedded) {
  const inner = container[slot];
  if (typeof inner === "string") {
    const [count, text] = redactEmbedded(inner, embedded);
    if (count > 0) put(container, slot, text);
    return count;
  }
  if (inner !== null && typeof inner === "object" && !(inner instanceof Exact)) return redact(inner, embedded);
  return 0;
}

// Defined, not assigned: a `__proto__` key is an own property (JSON.parse makes it one), and
// an assignment would not replace it.
function put(container, slot, value) {
  Object.defineProperty(container, slot, { value, writable: true, enumerable: true, configurable: true });
}

// JSON inside a string value (a tool call's `arguments`): parsed when the string looks like
// an object or array, redacted inside, and put back as a string, re-encoded only when
// something in it was replaced. A string that does not parse is text and stays as it is.
// Returns how many values were replaced and the string.
function redactEmbedded(text, embedded) {
  const trimmed = text.trim();
  const looksLikeJson =
    (trimmed.startsWith("{") && trimmed.endsWith("}")) || (trimmed.startsWith("[") && trimmed.endsWith("]"));
  if (!looksLikeJson || !mayHoldSecret(text)) return [0, text];
  let box;
  try {
    box = [decode(text)];
  } catch {
    return [0, text];
  }
  if (embedded >= MAX_EMBEDDED) throw new Error("JSON nested in strings too deep to inspect");
  const count = redact(box, embedded + 1);
  return count > 0 ? [count, encode(box[0], text)] : [0, text];
}

// JSON.parse rounds integers past 2^53 (16 digits and more). A text with 16 digits in a row is
// read by `parseExact` instead, which keeps each number as its literal (`Exact`), and printed
// back by `printExact`, so those digits go out as they came; any other by JSON.parse and
// JSON.stringify, which are much faster here.
const LONG_DIGITS = /[0-9]{16}/;

function decode(text) {
  return LONG_DIGITS.test(text) ? parseExact(text) : JSON.parse(text);
}

function encode(value, text) {
  return LONG_DIGITS.test(text) ? printExact(value) : JSON.stringify(value);
}

class Exact {
  constructor(raw) {
    this.raw = raw;
  }
}

const NUMBER = /-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?/y;

// JSON.parse's result, but numbers as `Exact`; as deep as serde_json goes in the Rust handler.
function parseExact(source) {
  let at = 0;
  const fail = () => {
    throw new SyntaxError(`not JSON at ${at}`);
  };
  const skip = () => {
    while (at < source.length && " \t\n\r".includes(source[at])) at += 1;
  };
  const expect = (c) => {
    skip();
    if (source[at] !== c) fail();
    at += 1;
  };
  // A string literal from its opening quote; JSON.parse checks and decodes it.
  const string = () => {
    if (source[at] !== '"') fail();
    let end = at + 1;
    for (;;) {
      end = source.indexOf('"', end);
      if (end < 0) fail();
      let escapes = 0;
      while (source[end - 1 - escapes] === "\\") escapes += 1;
      end += 1;
      if (escapes % 2 === 0) break;
    }
    const text = JSON.parse(source.slice(at, end));
    at = end;
    return text;
  };
  const value = (depth) => {
    if (depth > MAX_DEPTH) fail();
    skip();
    const c = source[at];
    if (c === "{" || c === "[") {
      at += 1;
      const items = [];
      const close = c === "{" ? "}" : "]";
      skip();
      if (source[at] === close) {
        at += 1;
      } else {
        for (;;) {
          if (c === "{") {
            skip();
            const key = string();
            expect(":");
            items.push([key, value(depth + 1)]);
          } else {
            items.push(value(depth + 1));
          }
          skip();
          if (source[at] !== ",") break;
          at += 1;
        }
        expect(close);
      }
      // fromEntries defines each key, `__proto__` included, as JSON.parse does.
      return c === "{" ? Object.fromEntries(items) : items;
    }
    if (c === '"') return string();
    for (const [word, literal] of [["true", true], ["false", false], ["null", null]]) {
      if (source.startsWith(word, at)) {
        at += word.length;
        return literal;
      }
    }
    NUMBER.lastIndex = at;
    const m = NUMBER.exec(source);
    if (m === null) fail();
    at = NUMBER.lastIndex;
    return new Exact(m[0]);
  };
  const tree = value(0);
  skip();
  if (at !== source.length) fail();
  return tree;
}

function printExact(value) {
  if (value instanceof Exact) return value.raw;
  if (Array.isArray(value)) return `[${value.map(printExact).join(",")}]`;
  if (value !== null && typeof value === "object") {
    return `{${Object.keys(value)
      .map((key) => `${JSON.stringify(key)}:${printExact(value[key])}`)
      .join(",")}}`;
  }
  return JSON.stringify(value);
}

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

// Compared after lower-casing and dropping `-` and `_`, as the Rust handler does.
const SENSITIVE_KEYS = new Set([
  "password", "passwd", "pwd", "secret", "clientsecret", "apikey", "token", "accesstoken",
  "refreshtoken", "idtoken", "authtoken", "bearertoken", "sessiontoken", "authorization",
  "cookie", "setcookie", "privatekey", "credential", "credentials",
]);
const SENSITIVE_SUFFIXES = ["password", "secret", "apikey"];

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
  const state = event.runId == null ? null : track(event.runId, event.kind);
  // Built as text so that a payload with nothing to redact goes out as it came, numbers
  // beyond 2^53 included.
  let frame = `{"type":"event","seq":${event.seq},"kind":${JSON.stringify(event.kind)},"payload":${redacted(event.payload)}`;
  if (event.runId != null) frame += `,"run_id":${JSON.stringify(event.runId)}`;
  if (thread !== null) frame += `,"thread_id":${JSON.stringify(thread)}`;
  if (state !== null) frame += `,"run_state":"${state}"`;
  counters.events_out += 1;
  emit({ tag: "text", val: `${frame}}` });
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

function sensitive(key) {
  const norm = key.replace(/[-_]/g, "").toLowerCase();
  return SENSITIVE_KEYS.has(norm) || SENSITIVE_SUFFIXES.some((s) => norm.endsWith(s));
}

// Every sensitive key, normalised, contains one of these; an escape (`\u0074oken`) could
// hide one, so a payload with a backslash is always parsed.
const STEMS = ["pass", "pwd", "secret", "apikey", "token", "authorization", "cookie", "privatekey", "credential"];

// The payload as JSON text with sensitive values replaced at any depth: unchanged when no
// key can be sensitive; withheld whole when it cannot be parsed, since a secret could be
// anywhere in it.
function redacted(payload) {
  const norm = payload.replace(/[-_]/g, "").toLowerCase();
  if (!payload.includes("\\") && !STEMS.some((stem) => norm.includes(stem))) return payload;
  let value;
  try {
    value = JSON.parse(payload);
  } catch {
    counters.payloads_withheld += 1;
    return JSON.stringify(WITHHELD);
  }
  const before = counters.redactions;
  const clean = redact(value);
  return counters.redactions === before ? payload : JSON.stringify(clean);
}

function redact(value) {
  if (Array.isArray(value)) return value.map(redact);
  if (value === null || typeof value !== "object") return value;
  const out = {};
  for (const [key, inner] of Object.entries(value)) {
    if (sensitive(key)) {
      counters.redactions += 1;
      out[key] = "[redacted]";
    } else {
      out[key] = redact(inner);
    }
  }
  return out;
}

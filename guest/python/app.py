"""The reference handler in Python (componentize-py): the same frames and rules as the Rust
one in guest/src. State lives in module globals: each connection has its own instance, so
its own copy of them, freed when the connection ends.

Built by `make guests` with `componentize-py ... componentize --stub-wasi`, so the component
imports only the world (see docs/guest-guide.md for what that leaves out).
"""

import json

import wit_world
from componentize_py_types import Err
from wit_world.imports import connection

MAX_SUBSCRIPTIONS = 64
MAX_THREAD_ID_BYTES = 256
MAX_TRACKED_RUNS = 256
WITHHELD = "[redacted: payload could not be inspected]"

# Compared after lower-casing and dropping `-` and `_`, as the Rust handler does.
SENSITIVE_KEYS = {
    "password", "passwd", "pwd", "secret", "clientsecret", "apikey", "token", "accesstoken",
    "refreshtoken", "idtoken", "authtoken", "bearertoken", "sessiontoken", "authorization",
    "cookie", "setcookie", "privatekey", "credential", "credentials",
}
SENSITIVE_SUFFIXES = ("password", "secret", "apikey")
# Every sensitive key, normalised, contains one of these; an escape could hide one, so a
# payload with a backslash is always parsed.
STEMS = ("pass", "pwd", "secret", "apikey", "token", "authorization", "cookie", "privatekey", "credential")

SAVED_VERSION = 1

connection_id = ""
user_id = ""
subscriptions = set()
runs = {}
counters = {
    "frames_in": 0, "events_in": 0, "events_out": 0, "events_filtered": 0,
    "redactions": 0, "payloads_withheld": 0,
}


def send(value):
    connection.emit(connection.Frame_Text(json.dumps(value, separators=(",", ":"))))


def error(reason):
    send({"type": "error", "reason": reason})


class WitWorld(wit_world.WitWorld):
    def init(self, ctx):
        global connection_id, user_id
        connection.ack_context(ctx.connection_id, ctx.user_id)
        connection_id, user_id = ctx.connection_id, ctx.user_id
        send({"type": "welcome", "connection_id": connection_id, "user_id": user_id,
              "expires_at": ctx.expires_at})

    def on_client_message(self, frame):
        counters["frames_in"] += 1
        if not isinstance(frame, connection.Frame_Text):
            return error("binary frames are not supported")
        try:
            msg = json.loads(frame.value)
        except ValueError:
            return error("expected a JSON object")
        if not isinstance(msg, dict):
            return error("expected a JSON object")
        kind = msg.get("type")
        thread = msg.get("thread_id") if isinstance(msg.get("thread_id"), str) else None
        if kind == "ping":
            return pong()
        if kind in ("subscribe", "unsubscribe"):
            if thread is None:
                return error("thread_id is required")
            if len(thread.encode()) > MAX_THREAD_ID_BYTES:
                return error("thread_id is longer than 256 bytes")
            if kind == "subscribe":
                if len(subscriptions) >= MAX_SUBSCRIPTIONS and thread not in subscriptions:
                    return error("too many subscriptions")
                subscriptions.add(thread)
            else:
                subscriptions.discard(thread)
            return send({"type": kind + "d", "thread_id": thread, "threads": sorted(subscriptions)})
        return error("unknown message type")

    def on_event(self, event):
        counters["events_in"] += 1
        thread = event.thread_id
        if subscriptions and thread not in subscriptions:
            counters["events_filtered"] += 1
            return
        state = None if event.run_id is None else track(event.run_id, event.kind)
        # Built as text so that a payload with nothing to redact goes out as it came.
        frame = '{"type":"event","seq":%d,"kind":%s,"payload":%s' % (
            event.seq, json.dumps(event.kind), redacted(event.payload))
        if event.run_id is not None:
            frame += ',"run_id":' + json.dumps(event.run_id)
        if thread is not None:
            frame += ',"thread_id":' + json.dumps(thread)
        if state is not None:
            frame += ',"run_state":"%s"' % state
        counters["events_out"] += 1
        connection.emit(connection.Frame_Text(frame + "}"))

    def on_close(self, reason):
        pass

    # Hibernation: when the connection idles, the gateway keeps these bytes and drops this
    # instance; `restore` rebuilds the state in a fresh one before the next frame or event.
    def save(self):
        state = {"v": SAVED_VERSION, "connection_id": connection_id, "user_id": user_id,
                 "subscriptions": sorted(subscriptions), "runs": runs, "counters": counters}
        return json.dumps(state, separators=(",", ":")).encode()

    def restore(self, ctx, saved):
        global connection_id, user_id
        connection.ack_context(ctx.connection_id, ctx.user_id)
        state = json.loads(saved)
        if (state.get("v") != SAVED_VERSION or state.get("connection_id") != ctx.connection_id
                or state.get("user_id") != ctx.user_id):
            raise Err("saved state is of another version or connection")
        connection_id, user_id = ctx.connection_id, ctx.user_id
        subscriptions.update(state["subscriptions"])
        runs.update(state["runs"])
        counters.update(state["counters"])


def pong():
    send({"type": "pong", "connection_id": connection_id, "user_id": user_id, **counters,
          "subscriptions": sorted(subscriptions), "runs": runs})


def finished(state):
    return state in ("completed", "error")


def track(run_id, kind):
    if run_id not in runs and len(runs) >= MAX_TRACKED_RUNS:
        # Forget a finished run first; if none is finished, the oldest.
        victim = next((i for i, r in runs.items() if finished(r["state"])), next(iter(runs)))
        del runs[victim]
    run = runs.setdefault(run_id, {"state": "started", "tools_running": 0, "events": 0})
    run["events"] += 1
    if kind == "agent_started":
        run["state"], run["tools_running"] = "started", 0
    elif kind in ("tool_executing", "tool_started") and not finished(run["state"]):
        run["tools_running"] += 1
        run["state"] = "tools_running"
    elif kind in ("tool_completed", "tool_error") and not finished(run["state"]):
        run["tools_running"] = max(0, run["tools_running"] - 1)
        if run["tools_running"] == 0:
            run["state"] = "started"
    elif kind == "agent_completed":
        run["state"], run["tools_running"] = "completed", 0
    elif kind == "agent_error":
        run["state"], run["tools_running"] = "error", 0
    return run["state"]


def sensitive(key):
    norm = key.replace("-", "").replace("_", "").lower()
    return norm in SENSITIVE_KEYS or norm.endswith(SENSITIVE_SUFFIXES)


def redacted(payload):
    """The payload as JSON text with sensitive values replaced at any depth: unchanged when
    no key can be sensitive; withheld whole when it cannot be parsed."""
    norm = payload.replace("-", "").replace("_", "").lower()
    if "\\" not in payload and not any(stem in norm for stem in STEMS):
        return payload
    try:
        value = json.loads(payload)
    except (ValueError, RecursionError):
        counters["payloads_withheld"] += 1
        return json.dumps(WITHHELD)
    before = counters["redactions"]
    clean = redact(value)
    if counters["redactions"] == before:
        return payload
    return json.dumps(clean, separators=(",", ":"), ensure_ascii=False)


def redact(value):
    if isinstance(value, list):
        return [redact(v) for v in value]
    if isinstance(value, dict):
        out = {}
        for key, inner in value.items():
            if sensitive(key):
                counters["redactions"] += 1
                out[key] = "[redacted]"
            else:
                out[key] = redact(inner)
        return out
    return value

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
# The kind of the events that carry message ops (AI output streams) from the gateway.
MESSAGE_KIND = "gateway.message"

# A key is sensitive when, lower-cased with `-` and `_` dropped, it ends with one of these:
# the Rust handler's list (guest/src/handler.rs), checked by tests/fixtures/redaction-corpus.json.
SENSITIVE_SUFFIXES = (
    "password", "passwords", "passwd", "passphrase", "pwd", "secret", "secrets", "token", "apikey",
    "apikeys", "accesskey", "secretkey", "privatekey", "authorization", "cookie", "cookies",
    "credential", "credentials",
)
# In a name/value list (`{"name":"Authorization","value":"..."}`), the members that name and
# the members that the name covers.
NAME_FIELDS = ("name", "key")
VALUE_FIELDS = ("value", "values")
# Levels of JSON inside string values inspected; a deeper one withholds the payload.
MAX_EMBEDDED = 4
# Every sensitive name, normalised, contains one of these; an escape could hide one, so a
# text with a backslash is always parsed.
STEMS = ("pass", "pwd", "secret", "apikey", "accesskey", "privatekey", "token", "authorization",
         "cookie", "credential")
REDACTED = "[redacted]"
JSON_SPACE = " \t\n\r"

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
        message = message_frame(event) if event.kind == MESSAGE_KIND else None
        if message is not None:
            counters["events_out"] += 1
            connection.emit(connection.Frame_Text(message))
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


def message_frame(event):
    """A message op (AI output streams) as a `type:"message"` frame: the gateway hands it over
    as an event of kind `gateway.message` whose payload is `{"id","op","text","status","kind",
    "payload"?}`. The text goes as published (a secret split over appends could not be
    recognised in one of them anyway); the create's payload is redacted like an event's. None
    when the envelope is not one (the event is then forwarded as it is)."""
    try:
        envelope = loads(event.payload)
    except (ValueError, RecursionError):
        return None
    if not isinstance(envelope, dict):
        return None
    fields = [envelope.get(name) for name in ("id", "op", "status", "kind", "text")]
    if not all(isinstance(value, str) for value in fields):
        return None
    message_id, op, status, kind, text = (dumps(value) for value in fields)
    frame = '{"type":"message","op":%s,"message_id":%s,"text":%s,"status":%s,"seq":%d,"kind":%s' % (
        op, message_id, text, status, event.seq, kind)
    if event.run_id is not None:
        frame += ',"run_id":' + json.dumps(event.run_id)
    if event.thread_id is not None:
        frame += ',"thread_id":' + json.dumps(event.thread_id)
    if envelope.get("payload") is not None:
        frame += ',"payload":' + redacted(dumps(envelope["payload"]))
    return frame + "}"


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


def normalise(key):
    return key.replace("-", "").replace("_", "").lower()


def sensitive(key):
    return normalise(key).endswith(SENSITIVE_SUFFIXES)


def may_hold_secret(text):
    norm = normalise(text)
    return "\\" in text or any(stem in norm for stem in STEMS)


def not_json(name):
    raise ValueError(name)


def finite(text):
    number = float(text)
    if number in (float("inf"), float("-inf")):
        raise ValueError(text)
    return number


# JSON as the other handlers read it: no NaN or Infinity (json.loads takes them, and
# json.dumps would print them back, which is not JSON). Made once: json.loads and json.dumps
# with options make a new decoder or encoder on every call.
loads = json.JSONDecoder(parse_constant=not_json, parse_float=finite).decode
dumps = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode


class Uninspectable(Exception):
    """JSON inside strings nested past MAX_EMBEDDED."""


def redacted(payload):
    """The payload as JSON text with sensitive values replaced at any depth: unchanged when
    no name can be sensitive or none was; withheld whole when it cannot be inspected."""
    if not may_hold_secret(payload):
        return payload
    try:
        # Boxed, so that a payload that is one string holding JSON is redacted in place too.
        box = [loads(payload)]
        count = redact(box, 0)
    except (ValueError, RecursionError, Uninspectable):
        counters["payloads_withheld"] += 1
        return json.dumps(WITHHELD)
    if count == 0:
        return payload
    counters["redactions"] += count
    return dumps(box[0])


def redact(container, embedded):
    """Replaces the sensitive values inside a parsed list or dict, in place; returns how many."""
    if isinstance(container, dict):
        named = False
        slots = []
        for key, inner in container.items():
            norm = normalise(key)
            if norm in NAME_FIELDS and isinstance(inner, str) and sensitive(inner):
                named = True
            slots.append((key, norm))
        secret = [(key, norm.endswith(SENSITIVE_SUFFIXES) or (named and norm in VALUE_FIELDS))
                  for key, norm in slots]
    else:
        secret = [(i, False) for i in range(len(container))]
    count = 0
    for slot, replace in secret:
        inner = container[slot]
        if replace:
            container[slot] = REDACTED
            count += 1
        elif isinstance(inner, (dict, list)):
            count += redact(inner, embedded)
        elif isinstance(inner, str) and inner.strip(JSON_SPACE)[:1] in ("{", "["):
            found, text = redact_embedded(inner, embedded)
            if found:
                container[slot] = text
                count += found
    return count


def redact_embedded(text, embedded):
    """JSON inside a string value (a tool call's `arguments`): parsed when the string looks
    like an object or array, redacted inside, and put back as a string, re-encoded only when
    something in it was replaced. A string that does not parse is text and stays as it is."""
    trimmed = text.strip(JSON_SPACE)
    if not (trimmed[:1] + trimmed[-1:] in ("{}", "[]") and may_hold_secret(text)):
        return 0, text
    try:
        box = [loads(text)]
    except (ValueError, RecursionError):
        return 0, text
    if embedded >= MAX_EMBEDDED:
        raise Uninspectable()
    count = redact(box, embedded + 1)
    if count == 0:
        return 0, text
    return count, dumps(box[0])

//! The reference handler's logic, free of any binding: plain inputs in, frames (JSON text)
//! out. `lib.rs` binds it to the WIT world for the Wasm component; the gateway's benchmark
//! links it natively (feature `native-handler`) to measure what the sandbox costs.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::{Map, Value, json};

/// One event as the handler sees it.
pub struct EventIn {
    pub seq: u64,
    pub kind: String,
    pub payload: String,
    pub run_id: Option<String>,
    pub thread_id: Option<String>,
}

/// Subscriptions and tracked runs are client- and publisher-driven; bound them so a client
/// cannot grow this instance's memory until it hits the gateway's cap.
const MAX_SUBSCRIPTIONS: usize = 64;
const MAX_TRACKED_RUNS: usize = 128;
/// Longest `thread_id` a client may subscribe to: the gateway's publish API takes ids of at
/// most 256 bytes, so a longer one can never match and would only grow this instance.
pub const MAX_THREAD_ID_BYTES: usize = 256;
const REDACTED: &str = "[redacted]";
/// The kind of the events that carry message ops (AI output streams) from the gateway.
pub const MESSAGE_KIND: &str = "gateway.message";
/// What a payload becomes when the handler cannot inspect all of it (deeper than its JSON
/// parser goes, or not JSON at all): redaction fails closed, the payload is never forwarded
/// as it came.
pub const WITHHELD: &str = "[redacted: payload could not be inspected]";

/// Everything the handler keeps for its one connection.
#[derive(Default)]
pub struct State {
    connection_id: String,
    user_id: String,
    subscriptions: BTreeSet<String>,
    runs: BTreeMap<String, Run>,
    frames_in: u64,
    events_in: u64,
    events_out: u64,
    events_filtered: u64,
    redactions: u64,
    /// Payloads replaced whole because they could not be inspected.
    payloads_withheld: u64,
}

/// Where one agent run is in its lifecycle, as seen from its events.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Phase {
    Started,
    ToolsRunning,
    Completed,
    Failed,
}

struct Run {
    phase: Phase,
    tools_running: u32,
    events: u64,
}

impl Phase {
    fn as_str(self) -> &'static str {
        match self {
            Phase::Started => "started",
            Phase::ToolsRunning => "tools_running",
            Phase::Completed => "completed",
            Phase::Failed => "error",
        }
    }
    fn finished(self) -> bool {
        matches!(self, Phase::Completed | Phase::Failed)
    }
    fn parse(s: &str) -> Option<Phase> {
        [
            Phase::Started,
            Phase::ToolsRunning,
            Phase::Completed,
            Phase::Failed,
        ]
        .into_iter()
        .find(|p| p.as_str() == s)
    }
}

/// Version of the saved-state format: a `restore` of another version is refused.
const SAVED_VERSION: u64 = 1;

impl State {
    /// Records the identity the gateway gave this connection; returns the welcome frame.
    pub fn init(&mut self, connection_id: String, user_id: String, expires_at: u64) -> String {
        let welcome = json!({
            "type": "welcome",
            "connection_id": connection_id,
            "user_id": user_id,
            "expires_at": expires_at,
        });
        self.connection_id = connection_id;
        self.user_id = user_id;
        welcome.to_string()
    }

    /// A text frame from the client; returns the reply.
    pub fn text_message(&mut self, text: &str) -> String {
        self.frames_in += 1;
        self.client_message(text).to_string()
    }

    /// A binary frame from the client; returns the reply.
    pub fn binary_message(&mut self) -> String {
        self.frames_in += 1;
        error_frame("binary frames are not supported").to_string()
    }

    fn client_message(&mut self, text: &str) -> Value {
        let Ok(Value::Object(msg)) = serde_json::from_str::<Value>(text) else {
            return error_frame("expected a JSON object");
        };
        let thread = msg.get("thread_id").and_then(Value::as_str);
        match (msg.get("type").and_then(Value::as_str), thread) {
            (Some("ping"), _) => self.pong(),
            (Some("subscribe" | "unsubscribe"), Some(thread))
                if thread.len() > MAX_THREAD_ID_BYTES =>
            {
                error_frame("thread_id is longer than 256 bytes")
            }
            (Some("subscribe"), Some(thread)) => {
                if self.subscriptions.len() >= MAX_SUBSCRIPTIONS
                    && !self.subscriptions.contains(thread)
                {
                    return error_frame("too many subscriptions");
                }
                self.subscriptions.insert(thread.to_owned());
                json!({"type": "subscribed", "thread_id": thread, "threads": self.subscriptions})
            }
            (Some("unsubscribe"), Some(thread)) => {
                self.subscriptions.remove(thread);
                json!({"type": "unsubscribed", "thread_id": thread, "threads": self.subscriptions})
            }
            (Some("subscribe" | "unsubscribe"), None) => error_frame("thread_id is required"),
            _ => error_frame("unknown message type"),
        }
    }

    /// Everything this handler keeps, as bytes, for hibernation: `restore` makes a handler
    /// that goes on exactly where this one stopped.
    pub fn save(&self) -> Vec<u8> {
        let runs: Map<String, Value> = self
            .runs
            .iter()
            .map(|(id, r)| {
                (
                    id.clone(),
                    json!([r.phase.as_str(), r.tools_running, r.events]),
                )
            })
            .collect();
        json!({
            "v": SAVED_VERSION,
            "connection_id": self.connection_id,
            "user_id": self.user_id,
            "subscriptions": self.subscriptions,
            "runs": runs,
            "counters": [
                self.frames_in,
                self.events_in,
                self.events_out,
                self.events_filtered,
                self.redactions,
                self.payloads_withheld,
            ],
        })
        .to_string()
        .into_bytes()
    }

    /// The handler `save` described, for the same connection and user only: state saved for
    /// another identity is refused, never adopted.
    pub fn restore(connection_id: &str, user_id: &str, saved: &[u8]) -> Result<State, String> {
        let bad = |what: &str| format!("saved state: {what}");
        let Ok(Value::Object(v)) = serde_json::from_slice::<Value>(saved) else {
            return Err(bad("not a JSON object"));
        };
        if v.get("v").and_then(Value::as_u64) != Some(SAVED_VERSION) {
            return Err(bad("unknown version"));
        }
        let text = |key: &str| v.get(key).and_then(Value::as_str).unwrap_or_default();
        if text("connection_id") != connection_id || text("user_id") != user_id {
            return Err(bad("saved for another connection"));
        }
        let mut state = State {
            connection_id: connection_id.to_owned(),
            user_id: user_id.to_owned(),
            ..State::default()
        };
        for thread in v
            .get("subscriptions")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let thread = thread.as_str().ok_or_else(|| bad("subscriptions"))?;
            state.subscriptions.insert(thread.to_owned());
        }
        for (id, run) in v
            .get("runs")
            .and_then(Value::as_object)
            .into_iter()
            .flatten()
        {
            let run = run.as_array().map(Vec::as_slice);
            let Some([phase, tools, events]) = run else {
                return Err(bad("runs"));
            };
            let run = Run {
                phase: phase
                    .as_str()
                    .and_then(Phase::parse)
                    .ok_or_else(|| bad("phase"))?,
                tools_running: tools.as_u64().ok_or_else(|| bad("runs"))? as u32,
                events: events.as_u64().ok_or_else(|| bad("runs"))?,
            };
            state.runs.insert(id.clone(), run);
        }
        let counters: Vec<u64> = v
            .get("counters")
            .and_then(Value::as_array)
            .map(|c| c.iter().filter_map(Value::as_u64).collect())
            .unwrap_or_default();
        let [
            frames_in,
            events_in,
            events_out,
            events_filtered,
            redactions,
            withheld,
        ] = counters[..]
        else {
            return Err(bad("counters"));
        };
        state.frames_in = frames_in;
        state.events_in = events_in;
        state.events_out = events_out;
        state.events_filtered = events_filtered;
        state.redactions = redactions;
        state.payloads_withheld = withheld;
        Ok(state)
    }

    fn pong(&self) -> Value {
        let runs: Map<String, Value> = self
            .runs
            .iter()
            .map(|(id, run)| {
                let v = json!({
                    "state": run.phase.as_str(),
                    "tools_running": run.tools_running,
                    "events": run.events,
                });
                (id.clone(), v)
            })
            .collect();
        json!({
            "type": "pong",
            "connection_id": self.connection_id,
            "user_id": self.user_id,
            "frames_in": self.frames_in,
            "events_in": self.events_in,
            "events_out": self.events_out,
            "events_filtered": self.events_filtered,
            "redactions": self.redactions,
            "payloads_withheld": self.payloads_withheld,
            "subscriptions": self.subscriptions,
            "runs": runs,
        })
    }

    /// Tracks the run and writes the frame to send into `out` (emptied first); false when
    /// the client's subscriptions exclude this event's thread. The caller keeps `out` from
    /// event to event, so its buffer is allocated once, not per event.
    pub fn event(&mut self, event: EventIn, out: &mut String) -> bool {
        out.clear();
        self.events_in += 1;
        if !self.subscriptions.is_empty()
            && !event
                .thread_id
                .as_ref()
                .is_some_and(|t| self.subscriptions.contains(t))
        {
            self.events_filtered += 1;
            return false;
        }
        if event.kind == MESSAGE_KIND {
            if self.message(&event, out) {
                self.events_out += 1;
                return true;
            }
            out.clear();
        }
        let phase = event
            .run_id
            .as_deref()
            .map(|run| self.track(run, &event.kind));
        let payload = self.redacted(event.payload);
        self.events_out += 1;

        // Built by hand so the payload, already JSON, is not parsed and printed again when
        // it holds nothing to redact.
        out.reserve(payload.len() + 96);
        out.push_str(r#"{"type":"event","seq":"#);
        push_u64(out, event.seq);
        out.push_str(r#","kind":"#);
        push_json_str(out, &event.kind);
        out.push_str(r#","payload":"#);
        out.push_str(&payload);
        if let Some(run) = &event.run_id {
            out.push_str(r#","run_id":"#);
            push_json_str(out, run);
        }
        if let Some(thread) = &event.thread_id {
            out.push_str(r#","thread_id":"#);
            push_json_str(out, thread);
        }
        if let Some(phase) = phase {
            out.push_str(r#","run_state":""#);
            out.push_str(phase.as_str());
            out.push('"');
        }
        out.push('}');
        true
    }

    fn track(&mut self, run_id: &str, kind: &str) -> Phase {
        if !self.runs.contains_key(run_id) && self.runs.len() >= MAX_TRACKED_RUNS {
            // Forget a finished run first; if none is finished, the oldest id.
            let victim = self
                .runs
                .iter()
                .find(|(_, r)| r.phase.finished())
                .or_else(|| self.runs.iter().next())
                .map(|(id, _)| id.clone());
            if let Some(victim) = victim {
                self.runs.remove(&victim);
            }
        }
        let run = self.runs.entry(run_id.to_owned()).or_insert(Run {
            phase: Phase::Started,
            tools_running: 0,
            events: 0,
        });
        run.events += 1;
        match kind {
            "agent_started" => {
                run.phase = Phase::Started;
                run.tools_running = 0;
            }
            "tool_executing" | "tool_started" if !run.phase.finished() => {
                run.tools_running += 1;
                run.phase = Phase::ToolsRunning;
            }
            "tool_completed" | "tool_error" if !run.phase.finished() => {
                run.tools_running = run.tools_running.saturating_sub(1);
                if run.tools_running == 0 {
                    run.phase = Phase::Started;
                }
            }
            "agent_completed" => {
                run.phase = Phase::Completed;
                run.tools_running = 0;
            }
            "agent_error" => {
                run.phase = Phase::Failed;
                run.tools_running = 0;
            }
            _ => {}
        }
        run.phase
    }

    /// A message op (AI output streams) as a `type:"message"` frame: the gateway hands it
    /// over as an event of kind `gateway.message` whose payload is
    /// `{"id","op","text","status","kind","payload"?}`. The text goes as published (a secret
    /// split over appends could not be recognised in one of them anyway); the create's
    /// payload is redacted like any other. False (and `out` left to the caller) when the
    /// envelope is not one: the event is then forwarded as it came.
    fn message(&mut self, event: &EventIn, out: &mut String) -> bool {
        let Ok(Value::Object(envelope)) = serde_json::from_str::<Value>(&event.payload) else {
            return false;
        };
        let field = |name: &str| envelope.get(name).and_then(Value::as_str);
        let (Some(id), Some(op), Some(status), Some(kind), Some(text)) = (
            field("id"),
            field("op"),
            field("status"),
            field("kind"),
            field("text"),
        ) else {
            return false;
        };
        // Built by hand, as event frames are: this runs for every rolled-up append.
        out.reserve(text.len() + 160);
        out.push_str(r#"{"type":"message","op":"#);
        push_json_str(out, op);
        out.push_str(r#","message_id":"#);
        push_json_str(out, id);
        out.push_str(r#","text":"#);
        push_json_str(out, text);
        out.push_str(r#","status":"#);
        push_json_str(out, status);
        out.push_str(r#","seq":"#);
        push_u64(out, event.seq);
        out.push_str(r#","kind":"#);
        push_json_str(out, kind);
        if let Some(run) = &event.run_id {
            out.push_str(r#","run_id":"#);
            push_json_str(out, run);
        }
        if let Some(thread) = &event.thread_id {
            out.push_str(r#","thread_id":"#);
            push_json_str(out, thread);
        }
        if let Some(payload) = envelope.get("payload").filter(|p| !p.is_null()) {
            let redacted = self.redacted(payload.to_string());
            out.push_str(r#","payload":"#);
            out.push_str(&redacted);
        }
        out.push('}');
        true
    }

    /// The payload with sensitive values replaced, or unchanged (not re-encoded) when nothing
    /// in it could be sensitive.
    fn redacted(&mut self, payload: String) -> String {
        if !may_hold_secret(&payload) {
            return payload;
        }
        // Not JSON, or nested deeper than the parser goes (the gateway's publish API refuses
        // those, but a handler must not rely on it), or JSON inside strings nested past
        // `MAX_EMBEDDED`: what cannot be inspected is not forwarded, not even as a string,
        // since a secret could still be in it.
        let count = serde_json::from_str::<Value>(&payload)
            .ok()
            .and_then(|mut value| Some((redact(&mut value, 0)?, value)));
        match count {
            None => {
                self.payloads_withheld += 1;
                let mut withheld = String::new();
                push_json_str(&mut withheld, WITHHELD);
                withheld
            }
            Some((0, _)) => payload,
            Some((count, value)) => {
                self.redactions += count;
                value.to_string()
            }
        }
    }
}

/// A key is sensitive when, lower-cased with `-` and `_` dropped, it ends with one of these:
/// `API-Key`, `x_api_key` and `apiKey` all match, `max_tokens` and `token_count` do not.
/// The README's Security section lists the same names; the three reference handlers (Rust,
/// JavaScript, Python) share them and the corpus `tests/fixtures/redaction-corpus.json`.
const SENSITIVE_SUFFIXES: &[&str] = &[
    "password",
    "passwords",
    "passwd",
    "passphrase",
    "pwd",
    "secret",
    "secrets",
    "token",
    "apikey",
    "apikeys",
    "accesskey",
    "secretkey",
    "privatekey",
    "authorization",
    "cookie",
    "cookies",
    "credential",
    "credentials",
];

/// Members that name a header or variable in a name/value list (`{"name":"Authorization",
/// "value":"Bearer ..."}`, `{"key":"X-Api-Key","value":"..."}`), compared normalised.
const NAME_FIELDS: &[&str] = &["name", "key"];
/// The members whose values such an object's sensitive name covers.
const VALUE_FIELDS: &[&str] = &["value", "values"];

/// How many levels of JSON inside string values are inspected: a tool call's `arguments`
/// string is one level, JSON in a string inside that two. A deeper one that parses is not
/// inspected, so its payload is withheld.
const MAX_EMBEDDED: u32 = 4;

fn is_sensitive(key: &str) -> bool {
    // `may_hold_secret` must find every key this matches, so it normalises the same way
    // (test `every_key_this_matches_is_found_by_the_pre_check`).
    sensitive_normalised(&normalise(key))
}

fn sensitive_normalised(norm: &str) -> bool {
    SENSITIVE_SUFFIXES.iter().any(|s| norm.ends_with(s))
}

/// `key` without `-` and `_`, lower-cased as far as matching the ASCII names above needs:
/// ASCII letters to lower case; the only two characters outside ASCII whose lower case holds
/// ASCII (the Kelvin sign, U+0130) as `char::to_lowercase` has them; any other character as
/// it is, since neither it nor its lower case is ASCII, so no name matches across it either
/// way. This keeps Unicode's case tables (11 KB, in every instance's memory image) out of
/// the guest.
fn normalise(key: &str) -> String {
    let mut norm = String::with_capacity(key.len());
    for c in key.chars() {
        match c {
            '_' | '-' => {}
            '\u{212a}' => norm.push('k'),
            '\u{130}' => norm.push_str("i\u{307}"),
            c => norm.push(c.to_ascii_lowercase()),
        }
    }
    norm
}

/// The Kelvin sign (U+212A): the one character outside ASCII whose lower case is an ASCII
/// letter of a stem (`k`), so `is_sensitive` reads `toKen` as `token`.
const KELVIN: &[u8] = "\u{212a}".as_bytes();

/// Cheap pre-check: can any key, or name in a name/value list, in this text be sensitive?
/// Every sensitive name contains one of the stems below once lower-cased with `-` and `_`
/// dropped, exactly as `is_sensitive` normalises it, so a payload without any needs no
/// parsing (JSON inside its strings included: their text is part of the payload's). Runs on every event: one pass
/// over the bytes, looking closer only at those that can start a stem.
fn may_hold_secret(payload: &str) -> bool {
    let bytes = payload.as_bytes();
    (0..bytes.len()).any(|i| match bytes[i] | 0x20 {
        // A key spelled with \u escapes could hide a stem from the byte scan
        // (`\\` | 0x20 is `|`, and no stem starts with `|`).
        b'|' => bytes[i] == b'\\' && bytes.get(i + 1) == Some(&b'u'),
        // 0xE2 | 0x20 is itself: the first byte of the Kelvin sign.
        0xe2 | b'k' => stem_at(bytes, i, b"key"),
        b'p' => stem_at(bytes, i, b"pass") || stem_at(bytes, i, b"pwd"),
        b's' => stem_at(bytes, i, b"secret"),
        b't' => stem_at(bytes, i, b"token"),
        b'a' => stem_at(bytes, i, b"auth"),
        b'c' => stem_at(bytes, i, b"cookie") || stem_at(bytes, i, b"credential"),
        _ => false,
    })
}

/// Whether `stem` (lower-case ASCII) starts at `i`, ignoring ASCII case, `-` and `_` between
/// its letters, and reading the Kelvin sign as `k`: the normalisation of `is_sensitive`.
fn stem_at(bytes: &[u8], mut i: usize, stem: &[u8]) -> bool {
    for (n, &want) in stem.iter().enumerate() {
        if n > 0 {
            while matches!(bytes.get(i), Some(b'-' | b'_')) {
                i += 1;
            }
        }
        match bytes.get(i) {
            Some(b) if b.to_ascii_lowercase() == want => i += 1,
            Some(0xe2) if want == b'k' && bytes[i..].starts_with(KELVIN) => i += KELVIN.len(),
            _ => return false,
        }
    }
    true
}

/// Replaces the sensitive values in `value` with the marker; returns how many, or `None`
/// when JSON inside a string is nested past `MAX_EMBEDDED` (the payload is then withheld).
fn redact(value: &mut Value, embedded: u32) -> Option<u64> {
    match value {
        Value::Object(map) => {
            let named = map.iter().any(|(k, v)| {
                NAME_FIELDS.contains(&normalise(k).as_str()) && v.as_str().is_some_and(is_sensitive)
            });
            let mut count = 0;
            for (k, v) in map.iter_mut() {
                let norm = normalise(k);
                if sensitive_normalised(&norm) || (named && VALUE_FIELDS.contains(&norm.as_str())) {
                    *v = Value::String(REDACTED.to_owned());
                    count += 1;
                } else {
                    count += redact(v, embedded)?;
                }
            }
            Some(count)
        }
        Value::Array(items) => items.iter_mut().map(|v| redact(v, embedded)).sum(),
        Value::String(text) => redact_embedded(text, embedded),
        _ => Some(0),
    }
}

/// JSON inside a string value (a tool call's `arguments`): parsed when the string looks like
/// an object or array, redacted inside, and put back as a string, re-encoded only when
/// something in it was replaced. A string that does not parse is text and stays as it is.
fn redact_embedded(text: &mut String, embedded: u32) -> Option<u64> {
    let trimmed = text.trim_matches([' ', '\t', '\n', '\r']).as_bytes();
    let looks_like_json = matches!(
        (trimmed.first(), trimmed.last()),
        (Some(b'{'), Some(b'}')) | (Some(b'['), Some(b']'))
    );
    if !looks_like_json || !may_hold_secret(text) {
        return Some(0);
    }
    let Ok(mut inner) = serde_json::from_str::<Value>(text) else {
        return Some(0);
    };
    if embedded >= MAX_EMBEDDED {
        return None;
    }
    let count = redact(&mut inner, embedded + 1)?;
    if count > 0 {
        *text = inner.to_string();
    }
    Some(count)
}

/// Appends `s` as a JSON string literal, escaping in place (no temporary string per field).
fn push_json_str(out: &mut String, s: &str) {
    out.push('"');
    let mut plain = 0;
    for (i, b) in s.bytes().enumerate() {
        let escape = match b {
            b'"' => "\\\"",
            b'\\' => "\\\\",
            b'\n' => "\\n",
            b'\r' => "\\r",
            b'\t' => "\\t",
            0..=0x1f => "",
            _ => continue,
        };
        out.push_str(&s[plain..i]);
        plain = i + 1;
        if escape.is_empty() {
            const HEX: &[u8; 16] = b"0123456789abcdef";
            out.push_str("\\u00");
            out.push(char::from(HEX[usize::from(b >> 4)]));
            out.push(char::from(HEX[usize::from(b & 0xf)]));
        } else {
            out.push_str(escape);
        }
    }
    out.push_str(&s[plain..]);
    out.push('"');
}

/// Appends `n` in decimal without a temporary string.
fn push_u64(out: &mut String, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    loop {
        at -= 1;
        digits[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    for &d in &digits[at..] {
        out.push(char::from(d));
    }
}

fn error_frame(reason: &str) -> Value {
    json!({"type": "error", "reason": reason})
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_strings_round_trip_through_a_parser() {
        for s in [
            "",
            "plain",
            "q\"uote",
            "back\\slash",
            "line\nfeed\r\t",
            "\u{1}\u{1f}x",
            "ünï€😀",
        ] {
            let mut out = String::new();
            push_json_str(&mut out, s);
            assert_eq!(serde_json::from_str::<String>(&out).unwrap(), s, "{out}");
        }
    }

    #[test]
    fn numbers_print_like_display() {
        for n in [0, 7, 10, 99, 12_345, u64::MAX] {
            let mut out = String::new();
            push_u64(&mut out, n);
            assert_eq!(out, n.to_string());
        }
    }

    #[test]
    fn secret_check_finds_every_stem_in_any_case_and_escapes() {
        for payload in [
            r#"{"password":1}"#,
            r#"{"PWD":1}"#,
            r#"{"x":{"clientSecret":1}}"#,
            r#"{"api_KEY":1}"#,
            r#"{"Token":1}"#,
            r#"{"authorization":1}"#,
            r#"{"cookie":1}"#,
            r#"{"credentials":1}"#,
            r#"{"\u0070assword":1}"#,
            r#"{"a":"tok","b":"...auth"}"#,
        ] {
            assert!(may_hold_secret(payload), "{payload}");
        }
        for payload in [
            r#"{"user":"u1","ts_us":17,"n":3}"#,
            r#"{"tool":"search","ok":true}"#,
            "",
            "p",
        ] {
            assert!(!may_hold_secret(payload), "{payload}");
        }
    }

    #[test]
    fn every_key_this_matches_is_found_by_the_pre_check() {
        // Separators, case and the Kelvin sign inside a key change nothing.
        for key in [
            "to_ken",
            "se-cret",
            "A_u_t_h_o_r_i_z_a_t_i_o_n",
            "p-w-d",
            "api_\u{212a}ey",
            "to\u{212a}en",
            "API\u{212a}EY",
            "Coo_Kie",
            "credent-ials",
            "db_PASS_word",
            "x-auth-token",
            "aws_secret_access_key",
            "access_\u{212a}ey",
            "session_cookie",
            "Private-Key",
            "wifi_passphrase",
        ] {
            assert!(is_sensitive(key), "{key} is sensitive");
            let payload = serde_json::json!({ key: "sk-live" }).to_string();
            assert!(may_hold_secret(&payload), "pre-check misses {payload}");
            let mut state = State::default();
            let mut frame = String::new();
            state.event(event_with(&payload), &mut frame);
            assert!(!frame.contains("sk-live"), "{frame}");
        }
        // No other character lower-cases to an ASCII letter that could complete a stem:
        // besides ASCII, only the Kelvin sign (to `k`) and U+0130 (to `i` plus a combining
        // dot, which no stem can contain) lower-case to anything with ASCII in it.
        let folding: Vec<char> = (0..=0x10ffff_u32)
            .filter_map(char::from_u32)
            .filter(|c| !c.is_ascii() && c.to_lowercase().any(|l| l.is_ascii()))
            .collect();
        assert_eq!(folding, ['\u{130}', '\u{212a}']);
        assert!('\u{130}'.to_lowercase().any(|l| !l.is_ascii()));
    }

    #[test]
    fn the_pre_check_finds_every_sensitive_name_as_key_and_as_listed_name() {
        for name in SENSITIVE_SUFFIXES {
            for payload in [
                serde_json::json!({ *name: "sk-live" }),
                serde_json::json!([{ "Name": name.to_uppercase(), "value": "sk-live" }]),
                serde_json::json!({ "args": serde_json::json!({ *name: "sk-live" }).to_string() }),
            ] {
                let payload = payload.to_string();
                assert!(may_hold_secret(&payload), "pre-check misses {payload}");
                let mut state = State::default();
                let mut frame = String::new();
                state.event(event_with(&payload), &mut frame);
                assert!(!frame.contains("sk-live"), "{frame}");
                assert_eq!(state.pong()["redactions"], 1, "{frame}");
            }
        }
    }

    /// The corpus the gateway's tests run through all three reference handlers, here through
    /// this one without a gateway: every secret gone, everything else kept.
    #[test]
    fn the_shared_corpus_passes_natively() {
        type Raw = BTreeMap<String, Box<serde_json::value::RawValue>>;
        let corpus: Raw =
            serde_json::from_str(include_str!("../../tests/fixtures/redaction-corpus.json"))
                .unwrap();
        let cases: Vec<Raw> = serde_json::from_str(corpus["cases"].get()).unwrap();
        let mut state = State::default();
        let mut frame = String::new();
        for raw in &cases {
            // The payload exactly as written (escapes, digits); the rest as values.
            let payload = raw["payload"].get();
            let case = |field: &str| -> Value {
                raw.get(field)
                    .map_or(Value::Null, |v| serde_json::from_str(v.get()).unwrap())
            };
            let name = case("name");
            let text = |field: &str| -> Vec<String> {
                let list = case(field);
                let list = list.as_array().map(Vec::as_slice).unwrap_or_default();
                list.iter()
                    .map(|s| s.as_str().unwrap().to_owned())
                    .collect()
            };
            let before = state.pong();
            assert!(state.event(event_with(payload), &mut frame));
            let after = state.pong();
            let v: Value = serde_json::from_str(&frame).unwrap();
            for secret in text("absent") {
                assert!(
                    payload.contains(&secret),
                    "{name}: {secret} is not in the payload"
                );
                assert!(!frame.contains(&secret), "{name}: {secret} in {frame}");
            }
            for kept in text("present") {
                assert!(frame.contains(&kept), "{name}: {kept} missing from {frame}");
            }
            for pointer in text("embedded") {
                let inner = v["payload"].pointer(&pointer).and_then(Value::as_str);
                let parsed = inner.map(serde_json::from_str::<Value>);
                assert!(
                    matches!(parsed, Some(Ok(_))),
                    "{name}: {pointer} in {frame}"
                );
            }
            let grew = |counter: &str| {
                after[counter].as_u64().unwrap() - before[counter].as_u64().unwrap()
            };
            assert_eq!(grew("redactions"), case("redactions"), "{name}: {frame}");
            let withheld = case("withheld").as_bool().unwrap_or(false);
            assert_eq!(grew("payloads_withheld"), u64::from(withheld), "{name}");
            assert_eq!(v["payload"] == WITHHELD, withheld, "{name}: {frame}");
        }
    }

    #[test]
    fn key_matching_is_that_of_unicode_lower_case() {
        let unicode = |key: &str| -> bool {
            let norm: String = key
                .chars()
                .filter(|c| *c != '_' && *c != '-')
                .flat_map(char::to_lowercase)
                .collect();
            SENSITIVE_SUFFIXES.iter().any(|s| norm.ends_with(s))
        };
        for c in (0..=0x10ffff_u32).filter_map(char::from_u32) {
            for key in [
                format!("{c}"),
                format!("{c}token"),
                format!("to{c}en"),
                format!("api{c}ey"),
                format!("access{c}ey"),
                format!("db{c}password"),
                format!("pass{c}word"),
                format!("{c}ookie"),
            ] {
                assert_eq!(is_sensitive(&key), unicode(&key), "{key:?}");
            }
        }
    }

    #[test]
    fn a_payload_too_deep_to_inspect_is_withheld_not_forwarded() {
        let deep = format!(
            "{}{{\"api_key\":\"sk-live-SECRET\"}}{}",
            "[".repeat(200),
            "]".repeat(200)
        );
        let mut state = State::default();
        let mut frame = String::new();
        assert!(state.event(event_with(&deep), &mut frame));
        assert!(!frame.contains("sk-live"), "{frame}");
        let v: Value = serde_json::from_str(&frame).unwrap();
        assert_eq!(v["payload"], WITHHELD);
        assert_eq!(state.pong()["payloads_withheld"], 1);
        // Not JSON at all: withheld the same way.
        state.event(event_with("{\"token\": sk-live"), &mut frame);
        assert!(!frame.contains("sk-live"), "{frame}");
        assert_eq!(state.pong()["payloads_withheld"], 2);
    }

    #[test]
    fn long_thread_ids_are_refused_not_kept() {
        let mut state = State::default();
        let long = "t".repeat(MAX_THREAD_ID_BYTES + 1);
        let reply = state
            .text_message(&serde_json::json!({"type": "subscribe", "thread_id": long}).to_string());
        assert!(reply.contains("longer than 256"), "{reply}");
        assert_eq!(state.pong()["subscriptions"], serde_json::json!([]));
    }

    #[test]
    fn saved_state_restores_everything_and_only_for_its_connection() {
        let mut state = State::default();
        state.init("c1".into(), "u1".into(), 0);
        state.text_message(r#"{"type":"subscribe","thread_id":"t1"}"#);
        let mut out = String::new();
        let mut event = event_with(r#"{"api_key":"x"}"#);
        event.run_id = Some("r1".into());
        event.thread_id = Some("t1".into());
        assert!(state.event(event, &mut out));
        let saved = state.save();

        let restored = State::restore("c1", "u1", &saved).unwrap();
        assert_eq!(restored.pong(), state.pong());
        assert_eq!(restored.save(), saved);
        assert!(State::restore("c2", "u1", &saved).is_err());
        assert!(State::restore("c1", "u2", &saved).is_err());
        assert!(State::restore("c1", "u1", b"{}").is_err());
        assert!(State::restore("c1", "u1", b"not json").is_err());
    }

    fn event_with(payload: &str) -> EventIn {
        EventIn {
            seq: 1,
            kind: "k".into(),
            payload: payload.into(),
            run_id: None,
            thread_id: None,
        }
    }

    #[test]
    fn event_frame_is_valid_json_with_every_field() {
        let mut state = State::default();
        let mut frame = "left over from the last event".to_owned();
        assert!(state.event(
            EventIn {
                seq: 42,
                kind: "tool\"executing".into(),
                payload: r#"{"api_key":"k","n":1}"#.into(),
                run_id: Some("r1".into()),
                thread_id: Some("t\n1".into()),
            },
            &mut frame
        ));
        let v: Value = serde_json::from_str(&frame).unwrap();
        assert_eq!(v["seq"], 42);
        assert_eq!(v["kind"], "tool\"executing");
        assert_eq!(v["payload"]["api_key"], REDACTED);
        assert_eq!(v["payload"]["n"], 1);
        assert_eq!(v["run_id"], "r1");
        assert_eq!(v["thread_id"], "t\n1");
        assert_eq!(v["run_state"], "started");
    }
}

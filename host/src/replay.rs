//! `gateway guest replay`: one guest instance run offline, without sockets, under the same
//! sandbox and limits as a connection. It gets a context, then every client frame, then
//! every event, then `on-close`; each frame it emits is printed as one JSON line, and so is
//! a fault, which ends the run. Plugin authors test a handler with it, in CI too. With
//! `hibernate`, the handler is saved and restored into a fresh instance before every frame
//! and event after `init`, as a connection idle between each would be.

use std::io::{BufRead, Write};

use anyhow::Context as _;
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{Value, json};

use crate::sandbox::{CloseReason, Context, Event, Fault, Frame, Sandbox};

/// One line of `events.jsonl`: the body of `POST /v1/publish`, `user_id` optional.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct EventLine {
    #[serde(default)]
    #[allow(dead_code)] // accepted so that publish bodies replay as they are
    user_id: Option<String>,
    #[serde(default)]
    #[allow(dead_code)]
    tenant_id: Option<String>,
    #[serde(default)]
    #[allow(dead_code)]
    idempotency_key: Option<String>,
    kind: String,
    payload: Box<RawValue>,
    #[serde(default)]
    run_id: Option<String>,
    #[serde(default)]
    thread_id: Option<String>,
}

/// How a replay ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Completed,
    /// The guest faulted; the run stopped there.
    Faulted(Fault),
}

/// Runs the guest over `client` frames (one text frame a line) and `events` (one publish
/// body a line), writing one JSON line per emitted frame or fault to `out`.
pub fn replay(
    sandbox: &Sandbox,
    config: &crate::config::Config,
    user: &str,
    hibernate: bool,
    client: Option<&mut dyn BufRead>,
    events: &mut dyn BufRead,
    out: &mut dyn Write,
) -> anyhow::Result<Outcome> {
    let ctx = Context {
        connection_id: "replay".into(),
        user_id: user.to_owned(),
        tenant_id: None,
        session_id: None,
        scopes: Vec::new(),
        expires_at: crate::auth::now_secs() + 3600,
    };
    let mut handler = sandbox
        .instantiate(&ctx)
        .map_err(|e| anyhow::anyhow!("cannot instantiate the guest: {}", e.advice(config)))?;
    let emit = |out: &mut dyn Write,
                call: &str,
                line: Option<usize>,
                result: Result<Vec<Frame>, Fault>| match result {
        Ok(frames) => {
            for frame in frames {
                let mut record = json!({"call": call, "line": line});
                match frame {
                    Frame::Text(text) => {
                        record["frame"] =
                            serde_json::from_str::<Value>(&text).unwrap_or(Value::String(text));
                    }
                    Frame::Binary(bytes) => {
                        record["binary_hex"] = bytes.iter().map(|b| format!("{b:02x}")).collect();
                    }
                }
                writeln!(out, "{record}")?;
            }
            Ok(None)
        }
        Err(fault) => {
            writeln!(
                out,
                "{}",
                json!({"call": call, "line": line, "fault": fault.as_str()})
            )?;
            Ok::<_, std::io::Error>(Some(fault))
        }
    };
    // Saves the handler and restores it into a fresh instance; a declined or oversized
    // save keeps it live, as a connection would.
    let cycle = |handler: &mut Box<dyn crate::sandbox::Handler>,
                 out: &mut dyn Write,
                 line: Option<usize>|
     -> anyhow::Result<Option<Fault>> {
        if !hibernate || !handler.hibernates() {
            return Ok(None);
        }
        let saved = match handler.save() {
            Ok(saved) => saved,
            Err(fault) => return Ok(emit(out, "save", line, Err(fault))?),
        };
        let bytes = saved.as_ref().map(Vec::len);
        let kept = bytes.is_some_and(|b| b <= config.limits.hibernate_state_bytes);
        writeln!(
            out,
            "{}",
            json!({"call": "save", "line": line, "bytes": bytes, "hibernated": kept})
        )?;
        if let (Some(saved), true) = (saved, kept) {
            match sandbox.restore(&ctx, &saved) {
                Ok(woken) => *handler = woken,
                Err(fault) => return Ok(emit(out, "restore", line, Err(fault))?),
            }
        }
        Ok(None)
    };
    if let Some(fault) = emit(out, "init", None, handler.init(&ctx))? {
        return Ok(Outcome::Faulted(fault));
    }
    if let Some(client) = client {
        for (i, line) in client.lines().enumerate() {
            let line = line.context("reading the client frames")?;
            if line.trim().is_empty() {
                continue;
            }
            let frame = Frame::Text(line);
            if let Some(fault) = cycle(&mut handler, out, Some(i + 1))? {
                return Ok(Outcome::Faulted(fault));
            }
            let result = handler.on_client_message(&frame);
            if let Some(fault) = emit(out, "on-client-message", Some(i + 1), result)? {
                return Ok(Outcome::Faulted(fault));
            }
        }
    }
    let mut seq = 0;
    for (i, line) in events.lines().enumerate() {
        let line = line.context("reading the events")?;
        if line.trim().is_empty() {
            continue;
        }
        let event: EventLine = serde_json::from_str(&line)
            .with_context(|| format!("events line {}: not a publish body", i + 1))?;
        seq += 1;
        let event = Event {
            seq,
            kind: event.kind,
            payload: event.payload.get().to_owned(),
            run_id: event.run_id,
            thread_id: event.thread_id,
        };
        if let Some(fault) = cycle(&mut handler, out, Some(i + 1))? {
            return Ok(Outcome::Faulted(fault));
        }
        let result = handler.on_event(&event);
        if let Some(fault) = emit(out, "on-event", Some(i + 1), result)? {
            return Ok(Outcome::Faulted(fault));
        }
    }
    if let Some(fault) = emit(out, "on-close", None, handler.on_close(CloseReason::Client))? {
        return Ok(Outcome::Faulted(fault));
    }
    Ok(Outcome::Completed)
}

//! AI output streams: a model's answer published as one message that grows by appends
//! (`message: {id, op: create|append|end, text, index, status}` on a publish), instead of one
//! event per token.
//!
//! - In the log a message is **one entry** however many appends it had: it holds the text so
//!   far and sits at the position of its last change, so a resume from any earlier position
//!   gets it as one `snapshot` and never a fragment twice.
//! - Every op still gets its own `seq`, and goes live to the identity's sessions as an event
//!   of kind [`MESSAGE_KIND`] whose payload is an [`Envelope`]: the world's `event` record
//!   does not change, so every guest gets messages (a guest that does not know them
//!   forwards them as events), and the reference guests turn them into `type:"message"`
//!   frames.
//! - A session coalesces the appends that reach it within `streams.rollup_ms` ([`Rollup`]):
//!   the guest and the client see one append with the texts joined and the last `seq`.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::config::Streams;
use crate::router::Publication;
use crate::sandbox::Event;

/// The `kind` of the events that carry message ops to guests; publishers may not use it.
pub const MESSAGE_KIND: &str = "gateway.message";

/// Room in a message frame besides its text and ids: the reference handler's
/// `{"type":"message","op":"snapshot","message_id":..,"text":..,"status":..,"seq":N,...}`.
pub const MESSAGE_FRAME_OVERHEAD: usize = 200;

/// `message` as a publisher sends it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MessageRequest {
    pub id: String,
    pub op: OpName,
    #[serde(default)]
    pub text: Option<String>,
    #[serde(default)]
    pub index: Option<u64>,
    #[serde(default)]
    pub status: Option<Status>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OpName {
    Create,
    Append,
    End,
}

/// Where a message is: streaming until its `end`, then how it ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Streaming,
    Complete,
    Cancelled,
    Failed,
}

/// A validated message op, part of a [`Publication`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MessageOp {
    Create {
        id: String,
        text: String,
        /// Bytes of the snapshot frame besides the text and id (kind, ids, payload with
        /// room for redaction), set by the publish API.
        frame_base: usize,
    },
    Append {
        id: String,
        index: u64,
        text: String,
    },
    End {
        id: String,
        status: Status,
    },
}

impl MessageOp {
    pub fn id(&self) -> &str {
        match self {
            MessageOp::Create { id, .. }
            | MessageOp::Append { id, .. }
            | MessageOp::End { id, .. } => id,
        }
    }

    /// The op a publisher asked for, or why it is malformed.
    pub fn from_request(m: MessageRequest) -> Result<MessageOp, String> {
        if m.id.is_empty() {
            return Err("message.id must not be empty".into());
        }
        match m.op {
            OpName::Create => {
                if m.index.is_some() || m.status.is_some() {
                    return Err("message create takes id and text only".into());
                }
                Ok(MessageOp::Create {
                    id: m.id,
                    text: m.text.unwrap_or_default(),
                    frame_base: 0,
                })
            }
            OpName::Append => {
                if m.status.is_some() {
                    return Err("message append takes id, index and text only".into());
                }
                let Some(index) = m.index.filter(|i| *i >= 1) else {
                    return Err(
                        "message append needs index: 1 for the first append, then 2, 3, ...".into(),
                    );
                };
                Ok(MessageOp::Append {
                    id: m.id,
                    index,
                    text: m.text.unwrap_or_default(),
                })
            }
            OpName::End => {
                if m.index.is_some() || m.text.is_some() {
                    return Err("message end takes id and status only".into());
                }
                let status = m.status.unwrap_or(Status::Complete);
                if status == Status::Streaming {
                    return Err("message end status is complete, cancelled or failed".into());
                }
                Ok(MessageOp::End { id: m.id, status })
            }
        }
    }
}

/// Why the log refused a message op (the publish answers it as `status` with this JSON).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// 409 (the op does not fit the message's state), 413 (too large), 429 (too many open).
    pub status: u16,
    pub error: &'static str,
    pub reason: String,
    /// For `append`: the index the message expects next, when it still takes appends.
    pub expected_index: Option<u64>,
}

fn refusal(status: u16, error: &'static str, reason: String, expected: Option<u64>) -> Refusal {
    Refusal {
        status,
        error,
        reason,
        expected_index: expected,
    }
}

/// One message as the log keeps it.
#[derive(Debug)]
pub struct Message {
    kind: String,
    run_id: Option<String>,
    thread_id: Option<String>,
    /// The create's payload (JSON text), given again with every snapshot.
    payload: String,
    text: String,
    /// `text` as a JSON string literal would be, to bound the snapshot frame.
    escaped: usize,
    /// The rest of the snapshot frame (see [`MessageOp::Create`]).
    frame_base: usize,
    status: Status,
    created_seq: u64,
    /// The `seq` of the create, then of append 1, 2, ..., less `created_seq` (4 bytes an
    /// append, not 8): a repeated index answers its own.
    seqs: Vec<u32>,
    end_seq: Option<u64>,
    /// The `seq` of its latest op: where it sits in the history.
    pub last_seq: u64,
    opened: Instant,
}

impl Message {
    /// Bytes it holds, with its bookkeeping.
    pub fn bytes(&self) -> usize {
        self.kind.len()
            + self.run_id.as_ref().map_or(0, String::len)
            + self.thread_id.as_ref().map_or(0, String::len)
            + self.payload.len()
            + self.text.capacity()
            + 4 * self.seqs.capacity()
            + 160
    }

    pub fn is_open(&self) -> bool {
        self.status == Status::Streaming
    }

    /// The `seq` of its create.
    pub fn created_seq(&self) -> u64 {
        self.created_seq
    }

    pub fn is_overdue(&self, now: Instant, max_open: Duration) -> bool {
        self.is_open() && now.duration_since(self.opened) >= max_open
    }

    fn next_index(&self) -> u64 {
        self.seqs.len() as u64
    }

    fn seq_of(&self, index: u64) -> u64 {
        self.created_seq + u64::from(self.seqs[index as usize])
    }

    /// The whole message at its latest `seq`, as the event a resume delivers.
    pub fn snapshot(&self, id: &str) -> Event {
        self.event(
            self.last_seq,
            Envelope {
                id: id.into(),
                op: "snapshot".into(),
                text: self.text.as_str().into(),
                status: self.status,
                kind: self.kind.as_str().into(),
                payload: Some(raw(&self.payload)),
            },
        )
    }

    fn event(&self, seq: u64, envelope: Envelope<'_>) -> Event {
        Event {
            seq,
            kind: MESSAGE_KIND.to_owned(),
            payload: serde_json::to_string(&envelope).expect("an envelope serializes"),
            run_id: self.run_id.clone(),
            thread_id: self.thread_id.clone(),
        }
    }
}

fn raw(json: &str) -> &RawValue {
    // The payload was checked to be JSON by the publish API when the message was created.
    serde_json::from_str(json)
        .unwrap_or_else(|_| serde_json::from_str("null").expect("null is JSON"))
}

/// The payload of a [`MESSAGE_KIND`] event: what a guest reads to build its frame. Read
/// back without copying unless a string has escapes (model output is full of `\n`).
#[derive(Debug, Serialize, Deserialize)]
pub struct Envelope<'a> {
    #[serde(borrow)]
    pub id: Cow<'a, str>,
    /// `create`, `append`, `end` live; `snapshot` on resume.
    #[serde(borrow)]
    pub op: Cow<'a, str>,
    #[serde(borrow)]
    pub text: Cow<'a, str>,
    pub status: Status,
    /// The `kind` the publisher gave the message's create.
    #[serde(borrow)]
    pub kind: Cow<'a, str>,
    /// The create's payload: with `create` and `snapshot` only.
    #[serde(borrow, default, skip_serializing_if = "Option::is_none")]
    pub payload: Option<&'a RawValue>,
}

/// What an op's publication says besides the op: a create's are the message's, an append's
/// or end's must agree with them.
#[derive(Debug, Clone, Copy)]
pub struct Fields<'a> {
    pub kind: &'a str,
    pub payload: &'a str,
    pub run_id: Option<&'a str>,
    pub thread_id: Option<&'a str>,
}

impl<'a> Fields<'a> {
    pub fn of(p: &'a Publication) -> Self {
        Fields {
            kind: &p.kind,
            payload: &p.payload,
            run_id: p.run_id.as_deref(),
            thread_id: p.thread_id.as_deref(),
        }
    }
}

/// What an op would do to its message, decided before the op has a `seq`: cluster mode
/// checks an op, stores it, and only then applies it (see `cluster::messages`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    New,
    /// The same op again: its original `seq`.
    Duplicate(u64),
}

/// What applying an op did.
#[derive(Debug)]
pub enum Applied {
    /// A new op with the `seq` it was given, and the event carrying it live.
    New { event: Event, created: bool },
    /// The same op again (a retried create or end, an append index seen before): its
    /// original `seq`; nothing changed.
    Duplicate(u64),
}

/// The bounds ops are checked against: `[streams]`, and the largest frame a client takes (a
/// message's snapshot must fit one).
#[derive(Debug, Clone)]
pub struct Bounds {
    pub limits: Streams,
    pub frame_limit: usize,
}

impl Default for Bounds {
    fn default() -> Self {
        Bounds {
            limits: Streams::default(),
            frame_limit: 64 << 10,
        }
    }
}

impl Bounds {
    /// No bounds: for ops that were checked when they were stored, applied again.
    pub fn unbounded() -> Self {
        Bounds {
            limits: Streams {
                max_message_bytes: usize::MAX,
                max_appends_per_message: usize::MAX,
                max_open_messages_per_user: usize::MAX,
                ..Streams::default()
            },
            frame_limit: usize::MAX,
        }
    }
}

fn too_many_appends(id: &str, m: &Message, limits: &Streams, expected: u64) -> Refusal {
    refusal(
        413,
        "too_many_appends",
        format!(
            "message {id:?} has had {} appends (limit {}, streams.max_appends_per_message): \
             end it",
            m.seqs.len() - 1,
            limits.max_appends_per_message
        ),
        Some(expected),
    )
}

/// One identity's messages still in its history.
#[derive(Debug, Default)]
pub struct Messages {
    by_id: HashMap<Arc<str>, Message>,
}

impl Messages {
    pub fn get(&self, id: &str) -> Option<&Message> {
        self.by_id.get(id)
    }

    /// Forgets a message whose history entry was evicted; its bytes.
    pub fn remove(&mut self, id: &str) -> usize {
        self.by_id.remove(id).map_or(0, |m| m.bytes())
    }

    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }

    /// Whether a message is still streaming.
    pub fn has_open(&self) -> bool {
        self.by_id.values().any(Message::is_open)
    }

    /// Open messages past `max_open`: the sweeper ends them as `failed`.
    pub fn overdue(&self, now: Instant, max_open: Duration) -> impl Iterator<Item = &str> {
        self.by_id
            .iter()
            .filter(move |(_, m)| m.is_overdue(now, max_open))
            .map(|(id, _)| &**id)
    }

    /// Whether `op` fits its message: a new op, the same op again, or why not. Changes
    /// nothing.
    pub fn verdict(
        &self,
        publication: Fields<'_>,
        op: &MessageOp,
        bounds: &Bounds,
    ) -> Result<Verdict, Refusal> {
        let (limits, frame_limit) = (&bounds.limits, bounds.frame_limit);
        let id = op.id();
        if let MessageOp::Create {
            text, frame_base, ..
        } = op
        {
            if let Some(m) = self.by_id.get(id) {
                return Ok(Verdict::Duplicate(m.created_seq));
            }
            let open = self.by_id.values().filter(|m| m.is_open()).count();
            if open >= limits.max_open_messages_per_user {
                return Err(refusal(
                    429,
                    "too_many_open_messages",
                    format!(
                        "this user has {open} messages streaming (limit {}, \
                         streams.max_open_messages_per_user): end one first",
                        limits.max_open_messages_per_user
                    ),
                    None,
                ));
            }
            check_size(
                id,
                text.len(),
                escaped_len(text),
                *frame_base,
                limits,
                frame_limit,
            )?;
            return Ok(Verdict::New);
        }
        let Some(m) = self.by_id.get(id) else {
            return Err(refusal(
                409,
                "message_not_found",
                format!(
                    "no message {id:?} for this user: create it first (or it left the history, \
                     see [history])"
                ),
                None,
            ));
        };
        if let Some(field) = mismatch(m, publication) {
            return Err(refusal(
                409,
                "message_mismatch",
                format!("{field} differs from the one message {id:?} was created with"),
                None,
            ));
        }
        match op {
            MessageOp::Create { .. } => unreachable!("handled above"),
            MessageOp::Append { index, text, .. } => {
                let expected = m.next_index();
                if *index < expected {
                    return Ok(Verdict::Duplicate(m.seq_of(*index)));
                }
                if !m.is_open() {
                    return Err(refusal(
                        409,
                        "message_ended",
                        format!("message {id:?} has ended: it takes no more appends"),
                        None,
                    ));
                }
                if *index > expected {
                    return Err(refusal(
                        409,
                        "append_out_of_order",
                        format!(
                            "message {id:?} expects append {expected} next, not {index}: send \
                             the appends in order"
                        ),
                        Some(expected),
                    ));
                }
                if m.seqs.len() > limits.max_appends_per_message {
                    return Err(too_many_appends(id, m, limits, expected));
                }
                check_size(
                    id,
                    m.text.len() + text.len(),
                    m.escaped + escaped_len(text),
                    m.frame_base,
                    limits,
                    frame_limit,
                )
                .map_err(|mut r| {
                    r.expected_index = Some(expected);
                    r
                })?;
                Ok(Verdict::New)
            }
            MessageOp::End { status, .. } => match m.end_seq {
                Some(end_seq) if m.status == *status => Ok(Verdict::Duplicate(end_seq)),
                Some(_) => Err(refusal(
                    409,
                    "message_ended",
                    format!("message {id:?} has already ended as {:?}", m.status),
                    None,
                )),
                None => Ok(Verdict::New),
            },
        }
    }

    /// The event that carries `op` live, for an op [`Messages::verdict`] found new: an
    /// append's or end's with its message's kind and ids.
    pub fn live_event(&self, publication: Fields<'_>, op: &MessageOp, seq: u64) -> Event {
        let (id, op_name, text, status) = match op {
            MessageOp::Create { id, text, .. } => {
                let envelope = Envelope {
                    id: id.into(),
                    op: "create".into(),
                    text: text.into(),
                    status: Status::Streaming,
                    kind: publication.kind.into(),
                    payload: Some(raw(publication.payload)),
                };
                return Event {
                    seq,
                    kind: MESSAGE_KIND.to_owned(),
                    payload: serde_json::to_string(&envelope).expect("an envelope serializes"),
                    run_id: publication.run_id.map(str::to_owned),
                    thread_id: publication.thread_id.map(str::to_owned),
                };
            }
            MessageOp::Append { id, text, .. } => (id, "append", text.as_str(), Status::Streaming),
            MessageOp::End { id, status } => (id, "end", "", *status),
        };
        let m = &self.by_id[id.as_str()];
        m.event(
            seq,
            Envelope {
                id: id.into(),
                op: op_name.into(),
                text: text.into(),
                status,
                kind: m.kind.as_str().into(),
                payload: None,
            },
        )
    }

    /// Applies `op` as event `seq` of the publication's identity; a create's message counts
    /// as opened at `opened`. `bytes` changes by what the message's memory grew (or shrank)
    /// by; the caller counts it in the log's bounds.
    pub fn apply(
        &mut self,
        publication: Fields<'_>,
        op: &MessageOp,
        seq: u64,
        opened: Instant,
        bounds: &Bounds,
        bytes: &mut isize,
    ) -> Result<Applied, Refusal> {
        if let Verdict::Duplicate(original) = self.verdict(publication, op, bounds)? {
            return Ok(Applied::Duplicate(original));
        }
        let event = self.live_event(publication, op, seq);
        let id = op.id();
        if let MessageOp::Create {
            text, frame_base, ..
        } = op
        {
            let message = Message {
                kind: publication.kind.to_owned(),
                run_id: publication.run_id.map(str::to_owned),
                thread_id: publication.thread_id.map(str::to_owned),
                payload: publication.payload.to_owned(),
                text: text.clone(),
                escaped: escaped_len(text),
                frame_base: *frame_base,
                status: Status::Streaming,
                created_seq: seq,
                seqs: vec![0],
                end_seq: None,
                last_seq: seq,
                opened,
            };
            *bytes += message.bytes() as isize;
            self.by_id.insert(id.into(), message);
            return Ok(Applied::New {
                event,
                created: true,
            });
        }
        let m = self.by_id.get_mut(id).expect("the verdict found it");
        let before = m.bytes();
        match op {
            MessageOp::Create { .. } => unreachable!("handled above"),
            MessageOp::Append { text, .. } => {
                // An offset past 32 bits would take 4 billion of the user's events while one
                // message streams: refused like too many appends.
                let Ok(offset) = u32::try_from(seq - m.created_seq) else {
                    let expected = m.next_index();
                    return Err(too_many_appends(id, m, &bounds.limits, expected));
                };
                m.text.push_str(text);
                m.escaped += escaped_len(text);
                m.seqs.push(offset);
            }
            MessageOp::End { status, .. } => {
                m.status = *status;
                m.end_seq = Some(seq);
                // It grows no more: give back what doubling reserved.
                m.text.shrink_to_fit();
                m.seqs.shrink_to_fit();
            }
        }
        m.last_seq = seq;
        *bytes += m.bytes() as isize - before as isize;
        Ok(Applied::New {
            event,
            created: false,
        })
    }
}

/// The field of an append or end that names something other than the message's create did.
fn mismatch(m: &Message, p: Fields<'_>) -> Option<&'static str> {
    if p.kind != MESSAGE_KIND && p.kind != m.kind {
        return Some("kind");
    }
    if p.run_id.is_some() && p.run_id != m.run_id.as_deref() {
        return Some("run_id");
    }
    if p.thread_id.is_some() && p.thread_id != m.thread_id.as_deref() {
        return Some("thread_id");
    }
    None
}

/// A message may grow to `streams.max_message_bytes`, and its snapshot must fit one frame.
fn check_size(
    id: &str,
    len: usize,
    escaped: usize,
    frame_base: usize,
    limits: &Streams,
    frame_limit: usize,
) -> Result<(), Refusal> {
    if len > limits.max_message_bytes {
        return Err(refusal(
            413,
            "message_too_large",
            format!(
                "message {id:?} would hold {len} bytes of text (limit {}, \
                 streams.max_message_bytes): end it and continue in a new one",
                limits.max_message_bytes
            ),
            None,
        ));
    }
    let framed = MESSAGE_FRAME_OVERHEAD + frame_base + escaped + escaped_len(id);
    if framed > frame_limit {
        return Err(refusal(
            413,
            "message_too_large",
            format!(
                "message {id:?}'s snapshot frame would take {framed} bytes; clients take at \
                 most {frame_limit} (limits.max_message_bytes): raise it for longer messages, \
                 or end this one and continue in a new one"
            ),
            None,
        ));
    }
    Ok(())
}

/// Length of `s` once written as a JSON string literal (without the quotes).
pub fn escaped_len(s: &str) -> usize {
    s.bytes()
        .map(|b| match b {
            b'"' | b'\\' | b'\n' | b'\r' | b'\t' => 2,
            0..=0x1f => 6,
            _ => 1,
        })
        .sum()
}

/// The appends a session holds back for up to `streams.rollup_ms`, per message, to hand
/// its guest one append with the texts joined and the latest `seq`.
#[derive(Debug, Default)]
pub struct Rollup {
    /// In the order their first append arrived; few at a time (a user's open messages).
    pending: Vec<Pending>,
    /// Appends held, for what the rollup saved.
    held: usize,
}

#[derive(Debug)]
struct Pending {
    id: String,
    /// The latest append: its `seq`, kind and ids are the rolled-up append's.
    last: Arc<Event>,
    /// Texts after the first, joined (empty while there is one append).
    text: String,
    parts: usize,
}

/// An append's id and text, read from its event; `None` for every other event.
fn append_of(event: &Event) -> Option<Envelope<'_>> {
    if event.kind != MESSAGE_KIND {
        return None;
    }
    serde_json::from_str::<Envelope<'_>>(&event.payload)
        .ok()
        .filter(|e| e.op == "append")
}

impl Rollup {
    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }

    /// Holds `event` back if it is an append (true); anything else must first see what is
    /// held delivered ([`Rollup::take`]), so that the guest gets every `seq` in order.
    pub fn hold(&mut self, event: &Arc<Event>) -> bool {
        let Some(append) = append_of(event) else {
            return false;
        };
        self.held += 1;
        match self.pending.iter_mut().find(|p| p.id == append.id) {
            Some(p) => {
                if p.parts == 1 {
                    p.text = append_of(&p.last).map_or_else(String::new, |e| e.text.into_owned());
                }
                p.text.push_str(&append.text);
                p.parts += 1;
                p.last = event.clone();
            }
            None => self.pending.push(Pending {
                id: append.id.into_owned(),
                last: event.clone(),
                text: String::new(),
                parts: 1,
            }),
        }
        true
    }

    /// Everything held, one append per message, in `seq` order (each carries its last
    /// append's `seq`, so the guest's frames keep increasing); and how many appends were
    /// folded into others.
    pub fn take(&mut self) -> (Vec<Arc<Event>>, usize) {
        let mut pending = std::mem::take(&mut self.pending);
        let folded = std::mem::take(&mut self.held) - pending.len();
        pending.sort_by_key(|p| p.last.seq);
        let events = pending
            .into_iter()
            .map(|p| {
                if p.parts == 1 {
                    return p.last;
                }
                let last = append_of(&p.last).expect("held events are appends");
                let payload = serde_json::to_string(&Envelope {
                    text: p.text.as_str().into(),
                    ..last
                })
                .expect("an envelope serializes");
                Arc::new(Event {
                    payload,
                    ..(*p.last).clone()
                })
            })
            .collect();
        (events, folded)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::Identity;

    fn limits() -> Streams {
        Streams {
            max_appends_per_message: 3,
            max_open_messages_per_user: 2,
            max_message_bytes: 64,
            ..Streams::default()
        }
    }

    fn publication() -> Publication {
        Publication {
            identity: Identity {
                tenant: None,
                user: "alice".into(),
            },
            kind: "answer".into(),
            payload: "{\"model\":\"m\"}".into(),
            run_id: Some("r1".into()),
            thread_id: None,
            message: None,
        }
    }

    fn apply(ms: &mut Messages, op: MessageOp, seq: u64) -> Result<Applied, Refusal> {
        let mut bytes = 0;
        let bounds = Bounds {
            limits: limits(),
            frame_limit: 64 << 10,
        };
        ms.apply(
            Fields::of(&publication()),
            &op,
            seq,
            Instant::now(),
            &bounds,
            &mut bytes,
        )
    }

    fn append(id: &str, index: u64, text: &str) -> MessageOp {
        MessageOp::Append {
            id: id.into(),
            index,
            text: text.into(),
        }
    }

    fn create(id: &str) -> MessageOp {
        MessageOp::Create {
            id: id.into(),
            text: "He".into(),
            frame_base: 100,
        }
    }

    #[test]
    fn appends_in_order_grow_the_text_and_repeats_answer_their_own_seq() {
        let mut ms = Messages::default();
        apply(&mut ms, create("m"), 10).unwrap();
        apply(&mut ms, append("m", 1, "llo"), 11).unwrap();
        apply(&mut ms, append("m", 2, ", world"), 12).unwrap();
        assert!(matches!(
            apply(&mut ms, append("m", 1, "llo"), 13),
            Ok(Applied::Duplicate(11))
        ));
        assert!(matches!(
            apply(&mut ms, create("m"), 13),
            Ok(Applied::Duplicate(10))
        ));
        let gap = apply(&mut ms, append("m", 4, "!"), 13).unwrap_err();
        assert_eq!((gap.status, gap.expected_index), (409, Some(3)));
        let snap = ms.get("m").unwrap().snapshot("m");
        let env: Envelope<'_> = serde_json::from_str(&snap.payload).unwrap();
        assert_eq!(
            (snap.seq, &*env.op, &*env.text),
            (12, "snapshot", "Hello, world")
        );
        assert_eq!(env.payload.unwrap().get(), "{\"model\":\"m\"}");
    }

    #[test]
    fn ends_are_final_and_limits_refuse_clearly() {
        let mut ms = Messages::default();
        let end = |status| MessageOp::End {
            id: "m".into(),
            status,
        };
        assert_eq!(
            apply(&mut ms, append("m", 1, "x"), 1).unwrap_err().error,
            "message_not_found"
        );
        apply(&mut ms, create("m"), 1).unwrap();
        apply(&mut ms, create("n"), 2).unwrap();
        assert_eq!(apply(&mut ms, create("o"), 3).unwrap_err().status, 429);
        assert_eq!(
            apply(&mut ms, append("m", 1, &"x".repeat(63)), 3)
                .unwrap_err()
                .error,
            "message_too_large"
        );
        for i in 1..=3 {
            apply(&mut ms, append("m", i, "x"), 2 + i).unwrap();
        }
        assert_eq!(
            apply(&mut ms, append("m", 4, "x"), 6).unwrap_err().status,
            413
        );
        apply(&mut ms, end(Status::Complete), 6).unwrap();
        assert!(matches!(
            apply(&mut ms, end(Status::Complete), 7),
            Ok(Applied::Duplicate(6))
        ));
        assert_eq!(
            apply(&mut ms, end(Status::Failed), 7).unwrap_err().error,
            "message_ended"
        );
        assert_eq!(
            apply(&mut ms, append("m", 4, "x"), 7).unwrap_err().error,
            "message_ended"
        );
        // An ended message frees its place among the open ones.
        apply(&mut ms, create("o"), 7).unwrap();
    }

    #[test]
    fn a_rollup_joins_each_messages_appends_and_keeps_seq_order() {
        let mut ms = Messages::default();
        let mut events = Vec::new();
        for (op, seq) in [
            (create("a"), 1),
            (create("b"), 2),
            (append("a", 1, "1"), 3),
            (append("b", 1, "x"), 4),
            (append("a", 2, "2"), 5),
            (append("a", 3, "3"), 6),
        ] {
            if let Applied::New { event, .. } = apply(&mut ms, op, seq).unwrap() {
                events.push(Arc::new(event));
            }
        }
        let mut rollup = Rollup::default();
        assert!(!rollup.hold(&events[0]), "a create is not held");
        for e in &events[2..] {
            assert!(rollup.hold(e));
        }
        let (out, folded) = rollup.take();
        assert_eq!(folded, 2);
        let seen: Vec<(u64, String)> = out
            .iter()
            .map(|e| {
                let env: Envelope<'_> = serde_json::from_str(&e.payload).unwrap();
                (e.seq, format!("{}:{}", env.id, env.text))
            })
            .collect();
        assert_eq!(seen, [(4, "b:x".to_owned()), (6, "a:123".to_owned())]);
        assert!(rollup.is_empty());
    }
}

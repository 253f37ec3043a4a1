//! Message ops (AI output streams, see `crate::streams`) in cluster mode.
//!
//! - **Stored as events, folded on read.** Every op is a record in the identity's own
//!   subject, like its plain events: it gets its `seq` from the stream, goes live through
//!   the identity's feed on every node in order with everything else, and is covered by the
//!   same resume, gap and eviction logic. A resume folds a message's records into one
//!   `snapshot` at its latest op ([`Cluster::fold`]).
//!   - The alternative, a subject per message rolled up at its `end` (`Nats-Rollup`), would
//!     split an identity over many subjects: the feed's gap detection (each record names the
//!     identity's previous one) and the eviction proof (an identity's oldest records go
//!     first) hold only for one subject per identity.
//!   - The cost: the stream keeps up to `max_events_per_user` + `max_appends_per_message`
//!     + 3 records per identity, so one message's ops never push out its other events.
//! - **Checked with compare-and-set.** An op must fit its message (index order, ended,
//!   limits), and any node takes ops for any message. Each node keeps, per identity, its
//!   messages as folded from the stream (a [`Ledger`]) and the sequence of the identity's
//!   last record. An op is checked against the ledger and stored with
//!   `Nats-Expected-Last-Subject-Sequence`: if anything of the identity was stored since (by
//!   another node, or a plain event), the stream refuses it, the node folds what it missed
//!   and checks again. So every stored op was checked against everything before it, and a
//!   repeated index answers the original `seq` however many nodes the retries went to.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream::ErrorCode;
use async_nats::jetstream::context::PublishErrorKind;
use serde::{Deserialize, Serialize};

use super::{Cluster, Record, Records, Stored, Unavailable, encode_parts, msg_id, now_micros};
use crate::auth::Identity;
use crate::config::{History, Streams};
use crate::router::Publication;
use crate::sandbox::Event;
use crate::streams::{Envelope, Fields, MessageOp, Messages, Refusal, Verdict};

/// What a stored op carries besides its live event, for a fold to apply it again.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct OpMeta {
    /// An append's index; 0 for a create or an end.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub index: u64,
    /// The `seq` of the message's create (0 on the create itself): how far back a resume
    /// reads to fold a message touched after its position.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub created: u64,
    /// A create's snapshot frame besides its text (see `MessageOp::Create`).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub frame_base: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// Tries at storing one op while other writes of its identity keep coming first.
const WRITE_TRIES: usize = 16;

/// A ledger older than this is folded again from the stream: what the stream's limits
/// removed meanwhile leaves it too.
const LEDGER_FRESH: Duration = Duration::from_secs(30);

/// A ledger not used for this long, with no message streaming, is forgotten.
const LEDGER_IDLE: Duration = Duration::from_secs(120);

/// Records the stream keeps per identity (its per-subject limit): the history's events, one
/// message's create, appends and end, and one more (see `Cluster::read`).
pub fn records_per_identity(history: &History, streams: &Streams) -> usize {
    history.max_events_per_user + streams.max_appends_per_message + 3
}

/// One identity's messages as this node folded them from the stream.
#[derive(Debug)]
pub struct Ledger {
    messages: Messages,
    /// The identity's last record folded in; `None`: fold it from the stream first.
    last: Option<u64>,
    folded_at: Instant,
    used: Instant,
}

impl Default for Ledger {
    fn default() -> Self {
        Ledger {
            messages: Messages::default(),
            last: None,
            folded_at: Instant::now(),
            used: Instant::now(),
        }
    }
}

/// The ledgers of the identities this node took message ops for.
#[derive(Debug, Default)]
pub struct Ledgers(Mutex<HashMap<Identity, Arc<tokio::sync::Mutex<Ledger>>>>);

impl Ledgers {
    fn of(&self, identity: &Identity) -> Arc<tokio::sync::Mutex<Ledger>> {
        let mut map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        map.entry(identity.clone()).or_default().clone()
    }

    /// Every ledger, to look at without holding the map.
    fn all(&self) -> Vec<(Identity, Arc<tokio::sync::Mutex<Ledger>>)> {
        let map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        map.iter().map(|(i, l)| (i.clone(), l.clone())).collect()
    }
}

/// A stored op, read back: the op, and its message's kind and (a create's) payload.
struct StoredOp {
    op: MessageOp,
    kind: String,
    payload: String,
}

impl StoredOp {
    fn fields<'a>(&'a self, record: &'a Record) -> Fields<'a> {
        Fields {
            kind: &self.kind,
            payload: &self.payload,
            run_id: record.event.run_id.as_deref(),
            thread_id: record.event.thread_id.as_deref(),
        }
    }
}

/// A stored op as the [`MessageOp`] it was published as.
fn op_of(record: &Record, meta: &OpMeta) -> Option<StoredOp> {
    let envelope: Envelope<'_> = serde_json::from_str(&record.event.payload).ok()?;
    let id = envelope.id.into_owned();
    let op = match &*envelope.op {
        "create" => MessageOp::Create {
            id,
            text: envelope.text.into_owned(),
            frame_base: meta.frame_base as usize,
        },
        "append" => MessageOp::Append {
            id,
            index: meta.index,
            text: envelope.text.into_owned(),
        },
        "end" => MessageOp::End {
            id,
            status: envelope.status,
        },
        _ => return None,
    };
    Some(StoredOp {
        op,
        kind: envelope.kind.into_owned(),
        payload: envelope.payload.map_or("null", |p| p.get()).to_owned(),
    })
}

/// When a record stored at `at` (microseconds since the epoch) was, on this node's clock.
fn instant_of(at: u64) -> Instant {
    let ago = Duration::from_micros(now_micros().saturating_sub(at));
    Instant::now().checked_sub(ago).unwrap_or_else(Instant::now)
}

/// Folds `records` into `messages`, in order; `only`: the ids to fold (all when `None`).
/// A record that does not apply (a stored op whose message left the history) is skipped.
/// Stored ops were checked when they were stored: they are applied again without limits, so
/// a node with lower `[streams]` bounds folds the same messages.
fn apply_all(messages: &mut Messages, records: &Records, only: Option<&HashSet<String>>) {
    let bounds = crate::streams::Bounds::unbounded();
    for (seq, record) in records {
        let Some(record) = record else { continue };
        let Some(meta) = &record.op else { continue };
        let Some(stored) = op_of(record, meta) else {
            continue;
        };
        if only.is_some_and(|ids| !ids.contains(stored.op.id())) {
            continue;
        }
        let fields = stored.fields(record);
        let _ = messages.apply(
            fields,
            &stored.op,
            *seq,
            instant_of(record.at),
            &bounds,
            &mut 0,
        );
    }
}

impl Cluster {
    /// Stores a message op once it fits its message: `Ok(Err(_))` when it does not (nothing
    /// stored), `Ok(Ok(_))` with its `seq` (the original one for an op seen before).
    pub async fn publish_message(
        &self,
        publication: &Publication,
        idempotency_key: Option<&str>,
    ) -> Result<Result<Stored, Refusal>, Unavailable> {
        let op = publication
            .message
            .as_ref()
            .expect("publish_message takes message ops");
        let identity = &publication.identity;
        let ledger = self.ledgers.of(identity);
        // One op of an identity at a time on this node: they would only refuse each other.
        let mut ledger = tokio::time::timeout(self.request_timeout, ledger.lock())
            .await
            .map_err(|_| Unavailable("other ops of this user are still being stored".into()))?;
        ledger.used = Instant::now();
        if ledger.last.is_none() || ledger.folded_at.elapsed() > LEDGER_FRESH {
            self.fold_ledger(identity, &mut ledger).await?;
        }
        let fields = Fields::of(publication);
        // Whether the ledger was brought up to the identity's head since this op came.
        let mut current = false;
        for _ in 0..WRITE_TRIES {
            let last = ledger.last.unwrap_or(0);
            match ledger.messages.verdict(fields, op, &self.bounds) {
                // The ledger may lack ops other nodes stored: a refusal holds only against
                // the head. (A duplicate holds anyway: ops are only ever added.)
                Err(_) if !current => {
                    self.catch_up(identity, &mut ledger, true).await?;
                    current = true;
                    continue;
                }
                Err(refusal) => return Ok(Err(refusal)),
                Ok(Verdict::Duplicate(seq)) => {
                    return Ok(Ok(Stored {
                        seq,
                        duplicate: true,
                    }));
                }
                Ok(Verdict::New) => {}
            }
            let event = ledger.messages.live_event(fields, op, 0);
            let meta = OpMeta {
                index: match op {
                    MessageOp::Append { index, .. } => *index,
                    _ => 0,
                },
                created: ledger.messages.get(op.id()).map_or(0, |m| m.created_seq()),
                frame_base: match op {
                    MessageOp::Create { frame_base, .. } => *frame_base as u64,
                    _ => 0,
                },
            };
            match self
                .store_op(identity, &event, &meta, last, idempotency_key)
                .await
            {
                Ok(stored) if stored.duplicate => {
                    // Its idempotency key was used before: that record is the answer.
                    self.fold_ledger(identity, &mut ledger).await?;
                    return Ok(Ok(stored));
                }
                Ok(stored) => {
                    let applied = ledger.messages.apply(
                        fields,
                        op,
                        stored.seq,
                        Instant::now(),
                        &self.bounds,
                        &mut 0,
                    );
                    debug_assert!(applied.is_ok(), "a stored op applies: {applied:?}");
                    ledger.last = Some(stored.seq);
                    return Ok(Ok(stored));
                }
                Err(Store::Moved) => {
                    tracing::debug!("the user stored a record first; folding it in");
                    self.catch_up(identity, &mut ledger, false).await?;
                }
                Err(Store::Failed(e)) => {
                    // It may be stored all the same: fold again before the next op.
                    ledger.last = None;
                    return Err(e);
                }
            }
        }
        Err(Unavailable(
            "this user's events kept being stored by other writers while this op waited; retry"
                .into(),
        ))
    }

    /// Stores one op, only if the identity's last record is still `last`.
    async fn store_op(
        &self,
        identity: &Identity,
        event: &Event,
        meta: &OpMeta,
        last: u64,
        idempotency_key: Option<&str>,
    ) -> Result<Stored, Store> {
        if !self
            .link
            .connected
            .load(std::sync::atomic::Ordering::Acquire)
        {
            return Err(Store::Failed(Unavailable(
                "the NATS connection is down".into(),
            )));
        }
        let meta = serde_json::to_string(meta).expect("op metadata serializes");
        let body = encode_parts(
            &event.kind,
            &event.payload,
            [&event.run_id, &event.thread_id],
            now_micros(),
            Some(&meta),
        );
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(
            "Nats-Expected-Last-Subject-Sequence",
            last.to_string().as_str(),
        );
        if let Some(key) = idempotency_key {
            headers.insert("Nats-Msg-Id", msg_id(identity, key).as_str());
        }
        let started = Instant::now();
        let acked = async {
            self.js
                .publish_with_headers(self.event_subject(identity), headers, body.into())
                .await?
                .await
        };
        let ack = match acked.await {
            Ok(ack) => ack,
            Err(e) if e.kind() == PublishErrorKind::WrongLastSequence => return Err(Store::Moved),
            // A clustered stream (NATS 2.11 on) refuses a compare-and-set while another
            // write of the same subject is in flight: the same as losing the race.
            Err(e) if in_flight(&e) => {
                tokio::time::sleep(Duration::from_millis(2)).await;
                return Err(Store::Moved);
            }
            Err(e) => return Err(Store::Failed(Unavailable(e.to_string()))),
        };
        self.metrics
            .nats_round_trip("publish", started.elapsed().as_secs_f64());
        Ok(Stored {
            seq: ack.sequence,
            duplicate: ack.duplicate,
        })
    }

    /// Folds the identity's stored records into a fresh ledger.
    async fn fold_ledger(
        &self,
        identity: &Identity,
        ledger: &mut Ledger,
    ) -> Result<(), Unavailable> {
        let head = self.leader_head(identity).await?.0;
        let records = self
            .batch_through(identity, 1, head, self.records_per_identity, false)
            .await?;
        let mut messages = Messages::default();
        apply_all(&mut messages, &records, None);
        ledger.messages = messages;
        // What was read, not the head: a read that stopped short of it (a copy that lags)
        // leaves the ledger behind, and its next write's compare-and-set catches up.
        ledger.last = Some(records.last().map_or(0, |(seq, _)| *seq));
        ledger.folded_at = Instant::now();
        Ok(())
    }

    /// Folds in what the identity stored after the ledger's last record, up to its head:
    /// with `fenced`, a head that includes every write acknowledged before this call (see
    /// [`Cluster::head_of`]); else the leader's, one read.
    async fn catch_up(
        &self,
        identity: &Identity,
        ledger: &mut Ledger,
        fenced: bool,
    ) -> Result<(), Unavailable> {
        let head = match fenced {
            true => self.head_of(identity).await?,
            false => self.leader_head(identity).await?.0,
        };
        let last = ledger.last.unwrap_or(0);
        if head == last {
            return Ok(());
        }
        if head < last {
            // The records the ledger knew are gone (the stream's limits): start over.
            return self.fold_ledger(identity, ledger).await;
        }
        let records = self
            .batch_through(identity, last + 1, head, self.records_per_identity, false)
            .await?;
        apply_all(&mut ledger.messages, &records, None);
        if let Some((seq, _)) = records.last() {
            ledger.last = Some(*seq);
        }
        if ledger.last.unwrap_or(0) < head {
            return Err(Unavailable(
                "the stream's copies did not hold this user's newest events; retry".into(),
            ));
        }
        Ok(())
    }

    /// The replay of `records` (the identity's, after `since`): plain events as they are,
    /// and each message touched after `since` as one snapshot at its latest op, read back to
    /// its create. `None` when such a message's create is no longer stored.
    pub(super) async fn fold(
        &self,
        identity: &Identity,
        since: u64,
        records: Records,
    ) -> Result<Option<Vec<Arc<Event>>>, Unavailable> {
        let has_ops = records
            .iter()
            .any(|(_, r)| r.as_ref().is_some_and(|r| r.op.is_some()));
        if !has_ops {
            return Ok(Some(
                records
                    .into_iter()
                    .filter_map(|(_, r)| r.map(|r| Arc::new(r.event)))
                    .collect(),
            ));
        }
        let mut touched = HashSet::new();
        let mut from = u64::MAX;
        for (_, record) in &records {
            let Some(record) = record else { continue };
            let Some(meta) = &record.op else { continue };
            if let Some(stored) = op_of(record, meta) {
                touched.insert(stored.op.id().to_owned());
                if meta.created > 0 && meta.created <= since {
                    from = from.min(meta.created);
                }
            }
        }
        let mut messages = Messages::default();
        if from <= since {
            let mut earlier = self
                .batch_through(identity, from, since, self.records_per_identity, false)
                .await?;
            earlier.retain(|(seq, _)| *seq <= since);
            apply_all(&mut messages, &earlier, Some(&touched));
        }
        apply_all(&mut messages, &records, Some(&touched));
        let mut events: Vec<Arc<Event>> = records
            .into_iter()
            .filter_map(|(_, r)| r.filter(|r| r.op.is_none()).map(|r| Arc::new(r.event)))
            .collect();
        for id in &touched {
            let Some(message) = messages.get(id) else {
                return Ok(None);
            };
            // Its ops after `since` were all repeats of earlier ones: nothing new.
            if message.last_seq > since {
                events.push(Arc::new(message.snapshot(id)));
            }
        }
        events.sort_by_key(|e| e.seq);
        Ok(Some(events))
    }

    /// Messages this node knows of still streaming `max_open` after their create, to be
    /// ended as `failed`; forgets ledgers idle for a while.
    pub fn overdue_messages(&self, max_open: Duration) -> Vec<(Identity, String)> {
        let now = Instant::now();
        let mut overdue = Vec::new();
        let mut idle = Vec::new();
        for (identity, ledger) in self.ledgers.all() {
            // One being written is looked at next time.
            let Ok(ledger) = ledger.try_lock() else {
                continue;
            };
            let ids: Vec<String> = ledger
                .messages
                .overdue(now, max_open)
                .map(str::to_owned)
                .collect();
            if !ledger.messages.has_open() && ledger.used.elapsed() > LEDGER_IDLE {
                idle.push(identity.clone());
            }
            overdue.extend(ids.into_iter().map(|id| (identity.clone(), id)));
        }
        if !idle.is_empty() {
            let mut map = self.ledgers.0.lock().unwrap_or_else(|e| e.into_inner());
            for identity in idle {
                // Not if an op took it up since.
                if map
                    .get(&identity)
                    .is_some_and(|l| Arc::strong_count(l) == 1)
                {
                    map.remove(&identity);
                }
            }
        }
        overdue
    }
}

/// Whether the stream refused a write because another write of its subject was in flight
/// (JetStream's error 10164; async-nats reports it as `Other`).
fn in_flight(e: &async_nats::jetstream::context::PublishError) -> bool {
    std::error::Error::source(e)
        .and_then(|s| s.downcast_ref::<async_nats::jetstream::Error>())
        .is_some_and(|e| e.error_code() == ErrorCode::STREAM_WRONG_LAST_SEQUENCE_CONSTANT)
}

/// Why an op was not stored.
enum Store {
    /// The identity stored something after the ledger's last record.
    Moved,
    Failed(Unavailable),
}

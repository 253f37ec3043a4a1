//! The event log: recent events per identity, so that a client that reconnects with
//! `?since=<seq>` gets what it missed, and the sequence numbers that make that provable.
//!
//! [`EventLog`] is the seam: the publish path appends, resume reads, and neither knows which
//! log runs. [`MemoryLog`] is the embedded one: per identity a bounded history (count, age),
//! all of it bounded in bytes, and the idempotency keys of recent publishes. An identity with
//! no retained event and no live key holds no memory here.
//!
//! **Sequence numbers.** An identity's first event on this node (or its first after all its
//! history was evicted) is numbered with the node's clock in microseconds, and each next
//! event adds one. So `seq` keeps growing across restarts and evictions (as long as one
//! identity publishes fewer than a million events per second, and the clock is not set
//! back), and a `since` from before them lies below what the log knows: the log answers
//! `recovered: false` instead of replaying a partial history as complete.

use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasher, RandomState};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::auth::Identity;
use crate::config::{History, Streams};
use crate::router::Publication;
use crate::sandbox::Event;
use crate::streams::{Applied, Bounds, Fields, Messages, Refusal};

const SHARDS: usize = 64;

/// What appending did.
#[derive(Debug, Clone)]
pub enum Appended {
    /// A new event with this `seq`, now in the log.
    New(Arc<Event>),
    /// The idempotency key was seen within the window, or the message op was applied
    /// before: the original event's `seq`; nothing was appended.
    Duplicate(u64),
    /// A message op that does not fit its message (or a limit): nothing was appended.
    Refused(Refusal),
}

/// What a resume gets.
#[derive(Debug, Clone)]
pub struct Replay {
    /// Every event after `since` the log holds, oldest first (empty when not recovered).
    pub events: Vec<Arc<Event>>,
    /// Whether `events` is provably everything after `since`.
    pub recovered: bool,
    /// Why not, when not recovered.
    pub reason: Option<NotRecovered>,
    /// The oldest `seq` the log still holds for the identity, if any.
    pub earliest: Option<u64>,
    /// The identity's latest `seq` on this node, if any.
    pub head: Option<u64>,
}

/// Why a resume could not be proven complete.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotRecovered {
    /// Events after `since` were evicted (count, age or the log's byte bound).
    Evicted,
    /// `since` is not a position this log numbered: before a restart, from another
    /// deployment, or ahead of the head.
    UnknownPosition,
    /// More events after `since` than `history.max_replay_events`.
    TooMany,
}

impl NotRecovered {
    pub fn as_str(self) -> &'static str {
        match self {
            NotRecovered::Evicted => "evicted",
            NotRecovered::UnknownPosition => "unknown_position",
            NotRecovered::TooMany => "too_many",
        }
    }
}

/// The seam between the publish path and resume on one side and where events are kept on
/// the other.
pub trait EventLog: Send + Sync + std::fmt::Debug {
    /// Numbers the event and keeps it; with an `idempotency_key` seen within the window,
    /// returns the original `seq` instead. Callers that need one order for appends and live
    /// delivery (the router) call this under their own per-identity lock.
    fn append(&self, publication: Publication, idempotency_key: Option<&str>) -> Appended;

    /// Events after `since`, or why they cannot be proven complete.
    fn read(&self, identity: &Identity, since: u64) -> Replay;

    /// Drops what has outlived `history.max_age_secs` and idempotency keys past their window.
    fn expire(&self);

    /// Bytes held (events and keys, with their bookkeeping), for metrics and bounds.
    fn bytes(&self) -> usize;

    /// Events evicted so far: by count, by age, by the byte bound.
    fn evicted(&self) -> [(&'static str, u64); 3];

    /// Messages still streaming `max_open` after their create, to be ended as `failed`.
    fn overdue_messages(&self, max_open: Duration) -> Vec<(Identity, String)>;
}

/// One identity's history and keys.
struct Stream {
    /// The first `seq` this log assigned to the identity: nothing before it is known here.
    base: u64,
    next_seq: u64,
    /// Whether this log can vouch for everything the identity had within the retention
    /// bounds since `base`: false for a stream created soon after the log forgot streams to
    /// stay in its byte bound, or soon after the node started (see [`MemoryLog::forgot`]).
    complete: bool,
    /// The latest `seq` evicted from the history (`base - 1` while none was): a resume from
    /// before it cannot be complete. Entries are not one per `seq` (a message is one entry
    /// at the `seq` of its latest op), so this, not the oldest entry, says what was lost.
    evicted_through: u64,
    /// Oldest first, in `seq` order.
    events: VecDeque<Held>,
    /// The messages among `events`.
    messages: Messages,
    /// Idempotency keys of recent publishes, oldest first for expiry.
    keys: HashMap<String, u64>,
    key_order: VecDeque<(Instant, String)>,
}

impl Stream {
    fn is_empty(&self) -> bool {
        self.events.is_empty() && self.keys.is_empty()
    }

    fn earliest(&self) -> Option<u64> {
        self.events.front().map(|h| h.seq)
    }

    /// An entry as a resume delivers it: a message as one snapshot of its text so far.
    fn replayed(&self, held: &Held) -> Arc<Event> {
        match &held.entry {
            Entry::Event(event) => event.clone(),
            Entry::Message(id) => Arc::new(
                self.messages
                    .get(id)
                    .expect("a message entry has its message")
                    .snapshot(id),
            ),
        }
    }
}

/// One entry of an identity's history.
struct Held {
    /// When it was appended (a message: when it last changed), for `max_age_secs`.
    at: Instant,
    seq: u64,
    entry: Entry,
}

enum Entry {
    Event(Arc<Event>),
    /// A message, at the `seq` of its latest op; its text is in [`Stream::messages`].
    Message(Arc<str>),
}

/// Bytes an event costs, with its bookkeeping: in the log, and in a session's queue.
pub fn event_bytes(event: &Event) -> usize {
    event.payload.len()
        + event.kind.len()
        + event.run_id.as_ref().map_or(0, String::len)
        + event.thread_id.as_ref().map_or(0, String::len)
        + 128
}

/// Bytes an identity's entry costs besides its events and keys.
fn stream_bytes(identity: &Identity) -> usize {
    identity.user.len() + identity.tenant.as_ref().map_or(0, String::len) + 200
}

/// The key an identity's tenant is counted under.
fn tenant_key(identity: &Identity) -> &str {
    identity.tenant.as_deref().unwrap_or("")
}

fn key_bytes(key: &str) -> usize {
    2 * key.len() + 96
}

/// The embedded log: in this process, bounded per identity by count and age, and overall
/// by bytes: events and their streams within `max_bytes`, idempotency keys within a quarter
/// of it on top. Past the byte bound, the oldest event of each identity of the tenant that
/// holds the most bytes goes in turn (so one tenant's publishers evict their own history,
/// not every tenant's); past the key bound, the oldest key of each identity.
/// Each eviction is counted in `evictions`.
pub struct MemoryLog {
    shards: Box<[Mutex<HashMap<Identity, Stream>>]>,
    hasher: RandomState,
    limits: History,
    /// The bounds on messages (`[streams]`, and `limits.max_message_bytes`: a message's
    /// snapshot must fit one frame).
    bounds: Bounds,
    /// Bytes of events and streams.
    bytes: AtomicUsize,
    /// Bytes of idempotency keys.
    key_bytes: AtomicUsize,
    /// Bytes of events per tenant (`""`: identities without one), to evict from the
    /// heaviest first.
    tenant_bytes: Mutex<HashMap<String, usize>>,
    /// The shard the next eviction pass starts in, so that passes go round.
    cursor: AtomicUsize,
    /// At least the last `seq` handed out by any stream dropped so far: a new stream's base
    /// is above it, so no `seq` is ever given twice.
    last_base: AtomicU64,
    /// When the log last forgot a stream to stay within its bytes (at start-up, everything
    /// before is unknown too). A stream created within `max_age_secs` of it cannot vouch for
    /// being complete: its identity may have had events here that are gone with no trace.
    forgot: Mutex<Instant>,
    pub evictions: Evictions,
}

/// Events evicted, by cause.
#[derive(Debug, Default)]
pub struct Evictions {
    pub count: AtomicU64,
    pub age: AtomicU64,
    pub bytes: AtomicU64,
}

impl std::fmt::Debug for MemoryLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryLog")
            .field("bytes", &self.bytes())
            .field("limits", &self.limits)
            .finish()
    }
}

impl MemoryLog {
    pub fn new(limits: History) -> Self {
        MemoryLog {
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
            hasher: RandomState::new(),
            limits,
            bounds: Bounds::default(),
            bytes: AtomicUsize::new(0),
            key_bytes: AtomicUsize::new(0),
            tenant_bytes: Mutex::default(),
            cursor: AtomicUsize::new(0),
            last_base: AtomicU64::new(0),
            forgot: Mutex::new(Instant::now()),
            evictions: Evictions::default(),
        }
    }

    /// The bounds on messages, and the largest frame a client takes (a message's snapshot
    /// must fit one).
    pub fn with_streams(mut self, streams: Streams, frame_limit: usize) -> Self {
        self.bounds = Bounds {
            limits: streams,
            frame_limit,
        };
        self
    }

    fn shard(&self, identity: &Identity) -> &Mutex<HashMap<Identity, Stream>> {
        &self.shards[self.hasher.hash_one(identity) as usize % self.shards.len()]
    }

    /// A new stream's first `seq`: the clock in microseconds, above every `seq` before it.
    fn new_base(&self) -> u64 {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(1, |d| d.as_micros() as u64);
        let last = self
            .last_base
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |last| {
                Some(now.max(last + 1))
            })
            .unwrap_or_else(|last| last);
        now.max(last + 1)
    }

    fn max_key_bytes(&self) -> usize {
        self.limits.max_bytes / 4
    }

    fn events_over(&self) -> bool {
        self.bytes.load(Ordering::Relaxed) > self.limits.max_bytes
    }

    fn keys_over(&self) -> bool {
        self.key_bytes.load(Ordering::Relaxed) > self.max_key_bytes()
    }

    /// Drops the stream's oldest event; whether there was one.
    fn pop_event(&self, identity: &Identity, stream: &mut Stream) -> bool {
        let Some(held) = stream.events.pop_front() else {
            return false;
        };
        stream.evicted_through = held.seq;
        let bytes = match &held.entry {
            Entry::Event(event) => event_bytes(event),
            Entry::Message(id) => stream.messages.remove(id),
        };
        self.release_bytes(identity, bytes);
        true
    }

    /// Uncounts bytes of the identity's events.
    fn release_bytes(&self, identity: &Identity, bytes: usize) {
        self.bytes.fetch_sub(bytes, Ordering::Relaxed);
        let mut tenants = lock(&self.tenant_bytes);
        let tenant = tenant_key(identity);
        if let Some(held) = tenants.get_mut(tenant) {
            *held = held.saturating_sub(bytes);
            if *held == 0 {
                tenants.remove(tenant);
            }
        }
    }

    /// Counts an appended event's bytes.
    fn push_event(&self, identity: &Identity, bytes: usize) {
        self.bytes.fetch_add(bytes, Ordering::Relaxed);
        let mut tenants = lock(&self.tenant_bytes);
        match tenants.get_mut(tenant_key(identity)) {
            Some(held) => *held += bytes,
            None => {
                tenants.insert(tenant_key(identity).to_owned(), bytes);
            }
        }
    }

    /// The tenant whose events hold the most bytes.
    fn heaviest_tenant(&self) -> Option<String> {
        let tenants = lock(&self.tenant_bytes);
        if tenants.len() < 2 {
            return None; // one tenant (or none): every identity is fair game
        }
        tenants
            .iter()
            .max_by_key(|(_, bytes)| **bytes)
            .map(|(tenant, _)| tenant.clone())
    }

    /// Drops the stream's oldest idempotency key; whether there was one.
    fn pop_key(&self, stream: &mut Stream) -> bool {
        let Some((_, key)) = stream.key_order.pop_front() else {
            return false;
        };
        if stream.keys.remove(&key).is_some() {
            self.key_bytes.fetch_sub(key_bytes(&key), Ordering::Relaxed);
        }
        true
    }

    /// Drops expired events and keys of one stream.
    fn expire_stream(&self, identity: &Identity, stream: &mut Stream, now: Instant) {
        let max_age = Duration::from_secs(self.limits.max_age_secs);
        while stream
            .events
            .front()
            .is_some_and(|h| now.duration_since(h.at) >= max_age)
        {
            self.pop_event(identity, stream);
            self.evictions.age.fetch_add(1, Ordering::Relaxed);
        }
        let window = Duration::from_secs(self.limits.idempotency_window_secs);
        while stream
            .key_order
            .front()
            .is_some_and(|(at, _)| now.duration_since(*at) >= window)
        {
            self.pop_key(stream);
        }
    }

    /// Removes a stream that holds nothing, so an identity without history costs nothing;
    /// its last `seq` stays known, so its next stream numbers above it.
    fn remove(&self, shard: &mut HashMap<Identity, Stream>, identity: &Identity) {
        if let Some(stream) = shard.remove(identity) {
            self.last_base.fetch_max(stream.next_seq, Ordering::Relaxed);
            self.bytes
                .fetch_sub(stream_bytes(identity), Ordering::Relaxed);
        }
    }

    /// While the log is over a bound, evicts the oldest event (or key) of each identity in
    /// turn, shard by shard. Streams emptied this way are forgotten, and the log notes when.
    fn enforce_bounds(&self) {
        let mut idle = 0;
        // Events go from the heaviest tenant first; should a whole round over the shards
        // find none of its events to take, from any tenant.
        let mut fair = true;
        while (self.events_over() || self.keys_over()) && idle < SHARDS {
            let heaviest = fair.then(|| self.heaviest_tenant()).flatten();
            let i = self.cursor.fetch_add(1, Ordering::Relaxed) % self.shards.len();
            let mut shard = lock(&self.shards[i]);
            let mut progressed = false;
            let mut emptied = Vec::new();
            for (identity, stream) in shard.iter_mut() {
                let (events, keys) = (self.events_over(), self.keys_over());
                if !events && !keys {
                    break;
                }
                let chosen = heaviest
                    .as_deref()
                    .is_none_or(|tenant| tenant_key(identity) == tenant);
                if events && chosen && self.pop_event(identity, stream) {
                    self.evictions.bytes.fetch_add(1, Ordering::Relaxed);
                    progressed = true;
                }
                if keys && self.pop_key(stream) {
                    progressed = true;
                }
                if stream.is_empty() {
                    emptied.push(identity.clone());
                }
            }
            if !emptied.is_empty() {
                *lock(&self.forgot) = Instant::now();
                for identity in &emptied {
                    self.remove(&mut shard, identity);
                }
                progressed = true;
            }
            idle = if progressed { 0 } else { idle + 1 };
            if idle == SHARDS && fair && heaviest.is_some() {
                fair = false;
                idle = 0;
            }
        }
    }
}

impl EventLog for MemoryLog {
    fn append(&self, publication: Publication, idempotency_key: Option<&str>) -> Appended {
        let now = Instant::now();
        let identity = publication.identity;
        let appended = {
            let mut shard = lock(self.shard(&identity));
            let stream = match shard.get_mut(&identity) {
                Some(stream) => stream,
                None => {
                    let base = self.new_base();
                    let max_age = Duration::from_secs(self.limits.max_age_secs);
                    let complete = now.duration_since(*lock(&self.forgot)) >= max_age;
                    self.bytes
                        .fetch_add(stream_bytes(&identity), Ordering::Relaxed);
                    shard.entry(identity.clone()).or_insert(Stream {
                        base,
                        next_seq: base,
                        complete,
                        evicted_through: base - 1,
                        events: VecDeque::new(),
                        messages: Messages::default(),
                        keys: HashMap::new(),
                        key_order: VecDeque::new(),
                    })
                }
            };
            self.expire_stream(&identity, stream, now);
            if let Some(key) = idempotency_key
                && let Some(&seq) = stream.keys.get(key)
            {
                return Appended::Duplicate(seq);
            }
            let seq = stream.next_seq;
            let event = match &publication.message {
                None => {
                    let event = Arc::new(Event {
                        seq,
                        kind: publication.kind,
                        payload: publication.payload,
                        run_id: publication.run_id,
                        thread_id: publication.thread_id,
                    });
                    self.push_event(&identity, event_bytes(&event));
                    stream.events.push_back(Held {
                        at: now,
                        seq,
                        entry: Entry::Event(event.clone()),
                    });
                    event
                }
                Some(op) => {
                    let mut grew = 0isize;
                    let fields = Fields {
                        kind: &publication.kind,
                        payload: &publication.payload,
                        run_id: publication.run_id.as_deref(),
                        thread_id: publication.thread_id.as_deref(),
                    };
                    let applied =
                        stream
                            .messages
                            .apply(fields, op, seq, now, &self.bounds, &mut grew);
                    let (event, created) = match applied {
                        Ok(Applied::New { event, created }) => (Arc::new(event), created),
                        Ok(Applied::Duplicate(seq)) => return Appended::Duplicate(seq),
                        Err(refusal) => return Appended::Refused(refusal),
                    };
                    let id: Arc<str> = op.id().into();
                    // A message is one entry, at its latest op: moved to the back, from
                    // near it (a message being written changed recently).
                    if !created
                        && let Some(i) = stream
                            .events
                            .iter()
                            .rposition(|h| matches!(&h.entry, Entry::Message(m) if **m == *id))
                    {
                        stream.events.remove(i);
                    }
                    match usize::try_from(grew) {
                        Ok(grew) => self.push_event(&identity, grew),
                        Err(_) => self.release_bytes(&identity, grew.unsigned_abs()),
                    }
                    stream.events.push_back(Held {
                        at: now,
                        seq,
                        entry: Entry::Message(id),
                    });
                    event
                }
            };
            stream.next_seq += 1;
            while stream.events.len() > self.limits.max_events_per_user {
                self.pop_event(&identity, stream);
                self.evictions.count.fetch_add(1, Ordering::Relaxed);
            }
            if let Some(key) = idempotency_key {
                stream.keys.insert(key.to_owned(), seq);
                stream.key_order.push_back((now, key.to_owned()));
                self.key_bytes.fetch_add(key_bytes(key), Ordering::Relaxed);
                while stream.keys.len() > self.limits.idempotency_keys_per_user {
                    self.pop_key(stream);
                }
            }
            Appended::New(event)
        };
        self.enforce_bounds();
        appended
    }

    fn read(&self, identity: &Identity, since: u64) -> Replay {
        let mut shard = lock(self.shard(identity));
        let Some(stream) = shard.get_mut(identity) else {
            // Nothing retained and nothing known: whatever came before is unprovable.
            return Replay {
                events: Vec::new(),
                recovered: false,
                reason: Some(NotRecovered::UnknownPosition),
                earliest: None,
                head: None,
            };
        };
        self.expire_stream(identity, stream, Instant::now());
        let head = stream.next_seq.checked_sub(1).filter(|h| *h >= stream.base);
        let earliest = stream.earliest();
        let not = |reason| Replay {
            events: Vec::new(),
            recovered: false,
            reason: Some(reason),
            earliest,
            head,
        };
        // `since = 0` asks for everything retained: complete when the stream can vouch for
        // its start and nothing it numbered has been evicted.
        if since == 0 {
            if !stream.complete || stream.evicted_through >= stream.base {
                return not(NotRecovered::Evicted);
            }
            if stream.events.len() > self.limits.max_replay_events {
                return not(NotRecovered::TooMany);
            }
            return Replay {
                events: stream.events.iter().map(|h| stream.replayed(h)).collect(),
                recovered: true,
                reason: None,
                earliest,
                head,
            };
        }
        // Positions this log numbered run from `base - 1` (nothing seen yet) to the head.
        if since.saturating_add(1) < stream.base || since >= stream.next_seq {
            return not(NotRecovered::UnknownPosition);
        }
        // Everything after `since` must still be here: nothing after it evicted.
        if since < stream.evicted_through {
            return not(NotRecovered::Evicted);
        }
        let skip = stream.events.partition_point(|h| h.seq <= since);
        if stream.events.len() - skip > self.limits.max_replay_events {
            return not(NotRecovered::TooMany);
        }
        Replay {
            events: stream
                .events
                .iter()
                .skip(skip)
                .map(|h| stream.replayed(h))
                .collect(),
            recovered: true,
            reason: None,
            earliest,
            head,
        }
    }

    fn expire(&self) {
        let now = Instant::now();
        for shard in &self.shards {
            let mut shard = lock(shard);
            let mut empty = Vec::new();
            for (identity, stream) in shard.iter_mut() {
                self.expire_stream(identity, stream, now);
                if stream.is_empty() {
                    empty.push(identity.clone());
                }
            }
            // Emptied by age: nothing retained is lost by forgetting them.
            for identity in empty {
                self.remove(&mut shard, &identity);
            }
        }
    }

    fn bytes(&self) -> usize {
        self.bytes.load(Ordering::Relaxed) + self.key_bytes.load(Ordering::Relaxed)
    }

    fn evicted(&self) -> [(&'static str, u64); 3] {
        let e = &self.evictions;
        [
            ("count", e.count.load(Ordering::Relaxed)),
            ("age", e.age.load(Ordering::Relaxed)),
            ("bytes", e.bytes.load(Ordering::Relaxed)),
        ]
    }

    fn overdue_messages(&self, max_open: Duration) -> Vec<(Identity, String)> {
        let now = Instant::now();
        let mut overdue = Vec::new();
        for shard in &self.shards {
            for (identity, stream) in lock(shard).iter() {
                overdue.extend(
                    stream
                        .messages
                        .overdue(now, max_open)
                        .map(|id| (identity.clone(), id.to_owned())),
                );
            }
        }
        overdue
    }
}

/// Every critical section here leaves the maps consistent, so a poisoned lock is usable.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> History {
        History {
            max_events_per_user: 5,
            max_age_secs: 300,
            max_bytes: 1 << 20,
            max_replay_events: 4,
            idempotency_window_secs: 120,
            idempotency_keys_per_user: 3,
        }
    }

    fn publication(user: &str, n: u64) -> Publication {
        Publication {
            identity: Identity {
                tenant: None,
                user: user.into(),
            },
            kind: "k".into(),
            payload: n.to_string(),
            run_id: None,
            thread_id: None,
            message: None,
        }
    }

    /// A log whose start lies a retention period back, so new streams can vouch for
    /// themselves (a log just started cannot, see `forgot`).
    fn settled(limits: History) -> MemoryLog {
        let log = MemoryLog::new(limits);
        *lock(&log.forgot) = Instant::now()
            .checked_sub(Duration::from_secs(log.limits.max_age_secs + 1))
            .expect("the machine has been up for minutes");
        log
    }

    fn seq(a: Appended) -> u64 {
        match a {
            Appended::New(e) => e.seq,
            Appended::Duplicate(s) => s,
            Appended::Refused(r) => panic!("refused: {r:?}"),
        }
    }

    #[test]
    fn sequences_grow_by_one_from_a_clock_base_and_resume_proves_completeness() {
        let log = settled(limits());
        let alice = publication("alice", 0).identity;
        let first = seq(log.append(publication("alice", 1), None));
        assert!(
            first > 1_700_000_000_000_000,
            "a clock base in microseconds"
        );
        let second = seq(log.append(publication("alice", 2), None));
        assert_eq!(second, first + 1);

        // From before the first event: everything, provably.
        let r = log.read(&alice, first - 1);
        assert!(r.recovered);
        assert_eq!(
            r.events.iter().map(|e| e.seq).collect::<Vec<_>>(),
            [first, second]
        );
        // Up to date: nothing, recovered.
        let r = log.read(&alice, second);
        assert!(r.recovered && r.events.is_empty());
        // A position from before this log (a restart) or ahead of it: not provable.
        assert_eq!(
            log.read(&alice, 5).reason,
            Some(NotRecovered::UnknownPosition)
        );
        // Everything retained, complete since nothing was evicted.
        let r = log.read(&alice, 0);
        assert!(r.recovered);
        assert_eq!(r.events.len(), 2);
        assert_eq!(
            log.read(&alice, second + 1).reason,
            Some(NotRecovered::UnknownPosition)
        );
        let bob = publication("bob", 0).identity;
        assert_eq!(
            log.read(&bob, 0).reason,
            Some(NotRecovered::UnknownPosition)
        );
    }

    #[test]
    fn evicted_and_oversized_replays_are_not_recovered() {
        let log = settled(limits());
        let alice = publication("alice", 0).identity;
        let seqs: Vec<u64> = (0..7)
            .map(|n| seq(log.append(publication("alice", n), None)))
            .collect();
        assert_eq!(log.evictions.count.load(Ordering::Relaxed), 2);
        let r = log.read(&alice, seqs[0]);
        assert_eq!(r.reason, Some(NotRecovered::Evicted));
        assert_eq!(log.read(&alice, 0).reason, Some(NotRecovered::Evicted));
        assert_eq!(r.earliest, Some(seqs[2]));
        assert!(r.events.is_empty(), "never a partial replay");
        // Five retained, four allowed in one replay.
        assert_eq!(
            log.read(&alice, seqs[1]).reason,
            Some(NotRecovered::TooMany)
        );
        let r = log.read(&alice, seqs[2]);
        assert!(r.recovered);
        assert_eq!(r.events.len(), 4);
    }

    #[test]
    fn idempotency_keys_return_the_original_seq_within_bounds() {
        let log = settled(limits());
        let a = seq(log.append(publication("alice", 1), Some("k1")));
        assert!(matches!(
            log.append(publication("alice", 1), Some("k1")),
            Appended::Duplicate(s) if s == a
        ));
        // Keys are per identity.
        assert!(matches!(
            log.append(publication("bob", 1), Some("k1")),
            Appended::New(_)
        ));
        // At most 3 keys kept: the oldest goes first.
        for k in ["k2", "k3", "k4"] {
            log.append(publication("alice", 2), Some(k));
        }
        assert!(matches!(
            log.append(publication("alice", 1), Some("k1")),
            Appended::New(_)
        ));
    }

    #[test]
    fn the_byte_bound_holds_over_a_million_identities_and_empty_streams_are_freed() {
        let mut limits = limits();
        limits.max_bytes = 4 << 20;
        let log = settled(limits);
        for n in 0..1_000_000u64 {
            log.append(publication(&format!("user-{n}"), n), None);
            assert!(log.bytes() <= 4 << 20);
        }
        assert!(log.evictions.bytes.load(Ordering::Relaxed) > 900_000);
        let streams: usize = log.shards.iter().map(|s| lock(s).len()).sum();
        assert!(streams < 20_000, "{streams} streams kept");
        // A stream made after the log forgot others cannot vouch for its start.
        let fresh = publication("newcomer", 0);
        let identity = fresh.identity.clone();
        log.append(fresh, None);
        assert_eq!(log.read(&identity, 0).reason, Some(NotRecovered::Evicted));
    }

    #[test]
    fn a_message_is_one_entry_and_its_bytes_leave_with_it() {
        use crate::streams::{MessageOp, Status};
        let mut l = limits();
        l.max_events_per_user = 2;
        l.max_replay_events = 10;
        let log = settled(l);
        let op = |message| Publication {
            message: Some(message),
            ..publication("alice", 0)
        };
        let alice = publication("alice", 0).identity;
        let empty = log.bytes();
        let created = seq(log.append(
            op(MessageOp::Create {
                id: "m".into(),
                text: "a".into(),
                frame_base: 0,
            }),
            None,
        ));
        for index in 1..=100 {
            log.append(
                op(MessageOp::Append {
                    id: "m".into(),
                    index,
                    text: "b".into(),
                }),
                None,
            );
        }
        let ended = seq(log.append(
            op(MessageOp::End {
                id: "m".into(),
                status: Status::Complete,
            }),
            None,
        ));
        let r = log.read(&alice, created - 1);
        assert!(r.recovered);
        assert_eq!(r.events.len(), 1, "102 ops, one entry");
        assert_eq!(r.events[0].seq, ended);
        assert!(
            r.events[0]
                .payload
                .contains(&format!("\"a{}\"", "b".repeat(100)))
        );
        // Two plain events evict it (the limit is 2 entries): whole, bytes and all.
        let first = seq(log.append(publication("alice", 1), None));
        log.append(publication("alice", 2), None);
        let r = log.read(&alice, created - 1);
        assert_eq!(r.reason, Some(NotRecovered::Evicted));
        let r = log.read(&alice, first - 1);
        assert!(r.recovered && r.events.len() == 2);
        let plain = 2 * event_bytes(&r.events[0]) + stream_bytes(&alice);
        assert_eq!(
            log.bytes() - empty,
            plain,
            "nothing of the message is still counted"
        );
    }

    #[test]
    fn one_tenant_flooding_the_byte_bound_evicts_its_own_history_only() {
        let mut limits = limits();
        limits.max_bytes = 256 << 10;
        let log = settled(limits);
        let in_tenant = |tenant: &str, user: &str, n: u64| Publication {
            identity: Identity {
                tenant: Some(tenant.into()),
                user: user.into(),
            },
            ..publication(user, n)
        };
        let mut quiet = Vec::new();
        for n in 0..20 {
            for _ in 0..3 {
                let p = in_tenant("quiet", &format!("user-{n}"), n);
                quiet.push(p.identity.clone());
                log.append(p, None);
            }
        }
        // The other tenant publishes to ever new users, far past the byte bound.
        for n in 0..50_000u64 {
            log.append(in_tenant("flood", &format!("user-{n}"), n), None);
            assert!(log.bytes() <= 256 << 10);
        }
        assert!(log.evictions.bytes.load(Ordering::Relaxed) > 40_000);
        for identity in &quiet {
            let replay = log.read(identity, 0);
            assert!(
                replay.recovered,
                "{identity:?} lost history: {:?}",
                replay.reason
            );
            assert_eq!(replay.events.len(), 3);
        }
    }

    #[test]
    fn a_new_log_cannot_vouch_for_history_before_it() {
        let log = MemoryLog::new(limits());
        let alice = publication("alice", 0).identity;
        let s = seq(log.append(publication("alice", 1), None));
        assert!(
            !log.read(&alice, 0).recovered,
            "events before a restart may be gone"
        );
        assert!(
            log.read(&alice, s - 1).recovered,
            "positions it numbered are fine"
        );
    }

    #[test]
    fn idempotency_keys_never_crowd_out_events() {
        let mut limits = limits();
        limits.max_bytes = 64 << 10;
        limits.idempotency_keys_per_user = 1_000_000;
        let log = settled(limits);
        let alice = publication("alice", 0).identity;
        let mut last = 0;
        for n in 0..20_000u64 {
            last = seq(log.append(publication("alice", n), Some(&format!("key-{n}"))));
        }
        assert!(log.key_bytes.load(Ordering::Relaxed) <= (64 << 10) / 4);
        assert!(log.bytes.load(Ordering::Relaxed) <= 64 << 10);
        let r = log.read(&alice, last - 3);
        assert!(r.recovered, "{r:?}");
        assert_eq!(r.events.len(), 3);
        // The newest keys are still remembered.
        assert!(matches!(
            log.append(publication("alice", 0), Some("key-19999")),
            Appended::Duplicate(s) if s == last
        ));
    }

    #[test]
    fn a_forgotten_stream_never_numbers_a_seq_twice() {
        let mut limits = limits();
        limits.max_bytes = 2048;
        let log = settled(limits);
        let alice = publication("alice", 0).identity;
        // Far more than one event per microsecond: the head runs ahead of the clock.
        let mut head = 0;
        for n in 0..5 {
            head = seq(log.append(publication("alice", n), None));
        }
        // Others push alice's stream out of the byte bound entirely.
        for n in 0..200 {
            log.append(publication(&format!("other-{n}"), n), None);
        }
        assert!(
            lock(log.shard(&alice)).get(&alice).is_none(),
            "alice forgotten"
        );
        let next = seq(log.append(publication("alice", 9), None));
        assert!(next > head, "{next} after {head}");
        assert_eq!(
            log.read(&alice, head).reason,
            Some(NotRecovered::UnknownPosition)
        );
    }
}

//! Live feeds: while a node holds sessions of an identity, its feed hands the identity's
//! events, in stream order and each once, to the router.
//!
//! The stream republishes each stored event to `<prefix>.live.<shard>.<identity>` with its
//! sequence and the sequence of the identity's previous event (`Nats-Last-Sequence`). A node
//! does not subscribe per identity: each stream has one subscription (`<prefix>.live.<shard>.>`)
//! and one task, its [`Line`], which keeps per identity only where its feed stands (a few
//! hundred bytes: no task, no channel, no NATS subscription) and hands on none of the events
//! of identities it holds no sessions of (it keeps every identity's a while for resumes, see
//! `recent.rs`). From the previous-event sequence a feed sees any
//! gap and has it read from the stream before going on: after a NATS reconnect, a slow
//! subscription, or while the subscription propagates through a NATS cluster. Reads (a new
//! feed's head, a gap, what was left in the stream while the node's backlog was full) run
//! as short tasks, a few at a time; while one runs, the feed's live events are let go, since
//! the read reaches them.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use futures_util::{FutureExt as _, StreamExt};
use tokio::sync::{Notify, mpsc};
use tokio::task::JoinSet;
use tokio::time::Instant;

use super::recent::Recent;
use super::{Cluster, Unavailable, decode, identity_tokens, now_micros, number_header};
use crate::auth::Identity;
use crate::metrics::Metrics;
use crate::router::{Delivery, Router};
use crate::sandbox::Event;

/// Most events one request fetches to fill a gap.
const FILL_BATCH: u64 = 256;

/// When the stream's identities are looked at again after the subscription was (re)made:
/// in a NATS cluster it reaches the stream's server a moment later, and an event stored
/// meanwhile is not republished to it. One look at each head finds it even if no later
/// event comes to reveal the gap.
const RECHECK_AFTER: Duration = Duration::from_millis(500);

/// When a read that NATS did not answer is tried again.
const RETRY_AFTER: Duration = Duration::from_secs(1);

/// Reads one stream's line runs at once. Catch-ups also take one of the node's
/// `catch_ups`; a new feed's read does not, as its sessions wait for it to be welcomed.
const MAX_READS: usize = 512;

/// The router's handle on a feed: dropping it ends the feed.
#[derive(Debug)]
pub struct Feed {
    pub generation: u64,
    /// Set once the identity's head is known: events stored from then on reach the
    /// identity's sessions here.
    pub ready: Arc<Ready>,
    _close: Close,
}

/// Whether a feed has read its identity's head, for the sessions waiting to be welcomed.
/// (A `watch` channel would do, at about six times the size per identity.)
#[derive(Debug, Default)]
pub struct Ready {
    /// [`Ready::PENDING`], [`Ready::READY`] or [`Ready::ENDED`].
    state: AtomicU8,
    changed: Notify,
}

impl Ready {
    const PENDING: u8 = 0;
    const READY: u8 = 1;
    /// The feed ended before it was ready: its sessions are closed.
    const ENDED: u8 = 2;

    fn settle(&self, state: u8) {
        if self
            .state
            .compare_exchange(Self::PENDING, state, Ordering::Release, Ordering::Relaxed)
            .is_ok()
        {
            self.changed.notify_waiters();
        }
    }

    /// Waits until the feed is ready (true) or ended (false).
    pub async fn wait(&self) -> bool {
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            match self.state.load(Ordering::Acquire) {
                Self::PENDING => changed.await,
                state => return state == Self::READY,
            }
        }
    }
}

/// Tells the line that the feed is no longer wanted.
#[derive(Debug)]
struct Close {
    line: mpsc::UnboundedSender<Command>,
    key: Arc<str>,
    generation: u64,
}

impl Drop for Close {
    fn drop(&mut self) {
        let _ = self.line.send(Command::Close {
            key: self.key.clone(),
            generation: self.generation,
        });
    }
}

/// What the router asks of a line. Sent, never awaited: the router asks under its own
/// locks, and the line calls into the router.
#[derive(Debug)]
pub(super) enum Command {
    Open {
        key: Arc<str>,
        identity: Identity,
        generation: u64,
        ready: Arc<Ready>,
        router: Weak<Router>,
    },
    Close {
        key: Arc<str>,
        generation: u64,
    },
}

/// How the router reaches a stream's line.
pub(super) type LineSender = mpsc::UnboundedSender<Command>;

/// Where a feed stands: the last `seq` handed to the router.
#[derive(Debug, Clone, Copy)]
struct Position {
    /// An event of the identity (`anchored`); before the first, the stream's last sequence
    /// when the feed started, which every later event of the identity is past.
    delivered: u64,
    anchored: bool,
}

/// Why a read stopped.
enum Lost {
    /// The router no longer wants this feed.
    Stopped,
    Nats(Unavailable),
    /// Events after the position were removed from the stream (its count, age or byte
    /// limits) before this feed read them: its sessions must resume and be told.
    Evicted,
}

impl From<Unavailable> for Lost {
    fn from(e: Unavailable) -> Self {
        Lost::Nats(e)
    }
}

/// What a feed is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Handing on live events as they arrive.
    Live,
    /// Waiting for a read to start.
    Queued,
    /// A read runs: live events are let go, the read reaches them.
    Reading,
    /// This node's backlog was at its bound: the rest waits in the stream for room.
    Behind,
    /// NATS did not answer a read: tried again shortly.
    Waiting,
}

/// One identity's feed, as its line keeps it.
#[derive(Debug)]
struct Followed {
    identity: Identity,
    generation: u64,
    ready: Arc<Ready>,
    /// `None` until the first read found the identity's head.
    position: Option<Position>,
    phase: Phase,
    /// The newest live `seq` let go while not live: the next read goes at least that far.
    seen: u64,
    /// The next read must learn the head: events may have been missed without a trace (a
    /// new feed, a reconnect, a subscription propagating).
    head: bool,
}

impl Drop for Followed {
    fn drop(&mut self) {
        self.ready.settle(Ready::ENDED);
    }
}

/// A finished read.
struct Read {
    key: Arc<str>,
    generation: u64,
    position: Option<Position>,
    /// How far it was to read: the head it read, or the newest live event seen.
    to: u64,
    /// `Ok(false)`: stopped at this node's backlog bound.
    outcome: Result<bool, Lost>,
}

impl Cluster {
    /// Starts the feed of an identity that just got its first session on this node. Never
    /// waits: called under the router's lock.
    pub fn open_feed(
        self: &Arc<Self>,
        identity: &Identity,
        generation: u64,
        router: Weak<Router>,
    ) -> Feed {
        let lines = self.lines.get_or_init(|| {
            (0..self.streams.len())
                .map(|shard| {
                    let (tx, rx) = mpsc::unbounded_channel();
                    // Without tokio's cooperative budget: a line yields only when it has
                    // nothing to do. Budgeted, it would go to the back of the run queue
                    // every 128 messages, behind thousands of sessions, and one task that
                    // routes a whole stream's events would fall behind what they get.
                    tokio::spawn(tokio::task::unconstrained(Line::new(self, shard).run(rx)));
                    tx
                })
                .collect()
        });
        let line = lines[self.shard(identity)].clone();
        let key: Arc<str> = identity_tokens(identity).into();
        let ready = Arc::new(Ready::default());
        let sent = line.send(Command::Open {
            key: key.clone(),
            identity: identity.clone(),
            generation,
            ready: ready.clone(),
            router,
        });
        if sent.is_err() {
            // The line ended (its client closed): the sessions are told at once.
            ready.settle(Ready::ENDED);
        }
        Feed {
            generation,
            ready,
            _close: Close {
                line,
                key,
                generation,
            },
        }
    }
}

/// One stream's live subscription and the feeds of the identities it carries.
struct Line {
    cluster: Weak<Cluster>,
    shard: usize,
    /// The live subject up to the identity's tokens.
    subject_head: String,
    /// Every identity's live events are kept here a while, for resumes.
    recent: Arc<Recent>,
    feeds: HashMap<Arc<str>, Followed>,
    queued: VecDeque<Arc<str>>,
    behind: Vec<Arc<str>>,
    waiting: Vec<Arc<str>>,
    reads: JoinSet<Read>,
    router: Weak<Router>,
    metrics: Arc<Metrics>,
}

impl Line {
    fn new(cluster: &Arc<Cluster>, shard: usize) -> Self {
        Line {
            cluster: Arc::downgrade(cluster),
            shard,
            subject_head: format!("{}.live.{shard}.", cluster.prefix),
            recent: cluster.recent.clone(),
            metrics: cluster.metrics.clone(),
            feeds: HashMap::new(),
            queued: VecDeque::new(),
            behind: Vec::new(),
            waiting: Vec::new(),
            reads: JoinSet::new(),
            router: Weak::new(),
        }
    }

    async fn run(mut self, mut commands: mpsc::UnboundedReceiver<Command>) {
        let Some(cluster) = self.cluster.upgrade() else {
            return;
        };
        let subject = format!("{}>", self.subject_head);
        // async-nats makes the subscription again on every reconnection; it ends only
        // with the client.
        let mut subscription = match cluster.feeds.subscribe(subject).await {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(error = %e, shard = self.shard, "cannot subscribe to the stream's live events; this node's sessions get none");
                return;
            }
        };
        // The server has the subscription once it answers a ping sent after it; if NATS is
        // away now, the reconnection's catch-up covers it.
        let _ = tokio::time::timeout(cluster.request_timeout, cluster.feeds.flush()).await;
        let mut epoch = cluster.link.epoch.subscribe();
        epoch.mark_unchanged();
        drop(cluster);
        let recheck = tokio::time::sleep(RECHECK_AFTER);
        tokio::pin!(recheck);
        let mut rechecking = true;
        let retry = tokio::time::sleep(Duration::ZERO);
        tokio::pin!(retry);
        loop {
            self.start_reads();
            let router = self.router.clone();
            tokio::select! {
                command = commands.recv() => match command {
                    Some(command) => self.command(command),
                    None => return,
                },
                message = subscription.next() => match message {
                    Some(message) => self.take(&message),
                    None => {
                        tracing::error!(shard = self.shard, "the live subscription ended; this node's sessions get no more events");
                        return;
                    }
                },
                Some(done) = self.reads.join_next(), if !self.reads.is_empty() => match done {
                    Ok(read) => {
                        if self.finish(read) {
                            retry.as_mut().reset(Instant::now() + RETRY_AFTER);
                        }
                    }
                    Err(e) => tracing::error!(error = %e, "a feed's read failed"),
                },
                changed = epoch.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    // Reconnected, or the subscription overflowed: whatever was missed is
                    // in the stream. Once more when the subscription has propagated.
                    self.recent.clear(self.shard);
                    self.everyone();
                    recheck.as_mut().reset(Instant::now() + RECHECK_AFTER);
                    rechecking = true;
                }
                () = &mut recheck, if rechecking => {
                    rechecking = false;
                    self.everyone();
                }
                () = room(&router), if !self.behind.is_empty() => {
                    // The node's backlog fell to half its bound: read what was left in the
                    // stream.
                    for key in std::mem::take(&mut self.behind) {
                        self.requeue(&key, Phase::Behind);
                    }
                }
                () = &mut retry, if !self.waiting.is_empty() => {
                    for key in std::mem::take(&mut self.waiting) {
                        self.requeue(&key, Phase::Waiting);
                    }
                }
            }
        }
    }

    fn command(&mut self, command: Command) {
        match command {
            Command::Open {
                key,
                identity,
                generation,
                ready,
                router,
            } => {
                self.router = router;
                let followed = Followed {
                    identity,
                    generation,
                    ready,
                    position: None,
                    phase: Phase::Queued,
                    seen: 0,
                    head: true,
                };
                if self.feeds.insert(key.clone(), followed).is_none() {
                    self.metrics.cluster_feeds.inc();
                }
                self.queued.push_back(key);
            }
            Command::Close { key, generation } => {
                if self
                    .feeds
                    .get(&key)
                    .is_some_and(|f| f.generation == generation)
                {
                    self.feeds.remove(&key);
                    self.metrics.cluster_feeds.dec();
                }
            }
        }
    }

    /// A live event: handed on if its feed is live and nothing before it is missing.
    fn take(&mut self, message: &async_nats::Message) {
        let Some(key) = message.subject.as_str().strip_prefix(&self.subject_head) else {
            return;
        };
        let header = |name: &str| number_header(message, name);
        let (seq, previous) = (header("Nats-Sequence"), header("Nats-Last-Sequence"));
        // An identity's subject has two tokens; a barrier's, one.
        if let (Some(seq), Some(previous)) = (seq, previous)
            && key.contains('.')
        {
            self.recent
                .keep(self.shard, key, seq, previous, &message.payload);
        }
        // Another node's identity: dropped.
        let Some(feed) = self.feeds.get_mut(key) else {
            return;
        };
        let Some(seq) = seq else {
            tracing::warn!("live message without a stream sequence; ignored");
            return;
        };
        let (Phase::Live, Some(position)) = (feed.phase, feed.position.as_mut()) else {
            // A read runs or waits: it goes at least this far.
            feed.seen = feed.seen.max(seq);
            return;
        };
        if seq <= position.delivered {
            return;
        }
        let next = if previous.is_some_and(|p| p > position.delivered) {
            // A gap: read from the stream through this event.
            Phase::Queued
        } else {
            let Some((event, at)) = decode(seq, &message.payload) else {
                position.delivered = seq;
                position.anchored = true;
                return;
            };
            let Some(router) = self.router.upgrade() else {
                return;
            };
            match router.deliver(&feed.identity, feed.generation, Arc::new(event)) {
                Delivery::Queued => {
                    position.delivered = seq;
                    // Only now: a position left where it was must stay unanchored, or
                    // the read from there would take it for an evicted event.
                    position.anchored = true;
                    if at > 0 {
                        let lag = now_micros().saturating_sub(at) as f64 / 1e6;
                        self.metrics.cluster_lag_seconds.observe(lag);
                    }
                    return;
                }
                // Left in the stream; read from there when there is room.
                Delivery::Full => Phase::Behind,
                // The router dropped this feed; its close is on the way.
                Delivery::Gone => return,
            }
        };
        feed.seen = seq;
        feed.phase = next;
        let key = self.feeds.get_key_value(key).expect("just found").0.clone();
        if next == Phase::Behind {
            self.behind.push(key);
            self.metrics.cluster_feed_pauses.inc();
        } else {
            self.queued.push_back(key);
        }
    }

    /// Every feed reads its head again.
    fn everyone(&mut self) {
        for (key, feed) in &mut self.feeds {
            feed.head = true;
            if matches!(feed.phase, Phase::Live | Phase::Behind | Phase::Waiting) {
                feed.phase = Phase::Queued;
                self.queued.push_back(key.clone());
            }
        }
    }

    /// Queues a read for a feed still in `from` (a key listed earlier may since have been
    /// closed, opened again or queued).
    fn requeue(&mut self, key: &Arc<str>, from: Phase) {
        if let Some(feed) = self.feeds.get_mut(key)
            && feed.phase == from
        {
            feed.phase = Phase::Queued;
            self.queued.push_back(key.clone());
        }
    }

    /// Starts queued reads, up to [`MAX_READS`] at once, while the node has room for what
    /// they read.
    fn start_reads(&mut self) {
        let Some(cluster) = self.cluster.upgrade() else {
            return;
        };
        while self.reads.len() < MAX_READS {
            let Some(key) = self.queued.pop_front() else {
                return;
            };
            let Some(feed) = self.feeds.get_mut(&key) else {
                continue;
            };
            if feed.phase != Phase::Queued {
                continue;
            }
            if self.router.upgrade().is_some_and(|r| r.full()) && feed.position.is_some() {
                feed.phase = Phase::Behind;
                self.behind.push(key);
                continue;
            }
            feed.phase = Phase::Reading;
            let head = std::mem::take(&mut feed.head);
            let (generation, seen) = (feed.generation, feed.seen);
            let read = catch_up(
                cluster.clone(),
                key.clone(),
                feed.identity.clone(),
                generation,
                self.router.clone(),
                feed.position,
                seen,
                head,
            );
            // A read that panicked is tried again like one NATS did not answer, rather
            // than leaving its feed reading forever.
            self.reads.spawn(async move {
                std::panic::AssertUnwindSafe(read)
                    .catch_unwind()
                    .await
                    .unwrap_or_else(|_| Read {
                        key,
                        generation,
                        position: None,
                        to: seen,
                        outcome: Err(Lost::Nats(Unavailable("a feed's read panicked".into()))),
                    })
            });
        }
    }

    /// A read ended; true when a read must be tried again later.
    fn finish(&mut self, read: Read) -> bool {
        let Some(feed) = self
            .feeds
            .get_mut(&read.key)
            .filter(|f| f.generation == read.generation)
        else {
            return false;
        };
        if read.position.is_some() {
            feed.position = read.position;
        }
        // The head is known: what is stored from now on reaches the sessions, if later.
        if feed.position.is_some() && matches!(read.outcome, Ok(_) | Err(Lost::Nats(_))) {
            feed.ready.settle(Ready::READY);
        }
        match read.outcome {
            Ok(caught_up) => {
                if !caught_up {
                    // What it did not reach waits for room, and is read then.
                    feed.seen = feed.seen.max(read.to);
                    feed.phase = Phase::Behind;
                    self.behind.push(read.key);
                } else if feed.head || feed.seen > read.to {
                    // Live events past what it read came meanwhile, or NATS reconnected.
                    feed.phase = Phase::Queued;
                    self.queued.push_back(read.key);
                } else {
                    feed.phase = Phase::Live;
                }
                false
            }
            // The router dropped this feed; its close is on the way.
            Err(Lost::Stopped) => {
                feed.phase = Phase::Live;
                false
            }
            Err(Lost::Nats(e)) => {
                tracing::debug!(error = %e, "a feed's read was not answered; trying again");
                feed.head = true;
                feed.phase = Phase::Waiting;
                self.waiting.push(read.key);
                self.waiting.len() == 1
            }
            Err(Lost::Evicted) => {
                // Its sessions close with 1013; a client that resumes learns
                // `recovered:false`. The router drops this feed with them.
                let (identity, generation) = (feed.identity.clone(), feed.generation);
                self.feeds.remove(&read.key);
                self.metrics.cluster_feeds.dec();
                if let Some(router) = self.router.upgrade() {
                    let sessions = router.interrupt(&identity, generation);
                    tracing::warn!(
                        sessions,
                        "events were removed from the stream before this node's feed \
                         read them; its sessions close with 1013 and resume"
                    );
                }
                false
            }
        }
    }
}

/// Waits until the node's backlog has room again (half of `limits.max_queued_bytes`).
async fn room(router: &Weak<Router>) {
    match router.upgrade() {
        Some(router) => router.room().await,
        None => std::future::pending().await,
    }
}

/// One read of a feed: the identity's head when `head` (or the feed is new), then its
/// stored events after the position, through the head and `seen`.
#[allow(clippy::too_many_arguments)]
async fn catch_up(
    cluster: Arc<Cluster>,
    key: Arc<str>,
    identity: Identity,
    generation: u64,
    router: Weak<Router>,
    mut position: Option<Position>,
    seen: u64,
    head: bool,
) -> Read {
    let mut to = seen;
    let outcome = async {
        // A new feed's read is its sessions' welcome, and mostly one head: not queued
        // behind catch-ups (a connect storm opens thousands at once).
        let _permit = match position {
            Some(_) => Some(cluster.catch_ups.acquire().await),
            None => None,
        };
        if head || position.is_none() {
            let head = cluster.head_of(&identity).await?;
            to = to.max(head);
            if position.is_none() {
                // A new feed starts at the identity's head: sessions get what is stored
                // from now on (a resuming one reads the stream itself). With no event of
                // the identity yet, every later one is past the stream's end now.
                position = Some(match head {
                    0 => Position {
                        delivered: cluster.last_seq(&identity).await?,
                        anchored: false,
                    },
                    head => Position {
                        delivered: head,
                        anchored: true,
                    },
                });
            }
        }
        let position = position.as_mut().expect("set above");
        // Queues an event to the identity's sessions here: `Ok(false)` when this node's
        // backlog is at `limits.max_queued_bytes` and it stays in the stream.
        let deliver = |event: Event| -> Result<bool, Lost> {
            let router = router.upgrade().ok_or(Lost::Stopped)?;
            match router.deliver(&identity, generation, Arc::new(event)) {
                Delivery::Queued => Ok(true),
                Delivery::Full => {
                    cluster.metrics.cluster_feed_pauses.inc();
                    Ok(false)
                }
                Delivery::Gone => Err(Lost::Stopped),
            }
        };
        let full = || router.upgrade().is_some_and(|r| r.full());
        cluster.fill(&identity, position, to, &deliver, &full).await
    }
    .await;
    Read {
        key,
        generation,
        position,
        to,
        outcome,
    }
}

impl Cluster {
    /// Hands on the identity's stored events after `position` up to `to` (a sequence the
    /// stream's leader gave), in order: all of them, even when a replica that lags answers
    /// the read. When some of them are no longer stored, nothing is handed on and the
    /// sessions must be told ([`Lost::Evicted`]): JetStream removes an identity's oldest
    /// events first, so the event at the position, still stored, proves that everything
    /// after it is too.
    ///
    /// `Ok(false)` when it stopped short because this node's backlog reached
    /// `limits.max_queued_bytes` (`full`, or `deliver` answering false): the rest stays in
    /// the stream, and the position where the sessions are.
    async fn fill(
        &self,
        identity: &Identity,
        position: &mut Position,
        to: u64,
        deliver: &impl Fn(Event) -> Result<bool, Lost>,
        full: &impl Fn() -> bool,
    ) -> Result<bool, Lost> {
        while position.delivered < to {
            if full() {
                return Ok(false);
            }
            let anchored = position.anchored;
            let from = position.delivered + u64::from(!anchored);
            let want = (to - position.delivered).min(FILL_BATCH) as usize + usize::from(anchored);
            let mut batch = self
                .batch_through(identity, from, to, want, anchored)
                .await?;
            if anchored {
                if batch
                    .first()
                    .is_none_or(|(seq, _)| *seq != position.delivered)
                {
                    return Err(Lost::Evicted);
                }
                batch.remove(0);
            } else if !batch.is_empty() && !self.nothing_removed_after(identity, from).await? {
                return Err(Lost::Evicted);
            }
            if batch.is_empty() {
                break;
            }
            for (seq, event) in batch {
                if seq > to {
                    return Ok(true);
                }
                if let Some(record) = event {
                    if !deliver(record.event)? {
                        return Ok(false);
                    }
                    self.metrics.cluster_gap_events.inc();
                }
                position.delivered = seq;
                position.anchored = true;
            }
        }
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn ready_wakes_its_waiters_once_and_an_ended_feed_answers_false() {
        let ready = Arc::new(Ready::default());
        let waiter = tokio::spawn({
            let ready = ready.clone();
            async move { ready.wait().await }
        });
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        ready.settle(Ready::READY);
        assert!(waiter.await.unwrap());
        // Settled once: a feed dropped after it was ready does not take it back.
        ready.settle(Ready::ENDED);
        assert!(ready.wait().await);

        let ended = Ready::default();
        ended.settle(Ready::ENDED);
        assert!(!ended.wait().await);
    }
}

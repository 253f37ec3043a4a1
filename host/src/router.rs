//! Routes published events to the live sessions of one identity (tenant and user, from the
//! verified token), and by nothing else.
//!
//! The router holds, per identity with live sessions, the event queue of each of them; never
//! any handler state, and nothing for an identity without sessions (sequence numbers and
//! history are the [`EventLog`]'s). Identities are spread over shards so publishes for
//! different users rarely contend. Appending to the log and queueing happen under the
//! identity's shard lock, so every session sees its identity's events in `seq` order, and a
//! session that registers and then reads the log (resume) misses nothing in between.
//!
//! In cluster mode the log is the JetStream stream and publishes do not come here: each
//! identity with sessions has one feed ([`crate::cluster::feed`]), which hands the stream's
//! events to [`Router::deliver`] in `seq` order; a session that registers and then reads the
//! stream skips the events its replay already covered.

use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasher, RandomState};
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::task::AtomicWaker;

use tokio::sync::Notify;

use crate::auth::Identity;
use crate::cluster::Cluster;
use crate::cluster::feed::{Feed, Ready};
use crate::config::Limits;
use crate::event_log::{Appended, EventLog, event_bytes};
use crate::metrics::Metrics;
use crate::pacing::{Pacing, QueueClock, Stamp};
use crate::sandbox::Event;
use crate::streams::{MessageOp, Refusal};

const SHARDS: usize = 64;

/// An event in a session's queue, with when the router queued it and how busy its session
/// had been by then: how long it waited for the node is the node's queue delay.
type Queued = (Arc<Event>, Stamp);

/// An event as published, before it has a sequence number.
#[derive(Debug, Clone)]
pub struct Publication {
    /// Whose connections get it: the publish request's `tenant_id` and `user_id`.
    pub identity: Identity,
    pub kind: String,
    /// JSON text.
    pub payload: String,
    pub run_id: Option<String>,
    pub thread_id: Option<String>,
    /// An op on one of the identity's messages (AI output streams), when it is one.
    pub message: Option<MessageOp>,
}

/// What a publish did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Receipt {
    pub seq: u64,
    /// Live sessions of the user the event was queued to.
    pub sessions: usize,
    /// The idempotency key was seen within its window: `seq` is the original event's and
    /// nothing was queued.
    pub duplicate: bool,
}

struct Route {
    connection_id: Arc<str>,
    /// The token session (`sid`) the connection was opened with, for a disconnect of one.
    sid: Option<Box<str>>,
    queue: Arc<QueueState>,
}

/// What the router and a session share: the queue itself, and plain atomics the session
/// looks at for every event.
#[derive(Default)]
struct QueueState {
    /// The events, oldest first, at most `limits.event_queue`. A plain lock: the router
    /// pushes and the session takes, each for a moment. A tokio channel here cost every
    /// session, idle or hibernated, 1.1 KiB (a block of 32 slots and the channel's own
    /// state); this one keeps what a burst left only until the session shrinks it (after a
    /// turn that emptied it, and when it parks).
    events: Mutex<VecDeque<Queued>>,
    /// The session's task while it waits for an event or the closing.
    waker: AtomicWaker,
    /// Bytes of events queued and not yet taken by the session.
    bytes: AtomicUsize,
    /// Why the router closed this queue ([`Closed`] as a number), or 0 while it is open.
    closed: AtomicU8,
    /// The operator's words for a disconnect, set before the queue closes.
    disconnect_reason: std::sync::OnceLock<Box<str>>,
    clock: QueueClock,
}

/// Why the router stopped routing to a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Closed {
    /// The session's queue overflowed: it is a slow client.
    Overflow = 1,
    /// The gateway is shutting down.
    Shutdown = 2,
    /// An operator disconnected the session (`POST /v1/disconnect`).
    Disconnected = 3,
    /// Cluster mode: events of the identity were removed from the stream before its feed
    /// here read them; the client resumes (1013) and is told `recovered:false`.
    Behind = 4,
}

impl QueueState {
    fn close(&self, why: Closed) {
        // The first reason wins: a slow client stays a slow client during shutdown.
        let _ = self
            .closed
            .compare_exchange(0, why as u8, Ordering::Release, Ordering::Relaxed);
        self.waker.wake();
    }

    /// Queues an event for the session, unless `capacity` are waiting already.
    fn push(&self, queued: Queued, capacity: usize) -> bool {
        let mut events = lock(&self.events);
        if events.len() >= capacity {
            return false;
        }
        events.push_back(queued);
        drop(events);
        self.waker.wake();
        true
    }

    fn pop(&self) -> Option<Queued> {
        lock(&self.events).pop_front()
    }

    fn closed(&self) -> Option<Closed> {
        match self.closed.load(Ordering::Acquire) {
            0 => None,
            1 => Some(Closed::Overflow),
            3 => Some(Closed::Disconnected),
            4 => Some(Closed::Behind),
            _ => Some(Closed::Shutdown),
        }
    }
}

impl crate::pacing::Probed for QueueState {
    fn clock(&self) -> &QueueClock {
        &self.clock
    }

    fn open(&self) -> bool {
        self.closed().is_none()
    }
}

/// What [`Router::deliver`] did with a feed's event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    /// Queued to the identity's sessions here.
    Queued,
    /// Not queued: the node's backlog is at `limits.max_queued_bytes`.
    Full,
    /// Not queued: the feed is no longer wanted (no sessions left, or a newer feed took
    /// over).
    Gone,
}

/// Why a session could not be registered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error("user already has {0} live connections")]
    UserLimit(usize),
    #[error("the gateway is shutting down")]
    ShuttingDown,
}

#[derive(Default)]
struct UserRoutes {
    sessions: Vec<Route>,
    /// Cluster mode: the subscription bringing this identity's events to this node, held
    /// while it has sessions here.
    feed: Option<Feed>,
}

pub struct Router {
    shards: Box<[Mutex<HashMap<Identity, UserRoutes>>]>,
    hasher: RandomState,
    metrics: Arc<Metrics>,
    per_user: usize,
    queue_events: usize,
    queue_bytes: usize,
    shut_down: AtomicBool,
    log: Arc<dyn EventLog>,
    /// Bytes of events queued to all sessions and not yet taken: the node's backlog.
    queued: AtomicUsize,
    /// `limits.max_queued_bytes`: in cluster mode, feeds queue nothing more while the
    /// backlog is at it (see [`Router::deliver`]).
    max_queued: usize,
    /// Woken when the backlog falls to half of `max_queued`: feeds that stopped at the
    /// bound catch up from the stream.
    room: Notify,
    /// Cluster mode: events come from the stream through per-identity feeds instead of
    /// from [`Router::publish`].
    cluster: OnceLock<Arc<Cluster>>,
    /// The node's queue delay, and publishers held to it.
    pacing: Pacing,
    /// Numbers feeds, so a feed that outlived its identity's routes cannot deliver to
    /// sessions registered after it.
    feeds_opened: AtomicU64,
    /// Told when an identity's first session opens and its last one closes (`[webhooks]`).
    presence: OnceLock<Arc<crate::presence::Webhooks>>,
    /// Cluster mode: told every change of an identity's sessions here, for presence across
    /// the cluster (which then decides the webhooks itself).
    cluster_presence: OnceLock<Arc<crate::cluster::presence::ClusterPresence>>,
}

impl std::fmt::Debug for Router {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Router").finish_non_exhaustive()
    }
}

/// A session's end of the router: its bounded event queue. Dropping it removes the session
/// from the router.
pub struct Mailbox {
    router: Arc<Router>,
    identity: Identity,
    connection_id: Arc<str>,
    queue: Arc<QueueState>,
    /// Cluster mode: whether the identity's feed on this node is live.
    feed_ready: Option<Arc<Ready>>,
}

impl Mailbox {
    /// The session begins a turn of work: the events it takes, their frames written. Time in
    /// turns is the session's own, not the node's (see [`crate::pacing`]).
    pub fn turn_begins(&self) {
        self.router.pacing.turn_begins(&self.queue.clock);
    }

    pub fn turn_ends(&self) {
        self.router.pacing.turn_ends(&self.queue.clock);
        // What a burst grew the queue to goes once it is drained; a steady flow keeps its
        // room.
        self.shrink(64);
    }

    /// Cluster mode: waits until the identity's feed delivers events stored from now on;
    /// false if it is not ready in `limit`. Immediately true otherwise.
    pub async fn feed_ready(&mut self, limit: Duration) -> bool {
        let Some(ready) = &self.feed_ready else {
            return true;
        };
        matches!(tokio::time::timeout(limit, ready.wait()).await, Ok(true))
    }

    /// The next event, or why the router closed this queue. Once closed, events still
    /// queued are not handed out: the session ends now.
    pub async fn recv(&mut self) -> Result<Arc<Event>, Closed> {
        std::future::poll_fn(|cx| self.poll_recv(cx)).await
    }

    fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Result<Arc<Event>, Closed>> {
        // Within tokio's cooperative budget, as its channels are: a queue that never runs
        // dry must not keep the session from its timers and its socket.
        let coop = std::task::ready!(tokio::task::coop::poll_proceed(cx));
        if let Some(ready) = self.ready_now() {
            coop.made_progress();
            return Poll::Ready(ready);
        }
        self.queue.waker.register(cx.waker());
        // Again: an event or the closing may have come between the look and the register.
        match self.ready_now() {
            Some(ready) => {
                coop.made_progress();
                Poll::Ready(ready)
            }
            None => Poll::Pending,
        }
    }

    fn ready_now(&mut self) -> Option<Result<Arc<Event>, Closed>> {
        if let Some(why) = self.queue.closed() {
            return Some(Err(why));
        }
        self.queue.pop().map(|queued| Ok(self.taken(queued)))
    }

    /// Gives back what the queue grew to in a burst, down to room for `keep` events, when
    /// nothing is queued: `keep` 0 for a session about to wait long (its handler
    /// hibernated), a few for one between turns.
    pub fn shrink(&self, keep: usize) {
        let mut events = lock(&self.queue.events);
        if events.is_empty() && events.capacity() > keep {
            events.shrink_to(keep);
        }
    }

    /// The operator's reason, when the router closed this queue for a disconnect.
    pub fn disconnect_reason(&self) -> Option<&str> {
        self.queue.disconnect_reason.get().map(|r| &**r)
    }

    /// Whether an event (or the closing) is waiting, so that `recv` would not wait.
    pub fn is_ready(&self) -> bool {
        self.queue.closed().is_some() || !lock(&self.queue.events).is_empty()
    }

    /// An event already queued, if any and if the queue is open.
    pub fn try_recv(&mut self) -> Option<Arc<Event>> {
        if self.queue.closed().is_some() {
            return None;
        }
        self.queue.pop().map(|queued| self.taken(queued))
    }

    fn taken(&self, (event, stamp): Queued) -> Arc<Event> {
        self.router.pacing.taken(&self.queue.clock, stamp);
        let n = event_bytes(&event);
        self.queue.bytes.fetch_sub(n, Ordering::Relaxed);
        self.router.release(n);
        event
    }
}

impl Router {
    pub fn new(metrics: Arc<Metrics>, limits: &Limits, log: Arc<dyn EventLog>) -> Self {
        Router {
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
            hasher: RandomState::new(),
            metrics,
            per_user: limits.max_connections_per_user,
            queue_events: limits.event_queue.max(1),
            queue_bytes: limits.outbound_queue_bytes,
            shut_down: AtomicBool::new(false),
            log,
            queued: AtomicUsize::new(0),
            max_queued: limits.max_queued_bytes,
            room: Notify::new(),
            cluster: OnceLock::new(),
            pacing: Pacing::new(limits),
            feeds_opened: AtomicU64::new(0),
            presence: OnceLock::new(),
            cluster_presence: OnceLock::new(),
        }
    }

    /// Cluster mode from now on: sessions get their events through feeds from `cluster`.
    /// Set once, before the node serves.
    pub fn join(&self, cluster: Arc<Cluster>) {
        let _ = self.cluster.set(cluster);
    }

    pub fn cluster(&self) -> Option<&Arc<Cluster>> {
        self.cluster.get()
    }

    /// The log events are appended to and resumes read from.
    pub fn log(&self) -> &dyn EventLog {
        &*self.log
    }

    /// Bytes of events queued to this node's sessions, not yet handed to their guests.
    pub fn queued_bytes(&self) -> usize {
        self.queued.load(Ordering::Relaxed)
    }

    /// Counts `n` bytes more queued.
    fn hold(&self, n: usize) {
        self.queued.fetch_add(n, Ordering::Relaxed);
        self.metrics.queued_bytes.inc_by(n as i64);
    }

    /// Counts `n` queued bytes taken or dropped; wakes the feeds waiting for room when the
    /// backlog falls to the low mark.
    fn release(&self, n: usize) {
        if n == 0 {
            return;
        }
        let before = self.queued.fetch_sub(n, Ordering::Relaxed);
        self.metrics.queued_bytes.dec_by(n as i64);
        let low = self.max_queued / 2;
        if before > low && before - n <= low {
            self.room.notify_waiters();
        }
    }

    pub fn pacing(&self) -> &Pacing {
        &self.pacing
    }

    /// The identity's queue delay here when it is above `limits.user_queue_delay_ms`
    /// (see [`Pacing::lagging`]): its publishers should wait.
    pub fn lagging(&self, identity: &Identity) -> Option<Duration> {
        let shard = lock(self.shard(identity));
        let routes = shard.get(identity)?;
        self.pacing.lagging(
            routes
                .sessions
                .iter()
                .map(|r| (r.queue.bytes.load(Ordering::Relaxed), &r.queue.clock)),
        )
    }

    /// Whether the backlog is at `limits.max_queued_bytes`: feeds queue nothing more.
    pub fn full(&self) -> bool {
        self.queued_bytes() >= self.max_queued
    }

    /// Waits until the backlog is at most half of `limits.max_queued_bytes`.
    pub async fn room(&self) {
        loop {
            let notified = self.room.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.queued_bytes() <= self.max_queued / 2 {
                return;
            }
            notified.await;
        }
    }

    fn shard(&self, identity: &Identity) -> &Mutex<HashMap<Identity, UserRoutes>> {
        let i = self.hasher.hash_one(identity) as usize % self.shards.len();
        &self.shards[i]
    }

    /// Adds a live session of `identity`, unless it is at the per-user limit. Events
    /// published from now on wait in the returned mailbox.
    pub fn register(
        self: &Arc<Self>,
        identity: &Identity,
        connection_id: Arc<str>,
        sid: Option<&str>,
    ) -> Result<Mailbox, Refused> {
        let queue = Arc::new(QueueState {
            clock: self.pacing.queue(),
            ..QueueState::default()
        });
        let mut shard = lock(self.shard(identity));
        // Checked under the shard lock: `shut_down` closes each shard under its lock, so a
        // session registered here is either refused or closed by it.
        if self.shut_down.load(Ordering::Acquire) {
            return Err(Refused::ShuttingDown);
        }
        let routes = shard.entry(identity.clone()).or_default();
        if routes.sessions.len() >= self.per_user {
            return Err(Refused::UserLimit(routes.sessions.len()));
        }
        if routes.sessions.is_empty()
            && self.cluster_presence.get().is_none()
            && let Some(presence) = self.presence.get()
        {
            presence.first_opened(identity);
        }
        if let Some(cluster) = self.cluster.get()
            && routes.feed.is_none()
        {
            let generation = self.feeds_opened.fetch_add(1, Ordering::Relaxed) + 1;
            routes.feed = Some(cluster.open_feed(identity, generation, Arc::downgrade(self)));
        }
        let feed_ready = routes.feed.as_ref().map(|f| f.ready.clone());
        routes.sessions.push(Route {
            connection_id: connection_id.clone(),
            sid: sid.map(Into::into),
            queue: queue.clone(),
        });
        if let Some(presence) = self.cluster_presence.get() {
            presence.changed(identity, routes.sessions.len());
        }
        drop(shard);
        Ok(Mailbox {
            router: self.clone(),
            identity: identity.clone(),
            connection_id,
            queue,
            feed_ready,
        })
    }

    /// Closes every session's queue (they end with "going away") and refuses new ones.
    pub fn shut_down(&self) {
        self.shut_down.store(true, Ordering::Release);
        for shard in &self.shards {
            let mut shard = lock(shard);
            for routes in shard.values_mut() {
                for route in routes.sessions.drain(..) {
                    // Wakes a session waiting for its next event.
                    route.queue.close(Closed::Shutdown);
                }
            }
        }
    }

    /// Closes the sessions of `identity` (only those opened with token session `sid`, when
    /// given); each ends with 4001 and `reason`. Returns how many.
    pub fn disconnect(&self, identity: &Identity, sid: Option<&str>, reason: &str) -> usize {
        let mut shard = lock(self.shard(identity));
        let Some(routes) = shard.get_mut(identity) else {
            return 0;
        };
        let before = routes.sessions.len();
        routes.sessions.retain(|route| {
            let chosen = sid.is_none_or(|sid| route.sid.as_deref() == Some(sid));
            if chosen {
                let _ = route.queue.disconnect_reason.set(reason.into());
                route.queue.close(Closed::Disconnected);
            }
            !chosen
        });
        let closed = before - routes.sessions.len();
        let left = routes.sessions.len();
        if left == 0 {
            shard.remove(identity);
            self.last_closed(identity);
        } else if let Some(presence) = self.cluster_presence.get() {
            presence.changed(identity, left);
        }
        closed
    }

    /// Cluster mode: closes the sessions the feed `generation` serves, which can no longer
    /// prove they got every event ([`Closed::Behind`]), and drops that feed with them: a
    /// session registered later starts a new one. Returns how many.
    pub fn interrupt(&self, identity: &Identity, generation: u64) -> usize {
        let mut shard = lock(self.shard(identity));
        let Some(routes) = shard
            .get(identity)
            .filter(|r| r.feed.as_ref().is_some_and(|f| f.generation == generation))
        else {
            return 0;
        };
        for route in &routes.sessions {
            route.queue.close(Closed::Behind);
        }
        let closed = routes.sessions.len();
        // Closing woke the sessions; dropping the feed ends it.
        shard.remove(identity);
        self.last_closed(identity);
        closed
    }

    /// Appends the event to the log (which numbers it) and queues it to each of the
    /// identity's sessions. A session whose queue is full is told to close as a slow client;
    /// it never blocks the publisher or the identity's other sessions. A repeated
    /// idempotency key queues nothing and answers the original `seq`; so does a message op
    /// applied before. A message op that does not fit its message is refused.
    pub fn publish(
        &self,
        publication: Publication,
        idempotency_key: Option<&str>,
    ) -> Result<Receipt, Refusal> {
        let mut shard = lock(self.shard(&publication.identity));
        let routes = shard.get_mut(&publication.identity);
        let event = match self.log.append(publication, idempotency_key) {
            Appended::New(event) => event,
            Appended::Duplicate(seq) => {
                return Ok(Receipt {
                    seq,
                    sessions: 0,
                    duplicate: true,
                });
            }
            Appended::Refused(refusal) => return Err(refusal),
        };
        let seq = event.seq;
        let queued = match routes {
            Some(routes) => self.fan_out(routes, &event),
            None => {
                // Costs this node no delivery: counted, so publishes are charged what an
                // event costs here on average (see `Pacing::admit`).
                self.pacing.routed(0);
                0
            }
        };
        drop(shard);
        self.metrics.events_published.inc();
        Ok(Receipt {
            seq,
            sessions: queued,
            duplicate: false,
        })
    }

    /// Cluster mode: queues an event from the identity's feed to its sessions here, unless
    /// the node's backlog is at `limits.max_queued_bytes` ([`Delivery::Full`]: nothing is
    /// queued; the event stays in the stream, where the feed reads it once there is room).
    pub fn deliver(&self, identity: &Identity, generation: u64, event: Arc<Event>) -> Delivery {
        let mut shard = lock(self.shard(identity));
        let Some(routes) = shard
            .get_mut(identity)
            .filter(|r| r.feed.as_ref().is_some_and(|f| f.generation == generation))
        else {
            return Delivery::Gone;
        };
        if self.full() {
            return Delivery::Full;
        }
        self.fan_out(routes, &event);
        Delivery::Queued
    }

    /// Queues the event to each of the identity's sessions; returns to how many. A session
    /// whose queue is full is told to close as a slow client.
    fn fan_out(&self, routes: &mut UserRoutes, event: &Arc<Event>) -> usize {
        let size = event_bytes(event);
        let now = self.pacing.stamp_time();
        let mut queued = 0;
        let mut overflows = 0;
        let probe = self.pacing.probe_due(routes.sessions.len());
        let mut index = 0;
        routes.sessions.retain(|route| {
            // Counted before it is sent: the session may take it (and subtract) at once.
            let before = route.queue.bytes.fetch_add(size, Ordering::Relaxed);
            self.hold(size);
            let stamp = self.pacing.stamp(&route.queue.clock, now, before == 0);
            let sent = before + size <= self.queue_bytes
                && route.queue.push((event.clone(), stamp), self.queue_events);
            let this = index;
            index += 1;
            if sent {
                if let Some((at, stands_for)) = probe
                    && at == this
                {
                    let queue: Arc<dyn crate::pacing::Probed> = route.queue.clone();
                    self.pacing.follow(&queue, stamp, stands_for);
                }
                queued += 1;
                return true;
            }
            route.queue.bytes.fetch_sub(size, Ordering::Relaxed);
            self.release(size);
            // Full: never block the publisher or the identity's other sessions, and never
            // drop silently. The queue closes (waking the session), the route goes, and the
            // session closes with the slow-client code so the client can reconnect and
            // resume.
            route.queue.close(Closed::Overflow);
            overflows += 1;
            false
        });
        self.metrics.events_routed.inc_by(queued as u64);
        self.pacing.routed(queued);
        if overflows > 0 {
            self.metrics.queue_overflows.inc_by(overflows);
        }
        queued
    }

    /// How many identities have live sessions, and the `top` ones with the most; with
    /// `tenant`, that tenant's only.
    pub fn busiest_users(
        &self,
        top: usize,
        tenant: Option<&str>,
    ) -> (usize, Vec<(Identity, usize)>) {
        let mut users = Vec::new();
        for shard in &self.shards {
            let shard = lock(shard);
            users.extend(
                shard
                    .iter()
                    .filter(|(_, r)| !r.sessions.is_empty())
                    .filter(|(user, _)| tenant.is_none() || user.tenant.as_deref() == tenant)
                    .map(|(user, r)| (user.clone(), r.sessions.len())),
            );
        }
        let with_sessions = users.len();
        users.sort_unstable_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        users.truncate(top);
        (with_sessions, users)
    }

    /// Reports presence transitions to `webhooks` from now on.
    pub fn watch_presence(&self, webhooks: Arc<crate::presence::Webhooks>) {
        let _ = self.presence.set(webhooks);
    }

    /// The presence reporter, when `[webhooks]` is on.
    pub fn presence(&self) -> Option<&Arc<crate::presence::Webhooks>> {
        self.presence.get()
    }

    /// Cluster mode: reports every change of an identity's sessions to `presence` from now on.
    pub fn share_presence(&self, presence: Arc<crate::cluster::presence::ClusterPresence>) {
        let _ = self.cluster_presence.set(presence);
    }

    /// Cluster mode: presence across the cluster.
    pub fn cluster_presence(&self) -> Option<&Arc<crate::cluster::presence::ClusterPresence>> {
        self.cluster_presence.get()
    }

    /// The identity's routes were removed, its last session with them: told under the shard
    /// lock, so transitions reach the presence reporter in the order they happened.
    fn last_closed(&self, identity: &Identity) {
        if let Some(presence) = self.cluster_presence.get() {
            presence.changed(identity, 0);
        } else if let Some(presence) = self.presence.get() {
            presence.last_closed(identity);
        }
    }

    /// Live sessions of `identity` on this node.
    pub fn connections_of(&self, identity: &Identity) -> usize {
        lock(self.shard(identity))
            .get(identity)
            .map_or(0, |routes| routes.sessions.len())
    }

    fn unregister(&self, identity: &Identity, connection_id: &str) {
        let mut shard = lock(self.shard(identity));
        if let Some(routes) = shard.get_mut(identity) {
            routes
                .sessions
                .retain(|r| &*r.connection_id != connection_id);
            // An identity without sessions holds nothing here.
            if routes.sessions.is_empty() {
                shard.remove(identity);
                self.last_closed(identity);
            } else if let Some(presence) = self.cluster_presence.get() {
                presence.changed(identity, routes.sessions.len());
            }
        }
    }
}

impl Drop for Mailbox {
    fn drop(&mut self) {
        self.router.unregister(&self.identity, &self.connection_id);
        // Whatever was still queued leaves the node's backlog with the session.
        let left = self.queue.bytes.swap(0, Ordering::Relaxed);
        self.router.release(left);
    }
}

/// A panic while holding a shard lock cannot leave a route half-written (every critical
/// section is a single push, retain or increment), so a poisoned lock is still usable.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::History;
    use crate::event_log::MemoryLog;

    fn router(limits: Limits) -> Arc<Router> {
        Arc::new(Router::new(
            Arc::new(Metrics::new()),
            &limits,
            Arc::new(MemoryLog::new(History::default())),
        ))
    }

    fn who(tenant: Option<&str>, user: &str) -> Identity {
        Identity {
            tenant: tenant.map(str::to_owned),
            user: user.into(),
        }
    }

    fn publication(identity: &Identity, payload: &str) -> Publication {
        Publication {
            identity: identity.clone(),
            kind: "k".into(),
            payload: payload.into(),
            run_id: None,
            thread_id: None,
            message: None,
        }
    }

    #[test]
    fn events_reach_only_the_sessions_of_their_identity_in_order() {
        let router = router(Limits::default());
        let alice = who(None, "alice");
        let acme_alice = who(Some("acme"), "alice");
        let mut a1 = router.register(&alice, "a1".into(), None).unwrap();
        let mut a2 = router.register(&alice, "a2".into(), None).unwrap();
        let mut t = router.register(&acme_alice, "t".into(), None).unwrap();
        let r1 = router.publish(publication(&alice, "1"), None).unwrap();
        let r2 = router.publish(publication(&alice, "2"), None).unwrap();
        assert_eq!((r1.sessions, r2.sessions), (2, 2));
        assert_eq!(r2.seq, r1.seq + 1);
        for mailbox in [&mut a1, &mut a2] {
            assert_eq!(mailbox.try_recv().unwrap().seq, r1.seq);
            assert_eq!(mailbox.try_recv().unwrap().seq, r2.seq);
            assert!(mailbox.try_recv().is_none());
        }
        assert!(t.try_recv().is_none(), "same sub, other tenant: nothing");
        assert_eq!(router.queued_bytes(), 0, "everything taken");
    }

    #[test]
    fn the_per_identity_limit_counts_live_sessions_only() {
        let router = router(Limits {
            max_connections_per_user: 2,
            ..Limits::default()
        });
        let alice = who(None, "alice");
        let first = router.register(&alice, "1".into(), None).unwrap();
        let _second = router.register(&alice, "2".into(), None).unwrap();
        assert_eq!(
            router.register(&alice, "3".into(), None).err(),
            Some(Refused::UserLimit(2))
        );
        // Another tenant's alice is someone else.
        assert!(
            router
                .register(&who(Some("acme"), "alice"), "4".into(), None)
                .is_ok()
        );
        drop(first);
        assert!(router.register(&alice, "5".into(), None).is_ok());
    }

    #[test]
    fn an_overflowing_queue_closes_its_session_and_frees_its_backlog() {
        let router = router(Limits {
            event_queue: 2,
            ..Limits::default()
        });
        let alice = who(None, "alice");
        let mut slow = router.register(&alice, "slow".into(), None).unwrap();
        let mut quick = router.register(&alice, "quick".into(), None).unwrap();
        router.publish(publication(&alice, "1"), None).unwrap();
        quick.try_recv().unwrap();
        router.publish(publication(&alice, "2"), None).unwrap();
        quick.try_recv().unwrap();
        let third = router.publish(publication(&alice, "3"), None).unwrap();
        assert_eq!(third.sessions, 1, "only the quick one took it");
        assert!(slow.is_ready());
        assert!(
            slow.try_recv().is_none(),
            "a closed queue hands nothing out"
        );
        assert!(router.queued_bytes() > 0);
        drop(slow);
        quick.try_recv().unwrap();
        assert_eq!(
            router.queued_bytes(),
            0,
            "the closed session's backlog left with it"
        );
    }

    /// The mailbox's next event, awaited in a task of its own; returned once that task
    /// has found the queue empty and waits.
    async fn waiting(
        mut mailbox: Mailbox,
    ) -> tokio::task::JoinHandle<(Mailbox, Result<Arc<Event>, Closed>)> {
        let (waits, waiting) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(async move {
            let result = {
                let mut recv = std::pin::pin!(mailbox.recv());
                let first = futures_util::poll!(recv.as_mut());
                let _ = waits.send(first.is_pending());
                match first {
                    Poll::Ready(result) => result,
                    Poll::Pending => recv.await,
                }
            };
            (mailbox, result)
        });
        assert!(waiting.await.unwrap(), "the queue was empty");
        task
    }

    async fn woken(
        task: tokio::task::JoinHandle<(Mailbox, Result<Arc<Event>, Closed>)>,
    ) -> (Mailbox, Result<Arc<Event>, Closed>) {
        tokio::time::timeout(Duration::from_secs(10), task)
            .await
            .expect("the waiting session was woken")
            .unwrap()
    }

    /// A session waiting for its next event is woken by the event, and by each way its
    /// queue closes.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_waiting_session_is_woken_by_an_event_and_by_its_queue_closing() {
        let router = router(Limits::default());
        let alice = who(None, "alice");
        let mailbox = router.register(&alice, "1".into(), None).unwrap();
        let task = waiting(mailbox).await;
        let sent = router.publish(publication(&alice, "1"), None).unwrap();
        let (mailbox, event) = woken(task).await;
        assert_eq!(event.unwrap().seq, sent.seq);

        mailbox.shrink(0);
        let task = waiting(mailbox).await;
        assert_eq!(router.disconnect(&alice, None, "bye"), 1);
        assert_eq!(woken(task).await.1.err(), Some(Closed::Disconnected));

        let task = waiting(router.register(&alice, "2".into(), None).unwrap()).await;
        router.shut_down();
        assert_eq!(woken(task).await.1.err(), Some(Closed::Shutdown));
    }

    #[test]
    fn shutdown_closes_every_queue_and_refuses_new_sessions() {
        let router = router(Limits::default());
        let alice = who(None, "alice");
        let mailbox = router.register(&alice, "1".into(), None).unwrap();
        router.shut_down();
        assert!(mailbox.is_ready());
        assert_eq!(
            router.register(&alice, "2".into(), None).err(),
            Some(Refused::ShuttingDown)
        );
        let (users, _) = router.busiest_users(10, None);
        assert_eq!(users, 0);
    }

    #[test]
    fn an_identity_without_sessions_holds_nothing_here() {
        let router = router(Limits::default());
        let alice = who(None, "alice");
        let mailbox = router.register(&alice, "1".into(), None).unwrap();
        assert_eq!(router.busiest_users(10, None).0, 1);
        drop(mailbox);
        assert_eq!(router.busiest_users(10, None).0, 0);
        let shards: usize = router.shards.iter().map(|s| lock(s).len()).sum();
        assert_eq!(shards, 0);
        // Publishing to it keeps nothing in the router either (the log has the event).
        router.publish(publication(&alice, "1"), None).unwrap();
        let shards: usize = router.shards.iter().map(|s| lock(s).len()).sum();
        assert_eq!(shards, 0);
    }

    #[test]
    fn a_repeated_idempotency_key_queues_nothing() {
        let router = router(Limits::default());
        let alice = who(None, "alice");
        let mut mailbox = router.register(&alice, "1".into(), None).unwrap();
        let first = router.publish(publication(&alice, "1"), Some("k")).unwrap();
        let again = router.publish(publication(&alice, "1"), Some("k")).unwrap();
        assert!(again.duplicate && !first.duplicate);
        assert_eq!((again.seq, again.sessions), (first.seq, 0));
        assert!(mailbox.try_recv().is_some());
        assert!(mailbox.try_recv().is_none());
    }
}

//! Admission by queue delay: publishers go at the pace this node's sessions take events.
//!
//! A publisher that sends as fast as it is answered outruns the sessions; whatever bound
//! holds the backlog in bytes (`limits.max_queued_bytes`), at the delivery rate it is
//! seconds of delay. So the node measures the delay itself: how long each event waited
//! between the router queuing it and its session taking it, less the time its session spent
//! on earlier work meanwhile (its handler, writing to its client): what is left is the time
//! the event waited for the node, not for its own connection. Every tick (10 ms) the median
//! of the tick's waits becomes the node's queue delay; while it is above
//! `limits.queue_delay_ms`, publishes wait (up to `limits.publish_wait_ms`,
//! then 503 `overloaded`; see below for how they go while it is). So a slow session (a
//! handler that takes long, a client that reads slowly) does not hold back the others'
//! publishers; the per-identity check, [`Pacing::lagging`], holds back its own.
//!
//! A wait is known only once its event is taken, which under a backlog is the backlog's
//! whole sojourn later: publishers accepted meanwhile grew it, to hundreds of milliseconds
//! at a 50 ms target. So the node also samples the events it queues (one in
//! [`PROBE_EVERY`]) and, every tick, counts those still queued that have already waited
//! longer than the target among the tick's waits, each for the events it stands for: they
//! will have waited at least that. The delay then rises within a target's time of a
//! backlog forming, not a sojourn later. Everything a session does between its waits
//! (its start, its turns, its pings and the client's frames) is its own work here.
//!
//! While the delay is over the target, publishes are not all held until it falls (the
//! queues would run dry, and every held batch waits for the whole swing): they are let
//! through at a little less than the pace the sessions took events in the last tick, so
//! the backlog drains slowly and the node keeps working. A publish is charged, when it is
//! let through, its events times the deliveries an event has made here lately; any
//! credit lets a publish through, so a large batch is never starved by small ones, and
//! what it overdraws holds the next ones back until the sessions have taken as much. In
//! cluster mode the pace is of the events this node's sessions take, whichever node
//! published them: it holds this node's publishers to its own sessions' pace.

use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicI64, AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::config::Limits;
use crate::metrics::Metrics;

/// How often the node's queue delay is computed.
pub const TICK: Duration = Duration::from_millis(10);

/// One queued event in this many is followed while it waits (see the module's notes).
pub const PROBE_EVERY: u32 = 64;

/// At most this many followed at once (a backlog of 65,536 events); past it only the
/// oldest are followed, so the delay rises no sooner than if fewer were (it reads from
/// the events taken and from those followed).
const MAX_PROBES: usize = 1024;

/// Buckets of waits: four per doubling of microseconds (25 % apart), up to ~2^31 µs.
const BUCKETS: usize = 128;

fn bucket(us: u64) -> usize {
    if us < 4 {
        return us as usize;
    }
    let log = 63 - us.leading_zeros() as usize;
    let quarter = ((us >> (log - 2)) & 3) as usize;
    (4 * (log - 1) + quarter).min(BUCKETS - 1)
}

/// The least wait in bucket `b`.
fn bucket_floor(b: usize) -> u64 {
    if b < 4 {
        return b as u64;
    }
    let (log, quarter) = (b / 4 + 1, (b % 4) as u64);
    (4 + quarter) << (log - 2)
}

/// What the router stamps a queued event with: when (µs on the node's clock, wrapping
/// every 71 minutes) and how much time its session had spent working by then
/// ([`QueueClock`]'s busy time).
#[derive(Debug, Clone, Copy)]
pub struct Stamp {
    queued_at: u32,
    busy_at: u32,
}

/// A session queue's clock: when it was last taken from (for [`Pacing::lagging`]), and the
/// time its session has spent working (for the node's delay).
#[derive(Default)]
pub struct QueueClock {
    /// Time the session spent in finished turns (µs, wrapping).
    busy: AtomicU32,
    /// When its turn in progress began (µs, wrapping, never 0); 0 between turns.
    turn_began: AtomicU32,
    /// When the session last took an event (µs, wrapping).
    taken_at: AtomicU32,
    /// When an event was queued to it while it had none (µs, wrapping).
    pending_since: AtomicU32,
    /// How long that event had waited (µs).
    waited: AtomicU32,
    /// Events queued to it and taken from it, counted (wrapping): a followed event is still
    /// queued while fewer than its number were taken.
    pushed: AtomicU32,
    popped: AtomicU32,
}

/// A session queue whose events can be followed while they wait.
pub trait Probed: Send + Sync {
    fn clock(&self) -> &QueueClock;
    /// Whether its session may still take its events.
    fn open(&self) -> bool;
}

/// A queued event followed until its session takes it.
struct Probe {
    /// Weak: a session that ends drops its queue, and the probe with it.
    queue: std::sync::Weak<dyn Probed>,
    /// Its number among the events queued to `queue`.
    number: u32,
    stamp: Stamp,
    /// How many queued events it stands for (a multiple of [`PROBE_EVERY`]).
    stands_for: u32,
}

#[derive(Debug)]
pub struct Pacing {
    started: Instant,
    /// `limits.queue_delay_ms` in µs; 0: publishes never wait.
    target_us: u64,
    /// `limits.publish_wait_ms`.
    max_wait: Duration,
    /// `limits.user_queue_delay_ms` in µs; 0: no per-identity check.
    user_target_us: u64,
    /// The waits of the events taken since the last tick, by [`bucket`].
    waits: Box<[AtomicU64]>,
    /// The node's queue delay as of the last tick (µs).
    delay_us: AtomicU64,
    /// Woken by a tick that finds the delay at or below the target.
    open: Notify,
    /// Events queued, counted to pick one in [`PROBE_EVERY`] (wrapping).
    queued: AtomicU32,
    /// The events followed while they wait.
    probes: Mutex<Vec<Probe>>,
    /// Deliveries publishes may still make while the delay is over the target: each tick
    /// over it adds most of the tick's takes; each publish let through subtracts its
    /// estimate (it may go below zero; then publishes wait until the ticks repay it).
    credit: AtomicI64,
    /// Events routed since the last tick (high 32 bits) and their deliveries (low).
    routed: AtomicU64,
    /// Deliveries per event routed, in 1/16ths, as of the last tick that routed any.
    fanout16: AtomicU64,
}

impl std::fmt::Debug for Probe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Probe")
            .field("number", &self.number)
            .finish()
    }
}

impl QueueClock {
    /// Time the session has spent working by `now`, its turn in progress included.
    fn busy_by(&self, now: u32) -> u32 {
        let busy = self.busy.load(Ordering::Relaxed);
        match self.turn_began.load(Ordering::Relaxed) {
            0 => busy,
            began => busy.wrapping_add(now.wrapping_sub(began)),
        }
    }
}

impl Pacing {
    pub fn new(limits: &Limits) -> Self {
        Pacing {
            started: Instant::now(),
            target_us: limits.queue_delay_ms * 1000,
            max_wait: Duration::from_millis(limits.publish_wait_ms),
            user_target_us: limits.user_queue_delay_ms * 1000,
            waits: (0..BUCKETS).map(|_| AtomicU64::new(0)).collect(),
            delay_us: AtomicU64::new(0),
            open: Notify::new(),
            queued: AtomicU32::new(0),
            probes: Mutex::new(Vec::new()),
            credit: AtomicI64::new(0),
            routed: AtomicU64::new(0),
            fanout16: AtomicU64::new(16),
        }
    }

    /// Microseconds on the node's clock.
    pub fn now_us(&self) -> u64 {
        self.started.elapsed().as_micros() as u64
    }

    /// Wrapping microseconds, for stamps.
    fn now32(&self) -> u32 {
        self.now_us() as u32
    }

    /// A stamp for events queued now to a session with this clock. `now` is from
    /// [`Pacing::stamp_time`], once for all the sessions an event goes to.
    /// `was_empty`: the session had nothing queued before this event.
    pub fn stamp(&self, clock: &QueueClock, now: u32, was_empty: bool) -> Stamp {
        if was_empty {
            clock.pending_since.store(now, Ordering::Relaxed);
        }
        clock.pushed.fetch_add(1, Ordering::Relaxed);
        Stamp {
            queued_at: now,
            busy_at: clock.busy_by(now),
        }
    }

    pub fn stamp_time(&self) -> u32 {
        self.now32()
    }

    /// `events` more are being queued (one event's sessions): which of them to follow, if
    /// any, and how many queued events it stands for (one in [`PROBE_EVERY`] of all queued;
    /// one per event at most). None while publishes never wait.
    pub fn probe_due(&self, events: usize) -> Option<(usize, u32)> {
        if self.target_us == 0 || events == 0 {
            return None;
        }
        let n = events.min(u32::MAX as usize) as u32;
        let before = self.queued.fetch_add(n, Ordering::Relaxed) % PROBE_EVERY;
        let crossed = (u64::from(before) + u64::from(n)) / u64::from(PROBE_EVERY);
        (crossed > 0).then(|| {
            let stands_for = (crossed * u64::from(PROBE_EVERY)).min(u64::from(u32::MAX));
            ((PROBE_EVERY - 1 - before) as usize, stands_for as u32)
        })
    }

    /// An event was queued to `deliveries` sessions.
    pub fn routed(&self, deliveries: usize) {
        if self.target_us > 0 {
            let deliveries = deliveries.min(u32::MAX as usize) as u64;
            self.routed
                .fetch_add((1 << 32) | deliveries, Ordering::Relaxed);
        }
    }

    /// Follows the event just queued to `queue` with `stamp` until its session takes it.
    pub fn follow(&self, queue: &Arc<dyn Probed>, stamp: Stamp, stands_for: u32) {
        let number = queue.clock().pushed.load(Ordering::Relaxed);
        let mut probes = lock(&self.probes);
        if probes.len() < MAX_PROBES {
            probes.push(Probe {
                queue: Arc::downgrade(queue),
                number,
                stamp,
                stands_for,
            });
        }
    }

    /// The session begins a turn of work (events, and their frames written).
    pub fn turn_begins(&self, clock: &QueueClock) {
        clock.turn_began.store(self.now32() | 1, Ordering::Relaxed);
    }

    pub fn turn_ends(&self, clock: &QueueClock) {
        let began = clock.turn_began.swap(0, Ordering::Relaxed);
        if began != 0 {
            clock
                .busy
                .fetch_add(self.now32().wrapping_sub(began), Ordering::Relaxed);
        }
    }

    /// A new session's queue: its clock starts now, so an event that waits in it before its
    /// first take ages from here.
    pub fn queue(&self) -> QueueClock {
        let clock = QueueClock::default();
        clock.taken_at.store(self.now32(), Ordering::Relaxed);
        clock
    }

    /// A session took an event stamped `stamp`.
    pub fn taken(&self, queue: &QueueClock, stamp: Stamp) {
        let now = self.now32();
        let waited = now.wrapping_sub(stamp.queued_at);
        let working = queue.busy_by(now).wrapping_sub(stamp.busy_at);
        queue.taken_at.store(now, Ordering::Relaxed);
        queue.waited.store(waited, Ordering::Relaxed);
        queue.popped.fetch_add(1, Ordering::Relaxed);
        let for_the_node = waited.saturating_sub(working);
        self.waits[bucket(u64::from(for_the_node))].fetch_add(1, Ordering::Relaxed);
    }

    /// The node's queue delay as of the last tick.
    pub fn delay(&self) -> Duration {
        Duration::from_micros(self.delay_us.load(Ordering::Relaxed))
    }

    fn over(&self) -> bool {
        self.target_us > 0 && self.delay_us.load(Ordering::Relaxed) > self.target_us
    }

    /// Lets a publish of `events` through at once while the node's queue delay is at or
    /// below `limits.queue_delay_ms`; above it, when there is credit (see the module's
    /// notes), waiting for it at most `limits.publish_wait_ms`: `Err` with the delay then.
    /// `Ok(true)` when it waited.
    pub async fn admit(&self, events: usize) -> Result<bool, Duration> {
        if !self.over() {
            return Ok(false);
        }
        let cost = (events as u64 * self.fanout16.load(Ordering::Relaxed)).div_ceil(16);
        let cost = cost.min(i64::MAX as u64) as i64;
        let deadline = tokio::time::Instant::now() + self.max_wait;
        let mut waited = false;
        loop {
            let opened = self.open.notified();
            tokio::pin!(opened);
            opened.as_mut().enable();
            if !self.over() || self.spend(cost) {
                return Ok(waited);
            }
            if tokio::time::timeout_at(deadline, opened).await.is_err() {
                return Err(self.delay());
            }
            waited = true;
        }
    }

    /// Takes `cost` from the credit if there is any.
    fn spend(&self, cost: i64) -> bool {
        self.credit
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |credit| {
                (credit > 0).then(|| credit.saturating_sub(cost))
            })
            .is_ok()
    }

    /// An identity's queue delay when it is above `limits.user_queue_delay_ms`: every one
    /// of its sessions here has an event that has waited that long (the last one it took,
    /// or, while it has events queued, the time since it last took one or since the first
    /// of them was queued, whichever is later). The
    /// least over the sessions: one slow connection of a user is closed as a slow client
    /// when its own queue fills; the user's publishers are held back only when all of them
    /// fall behind. `sessions`: each session's queued bytes and clock.
    pub fn lagging<'a>(
        &self,
        sessions: impl Iterator<Item = (usize, &'a QueueClock)>,
    ) -> Option<Duration> {
        if self.user_target_us == 0 {
            return None;
        }
        let now = self.now32();
        let mut least = None::<u64>;
        for (bytes, queue) in sessions {
            let delay = if bytes == 0 {
                0
            } else {
                let taken = now.wrapping_sub(queue.taken_at.load(Ordering::Relaxed));
                let pending = now.wrapping_sub(queue.pending_since.load(Ordering::Relaxed));
                let since = taken.min(pending);
                u64::from(since.max(queue.waited.load(Ordering::Relaxed)))
            };
            least = Some(least.map_or(delay, |l| l.min(delay)));
        }
        least
            .filter(|d| *d > self.user_target_us)
            .map(Duration::from_micros)
    }

    /// Adds to `counts` the followed events still queued that have waited for the node
    /// longer than the target, each for the events it stands for; forgets those taken and
    /// those whose session ended, and all of them when nothing is queued.
    fn count_overdue(&self, counts: &mut [u64], queued_bytes: usize) {
        let mut probes = lock(&self.probes);
        if queued_bytes == 0 {
            probes.clear();
            return;
        }
        let now = self.now32();
        probes.retain(|probe| {
            let Some(queue) = probe.queue.upgrade() else {
                return false;
            };
            let clock = queue.clock();
            let taken = clock.popped.load(Ordering::Relaxed);
            // Wrapping: still queued while fewer than its number were taken.
            let queued = (probe.number.wrapping_sub(taken) as i32) > 0;
            if !queued || !queue.open() {
                return false;
            }
            let waited = now.wrapping_sub(probe.stamp.queued_at);
            let working = clock.busy_by(now).wrapping_sub(probe.stamp.busy_at);
            let for_the_node = u64::from(waited.saturating_sub(working));
            if for_the_node > self.target_us {
                counts[bucket(for_the_node)] += u64::from(probe.stands_for);
            }
            true
        });
    }

    /// One tick: the median wait of the events taken since the last one, and of those
    /// still queued that are already overdue, becomes the node's delay. When there are
    /// none it stays (sessions that take nothing while events wait are no sign of room),
    /// unless nothing is queued.
    fn tick(&self, queued_bytes: usize, metrics: &Metrics) {
        let mut counts: Vec<u64> = self
            .waits
            .iter()
            .map(|c| c.swap(0, Ordering::Relaxed))
            .collect();
        let takes: u64 = counts.iter().sum();
        self.count_overdue(&mut counts, queued_bytes);
        let routed = self.routed.swap(0, Ordering::Relaxed);
        if routed >> 32 > 0 {
            let fanout16 = ((routed & u64::from(u32::MAX)) * 16).div_ceil(routed >> 32);
            self.fanout16.store(fanout16.max(1), Ordering::Relaxed);
        }
        let taken: u64 = counts.iter().sum();
        let delay = if taken > 0 {
            let within = taken.div_ceil(2);
            let mut seen = 0;
            let bucket = counts
                .iter()
                .position(|c| {
                    seen += c;
                    seen >= within
                })
                .unwrap_or(0);
            bucket_floor(bucket)
        } else if queued_bytes == 0 {
            0
        } else {
            self.delay_us.load(Ordering::Relaxed)
        };
        self.delay_us.store(delay, Ordering::Relaxed);
        metrics.queue_delay_seconds.observe(delay as f64 / 1e6);
        // Over the target: seven eighths of what the sessions took, so the backlog drains
        // by an eighth of the pace; never more than one tick's worth saved up.
        let takes = (takes - takes / 8).min(i64::MAX as u64) as i64;
        let over = self.over();
        let next = |credit: i64| {
            if over {
                credit.saturating_add(takes).min(takes)
            } else {
                0
            }
        };
        // One update: what a publish spends meanwhile is not lost.
        let before = self
            .credit
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |credit| {
                Some(next(credit))
            })
            .unwrap_or_else(|credit| credit);
        if !over || next(before) > 0 {
            self.open.notify_waiters();
        }
    }

    /// Ticks until shutdown.
    pub async fn run(
        router: std::sync::Arc<crate::router::Router>,
        metrics: std::sync::Arc<Metrics>,
        shutdown: CancellationToken,
    ) {
        let mut ticks = tokio::time::interval(TICK);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                _ = ticks.tick() => router.pacing().tick(router.queued_bytes(), &metrics),
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A 50 ms target, and a clock that has run for a while, so that events can be
    /// stamped in its past.
    fn pacing_for_test(publish_wait_ms: u64) -> (Pacing, Metrics) {
        let limits = Limits {
            queue_delay_ms: 50,
            publish_wait_ms,
            ..Limits::default()
        };
        let mut pacing = Pacing::new(&limits);
        pacing.started = Instant::now().checked_sub(Duration::from_secs(10)).unwrap();
        (pacing, Metrics::new())
    }

    #[test]
    fn buckets_are_a_quarter_of_a_doubling_wide_and_start_at_their_floor() {
        for us in [
            0,
            1,
            3,
            4,
            5,
            7,
            8,
            9,
            15,
            16,
            1000,
            49_999,
            50_000,
            1 << 30,
        ] {
            let b = bucket(us);
            assert!(bucket_floor(b) <= us, "{us} in bucket {b}");
            assert!(us < bucket_floor(b + 1), "{us} in bucket {b}");
            assert!(bucket_floor(b + 1) as f64 <= (bucket_floor(b) as f64 * 1.25).max(1.0) + 1.0);
        }
        assert_eq!(bucket(u64::MAX), BUCKETS - 1);
    }

    #[tokio::test]
    async fn the_median_wait_sets_the_delay_and_publishers_wait_while_it_is_over() {
        let (pacing, metrics) = pacing_for_test(30);
        let queue = pacing.queue();
        let stamp = |ago: u32| {
            let mut stamp = pacing.stamp(&queue, pacing.stamp_time(), false);
            stamp.queued_at = stamp.queued_at.wrapping_sub(ago);
            stamp
        };
        // One slow event among three quick ones: the node is not behind.
        pacing.taken(&queue, stamp(900_000));
        for _ in 0..3 {
            pacing.taken(&queue, stamp(0));
        }
        pacing.tick(1, &metrics);
        assert!(pacing.delay() < Duration::from_millis(1));
        assert_eq!(pacing.admit(1).await, Ok(false));
        // Most events waited 200 ms: a publish spends the credit the tick's takes gave (and
        // more), the next waits and gives up after publish_wait_ms.
        for _ in 0..3 {
            pacing.taken(&queue, stamp(200_000));
        }
        pacing.tick(1, &metrics);
        assert!(pacing.delay() >= Duration::from_millis(150));
        assert_eq!(pacing.admit(100).await, Ok(false));
        let refused = pacing.admit(1).await.expect_err("over the target");
        assert!(refused >= Duration::from_millis(150));
        // Time the session spent on earlier work is its own, not the node's: an event that
        // waited 200 ms while its session worked for 190 waited 10 for the node.
        let mut slow_session = pacing.queue();
        for _ in 0..3 {
            let stamped = pacing.stamp(
                &slow_session,
                pacing.stamp_time().wrapping_sub(200_000),
                false,
            );
            pacing.turn_begins(&slow_session);
            *slow_session.turn_began.get_mut() = pacing.stamp_time().wrapping_sub(190_000) | 1;
            pacing.taken(&slow_session, stamped);
            pacing.turn_ends(&slow_session);
        }
        pacing.tick(1, &metrics);
        assert!(
            pacing.delay() <= Duration::from_millis(11),
            "{:?}",
            pacing.delay()
        );
        for _ in 0..3 {
            pacing.taken(&queue, stamp(200_000));
        }
        pacing.tick(1, &metrics);
        assert_eq!(pacing.admit(100).await, Ok(false));
        // A tick without events taken keeps the delay while events are queued...
        pacing.tick(1, &metrics);
        assert!(pacing.delay() >= Duration::from_millis(150));
        // ... and a waiting publisher goes on when a tick finds it back under the target.
        let waiting = pacing.admit(1);
        tokio::pin!(waiting);
        assert!(futures_util::FutureExt::now_or_never(waiting.as_mut()).is_none());
        pacing.tick(0, &metrics);
        assert_eq!(waiting.await, Ok(true));
    }

    struct TestQueue {
        clock: QueueClock,
        open: std::sync::atomic::AtomicBool,
    }

    impl Probed for TestQueue {
        fn clock(&self) -> &QueueClock {
            &self.clock
        }

        fn open(&self) -> bool {
            self.open.load(Ordering::Relaxed)
        }
    }

    #[tokio::test]
    async fn events_still_queued_past_the_target_raise_the_delay_before_they_are_taken() {
        let (pacing, metrics) = pacing_for_test(30);
        let queue = Arc::new(TestQueue {
            clock: pacing.queue(),
            open: true.into(),
        });
        let follow_one_queued = |ago: u32| follow_queued(&pacing, &queue, ago);
        // Queued 200 ms ago, not taken: nothing was taken in the tick, yet the node is over.
        follow_one_queued(200_000);
        pacing.tick(1, &metrics);
        assert!(
            pacing.delay() >= Duration::from_millis(150),
            "{:?}",
            pacing.delay()
        );
        // Its session takes it and one more that waited no time; one queued 10 ms ago is
        // not overdue, not counted: the node is under the target again.
        queue.clock.popped.fetch_add(1, Ordering::Relaxed);
        let quick = pacing.stamp(&queue.clock, pacing.stamp_time(), true);
        pacing.taken(&queue.clock, quick);
        follow_one_queued(10_000);
        pacing.tick(1, &metrics);
        assert!(
            pacing.delay() < Duration::from_millis(50),
            "{:?}",
            pacing.delay()
        );
        assert_eq!(lock(&pacing.probes).len(), 1, "the taken one is forgotten");
        // A queue the router closed is forgotten, however long its events waited.
        queue.open.store(false, Ordering::Relaxed);
        pacing.tick(1, &metrics);
        assert!(lock(&pacing.probes).is_empty());
        // So is one whose session ended and dropped it (nothing closes it then), with
        // several of its events followed.
        let ended = Arc::new(TestQueue {
            clock: pacing.queue(),
            open: true.into(),
        });
        for _ in 0..2 {
            follow_queued(&pacing, &ended, 200_000);
        }
        pacing.tick(1, &metrics);
        assert!(pacing.delay() >= Duration::from_millis(150));
        drop(ended);
        pacing.tick(1, &metrics);
        assert!(lock(&pacing.probes).is_empty());
        // And once nothing is queued, the node has no delay.
        pacing.tick(0, &metrics);
        assert_eq!(pacing.delay(), Duration::ZERO);
    }

    /// Follows an event queued to `queue` `ago` µs ago, standing for [`PROBE_EVERY`].
    fn follow_queued(pacing: &Pacing, queue: &Arc<TestQueue>, ago: u32) {
        let mut stamp = pacing.stamp(&queue.clock, pacing.stamp_time(), true);
        stamp.queued_at = stamp.queued_at.wrapping_sub(ago);
        let probed: Arc<dyn Probed> = queue.clone();
        pacing.follow(&probed, stamp, PROBE_EVERY);
    }

    #[test]
    fn one_queued_event_in_probe_every_is_followed_standing_for_those_before_it() {
        let (pacing, _) = pacing_for_test(30);
        let (mut queued, mut stood_for) = (0u64, 0u64);
        for events in [1usize, 5, 63, 64, 65, 200, 1, 1000, 7, 3] {
            if let Some((index, stands_for)) = pacing.probe_due(events) {
                assert!(index < events, "{index} of {events}");
                assert_eq!(stands_for % PROBE_EVERY, 0);
                stood_for += u64::from(stands_for);
            }
            queued += events as u64;
        }
        assert_eq!(
            stood_for,
            queued / u64::from(PROBE_EVERY) * u64::from(PROBE_EVERY)
        );
        let off = Pacing::new(&Limits {
            queue_delay_ms: 0,
            ..Limits::default()
        });
        assert_eq!(off.probe_due(1000), None);
    }

    #[tokio::test]
    async fn over_the_target_publishes_go_at_a_little_less_than_the_pace_of_the_takes() {
        let (pacing, metrics) = pacing_for_test(1000);
        let queue = pacing.queue();
        let take_late = |n: usize| {
            for _ in 0..n {
                let mut stamp = pacing.stamp(&queue, pacing.stamp_time(), false);
                stamp.queued_at = stamp.queued_at.wrapping_sub(200_000);
                pacing.taken(&queue, stamp);
            }
        };
        // Each event went to 2 sessions lately.
        for _ in 0..10 {
            pacing.routed(2);
        }
        take_late(800);
        pacing.tick(1, &metrics);
        // 700 deliveries of credit: a batch of 300 events (600 deliveries) goes at once,
        // the next one too (it finds credit left), and overdraws it.
        assert_eq!(pacing.admit(300).await, Ok(false));
        assert_eq!(pacing.admit(300).await, Ok(false));
        let waiting = pacing.admit(1);
        tokio::pin!(waiting);
        assert!(futures_util::FutureExt::now_or_never(waiting.as_mut()).is_none());
        // The overdraft (500) is repaid by the next tick's takes, still over the target.
        take_late(800);
        pacing.tick(1, &metrics);
        assert!(pacing.delay() >= Duration::from_millis(150));
        assert_eq!(waiting.await, Ok(true));
    }
}

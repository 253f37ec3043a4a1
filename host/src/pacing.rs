//! Admission by queue delay: publishers go at the pace this node's sessions take events.
//!
//! A publisher that sends as fast as it is answered outruns the sessions; whatever bound
//! holds the backlog in bytes (`limits.max_queued_bytes`), at the delivery rate it is
//! seconds of delay. So the node measures the delay itself: how long each event waited
//! between the router queuing it and its session taking it. Every tick (10 ms) the median
//! of the tick's waits becomes the node's queue delay; while it is above
//! `limits.queue_delay_ms`, publishes wait for it to fall (up to `limits.publish_wait_ms`,
//! then 503 `overloaded`). The median, not a mean or a maximum: a node is overloaded when
//! its typical event waits, and a slow session (a handler that takes long, a client that
//! reads slowly) takes few events, so it does not hold back the others' publishers; the
//! per-identity check, [`Pacing::lagging`], holds back its own.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::config::Limits;
use crate::metrics::Metrics;

/// How often the node's queue delay is computed.
pub const TICK: Duration = Duration::from_millis(10);

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

/// When a session queue was last taken from, for [`Pacing::lagging`].
#[derive(Default)]
pub struct QueueClock {
    /// When the session last took an event (µs on the node's clock).
    taken_at: AtomicU64,
    /// How long that event had waited (µs).
    waited: AtomicU64,
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
        }
    }

    /// Microseconds on the node's clock: what the router stamps queued events with.
    pub fn now_us(&self) -> u64 {
        self.started.elapsed().as_micros() as u64
    }

    /// A new session's queue: its clock starts now, so an event that waits in it before its
    /// first take ages from here.
    pub fn queue(&self) -> QueueClock {
        let clock = QueueClock::default();
        clock.taken_at.store(self.now_us(), Ordering::Relaxed);
        clock
    }

    /// A session took an event queued at `queued_at`.
    pub fn taken(&self, queue: &QueueClock, queued_at: u64) {
        let now = self.now_us();
        let waited = now.saturating_sub(queued_at);
        queue.taken_at.store(now, Ordering::Relaxed);
        queue.waited.store(waited, Ordering::Relaxed);
        self.waits[bucket(waited)].fetch_add(1, Ordering::Relaxed);
    }

    /// The node's queue delay as of the last tick.
    pub fn delay(&self) -> Duration {
        Duration::from_micros(self.delay_us.load(Ordering::Relaxed))
    }

    fn over(&self) -> bool {
        self.target_us > 0 && self.delay_us.load(Ordering::Relaxed) > self.target_us
    }

    /// Waits while the node's queue delay is above `limits.queue_delay_ms`: `Err` with the
    /// delay when it stayed above for `limits.publish_wait_ms`. `Ok(true)` when it waited.
    pub async fn admit(&self) -> Result<bool, Duration> {
        if !self.over() {
            return Ok(false);
        }
        let deadline = tokio::time::Instant::now() + self.max_wait;
        loop {
            let opened = self.open.notified();
            tokio::pin!(opened);
            opened.as_mut().enable();
            if !self.over() {
                return Ok(true);
            }
            if tokio::time::timeout_at(deadline, opened).await.is_err() {
                return Err(self.delay());
            }
        }
    }

    /// An identity's queue delay when it is above `limits.user_queue_delay_ms`: every one
    /// of its sessions here has an event that has waited that long (the last one it took,
    /// or, while it has events queued, the time since it took one). The
    /// least over the sessions: one slow connection of a user is closed as a slow client
    /// when its own queue fills; the user's publishers are held back only when all of them
    /// fall behind.
    /// `sessions`: each session's queued bytes and clock.
    pub fn lagging<'a>(
        &self,
        sessions: impl Iterator<Item = (usize, &'a QueueClock)>,
    ) -> Option<Duration> {
        if self.user_target_us == 0 {
            return None;
        }
        let now = self.now_us();
        let mut least = None::<u64>;
        for (bytes, queue) in sessions {
            let delay = if bytes == 0 {
                0
            } else {
                let since = now.saturating_sub(queue.taken_at.load(Ordering::Relaxed));
                since.max(queue.waited.load(Ordering::Relaxed))
            };
            least = Some(least.map_or(delay, |l| l.min(delay)));
        }
        least
            .filter(|d| *d > self.user_target_us)
            .map(Duration::from_micros)
    }

    /// One tick: the median wait of the events taken since the last one becomes the node's
    /// delay. When none was taken it stays (sessions that take nothing while events wait
    /// are no sign of room), unless nothing is queued.
    fn tick(&self, queued_bytes: usize, metrics: &Metrics) {
        let counts: Vec<u64> = self
            .waits
            .iter()
            .map(|c| c.swap(0, Ordering::Relaxed))
            .collect();
        let taken: u64 = counts.iter().sum();
        let delay = if taken > 0 {
            let mut seen = 0;
            let median = counts
                .iter()
                .position(|c| {
                    seen += c;
                    seen * 2 >= taken
                })
                .unwrap_or(0);
            bucket_floor(median)
        } else if queued_bytes == 0 {
            0
        } else {
            self.delay_us.load(Ordering::Relaxed)
        };
        self.delay_us.store(delay, Ordering::Relaxed);
        metrics.queue_delay_seconds.observe(delay as f64 / 1e6);
        if !self.over() {
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

#[cfg(test)]
mod tests {
    use super::*;

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
        let limits = Limits {
            queue_delay_ms: 50,
            publish_wait_ms: 30,
            ..Limits::default()
        };
        let mut pacing = Pacing::new(&limits);
        // A clock that has run for a while, so that events can be stamped in its past.
        pacing.started = Instant::now().checked_sub(Duration::from_secs(10)).unwrap();
        let metrics = Metrics::new();
        let queue = pacing.queue();
        // One slow event among three quick ones: the node is not behind.
        let now = pacing.now_us();
        pacing.taken(&queue, now.saturating_sub(900_000));
        for _ in 0..3 {
            pacing.taken(&queue, pacing.now_us());
        }
        pacing.tick(1, &metrics);
        assert!(pacing.delay() < Duration::from_millis(1));
        assert_eq!(pacing.admit().await, Ok(false));
        // Most events waited 200 ms: publishes wait, and give up after publish_wait_ms.
        for _ in 0..3 {
            pacing.taken(&queue, pacing.now_us().saturating_sub(200_000));
        }
        pacing.tick(1, &metrics);
        assert!(pacing.delay() >= Duration::from_millis(150));
        let refused = pacing.admit().await.expect_err("over the target");
        assert!(refused >= Duration::from_millis(150));
        // A tick without events taken keeps the delay while events are queued...
        pacing.tick(1, &metrics);
        assert!(pacing.delay() >= Duration::from_millis(150));
        // ... and a waiting publisher goes on when a tick finds it back under the target.
        let waiting = pacing.admit();
        tokio::pin!(waiting);
        assert!(futures_util::FutureExt::now_or_never(waiting.as_mut()).is_none());
        pacing.tick(0, &metrics);
        assert_eq!(waiting.await, Ok(true));
    }
}

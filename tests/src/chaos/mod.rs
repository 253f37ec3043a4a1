//! The chaos checker (issue 20), the library side of `src/bin/chaos.rs`: real gateway nodes
//! (and NATS servers) on loopback, a client.js-like workload, faults on a seeded schedule,
//! and a checker over the recorded history.
//!
//! - [`topology`]: the child processes, killed when dropped (or, if this process is
//!   killed, by a watchdog), and each node's proxies to NATS.
//! - [`workload`]: resuming clients, publishers that retry with their idempotency keys,
//!   misbehaving clients; each records what it saw.
//! - [`nemesis`]: kill -9, SIGTERM drains, guest reloads, SIGSTOP/SIGCONT and kill -9 of
//!   NATS servers, a node's link to NATS cut.
//! - [`checker`]: misdelivery, order, duplicates, holes, false recoveries, final catch-up.
//! - [`run`]: puts them together and writes the report.

pub mod checker;
pub mod nemesis;
pub mod run;
pub mod topology;
pub mod workload;

use std::time::Instant;

use serde::Serialize;

pub use run::{Options, run};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// One node on its in-process log.
    Embedded,
    /// Gateway nodes sharing a 3-server NATS JetStream cluster (R3 streams).
    Cluster,
}

/// A small seeded generator (splitmix64): the same seed gives the same fault schedule.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed ^ 0x9e37_79b9_7f4a_7c15)
    }

    /// An independent stream for one task, derived from the run's seed.
    pub fn fork(seed: u64, stream: u64) -> Self {
        let mut rng = Rng::new(seed.wrapping_add(stream.wrapping_mul(0xa076_1d64_78bd_642f)));
        rng.next_u64();
        rng
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (`n > 0`).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }

    /// Uniform in `lo..=hi`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi.saturating_sub(lo) + 1)
    }

    pub fn chance(&mut self, p: f64) -> bool {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64 <= p
    }
}

/// Microseconds since the run started: every recorded time, so that times of different
/// tasks compare.
#[derive(Debug, Clone, Copy)]
pub struct Clock(Instant);

impl Clock {
    pub fn start() -> Self {
        Clock(Instant::now())
    }

    pub fn now(&self) -> u64 {
        self.0.elapsed().as_micros() as u64
    }
}

/// One identity: a user in a tenant. The same user names exist in both tenants, so that a
/// routing bug that ignores the tenant shows up as a misdelivery.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct Identity {
    pub tenant: String,
    pub user: String,
}

impl Identity {
    /// All identities of a run: `users` per tenant, tenants `ta` and `tb`.
    pub fn all(users: usize) -> Vec<Identity> {
        ["ta", "tb"]
            .iter()
            .flat_map(|tenant| {
                (0..users).map(move |u| Identity {
                    tenant: (*tenant).into(),
                    user: format!("u{u}"),
                })
            })
            .collect()
    }

    /// What the payload's `who` carries.
    pub fn label(&self) -> String {
        format!("{}/{}", self.tenant, self.user)
    }
}

/// Milliseconds, for people reading a report.
pub fn ms(us: u64) -> f64 {
    (us as f64 / 1000.0 * 10.0).round() / 10.0
}

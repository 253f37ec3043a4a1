//! How many connections this node admits, and the permits that enforce it.
//!
//! Each connection costs one file descriptor and a few memory mappings (its linear memory's
//! reservation and guard, the copy-on-write image). Running out of either fails in the
//! middle of an accept or an instantiation with a bare "Cannot allocate memory", so the
//! gateway computes at start-up how many connections it can really hold and refuses the
//! next one cleanly (HTTP 503) instead.

use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// File descriptors kept for the listener, publish requests, logs and the like.
const FDS_RESERVED: u64 = 512;
/// Memory mappings per live instance, with headroom (measured: see README, "Capacity").
pub const MAPS_PER_CONNECTION: u64 = 5;
/// Mappings kept for the runtime, the compiled guest and allocator arenas.
const MAPS_RESERVED: u64 = 4096;

/// The numbers behind the connection cap, logged at start-up.
#[derive(Debug, Clone, Copy)]
pub struct Capacity {
    /// Soft file-descriptor limit after raising it to the hard limit.
    pub fd_limit: u64,
    /// `vm.max_map_count`, if readable.
    pub max_map_count: Option<u64>,
    /// `limits.max_connections` as configured (0: no configured cap).
    pub configured: usize,
    /// Connections the memory available to this process holds, at what a trial instance
    /// measured (see [`Capacity::limit_by_memory`]); `None` until measured.
    pub by_memory: Option<u64>,
    /// What the node admits: the smallest of these.
    pub effective: usize,
}

/// What a connection costs besides its instance's resident memory: the session task, its
/// socket's buffers and queues (measured with the native handler: ~9 KiB; rounded up).
const SESSION_BYTES: u64 = 16 << 10;
/// Share of the available memory connections may take; the rest is for everything else.
const MEMORY_SHARE: f64 = 0.8;

impl Capacity {
    pub fn of_this_process(configured: usize) -> Capacity {
        // Sockets are file descriptors: use all the process may have.
        let fd_limit = rlimit::increase_nofile_limit(u64::MAX).unwrap_or(1024);
        let max_map_count = std::fs::read_to_string("/proc/sys/vm/max_map_count")
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok());
        let by_fds = fd_limit.saturating_sub(FDS_RESERVED);
        let by_maps = max_map_count.map_or(u64::MAX, |m| {
            m.saturating_sub(MAPS_RESERVED) / MAPS_PER_CONNECTION
        });
        let mut effective = by_fds.min(by_maps) as usize;
        if configured > 0 {
            effective = effective.min(configured);
        }
        Capacity {
            fd_limit,
            max_map_count,
            configured,
            by_memory: None,
            effective,
        }
    }

    /// Lowers the capacity to what the memory available to this process holds, each
    /// connection costing `instance_bytes` (a trial instance's resident size) plus the
    /// session's own. File descriptors and mappings alone would admit ~19,000 connections
    /// of a guest that takes 2-3 MiB each, far more than most machines' memory.
    pub fn limit_by_memory(&mut self, instance_bytes: u64) {
        let Some(available) = available_memory() else {
            return;
        };
        let per_connection = instance_bytes + SESSION_BYTES;
        let by_memory = (available as f64 * MEMORY_SHARE) as u64 / per_connection;
        self.by_memory = Some(by_memory);
        self.effective = self.effective.min(by_memory as usize);
    }
}

/// Memory this process may still take: `MemAvailable`, or less under a cgroup limit.
fn available_memory() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let available = meminfo.lines().find_map(|line| {
        let kib = line
            .strip_prefix("MemAvailable:")?
            .trim()
            .strip_suffix("kB")?;
        kib.trim().parse::<u64>().ok().map(|k| k * 1024)
    })?;
    let cgroup = || -> Option<u64> {
        let max = std::fs::read_to_string("/sys/fs/cgroup/memory.max").ok()?;
        let max = max.trim().parse::<u64>().ok()?; // "max": no limit
        let current = std::fs::read_to_string("/sys/fs/cgroup/memory.current").ok()?;
        Some(max.saturating_sub(current.trim().parse().ok()?))
    };
    Some(cgroup().map_or(available, |c| c.min(available)))
}

/// The node-wide connection cap: a permit per live connection, released when its session
/// task ends.
#[derive(Debug)]
pub struct Admission {
    permits: Arc<Semaphore>,
    pub capacity: Capacity,
}

impl Admission {
    pub fn new(capacity: Capacity) -> Self {
        Admission {
            permits: Arc::new(Semaphore::new(capacity.effective)),
            capacity,
        }
    }

    /// A permit for one more connection, or `None` when the node is full.
    pub fn try_admit(&self) -> Option<OwnedSemaphorePermit> {
        self.permits.clone().try_acquire_owned().ok()
    }

    /// Whether a new connection would be admitted now.
    pub fn has_room(&self) -> bool {
        self.permits.available_permits() > 0
    }

    pub fn live(&self) -> usize {
        self.capacity.effective - self.permits.available_permits()
    }
}

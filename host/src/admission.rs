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
    /// What the node admits: the smallest of the three.
    pub effective: usize,
}

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
            effective,
        }
    }
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

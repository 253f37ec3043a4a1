//! Routes published events to the live sessions of one user, by authenticated user id only.
//!
//! The router holds, per user, the next sequence number and a queue sender for each of that
//! user's live sessions; never any handler state. Users are spread over shards so publishes
//! for different users rarely contend. Sequence assignment and queueing happen under the
//! user's shard lock, so every session of a user sees that user's events in `seq` order.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::sync::{Arc, Mutex};

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;
use crate::sandbox::Event;

const SHARDS: usize = 64;

/// An event as published, before it has a sequence number.
#[derive(Debug, Clone)]
pub struct Publication {
    pub user_id: String,
    pub kind: String,
    /// JSON text.
    pub payload: String,
    pub run_id: Option<String>,
    pub thread_id: Option<String>,
}

/// What a publish did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Receipt {
    pub seq: u64,
    /// Live sessions of the user the event was queued to.
    pub sessions: usize,
}

struct Route {
    connection_id: Arc<str>,
    events: mpsc::Sender<Arc<Event>>,
    /// Cancelled when this session's queue overflows: it is a slow client.
    overflow: CancellationToken,
}

#[derive(Default)]
struct UserRoutes {
    next_seq: u64,
    sessions: Vec<Route>,
}

pub struct Router {
    shards: Box<[Mutex<HashMap<String, UserRoutes>>]>,
    hasher: RandomState,
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for Router {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Router").finish_non_exhaustive()
    }
}

/// A session's place in the router; dropping it removes the session.
pub struct Registration {
    router: Arc<Router>,
    user_id: String,
    connection_id: Arc<str>,
}

impl Router {
    pub fn new(metrics: Arc<Metrics>) -> Self {
        Router {
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
            hasher: RandomState::new(),
            metrics,
        }
    }

    fn shard(&self, user_id: &str) -> &Mutex<HashMap<String, UserRoutes>> {
        let i = self.hasher.hash_one(user_id) as usize % self.shards.len();
        &self.shards[i]
    }

    /// Adds a live session of `user_id`. Events published from now on reach `events`.
    pub fn register(
        self: &Arc<Self>,
        user_id: &str,
        connection_id: Arc<str>,
        events: mpsc::Sender<Arc<Event>>,
        overflow: CancellationToken,
    ) -> Registration {
        let mut shard = lock(self.shard(user_id));
        shard
            .entry(user_id.to_owned())
            .or_default()
            .sessions
            .push(Route {
                connection_id: connection_id.clone(),
                events,
                overflow,
            });
        Registration {
            router: self.clone(),
            user_id: user_id.to_owned(),
            connection_id,
        }
    }

    /// Assigns the user's next `seq` and queues the event to each of the user's sessions.
    /// A session whose queue is full is told to close as a slow client; it never blocks the
    /// publisher or the user's other sessions.
    pub fn publish(&self, publication: Publication) -> Receipt {
        let mut shard = lock(self.shard(&publication.user_id));
        let routes = shard.entry(publication.user_id).or_default();
        routes.next_seq += 1;
        let seq = routes.next_seq;
        let event = Arc::new(Event {
            seq,
            kind: publication.kind,
            payload: publication.payload,
            run_id: publication.run_id,
            thread_id: publication.thread_id,
        });
        let mut queued = 0;
        for route in &routes.sessions {
            match route.events.try_send(event.clone()) {
                Ok(()) => queued += 1,
                Err(mpsc::error::TrySendError::Full(_)) => route.overflow.cancel(),
                // The session is ending and will unregister itself.
                Err(mpsc::error::TrySendError::Closed(_)) => {}
            }
        }
        drop(shard); // the counters need no lock
        self.metrics.events_published.inc();
        self.metrics.events_routed.inc_by(queued as u64);
        Receipt {
            seq,
            sessions: queued,
        }
    }

    /// Live sessions of one user.
    pub fn sessions_of(&self, user_id: &str) -> usize {
        lock(self.shard(user_id))
            .get(user_id)
            .map_or(0, |r| r.sessions.len())
    }

    fn unregister(&self, user_id: &str, connection_id: &str) {
        let mut shard = lock(self.shard(user_id));
        if let Some(routes) = shard.get_mut(user_id) {
            routes
                .sessions
                .retain(|r| &*r.connection_id != connection_id);
        }
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.router.unregister(&self.user_id, &self.connection_id);
    }
}

/// A panic while holding a shard lock cannot leave a route half-written (every critical
/// section is a single push, retain or increment), so a poisoned lock is still usable.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

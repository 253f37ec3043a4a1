//! Recent events: what this node's live subscriptions carried lately, of every identity, so
//! that a resume reads its missed events from memory instead of from the stream.
//!
//! JetStream answers "this identity's messages from sequence N on" by walking the stream's
//! messages from N, every identity's, until it has found them: with thousands of identities
//! interleaved in one stream, one resume costs the server thousands of message lookups, and
//! a resume storm is bound by the server's CPU. Every node already receives every stored
//! event on its streams' live subscriptions (see [`super::feed`]), each with the sequence of
//! its identity's previous one (`Nats-Last-Sequence`). Kept for a while, within
//! `cluster.recent_bytes`, they answer a resume that can be proven complete from them: the
//! chain of previous-event sequences from the identity's head (read from the stream, as for
//! every resume) back to the resume's position has no link missing. Where one is missing
//! (forgotten, or dropped by a subscription that fell behind), the read goes to the stream.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use prometheus_client::metrics::gauge::Gauge;

/// What an event costs the window beyond its body: its entry and its place in the arrival
/// order.
const ENTRY_BYTES: usize = 48;

/// What an identity costs the window beyond its events: its map entry, its key, its queue.
const IDENTITY_BYTES: usize = 160;

/// Per stream, the recent events of its identities, oldest forgotten first.
#[derive(Debug)]
pub(crate) struct Recent {
    /// Bytes each stream's window may hold (`cluster.recent_bytes` over the streams).
    budget: usize,
    windows: Vec<Mutex<Window>>,
    /// `gateway_cluster_recent_bytes`.
    gauge: Gauge,
}

#[derive(Debug, Default)]
struct Window {
    identities: HashMap<Arc<str>, VecDeque<Kept>>,
    /// The identity of each kept event, in arrival order (which is the stream's order).
    order: VecDeque<Arc<str>>,
    bytes: usize,
    /// The newest sequence kept: one at or below it means the stream started over (or a
    /// copy republished), and the window forgets everything.
    newest: u64,
}

#[derive(Debug)]
struct Kept {
    seq: u64,
    /// The identity's previous event's sequence when this one was stored (0: none).
    previous: u64,
    body: Arc<[u8]>,
}

/// The identity's events after a position, each one's sequence and stored body.
pub(crate) type Following = Vec<(u64, Arc<[u8]>)>;

impl Recent {
    pub fn new(total_bytes: u64, streams: usize, gauge: Gauge) -> Self {
        let streams = streams.max(1);
        Recent {
            budget: usize::try_from(total_bytes / streams as u64).unwrap_or(usize::MAX),
            windows: (0..streams).map(|_| Mutex::default()).collect(),
            gauge,
        }
    }

    fn window(&self, shard: usize) -> std::sync::MutexGuard<'_, Window> {
        self.windows[shard]
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// Keeps an event the live subscription carried. `key`: the identity's subject tokens.
    pub fn keep(&self, shard: usize, key: &str, seq: u64, previous: u64, body: &[u8]) {
        let cost = body.len() + ENTRY_BYTES;
        if cost + IDENTITY_BYTES + key.len() > self.budget {
            return;
        }
        // Copied before the lock: the live subscription's task waits on it.
        let kept = Kept {
            seq,
            previous,
            body: body.into(),
        };
        let mut window = self.window(shard);
        let before = window.bytes;
        if seq <= window.newest {
            *window = Window::default();
        }
        window.newest = seq;
        let key = match window.identities.get_mut(key) {
            Some(events) => {
                events.push_back(kept);
                window
                    .identities
                    .get_key_value(key)
                    .expect("just found")
                    .0
                    .clone()
            }
            None => {
                let key: Arc<str> = Arc::from(key);
                window.bytes += IDENTITY_BYTES + key.len();
                window
                    .identities
                    .insert(key.clone(), VecDeque::from([kept]));
                key
            }
        };
        window.order.push_back(key);
        window.bytes += cost;
        while window.bytes > self.budget {
            window.forget_oldest();
        }
        self.gauge.inc_by(window.bytes as i64 - before as i64);
    }

    /// Forgets a stream's events: its subscription was made again, and what it carries
    /// next need not follow what was kept.
    pub fn clear(&self, shard: usize) {
        let mut window = self.window(shard);
        self.gauge.dec_by(window.bytes as i64);
        *window = Window::default();
    }

    /// Whether the window holds the event that follows `since` for the identity (or `since`
    /// as its newest): worth waiting for the head before reading the stream.
    pub fn knows(&self, shard: usize, key: &str, since: u64) -> bool {
        let window = self.window(shard);
        window.identities.get(key).is_some_and(|kept| {
            let next = kept.partition_point(|k| k.seq <= since);
            match kept.get(next) {
                Some(k) => k.previous == since,
                None => kept.back().is_some_and(|k| k.seq == since),
            }
        })
    }

    /// The identity's events after `since` through its head, oldest first, at most `max`,
    /// when the window proves it holds all of them (or the first `max`): each event's
    /// previous is the one before it, from `since` on, up to the head, whose body is the
    /// one the stream holds under that sequence. `None` when a link is missing.
    pub fn after(
        &self,
        shard: usize,
        key: &str,
        since: u64,
        (head, head_body): (u64, Option<&[u8]>),
        max: usize,
    ) -> Option<Following> {
        if head == since {
            // The identity's newest event is `since`: nothing was missed.
            return Some(Vec::new());
        }
        if head < since {
            return None;
        }
        let window = self.window(shard);
        let kept = window.identities.get(key)?;
        let mut got = Vec::new();
        let mut previous = since;
        for k in kept.range(kept.partition_point(|k| k.seq <= since)..) {
            if k.previous != previous || k.seq > head {
                return None;
            }
            if k.seq == head {
                // The same event, not one of a stream made anew under the same number.
                if head_body != Some(&k.body[..]) {
                    return None;
                }
                got.push((k.seq, k.body.clone()));
                return Some(got);
            }
            got.push((k.seq, k.body.clone()));
            if got.len() >= max {
                return Some(got);
            }
            previous = k.seq;
        }
        None
    }

    /// Bytes kept, all streams together.
    #[cfg(test)]
    fn bytes(&self) -> usize {
        (0..self.windows.len())
            .map(|shard| self.window(shard).bytes)
            .sum()
    }
}

impl Window {
    fn forget_oldest(&mut self) {
        let Some(key) = self.order.pop_front() else {
            self.bytes = 0;
            return;
        };
        let Some(kept) = self.identities.get_mut(&key) else {
            return;
        };
        if let Some(k) = kept.pop_front() {
            self.bytes -= k.body.len() + ENTRY_BYTES;
        }
        if kept.is_empty() {
            self.identities.remove(&key);
            self.bytes -= IDENTITY_BYTES + key.len();
        } else if kept.capacity() > 16 && kept.len() < kept.capacity() / 4 {
            // One long message's appends must not keep their queue's size for good.
            kept.shrink_to(kept.len() * 2);
        }
        if self.order.capacity() > 1024 && self.order.len() < self.order.capacity() / 4 {
            self.order.shrink_to(self.order.len() * 2);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Events of identities `a` and `b` interleaved, each linked to its identity's previous;
    /// each body is its sequence.
    fn window() -> Recent {
        let recent = Recent::new(1 << 20, 1, Gauge::default());
        let mut previous: HashMap<&str, u64> = HashMap::new();
        for seq in 1..=20 {
            let key = if seq % 2 == 0 { "a" } else { "b" };
            let before = previous.insert(key, seq).unwrap_or(0);
            recent.keep(0, key, seq, before, seq.to_string().as_bytes());
        }
        recent
    }

    /// `after`, with the body the stream holds for `head` its sequence, as kept.
    fn after(recent: &Recent, key: &str, since: u64, head: u64, max: usize) -> Option<Vec<u64>> {
        let body = head.to_string();
        let got = recent.after(0, key, since, (head, Some(body.as_bytes())), max)?;
        Some(got.into_iter().map(|(seq, _)| seq).collect())
    }

    #[test]
    fn answers_a_complete_chain_and_nothing_else() {
        let recent = window();
        assert_eq!(after(&recent, "a", 10, 16, 100), Some(vec![12, 14, 16]));
        assert_eq!(after(&recent, "a", 10, 16, 2), Some(vec![12, 14]));
        assert_eq!(after(&recent, "a", 20, 20, 100), Some(vec![]));
        // A head the window has not seen yet, a position not the identity's, another's head.
        assert_eq!(after(&recent, "a", 10, 22, 100), None);
        assert_eq!(after(&recent, "a", 11, 16, 100), None);
        assert_eq!(after(&recent, "a", 10, 15, 100), None);
        assert_eq!(after(&recent, "c", 10, 16, 100), None);
        assert!(recent.knows(0, "a", 10) && recent.knows(0, "a", 20));
        assert!(!recent.knows(0, "a", 11) && !recent.knows(0, "c", 10));
        // The head's number with another body: a stream made anew the window has not
        // caught up with.
        assert_eq!(recent.after(0, "a", 10, (16, Some(b"other")), 100), None);
        assert_eq!(recent.after(0, "a", 10, (16, None), 100), None);
    }

    #[test]
    fn a_missing_link_sends_the_read_to_the_stream() {
        let recent = Recent::new(1 << 20, 1, Gauge::default());
        recent.keep(0, "a", 2, 0, b"2");
        // 4 was stored (6's previous) but never arrived.
        recent.keep(0, "a", 6, 4, b"6");
        recent.keep(0, "a", 8, 6, b"8");
        assert_eq!(after(&recent, "a", 6, 8, 100), Some(vec![8]));
        assert_eq!(after(&recent, "a", 2, 8, 100), None);
        assert!(!recent.knows(0, "a", 2));
        assert_eq!(after(&recent, "a", 4, 8, 100), Some(vec![6, 8]));
    }

    #[test]
    fn forgets_the_oldest_within_its_budget_and_everything_when_the_stream_starts_over() {
        let entry = ENTRY_BYTES + 2;
        let budget = 10 * entry + IDENTITY_BYTES + 1;
        let recent = Recent::new(budget as u64, 1, Gauge::default());
        for seq in 1..=30 {
            recent.keep(0, "a", seq, seq - 1, b"xy");
        }
        assert_eq!(recent.bytes(), budget);
        assert_eq!(recent.gauge.get(), budget as i64);
        assert!(recent.knows(0, "a", 20) && !recent.knows(0, "a", 19));
        // Sequences from 1 again: the stream was made anew.
        recent.keep(0, "b", 1, 0, b"xy");
        assert_eq!(recent.bytes(), entry + IDENTITY_BYTES + 1);
        assert!(!recent.knows(0, "a", 20));
        assert_eq!(recent.gauge.get(), recent.bytes() as i64);
        recent.clear(0);
        assert_eq!((recent.bytes(), recent.gauge.get()), (0, 0));
    }
}

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

/// What an event costs the window beyond its body: its entry, its place in the arrival
/// order, the identity's share of the map.
const ENTRY_BYTES: usize = 64;

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
    body: Box<[u8]>,
}

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
        if cost > self.budget {
            return;
        }
        let mut window = self.window(shard);
        if seq <= window.newest {
            self.gauge.dec_by(window.bytes as i64);
            *window = Window::default();
        }
        window.newest = seq;
        let kept = Kept {
            seq,
            previous,
            body: body.into(),
        };
        let key = match window.identities.get_key_value(key) {
            Some((key, _)) => key.clone(),
            None => Arc::from(key),
        };
        window
            .identities
            .entry(key.clone())
            .or_default()
            .push_back(kept);
        window.order.push_back(key);
        window.bytes += cost;
        let mut forgot = 0;
        while window.bytes > self.budget {
            forgot += window.forget_oldest();
        }
        self.gauge.inc_by(cost as i64 - forgot as i64);
    }

    /// Forgets a stream's events: its subscription was made again, and what it carries
    /// next need not follow what was kept.
    pub fn clear(&self, shard: usize) {
        let mut window = self.window(shard);
        self.gauge.dec_by(window.bytes as i64);
        *window = Window::default();
    }

    /// Whether the window holds what follows `since` for the identity (or `since` as its
    /// newest event): worth waiting for the head before reading the stream.
    pub fn knows(&self, shard: usize, key: &str, since: u64) -> bool {
        let window = self.window(shard);
        window.identities.get(key).is_some_and(|kept| {
            kept.back().is_some_and(|k| k.seq == since) || kept.iter().any(|k| k.previous == since)
        })
    }

    /// The identity's events after `since` through `head`, oldest first, at most `max`
    /// (each one's sequence and stored body), when the window proves it holds all of them:
    /// from `head` back, each event's previous is the event before it, down to one whose
    /// previous is `since`. `None` when a link is missing.
    pub fn after(
        &self,
        shard: usize,
        key: &str,
        since: u64,
        head: u64,
        max: usize,
    ) -> Option<Vec<(u64, Box<[u8]>)>> {
        if head == since {
            // The identity's newest event is `since`: nothing was missed.
            return Some(Vec::new());
        }
        if head < since {
            return None;
        }
        let window = self.window(shard);
        let kept = window.identities.get(key)?;
        let last = kept.binary_search_by_key(&head, |k| k.seq).ok()?;
        let mut first = last;
        loop {
            let previous = kept[first].previous;
            if previous == since {
                break;
            }
            if previous < since || first == 0 || kept[first - 1].seq != previous {
                return None;
            }
            first -= 1;
        }
        Some(
            kept.range(first..=last)
                .take(max)
                .map(|k| (k.seq, k.body.clone()))
                .collect(),
        )
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
    /// Forgets the oldest event; what it cost.
    fn forget_oldest(&mut self) -> usize {
        let Some(key) = self.order.pop_front() else {
            return std::mem::take(&mut self.bytes);
        };
        let mut cost = 0;
        if let Some(kept) = self.identities.get_mut(&key) {
            if let Some(k) = kept.pop_front() {
                cost = k.body.len() + ENTRY_BYTES;
            }
            if kept.is_empty() {
                self.identities.remove(&key);
            }
        }
        self.bytes -= cost;
        cost
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Events of identities `a` and `b` interleaved, each linked to its identity's previous.
    fn window() -> Recent {
        let recent = Recent::new(1 << 20, 1, Gauge::default());
        let mut previous: HashMap<&str, u64> = HashMap::new();
        for seq in 1..=20 {
            let key = if seq % 2 == 0 { "a" } else { "b" };
            let before = previous.insert(key, seq).unwrap_or(0);
            recent.keep(0, key, seq, before, format!("{seq}").as_bytes());
        }
        recent
    }

    fn seqs(got: Option<Vec<(u64, Box<[u8]>)>>) -> Option<Vec<u64>> {
        got.map(|v| v.into_iter().map(|(seq, _)| seq).collect())
    }

    #[test]
    fn answers_a_complete_chain_and_nothing_else() {
        let recent = window();
        assert_eq!(
            seqs(recent.after(0, "a", 10, 16, 100)),
            Some(vec![12, 14, 16])
        );
        assert_eq!(seqs(recent.after(0, "a", 10, 16, 2)), Some(vec![12, 14]));
        assert_eq!(seqs(recent.after(0, "a", 20, 20, 100)), Some(vec![]));
        // A head the window has not seen yet, a position not the identity's, another's head.
        assert_eq!(seqs(recent.after(0, "a", 10, 22, 100)), None);
        assert_eq!(seqs(recent.after(0, "a", 11, 16, 100)), None);
        assert_eq!(seqs(recent.after(0, "a", 10, 15, 100)), None);
        assert_eq!(seqs(recent.after(0, "c", 10, 16, 100)), None);
        assert!(recent.knows(0, "a", 10) && recent.knows(0, "a", 20));
        assert!(!recent.knows(0, "a", 11) && !recent.knows(0, "c", 10));
    }

    #[test]
    fn a_missing_link_sends_the_read_to_the_stream() {
        let recent = Recent::new(1 << 20, 1, Gauge::default());
        recent.keep(0, "a", 2, 0, b"x");
        // 4 was stored (6's previous) but never arrived.
        recent.keep(0, "a", 6, 4, b"x");
        recent.keep(0, "a", 8, 6, b"x");
        assert_eq!(seqs(recent.after(0, "a", 6, 8, 100)), Some(vec![8]));
        assert_eq!(seqs(recent.after(0, "a", 2, 8, 100)), None);
        assert_eq!(seqs(recent.after(0, "a", 4, 8, 100)), Some(vec![6, 8]));
    }

    #[test]
    fn forgets_the_oldest_within_its_budget_and_everything_when_the_stream_starts_over() {
        let recent = Recent::new(10 * (ENTRY_BYTES as u64 + 2), 1, Gauge::default());
        for seq in 1..=30 {
            recent.keep(0, "a", seq, seq - 1, b"xy");
        }
        assert_eq!(recent.bytes(), 10 * (ENTRY_BYTES + 2));
        assert_eq!(recent.gauge.get(), recent.bytes() as i64);
        assert_eq!(
            seqs(recent.after(0, "a", 20, 30, 100)).map(|v| v.len()),
            Some(10)
        );
        assert_eq!(seqs(recent.after(0, "a", 19, 30, 100)), None);
        // Sequences from 1 again: the stream was made anew.
        recent.keep(0, "a", 1, 0, b"xy");
        assert_eq!(recent.bytes(), ENTRY_BYTES + 2);
        assert_eq!(seqs(recent.after(0, "a", 20, 30, 100)), None);
        assert_eq!(recent.gauge.get(), recent.bytes() as i64);
        recent.clear(0);
        assert_eq!((recent.bytes(), recent.gauge.get()), (0, 0));
    }
}

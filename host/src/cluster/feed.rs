//! Live feeds: while a node holds sessions of an identity, one task subscribes to the
//! identity's live subject and hands its events, in stream order and each once, to the
//! router. The stream republishes each stored event with the sequence of the identity's
//! previous one (`Nats-Last-Sequence`), so a feed sees any gap and fills it from the stream
//! before going on: after a NATS reconnect, a slow subscription, or while a new subscription
//! propagates through a NATS cluster.

use std::sync::{Arc, Weak};
use std::time::Duration;

use futures_util::StreamExt;
use tokio::sync::{oneshot, watch};

use super::{Cluster, Unavailable, decode, now_micros, number_header};
use crate::auth::Identity;
use crate::router::{Delivery, Router};
use crate::sandbox::Event;

/// Most events one request fetches to fill a gap.
const FILL_BATCH: u64 = 256;

/// When a new subscription looks at the stream again (see `follow`).
const RECHECK_AFTER: Duration = Duration::from_millis(500);

/// The router's handle on a feed: dropping it ends the feed and its subscription.
#[derive(Debug)]
pub struct Feed {
    pub generation: u64,
    /// True once the subscription is in place and the identity's head known: events
    /// stored from then on reach the identity's sessions here.
    pub ready: watch::Receiver<bool>,
    _stop: oneshot::Sender<()>,
}

/// Where a feed stands: the last `seq` handed to the router.
struct Position {
    /// An event of the identity (`anchored`); before the first, the stream's last sequence
    /// when the feed started, which every later event of the identity is past.
    delivered: u64,
    anchored: bool,
}

/// Why a feed's subscription must be set up again.
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

/// Waits until the node's backlog has room again (half of `limits.max_queued_bytes`).
async fn room(router: &Weak<Router>) {
    match router.upgrade() {
        Some(router) => router.room().await,
        // The feed ends with its next delivery.
        None => std::future::pending().await,
    }
}

impl Cluster {
    /// Starts the feed of an identity that just got its first session on this node.
    pub fn open_feed(
        self: &Arc<Self>,
        identity: &Identity,
        generation: u64,
        router: Weak<Router>,
    ) -> Feed {
        let (ready_tx, ready) = watch::channel(false);
        let (stop_tx, stop) = oneshot::channel();
        let cluster = self.clone();
        let identity = identity.clone();
        tokio::spawn(async move {
            cluster.metrics.cluster_feeds.inc();
            cluster
                .run_feed(&identity, generation, &router, ready_tx, stop)
                .await;
            cluster.metrics.cluster_feeds.dec();
        });
        Feed {
            generation,
            ready,
            _stop: stop_tx,
        }
    }

    async fn run_feed(
        &self,
        identity: &Identity,
        generation: u64,
        router: &Weak<Router>,
        ready: watch::Sender<bool>,
        mut stop: oneshot::Receiver<()>,
    ) {
        let mut epoch = self.link.epoch.subscribe();
        let mut position: Option<Position> = None;
        let mut backoff = Duration::from_millis(100);
        loop {
            let outcome = tokio::select! {
                _ = &mut stop => return,
                outcome = self.follow(identity, generation, router, &ready, &mut epoch, &mut position) => outcome,
            };
            match outcome {
                Lost::Stopped => return,
                Lost::Nats(e) => {
                    tracing::debug!(error = %e, "live feed interrupted; setting it up again");
                }
                Lost::Evicted => {
                    // Its sessions close with 1013; a client that resumes learns
                    // `recovered:false`. The router drops this feed with them.
                    if let Some(router) = router.upgrade() {
                        let sessions = router.interrupt(identity, generation);
                        tracing::warn!(
                            sessions,
                            "events were removed from the stream before this node's feed \
                             read them; its sessions close with 1013 and resume"
                        );
                    }
                    return;
                }
            }
            // Until NATS is back (a new epoch) or a short while has passed.
            tokio::select! {
                _ = &mut stop => return,
                _ = epoch.changed() => {}
                () = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    }

    /// Subscribes, catches up from the stream, then hands on live events until something
    /// breaks.
    async fn follow(
        &self,
        identity: &Identity,
        generation: u64,
        router: &Weak<Router>,
        ready: &watch::Sender<bool>,
        epoch: &mut watch::Receiver<u64>,
        position: &mut Option<Position>,
    ) -> Lost {
        let subject = self.live_subject(identity);
        let subscribed = async {
            let subscriber = self
                .feeds
                .subscribe(subject)
                .await
                .map_err(|e| Unavailable(e.to_string()))?;
            // The server has the subscription once it answers a ping sent after it.
            self.feeds
                .flush()
                .await
                .map_err(|e| Unavailable(e.to_string()))?;
            Ok::<_, Unavailable>(subscriber)
        };
        let mut subscriber = match tokio::time::timeout(self.request_timeout, subscribed).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => return Lost::Nats(e),
            Err(_) => return Lost::Nats(Unavailable("subscribe: no answer in time".into())),
        };
        epoch.mark_unchanged();
        let head = match self.head_of(identity).await {
            Ok(head) => head,
            Err(e) => return Lost::Nats(e),
        };
        // Queues an event to the identity's sessions here: `Ok(false)` when this node's
        // backlog is at `limits.max_queued_bytes` and it stays in the stream.
        let deliver = |event: Event, at: u64| -> Result<bool, Lost> {
            let router = router.upgrade().ok_or(Lost::Stopped)?;
            match router.deliver(identity, generation, Arc::new(event)) {
                Delivery::Queued => {
                    if at > 0 {
                        let lag = now_micros().saturating_sub(at) as f64 / 1e6;
                        self.metrics.cluster_lag_seconds.observe(lag);
                    }
                    Ok(true)
                }
                Delivery::Full => {
                    self.metrics.cluster_feed_pauses.inc();
                    Ok(false)
                }
                Delivery::Gone => Err(Lost::Stopped),
            }
        };
        let full = || router.upgrade().is_some_and(|r| r.full());
        let position = match position {
            // A first subscription starts at the identity's head: sessions get what is
            // stored from now on (a resuming one reads the stream itself).
            None if head > 0 => position.insert(Position {
                delivered: head,
                anchored: true,
            }),
            // No event of the identity yet: every later one is past the stream's end now.
            None => match self.last_seq(identity).await {
                Ok(last) => position.insert(Position {
                    delivered: last,
                    anchored: false,
                }),
                Err(e) => return Lost::Nats(e),
            },
            Some(p) => p,
        };
        // Behind: this node's backlog was at its bound, so the events after the position
        // were left in the stream; live messages are let go (the stream has them) until
        // there is room and the feed reads them from there.
        let mut behind = match self.fill(identity, position, head, &deliver, &full).await {
            Ok(caught_up) => !caught_up,
            Err(lost) => return lost,
        };
        ready.send_replace(true);
        // In a NATS cluster a new subscription reaches the stream's server a moment later:
        // an event stored meanwhile is not republished to it. One look at the head shortly
        // after finds it even if no later event comes to reveal the gap.
        let recheck = tokio::time::sleep(RECHECK_AFTER);
        tokio::pin!(recheck);
        let mut rechecked = false;
        loop {
            tokio::select! {
                () = &mut recheck, if !rechecked => {
                    rechecked = true;
                    if behind {
                        // Catching up reads to the head anyway.
                        continue;
                    }
                    let head = match self.head_of(identity).await {
                        Ok(head) => head,
                        Err(e) => return Lost::Nats(e),
                    };
                    match self.fill(identity, position, head, &deliver, &full).await {
                        Ok(caught_up) => behind = !caught_up,
                        Err(lost) => return lost,
                    }
                }
                () = room(router), if behind => {
                    // The node's backlog fell to half its bound: read what was left in the
                    // stream, a few feeds at a time.
                    let _permit = self.catch_ups.acquire().await;
                    if full() {
                        continue;
                    }
                    let head = match self.head_of(identity).await {
                        Ok(head) => head,
                        Err(e) => return Lost::Nats(e),
                    };
                    match self.fill(identity, position, head, &deliver, &full).await {
                        Ok(caught_up) => behind = !caught_up,
                        Err(lost) => return lost,
                    }
                }
                message = subscriber.next() => {
                    let Some(message) = message else {
                        return Lost::Nats(Unavailable("subscription ended".into()));
                    };
                    if behind {
                        // Kept in the stream; read from there when there is room.
                        continue;
                    }
                    let header = |name: &str| number_header(&message, name);
                    let (Some(seq), previous) = (header("Nats-Sequence"), header("Nats-Last-Sequence")) else {
                        tracing::warn!("live message without a stream sequence; ignored");
                        continue;
                    };
                    if seq <= position.delivered {
                        continue;
                    }
                    if let Some(previous) = previous.filter(|p| *p > position.delivered) {
                        match self.fill(identity, position, previous, &deliver, &full).await {
                            Ok(true) => {}
                            Ok(false) => {
                                behind = true;
                                continue;
                            }
                            Err(lost) => return lost,
                        }
                    }
                    position.anchored = true;
                    let Some((event, at)) = decode(seq, &message.payload) else {
                        position.delivered = seq;
                        continue;
                    };
                    match deliver(event, at) {
                        Ok(true) => position.delivered = seq,
                        Ok(false) => behind = true,
                        Err(lost) => return lost,
                    }
                }
                changed = epoch.changed() => {
                    if changed.is_err() {
                        return Lost::Stopped;
                    }
                    if behind {
                        // Catching up reads to the head anyway.
                        continue;
                    }
                    // Reconnected, or some subscription overflowed: whatever was missed is
                    // in the stream.
                    let _permit = self.catch_ups.acquire().await;
                    let head = match self.head_of(identity).await {
                        Ok(head) => head,
                        Err(e) => return Lost::Nats(e),
                    };
                    match self.fill(identity, position, head, &deliver, &full).await {
                        Ok(caught_up) => behind = !caught_up,
                        Err(lost) => return lost,
                    }
                }
            }
        }
    }

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
        deliver: &impl Fn(Event, u64) -> Result<bool, Lost>,
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
                    if !deliver(record.event, 0)? {
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

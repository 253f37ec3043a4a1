//! Process-wide counters, exposed at `/metrics` in Prometheus text format.
//!
//! Counters only: nothing here holds or names a user's data.

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

type Labels = Vec<(&'static str, &'static str)>;
/// Labels whose values are known only at run time (a guest's version).
type OwnedLabels = Vec<(&'static str, String)>;

#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    pub sessions_live: Gauge,
    /// The allocator's view of the heap, sampled at each scrape.
    allocated_bytes: Gauge,
    allocator_resident_bytes: Gauge,
    pub sse_sessions_live: Gauge,
    /// Connections still speaking HTTP (not upgraded), on all listeners.
    pub http_connections: Gauge,
    pub instances_live: Gauge,
    /// Live instances by guest version (`name@sha256-prefix`): after a hot reload, the
    /// connections still on the previous guest.
    pub guest_instances: Family<OwnedLabels, Gauge>,
    /// Hibernated connections by the guest version that will restore them.
    pub guest_hibernated: Family<OwnedLabels, Gauge>,
    pub instantiations: Counter,
    pub instantiate_seconds: Histogram,
    pub sessions_ended: Counter,
    /// Sum of ended sessions' lifetimes; divided by `sessions_ended` it is the average.
    pub session_lifetime_seconds: Counter<f64, AtomicU64>,
    pub events_published: Counter,
    /// Messages still streaming at `streams.max_open_secs`, ended as `failed`.
    pub messages_expired: Counter,
    /// Message appends folded into another append by a session's rollup (not handed to
    /// the guest on their own).
    pub appends_rolled_up: Counter,
    /// Events handed to a session's queue (one per live connection of the user).
    pub events_routed: Counter,
    /// Events a guest was called with.
    pub events_delivered: Counter,
    pub frames_sent: Counter,
    pub frames_received: Counter,
    /// Sessions closed as slow clients because their queue was full.
    pub queue_overflows: Counter,
    /// Bytes of events queued to this node's sessions and not yet taken (the backlog that
    /// `limits.max_queued_bytes` bounds).
    pub queued_bytes: Gauge,
    /// The node's queue delay, sampled every tick (see `limits.queue_delay_ms`).
    pub queue_delay_seconds: Histogram,
    /// Publishes that waited for the queue delay to fall before they were taken.
    pub publish_waits: Counter,
    /// How long publishes that waited were held (admitted or refused).
    pub publish_wait_seconds: Histogram,
    /// Cluster mode: times a feed left events in the stream because this node's backlog was
    /// at `limits.max_queued_bytes`; it read them from the stream once there was room.
    pub cluster_feed_pauses: Counter,
    /// Events replayed to resuming clients.
    pub events_replayed: Counter,
    /// Event frames a guest made too large for the client, replaced by a marker.
    pub event_frames_too_large: Counter,
    /// Bytes the event log holds.
    pub history_bytes: Gauge,
    /// Events the log evicted, by cause (count, age, bytes).
    pub history_evictions: Family<Labels, Counter>,
    /// Turns that stopped handing events to a guest at the turn's byte or time bound, with
    /// events still queued (the session yielded and took them in its next turn).
    pub turns_cut: Counter,
    /// Sessions whose handler is hibernated: saved to bytes, no instance.
    pub sessions_hibernated: Gauge,
    /// Bytes of saved handler state those sessions hold.
    pub hibernated_bytes: Gauge,
    /// Hibernated handlers brought back for a frame or an event.
    pub wakes: Counter,
    /// Time to wake one: a fresh instance and its `restore`.
    pub wake_seconds: Histogram,
    /// Cluster mode: 1 while the NATS connection is up.
    pub nats_connected: Gauge,
    /// Cluster mode: NATS connections re-established after a loss.
    pub nats_reconnects: Counter,
    /// Cluster mode: identities this node holds a live subscription for.
    pub cluster_feeds: Gauge,
    pub cluster_nodes: Gauge,
    /// Cluster mode: events fetched from the stream because live delivery skipped them
    /// (a NATS reconnect, a slow subscription, a subscription still propagating).
    pub cluster_gap_events: Counter,
    /// Cluster mode: resumes answered by a read another resume of the same identity and
    /// position was waiting for.
    pub cluster_shared_reads: Counter,
    /// Cluster mode: resumes whose missed events (none, for one already at the head) were
    /// taken from what this node's live subscriptions carried lately (`cluster.recent_bytes`)
    /// instead of from the stream.
    pub cluster_recent_reads: Counter,
    /// Cluster mode: bytes those recent events take.
    pub cluster_recent_bytes: Gauge,
    /// Cluster mode: from the stream storing an event to this node queueing it.
    pub cluster_lag_seconds: Histogram,
    /// Cluster mode: times this node's watch of the operators' disconnects ended (NATS
    /// stopped feeding it) and was started again; the new watch replays every record, and
    /// only those newer than the last one applied close sessions.
    pub disconnect_watch_restarts: Counter,
    nats_round_trips: Family<Labels, Histogram, fn() -> Histogram>,
    hibernations: Family<Labels, Counter>,
    guest_faults: Family<Labels, Counter>,
    resumes: Family<Labels, Counter>,
    guest_reloads: Family<Labels, Counter>,
    tls_handshakes: Family<Labels, Counter>,
    guest_compiles: Family<Labels, Counter>,
    tls_reloads: Family<Labels, Counter>,
    refusals: Family<Labels, Counter>,
    closes: Family<Labels, Counter>,
    /// Client RPC calls, by outcome (`ok`, a backend failure, or a refusal's code).
    rpc_calls: Family<Labels, Counter>,
    /// Presence webhooks waiting to be posted.
    pub webhooks_pending: Gauge,
    /// From a presence transition (for `user.offline`, the last close) to its webhook
    /// being accepted by the receiver, debounce and retries included.
    pub webhook_delay_seconds: Histogram,
    /// Webhook attempts that failed and were tried again.
    pub webhook_retries: Counter,
    webhooks_delivered: Family<Labels, Counter>,
    webhooks_given_up: Family<Labels, Counter>,
    /// Client RPC calls in flight to the backend (`rpc.max_in_flight` bounds them).
    pub rpc_in_flight: Gauge,
    /// Client RPC calls sent to the backend: from sending to the answer (or giving up).
    pub rpc_call_seconds: Histogram,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("gateway");
        let m = Metrics {
            sessions_live: Gauge::default(),
            allocated_bytes: Gauge::default(),
            allocator_resident_bytes: Gauge::default(),
            sse_sessions_live: Gauge::default(),
            http_connections: Gauge::default(),
            instances_live: Gauge::default(),
            guest_instances: Family::default(),
            guest_hibernated: Family::default(),
            instantiations: Counter::default(),
            instantiate_seconds: Histogram::new(exponential_buckets(10e-6, 2.0, 16)),
            sessions_ended: Counter::default(),
            session_lifetime_seconds: Counter::default(),
            events_published: Counter::default(),
            messages_expired: Counter::default(),
            appends_rolled_up: Counter::default(),
            events_routed: Counter::default(),
            events_delivered: Counter::default(),
            frames_sent: Counter::default(),
            frames_received: Counter::default(),
            queue_overflows: Counter::default(),
            queued_bytes: Gauge::default(),
            queue_delay_seconds: Histogram::new(exponential_buckets(50e-6, 2.0, 18)),
            publish_waits: Counter::default(),
            publish_wait_seconds: Histogram::new(exponential_buckets(250e-6, 2.0, 14)),
            cluster_feed_pauses: Counter::default(),
            turns_cut: Counter::default(),
            sessions_hibernated: Gauge::default(),
            hibernated_bytes: Gauge::default(),
            wakes: Counter::default(),
            // Finer than the instantiation histogram: the wake-up target is 1 ms at p99.
            wake_seconds: Histogram::new(exponential_buckets(20e-6, 1.25, 36)),
            nats_connected: Gauge::default(),
            nats_reconnects: Counter::default(),
            cluster_feeds: Gauge::default(),
            cluster_nodes: Gauge::default(),
            cluster_gap_events: Counter::default(),
            cluster_shared_reads: Counter::default(),
            cluster_recent_reads: Counter::default(),
            cluster_recent_bytes: Gauge::default(),
            cluster_lag_seconds: Histogram::new(exponential_buckets(50e-6, 1.5, 30)),
            disconnect_watch_restarts: Counter::default(),
            nats_round_trips: Family::new_with_constructor(|| {
                Histogram::new(exponential_buckets(25e-6, 1.5, 32))
            }),
            hibernations: Family::default(),
            events_replayed: Counter::default(),
            event_frames_too_large: Counter::default(),
            history_bytes: Gauge::default(),
            history_evictions: Family::default(),
            resumes: Family::default(),
            guest_reloads: Family::default(),
            tls_handshakes: Family::default(),
            guest_compiles: Family::default(),
            tls_reloads: Family::default(),
            guest_faults: Family::default(),
            refusals: Family::default(),
            closes: Family::default(),
            rpc_calls: Family::default(),
            rpc_in_flight: Gauge::default(),
            webhooks_pending: Gauge::default(),
            webhook_delay_seconds: Histogram::new(exponential_buckets(1e-3, 1.5, 32)),
            webhook_retries: Counter::default(),
            webhooks_delivered: Family::default(),
            webhooks_given_up: Family::default(),
            rpc_call_seconds: Histogram::new(exponential_buckets(100e-6, 1.5, 32)),
            registry: Registry::default(),
        };
        registry.register(
            "heap_allocated_bytes",
            "Bytes the gateway holds allocated on its heap (jemalloc's stats.allocated), sampled at each scrape",
            m.allocated_bytes.clone(),
        );
        registry.register(
            "heap_resident_bytes",
            "Bytes of heap pages resident in memory (jemalloc's stats.resident): allocated, allocator metadata, and freed pages not yet returned to the system",
            m.allocator_resident_bytes.clone(),
        );
        registry.register(
            "sessions_live",
            "Sessions open (WebSocket and SSE)",
            m.sessions_live.clone(),
        );
        registry.register(
            "sse_sessions_live",
            "SSE sessions open (also counted in sessions_live)",
            m.sse_sessions_live.clone(),
        );
        registry.register(
            "http_connections",
            "Connections still speaking HTTP (handshakes, publishers, probes; not SSE streams)",
            m.http_connections.clone(),
        );
        registry.register(
            "instances_live",
            "Guest instances (stores) alive",
            m.instances_live.clone(),
        );
        registry.register(
            "instantiations",
            "Guest instances created",
            m.instantiations.clone(),
        );
        registry.register(
            "instantiate_seconds",
            "Time to instantiate a guest for a connection",
            m.instantiate_seconds.clone(),
        );
        registry.register(
            "sessions_ended",
            "Sessions that have ended",
            m.sessions_ended.clone(),
        );
        registry.register(
            "session_lifetime_seconds",
            "Total lifetime of ended sessions",
            m.session_lifetime_seconds.clone(),
        );
        registry.register(
            "events_published",
            "Events accepted by the publish API",
            m.events_published.clone(),
        );
        registry.register(
            "messages_expired",
            "Messages still streaming after streams.max_open_secs, ended as failed",
            m.messages_expired.clone(),
        );
        registry.register(
            "appends_rolled_up",
            "Message appends joined into another by a session's rollup (streams.rollup_ms)",
            m.appends_rolled_up.clone(),
        );
        registry.register(
            "events_routed",
            "Events queued to a live session of their user",
            m.events_routed.clone(),
        );
        registry.register(
            "events_delivered",
            "Events passed to a guest",
            m.events_delivered.clone(),
        );
        registry.register(
            "frames_sent",
            "Frames written to clients",
            m.frames_sent.clone(),
        );
        registry.register(
            "frames_received",
            "Frames received from clients",
            m.frames_received.clone(),
        );
        registry.register(
            "queue_overflows",
            "Event queues that overflowed (the session closes as a slow client)",
            m.queue_overflows.clone(),
        );
        registry.register(
            "events_replayed",
            "Events replayed to clients resuming with ?since=",
            m.events_replayed.clone(),
        );
        registry.register(
            "event_frames_too_large",
            "Event frames over the client message limit, sent as a gateway.event_too_large marker",
            m.event_frames_too_large.clone(),
        );
        registry.register(
            "history_bytes",
            "Bytes held by the event log (events, idempotency keys, bookkeeping)",
            m.history_bytes.clone(),
        );
        registry.register(
            "history_evictions",
            "Events evicted from the log, by cause: count, age, bytes",
            m.history_evictions.clone(),
        );
        registry.register(
            "sessions_hibernated",
            "Sessions whose handler is hibernated (state saved, instance dropped)",
            m.sessions_hibernated.clone(),
        );
        registry.register(
            "hibernated_bytes",
            "Bytes of handler state held for hibernated sessions",
            m.hibernated_bytes.clone(),
        );
        registry.register(
            "wakes",
            "Hibernated handlers restored into a fresh instance for a frame or an event",
            m.wakes.clone(),
        );
        registry.register(
            "wake_seconds",
            "Time to wake a hibernated handler (instantiate and restore)",
            m.wake_seconds.clone(),
        );
        registry.register(
            "hibernations",
            "Hibernation attempts of idle handlers, by result: saved, declined (the guest returned none), too_large (state over limits.hibernate_state_bytes; the instance stays live)",
            m.hibernations.clone(),
        );
        registry.register(
            "guest_reloads",
            "Guest reloads (file change, SIGHUP, POST /v1/guest/reload), by result: ok, refused (the guest in use stays)",
            m.guest_reloads.clone(),
        );
        registry.register(
            "guest_instances",
            "Live guest instances, by guest version (component name@first 12 hex digits of its SHA-256)",
            m.guest_instances.clone(),
        );
        registry.register(
            "guest_hibernated",
            "Hibernated connections, by the guest version that saved them and will restore them",
            m.guest_hibernated.clone(),
        );
        registry.register(
            "guest_compiles",
            "Guest loads (start-up, reload), by where the compiled code came from: hit (guest_cache_dir), stored (compiled and cached), not_stored (compiled, no cache)",
            m.guest_compiles.clone(),
        );
        registry.register(
            "tls_handshakes",
            "TLS handshakes on the public listener, by result: ok, failed, timeout",
            m.tls_handshakes.clone(),
        );
        registry.register(
            "tls_reloads",
            "Certificate reloads (file change or SIGHUP), by result: ok, refused (the certificate in use stays)",
            m.tls_reloads.clone(),
        );
        registry.register(
            "resumes",
            "Resumes, by result: recovered (complete replay) or not_recovered",
            m.resumes.clone(),
        );
        registry.register(
            "turns_cut",
            "Session turns that stopped feeding events to the guest at the turn's byte or time bound",
            m.turns_cut.clone(),
        );
        registry.register(
            "guest_faults",
            "Connections closed because their guest misbehaved, by kind",
            m.guest_faults.clone(),
        );
        registry.register(
            "nats_connected",
            "Cluster mode: 1 while the NATS connection is up",
            m.nats_connected.clone(),
        );
        registry.register(
            "nats_reconnects",
            "Cluster mode: NATS connections re-established after a loss",
            m.nats_reconnects.clone(),
        );
        registry.register(
            "nats_round_trip_seconds",
            "Cluster mode: NATS request round trips, by operation (publish, get, batch, info, disconnect)",
            m.nats_round_trips.clone(),
        );
        registry.register(
            "cluster_feeds",
            "Cluster mode: identities this node holds sessions of, each with a feed of its live events",
            m.cluster_feeds.clone(),
        );
        registry.register(
            "cluster_nodes",
            "Cluster mode: gateway processes heartbeating at this node's last look (itself included)",
            m.cluster_nodes.clone(),
        );
        registry.register(
            "queued_bytes",
            "Bytes of events queued to this node's sessions and not yet taken",
            m.queued_bytes.clone(),
        );
        registry.register(
            "queue_delay_seconds",
            "This node's queue delay every 10 ms: the median wait for the node of the events taken in the tick and of those still queued past limits.queue_delay_ms",
            m.queue_delay_seconds.clone(),
        );
        registry.register(
            "publish_waits",
            "Publishes that waited for the queue delay to fall to limits.queue_delay_ms",
            m.publish_waits.clone(),
        );
        registry.register(
            "publish_wait_seconds",
            "How long publishes that waited for the queue delay were held, admitted or refused",
            m.publish_wait_seconds.clone(),
        );
        registry.register(
            "cluster_feed_pauses",
            "Cluster mode: times a feed left events in the stream because this node's backlog was at limits.max_queued_bytes",
            m.cluster_feed_pauses.clone(),
        );
        registry.register(
            "cluster_gap_events",
            "Cluster mode: events fetched from the stream because live delivery skipped them",
            m.cluster_gap_events.clone(),
        );
        registry.register(
            "cluster_shared_reads",
            "Cluster mode: resumes answered by the read of another resume of the same identity and position",
            m.cluster_shared_reads.clone(),
        );
        registry.register(
            "cluster_recent_reads",
            "Cluster mode: resumes whose missed events were taken from what this node's live subscriptions carried lately (cluster.recent_bytes) instead of from the stream",
            m.cluster_recent_reads.clone(),
        );
        registry.register(
            "cluster_recent_bytes",
            "Cluster mode: bytes the recent events kept for resumes take",
            m.cluster_recent_bytes.clone(),
        );
        registry.register(
            "cluster_lag_seconds",
            "Cluster mode: from the stream storing an event to this node queueing it",
            m.cluster_lag_seconds.clone(),
        );
        registry.register(
            "disconnect_watch_restarts",
            "Cluster mode: times the watch of the operators' disconnects ended and was started again",
            m.disconnect_watch_restarts.clone(),
        );
        registry.register(
            "refusals",
            "Connections or requests refused, by reason",
            m.refusals.clone(),
        );
        registry.register(
            "session_closes",
            "Sessions ended, by reason",
            m.closes.clone(),
        );
        registry.register(
            "rpc_calls",
            "Client RPC calls, by outcome (ok, backend_error, bad_answer, answer_too_large, timeout, unavailable, or the refusal's code)",
            m.rpc_calls.clone(),
        );
        registry.register(
            "webhooks_pending",
            "Presence webhooks waiting to be posted",
            m.webhooks_pending.clone(),
        );
        registry.register(
            "webhook_delay_seconds",
            "From a presence transition (for user.offline, the last close) to its webhook accepted by the receiver",
            m.webhook_delay_seconds.clone(),
        );
        registry.register(
            "webhook_retries",
            "Webhook attempts that failed and were tried again",
            m.webhook_retries.clone(),
        );
        registry.register(
            "webhooks_delivered",
            "Presence webhooks the receiver accepted, by type",
            m.webhooks_delivered.clone(),
        );
        registry.register(
            "webhooks_given_up",
            "Presence webhooks not delivered, by why (refused: a 4xx other than 429; attempts: webhooks.max_attempts failed; overflow: webhooks.max_pending)",
            m.webhooks_given_up.clone(),
        );
        registry.register(
            "rpc_calls_in_flight",
            "Client RPC calls waiting for the backend's answer",
            m.rpc_in_flight.clone(),
        );
        registry.register(
            "rpc_call_seconds",
            "Client RPC calls sent to the backend: time to its answer, or to giving up",
            m.rpc_call_seconds.clone(),
        );
        Metrics { registry, ..m }
    }

    pub fn guest_fault(&self, kind: &'static str) {
        self.guest_faults.get_or_create(&vec![("kind", kind)]).inc();
    }

    pub fn hibernation(&self, result: &'static str) {
        self.hibernations
            .get_or_create(&vec![("result", result)])
            .inc();
    }

    pub fn nats_round_trip(&self, op: &'static str, seconds: f64) {
        self.nats_round_trips
            .get_or_create(&vec![("op", op)])
            .observe(seconds);
    }

    pub fn guest_compile(&self, result: &'static str) {
        self.guest_compiles
            .get_or_create(&vec![("result", result)])
            .inc();
    }

    pub fn tls_handshake(&self, result: &'static str) {
        self.tls_handshakes
            .get_or_create(&vec![("result", result)])
            .inc();
    }

    pub fn tls_reload(&self, result: &'static str) {
        self.tls_reloads
            .get_or_create(&vec![("result", result)])
            .inc();
    }

    pub fn guest_reload(&self, result: &'static str) {
        self.guest_reloads
            .get_or_create(&vec![("result", result)])
            .inc();
    }

    pub fn resume(&self, recovered: bool) {
        let result = if recovered {
            "recovered"
        } else {
            "not_recovered"
        };
        self.resumes.get_or_create(&vec![("result", result)]).inc();
    }

    pub fn refusal(&self, reason: &'static str) {
        self.refusals.get_or_create(&vec![("reason", reason)]).inc();
    }

    pub fn session_closed(&self, reason: &'static str) {
        self.closes.get_or_create(&vec![("reason", reason)]).inc();
    }

    /// A call the backend was asked, and how long it took.
    pub fn rpc_call(&self, outcome: &'static str, seconds: f64) {
        self.rpc_calls
            .get_or_create(&vec![("outcome", outcome)])
            .inc();
        self.rpc_call_seconds.observe(seconds);
    }

    pub fn webhook_delivered(&self, kind: &'static str) {
        self.webhooks_delivered
            .get_or_create(&vec![("type", kind)])
            .inc();
    }

    pub fn webhook_given_up(&self, why: &'static str) {
        self.webhooks_given_up
            .get_or_create(&vec![("why", why)])
            .inc();
    }

    /// A call refused before it reached the backend.
    pub fn rpc_refused(&self, code: &'static str) {
        self.rpc_calls.get_or_create(&vec![("outcome", code)]).inc();
    }

    /// The allocator's own totals, read fresh for each scrape: what the process asked for
    /// and what of it is resident (freed pages not yet returned included).
    fn sample_allocator(&self) {
        use tikv_jemalloc_ctl::{epoch, stats};
        if epoch::advance().is_err() {
            return;
        }
        if let Ok(bytes) = stats::allocated::read() {
            self.allocated_bytes.set(bytes as i64);
        }
        if let Ok(bytes) = stats::resident::read() {
            self.allocator_resident_bytes.set(bytes as i64);
        }
    }

    pub fn refusals_for(&self, reason: &'static str) -> u64 {
        self.refusals
            .get(&vec![("reason", reason)])
            .map_or(0, |c| c.get())
    }

    pub fn closes_for(&self, reason: &'static str) -> u64 {
        self.closes
            .get(&vec![("reason", reason)])
            .map_or(0, |c| c.get())
    }

    pub fn render(&self) -> String {
        self.sample_allocator();
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}

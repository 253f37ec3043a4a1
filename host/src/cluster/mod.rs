//! Cluster mode: gateway nodes share one event log, a NATS JetStream stream, so any node
//! accepts publishes and any node accepts connections.
//!
//! - **Publish**: the event goes to `<prefix>.ev.<tenant>.<user>`; the publish answers only
//!   after the stream acknowledged it. Its `seq` is the stream sequence: assigned by the
//!   stream's leader as it stores the event, the same on every node, and increasing for each
//!   identity (with gaps, which clients never interpret). A per-identity counter would need
//!   a compare-and-set round trip per event and would serialise each user's publishers.
//! - **Live fan-out**: the stream republishes every stored event, with its sequence and the
//!   sequence of the identity's previous event, to `<prefix>.live.<shard>.<tenant>.<user>`.
//!   A node subscribes once per stream and keeps, per identity it holds sessions of, only
//!   where its feed stands ([`feed`]); it fills any gap (a reconnect, a subscription still
//!   propagating) from the stream. Every session of an identity on every node gets its
//!   events in stream order, each once.
//! - **Resume**: `since` is a stream sequence. If the event at `since` is still stored and is
//!   the identity's, everything after it is too (JetStream's limits only ever remove an
//!   identity's oldest events), and the replay is read with direct gets, or from the events
//!   this node's live subscriptions carried lately when they provably hold all of it
//!   ([`recent`]).
//! - **Idempotency**: `Nats-Msg-Id` is a digest of the identity and the key, so keys stay
//!   per identity, within the stream's duplicate window.
//! - **Messages** (AI output streams): each op is a record of the identity's subject,
//!   checked and stored with compare-and-set, folded into one snapshot on resume
//!   ([`messages`]).

pub mod feed;
pub mod messages;
pub mod presence;
mod recent;

use async_nats::jetstream::kv;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_nats::jetstream::{self, stream};
use base64::Engine as _;
use futures_util::{FutureExt as _, StreamExt};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use sha2::{Digest, Sha256};
use tokio::sync::{Semaphore, watch};

use crate::auth::Identity;
use crate::config::{ClusterConfig, ClusterStorage, History};
use crate::event_log::{NotRecovered, Replay};
use crate::metrics::Metrics;
use crate::router::Publication;
use crate::sandbox::Event;
use crate::streams::Bounds;

/// Messages a batched read's reply inbox (or another subscription on the main connection)
/// may hold unread.
pub const INBOX_CAPACITY: usize = 4096;

/// Messages a stream's live subscription may hold unread (on a connection of the feeds'
/// own). Its line takes each as it comes and never waits on NATS or a session while it
/// does (a feed's reads run apart), so this is a burst's margin, while the line waits for
/// a worker; past it the client drops messages and says so, and every feed of the node
/// reads its head from the stream, a storm of reads on a busy node: 4,096 overflowed under
/// two saturated nodes' batches. (The per-identity subscriptions before held up to 64
/// each, 640,000 for 10,000 identities.)
pub const FEED_CAPACITY: usize = 32_768;

/// Most records one batched read asks for: with the end-of-batch status they fit an inbox.
const READ_CHUNK: usize = INBOX_CAPACITY - 2;

// A resume's batch (`since`, its events, one more) is one request.
const _: () = assert!(crate::config::MAX_CLUSTER_REPLAY_EVENTS + 2 <= READ_CHUNK);

/// Resume reads one node has in flight at once.
const MAX_READS: usize = 64;

/// A resume read that others may join until it starts.
type WaitingRead = futures_util::future::WeakShared<
    futures_util::future::BoxFuture<'static, Result<Replay, Unavailable>>,
>;

/// Distinct (identity, position) reads waiting before abandoned entries are swept.
const MAX_WAITING_READS: usize = 4096;

/// How long a resume waits for its turn to read before it is closed with 1013.
const READ_QUEUE_WAIT: Duration = Duration::from_secs(30);

/// A stream's name: the configured one, or with many, that name and the shard's number.
fn stream_name(base: &str, shard: usize, shards: usize) -> String {
    match shards {
        1 => base.to_owned(),
        _ => format!("{base}-{shard}"),
    }
}

/// Why the stream could not be used; publishes answer 503 with it, resumes close with 1013.
#[derive(Debug, Clone, thiserror::Error)]
#[error("event log unavailable: {0}")]
pub struct Unavailable(pub String);

/// Why cluster mode could not start.
#[derive(Debug, thiserror::Error)]
pub enum JoinError {
    #[error("cluster.nats_url = {url}: cannot connect to NATS: {reason}")]
    Connect { url: String, reason: String },
    #[error("cluster.stream = {stream}: cannot create or update the JetStream stream: {reason}")]
    Stream { stream: String, reason: String },
    #[error(
        "cluster.streams = {configured}, but the streams of cluster.stream = {stream} were \
         created with cluster.streams = {found}: identities would move to other streams and \
         their earlier positions would be answered wrongly. Set cluster.streams = {found}, \
         or delete those streams first (and lose their history)"
    )]
    StreamCount {
        stream: String,
        configured: usize,
        found: usize,
    },
    #[error("cluster: {0}")]
    Options(String),
}

/// The stream metadata key recording how many streams the identities are spread over.
const STREAMS_METADATA: &str = "gateway_streams";

/// How many streams an existing stream of the set says there are: its metadata, or the
/// description nodes wrote before the metadata (`gateway events, shard 0 of 4`).
fn recorded_streams(info: &stream::Info) -> Option<usize> {
    if let Some(n) = info.config.metadata.get(STREAMS_METADATA) {
        return n.parse().ok();
    }
    let description = info.config.description.as_deref()?;
    description
        .strip_prefix("gateway events, shard ")?
        .split_once(" of ")?
        .1
        .parse()
        .ok()
}

/// Attempts at merging a revocation into a record that others write at the same time.
const REVOCATION_WRITE_TRIES: usize = 8;

/// An operator's disconnect as every node learns it (`POST /v1/disconnect`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Disconnection {
    pub tenant: Option<String>,
    pub user: String,
    pub sid: Option<String>,
    pub reason: String,
    /// When it was made (seconds): an identity-wide revocation refuses tokens issued up to it.
    pub at: u64,
    /// Tokens are refused until then, if revoked.
    pub until: Option<u64>,
    /// The node it was made on (its name, for the audit record).
    pub node: String,
    /// That node's process ([`Cluster::instance`]), which has applied it already.
    pub origin: String,
}

impl Disconnection {
    pub fn identity(&self) -> Identity {
        Identity {
            tenant: self.tenant.clone(),
            user: self.user.clone(),
        }
    }
}

/// A sent event waiting for the stream's answer: when it was sent, and the answer.
pub type PendingAck = (Instant, jetstream::context::PublishAckFuture);

/// What a cluster publish did.
#[derive(Debug, Clone, Copy)]
pub struct Stored {
    pub seq: u64,
    pub duplicate: bool,
}

/// A NATS connection's state, shared with its event callback: the main connection
/// (publishes, reads, disconnects) or the feeds' (live subscriptions only).
#[derive(Debug)]
struct Link {
    /// The feeds' connection: its state is not the node's (`nats_connected`, 503s).
    feeds: bool,
    connected: AtomicBool,
    /// Set when the connection is lost, until it is back.
    lost: AtomicBool,
    /// Bumped on every (re)connection and every slow-consumer report of the feeds'
    /// connection: each feed then checks the stream for events live delivery may have
    /// skipped. Shared by both links.
    epoch: Arc<watch::Sender<u64>>,
    metrics: Arc<Metrics>,
}

impl Link {
    fn on_event(&self, event: async_nats::Event) {
        match event {
            async_nats::Event::Connected => {
                self.connected.store(true, Ordering::Release);
                if !self.feeds {
                    self.metrics.nats_connected.set(1);
                }
                // The first connection is announced too; only a later one is a reconnect.
                if self.lost.swap(false, Ordering::AcqRel) {
                    if !self.feeds {
                        self.metrics.nats_reconnects.inc();
                    }
                    tracing::warn!(
                        feeds = self.feeds,
                        "NATS connection re-established; live feeds catch up"
                    );
                    self.epoch.send_modify(|e| *e += 1);
                }
            }
            async_nats::Event::Disconnected => {
                self.lost.store(true, Ordering::Release);
                self.connected.store(false, Ordering::Release);
                if self.feeds {
                    tracing::error!("NATS connection of the live feeds lost; reconnecting");
                } else {
                    self.metrics.nats_connected.set(0);
                    tracing::error!(
                        "NATS connection lost: publishes answer 503 until it is back; \
                         live connections stay up"
                    );
                }
            }
            async_nats::Event::SlowConsumer(sid) if self.feeds => {
                // The client dropped messages of a feed that was reading a gap: they are
                // in the stream. A later event of that identity reveals the gap; this
                // finds it even if none comes.
                tracing::debug!(sid, "a live feed fell behind; catching up from the stream");
                self.epoch.send_modify(|e| *e += 1);
            }
            async_nats::Event::SlowConsumer(sid) => {
                tracing::warn!(sid, "a read's reply inbox overflowed; the read is retried");
            }
            other => tracing::warn!(event = %other, "NATS"),
        }
    }
}

/// This node's membership: its NATS connection, the stream, and what it needs to read it.
#[derive(Debug)]
pub struct Cluster {
    client: async_nats::Client,
    /// The live feeds' own connection, whose subscriptions hold at most [`FEED_CAPACITY`]
    /// messages each.
    feeds: async_nats::Client,
    js: jetstream::Context,
    /// The streams identities are spread over (see [`Cluster::shard`]).
    streams: Vec<stream::Stream>,
    prefix: String,
    history: History,
    request_timeout: Duration,
    pub subscribe_timeout: Duration,
    link: Arc<Link>,
    metrics: Arc<Metrics>,
    /// Catch-ups after a reconnect run a few at a time, not one per identity at once.
    catch_ups: Semaphore,
    /// Per stream, the task that hands its live events to this node's feeds (see [`feed`]):
    /// started with the first feed.
    lines: std::sync::OnceLock<Vec<feed::LineSender>>,
    /// Resume reads in flight: a resume storm queues here instead of piling requests on the
    /// stream until they time out.
    reads: Semaphore,
    /// Resume reads waiting for their turn, by identity and position (see `read`).
    waiting_reads: std::sync::Mutex<HashMap<(Identity, u64), WaitingRead>>,
    /// Per stream, the last barrier written (when it was sent, its sequence): reads that
    /// began before it was sent share it instead of writing their own.
    barriers: Vec<tokio::sync::Mutex<Option<(Instant, u64)>>>,
    /// Per stream, the events its live subscription carried lately (see `recent.rs`).
    recent: Arc<recent::Recent>,
    /// Operators' disconnects and revocations, so that every node applies them.
    disconnects: kv::Store,
    /// Presence across the cluster (see `presence.rs`).
    presence_records: kv::Store,
    presence_nodes: kv::Store,
    /// `[streams]`: message ops are checked against these.
    bounds: Bounds,
    /// Per identity, its messages as this node last folded them (see `messages.rs`).
    ledgers: messages::Ledgers,
    /// Records the stream keeps per identity: its events and its messages' ops.
    records_per_identity: usize,
    pub node: String,
    /// This process among the nodes: unique even where two nodes share a name.
    pub instance: String,
}

/// An event as stored in the stream (see [`encode`]).
#[derive(Deserialize)]
struct StoredEventOwned<'a> {
    kind: String,
    #[serde(borrow)]
    payload: &'a RawValue,
    run_id: Option<String>,
    thread_id: Option<String>,
    #[serde(default)]
    at: u64,
    #[serde(default)]
    op: Option<messages::OpMeta>,
}

/// A stored event as a read returns it.
#[derive(Debug)]
pub(crate) struct Record {
    pub event: Event,
    /// When the publishing node stored it (microseconds since the epoch).
    pub at: u64,
    /// For a message op (an event of kind `gateway.message`), what a fold needs besides it.
    pub op: Option<messages::OpMeta>,
}

/// The records a read returns, oldest first: each one's sequence, and its record (none when
/// its body is unreadable: it is skipped, and logged).
pub(crate) type Records = Vec<(u64, Option<Record>)>;

/// An identity's newest `seq` (0: none) and that event's stored body.
type Head = (u64, Option<Vec<u8>>);

fn now_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// An identity as subject tokens: each part base64url-encoded (no `.`, `*`, `>` or spaces
/// can reach a subject) behind a marker letter, so an absent tenant, an empty one and any
/// user id map to distinct, valid tokens.
pub fn identity_tokens(identity: &Identity) -> String {
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let tenant = match &identity.tenant {
        None => "_".to_owned(),
        Some(t) => format!("t{}", b64.encode(t)),
    };
    format!("{tenant}.u{}", b64.encode(&identity.user))
}

impl Cluster {
    /// Connects to NATS and creates the stream, or updates it to the configured settings.
    pub async fn join(
        config: &ClusterConfig,
        history: &History,
        bounds: &Bounds,
        metrics: Arc<Metrics>,
    ) -> Result<Arc<Cluster>, JoinError> {
        let max_event_bytes = bounds.frame_limit;
        let records_per_identity = messages::records_per_identity(history, &bounds.limits);
        let url = config.nats_url().unwrap_or_default().to_owned();
        let node = config.node_name.clone().unwrap_or_else(|| {
            let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|h| h.trim().to_owned())
                .unwrap_or_else(|_| "gateway".into());
            format!("{host}-{}", std::process::id())
        });
        let request_timeout = Duration::from_millis(config.request_timeout_ms);
        let epoch = Arc::new(watch::channel(0).0);
        let link = |feeds| {
            Arc::new(Link {
                feeds,
                connected: AtomicBool::new(false),
                lost: AtomicBool::new(false),
                epoch: epoch.clone(),
                metrics: metrics.clone(),
            })
        };
        let (link, feeds_link) = (link(false), link(true));
        let servers: Vec<async_nats::ServerAddr> = url
            .split(',')
            .map(|u| u.trim().parse())
            .collect::<Result<_, _>>()
            .map_err(|e| JoinError::Connect {
                url: url.clone(),
                reason: format!("{e}"),
            })?;
        let connect = async |link: &Arc<Link>, name: String, capacity: usize| {
            let options = connect_options(config, name, request_timeout, link, capacity).await?;
            options
                .connect(servers.clone())
                .await
                .map_err(|e| JoinError::Connect {
                    url: url.clone(),
                    reason: e.to_string(),
                })
        };
        let client = connect(&link, format!("gateway {node}"), INBOX_CAPACITY).await?;
        let feeds = connect(&feeds_link, format!("gateway {node} feeds"), FEED_CAPACITY).await?;
        feeds_link.connected.store(true, Ordering::Release);
        link.connected.store(true, Ordering::Release);
        metrics.nats_connected.set(1);
        let mut js = jetstream::new(client.clone());
        js.set_timeout(request_timeout);
        let prefix = config.subject_prefix.clone();
        let shards = config.streams.max(1);
        check_stream_count(&js, &config.stream, shards).await?;
        let mut streams = Vec::with_capacity(shards);
        for shard in 0..shards {
            let name = stream_name(&config.stream, shard, shards);
            let stream_config = stream::Config {
                name: name.clone(),
                description: Some(format!("gateway events, shard {shard} of {shards}")),
                metadata: [(STREAMS_METADATA.to_owned(), shards.to_string())].into(),
                subjects: vec![format!("{prefix}.ev.{shard}.>")],
                // One more than the events and one message's ops: with fewer stored, an
                // identity has provably lost nothing to this bound (see `read`).
                max_messages_per_subject: records_per_identity as i64,
                max_age: Duration::from_secs(history.max_age_secs),
                max_bytes: i64::try_from(config.max_bytes / shards as u64).unwrap_or(i64::MAX),
                // The stored body is the payload plus ids and a little JSON.
                max_message_size: i32::try_from(max_event_bytes + 4096).unwrap_or(i32::MAX),
                duplicate_window: Duration::from_secs(history.idempotency_window_secs),
                storage: match config.storage {
                    ClusterStorage::File => stream::StorageType::File,
                    ClusterStorage::Memory => stream::StorageType::Memory,
                },
                num_replicas: config.replicas,
                discard: stream::DiscardPolicy::Old,
                allow_direct: true,
                republish: Some(stream::Republish {
                    source: format!("{prefix}.ev.{shard}.>"),
                    destination: format!("{prefix}.live.{shard}.>"),
                    headers_only: false,
                }),
                ..Default::default()
            };
            let stream_err = |reason: String| JoinError::Stream {
                stream: name.clone(),
                reason,
            };
            js.create_or_update_stream(stream_config)
                .await
                .map_err(|e| stream_err(e.to_string()))?;
            streams.push(
                js.get_stream(&name)
                    .await
                    .map_err(|e| stream_err(e.to_string()))?,
            );
        }
        // One value per key; each bucket named after the stream.
        let bucket = async |suffix: &str, description: &str, max_age: Duration| {
            let bucket = format!("{}_{suffix}", config.stream);
            js.create_key_value(kv::Config {
                bucket: bucket.clone(),
                description: description.into(),
                history: 1,
                max_age,
                storage: match config.storage {
                    ClusterStorage::File => stream::StorageType::File,
                    ClusterStorage::Memory => stream::StorageType::Memory,
                },
                num_replicas: config.replicas,
                ..Default::default()
            })
            .await
            .map_err(|e| JoinError::Stream {
                stream: bucket,
                reason: e.to_string(),
            })
        };
        let disconnects = bucket(
            "DISCONNECTS",
            "gateway: operators' disconnects and revocations",
            Duration::from_secs(crate::auth::MAX_REVOCATION_SECS),
        )
        .await?;
        let presence_records = bucket(
            "PRESENCE",
            "gateway: connections per identity and node",
            Duration::ZERO,
        )
        .await?;
        let presence_nodes =
            bucket("NODES", "gateway: node heartbeats", presence::NODE_TTL).await?;
        tracing::info!(
            %url,
            stream = %config.stream,
            streams = shards,
            replicas = config.replicas,
            %node,
            "cluster mode: events are stored in JetStream"
        );
        let recent = recent::Recent::new(
            config.recent_bytes,
            shards,
            metrics.cluster_recent_bytes.clone(),
        );
        Ok(Arc::new(Cluster {
            client,
            feeds,
            js,
            streams,
            prefix,
            history: history.clone(),
            request_timeout,
            subscribe_timeout: Duration::from_millis(config.subscribe_timeout_ms),
            link,
            metrics,
            catch_ups: Semaphore::new(64),
            lines: std::sync::OnceLock::new(),
            reads: Semaphore::new(MAX_READS),
            waiting_reads: std::sync::Mutex::new(HashMap::new()),
            barriers: (0..shards).map(|_| tokio::sync::Mutex::new(None)).collect(),
            recent: Arc::new(recent),
            disconnects,
            presence_records,
            presence_nodes,
            bounds: bounds.clone(),
            ledgers: messages::Ledgers::default(),
            records_per_identity,
            node,
            instance: uuid::Uuid::new_v4().simple().to_string(),
        }))
    }

    /// This node's part in the cluster's presence.
    pub fn presence(&self) -> presence::ClusterPresence {
        presence::ClusterPresence::new(
            self.presence_records.clone(),
            self.presence_nodes.clone(),
            self.instance.clone(),
            self.request_timeout,
            self.metrics.clone(),
        )
    }

    /// Whether the NATS connection is up; why not, when it is not.
    pub fn trouble(&self) -> Option<String> {
        match self.client.connection_state() {
            async_nats::connection::State::Connected => None,
            state => Some(format!("NATS connection {state}; reconnecting")),
        }
    }

    /// For `/v1/stats`: this node, its NATS server, and each stream's state and replicas.
    pub async fn describe(&self) -> serde_json::Value {
        let server = self.client.server_info();
        let mut streams = Vec::new();
        for stream in &self.streams {
            streams.push(match tokio::time::timeout(self.request_timeout, stream.get_info()).await {
                Ok(Ok(info)) => {
                    let cluster = info.cluster.as_ref();
                    serde_json::json!({
                        "name": info.config.name,
                        "messages": info.state.messages,
                        "bytes": info.state.bytes,
                        "first_seq": info.state.first_sequence,
                        "last_seq": info.state.last_sequence,
                        "leader": cluster.and_then(|c| c.leader.clone()),
                        "replicas": cluster.map(|c| c.replicas.iter().map(|p| serde_json::json!({
                            "name": p.name, "current": p.current, "offline": p.offline,
                        })).collect::<Vec<_>>()),
                    })
                }
                Ok(Err(e)) => serde_json::json!({"error": e.to_string()}),
                Err(_) => serde_json::json!({"error": "no answer from the stream in time"}),
            });
        }
        serde_json::json!({
            "node": self.node,
            "nats": {
                "connected": self.trouble().is_none(),
                "server": server.server_name,
            },
            "streams": streams,
        })
    }

    /// The stream of an identity: a stable hash of its subject tokens, so every node and
    /// every restart agree.
    fn shard(&self, identity: &Identity) -> usize {
        let digest = Sha256::digest(identity_tokens(identity).as_bytes());
        let n = u64::from_be_bytes(digest[..8].try_into().expect("8 bytes"));
        (n % self.streams.len() as u64) as usize
    }

    fn stream_of(&self, identity: &Identity) -> &stream::Stream {
        &self.streams[self.shard(identity)]
    }

    /// Records an operator's disconnect (and revocation) for every node; answers once it is
    /// stored, so no node that is up misses it and a node that starts later still gets the
    /// revocation.
    ///
    /// A revocation is kept under a key of its own, which a later plain disconnect of the
    /// same target never replaces; a later revocation of that target is merged into it
    /// (compare-and-set on the record's revision), so the one in force is never weakened.
    pub async fn announce(&self, disconnection: &Disconnection) -> Result<(), Unavailable> {
        let mut key = Sha256::new();
        key.update(identity_tokens(&disconnection.identity()).as_bytes());
        key.update([0]);
        key.update(disconnection.sid.as_deref().unwrap_or("").as_bytes());
        let kind = match disconnection.until {
            Some(_) => "revoke",
            None => "close",
        };
        let key = format!("{kind}.{:x}", key.finalize());
        let started = Instant::now();
        tokio::time::timeout(self.request_timeout, self.record(&key, disconnection))
            .await
            .map_err(|_| Unavailable("no answer from the stream in time".into()))??;
        self.metrics
            .nats_round_trip("disconnect", started.elapsed().as_secs_f64());
        Ok(())
    }

    async fn record(&self, key: &str, disconnection: &Disconnection) -> Result<(), Unavailable> {
        let encode =
            |d: &Disconnection| serde_json::to_vec(d).map_err(|e| Unavailable(e.to_string()));
        if disconnection.until.is_none() {
            self.disconnects
                .put(key, encode(disconnection)?.into())
                .await
                .map_err(|e| Unavailable(e.to_string()))?;
            return Ok(());
        }
        // Another node may be revoking the same target at the same moment: read, merge,
        // write if nobody wrote in between, else again.
        for _ in 0..REVOCATION_WRITE_TRIES {
            let held = self
                .disconnects
                .entry(key)
                .await
                .map_err(|e| Unavailable(e.to_string()))?
                .filter(|entry| entry.operation == kv::Operation::Put);
            let mut merged = disconnection.clone();
            if let Some(held) = &held
                && let Ok(before) = serde_json::from_slice::<Disconnection>(&held.value)
            {
                merged.at = merged.at.max(before.at);
                merged.until = merged.until.max(before.until);
            }
            let value = encode(&merged)?.into();
            let written = match &held {
                Some(held) => self
                    .disconnects
                    .update(key, value, held.revision)
                    .await
                    .map_err(|e| e.kind() == kv::UpdateErrorKind::WrongLastRevision),
                None => self
                    .disconnects
                    .create(key, value)
                    .await
                    .map_err(|e| e.kind() == kv::CreateErrorKind::AlreadyExists),
            };
            match written {
                Ok(_) => return Ok(()),
                Err(true) => continue, // written meanwhile: merge with that
                Err(false) => return Err(Unavailable("cannot record the revocation".into())),
            }
        }
        Err(Unavailable(
            "the revocation record kept changing under concurrent writes".into(),
        ))
    }

    /// How many disconnects are recorded (one per identity and session); `None` when NATS
    /// does not answer.
    pub async fn disconnects_recorded(&self) -> Option<u64> {
        tokio::time::timeout(self.request_timeout, self.disconnects.status())
            .await
            .ok()?
            .ok()
            .map(|status| status.values())
    }

    /// Every disconnect recorded and still in force, then each new one, as other nodes
    /// announce them.
    pub async fn disconnections(&self) -> Result<kv::Watch, Unavailable> {
        self.disconnects
            .watch_with_history(">")
            .await
            .map_err(|e| Unavailable(e.to_string()))
    }

    fn event_subject(&self, identity: &Identity) -> String {
        let shard = self.shard(identity);
        format!("{}.ev.{shard}.{}", self.prefix, identity_tokens(identity))
    }

    /// Stores the event; answers once the stream has it.
    pub async fn publish(
        &self,
        publication: &Publication,
        idempotency_key: Option<&str>,
    ) -> Result<Stored, Unavailable> {
        let ack = self.send(publication, idempotency_key).await?;
        self.acked(ack).await
    }

    /// Sends the event without waiting for the stream's answer: a batch sends every event,
    /// then waits for the answers in order.
    pub async fn send(
        &self,
        publication: &Publication,
        idempotency_key: Option<&str>,
    ) -> Result<PendingAck, Unavailable> {
        // Sent now, it would wait in the client's buffer for the reconnection and time out.
        if !self.link.connected.load(Ordering::Acquire) {
            return Err(Unavailable("the NATS connection is down".into()));
        }
        let body = encode(publication, now_micros());
        let subject = self.event_subject(&publication.identity);
        let started = Instant::now();
        let sent = match idempotency_key {
            Some(key) => {
                let mut headers = async_nats::HeaderMap::new();
                headers.insert("Nats-Msg-Id", msg_id(&publication.identity, key).as_str());
                self.js
                    .publish_with_headers(subject, headers, body.into())
                    .await
            }
            None => self.js.publish(subject, body.into()).await,
        };
        let ack = sent.map_err(|e| Unavailable(e.to_string()))?;
        Ok((started, ack))
    }

    /// The stream's answer to a sent event.
    pub async fn acked(&self, (started, ack): PendingAck) -> Result<Stored, Unavailable> {
        let ack = ack.await.map_err(|e| Unavailable(e.to_string()))?;
        self.metrics
            .nats_round_trip("publish", started.elapsed().as_secs_f64());
        Ok(Stored {
            seq: ack.sequence,
            duplicate: ack.duplicate,
        })
    }

    /// A direct get, timed; `None` when there is no such message.
    async fn get(
        &self,
        request: impl std::future::Future<
            Output = Result<jetstream::message::StreamMessage, stream::DirectGetError>,
        >,
    ) -> Result<Option<jetstream::message::StreamMessage>, Unavailable> {
        let started = Instant::now();
        let got = tokio::time::timeout(self.request_timeout, request)
            .await
            .map_err(|_| Unavailable("no answer from the stream in time".into()))?;
        self.metrics
            .nats_round_trip("get", started.elapsed().as_secs_f64());
        match got {
            Ok(message) => Ok(Some(message)),
            Err(e) if matches!(e.kind(), stream::DirectGetErrorKind::NotFound) => Ok(None),
            Err(e) => Err(Unavailable(e.to_string())),
        }
    }

    /// The identity's latest `seq`, 0 when the stream holds none of its events, including
    /// every event acknowledged before the call. No single read can promise that: a replica
    /// may lag, and a server that was stopped and continued may still answer as the leader
    /// it no longer is. So a barrier is written to the identity's stream first (only the
    /// real leader can commit it, so its sequence is above every acknowledged event), and
    /// the head is read together with the newest barrier in one answer, from one server,
    /// which counts only once that server holds the barrier. The leader's own answer is
    /// asked at the same time, and the higher of the two is the head.
    async fn head_of(&self, identity: &Identity) -> Result<u64, Unavailable> {
        Ok(self.head_with_body(identity).await?.0)
    }

    /// [`Cluster::head_of`], with the stored body of that event (none when it is 0).
    async fn head_with_body(&self, identity: &Identity) -> Result<Head, Unavailable> {
        let (leader, fenced) = tokio::join!(self.leader_head(identity), self.fenced_head(identity));
        let (leader, fenced) = (leader?, fenced?);
        Ok(if leader.0 >= fenced.0 { leader } else { fenced })
    }

    /// The identity's latest `seq` as the server answering for the leader knows it.
    async fn leader_head(&self, identity: &Identity) -> Result<Head, Unavailable> {
        let subject = self.event_subject(identity);
        let message = self
            .leader_get(
                "head",
                self.stream_of(identity)
                    .raw_message_builder()
                    .last_by_subject(subject)
                    .send(),
            )
            .await?;
        Ok(message.map_or((0, None), |m| (m.sequence, Some(m.payload.to_vec()))))
    }

    /// The identity's latest `seq` from a server that holds a barrier written after this
    /// call began.
    async fn fenced_head(&self, identity: &Identity) -> Result<Head, Unavailable> {
        let barrier = self.barrier(identity).await?;
        let deadline = Instant::now() + self.request_timeout;
        loop {
            let (head, seen) = self.last_with_barrier(identity).await?;
            if seen >= barrier {
                return Ok(head);
            }
            if Instant::now() >= deadline {
                return Err(Unavailable(
                    "the stream's copies did not catch up with its leader in time".into(),
                ));
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    fn barrier_subject(&self, shard: usize) -> String {
        // One token where an identity has two: no identity's subject.
        format!("{}.ev.{shard}.barrier", self.prefix)
    }

    /// The sequence of a barrier in the identity's stream sent after this call began.
    async fn barrier(&self, identity: &Identity) -> Result<u64, Unavailable> {
        let began = Instant::now();
        let shard = self.shard(identity);
        // Bounded: behind a barrier that NATS does not answer, the others do not queue on.
        let mut last = tokio::time::timeout(self.request_timeout, self.barriers[shard].lock())
            .await
            .map_err(|_| Unavailable("no answer from the stream in time".into()))?;
        if let Some((sent, seq)) = *last
            && sent >= began
        {
            return Ok(seq);
        }
        if !self.link.connected.load(Ordering::Acquire) {
            return Err(Unavailable("the NATS connection is down".into()));
        }
        let sent = Instant::now();
        let written = async {
            self.js
                .publish(self.barrier_subject(shard), Vec::new().into())
                .await?
                .await
        };
        let ack = tokio::time::timeout(self.request_timeout, written)
            .await
            .map_err(|_| Unavailable("no answer from the stream in time".into()))?
            .map_err(|e| Unavailable(e.to_string()))?;
        self.metrics
            .nats_round_trip("barrier", sent.elapsed().as_secs_f64());
        *last = Some((sent, ack.sequence));
        Ok(ack.sequence)
    }

    /// The identity's last sequence (0: none) with its body, and the stream's last barrier,
    /// in one batched direct get: both as one server holds them.
    async fn last_with_barrier(&self, identity: &Identity) -> Result<(Head, u64), Unavailable> {
        let subject = self.event_subject(identity);
        let barrier = self.barrier_subject(self.shard(identity));
        let request = serde_json::json!({ "multi_last": [subject, barrier], "batch": 2 });
        let (replies, _) = self.direct_batch(identity, "fenced_head", &request).await?;
        let (mut head, mut seen) = ((0, None), 0);
        for (seq, reply) in replies {
            let of = reply
                .headers
                .as_ref()
                .and_then(|h| h.get("Nats-Subject"))
                .map(|v| v.as_str().to_owned())
                .ok_or_else(|| Unavailable("direct get: an answer without a subject".into()))?;
            match of == subject {
                true => head = (seq, Some(reply.payload.to_vec())),
                false => seen = seq,
            }
        }
        Ok((head, seen))
    }

    /// One batched direct get of the identity's stream: the messages answered, each with its
    /// sequence, and whether the server has more past the batch. Timed as `op`.
    async fn direct_batch(
        &self,
        identity: &Identity,
        op: &'static str,
        request: &serde_json::Value,
    ) -> Result<(Vec<(u64, async_nats::Message)>, bool), Unavailable> {
        let api = format!(
            "$JS.API.DIRECT.GET.{}",
            self.stream_of(identity).cached_info().config.name
        );
        let started = Instant::now();
        let inbox = self.client.new_inbox();
        let mut replies = self
            .client
            .subscribe(inbox.clone())
            .await
            .map_err(|e| Unavailable(e.to_string()))?;
        self.client
            .publish_with_reply(api, inbox, request.to_string().into())
            .await
            .map_err(|e| Unavailable(e.to_string()))?;
        let mut got = Vec::new();
        let more = loop {
            let reply = tokio::time::timeout(self.request_timeout, replies.next())
                .await
                .map_err(|_| Unavailable("no answer from the stream in time".into()))?
                .ok_or_else(|| Unavailable("the NATS connection closed".into()))?;
            match reply.status.map(|s| s.as_u16()) {
                // End of the batch: what is left after it.
                Some(204) => {
                    break number_header(&reply, "Nats-Num-Pending").is_some_and(|n| n > 0);
                }
                Some(404) => break false,
                Some(code) if code != 200 => {
                    return Err(Unavailable(format!(
                        "direct get: {code} {}",
                        reply.description.as_deref().unwrap_or("")
                    )));
                }
                _ => {}
            }
            let seq = number_header(&reply, "Nats-Sequence")
                .ok_or_else(|| Unavailable("direct get: an answer without a sequence".into()))?;
            got.push((seq, reply));
        };
        self.metrics
            .nats_round_trip(op, started.elapsed().as_secs_f64());
        Ok((got, more))
    }

    /// A get answered by the stream's leader, timed; `None` when there is no such message.
    async fn leader_get(
        &self,
        op: &'static str,
        request: impl std::future::Future<
            Output = Result<jetstream::message::StreamMessage, stream::RawMessageError>,
        >,
    ) -> Result<Option<jetstream::message::StreamMessage>, Unavailable> {
        let started = Instant::now();
        let got = tokio::time::timeout(self.request_timeout, request)
            .await
            .map_err(|_| Unavailable("no answer from the stream's leader in time".into()))?;
        self.metrics
            .nats_round_trip(op, started.elapsed().as_secs_f64());
        match got {
            Ok(message) => Ok(Some(message)),
            Err(e) if matches!(e.kind(), stream::RawMessageErrorKind::NoMessageFound) => Ok(None),
            Err(e) => Err(Unavailable(e.to_string())),
        }
    }

    /// [`Cluster::batch`], complete through `through`: see [`Cluster::complete`].
    pub(crate) async fn batch_through(
        &self,
        identity: &Identity,
        from: u64,
        through: u64,
        max: usize,
        anchor: bool,
    ) -> Result<Records, Unavailable> {
        let got = self.batch(identity, from, max).await?;
        self.complete(identity, got, from, through, max, anchor)
            .await
    }

    /// A [`Cluster::batch`] from `from`, completed through `through`: a sequence of the
    /// identity's that the leader acknowledged (its head from [`Cluster::head_of`], or the
    /// previous sequence on a republished event). With `anchor`, `from` is an event of the
    /// identity the reader already knows, which the answer must hold unless it was evicted.
    /// The batched direct get may be answered by a replica (or a mirror) that has not
    /// applied the newest events yet: unless its answer holds `through` (or is full before
    /// it) and the anchor, what it lacks is read from the leader, one event a request
    /// (`gateway_nats_round_trip_seconds{op="leader_fill"}` counts them).
    async fn complete(
        &self,
        identity: &Identity,
        mut got: Records,
        from: u64,
        through: u64,
        max: usize,
        anchor: bool,
    ) -> Result<Records, Unavailable> {
        let holds = |got: &[(u64, Option<Record>)], seq: u64| got.iter().any(|(s, _)| *s == seq);
        let anchored = !anchor || got.first().is_some_and(|(seq, _)| *seq == from);
        let full_before = got.len() >= max && got.last().is_some_and(|(seq, _)| *seq < through);
        let reached = through < from.max(1) || full_before || holds(&got, through);
        if anchored && reached {
            return Ok(got);
        }
        // Whatever it gave past what it lacks is read again, in order, from the leader.
        if anchored {
            got.retain(|(seq, _)| *seq < through);
        } else {
            got.clear();
        }
        let mut next = got.last().map_or(from.max(1), |(seq, _)| seq + 1);
        tracing::debug!(
            next,
            through,
            "a replica that lags answered a read; the leader has the rest"
        );
        let subject = self.event_subject(identity);
        let stream = self.stream_of(identity);
        while got.len() < max && next <= through {
            let Some(message) = self
                .leader_get(
                    "leader_fill",
                    stream.get_first_raw_message_by_subject(&subject, next),
                )
                .await?
            else {
                break;
            };
            let seq = message.sequence;
            got.push((seq, decode_record(seq, &message.payload)));
            if !anchored && seq != from {
                // The leader has lost the anchor too: the caller says what that means.
                break;
            }
            next = seq + 1;
        }
        Ok(got)
    }

    /// The identity's stored messages from `from` on, oldest first, at most `max`: each
    /// one's sequence and its event (none when its body is unreadable; it is skipped, and
    /// logged). One batched direct get (the server answers with the messages, then an
    /// end-of-batch status), repeated only if the server cut the batch short.
    pub(crate) async fn batch(
        &self,
        identity: &Identity,
        from: u64,
        max: usize,
    ) -> Result<Records, Unavailable> {
        let subject = self.event_subject(identity);
        let mut got = Vec::new();
        let mut next = from.max(1);
        while got.len() < max {
            let request = serde_json::json!({
                "seq": next,
                "next_by_subj": subject,
                "batch": (max - got.len()).min(READ_CHUNK),
            });
            let (replies, more) = self.direct_batch(identity, "batch", &request).await?;
            for (seq, reply) in replies {
                got.push((seq, decode_record(seq, &reply.payload)));
                next = seq + 1;
            }
            if !more {
                break;
            }
        }
        Ok(got)
    }

    /// Events after `since`, or why they cannot be proven complete: the embedded log's
    /// answers, read from the stream. Two requests in all: the identity's messages from
    /// `since` on (the first of which must be `since` itself: still stored and this
    /// identity's, so that everything after it is stored too, since JetStream's limits
    /// remove an identity's oldest events first), and its earliest.
    ///
    /// Resumes of one identity from one position that wait for their turn together share
    /// one read: a storm's clients of one user mostly resume from the same event. A read
    /// is joined only until it starts, so its head is read after every session it answers
    /// was registered, and every event stored since reached their queues.
    pub async fn read(
        self: &Arc<Self>,
        identity: &Identity,
        since: u64,
    ) -> Result<Replay, Unavailable> {
        let key = (identity.clone(), since);
        let read = {
            let mut waiting = self.waiting_reads.lock().unwrap_or_else(|e| e.into_inner());
            match waiting.get(&key).and_then(|weak| weak.upgrade()) {
                Some(read) => {
                    self.metrics.cluster_shared_reads.inc();
                    read
                }
                None => {
                    if waiting.len() >= MAX_WAITING_READS {
                        // Entries of resumes that were all abandoned before their turn.
                        waiting.retain(|_, weak| weak.upgrade().is_some());
                    }
                    let cluster = self.clone();
                    let (identity, since) = key.clone();
                    let read = async move {
                        let permit =
                            tokio::time::timeout(READ_QUEUE_WAIT, cluster.reads.acquire()).await;
                        // Resumes from now on read for themselves.
                        cluster
                            .waiting_reads
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .remove(&(identity.clone(), since));
                        let _permit = permit.map_err(|_| {
                            Unavailable("too many resumes waiting to read the stream".into())
                        })?;
                        cluster.read_now(&identity, since).await
                    }
                    .boxed()
                    .shared();
                    if let Some(weak) = read.downgrade() {
                        waiting.insert(key, weak);
                    }
                    read
                }
            }
        };
        read.await
    }

    async fn read_now(&self, identity: &Identity, since: u64) -> Result<Replay, Unavailable> {
        let subject = self.event_subject(identity);
        let max = self.history.max_replay_events;
        // `since` itself, the events after it, and one more to tell "too many".
        let want = max + 1 + usize::from(since > 0);
        let earliest_get = || {
            self.get(
                self.stream_of(identity)
                    .direct_get_first_for_subject(subject.clone()),
            )
        };
        let (shard, key) = (self.shard(identity), identity_tokens(identity));
        // `past_since`: the batch holds only events after `since`, proven to follow it.
        let (mut batch, earliest, leader_head, past_since) = if since > 0
            && self.recent.knows(shard, &key, since)
        {
            // This node's live subscription carried what follows `since`: with the head
            // (every event acknowledged before this resume began), the missed events may
            // all be in memory, and the stream need not walk its messages for them.
            let (earliest, head) = tokio::join!(earliest_get(), self.head_with_body(identity));
            let (earliest, (head, head_body)) = (earliest?.map(|m| m.sequence), head?);
            // `since` still stored (the stream's limits remove an identity's oldest
            // events first): the answer from memory is the stream's.
            let kept = match earliest.is_some_and(|e| e <= since) {
                true => {
                    self.recent
                        .after(shard, &key, since, (head, head_body.as_deref()), want - 1)
                }
                false => None,
            };
            match kept {
                Some(kept) => {
                    self.metrics.cluster_recent_reads.inc();
                    let batch = kept
                        .into_iter()
                        .map(|(seq, body)| (seq, decode_record(seq, &body)))
                        .collect();
                    (batch, earliest, head, true)
                }
                None => {
                    let batch = self.batch(identity, since, want).await?;
                    let batch = self
                        .complete(identity, batch, since, head, want, true)
                        .await?;
                    (batch, earliest, head, false)
                }
            }
        } else {
            // The batch may come from a replica that lags: the leader's head, asked at the
            // same time, is what it must reach (every event acknowledged before this resume
            // began).
            let (batch, earliest, head) = tokio::join!(
                self.batch(identity, since, want),
                earliest_get(),
                self.head_of(identity),
            );
            let (batch, earliest, head) = (batch?, earliest?.map(|m| m.sequence), head?);
            let batch = self
                .complete(identity, batch, since, head, want, since > 0)
                .await?;
            (batch, earliest, head, false)
        };
        let not = |reason, head| Replay {
            events: Vec::new(),
            recovered: false,
            reason: Some(reason),
            earliest,
            head,
        };
        if since > 0 && !past_since {
            if batch.first().is_some_and(|(seq, _)| *seq == since) {
                batch.remove(0);
            } else {
                // Not this identity's stored event: another's, evicted, or never numbered.
                let stored = self
                    .leader_get("get", self.stream_of(identity).get_raw_message(since))
                    .await?;
                let reason = match stored {
                    Some(m) if m.subject.as_str() != subject => NotRecovered::UnknownPosition,
                    Some(_) => NotRecovered::Evicted,
                    None if since > self.last_seq(identity).await? => NotRecovered::UnknownPosition,
                    None => NotRecovered::Evicted,
                };
                let head = match reason {
                    NotRecovered::UnknownPosition => None,
                    _ => Some(leader_head).filter(|h| *h > 0),
                };
                return Ok(not(reason, head));
            }
        }
        // A message's ops are records but one entry: with ops among a full batch, the read
        // goes on (to the identity's record bound) before entries are counted.
        let full = batch.len() > max;
        if full
            && batch
                .iter()
                .any(|(_, r)| r.as_ref().is_some_and(|r| r.op.is_some()))
        {
            let next = batch.last().map_or(since + 1, |(seq, _)| seq + 1);
            let room = self.records_per_identity.saturating_sub(batch.len());
            batch.extend(
                self.batch_through(identity, next, leader_head, room, false)
                    .await?,
            );
        } else if full {
            return Ok(not(NotRecovered::TooMany, Some(leader_head)));
        }
        // The head is the identity's newest event, which limits remove last: an answer that
        // stops short of it came from a copy that lags (or a fill from a server that was the
        // leader no more). Nothing to vouch for: the client tries again.
        let last_stored = batch.last().map_or(since, |(seq, _)| *seq);
        if last_stored < leader_head {
            if batch.len() >= self.records_per_identity {
                return Ok(not(NotRecovered::TooMany, Some(leader_head)));
            }
            return Err(Unavailable(
                "the stream's copies did not hold its newest events; retry".into(),
            ));
        }
        let stored = batch.len();
        let Some(events) = self.fold(identity, since, batch).await? else {
            // A message touched after `since` lost its create to the stream's limits.
            return Ok(not(NotRecovered::Evicted, Some(leader_head)));
        };
        // The stream keeps more records than the history's entries (a message's ops are
        // records): a position with more than `max_events_per_user` entries after it has
        // left the history, as on one node.
        if since > 0 && events.len() > self.history.max_events_per_user {
            return Ok(not(NotRecovered::Evicted, Some(leader_head)));
        }
        if events.len() > max {
            return Ok(not(NotRecovered::TooMany, Some(leader_head)));
        }
        let head = events
            .last()
            .map(|e| e.seq)
            .or((since > 0).then_some(since));
        // Everything retained: complete unless this identity lost records to its count
        // limit (the stream keeps more than its events and one message's ops, so that
        // holding fewer than that bound proves nothing was dropped: an identity's count
        // shrinks again only by age, which takes the oldest first), holds more entries than
        // the history keeps, or the stream lost events younger than the age limit to its
        // byte bound.
        if since == 0
            && (stored >= self.records_per_identity
                || events.len() > self.history.max_events_per_user
                || !self.nothing_discarded_within_age(identity).await?)
        {
            return Ok(not(NotRecovered::Evicted, head));
        }
        Ok(Replay {
            events,
            recovered: true,
            reason: None,
            earliest,
            head,
        })
    }

    async fn stream_state(&self, identity: &Identity) -> Result<stream::State, Unavailable> {
        let started = Instant::now();
        let info = tokio::time::timeout(self.request_timeout, self.stream_of(identity).get_info())
            .await
            .map_err(|_| Unavailable("no answer from the stream in time".into()))?
            .map_err(|e| Unavailable(e.to_string()))?;
        self.metrics
            .nats_round_trip("info", started.elapsed().as_secs_f64());
        Ok(info.state)
    }

    async fn last_seq(&self, identity: &Identity) -> Result<u64, Unavailable> {
        Ok(self.stream_state(identity).await?.last_sequence)
    }

    /// Whether no event of the identity after `from` can have been removed: the stream
    /// removed nothing from `from` on by its age or byte limits (they take its oldest
    /// first), and the identity holds no more than its count limit (the stream keeps one
    /// more, see [`Cluster::read`]). Asked of the leader.
    async fn nothing_removed_after(
        &self,
        identity: &Identity,
        from: u64,
    ) -> Result<bool, Unavailable> {
        let subject = self.event_subject(identity);
        let started = Instant::now();
        let look = async {
            let mut info = self
                .stream_of(identity)
                .info_with_subjects(&subject)
                .await?;
            let first = info.info.state.first_sequence;
            let mut count = 0;
            while let Some((name, n)) = futures_util::TryStreamExt::try_next(&mut info).await? {
                if name == subject {
                    count = n;
                }
            }
            Ok::<_, stream::InfoError>((first, count))
        };
        let (first, count) = tokio::time::timeout(self.request_timeout, look)
            .await
            .map_err(|_| Unavailable("no answer from the stream in time".into()))?
            .map_err(|e| Unavailable(e.to_string()))?;
        self.metrics
            .nats_round_trip("info", started.elapsed().as_secs_f64());
        Ok(first <= from && count < self.records_per_identity)
    }

    /// Whether every event younger than the age limit is still stored: the stream never
    /// discarded anything, or its oldest event is already past the age limit.
    async fn nothing_discarded_within_age(&self, identity: &Identity) -> Result<bool, Unavailable> {
        let state = self.stream_state(identity).await?;
        if state.first_sequence <= 1 || state.messages == 0 {
            return Ok(true);
        }
        let oldest = state.first_timestamp.unix_timestamp_nanos() / 1000;
        let horizon = now_micros() as i128 - self.history.max_age_secs as i128 * 1_000_000;
        Ok(oldest <= horizon)
    }
}

/// The options of one of the node's NATS connections; `capacity`: messages each of its
/// subscriptions may hold unread.
async fn connect_options(
    config: &ClusterConfig,
    name: String,
    request_timeout: Duration,
    link: &Arc<Link>,
    capacity: usize,
) -> Result<async_nats::ConnectOptions, JoinError> {
    let mut options = async_nats::ConnectOptions::new()
        .name(name)
        .request_timeout(Some(request_timeout))
        .connection_timeout(Duration::from_secs(5))
        .max_reconnects(None)
        // A subscription that falls behind loses messages past this, and is told.
        .subscription_capacity(capacity)
        .require_tls(config.tls_required);
    if let Some(path) = &config.credentials_file {
        options = options
            .credentials_file(path)
            .await
            .map_err(|e| JoinError::Options(format!("credentials_file {}: {e}", path.display())))?;
    }
    if let Some(token) = &config.token {
        options = options.token(token.clone());
    }
    if let Some(ca) = &config.tls_ca_file {
        options = options.add_root_certificates(ca.clone()).require_tls(true);
    }
    if let (Some(cert), Some(key)) = (&config.tls_cert_file, &config.tls_key_file) {
        options = options.add_client_certificate(cert.clone(), key.clone());
    }
    let callback = link.clone();
    Ok(options.event_callback(move |event| {
        let link = callback.clone();
        async move { link.on_event(event) }
    }))
}

/// Refuses a stream set made with another `cluster.streams`: an identity's stream is chosen
/// by its hash modulo the count, so with another count its new events would go to another
/// stream than its old ones, and a position in one would be looked up in the other.
async fn check_stream_count(
    js: &jetstream::Context,
    base: &str,
    shards: usize,
) -> Result<(), JoinError> {
    // The first stream of either naming: `<stream>` alone, or `<stream>-0` of many.
    for (name, named_count) in [(base.to_owned(), 1), (stream_name(base, 0, 2), 2)] {
        let info = match js.get_stream(&name).await {
            Ok(stream) => stream.cached_info().clone(),
            Err(e)
                if matches!(e.kind(), jetstream::context::GetStreamErrorKind::JetStream(ref err)
                    if err.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND) =>
            {
                continue;
            }
            Err(e) => {
                return Err(JoinError::Stream {
                    stream: name,
                    reason: e.to_string(),
                });
            }
        };
        // Only the gateway's own streams say how many there are; without a record, the
        // naming tells one from many.
        let found = recorded_streams(&info).unwrap_or(named_count);
        if found != shards {
            return Err(JoinError::StreamCount {
                stream: base.to_owned(),
                configured: shards,
                found,
            });
        }
    }
    Ok(())
}

/// An event's body in the stream: the publication as JSON, its payload copied as the
/// publisher's text (valid JSON, checked when it was published), and the publishing node's
/// clock.
fn encode(publication: &Publication, at: u64) -> Vec<u8> {
    encode_parts(
        &publication.kind,
        &publication.payload,
        [&publication.run_id, &publication.thread_id],
        at,
        None,
    )
}

/// A stored body from its parts; `op`: a message op's [`messages::OpMeta`], as JSON.
fn encode_parts(
    kind: &str,
    payload: &str,
    [run_id, thread_id]: [&Option<String>; 2],
    at: u64,
    op: Option<&str>,
) -> Vec<u8> {
    let mut body = Vec::with_capacity(payload.len() + kind.len() + 96);
    let string = |body: &mut Vec<u8>, s: &str| {
        // Writing a string into a Vec cannot fail.
        let _ = serde_json::to_writer(&mut *body, s);
    };
    body.extend_from_slice(b"{\"kind\":");
    string(&mut body, kind);
    body.extend_from_slice(b",\"payload\":");
    body.extend_from_slice(payload.as_bytes());
    for (name, value) in [("run_id", run_id), ("thread_id", thread_id)] {
        if let Some(value) = value {
            body.extend_from_slice(format!(",\"{name}\":").as_bytes());
            string(&mut body, value);
        }
    }
    if let Some(op) = op {
        body.extend_from_slice(b",\"op\":");
        body.extend_from_slice(op.as_bytes());
    }
    body.extend_from_slice(format!(",\"at\":{at}}}").as_bytes());
    body
}

/// A numeric header of a message from JetStream (`Nats-Sequence` and the like).
fn number_header(message: &async_nats::Message, name: &str) -> Option<u64> {
    message
        .headers
        .as_ref()
        .and_then(|h| h.get(name))
        .and_then(|v| v.as_str().parse().ok())
}

/// A stored event's body as an [`Event`] with its `seq`, and when it was published.
fn decode(seq: u64, body: &[u8]) -> Option<(Event, u64)> {
    decode_record(seq, body).map(|r| (r.event, r.at))
}

/// A stored body as a [`Record`].
fn decode_record(seq: u64, body: &[u8]) -> Option<Record> {
    let stored: StoredEventOwned = serde_json::from_slice(body)
        .inspect_err(
            |e| tracing::error!(seq, error = %e, "unreadable event in the stream; skipped"),
        )
        .ok()?;
    Some(Record {
        event: Event {
            seq,
            kind: stored.kind,
            payload: stored.payload.get().to_owned(),
            run_id: stored.run_id,
            thread_id: stored.thread_id,
        },
        at: stored.at,
        op: stored.op,
    })
}

/// The stream's deduplication id for an identity's idempotency key: a digest, so any key
/// is a valid header value and keys of different identities never collide.
fn msg_id(identity: &Identity, key: &str) -> String {
    let mut digest = Sha256::new();
    digest.update(identity_tokens(identity).as_bytes());
    digest.update([0]);
    digest.update(key.as_bytes());
    format!("{:x}", digest.finalize())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn who(tenant: Option<&str>, user: &str) -> Identity {
        Identity {
            tenant: tenant.map(str::to_owned),
            user: user.into(),
        }
    }

    #[test]
    fn identities_map_to_distinct_valid_subject_tokens() {
        let ids = [
            who(None, "alice"),
            who(Some(""), "alice"),
            who(Some("acme"), "alice"),
            who(None, "a.b"),
            who(None, "a*>"),
            who(None, "with space"),
            who(None, "ünïcødé ✓"),
            who(Some("a.b"), "c"),
            who(Some("a"), "b.c"),
        ];
        let tokens: Vec<String> = ids.iter().map(identity_tokens).collect();
        for t in &tokens {
            assert_eq!(t.split('.').count(), 2, "{t}");
            assert!(
                t.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b)),
                "{t}"
            );
            assert!(t.split('.').all(|part| !part.is_empty()), "{t}");
        }
        let mut unique = tokens.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(unique.len(), tokens.len(), "{tokens:?}");
    }

    #[test]
    fn idempotency_ids_are_per_identity() {
        let a = msg_id(&who(None, "alice"), "k\r\n1");
        assert_eq!(a.len(), 64);
        assert_ne!(a, msg_id(&who(Some("t"), "alice"), "k\r\n1"));
        assert_eq!(a, msg_id(&who(None, "alice"), "k\r\n1"));
    }

    #[test]
    fn stored_events_decode_with_their_payload_text() {
        let publication = Publication {
            identity: who(None, "alice"),
            kind: "tool \"x\"".into(),
            payload: r#"{"a": [1, 2.50]}"#.into(),
            run_id: Some("r".into()),
            thread_id: None,
            message: None,
        };
        let body = encode(&publication, 7);
        let (event, at) = decode(42, &body).unwrap();
        assert_eq!((event.seq, at), (42, 7));
        assert_eq!(event.payload, r#"{"a": [1, 2.50]}"#);
        assert_eq!(event.run_id.as_deref(), Some("r"));
        assert_eq!(event.kind, "tool \"x\"");
        assert_eq!(event.thread_id, None);
        assert!(decode(1, b"not json").is_none());
    }
}

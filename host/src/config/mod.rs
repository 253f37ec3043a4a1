//! Configuration: built-in defaults, then a TOML file, then `GATEWAY_*` environment variables.
//!
//! Top-level keys map to `GATEWAY_<KEY>` (`GATEWAY_LISTEN`, `GATEWAY_JWT_SECRET`,
//! `GATEWAY_GUEST`); nested keys use a double underscore (`GATEWAY_LIMITS__EVENT_QUEUE`).

pub mod reference;
mod rpc;
mod streams;
mod webhooks;

pub use rpc::{ANSWER_FRAME_OVERHEAD, Rpc};
pub use streams::Streams;
pub use webhooks::Webhooks;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use figment::Figment;
use figment::providers::{Format, Serialized, Toml};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

#[derive(Clone, Serialize, Deserialize, JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Address to listen on.
    pub listen: SocketAddr,
    /// A second address serving only `/healthz`, `/readyz` and `/metrics`, with its own
    /// connection bound, so operators can see a node whose public listener is under attack.
    /// Unset: those endpoints are served on `listen` only.
    pub ops_listen: Option<SocketAddr>,
    /// Path of the guest component every connection instantiates.
    pub guest: Option<PathBuf>,
    /// A private directory (created with mode 0700) for compiled guests: a restart or reload
    /// of the same component with the same engine settings loads its compiled code instead
    /// of compiling again. Unset: always compile.
    pub guest_cache_dir: Option<PathBuf>,
    /// How often the guest file is checked for a change, which reloads it (as SIGHUP and
    /// `POST /v1/guest/reload` do); 0 turns the check off.
    pub guest_poll_secs: u64,
    /// HS256 secret for connect and publisher tokens.
    pub jwt_secret: Option<String>,
    /// Write `/tmp/perf-<pid>.map` naming the guest's compiled functions, so `perf report`
    /// shows where time inside the sandbox goes. Off by default: the file grows with every
    /// guest loaded.
    pub guest_perf_map: bool,
    pub auth: AuthConfig,
    pub limits: Limits,
    pub history: History,
    pub streams: Streams,
    pub rpc: Rpc,
    pub webhooks: Webhooks,
    pub tls: TlsConfig,
    pub cluster: ClusterConfig,
    /// Development mode (`serve --dev` only, never from a file or the environment): serves
    /// the demo page at `/` and `/dev/token`, which mints a token for anyone who asks.
    #[serde(skip)]
    pub dev: bool,
}

/// `https`/`wss` on the public listener (the ops listener stays plain: keep it on a
/// private address).
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM certificate chain, leaf first. With `key_file`, the public listener speaks TLS.
    pub cert_file: Option<PathBuf>,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key_file: Option<PathBuf>,
    /// A TLS handshake must finish in this time, or the connection is dropped.
    pub handshake_timeout_secs: u64,
    /// How often the two files are checked for a change (they are also re-read on SIGHUP).
    pub reload_poll_secs: u64,
}

impl TlsConfig {
    /// Both files or neither.
    pub fn validate(&self) -> Result<(), Invalid> {
        if self.cert_file.is_some() != self.key_file.is_some() {
            let (key, value) = match &self.cert_file {
                Some(cert) => (
                    "tls.key_file",
                    format!("unset (cert_file = {})", cert.display()),
                ),
                None => ("tls.cert_file", "unset (key_file is set)".to_owned()),
            };
            return Err(invalid(
                key,
                &value,
                "TLS needs both cert_file and key_file",
            ));
        }
        Ok(())
    }
}

impl Default for TlsConfig {
    fn default() -> Self {
        TlsConfig {
            cert_file: None,
            key_file: None,
            handshake_timeout_secs: 10,
            reload_poll_secs: 10,
        }
    }
}

/// Cluster mode: any number of gateway nodes share one event log, a NATS JetStream stream.
/// Off unless `nats_url` is set; the embedded in-process log serves otherwise. In cluster
/// mode `[history]` bounds the stream: its per-subject limit is `max_events_per_user` +
/// `streams.max_appends_per_message` + 3 records (room for one message's ops), and a resume
/// presents at most `max_events_per_user` entries; `max_age_secs` is its age,
/// `idempotency_window_secs` its duplicate window, and `max_replay_events` bounds a resume
/// as before.
#[derive(Clone, Serialize, Deserialize, JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct ClusterConfig {
    /// NATS server URLs, comma-separated (`nats://host:4222,nats://other:4222`). Set (and not
    /// blank): cluster mode.
    pub nats_url: Option<String>,
    /// The JetStream stream holding every identity's events; created, or updated to these
    /// settings, at start-up.
    pub stream: String,
    /// Streams the identities are spread over (by a hash of the identity): one stream's
    /// leader stores every event of its identities, so more streams spread the storing over
    /// more NATS servers and cores. With more than one they are named `<stream>-0`, ...
    /// Changing it moves identities to other streams: their earlier positions answer
    /// `unknown_position`, and the old streams must be removed first.
    pub streams: usize,
    /// First token of the streams' subjects: events are stored on
    /// `<prefix>.ev.<shard>.<tenant>.<user>` and republished to nodes on
    /// `<prefix>.live.<shard>.<tenant>.<user>`.
    pub subject_prefix: String,
    /// Copies of the stream JetStream keeps (1, 3 or 5; at most the servers in the NATS
    /// cluster).
    pub replicas: usize,
    /// `file` (kept across NATS restarts) or `memory`.
    pub storage: ClusterStorage,
    /// Bytes all streams together may hold (each an equal share); past it a stream's oldest
    /// events, of any of its identities, go first.
    pub max_bytes: u64,
    /// Bytes of recent events this node keeps from its live subscriptions, of every
    /// identity (each stream an equal share; the oldest go first), so that a resume whose
    /// missed events are among them reads none from the stream: JetStream finds one
    /// identity's events by walking past every other identity's, which bounds a resume
    /// storm. 0: every resume reads the stream.
    pub recent_bytes: u64,
    /// How long a publish waits for the stream's acknowledgement, and a read for its answer;
    /// past it the publish answers 503 and a resume closes with 1013 (retry).
    pub request_timeout_ms: u64,
    /// How long a new connection waits for this node's feed of its identity (the identity's
    /// head read from the stream) before it is closed with 1013 (retry).
    pub subscribe_timeout_ms: u64,
    /// How long start-up waits for the revocations in force (recorded by any node in NATS)
    /// to load; past it the node exits instead of serving, since it would admit revoked
    /// tokens. 1 to 3600.
    pub revocations_load_timeout_secs: u64,
    /// A NATS credentials file (JWT and NKey seed).
    pub credentials_file: Option<PathBuf>,
    /// A NATS authentication token.
    pub token: Option<String>,
    /// PEM CA certificates to verify the NATS servers with (implies TLS).
    pub tls_ca_file: Option<PathBuf>,
    /// PEM client certificate for NATS mutual TLS (with `tls_key_file`).
    pub tls_cert_file: Option<PathBuf>,
    /// PEM private key of `tls_cert_file`.
    pub tls_key_file: Option<PathBuf>,
    /// Refuse NATS servers that do not speak TLS.
    pub tls_required: bool,
    /// This node's name on its NATS connection and in logs. Unset: the host name and port.
    pub node_name: Option<String>,
}

/// Where JetStream keeps the stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum ClusterStorage {
    File,
    Memory,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig {
            nats_url: None,
            stream: "GATEWAY_EVENTS".into(),
            streams: 1,
            subject_prefix: "gateway".into(),
            replicas: 1,
            storage: ClusterStorage::File,
            max_bytes: 1 << 30,
            recent_bytes: 32 << 20,
            request_timeout_ms: 2000,
            subscribe_timeout_ms: 5000,
            revocations_load_timeout_secs: 30,
            credentials_file: None,
            token: None,
            tls_ca_file: None,
            tls_cert_file: None,
            tls_key_file: None,
            tls_required: false,
            node_name: None,
        }
    }
}

impl ClusterConfig {
    /// Refuses cluster settings that cannot work, with the key named; `history` bounds what
    /// one resume may read from the stream.
    pub fn validate(&self, history: &History) -> Result<(), Invalid> {
        let c = self;
        if c.nats_url().is_some() {
            for (key, value) in [
                ("cluster.request_timeout_ms", c.request_timeout_ms),
                ("cluster.subscribe_timeout_ms", c.subscribe_timeout_ms),
                ("cluster.max_bytes", c.max_bytes),
            ] {
                if value == 0 {
                    return Err(invalid(key, &value, "must be at least 1"));
                }
            }
            if !(1..=MAX_REVOCATIONS_LOAD_SECS).contains(&c.revocations_load_timeout_secs) {
                return Err(invalid(
                    "cluster.revocations_load_timeout_secs",
                    &c.revocations_load_timeout_secs,
                    "1 to 3600: a node serves no one until its revocations are loaded",
                ));
            }
            if history.max_replay_events > MAX_CLUSTER_REPLAY_EVENTS {
                return Err(invalid(
                    "history.max_replay_events",
                    &history.max_replay_events,
                    "at most 4000 in cluster mode: a resume reads its events in one batch from \
                 the stream, and the answers wait in a NATS inbox of 4096 messages",
                ));
            }
            if !(1..=64).contains(&c.streams) {
                return Err(invalid("cluster.streams", &c.streams, "1 to 64"));
            }
            if ![1, 3, 5].contains(&c.replicas) {
                return Err(invalid(
                    "cluster.replicas",
                    &c.replicas,
                    "must be 1, 3 or 5: JetStream needs a majority of an odd number of copies",
                ));
            }
            let token = |t: &str| {
                !t.is_empty()
                    && t.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            };
            if !token(&c.subject_prefix) {
                return Err(invalid(
                    "cluster.subject_prefix",
                    &c.subject_prefix,
                    "one subject token: letters, digits, '-' and '_'",
                ));
            }
            if !token(&c.stream) {
                return Err(invalid(
                    "cluster.stream",
                    &c.stream,
                    "a stream name: letters, digits, '-' and '_'",
                ));
            }
            if c.tls_cert_file.is_some() != c.tls_key_file.is_some() {
                return Err(invalid(
                    "cluster.tls_key_file",
                    &"one of tls_cert_file and tls_key_file",
                    "NATS client TLS needs both",
                ));
            }
        }
        Ok(())
    }

    /// The NATS URLs when cluster mode is on; a blank value (`GATEWAY_CLUSTER__NATS_URL=`)
    /// leaves it off.
    pub fn nats_url(&self) -> Option<&str> {
        self.nats_url.as_deref().filter(|u| !u.trim().is_empty())
    }
}

impl std::fmt::Debug for ClusterConfig {
    /// Never prints the token.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterConfig")
            .field("nats_url", &self.nats_url)
            .field("stream", &self.stream)
            .field("streams", &self.streams)
            .field("subject_prefix", &self.subject_prefix)
            .field("replicas", &self.replicas)
            .field("storage", &self.storage)
            .field("max_bytes", &self.max_bytes)
            .field("recent_bytes", &self.recent_bytes)
            .field("request_timeout_ms", &self.request_timeout_ms)
            .field("subscribe_timeout_ms", &self.subscribe_timeout_ms)
            .field(
                "revocations_load_timeout_secs",
                &self.revocations_load_timeout_secs,
            )
            .field("credentials_file", &self.credentials_file)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("tls_ca_file", &self.tls_ca_file)
            .field("tls_cert_file", &self.tls_cert_file)
            .field("tls_key_file", &self.tls_key_file)
            .field("tls_required", &self.tls_required)
            .field("node_name", &self.node_name)
            .finish()
    }
}

/// Most seconds `cluster.revocations_load_timeout_secs` may give start-up.
pub const MAX_REVOCATIONS_LOAD_SECS: u64 = 3600;

/// The most events one resume may replay in cluster mode: its read is one batched direct
/// get, whose answers (these events, `since` itself, one more to tell "too many", and the
/// end-of-batch status) wait in a NATS inbox bounded at 4,096 messages
/// (`cluster::INBOX_CAPACITY`); past that the client would drop some.
pub const MAX_CLUSTER_REPLAY_EVENTS: usize = 4000;

/// The event log's bounds: what a reconnecting client can get back (`?since=`).
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct History {
    /// Events kept per identity (tenant and user).
    pub max_events_per_user: usize,
    /// How long an event is kept.
    pub max_age_secs: u64,
    /// Bytes the whole log may hold (events, keys and bookkeeping); past it the oldest
    /// events of any identity go first.
    pub max_bytes: usize,
    /// Most events one resume replays; a resume that would need more is answered
    /// `recovered: false` (`too_many`), never truncated. At most 4000 in cluster mode.
    pub max_replay_events: usize,
    /// How long an `idempotency_key` is remembered.
    pub idempotency_window_secs: u64,
    /// Idempotency keys remembered per identity (the oldest go first).
    pub idempotency_keys_per_user: usize,
}

impl Default for History {
    fn default() -> Self {
        History {
            max_events_per_user: 1000,
            max_age_secs: 300,
            max_bytes: 256 << 20,
            max_replay_events: 1000,
            idempotency_window_secs: 120,
            idempotency_keys_per_user: 10_000,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// Required `iss` claim, when set.
    pub issuer: Option<String>,
    /// Required `aud` claim, when set.
    pub audience: Option<String>,
    /// Public keys for asymmetric tokens (RS256, ES256, EdDSA).
    pub public_keys: Vec<PublicKeyConfig>,
    /// A JWKS file (`{"keys": [...]}`) of public keys with `kid`s, for rotation: re-read
    /// when it changes (checked every `jwks_poll_secs`) and on SIGHUP.
    pub jwks_file: Option<PathBuf>,
    /// How often the JWKS file is checked for a change.
    pub jwks_poll_secs: u64,
    /// Clock skew tolerated on `exp` and `nbf`, in seconds.
    pub leeway_secs: u64,
    /// Browser origins allowed to connect (exact `Origin` header values). Empty: any origin.
    /// Requests without an `Origin` header (non-browser clients) are not affected.
    pub allowed_origins: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PublicKeyConfig {
    /// `RS256`, `ES256` or `EdDSA`.
    pub alg: String,
    /// The `kid` tokens signed with this key carry, if any.
    pub kid: Option<String>,
    /// PEM file holding the public key.
    pub pem_file: PathBuf,
}

/// Every bound a client, a guest or a publisher can push against.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Connections this node admits; 0 means as many as its file-descriptor limit and
    /// `vm.max_map_count` allow (computed at start-up). A larger value is lowered to that.
    pub max_connections: usize,
    /// Live connections one user may hold.
    pub max_connections_per_user: usize,
    /// Sustained client messages per second per connection; more closes it (1008).
    pub client_messages_per_sec: u32,
    /// Client messages allowed in a burst above the sustained rate.
    pub client_message_burst: u32,
    /// Largest WebSocket message accepted from a client, and largest frame a guest may emit.
    pub max_message_bytes: usize,
    /// Initial WebSocket read buffer per connection (it grows up to one message as needed).
    /// Clients of an agent UI send few, small frames; each KiB here is a KiB of every
    /// connection's memory, hibernated or not.
    pub read_buffer_bytes: usize,
    /// Bytes of outgoing frames buffered before a write is forced.
    pub write_buffer_bytes: usize,
    /// Events waiting for one connection before it counts as a slow client and is closed.
    pub event_queue: usize,
    /// Bytes of event payloads waiting for one connection before it counts as a slow client;
    /// also the most bytes one guest call may emit.
    pub outbound_queue_bytes: usize,
    /// Cap on one instance's linear memory.
    pub guest_memory_bytes: usize,
    /// How instances' linear memories are reserved: `auto` (full while the node's capacity
    /// fits the address space), `full` (4 GiB each: no bounds checks in guest code, about
    /// 4 KiB more page tables per connection) or `compact` (the least memory).
    pub guest_memory_reservation: ReservationPolicy,
    /// Core instances one guest component may create: a wit-bindgen guest needs 3,
    /// componentize-py 0.25's 38 (`gateway guest check` reports a component's count).
    pub guest_max_instances: usize,
    /// Tables one guest component may create (a wit-bindgen guest: 2).
    pub guest_max_tables: usize,
    /// Linear memories one guest component may create (a wit-bindgen guest: 1).
    pub guest_max_memories: usize,
    /// Elements in one guest table.
    pub guest_table_elements: usize,
    /// CPU time one guest call may use, in milliseconds (time the thread is preempted does
    /// not count, beyond at most the call's first 2 ms).
    pub guest_call_ms: u64,
    /// Wall-clock bound on one guest call, in milliseconds, however little CPU it got: no
    /// guest holds a runtime worker thread longer than this. A safety net behind the CPU
    /// bound (guests cannot block, so a call's wall time beyond its CPU time is time the
    /// thread was preempted); set well above it so a loaded node does not fault healthy
    /// guests.
    pub guest_call_wall_ms: u64,
    /// Frames a guest may emit in one call.
    pub max_emits_per_call: usize,
    /// A client that reads nothing for this long while frames wait is closed as slow.
    pub write_timeout_secs: u64,
    /// A connection with no frames either way for this long is closed.
    pub idle_timeout_secs: u64,
    /// A connection whose handler has had no frame and no event for this long hibernates:
    /// the guest saves its state to bytes and its instance (and linear memory) is dropped
    /// until the next frame or event wakes it. 0 never hibernates. Guests built against the
    /// 0.1.0 world never hibernate. Pings do not count, and are answered without waking.
    pub hibernate_after_secs: u64,
    /// Most bytes of saved state a hibernated handler may keep; a guest that saves more
    /// stays live (counted in `gateway_hibernations_total{result="too_large"}`).
    pub hibernate_state_bytes: usize,
    /// How often the gateway pings each client.
    pub ping_interval_secs: u64,
    /// A client that sends nothing, not even a pong, for this long is a dead peer.
    pub dead_peer_secs: u64,
    /// Largest publish request body.
    pub max_body_bytes: usize,
    /// Time a client has to send a request's complete headers (the `/ws` upgrade request
    /// included), and the longest an HTTP connection may sit idle between requests.
    pub header_read_timeout_secs: u64,
    /// Time a publisher has to send a request body.
    pub body_read_timeout_secs: u64,
    /// Bytes of events queued to this node's sessions and not yet handed to their guests;
    /// past it, publishes are refused with 503 and `Retry-After` until delivery catches up,
    /// so that latency under overload stays bounded instead of growing with the queues. In
    /// cluster mode also the most this node holds for its sessions, whatever other nodes
    /// accept: at it, its feeds leave events in the stream and read them from there once
    /// the backlog is down to half.
    pub max_queued_bytes: usize,
    /// Queue delay this node keeps to, in milliseconds: how long events wait for the node
    /// between being queued and their sessions taking them (every 10 ms, the median over
    /// the events taken and those still queued past this; time a session spends on its own
    /// earlier events, a slow handler or a slow client, does not count). While it is above
    /// this, publishes go at a little less than the pace the sessions take events, each
    /// waiting for its share up to `publish_wait_ms` and then refused with 503 `overloaded`
    /// and `Retry-After`: publishers slow to the pace of delivery instead of queueing
    /// seconds of delay. Higher buys events per second at saturation (sessions take
    /// several events per wake-up) with delay. 0: publishes never wait (only
    /// `max_queued_bytes` bounds the backlog).
    pub queue_delay_ms: u64,
    /// Most milliseconds a publish waits for its share while the queue delay is above
    /// `queue_delay_ms` before it is refused.
    pub publish_wait_ms: u64,
    /// A user whose every connection on this node has had an event waiting longer than
    /// this (milliseconds) gets its new events refused with 503 `user_lagging` and
    /// `Retry-After`, so one user's flood or slow clients hold back that user's publishers,
    /// not the node's. 0: no per-user check. One node only: in cluster mode a node cannot
    /// see the other nodes' connections, and its feeds leave what it cannot queue in the
    /// stream.
    pub user_queue_delay_ms: u64,
    /// Connections still speaking HTTP (not upgraded: handshakes, publishers, probes) the
    /// listener holds at once; past it, new ones wait in the kernel's backlog. Upgraded
    /// WebSocket connections do not count (`max_connections` bounds them).
    pub max_http_connections: usize,
    /// Of those, how many one client address may hold (0: no cap). Past it, that address's
    /// new connections are answered 429 and closed at once, so one client cannot take every
    /// slot. Behind a reverse proxy every client shares its address: raise or disable it
    /// there, and bound clients at the proxy.
    pub max_http_connections_per_address: usize,
    /// Revocations (`POST /v1/disconnect` with `revoke_secs`) one tenant may hold in force
    /// at once (users without a tenant count as one tenant), so that one tenant's backend
    /// cannot use up the table for every other. Past it, the disconnect still happens and
    /// the answer is 429 `revocations_full`.
    pub max_revocations_per_tenant: usize,
    /// Revocations held in force at once, all tenants together (memory: ~200 bytes each).
    pub max_revocations: usize,
    /// Deepest nesting of arrays and objects in an event's payload. Handlers parse payloads
    /// (the reference one to redact them) and a parser stops at some depth (serde_json's at
    /// 128); a payload it cannot parse cannot be inspected, so the publish API refuses it.
    pub max_payload_depth: usize,
    /// Most events in one batch publish.
    pub max_batch_events: usize,
    /// How long shutdown waits for connections to close.
    pub shutdown_grace_secs: u64,
}

/// See [`Limits::guest_memory_reservation`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum ReservationPolicy {
    #[default]
    Auto,
    Full,
    Compact,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            ops_listen: None,
            guest: None,
            guest_cache_dir: None,
            guest_poll_secs: 10,
            jwt_secret: None,
            guest_perf_map: false,
            auth: AuthConfig::default(),
            limits: Limits::default(),
            history: History::default(),
            streams: Streams::default(),
            rpc: Rpc::default(),
            webhooks: Webhooks::default(),
            tls: TlsConfig::default(),
            cluster: ClusterConfig::default(),
            dev: false,
        }
    }
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            issuer: None,
            audience: None,
            public_keys: Vec::new(),
            jwks_file: None,
            jwks_poll_secs: 10,
            leeway_secs: 30,
            allowed_origins: Vec::new(),
        }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 0,
            max_connections_per_user: 5,
            client_messages_per_sec: 50,
            client_message_burst: 100,
            max_message_bytes: 64 << 10,
            read_buffer_bytes: 1 << 10,
            write_buffer_bytes: 16 << 10,
            event_queue: 1024,
            outbound_queue_bytes: 1 << 20,
            guest_memory_bytes: 8 << 20,
            guest_memory_reservation: ReservationPolicy::Auto,
            guest_max_instances: 16,
            guest_max_tables: 16,
            guest_max_memories: 4,
            guest_table_elements: 10_000,
            guest_call_ms: 10,
            guest_call_wall_ms: 1000,
            max_emits_per_call: 64,
            write_timeout_secs: 10,
            idle_timeout_secs: 30 * 60,
            hibernate_after_secs: 30,
            hibernate_state_bytes: 16 << 10,
            ping_interval_secs: 30,
            dead_peer_secs: 75,
            max_body_bytes: 1 << 20,
            max_queued_bytes: 64 << 20,
            queue_delay_ms: 50,
            publish_wait_ms: 1000,
            user_queue_delay_ms: 1000,
            header_read_timeout_secs: 10,
            body_read_timeout_secs: 10,
            max_http_connections: 1024,
            max_http_connections_per_address: 256,
            max_revocations_per_tenant: 10_000,
            max_revocations: 100_000,
            max_payload_depth: 32,
            max_batch_events: 1000,
            shutdown_grace_secs: 10,
        }
    }
}

impl std::fmt::Debug for Config {
    /// Never prints the secret: `AppState`'s Debug output reaches logs and panics.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Config")
            .field("listen", &self.listen)
            .field("ops_listen", &self.ops_listen)
            .field("guest", &self.guest)
            .field("guest_cache_dir", &self.guest_cache_dir)
            .field("guest_poll_secs", &self.guest_poll_secs)
            .field(
                "jwt_secret",
                &self.jwt_secret.as_ref().map(|_| "<redacted>"),
            )
            .field("guest_perf_map", &self.guest_perf_map)
            .field("auth", &self.auth)
            .field("limits", &self.limits)
            .field("history", &self.history)
            .field("streams", &self.streams)
            .field("rpc", &self.rpc)
            .field("webhooks", &self.webhooks)
            .field("tls", &self.tls)
            .field("cluster", &self.cluster)
            .field("dev", &self.dev)
            .finish()
    }
}

/// Longest any configured duration may be. Durations are added to instants; a bound keeps
/// every such sum far from overflowing, and nothing here needs more than a year.
pub const MAX_CONFIG_SECS: u64 = 365 * 24 * 3600;

/// A configuration value that cannot work, named by its key.
#[derive(Debug, thiserror::Error)]
#[error("config: {key} = {value}: {reason}")]
pub struct Invalid {
    pub key: &'static str,
    pub value: String,
    pub reason: String,
}

/// The refusal of `value` for `key`, and why.
impl Limits {
    fn validate(&self) -> Result<(), Invalid> {
        let l = self;
        let bad = invalid;
        for (key, value) in [
            ("limits.idle_timeout_secs", l.idle_timeout_secs),
            ("limits.hibernate_after_secs", l.hibernate_after_secs),
            ("limits.ping_interval_secs", l.ping_interval_secs),
            ("limits.dead_peer_secs", l.dead_peer_secs),
            ("limits.write_timeout_secs", l.write_timeout_secs),
            ("limits.shutdown_grace_secs", l.shutdown_grace_secs),
            (
                "limits.header_read_timeout_secs",
                l.header_read_timeout_secs,
            ),
            ("limits.body_read_timeout_secs", l.body_read_timeout_secs),
        ] {
            if value > MAX_CONFIG_SECS {
                return Err(bad(key, &value, "at most one year (31536000)"));
            }
        }
        for (key, value) in [
            ("limits.idle_timeout_secs", l.idle_timeout_secs),
            ("limits.ping_interval_secs", l.ping_interval_secs),
            ("limits.dead_peer_secs", l.dead_peer_secs),
            ("limits.write_timeout_secs", l.write_timeout_secs),
            (
                "limits.max_connections_per_user",
                l.max_connections_per_user as u64,
            ),
            ("limits.max_message_bytes", l.max_message_bytes as u64),
            ("limits.read_buffer_bytes", l.read_buffer_bytes as u64),
            ("limits.event_queue", l.event_queue as u64),
            ("limits.outbound_queue_bytes", l.outbound_queue_bytes as u64),
            ("limits.guest_memory_bytes", l.guest_memory_bytes as u64),
            ("limits.guest_call_ms", l.guest_call_ms),
            ("limits.guest_max_instances", l.guest_max_instances as u64),
            ("limits.guest_max_tables", l.guest_max_tables as u64),
            ("limits.guest_max_memories", l.guest_max_memories as u64),
            ("limits.guest_table_elements", l.guest_table_elements as u64),
            ("limits.max_emits_per_call", l.max_emits_per_call as u64),
            ("limits.max_body_bytes", l.max_body_bytes as u64),
            ("limits.max_batch_events", l.max_batch_events as u64),
            ("limits.max_payload_depth", l.max_payload_depth as u64),
            (
                "limits.header_read_timeout_secs",
                l.header_read_timeout_secs,
            ),
            ("limits.body_read_timeout_secs", l.body_read_timeout_secs),
            ("limits.max_http_connections", l.max_http_connections as u64),
            (
                "limits.max_revocations_per_tenant",
                l.max_revocations_per_tenant as u64,
            ),
            ("limits.max_revocations", l.max_revocations as u64),
            ("limits.max_queued_bytes", l.max_queued_bytes as u64),
            (
                "limits.client_message_burst",
                u64::from(l.client_message_burst),
            ),
        ] {
            if value == 0 {
                return Err(bad(key, &value, "must be at least 1"));
            }
        }
        if l.dead_peer_secs < l.ping_interval_secs {
            return Err(bad(
                "limits.dead_peer_secs",
                &l.dead_peer_secs,
                "must be at least limits.ping_interval_secs, or every peer is dead before its first ping",
            ));
        }
        for (key, value) in [
            ("limits.queue_delay_ms", l.queue_delay_ms),
            ("limits.publish_wait_ms", l.publish_wait_ms),
            ("limits.user_queue_delay_ms", l.user_queue_delay_ms),
        ] {
            if value > 60_000 {
                return Err(bad(key, &value, "at most 60000"));
            }
        }
        if l.guest_call_ms > 60_000 || l.guest_call_wall_ms > 60_000 {
            return Err(bad(
                "limits.guest_call_ms / guest_call_wall_ms",
                &l.guest_call_wall_ms.max(l.guest_call_ms),
                "at most 60000: a guest call holds a worker thread",
            ));
        }
        if l.guest_call_wall_ms < l.guest_call_ms {
            return Err(bad(
                "limits.guest_call_wall_ms",
                &l.guest_call_wall_ms,
                "must be at least limits.guest_call_ms",
            ));
        }
        if l.max_message_bytes > 256 << 20 {
            return Err(bad(
                "limits.max_message_bytes",
                &l.max_message_bytes,
                "at most 256 MiB",
            ));
        }
        if l.guest_memory_bytes > 4 << 30 {
            return Err(bad(
                "limits.guest_memory_bytes",
                &l.guest_memory_bytes,
                "at most 4 GiB, the size of a 32-bit linear memory",
            ));
        }
        if l.max_payload_depth > 100 {
            return Err(bad(
                "limits.max_payload_depth",
                &l.max_payload_depth,
                "at most 100: handlers' JSON parsers stop near 128 levels, and a payload they cannot parse cannot be redacted",
            ));
        }
        Ok(())
    }
}

impl History {
    fn validate(&self) -> Result<(), Invalid> {
        let h = self;
        for (key, value) in [
            ("history.max_age_secs", h.max_age_secs),
            ("history.idempotency_window_secs", h.idempotency_window_secs),
        ] {
            if value > MAX_CONFIG_SECS {
                return Err(invalid(key, &value, "at most one year (31536000)"));
            }
        }
        for (key, value) in [
            ("history.max_events_per_user", h.max_events_per_user as u64),
            ("history.max_age_secs", h.max_age_secs),
            ("history.max_bytes", h.max_bytes as u64),
            ("history.max_replay_events", h.max_replay_events as u64),
            ("history.idempotency_window_secs", h.idempotency_window_secs),
            (
                "history.idempotency_keys_per_user",
                h.idempotency_keys_per_user as u64,
            ),
        ] {
            if value == 0 {
                return Err(invalid(key, &value, "must be at least 1"));
            }
        }
        Ok(())
    }
}

fn invalid(key: &'static str, value: &dyn std::fmt::Display, reason: &str) -> Invalid {
    Invalid {
        key,
        value: value.to_string(),
        reason: reason.to_owned(),
    }
}

/// Top-level keys and sections (tables), as environment variables spell them after
/// `GATEWAY_`: read from the config type itself, so a new key is settable at once.
fn env_names() -> (Vec<String>, Vec<String>) {
    let defaults = serde_json::to_value(Config::default()).unwrap_or_default();
    let mut keys = Vec::new();
    let mut sections = Vec::new();
    for (name, value) in defaults.as_object().into_iter().flatten() {
        match value {
            serde_json::Value::Object(_) => sections.push(name.clone()),
            _ => keys.push(name.clone()),
        }
    }
    (keys, sections)
}
/// `GATEWAY_*` variables that are read elsewhere, not config keys.
const ENV_NOT_CONFIG: &[&str] = &["log", "log_json"];

impl Config {
    /// Refuses values that cannot work or would overflow a computation, with the key named:
    /// each section checks its own keys, then the sections that depend on another.
    pub fn validate(&self) -> Result<(), Invalid> {
        let a = &self.auth;
        for (key, value) in [
            ("auth.jwks_poll_secs", a.jwks_poll_secs),
            ("auth.leeway_secs", a.leeway_secs),
            ("guest_poll_secs", self.guest_poll_secs),
            (
                "tls.handshake_timeout_secs",
                self.tls.handshake_timeout_secs,
            ),
            ("tls.reload_poll_secs", self.tls.reload_poll_secs),
        ] {
            if value > MAX_CONFIG_SECS {
                return Err(invalid(key, &value, "at most one year (31536000)"));
            }
        }
        for (key, value) in [
            (
                "tls.handshake_timeout_secs",
                self.tls.handshake_timeout_secs,
            ),
            ("tls.reload_poll_secs", self.tls.reload_poll_secs),
        ] {
            if value == 0 {
                return Err(invalid(key, &value, "must be at least 1"));
            }
        }
        self.limits.validate()?;
        self.history.validate()?;
        self.tls.validate()?;
        self.streams.validate()?;
        self.rpc.validate(self.limits.max_message_bytes)?;
        self.webhooks.validate()?;
        self.cluster.validate(&self.history)
    }

    /// Defaults, then the TOML file (if given), then `GATEWAY_*` environment variables.
    pub fn load(file: Option<&Path>) -> Result<Config, Box<figment::Error>> {
        Self::load_from(file, std::env::vars())
    }

    /// [`Config::load`] with the environment given, for tests.
    pub fn load_from(
        file: Option<&Path>,
        vars: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, Box<figment::Error>> {
        let mut figment = Figment::from(Serialized::defaults(Config::default()));
        if let Some(file) = file {
            figment = figment.merge(Toml::file_exact(file));
        }
        // A `GATEWAY_` variable with `__` can only be meant as a nested key, so an unknown
        // section there (a misspelt `GATEWAY_LIMIT__...`) is an error like an unknown key in
        // the file. A plain `GATEWAY_X` may belong to something else in an operator's
        // environment; an unknown one is only warned about.
        let (env_keys, env_sections) = env_names();
        let mut pairs = Vec::new();
        for (name, value) in vars {
            let Some(key) = name.strip_prefix("GATEWAY_") else {
                continue;
            };
            let key = key.to_ascii_lowercase();
            match key.split_once("__") {
                Some((section, _)) if env_sections.iter().any(|s| s == section) => {
                    pairs.push((key, value))
                }
                Some((section, _)) => {
                    return Err(Box::new(figment::Error::from(format!(
                        "environment variable {name}: unknown config section `{section}` \
                         (known: {})",
                        env_sections.join(", ")
                    ))));
                }
                None if env_keys.contains(&key) => pairs.push((key, value)),
                None if ENV_NOT_CONFIG.contains(&key.as_str()) => {}
                None => tracing::warn!(
                    variable = %name,
                    "environment variable is not a config key and is ignored"
                ),
            }
        }
        for (key, value) in pairs {
            // Parsed as figment's `Env` provider parses values (numbers, booleans, arrays).
            let value: figment::value::Value = value.parse().unwrap_or_else(|e| match e {});
            let key = key.replace("__", ".");
            figment = figment.merge(Serialized::global(&key, value));
        }
        figment.extract().map_err(Box::new)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn environment_keys_override_and_misspelt_sections_are_errors() {
        let config = Config::load_from(
            None,
            vars(&[
                ("GATEWAY_LIMITS__EVENT_QUEUE", "7"),
                ("GATEWAY_AUTH__ALLOWED_ORIGINS", "[\"https://a.example\"]"),
                ("GATEWAY_JWT_SECRET", "s"),
                ("GATEWAY_LOG", "debug"),
                ("GATEWAY_SOMETHING_ELSE", "x"),
                ("OTHER", "y"),
            ]),
        )
        .unwrap();
        assert_eq!(config.limits.event_queue, 7);
        assert_eq!(config.auth.allowed_origins, ["https://a.example"]);
        assert_eq!(config.jwt_secret.as_deref(), Some("s"));

        let err = Config::load_from(None, vars(&[("GATEWAY_LIMIT__EVENT_QUEUE", "7")]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("GATEWAY_LIMIT__EVENT_QUEUE"), "{err}");
        let err = Config::load_from(None, vars(&[("GATEWAY_LIMITS__EVENT_QUEU", "7")]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("event_queu"), "{err}");
    }

    #[test]
    fn defaults_are_valid_and_absurd_values_are_named() {
        Config::default().validate().unwrap();
        let mut config = Config::default();
        config.limits.write_timeout_secs = u64::MAX;
        let err = config.validate().unwrap_err();
        assert_eq!(err.key, "limits.write_timeout_secs");
        let mut config = Config::default();
        config.limits.guest_call_wall_ms = 1;
        assert_eq!(
            config.validate().unwrap_err().key,
            "limits.guest_call_wall_ms"
        );
    }

    #[test]
    fn the_revocations_load_timeout_is_bounded_in_cluster_mode() {
        let mut config = Config::default();
        assert_eq!(config.cluster.revocations_load_timeout_secs, 30);
        config.cluster.nats_url = Some("nats://127.0.0.1:4222".into());
        config.validate().unwrap();
        for bad in [0, MAX_REVOCATIONS_LOAD_SECS + 1] {
            config.cluster.revocations_load_timeout_secs = bad;
            assert_eq!(
                config.validate().unwrap_err().key,
                "cluster.revocations_load_timeout_secs"
            );
        }
        let config = Config::load_from(
            None,
            vars(&[("GATEWAY_CLUSTER__REVOCATIONS_LOAD_TIMEOUT_SECS", "5")]),
        )
        .unwrap();
        assert_eq!(config.cluster.revocations_load_timeout_secs, 5);
    }

    #[test]
    fn every_top_level_key_is_read_from_the_environment() {
        let config = Config::load_from(
            None,
            vars(&[
                ("GATEWAY_GUEST_POLL_SECS", "3"),
                ("GATEWAY_GUEST_CACHE_DIR", "/var/cache/gateway"),
                ("GATEWAY_OPS_LISTEN", "127.0.0.1:9999"),
            ]),
        )
        .unwrap();
        assert_eq!(config.guest_poll_secs, 3);
        assert_eq!(
            config.guest_cache_dir.as_deref(),
            Some(Path::new("/var/cache/gateway"))
        );
        assert!(config.ops_listen.is_some());
    }

    #[test]
    fn tls_needs_both_files_and_reads_them_from_the_environment() {
        let config = Config::load_from(
            None,
            vars(&[("GATEWAY_TLS__CERT_FILE", "/etc/gateway/cert.pem")]),
        )
        .unwrap();
        assert_eq!(
            config.tls.cert_file.as_deref(),
            Some(Path::new("/etc/gateway/cert.pem"))
        );
        assert_eq!(config.validate().unwrap_err().key, "tls.key_file");
        let config = Config::load_from(
            None,
            vars(&[
                ("GATEWAY_TLS__CERT_FILE", "/c.pem"),
                ("GATEWAY_TLS__KEY_FILE", "/k.pem"),
            ]),
        )
        .unwrap();
        config.validate().unwrap();
    }

    #[test]
    fn debug_output_never_shows_the_secret() {
        let config = Config {
            jwt_secret: Some("very-secret-value".into()),
            ..Config::default()
        };
        assert!(!format!("{config:?}").contains("very-secret-value"));
    }
}

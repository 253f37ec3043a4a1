//! Configuration: built-in defaults, then a TOML file, then `GATEWAY_*` environment variables.
//!
//! Top-level keys map to `GATEWAY_<KEY>` (`GATEWAY_LISTEN`, `GATEWAY_JWT_SECRET`,
//! `GATEWAY_GUEST`); nested keys use a double underscore (`GATEWAY_LIMITS__EVENT_QUEUE`).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Address to listen on.
    pub listen: SocketAddr,
    /// Path of the guest component every connection instantiates.
    pub guest: Option<PathBuf>,
    /// HS256 secret for connect and publisher tokens.
    pub jwt_secret: Option<String>,
    /// Write `/tmp/perf-<pid>.map` naming the guest's compiled functions, so `perf report`
    /// shows where time inside the sandbox goes. Off by default: the file grows with every
    /// guest loaded.
    pub guest_perf_map: bool,
    pub auth: AuthConfig,
    pub limits: Limits,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
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
    pub jwks_poll_secs: u64,
    /// Clock skew tolerated on `exp` and `nbf`, in seconds.
    pub leeway_secs: u64,
    /// Browser origins allowed to connect (exact `Origin` header values). Empty: any origin.
    /// Requests without an `Origin` header (non-browser clients) are not affected.
    pub allowed_origins: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
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
#[derive(Debug, Clone, Serialize, Deserialize)]
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
    pub read_buffer_bytes: usize,
    /// Bytes of outgoing frames buffered before a write is forced.
    pub write_buffer_bytes: usize,
    /// Events waiting for one connection before it counts as a slow client and is closed.
    pub event_queue: usize,
    /// Bytes of event payloads waiting for one connection before it counts as a slow client.
    pub outbound_queue_bytes: usize,
    /// Cap on one instance's linear memory.
    pub guest_memory_bytes: usize,
    /// How instances' linear memories are reserved: `auto` (full while the node's capacity
    /// fits the address space), `full` (4 GiB each: no bounds checks in guest code, about
    /// 4 KiB more page tables per connection) or `compact` (the least memory).
    pub guest_memory_reservation: ReservationPolicy,
    /// CPU time one guest call may use, in milliseconds (time the thread is preempted does
    /// not count, beyond at most the call's first 2 ms).
    pub guest_call_ms: u64,
    /// Wall-clock bound on one guest call, in milliseconds, however little CPU it got: no
    /// guest holds a runtime worker thread longer than this.
    pub guest_call_wall_ms: u64,
    /// Frames a guest may emit in one call.
    pub max_emits_per_call: usize,
    /// A client that reads nothing for this long while frames wait is closed as slow.
    pub write_timeout_secs: u64,
    /// A connection with no frames either way for this long is closed.
    pub idle_timeout_secs: u64,
    /// How often the gateway pings each client.
    pub ping_interval_secs: u64,
    /// A client that sends nothing, not even a pong, for this long is a dead peer.
    pub dead_peer_secs: u64,
    /// Largest publish request body.
    pub max_body_bytes: usize,
    /// Most events in one batch publish.
    pub max_batch_events: usize,
    /// How long shutdown waits for connections to close.
    pub shutdown_grace_secs: u64,
}

/// See [`Limits::guest_memory_reservation`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
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
            guest: None,
            jwt_secret: None,
            guest_perf_map: false,
            auth: AuthConfig::default(),
            limits: Limits::default(),
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
            read_buffer_bytes: 4 << 10,
            write_buffer_bytes: 16 << 10,
            event_queue: 1024,
            outbound_queue_bytes: 1 << 20,
            guest_memory_bytes: 8 << 20,
            guest_memory_reservation: ReservationPolicy::Auto,
            guest_call_ms: 10,
            guest_call_wall_ms: 100,
            max_emits_per_call: 64,
            write_timeout_secs: 10,
            idle_timeout_secs: 30 * 60,
            ping_interval_secs: 30,
            dead_peer_secs: 75,
            max_body_bytes: 1 << 20,
            max_batch_events: 1000,
            shutdown_grace_secs: 10,
        }
    }
}

impl Config {
    /// Defaults, then the TOML file (if given), then `GATEWAY_*` environment variables.
    pub fn load(file: Option<&Path>) -> Result<Config, Box<figment::Error>> {
        let mut figment = Figment::from(Serialized::defaults(Config::default()));
        if let Some(file) = file {
            figment = figment.merge(Toml::file_exact(file));
        }
        // Only our own keys: other GATEWAY_* variables in an operator's environment are not
        // config and must not fail the unknown-key check.
        let env = Env::prefixed("GATEWAY_")
            .filter(|key| {
                let key = key.as_str().to_ascii_lowercase();
                ["listen", "guest", "jwt_secret", "guest_perf_map"].contains(&key.as_str())
                    || key.starts_with("auth__")
                    || key.starts_with("limits__")
            })
            .split("__");
        figment.merge(env).extract().map_err(Box::new)
    }
}

//! A WebSocket gateway in which every connection runs its handler in its own WebAssembly
//! sandbox.
//!
//! Modules, in the order a connection meets them:
//! - [`config`]: defaults, TOML file, `GATEWAY_*` environment, validation.
//! - [`listener`]: accepting connections, with the limits that apply before an upgrade.
//! - [`tls`]: rustls on the public listener, certificates reloaded on change or SIGHUP.
//! - [`auth`]: JWT verification (algorithm allow-list, `exp`/`nbf`/`iss`/`aud`), token minting.
//! - [`admission`]: how many connections this node can hold (fds, memory mappings).
//! - [`session`]: one connection's path: auth and instantiation before the upgrade, then the
//!   loop that owns socket, instance and event queue, then the close.
//! - [`sandbox`]: the wasmtime engine, the world's two imports, one `Store` per connection
//!   behind the [`sandbox::Handler`] trait; the trial instantiation at start-up.
//! - [`router`]: identity -> its live sessions; appends to the log and fans out.
//! - [`event_log`]: recent events per identity and their sequence numbers, for resume.
//! - [`streams`]: AI output streams: messages that grow by appends, rolled up live, one
//!   snapshot on resume.
//! - [`cluster`]: cluster mode, where that log is a NATS JetStream stream shared by nodes,
//!   and each node follows the identities it holds from one subscription per stream.
//! - [`api`]: `POST /v1/publish`, health, metrics, the JSON error shape.
//! - [`admin`]: `POST /v1/disconnect`, closing and revoking a user's sessions.
//! - [`rpc`]: a client's calls to the backend (`{"type":"rpc"}` frames), taken by the host.
//! - [`presence`]: who is online (`GET /v1/presence`) and the `user.online`/`user.offline`
//!   webhooks.
//! - [`metrics`]: Prometheus counters.
//! - [`cli`]: `gateway serve`, `gateway token`, `gateway guest wrap|check|replay`.
//! - [`replay`]: a guest run offline over client frames and events, for plugin authors.
//! - [`web`]: the browser client (`/client.js`), and in dev mode the demo page.
//! - [`reload`]: swapping the guest, the JWKS file and the TLS certificate while serving.
//! - `serve`: the routes of both listeners, the accept loops, periodic work and the drain.
//!
//! [`AppState::new`] assembles a node (keys, guest, capacity, router); [`serve`] runs it on a
//! listener the caller bound, so tests use port 0.

pub mod admin;
pub mod admission;
pub mod api;
pub mod auth;
pub mod cli;
pub mod cluster;
pub mod config;
pub mod event_log;
pub mod listener;
pub mod metrics;
pub mod pacing;
pub mod presence;
pub mod reload;
pub mod replay;
pub mod router;
pub mod rpc;
pub mod sandbox;
mod serve;
pub mod session;
pub mod streams;
pub mod tls;
pub mod web;

use std::sync::{Arc, Mutex, RwLock};

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use reload::reload_tls;
pub use serve::{app, ops_app, serve, serve_with_ops};

/// jemalloc, for every binary built on this library: pages freed in the middle of the heap
/// go back to the system (after `dirty_decay_ms`, set in `.cargo/config.toml`). With glibc's
/// allocator the instance memory a hibernated handler freed stayed resident among the live
/// sessions' blocks; see the README's memory notes.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

use crate::admission::{Admission, Capacity};
use crate::auth::Verifier;
use crate::config::Config;
use crate::event_log::MemoryLog;
use crate::metrics::Metrics;
use crate::router::Router;
use crate::sandbox::Sandbox;

/// Everything a request or session needs, shared by all of them.
#[derive(Debug)]
pub struct AppState {
    pub config: Config,
    pub verifier: Verifier,
    /// The compiled guest new connections instantiate. A reload swaps it; connections keep
    /// the instance they were given (and with it the guest version they started with).
    sandbox: RwLock<Arc<Sandbox>>,
    /// Every guest loaded since start-up, its live instances and the connections it
    /// hibernated, for `/v1/stats`.
    guest_versions: Mutex<Vec<reload::GuestInUse>>,
    /// The guest file's modification time and size at the last reload attempt.
    guest_stamp: Mutex<reload::FileStamp>,
    pub router: Arc<Router>,
    pub admission: Admission,
    pub metrics: Arc<Metrics>,
    /// Cancelled when the gateway starts draining; every session watches it.
    pub shutdown: CancellationToken,
    /// Upgraded sockets are invisible to axum's graceful shutdown, so sessions are tracked
    /// here and awaited on drain.
    pub sessions: TaskTracker,
    /// The public listener's TLS, when `[tls]` is configured.
    pub tls: Option<Arc<tls::Tls>>,
    /// Where clients' RPC calls go: `[rpc] url`, or in development mode without one the
    /// demo's own backend (set once the listener's address is known).
    pub rpc: std::sync::OnceLock<Arc<rpc::Backend>>,
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Config(#[from] config::Invalid),
    #[error("no guest component configured: set GATEWAY_GUEST or `guest` in the config file")]
    NoGuest,
    #[error(transparent)]
    Guest(#[from] sandbox::LoadError),
    #[error(transparent)]
    Trial(#[from] sandbox::TrialError),
    #[error(transparent)]
    Keys(#[from] auth::KeyError),
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    #[error(transparent)]
    Cluster(#[from] cluster::JoinError),
}

impl AppState {
    /// Loads keys and the guest; fails with a message an operator can act on.
    pub fn new(config: Config) -> Result<Arc<Self>, StartError> {
        Self::with_sandbox(config, |_| {})
    }

    /// Like [`AppState::new`], letting the caller adjust the sandbox before serving.
    pub fn with_sandbox(
        config: Config,
        adjust: impl FnOnce(&mut Sandbox),
    ) -> Result<Arc<Self>, StartError> {
        config.validate()?;
        let metrics = Arc::new(Metrics::new());
        let verifier = Verifier::from_config(&config)?;
        let tls = tls::Tls::load(&config.tls)?;
        let rpc = std::sync::OnceLock::new();
        if let Some(backend) = rpc::Backend::new(&config.rpc, metrics.clone())? {
            let _ = rpc.set(Arc::new(backend));
        }
        let guest = config.guest.as_deref().ok_or(StartError::NoGuest)?;
        let mut capacity = Capacity::of_this_process(config.limits.max_connections);
        let mut sandbox = Sandbox::load(guest, &config, capacity.effective, metrics.clone())?;
        adjust(&mut sandbox);
        let trial = sandbox.trial(&config)?;
        capacity.limit_by_memory(trial.resident_bytes_per_instance);
        tracing::info!(
            connections = capacity.effective,
            fd_limit = capacity.fd_limit,
            max_map_count = capacity.max_map_count,
            by_memory = capacity.by_memory,
            instance_resident_bytes = trial.resident_bytes_per_instance,
            instantiate_us = trial.instantiate.as_micros() as u64,
            configured = capacity.configured,
            guest_memory_reservation = sandbox.reservation.as_str(),
            "connection capacity of this node"
        );
        if config.dev {
            tracing::warn!(
                "development mode: / serves the demo page, and /dev/token and /dev/run mint \
                 tokens and publish events for anyone who can reach this port"
            );
        }
        let guest_versions = Mutex::new(vec![reload::GuestInUse::of(&sandbox)]);
        let router = Arc::new(Router::new(
            metrics.clone(),
            &config.limits,
            Arc::new(
                MemoryLog::new(config.history.clone())
                    .with_streams(config.streams.clone(), config.limits.max_message_bytes),
            ),
        ));
        if let Some(webhooks) = presence::Webhooks::new(&config.webhooks, metrics.clone())? {
            router.watch_presence(Arc::new(webhooks));
        }
        Ok(Arc::new(AppState {
            guest_versions,
            guest_stamp: Mutex::new(reload::file_stamp(guest)),
            verifier,
            sandbox: RwLock::new(Arc::new(sandbox)),
            router,
            admission: Admission::new(capacity),
            metrics,
            shutdown: CancellationToken::new(),
            sessions: TaskTracker::new(),
            tls,
            rpc,
            config,
        }))
    }
}

impl AppState {
    /// Cluster mode (`[cluster] nats_url` set): connects to NATS and sets up the stream, so
    /// that this node stores and receives events through it. Does nothing otherwise, or if
    /// already done. [`serve_with_ops`] calls it; call it first for a start-up error of its
    /// own.
    pub async fn join_cluster(&self) -> Result<(), StartError> {
        if self.config.cluster.nats_url().is_none() || self.router.cluster().is_some() {
            return Ok(());
        }
        let cluster = cluster::Cluster::join(
            &self.config.cluster,
            &self.config.history,
            &crate::streams::Bounds {
                limits: self.config.streams.clone(),
                frame_limit: self.config.limits.max_message_bytes,
            },
            self.metrics.clone(),
        )
        .await?;
        let mut presence = cluster.presence();
        if let Some(webhooks) = self.router.presence() {
            presence = presence.with_webhooks(webhooks.clone());
        }
        self.router.share_presence(Arc::new(presence));
        self.router.join(cluster);
        Ok(())
    }

    /// The guest new connections get now.
    pub fn sandbox(&self) -> Arc<Sandbox> {
        self.sandbox
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

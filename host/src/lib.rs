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
//! - [`cluster`]: cluster mode, where that log is a NATS JetStream stream shared by nodes,
//!   and each node subscribes to the identities it holds.
//! - [`api`]: `POST /v1/publish`, health, metrics, the JSON error shape.
//! - [`admin`]: `POST /v1/disconnect`, closing and revoking a user's sessions.
//! - [`metrics`]: Prometheus counters.
//! - [`cli`]: `gateway serve`, `gateway token`, `gateway guest wrap|check|replay`.
//! - [`replay`]: a guest run offline over client frames and events, for plugin authors.
//! - [`web`]: the browser client (`/client.js`), and in dev mode the demo page.
//!
//! [`serve`] runs the whole thing on a listener the caller bound, so tests use port 0.

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
pub mod replay;
pub mod router;
pub mod sandbox;
pub mod session;
pub mod tls;
pub mod web;

use std::future::Future;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use axum::routing::{get, post};
use prometheus_client::metrics::gauge::Gauge;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

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
    guest_versions: Mutex<Vec<GuestInUse>>,
    /// The guest file's modification time and size at the last reload attempt.
    guest_stamp: Mutex<FileStamp>,
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
        let guest_versions = Mutex::new(vec![GuestInUse::of(&sandbox)]);
        Ok(Arc::new(AppState {
            guest_versions,
            guest_stamp: Mutex::new(file_stamp(guest)),
            verifier,
            sandbox: RwLock::new(Arc::new(sandbox)),
            router: Arc::new(Router::new(
                metrics.clone(),
                &config.limits,
                Arc::new(MemoryLog::new(config.history.clone())),
            )),
            admission: Admission::new(capacity),
            metrics,
            shutdown: CancellationToken::new(),
            sessions: TaskTracker::new(),
            tls,
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
            self.config.limits.max_message_bytes,
            self.metrics.clone(),
        )
        .await?;
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

    /// Loads the guest from its configured path again, proves it with a trial
    /// instantiation under the configured limits, and only then makes it the guest of new
    /// connections. Live connections keep theirs. A guest that fails to load or to run is
    /// refused, and the one in use stays.
    pub fn reload_guest(&self) -> Result<sandbox::GuestVersion, StartError> {
        self.reload_guest_when(true)
            .map(|loaded| loaded.expect("a forced reload loads"))
    }

    /// [`AppState::reload_guest`] if the file changed since the last attempt.
    pub fn reload_guest_if_changed(&self) -> Result<Option<sandbox::GuestVersion>, StartError> {
        self.reload_guest_when(false)
    }

    fn reload_guest_when(&self, force: bool) -> Result<Option<sandbox::GuestVersion>, StartError> {
        let path = self.config.guest.as_deref().ok_or(StartError::NoGuest)?;
        // Held for the whole reload: reloads run one at a time.
        let mut stamp = self.guest_stamp.lock().unwrap_or_else(|p| p.into_inner());
        let now = file_stamp(path);
        if !force && *stamp == now {
            return Ok(None);
        }
        // Remembered even if the load fails, so a broken file is tried once per change.
        *stamp = now;
        let result = self.load_guest(path);
        let outcome = if result.is_ok() { "ok" } else { "refused" };
        self.metrics.guest_reload(outcome);
        result.map(Some)
    }

    fn load_guest(&self, path: &std::path::Path) -> Result<sandbox::GuestVersion, StartError> {
        let sandbox = Sandbox::load(
            path,
            &self.config,
            self.admission.capacity.effective,
            self.metrics.clone(),
        )?;
        sandbox.trial(&self.config)?;
        let mut versions = self
            .guest_versions
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        // Versions nobody runs any more are forgotten, so reloads cannot grow the list; the
        // same component loaded again is one version.
        let label = sandbox.version.label();
        versions.retain(|v| v.in_use() && v.version.label() != label);
        versions.push(GuestInUse::of(&sandbox));
        let version = sandbox.version.clone();
        *self.sandbox.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(sandbox);
        Ok(version)
    }

    /// The guest versions with live instances or hibernated connections, and the current
    /// one, with their counts (instances, hibernated).
    pub fn guest_versions(&self) -> Vec<(sandbox::GuestVersion, i64, i64)> {
        let current = self.sandbox().version.clone();
        let versions = self
            .guest_versions
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        versions
            .iter()
            .filter(|v| v.in_use() || v.version == current)
            .map(|v| (v.version.clone(), v.instances.get(), v.hibernated.get()))
            .collect()
    }
}

/// A loaded guest version and what still runs on it.
#[derive(Debug)]
struct GuestInUse {
    version: sandbox::GuestVersion,
    instances: Gauge,
    /// Hibernated connections, which wake into this version.
    hibernated: Gauge,
}

impl GuestInUse {
    fn of(sandbox: &Sandbox) -> Self {
        GuestInUse {
            version: sandbox.version.clone(),
            instances: sandbox.instances_gauge(),
            hibernated: sandbox.hibernated_gauge(),
        }
    }

    fn in_use(&self) -> bool {
        self.instances.get() > 0 || self.hibernated.get() > 0
    }
}

/// A file's modification time and size: a change to either is a new file.
type FileStamp = Option<(Option<std::time::SystemTime>, u64)>;

fn file_stamp(path: &std::path::Path) -> FileStamp {
    std::fs::metadata(path)
        .ok()
        .map(|meta| (meta.modified().ok(), meta.len()))
}

/// What the ops listener serves: health, metrics, and the backend's and operators' API
/// (`/v1/*`, authorised exactly as on the public listener). Browsers never reach it, so no
/// crowd of WebSocket handshakes or anonymous clients can starve a publisher of slots.
pub fn ops_app(state: Arc<AppState>) -> axum::Router {
    api_routes(axum::Router::new())
        .route("/metrics", get(api::metrics))
        .with_state(state)
}

/// Routes served on both listeners.
fn api_routes(router: axum::Router<Arc<AppState>>) -> axum::Router<Arc<AppState>> {
    router
        .route("/v1/publish", post(api::publish))
        .route("/v1/publish/batch", post(api::publish_batch))
        .route("/v1/disconnect", post(admin::disconnect))
        .route("/v1/guest/reload", post(admin::reload_guest))
        .route("/v1/stats", get(api::stats))
        .route("/healthz", get(api::healthz))
        .route("/readyz", get(api::readyz))
}

/// How long start-up waits for the revocations other nodes recorded.
const DISCONNECTS_LOAD_WAIT: Duration = Duration::from_secs(30);

/// Connections the ops listener holds at once: probes, scrapers and backend services.
const OPS_HTTP_CONNECTIONS: usize = 256;

/// The HTTP application of the public listener, shared by the binary and the tests.
/// `/metrics` is here only when there is no ops listener (`ops_apart`): it tells anyone who
/// can reach it how many users are connected and what the node refuses.
pub fn app(state: Arc<AppState>, ops_apart: bool) -> axum::Router {
    let routes = api_routes(web::routes(state.config.dev).route("/ws", get(session::connect)));
    let routes = match ops_apart {
        true => routes,
        false => routes.route("/metrics", get(api::metrics)),
    };
    routes.with_state(state)
}

/// Re-reads the JWKS file and the TLS certificate when they change, and on SIGHUP those and
/// the guest component, until shutdown.
async fn watch_reloads(state: Arc<AppState>) {
    let path = state.verifier.jwks_path().map(|p| p.display().to_string());
    let polls = [
        path.as_ref().map(|_| state.config.auth.jwks_poll_secs),
        (state.config.guest_poll_secs > 0).then_some(state.config.guest_poll_secs),
        state
            .tls
            .as_ref()
            .map(|_| state.config.tls.reload_poll_secs),
    ];
    let poll = polls.into_iter().flatten().min();
    let poll = Duration::from_secs(poll.unwrap_or(u64::MAX).clamp(1, config::MAX_CONFIG_SECS));
    #[cfg(unix)]
    let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
    loop {
        #[cfg(unix)]
        let sighup = async {
            match hangup.as_mut() {
                Some(h) => h.recv().await,
                None => std::future::pending().await,
            }
        };
        #[cfg(not(unix))]
        let sighup = std::future::pending::<Option<()>>();
        let force = tokio::select! {
            () = state.shutdown.cancelled() => return,
            () = tokio::time::sleep(poll), if polls.iter().any(Option::is_some) => false,
            _ = sighup => true,
        };
        reload_guest(&state, force).await;
        if state.tls.is_some() {
            reload_tls(&state, force);
        }
        let Some(path) = &path else {
            continue;
        };
        match state.verifier.reload_jwks(force) {
            Ok(Some(keys)) => tracing::info!(%path, keys, "JWKS reloaded"),
            Ok(None) => {}
            Err(err) => tracing::error!(
                %path,
                error = %err,
                "JWKS reload failed; KEEPING THE PREVIOUS KEYS until the file is fixed"
            ),
        }
    }
}

/// Re-reads the certificate and key if they changed (or always, with `force`), logged
/// and counted either way.
pub fn reload_tls(state: &AppState, force: bool) {
    let Some(tls) = &state.tls else {
        return;
    };
    let cert = tls.cert_file().display().to_string();
    match tls.reload(force) {
        Ok(false) => {}
        Ok(true) => {
            state.metrics.tls_reload("ok");
            tracing::info!(%cert, "TLS certificate reloaded: new handshakes use it");
        }
        Err(err) => {
            state.metrics.tls_reload("refused");
            tracing::error!(
                %cert,
                error = %err,
                "TLS reload refused; KEEPING THE CERTIFICATE IN USE until the files are fixed"
            );
        }
    }
}

/// Reloads the guest if its file changed (or always, with `force`), logged either way.
async fn reload_guest(state: &Arc<AppState>, force: bool) {
    let path = state
        .config
        .guest
        .as_deref()
        .map(|p| p.display().to_string());
    // Compiling a large guest takes seconds: off the runtime's workers.
    let reloading = state.clone();
    let outcome = tokio::task::spawn_blocking(move || match force {
        true => reloading.reload_guest().map(Some),
        false => reloading.reload_guest_if_changed(),
    })
    .await
    .unwrap_or_else(|panic| std::panic::resume_unwind(panic.into_panic()));
    match outcome {
        Ok(None) => {}
        Ok(Some(version)) => tracing::warn!(
            target: "audit",
            by = if force { "SIGHUP" } else { "file change" },
            guest = path,
            version = version.label(),
            "guest reloaded: new connections use it"
        ),
        Err(err) => tracing::error!(
            target: "audit",
            by = if force { "SIGHUP" } else { "file change" },
            guest = path,
            error = %err,
            "guest reload refused; KEEPING THE GUEST IN USE"
        ),
    }
}

/// Once a second until shutdown: drops events, idempotency keys and revocations past their
/// age, and publishes the log's size and evictions as metrics.
async fn expire_history(state: Arc<AppState>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut reported = [0u64; 3];
    loop {
        tokio::select! {
            () = state.shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        if !state.verifier.revocations.is_empty() {
            state.verifier.revocations.expire(auth::now_secs());
        }
        let log = state.router.log();
        log.expire();
        state.metrics.history_bytes.set(log.bytes() as i64);
        for (i, (cause, total)) in log.evicted().into_iter().enumerate() {
            let new = total.saturating_sub(reported[i]);
            if new > 0 {
                state
                    .metrics
                    .history_evictions
                    .get_or_create(&vec![("reason", cause)])
                    .inc_by(new);
                reported[i] = total;
            }
        }
    }
}

/// Serves `listener` until `shutdown` completes, then drains (see [`serve_with_ops`]).
pub async fn serve(
    listener: TcpListener,
    state: Arc<AppState>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    serve_with_ops(listener, None, state, shutdown).await
}

/// Serves the public listener (and the ops listener, if given) until `shutdown` completes
/// or the state's shutdown token is cancelled. Then the drain: no new connections, every
/// session closes with 1001, HTTP connections finish their request; all of it bounded by
/// `shutdown_grace_secs`, after which whatever is left is dropped.
pub async fn serve_with_ops(
    listener: TcpListener,
    ops: Option<TcpListener>,
    state: Arc<AppState>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    state
        .join_cluster()
        .await
        .map_err(|e| std::io::Error::other(e.to_string()))?;
    // Cluster mode: the revocations in force, recorded by any node, hold here before anyone
    // is served. A node that cannot load them does not serve at all: it would admit revoked
    // tokens.
    let (loaded, disconnects_loaded) = tokio::sync::oneshot::channel();
    let disconnects = tokio::spawn(admin::follow_disconnects(state.clone(), loaded));
    if tokio::time::timeout(DISCONNECTS_LOAD_WAIT, disconnects_loaded)
        .await
        .is_err()
    {
        disconnects.abort();
        return Err(std::io::Error::other(format!(
            "cluster: the revocations in force did not load from NATS within {} s; not \
             serving, since this node would admit revoked tokens",
            DISCONNECTS_LOAD_WAIT.as_secs()
        )));
    }
    let limits = &state.config.limits;
    let serving = listener::Serving {
        header_read_timeout: Duration::from_secs(limits.header_read_timeout_secs),
        write_timeout: Duration::from_secs(limits.write_timeout_secs),
        tls_handshake_timeout: Duration::from_secs(state.config.tls.handshake_timeout_secs),
        draining: CancellationToken::new(),
        stopped: CancellationToken::new(),
        connections: TaskTracker::new(),
        metrics: state.metrics.clone(),
    };
    let mut accepting = vec![tokio::spawn(listener::accept(
        listener::Listener {
            socket: listener,
            app: app(state.clone(), ops.is_some()),
            http_connections: limits.max_http_connections,
            per_address: limits.max_http_connections_per_address,
            name: "public",
            tls: state.tls.clone(),
        },
        serving.clone(),
    ))];
    if let Some(ops) = ops {
        accepting.push(tokio::spawn(listener::accept(
            listener::Listener {
                socket: ops,
                app: ops_app(state.clone()),
                http_connections: OPS_HTTP_CONNECTIONS,
                per_address: 0,
                name: "ops",
                tls: None,
            },
            serving.clone(),
        )));
    }
    let jwks = tokio::spawn(watch_reloads(state.clone()));

    let history = tokio::spawn(expire_history(state.clone()));

    tokio::select! {
        () = shutdown => {}
        () = state.shutdown.cancelled() => {}
    }
    state.shutdown.cancel();
    serving.draining.cancel();
    // Every session learns it from its mailbox and closes with 1001.
    state.router.shut_down();
    for task in accepting {
        let _ = task.await;
    }
    let _ = jwks.await;
    let _ = history.await;
    let _ = disconnects.await;

    serving.connections.close();
    state.sessions.close();
    let grace = Duration::from_secs(limits.shutdown_grace_secs);
    let drained = async {
        serving.connections.wait().await;
        state.sessions.wait().await;
    };
    if tokio::time::timeout(grace, drained).await.is_err() {
        tracing::warn!(
            http_connections = serving.connections.len(),
            sessions = state.sessions.len(),
            "connections still open after the shutdown grace period; dropping them"
        );
    }
    serving.stopped.cancel();
    Ok(())
}

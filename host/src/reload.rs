//! Swapping what a node runs without a restart: the guest component (on SIGHUP, a file
//! change or `POST /v1/guest/reload`), the JWKS file and the TLS certificate. Live connections
//! keep the guest version they started with.

use std::sync::Arc;
use std::time::Duration;

use prometheus_client::metrics::gauge::Gauge;

use crate::sandbox::{self, Sandbox};
use crate::{AppState, StartError, config};

impl AppState {
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
pub(crate) struct GuestInUse {
    version: sandbox::GuestVersion,
    instances: Gauge,
    /// Hibernated connections, which wake into this version.
    hibernated: Gauge,
}

impl GuestInUse {
    pub(crate) fn of(sandbox: &Sandbox) -> Self {
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
pub(crate) type FileStamp = Option<(Option<std::time::SystemTime>, u64)>;

pub(crate) fn file_stamp(path: &std::path::Path) -> FileStamp {
    std::fs::metadata(path)
        .ok()
        .map(|meta| (meta.modified().ok(), meta.len()))
}

/// SIGHUP's stream, registered by the caller before the gateway announces itself.
#[cfg(unix)]
pub(crate) type Hangup = tokio::signal::unix::Signal;
#[cfg(not(unix))]
pub(crate) type Hangup = std::convert::Infallible;

/// Re-reads the JWKS file and the TLS certificate when they change, and on SIGHUP those and
/// the guest component, until shutdown.
pub(crate) async fn watch_reloads(state: Arc<AppState>, mut hangup: Option<Hangup>) {
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

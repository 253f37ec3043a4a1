//! Serving a node: the HTTP routes of the public and ops listeners, the accept loops, the
//! node's periodic work, and the drain.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::routing::{get, post};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::reload::watch_reloads;
use crate::router::Publication;
use crate::streams::{MESSAGE_KIND, MessageOp, Status};
use crate::{AppState, admin, api, auth, listener, session, web};

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
        .route("/v1/presence", get(crate::presence::presence))
        .route("/healthz", get(api::healthz))
        .route("/readyz", get(api::readyz))
}

/// Connections the ops listener holds at once: probes, scrapers and backend services.
const OPS_HTTP_CONNECTIONS: usize = 256;

/// The HTTP application of the public listener, shared by the binary and the tests.
/// `/metrics` is here only when there is no ops listener (`ops_apart`): it tells anyone who
/// can reach it how many users are connected and what the node refuses.
pub fn app(state: Arc<AppState>, ops_apart: bool) -> axum::Router {
    let routes = api_routes(
        web::routes(state.config.dev)
            .route("/ws", get(session::connect))
            .route("/sse", get(session::connect_sse)),
    );
    let routes = match ops_apart {
        true => routes,
        false => routes.route("/metrics", get(api::metrics)),
    };
    routes.with_state(state)
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
        end_overdue_messages(&state);
        if let Some(cluster) = state.router.cluster() {
            // Bounded, so that a NATS outage does not hold up this loop; what is left is
            // looked at on the next tick.
            let sweep = end_overdue_cluster_messages(&state, cluster);
            let _ = tokio::time::timeout(Duration::from_secs(1), sweep).await;
        }
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

/// Ends every message still streaming `streams.max_open_secs` after its create as `failed`,
/// through the router like any publish, so its sessions and later resumes learn it.
fn end_overdue_messages(state: &AppState) {
    let max_open = Duration::from_secs(state.config.streams.max_open_secs);
    for (identity, id) in state.router.log().overdue_messages(max_open) {
        match state.router.publish(overdue_end(identity, id), None) {
            Ok(_) => {
                state.metrics.messages_expired.inc();
            }
            Err(refusal) => {
                tracing::warn!(reason = %refusal.reason, "an overdue message was not ended");
            }
        }
    }
}

/// In cluster mode, the overdue messages this node took ops for: ended through the stream.
/// Several nodes may end the same one; the stream takes the first end, the others answer
/// it as a duplicate. A message's records age on their own there, its create first, so it
/// is ended by half the history's age at the latest, while its create is still stored.
async fn end_overdue_cluster_messages(state: &AppState, cluster: &crate::cluster::Cluster) {
    let max_open = Duration::from_secs(
        (state.config.streams.max_open_secs).min(state.config.history.max_age_secs / 2),
    );
    for (identity, id) in cluster.overdue_messages(max_open) {
        let end = overdue_end(identity, id);
        match cluster.publish_message(&end, None).await {
            Ok(Ok(stored)) if !stored.duplicate => {
                state.metrics.messages_expired.inc();
            }
            Ok(Ok(_)) => {}
            // Another node stored its end since this node last looked.
            Ok(Err(refusal)) if refusal.error == "message_ended" => {}
            Ok(Err(refusal)) => {
                tracing::warn!(reason = %refusal.reason, "an overdue message was not ended");
            }
            Err(e) => tracing::warn!(error = %e, "an overdue message was not ended; retried"),
        }
    }
}

/// The `end` of an overdue message, as `failed`.
fn overdue_end(identity: crate::auth::Identity, id: String) -> Publication {
    Publication {
        identity,
        kind: MESSAGE_KIND.to_owned(),
        payload: "null".to_owned(),
        run_id: None,
        thread_id: None,
        message: Some(MessageOp::End {
            id,
            status: Status::Failed,
        }),
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
    // Before anything is announced: a SIGHUP sent once the gateway says it is listening
    // must reload, not end the process with the default action.
    #[cfg(unix)]
    let hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
    #[cfg(not(unix))]
    let hangup = None;
    state
        .join_cluster()
        .await
        .map_err(|e| std::io::Error::other(e.to_string()))?;
    // Cluster mode: the revocations in force, recorded by any node, hold here before anyone
    // is served. A node that cannot load them within `cluster.revocations_load_timeout_secs`
    // does not serve at all: it would admit revoked tokens.
    let (loaded, disconnects_loaded) = tokio::sync::oneshot::channel();
    let disconnects = tokio::spawn(admin::follow_disconnects(state.clone(), loaded));
    let load_wait = state.config.cluster.revocations_load_timeout_secs;
    if tokio::time::timeout(Duration::from_secs(load_wait), disconnects_loaded)
        .await
        .is_err()
    {
        disconnects.abort();
        return Err(std::io::Error::other(format!(
            "cluster: the revocations in force did not load from NATS within {load_wait} s \
             (cluster.revocations_load_timeout_secs); not serving, since this node would \
             admit revoked tokens"
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
    let addr = listener.local_addr()?;
    if state.config.dev {
        crate::web::attach_demo_backend(&state, addr);
    }
    let ops_addr = ops.as_ref().map(TcpListener::local_addr).transpose()?;
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
    let jwks = tokio::spawn(watch_reloads(state.clone(), hangup));
    if let Some(ops) = ops_addr {
        tracing::info!(addr = %ops, "ops endpoints listening");
    }
    // Cluster mode: this node's heartbeat and presence writes, from before its first
    // connection (the other nodes sweep only nodes they saw alive).
    if let Some(presence) = state.router.cluster_presence() {
        tokio::spawn(presence.clone().run(state.shutdown.clone()));
    }
    // Said once revocations are loaded and every listener and signal handler is in place:
    // scripts and tests take it as "ready".
    tracing::info!(%addr, "gateway listening");

    let history = tokio::spawn(expire_history(state.clone()));
    tokio::spawn(crate::pacing::Pacing::run(
        state.router.clone(),
        state.metrics.clone(),
        state.shutdown.clone(),
    ));
    if let Some(webhooks) = state.router.presence() {
        tokio::spawn(webhooks.clone().run(state.shutdown.clone()));
    }

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

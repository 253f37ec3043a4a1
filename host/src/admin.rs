//! Operators' endpoints: `POST /v1/disconnect` closes a user's connections (a logout, a
//! suspended account), optionally revoking their tokens so that they cannot reconnect before
//! expiry; `POST /v1/guest/reload` reloads the guest.

use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt;
use serde::Deserialize;
use serde_json::json;

use crate::AppState;
use crate::api::{ApiError, authorize, read_body, refuse};
use crate::auth::{DISCONNECT_SCOPE, GUEST_RELOAD_SCOPE, Identity, MAX_REVOCATION_SECS, now_secs};
use crate::cluster::{Disconnection, Unavailable};

/// The operator's reason goes into the close frame, whose reason text is at most 123 bytes,
/// after `disconnected: `.
pub const MAX_REASON_BYTES: usize = 100;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DisconnectRequest {
    user_id: String,
    tenant_id: Option<String>,
    /// Only the connections opened with tokens of this session (`sid` claim).
    sid: Option<String>,
    reason: Option<String>,
    /// Also refuse the tokens for this long: with `sid`, that session's tokens; without,
    /// every token of the identity issued up to now.
    revoke_secs: Option<u64>,
}

/// Closes the identity's connections (or one token session's) with 4001 and the reason,
/// and answers `{"disconnected": n, "revoked_until": t | null}`. Audited.
pub async fn disconnect(
    State(app): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let operator = authorize(&app, &headers, DISCONNECT_SCOPE)?;
    let body = read_body(&app, body).await?;
    let request: DisconnectRequest = serde_json::from_slice(&body)
        .map_err(|e| ApiError::bad_request(format!("invalid request: {e}")))?;
    for (name, value) in [
        ("user_id", Some(&request.user_id)),
        ("tenant_id", request.tenant_id.as_ref()),
        ("sid", request.sid.as_ref()),
    ] {
        if let Some(value) = value
            && (value.is_empty() || value.len() > 256)
        {
            return Err(ApiError::bad_request(format!(
                "{name} must be 1 to 256 bytes"
            )));
        }
    }
    let reason = request.reason.unwrap_or_else(|| "by the operator".into());
    if reason.len() > MAX_REASON_BYTES || reason.chars().any(char::is_control) {
        return Err(ApiError::bad_request(format!(
            "reason must be at most {MAX_REASON_BYTES} bytes of text without control characters"
        )));
    }
    if let Some(secs) = request.revoke_secs
        && !(1..=MAX_REVOCATION_SECS).contains(&secs)
    {
        return Err(ApiError::bad_request(format!(
            "revoke_secs must be 1 to {MAX_REVOCATION_SECS}"
        )));
    }
    // A tenant-bound operator token acts within its tenant only, as a publisher's does.
    let tenant = match (&operator.tenant, request.tenant_id) {
        (Some(bound), Some(asked)) if *bound != asked => {
            return Err(refuse(
                &app,
                "tenant",
                Some(&operator.sub),
                ApiError::forbidden(format!(
                    "this token is bound to tenant {bound:?} and cannot act in another"
                )),
            ));
        }
        (Some(bound), _) => Some(bound.clone()),
        (None, asked) => asked,
    };
    let identity = Identity {
        tenant,
        user: request.user_id,
    };

    // A revocation this node could not hold is neither recorded for the cluster nor made
    // here (every node holds the same ones); the disconnect itself happens regardless.
    let now = now_secs();
    let mut refused = request.revoke_secs.and_then(|_| {
        app.verifier
            .revocations
            .has_room(&identity, request.sid.as_deref())
            .err()
    });
    let until = request
        .revoke_secs
        .filter(|_| refused.is_none())
        .map(|secs| now + secs);

    // Cluster mode: recorded for every node first; if that fails, nothing is done here either
    // and the operator retries.
    if let Some(cluster) = app.router.cluster() {
        let disconnection = Disconnection {
            tenant: identity.tenant.clone(),
            user: identity.user.clone(),
            sid: request.sid.clone(),
            reason: reason.clone(),
            at: now,
            until,
            node: cluster.node.clone(),
            origin: cluster.instance.clone(),
        };
        cluster.announce(&disconnection).await.map_err(|e| {
            ApiError::unavailable(format!("{e}; nothing was disconnected or revoked: retry"))
        })?;
    }
    // Revoked before the close, so that a client reconnecting at once is already refused.
    let revoked_until = match until {
        Some(until) => match app.verifier.revocations.revoke_at(
            identity.clone(),
            request.sid.clone(),
            now,
            until,
        ) {
            Ok(()) => Some(until),
            Err(full) => {
                refused = Some(full);
                None
            }
        },
        None => None,
    };
    let disconnected = app
        .router
        .disconnect(&identity, request.sid.as_deref(), &reason);
    tracing::warn!(
        target: "audit",
        by = %operator.sub,
        user = %identity.user,
        tenant = identity.tenant.as_deref().unwrap_or(""),
        sid = request.sid.as_deref().unwrap_or(""),
        %reason,
        disconnected,
        revoked_until,
        revocation_refused = refused.as_ref().map(ToString::to_string),
        "sessions disconnected by an operator"
    );
    if let Some(full) = refused {
        app.metrics.refusal("revocations_full");
        return Ok((
            StatusCode::TOO_MANY_REQUESTS,
            Json(json!({
                "error": "revocations_full",
                "reason": full.to_string(),
                "disconnected": disconnected,
                "revoked_until": null,
            })),
        )
            .into_response());
    }
    Ok(Json(json!({
        "disconnected": disconnected,
        "revoked_until": revoked_until,
    }))
    .into_response())
}

/// Cluster mode, until shutdown: applies the disconnects and revocations other nodes
/// announce, as if made here. `loaded` is told once those recorded before (the revocations
/// in force) are applied: a node serves no one before that.
pub async fn follow_disconnects(app: Arc<AppState>, loaded: tokio::sync::oneshot::Sender<()>) {
    let Some(cluster) = app.router.cluster().cloned() else {
        let _ = loaded.send(());
        return;
    };
    let mut loaded = Some(loaded);
    let mut backoff = Duration::from_millis(100);
    // The newest record applied. A watch started again (NATS came back) replays every record
    // first: those up to here were applied already, and closing their sessions again would
    // close clients that reconnected legitimately since.
    let mut applied_revision = 0u64;
    loop {
        // How many records the watch delivers first (one per key), then the watch. Without
        // that count an empty bucket and one that did not answer would look alike, and the
        // node would serve before loading the revocations.
        let watch = match cluster.disconnects_recorded().await {
            Some(recorded) => cluster.disconnections().await.map(|w| (recorded, w)),
            None => Err(Unavailable(
                "no answer about the recorded disconnects".into(),
            )),
        };
        let (mut to_load, mut entries) = match watch {
            Ok(watch) => watch,
            Err(err) => {
                tracing::warn!(error = %err, "cannot follow the cluster's disconnects; retrying");
                tokio::select! {
                    () = app.shutdown.cancelled() => return,
                    () = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
                continue;
            }
        };
        backoff = Duration::from_millis(100);
        if to_load == 0
            && let Some(loaded) = loaded.take()
        {
            let _ = loaded.send(());
        }
        loop {
            let entry = tokio::select! {
                () = app.shutdown.cancelled() => return,
                entry = entries.next() => entry,
            };
            match entry {
                Some(Ok(entry)) => {
                    let news = entry.revision > applied_revision;
                    apply_disconnect(&app, &cluster.instance, &entry.value, news);
                    applied_revision = applied_revision.max(entry.revision);
                    to_load = to_load.saturating_sub(1);
                    if (to_load == 0 || entry.delta == 0)
                        && let Some(loaded) = loaded.take()
                    {
                        let _ = loaded.send(());
                    }
                }
                Some(Err(err)) => {
                    tracing::warn!(
                        error = %err,
                        "the watch of the cluster's disconnects ended; watching again"
                    );
                    break;
                }
                None => break,
            }
        }
        app.metrics.disconnect_watch_restarts.inc();
    }
}

/// Another node's disconnect: revoke, then close this node's matching sessions if it is
/// `news` (not seen by this node before) and recent.
fn apply_disconnect(app: &AppState, this_instance: &str, value: &[u8], news: bool) {
    let Ok(d) = serde_json::from_slice::<Disconnection>(value) else {
        tracing::error!("unreadable disconnect in the cluster's bucket; ignored");
        return;
    };
    if d.origin == this_instance {
        return;
    }
    let identity = d.identity();
    let now = now_secs();
    if let Some(until) = d.until.filter(|until| *until > now)
        && let Err(full) =
            app.verifier
                .revocations
                .revoke_at(identity.clone(), d.sid.clone(), d.at, until)
    {
        tracing::error!(user = %identity.user, error = %full, "cannot hold another node's revocation");
    }
    // Closing is for sessions that were open when it was made; one recorded long ago (seen
    // again at start-up) has nothing left to close.
    if news && now.saturating_sub(d.at) <= DISCONNECT_NEWS_SECS {
        let disconnected = app
            .router
            .disconnect(&identity, d.sid.as_deref(), &d.reason);
        tracing::warn!(
            target: "audit",
            from = %d.node,
            user = %identity.user,
            tenant = identity.tenant.as_deref().unwrap_or(""),
            sid = d.sid.as_deref().unwrap_or(""),
            reason = %d.reason,
            disconnected,
            revoked_until = d.until,
            "sessions disconnected by an operator on another node"
        );
    }
}

/// How old an announced disconnect may be and still close sessions here.
const DISCONNECT_NEWS_SECS: u64 = 60;

/// Loads the guest from its configured path again (as SIGHUP does) and answers with the
/// version now serving new connections, or 422 with why the new one was refused, in which
/// case the guest in use stays. Audited either way.
pub async fn reload_guest(
    State(app): State<Arc<AppState>>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let operator = authorize(&app, &headers, GUEST_RELOAD_SCOPE)?;
    let previous = app.sandbox().version.label();
    let reloading = app.clone();
    // Compiling a guest takes seconds: off the runtime's workers.
    let result = tokio::task::spawn_blocking(move || reloading.reload_guest())
        .await
        .unwrap_or_else(|panic| std::panic::resume_unwind(panic.into_panic()));
    match result {
        Ok(version) => {
            tracing::warn!(
                target: "audit",
                by = %operator.sub,
                %previous,
                guest = version.label(),
                "guest reloaded: new connections use it"
            );
            Ok(Json(json!({ "guest": version, "previous": previous })).into_response())
        }
        Err(err) => {
            tracing::warn!(
                target: "audit",
                by = %operator.sub,
                %previous,
                error = %err,
                "guest reload refused; the guest in use stays"
            );
            Err(ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "guest_refused",
                format!("{err}; still serving {previous}"),
            ))
        }
    }
}

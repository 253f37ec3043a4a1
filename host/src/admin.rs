//! Operators' endpoints: `POST /v1/disconnect` closes a user's connections (a logout, a
//! suspended account), optionally revoking their tokens so that they cannot reconnect before
//! expiry; `POST /v1/guest/reload` reloads the guest.

use std::sync::Arc;

use axum::Json;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::json;

use crate::AppState;
use crate::api::{ApiError, authorize, read_body, refuse};
use crate::auth::{DISCONNECT_SCOPE, GUEST_RELOAD_SCOPE, Identity, MAX_REVOCATION_SECS, now_secs};

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

    // Revoked before the close, so that a client reconnecting at once is already refused.
    let revoked_until = match request.revoke_secs {
        Some(secs) => {
            let until = now_secs() + secs;
            app.verifier
                .revocations
                .revoke(identity.clone(), request.sid.clone(), until)
                .map_err(|full| {
                    ApiError::new(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "overloaded",
                        full.to_string(),
                    )
                })?;
            Some(until)
        }
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
        "sessions disconnected by an operator"
    );
    Ok(Json(json!({
        "disconnected": disconnected,
        "revoked_until": revoked_until,
    }))
    .into_response())
}

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

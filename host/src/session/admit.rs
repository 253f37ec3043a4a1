//! The HTTP phase of a connection: every check before the upgrade, then the upgrade.

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::rejection::QueryRejection;
use axum::extract::ws::WebSocketUpgrade;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use tokio::sync::OwnedSemaphorePermit;
use tracing::Instrument;

use super::run;
use crate::AppState;
use crate::api::{ApiError, refuse};
use crate::auth::{AuthError, Claims, Identity, bearer};
use crate::router::{Mailbox, Refused};
use crate::sandbox::{Context, Handler, Sandbox};

/// `GET /ws`: the HTTP phase. Nothing is upgraded unless the origin is allowed, the token
/// is good, the node and the user have room, and the connection has its own instance.
pub async fn connect(
    State(app): State<Arc<AppState>>,
    headers: HeaderMap,
    query: Result<Query<HashMap<String, String>>, QueryRejection>,
    upgrade: WebSocketUpgrade,
) -> Response {
    match admit(&app, &headers, query) {
        Ok(admitted) => {
            let limits = &app.config.limits;
            let span = tracing::info_span!(
                "session",
                conn = %admitted.ctx.connection_id,
                user = %admitted.ctx.user_id
            );
            let tracker = app.sessions.clone();
            upgrade
                .read_buffer_size(limits.read_buffer_bytes)
                .write_buffer_size(limits.write_buffer_bytes)
                .max_write_buffer_size(limits.write_buffer_bytes + limits.max_message_bytes * 2)
                .max_message_size(limits.max_message_bytes)
                .max_frame_size(limits.max_message_bytes)
                .on_upgrade(move |socket| {
                    tracker.track_future(run(socket, app, admitted).instrument(span))
                })
        }
        Err(refusal) => refusal.into_response(),
    }
}

/// What a connection holds from admission until it ends.
pub(super) struct Admitted {
    pub(super) ctx: Context,
    /// Who this connection is; an in-band refresh must name the same identity.
    pub(super) identity: Identity,
    pub(super) token_exp: u64,
    /// `?since=<seq>`: resume after this position before going live.
    pub(super) since: Option<u64>,
    pub(super) handler: Box<dyn Handler>,
    /// The guest version that made `handler`: a hibernated handler is restored by the same
    /// one, even after a reload.
    pub(super) sandbox: Arc<Sandbox>,
    pub(super) mailbox: Mailbox,
    /// The node-wide connection slot, released when the session ends.
    pub(super) _permit: OwnedSemaphorePermit,
}

fn admit(
    app: &Arc<AppState>,
    headers: &HeaderMap,
    query: Result<Query<HashMap<String, String>>, QueryRejection>,
) -> Result<Admitted, ApiError> {
    let refuse =
        |reason: &'static str, user: Option<&str>, err: ApiError| refuse(app, reason, user, err);
    if let Some(origin) = headers.get(axum::http::header::ORIGIN) {
        let allowed = &app.config.auth.allowed_origins;
        let origin = origin.to_str().unwrap_or("");
        if !allowed.is_empty() && !allowed.iter().any(|a| a == origin) {
            return Err(refuse(
                "origin",
                None,
                ApiError::new(
                    StatusCode::FORBIDDEN,
                    "forbidden",
                    "origin is not allowed to connect",
                ),
            ));
        }
    }
    let token = bearer(headers).or_else(|| {
        query
            .as_ref()
            .ok()
            .and_then(|Query(q)| q.get("access_token").map(String::as_str))
    });
    let claims = token
        .ok_or(AuthError::Missing)
        .and_then(|t| app.verifier.verify(t))
        .map_err(|err| refuse(err.label(), None, ApiError::unauthorized(err)))?;
    let user = Some(claims.sub.as_str());
    let since = match query.as_ref().ok().and_then(|Query(q)| q.get("since")) {
        None => None,
        Some(since) => Some(since.parse::<u64>().map_err(|_| {
            refuse(
                "bad_since",
                user,
                ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "bad_request",
                    "since must be the seq of the last event received (an unsigned integer)",
                ),
            )
        })?),
    };

    if let Some(trouble) = app.router.cluster().and_then(|c| c.trouble()) {
        return Err(refuse(
            "event_log_unavailable",
            user,
            ApiError::unavailable(format!(
                "the event log is unavailable ({trouble}); retry shortly"
            )),
        ));
    }
    let permit = app.admission.try_admit().ok_or_else(|| {
        refuse(
            "node_full",
            user,
            ApiError::unavailable(
                "this node is at its connection limit; retry another node or later",
            ),
        )
    })?;
    let ctx = context(&claims);
    let identity = claims.identity();
    let mailbox = app
        .router
        .register(
            &identity,
            ctx.connection_id.as_str().into(),
            ctx.session_id.as_deref(),
        )
        .map_err(|refused| match refused {
            Refused::UserLimit(_) => refuse(
                "user_limit",
                user,
                ApiError::new(
                    StatusCode::TOO_MANY_REQUESTS,
                    "too_many_connections",
                    format!("{refused}; close one first"),
                ),
            ),
            Refused::ShuttingDown => refuse(
                "draining",
                user,
                ApiError::unavailable("this node is shutting down; retry another node"),
            ),
        })?;
    let sandbox = app.sandbox();
    let handler = sandbox.instantiate(&ctx).map_err(|err| {
        tracing::error!(user = %ctx.user_id, error = %err.advice(&app.config), "cannot instantiate guest");
        refuse(
            "instantiate",
            user,
            ApiError::unavailable("cannot create a handler instance"),
        )
    })?;
    Ok(Admitted {
        token_exp: claims.exp,
        since,
        identity,
        ctx,
        handler,
        sandbox,
        mailbox,
        _permit: permit,
    })
}

fn context(claims: &Claims) -> Context {
    Context {
        connection_id: uuid::Uuid::new_v4().simple().to_string(),
        user_id: claims.sub.clone(),
        tenant_id: claims.tenant.clone(),
        session_id: claims.sid.clone(),
        scopes: claims.scopes().map(str::to_owned).collect(),
        expires_at: claims.exp,
    }
}

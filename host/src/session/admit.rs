//! The HTTP phase of a connection: every check before the upgrade, then the upgrade (or, on
//! `/sse`, the event stream's response).

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::rejection::QueryRejection;
use axum::extract::ws::WebSocketUpgrade;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use tokio::sync::OwnedSemaphorePermit;
use tracing::Instrument;

use super::link::{Link, sse_stream};
use super::run;
use crate::AppState;
use crate::api::{ApiError, refuse};
use crate::auth::{AuthError, Claims, Identity, bearer};
use crate::listener::HttpSlot;
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
    let query = query.map(|Query(q)| q).unwrap_or_default();
    match admit(&app, &headers, &query, Vec::new()) {
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
                    // A task of the session's own: the upgrade's task would keep, for the
                    // connection's life, what the upgrade needed beside the session.
                    let fut = run(Link::WebSocket(socket), app, admitted);
                    tracker.spawn(fut.instrument(span));
                    std::future::ready(())
                })
        }
        Err(refusal) => refusal.into_response(),
    }
}

/// `GET /sse`: the same admission as `/ws`, answered with a server-sent event stream instead
/// of an upgrade. `Last-Event-ID` (sent by a reconnecting `EventSource`) resumes like
/// `?since=` and wins over it; each `?frame=<JSON>` is handed to the handler, in order, as
/// if the client had sent it (a client cannot send on the stream itself).
pub async fn connect_sse(
    State(app): State<Arc<AppState>>,
    headers: HeaderMap,
    query: Result<Query<Vec<(String, String)>>, QueryRejection>,
    slot: Option<axum::Extension<HttpSlot>>,
) -> Response {
    let pairs = query.map(|Query(q)| q).unwrap_or_default();
    let (frames, mut query): (Vec<_>, HashMap<_, _>) = {
        let (frames, rest): (Vec<_>, Vec<_>) = pairs.into_iter().partition(|(k, _)| k == "frame");
        (
            frames.into_iter().map(|(_, v)| v).collect(),
            rest.into_iter().collect(),
        )
    };
    if let Some(id) = headers.get("last-event-id").and_then(|v| v.to_str().ok())
        && !id.is_empty()
    {
        query.insert("since".into(), id.to_owned());
    }
    // An EventSource on another origin reads the stream only with CORS: the origin, already
    // checked against `auth.allowed_origins` (or any, when that list is empty, as for /ws).
    let allow_origin = headers
        .get(axum::http::header::ORIGIN)
        .cloned()
        .unwrap_or(axum::http::HeaderValue::from_static("*"));
    let admitted = match admit(&app, &headers, &query, frames) {
        Ok(admitted) => admitted,
        Err(refusal) => {
            let mut response = refusal.into_response();
            response.headers_mut().insert(
                axum::http::header::ACCESS_CONTROL_ALLOW_ORIGIN,
                allow_origin,
            );
            return response;
        }
    };
    let span = tracing::info_span!(
        "session",
        conn = %admitted.ctx.connection_id,
        user = %admitted.ctx.user_id,
        transport = "sse"
    );
    // From here on the connection is a session's, bounded by `limits.max_connections`, as an
    // upgraded one is; and it closes when the stream ends (no request follows a stream).
    if let Some(axum::Extension(slot)) = slot {
        slot.release();
    }
    // What a WebSocket's write buffer may hold (`max_write_buffer_size` on /ws).
    let limits = &app.config.limits;
    let (stream, body) = sse_stream(limits.write_buffer_bytes + limits.max_message_bytes * 2);
    let tracker = app.sessions.clone();
    tokio::spawn(tracker.track_future(run(Link::Sse(stream), app, admitted).instrument(span)));
    (
        [(
            axum::http::header::ACCESS_CONTROL_ALLOW_ORIGIN,
            allow_origin,
        )],
        [
            (axum::http::header::CONTENT_TYPE, "text/event-stream"),
            (axum::http::header::CACHE_CONTROL, "no-cache, no-transform"),
            (axum::http::header::CONNECTION, "close"),
            // Proxies that buffer responses (nginx) would hold events back.
            (
                axum::http::HeaderName::from_static("x-accel-buffering"),
                "no",
            ),
        ],
        axum::body::Body::from_stream(body),
    )
        .into_response()
}

/// What a connection holds from admission until it ends.
pub(super) struct Admitted {
    pub(super) ctx: Context,
    /// Who this connection is; an in-band refresh must name the same identity.
    pub(super) identity: Identity,
    /// `?since=<seq>`: resume after this position before going live.
    pub(super) since: Option<u64>,
    /// An SSE client's frames for the handler, from its query (`?frame=`).
    pub(super) frames: Vec<String>,
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
    query: &HashMap<String, String>,
    frames: Vec<String>,
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
    let token = bearer(headers).or_else(|| query.get("access_token").map(String::as_str));
    let claims = token
        .ok_or(AuthError::Missing)
        .and_then(|t| app.verifier.verify(t))
        .map_err(|err| refuse(err.label(), None, ApiError::unauthorized(err)))?;
    let user = Some(claims.sub.as_str());
    let since = match query.get("since") {
        None => None,
        Some(since) => Some(since.parse::<u64>().map_err(|_| {
            refuse(
                "bad_since",
                user,
                ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "bad_request",
                    "since (or Last-Event-ID) must be the seq of the last event received \
                     (an unsigned integer)",
                ),
            )
        })?),
    };
    // Each one is a frame the guest takes in turn: bounded like a client's burst of frames.
    let limits = &app.config.limits;
    if frames.len() > limits.client_message_burst as usize
        || frames.iter().any(|f| f.len() > limits.max_message_bytes)
    {
        return Err(refuse(
            "bad_frames",
            user,
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "bad_request",
                format!(
                    "at most {} frame parameters of at most {} bytes each \
                     (limits.client_message_burst, limits.max_message_bytes)",
                    limits.client_message_burst, limits.max_message_bytes
                ),
            ),
        ));
    }

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
        since,
        frames,
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

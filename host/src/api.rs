//! The HTTP API besides `/ws`: publishing events, health, metrics, and the JSON error shape
//! every refusal uses: `{"error": "<kind>", "reason": "<what to fix>"}`.

use std::sync::Arc;

use axum::Json;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::{Value, json};

use crate::AppState;
use crate::auth::{AuthError, PUBLISH_SCOPE, STATS_SCOPE};
use crate::router::{Publication, Receipt};

/// Longest `user_id`, `kind`, `run_id` or `thread_id` accepted.
const MAX_ID_BYTES: usize = 256;

#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    error: &'static str,
    reason: String,
}

impl ApiError {
    pub fn new(status: StatusCode, error: &'static str, reason: impl Into<String>) -> Self {
        ApiError {
            status,
            error,
            reason: reason.into(),
        }
    }
    pub fn unauthorized(err: AuthError) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "unauthorized", err.to_string())
    }
    pub fn unavailable(reason: impl Into<String>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", reason)
    }
    fn bad_request(reason: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "bad_request", reason)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = Json(json!({"error": self.error, "reason": self.reason}));
        let mut response = (self.status, body).into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, "Bearer".parse().unwrap());
        }
        response
    }
}

/// One event as a publisher sends it.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PublishRequest {
    user_id: String,
    kind: String,
    /// Kept as the publisher's text: valid JSON by construction, never re-encoded.
    payload: Box<RawValue>,
    #[serde(default)]
    run_id: Option<String>,
    #[serde(default)]
    thread_id: Option<String>,
}

/// A batch parsed in one pass. Only when that fails is it parsed again event by event
/// ([`BatchOfRaw`]), so that the error can name the event's index.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct BatchRequest {
    events: Vec<PublishRequest>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct BatchOfRaw {
    events: Vec<Box<RawValue>>,
}

/// What a publish answers for one event.
#[derive(Debug, Serialize)]
struct PublishReceipt<'a> {
    seq: u64,
    user_id: &'a str,
    delivered: usize,
}

#[derive(Debug, Serialize)]
struct BatchReceipt<'a> {
    results: Vec<PublishReceipt<'a>>,
}

/// `POST /v1/publish`: one event. Answers `{"seq", "user_id", "delivered"}`.
pub async fn publish(
    State(app): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    authorize_publisher(&app, &headers)?;
    let body = read_body(&app, body).await?;
    let request: PublishRequest = serde_json::from_slice(&body)
        .map_err(|e| ApiError::bad_request(format!("invalid event: {e}")))?;
    let publication = validate(request, &app).map_err(ApiError::bad_request)?;
    let user_id = publication.user_id.clone();
    let receipt = app.router.publish(publication);
    Ok(Json(PublishReceipt {
        seq: receipt.seq,
        user_id: &user_id,
        delivered: receipt.sessions,
    })
    .into_response())
}

/// `POST /v1/publish/batch`: `{"events": [...]}`, all validated before any is published.
/// Answers `{"results": [{"seq", "user_id", "delivered"}, ...]}` in request order.
pub async fn publish_batch(
    State(app): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    authorize_publisher(&app, &headers)?;
    let body = read_body(&app, body).await?;
    let events = match serde_json::from_slice::<BatchRequest>(&body) {
        Ok(batch) => batch.events,
        Err(err) => return Err(batch_error(&body, err)),
    };
    let max = app.config.limits.max_batch_events;
    if events.len() > max {
        return Err(too_many_events(max));
    }
    let publications = events
        .into_iter()
        .enumerate()
        .map(|(i, request)| {
            validate(request, &app).map_err(|e| ApiError::bad_request(format!("events[{i}]: {e}")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let receipts: Vec<(String, Receipt)> = publications
        .into_iter()
        .map(|p| {
            let user_id = p.user_id.clone();
            (user_id, app.router.publish(p))
        })
        .collect();
    let results = receipts
        .iter()
        .map(|(user_id, receipt)| PublishReceipt {
            seq: receipt.seq,
            user_id,
            delivered: receipt.sessions,
        })
        .collect();
    Ok(Json(BatchReceipt { results }).into_response())
}

/// Why a batch did not parse, naming the first bad event's index when the batch itself is
/// well formed.
fn batch_error(body: &[u8], err: serde_json::Error) -> ApiError {
    let Ok(raw) = serde_json::from_slice::<BatchOfRaw>(body) else {
        return ApiError::bad_request(format!("invalid batch: {err}"));
    };
    for (i, event) in raw.events.iter().enumerate() {
        if let Err(e) = serde_json::from_str::<PublishRequest>(event.get()) {
            return ApiError::bad_request(format!("events[{i}]: {e}"));
        }
    }
    ApiError::bad_request(format!("invalid batch: {err}"))
}

fn too_many_events(max: usize) -> ApiError {
    ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        "too_many_events",
        format!("a batch holds at most {max} events"),
    )
}

/// Users with the most live connections listed by `/v1/stats`.
const STATS_TOP_USERS: usize = 20;

/// `GET /v1/stats`: the operator's view of instances and sessions (scope `gateway:stats`).
/// Counts only: no payloads, no tokens.
pub async fn stats(
    State(app): State<Arc<AppState>>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    authorize(&app, &headers, STATS_SCOPE)?;
    let m = &app.metrics;
    let created = m.instantiations.get();
    let active = m.instances_live.get().max(0) as u64;
    let sessions = m.sessions_ended.get();
    let average_lifetime_secs = if sessions == 0 {
        0.0
    } else {
        m.session_lifetime_seconds.get() / sessions as f64
    };
    let (users_connected, top) = app.router.busiest_users(STATS_TOP_USERS);
    let top: Vec<Value> = top
        .into_iter()
        .map(|(user, connections)| json!({"user_id": user, "connections": connections}))
        .collect();
    Ok(Json(json!({
        "instances": {
            "created": created,
            "active": active,
            "cleaned_up": created.saturating_sub(active),
        },
        "sessions": {
            "live": m.sessions_live.get(),
            "ended": sessions,
            "average_lifetime_secs": average_lifetime_secs,
        },
        "capacity": {
            "connections": app.admission.capacity.effective,
            "fd_limit": app.admission.capacity.fd_limit,
            "max_map_count": app.admission.capacity.max_map_count,
        },
        "limit_hits": {
            "user_limit": m.refusals_for("user_limit"),
            "node_full": m.refusals_for("node_full"),
            "rate_limited": m.closes_for("rate_limited"),
            "slow_client": m.closes_for("slow_client"),
        },
        "users_connected": users_connected,
        "busiest_users": top,
    })))
}

/// A publisher is whoever holds a valid token with the publish scope. A user's connect token
/// lacks it, so it can never publish, not even to its own user.
fn authorize_publisher(app: &AppState, headers: &HeaderMap) -> Result<(), ApiError> {
    authorize(app, headers, PUBLISH_SCOPE)
}

fn authorize(app: &AppState, headers: &HeaderMap, scope: &'static str) -> Result<(), ApiError> {
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, token)| token.trim());
    let claims = token
        .ok_or(AuthError::Missing)
        .and_then(|t| app.verifier.verify(t))
        .map_err(|err| {
            app.metrics.refusal(err.label());
            ApiError::unauthorized(err)
        })?;
    if !claims.has_scope(scope) {
        app.metrics.refusal("scope");
        tracing::info!(target: "audit", user = %claims.sub, scope, "request refused: scope missing");
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            format!("token lacks the {scope} scope"),
        ));
    }
    Ok(())
}

async fn read_body(app: &AppState, body: Body) -> Result<axum::body::Bytes, ApiError> {
    let max = app.config.limits.max_body_bytes;
    axum::body::to_bytes(body, max).await.map_err(|_| {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
            format!("request body is larger than {max} bytes"),
        )
    })
}

fn validate(request: PublishRequest, app: &AppState) -> Result<Publication, String> {
    for (name, value) in [
        ("user_id", Some(&request.user_id)),
        ("kind", Some(&request.kind)),
    ] {
        if value.is_some_and(|v| v.is_empty()) {
            return Err(format!("{name} must not be empty"));
        }
    }
    for (name, value) in [
        ("user_id", Some(&request.user_id)),
        ("kind", Some(&request.kind)),
        ("run_id", request.run_id.as_ref()),
        ("thread_id", request.thread_id.as_ref()),
    ] {
        if value.is_some_and(|v| v.len() > MAX_ID_BYTES) {
            return Err(format!("{name} is longer than {MAX_ID_BYTES} bytes"));
        }
    }
    let payload = String::from(request.payload.get());
    // The frame carrying it must fit the clients' message limit.
    let max = app.config.limits.max_message_bytes.saturating_sub(1024);
    if payload.len() > max {
        return Err(format!("payload is larger than {max} bytes"));
    }
    Ok(Publication {
        user_id: request.user_id,
        kind: request.kind,
        payload,
        run_id: request.run_id,
        thread_id: request.thread_id,
    })
}

pub async fn healthz() -> Json<Value> {
    Json(json!({"status": "ok"}))
}

/// Ready means: a new connection would be admitted now.
pub async fn readyz(State(app): State<Arc<AppState>>) -> Response {
    if app.shutdown.is_cancelled() {
        return ApiError::unavailable("draining").into_response();
    }
    if !app.admission.has_room() {
        return ApiError::unavailable("at the connection limit").into_response();
    }
    let capacity = app.admission.capacity.effective;
    Json(json!({"status": "ready", "connections": app.admission.live(), "capacity": capacity}))
        .into_response()
}

pub async fn metrics(State(app): State<Arc<AppState>>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        app.metrics.render(),
    )
        .into_response()
}

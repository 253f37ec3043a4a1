//! The HTTP API besides `/ws`: publishing events, health, metrics, and the JSON error shape
//! every refusal uses: `{"error": "<kind>", "reason": "<what to fix>"}`.

use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::{Value, json};

use crate::AppState;
use crate::auth::{AuthError, Identity, PUBLISH_SCOPE, STATS_SCOPE, bearer};
use crate::cluster::{Cluster, PendingAck, Stored, Unavailable};
use crate::router::{Publication, Receipt};
use crate::streams::{MESSAGE_KIND, MessageOp, MessageRequest, Refusal, escaped_len};

/// Longest `user_id`, `tenant_id`, `kind`, `run_id` or `thread_id` accepted.
const MAX_ID_BYTES: usize = 256;

/// Room in an event frame besides its fields: the reference handler's
/// `{"type":"event","seq":N,"kind":..,"payload":..,"run_id":..,"thread_id":..,"run_state":..}`.
const FRAME_OVERHEAD: usize = 160;
/// What redacting one value may add: the shortest value (`0`) becomes `"[redacted]"`.
const REDACTION_GROWTH: usize = 11;

#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    error: &'static str,
    reason: String,
    /// Seconds for a `Retry-After` header, when trying again later will help.
    retry_after: Option<u64>,
    /// A message append refused: the index the message expects next.
    expected_index: Option<u64>,
}

impl ApiError {
    pub fn new(status: StatusCode, error: &'static str, reason: impl Into<String>) -> Self {
        ApiError {
            status,
            error,
            reason: reason.into(),
            retry_after: None,
            expected_index: None,
        }
    }
    pub fn unauthorized(err: AuthError) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "unauthorized", err.to_string())
    }
    pub fn unavailable(reason: impl Into<String>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", reason)
    }
    pub(crate) fn bad_request(reason: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "bad_request", reason)
    }
    pub(crate) fn forbidden(reason: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "forbidden", reason)
    }
    /// A message op the log refused (409, 413 or 429), with the index it expects.
    fn message(refusal: Refusal) -> Self {
        let status = StatusCode::from_u16(refusal.status).unwrap_or(StatusCode::CONFLICT);
        let mut err = Self::new(status, refusal.error, refusal.reason);
        err.expected_index = refusal.expected_index;
        err
    }
    fn body(&self) -> Value {
        let mut body = json!({"error": self.error, "reason": self.reason});
        if let Some(index) = self.expected_index {
            body["expected_index"] = index.into();
        }
        body
    }
    /// The same refusal for one event of a batch, its index in front of the reason.
    fn in_batch(mut self, i: usize) -> Self {
        self.reason = format!("events[{i}]: {}", self.reason);
        self
    }
}

/// Counts a refusal and writes its audit record: every refused connect, publish or stats
/// request goes through here, so none is missed and all read alike.
pub fn refuse(app: &AppState, label: &'static str, who: Option<&str>, err: ApiError) -> ApiError {
    app.metrics.refusal(label);
    tracing::info!(
        target: "audit",
        reason = label,
        user = who.unwrap_or(""),
        status = err.status.as_u16(),
        "request refused"
    );
    err
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status, Json(self.body())).into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, "Bearer".parse().unwrap());
        }
        if let Some(secs) = self.retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, secs.into());
        }
        response
    }
}

/// One event as a publisher sends it.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PublishRequest {
    user_id: String,
    /// The tenant of the user; required to reach connections whose token had a `tenant`.
    #[serde(default)]
    tenant_id: Option<String>,
    /// Required, except on a message's `append` and `end` (which take the create's).
    #[serde(default)]
    kind: Option<String>,
    /// Kept as the publisher's text: valid JSON by construction, never re-encoded. Required,
    /// except on a message op (a message's create may carry one).
    #[serde(default)]
    payload: Option<Box<RawValue>>,
    #[serde(default)]
    run_id: Option<String>,
    #[serde(default)]
    thread_id: Option<String>,
    /// A repeat of this key (for the same identity) within the idempotency window is not
    /// published again: the answer carries the original `seq` and `"duplicate": true`.
    #[serde(default)]
    idempotency_key: Option<String>,
    /// An op on one of the user's messages (AI output streams).
    #[serde(default)]
    message: Option<MessageRequest>,
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
    #[serde(skip_serializing_if = "Option::is_none")]
    tenant_id: Option<&'a str>,
    /// Live connections on this node the event was queued to (not yet handled by their
    /// guests); null in cluster mode, where every node gets it from the stream.
    queued: Option<usize>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    duplicate: bool,
}

impl<'a> PublishReceipt<'a> {
    fn new(identity: &'a Identity, receipt: Receipt) -> Self {
        PublishReceipt {
            seq: receipt.seq,
            user_id: &identity.user,
            tenant_id: identity.tenant.as_deref(),
            queued: Some(receipt.sessions),
            duplicate: receipt.duplicate,
        }
    }

    fn stored(identity: &'a Identity, stored: Stored) -> Self {
        PublishReceipt {
            seq: stored.seq,
            user_id: &identity.user,
            tenant_id: identity.tenant.as_deref(),
            queued: None,
            duplicate: stored.duplicate,
        }
    }
}

/// A publish the event log could not take: 503, never a false success. The event may have
/// been stored all the same (the answer was lost); a retry with the same idempotency key
/// cannot store it twice.
fn log_unavailable(app: &AppState, err: Unavailable) -> ApiError {
    app.metrics.refusal("event_log_unavailable");
    tracing::warn!(error = %err, "publish refused: the event log did not acknowledge it");
    let mut api = ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "event_log_unavailable",
        format!("{err}; the event may or may not be stored: retry with the same idempotency_key"),
    );
    api.retry_after = Some(1);
    api
}

/// Holds new events back while this node's sessions have more queued than they can take: a
/// publisher that keeps sending as fast as it is accepted would otherwise grow the queues,
/// and every event's latency with them. Past `limits.max_queued_bytes` at once; while the
/// queue delay is past `limits.queue_delay_ms`, at the pace the sessions take events, and
/// refused when its share does not come within `limits.publish_wait_ms` (see
/// [`crate::pacing`]).
async fn admit(app: &AppState, events: usize) -> Result<(), ApiError> {
    check_backlog(app)?;
    let arrived = std::time::Instant::now();
    let admitted = app.router.pacing().admit(events).await;
    if admitted != Ok(false) {
        app.metrics
            .publish_wait_seconds
            .observe(arrived.elapsed().as_secs_f64());
    }
    match admitted {
        Ok(waited) => {
            if waited {
                app.metrics.publish_waits.inc();
            }
            Ok(())
        }
        Err(delay) => {
            app.metrics.refusal("overloaded");
            let mut err = ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "overloaded",
                format!(
                    "events wait {} ms for this node's connections (limits.queue_delay_ms: \
                     {}); retry after the Retry-After delay",
                    delay.as_millis(),
                    app.config.limits.queue_delay_ms
                ),
            );
            err.retry_after = Some(1);
            Err(err)
        }
    }
}

/// A user whose connections here all fall behind: their events wait (see
/// `limits.user_queue_delay_ms`), the node's other users' do not.
fn user_lagging(app: &AppState, delay: Duration) -> ApiError {
    app.metrics.refusal("user_lagging");
    let mut err = ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "user_lagging",
        format!(
            "every connection of this user has had an event waiting {} ms \
             (limits.user_queue_delay_ms: {}); retry after the Retry-After delay",
            delay.as_millis(),
            app.config.limits.user_queue_delay_ms
        ),
    );
    err.retry_after = Some(1);
    err
}

/// Refuses new events while this node's backlog is past `limits.max_queued_bytes`.
fn check_backlog(app: &AppState) -> Result<(), ApiError> {
    let queued = app.router.queued_bytes();
    let max = app.config.limits.max_queued_bytes;
    if queued > max {
        app.metrics.refusal("overloaded");
        let mut err = ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "overloaded",
            format!(
                "this node has {queued} bytes of events waiting for its connections (limit \
                 {max}); retry after the Retry-After delay"
            ),
        );
        err.retry_after = Some(1);
        return Err(err);
    }
    Ok(())
}

#[derive(Debug, Serialize)]
struct BatchReceipt<'a> {
    results: Vec<PublishReceipt<'a>>,
}

/// `POST /v1/publish`: one event. Answers `{"seq", "user_id", "queued"}`.
pub async fn publish(
    State(app): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let tenant = authorize_publisher(&app, &headers)?;
    let body = read_body(&app, body).await?;
    let request: PublishRequest = serde_json::from_slice(&body)
        .map_err(|e| ApiError::bad_request(format!("invalid event: {e}")))?;
    let (mut publication, key) = validate(request, &app)?;
    bind_tenant(&app, tenant.as_deref(), &mut publication)?;
    admit(&app, 1).await?;
    let identity = publication.identity.clone();
    let receipt = match app.router.cluster() {
        Some(cluster) if publication.message.is_some() => {
            let stored = cluster
                .publish_message(&publication, key.as_deref())
                .await
                .map_err(|e| log_unavailable(&app, e))?
                .map_err(ApiError::message)?;
            app.metrics.events_published.inc();
            PublishReceipt::stored(&identity, stored)
        }
        Some(cluster) => {
            let stored = cluster
                .publish(&publication, key.as_deref())
                .await
                .map_err(|e| log_unavailable(&app, e))?;
            app.metrics.events_published.inc();
            PublishReceipt::stored(&identity, stored)
        }
        None => {
            if let Some(delay) = app.router.lagging(&identity) {
                return Err(user_lagging(&app, delay));
            }
            PublishReceipt::new(
                &identity,
                app.router
                    .publish(publication, key.as_deref())
                    .map_err(ApiError::message)?,
            )
        }
    };
    Ok(Json(receipt).into_response())
}

/// `POST /v1/publish/batch`: `{"events": [...]}`, all validated before any is published.
/// Answers `{"results": [{"seq", "user_id", "queued"}, ...]}` in request order.
pub async fn publish_batch(
    State(app): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let tenant = authorize_publisher(&app, &headers)?;
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
            let (mut publication, key) = validate(request, &app).map_err(|e| e.in_batch(i))?;
            bind_tenant(&app, tenant.as_deref(), &mut publication).map_err(|e| e.in_batch(i))?;
            Ok((publication, key))
        })
        .collect::<Result<Vec<_>, ApiError>>()?;
    admit(&app, publications.len()).await?;
    if let Some(cluster) = app.router.cluster() {
        return publish_to_cluster(&app, cluster, publications).await;
    }
    let (mut refused, mut lagging) = (0, 0);
    let receipts: Vec<(Identity, Result<Receipt, ApiError>)> = publications
        .into_iter()
        .map(|(p, key)| {
            let identity = p.identity.clone();
            if let Some(delay) = app.router.lagging(&identity) {
                lagging += 1;
                return (identity, Err(user_lagging(&app, delay)));
            }
            let receipt = app.router.publish(p, key.as_deref()).map_err(|r| {
                refused += 1;
                ApiError::message(r)
            });
            (identity, receipt)
        })
        .collect();
    if refused == 0 && lagging == 0 {
        let results = receipts
            .iter()
            .map(|(identity, r)| PublishReceipt::new(identity, *r.as_ref().expect("checked")))
            .collect();
        return Ok(Json(BatchReceipt { results }).into_response());
    }
    let results: Vec<Value> = receipts
        .into_iter()
        .map(|(identity, r)| match r {
            Ok(receipt) => json!(PublishReceipt::new(&identity, receipt)),
            Err(err) => err.body(),
        })
        .collect();
    if lagging > 0 {
        return Ok(lagging_in_batch(lagging + refused, Value::Array(results)));
    }
    Ok(refused_in_batch(refused, Value::Array(results)))
}

/// Some events of a batch were for users whose connections here fall behind: 503 with
/// every event's own result, so the publisher retries those (with their idempotency keys)
/// after `Retry-After`; the others were published.
fn lagging_in_batch(refused: usize, results: Value) -> Response {
    let events = results.as_array().map_or(0, Vec::len);
    let body = json!({
        "error": "user_lagging",
        "reason": format!(
            "{refused} of {events} events were not published (users whose connections fall \
             behind, or message ops that do not fit their message); `results` says which and \
             why, the others were published: retry the user_lagging ones after the \
             Retry-After delay"
        ),
        "results": results,
    });
    let mut response = (StatusCode::SERVICE_UNAVAILABLE, Json(body)).into_response();
    response
        .headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from(1));
    response
}

/// Message ops are checked against their message as they are applied, so some of a batch
/// may be refused after others were published: every event's own result says which (the
/// published ones are not undone; retrying them answers `duplicate`).
fn refused_in_batch(refused: usize, results: Value) -> Response {
    let events = results.as_array().map_or(0, Vec::len);
    let body = json!({
        "error": "message_refused",
        "reason": format!(
            "{refused} of {events} events were refused (message ops that do not fit their \
             message); `results` says which and why, the others were published"
        ),
        "results": results,
    });
    (StatusCode::CONFLICT, Json(body)).into_response()
}

/// One event's outcome in a cluster batch.
#[derive(Debug, Serialize)]
#[serde(untagged)]
enum BatchResult<'a> {
    Stored(PublishReceipt<'a>),
    Failed {
        error: &'static str,
        reason: String,
    },
    /// A message op that does not fit its message.
    Refused(Value),
}

/// A batch in cluster mode: every event is sent, then the stream's answers are awaited in
/// order, so the batch costs about one round trip. A message op is stored in its turn (it
/// is checked against everything of its identity stored before it). When some event is not
/// acknowledged, the answer is 503 with every event's own result, so that a publisher
/// retries those that failed and never stores the others twice (a retry with idempotency
/// keys is safe either way); when every event was acknowledged or refused but some message
/// op was refused, 409 with every event's result, as on one node.
async fn publish_to_cluster(
    app: &AppState,
    cluster: &Cluster,
    publications: Vec<(Publication, Option<String>)>,
) -> Result<Response, ApiError> {
    enum Sent {
        Event(Result<PendingAck, Unavailable>),
        Message(Result<Result<Stored, Refusal>, Unavailable>),
    }
    let mut sent = Vec::with_capacity(publications.len());
    for (publication, key) in &publications {
        sent.push(match publication.message {
            Some(_) => Sent::Message(cluster.publish_message(publication, key.as_deref()).await),
            None => Sent::Event(cluster.send(publication, key.as_deref()).await),
        });
    }
    let mut results = Vec::with_capacity(sent.len());
    let (mut failed, mut refused) = (0, 0);
    for ((publication, _), sent) in publications.iter().zip(sent) {
        let stored = match sent {
            Sent::Event(Ok(ack)) => cluster.acked(ack).await,
            Sent::Event(Err(err)) | Sent::Message(Err(err)) => Err(err),
            Sent::Message(Ok(Ok(stored))) => Ok(stored),
            Sent::Message(Ok(Err(refusal))) => {
                refused += 1;
                results.push(BatchResult::Refused(ApiError::message(refusal).body()));
                continue;
            }
        };
        results.push(match stored {
            Ok(stored) => {
                app.metrics.events_published.inc();
                BatchResult::Stored(PublishReceipt::stored(&publication.identity, stored))
            }
            Err(err) => {
                failed += 1;
                BatchResult::Failed {
                    error: "event_log_unavailable",
                    reason: format!("{err}; the event may or may not be stored"),
                }
            }
        });
    }
    if failed == 0 && refused == 0 {
        return Ok(Json(json!({ "results": results })).into_response());
    }
    if failed == 0 {
        return Ok(refused_in_batch(refused, json!(results)));
    }
    app.metrics.refusal("event_log_unavailable");
    tracing::warn!(
        failed,
        events = results.len(),
        "batch partly refused: the event log did not acknowledge every event"
    );
    let body = json!({
        "error": "event_log_unavailable",
        "reason": format!(
            "{failed} of {} events were not acknowledged; `results` says which: retry those \
             (with their idempotency keys)",
            results.len()
        ),
        "results": results,
    });
    let mut response = (StatusCode::SERVICE_UNAVAILABLE, Json(body)).into_response();
    response
        .headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from(1));
    Ok(response)
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
    let operator = authorize(&app, &headers, STATS_SCOPE)?;
    let m = &app.metrics;
    let created = m.instantiations.get();
    let active = m.instances_live.get().max(0) as u64;
    let sessions = m.sessions_ended.get();
    let average_lifetime_secs = if sessions == 0 {
        0.0
    } else {
        m.session_lifetime_seconds.get() / sessions as f64
    };
    let cluster = match app.router.cluster() {
        Some(cluster) => cluster.describe().await,
        None => Value::Null,
    };
    // A tenant-bound token sees its own tenant's users only, never another tenant's ids.
    let (users_connected, top) = app
        .router
        .busiest_users(STATS_TOP_USERS, operator.tenant.as_deref());
    let top: Vec<Value> = top
        .into_iter()
        .map(|(identity, connections)| {
            json!({"user_id": identity.user, "tenant_id": identity.tenant, "connections": connections})
        })
        .collect();
    Ok(Json(json!({
        "instances": {
            "created": created,
            "active": active,
            "cleaned_up": created.saturating_sub(active),
        },
        "sessions": {
            "live": m.sessions_live.get(),
            "hibernated": m.sessions_hibernated.get(),
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
        "cluster": cluster,
        "busiest_users": top,
        "guest": app.sandbox().version,
        "guest_versions": app
            .guest_versions()
            .into_iter()
            .map(|(version, live, hibernated)| json!({
                "name": version.name,
                "sha256": version.sha256,
                "label": version.label(),
                "loaded_at": version.loaded_at,
                "instances": live,
                "hibernated": hibernated,
            }))
            .collect::<Vec<_>>(),
    })))
}

/// A publisher is whoever holds a valid token with the publish scope. A user's connect token
/// lacks it, so it can never publish, not even to its own user.
/// A publisher token with a `tenant` claim publishes to that tenant only: its events go to
/// that tenant's users (`tenant_id` may be left out), any other `tenant_id` is refused.
fn authorize_publisher(app: &AppState, headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    Ok(authorize(app, headers, PUBLISH_SCOPE)?.tenant)
}

/// Applies a tenant-bound publisher's tenant to one event.
fn bind_tenant(
    app: &AppState,
    publisher_tenant: Option<&str>,
    publication: &mut Publication,
) -> Result<(), ApiError> {
    let Some(bound) = publisher_tenant else {
        return Ok(());
    };
    match &publication.identity.tenant {
        None => publication.identity.tenant = Some(bound.to_owned()),
        Some(tenant) if tenant == bound => {}
        Some(_) => {
            return Err(refuse(
                app,
                "tenant",
                None,
                ApiError::forbidden(format!(
                    "this publisher token is bound to tenant {bound:?} and cannot publish to another"
                )),
            ));
        }
    }
    Ok(())
}

pub(crate) fn authorize(
    app: &AppState,
    headers: &HeaderMap,
    scope: &'static str,
) -> Result<crate::auth::Claims, ApiError> {
    let claims = bearer(headers)
        .ok_or(AuthError::Missing)
        .and_then(|t| app.verifier.verify(t))
        .map_err(|err| refuse(app, err.label(), None, ApiError::unauthorized(err)))?;
    if !claims.has_scope(scope) {
        return Err(refuse(
            app,
            "scope",
            Some(&claims.sub),
            ApiError::forbidden(format!("token lacks the {scope} scope")),
        ));
    }
    Ok(claims)
}

/// The request body, at most `max_body_bytes` and within `body_read_timeout_secs`: a
/// publisher that sends its body slowly must not hold a connection and a task forever.
pub(crate) async fn read_body(app: &AppState, body: Body) -> Result<axum::body::Bytes, ApiError> {
    let limits = &app.config.limits;
    let max = limits.max_body_bytes;
    let wait = std::time::Duration::from_secs(limits.body_read_timeout_secs);
    match tokio::time::timeout(wait, axum::body::to_bytes(body, max)).await {
        Ok(Ok(bytes)) => Ok(bytes),
        Ok(Err(_)) => Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
            format!("request body is larger than {max} bytes"),
        )),
        Err(_) => Err(ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            "body_timeout",
            format!("request body not received within {} s", wait.as_secs()),
        )),
    }
}

/// The event to publish and its idempotency key, or why it is refused.
fn validate(
    request: PublishRequest,
    app: &AppState,
) -> Result<(Publication, Option<String>), ApiError> {
    let limits = &app.config.limits;
    let mut message = request
        .message
        .map(MessageOp::from_request)
        .transpose()
        .map_err(ApiError::bad_request)?;
    let (kind, payload) = match (&message, request.kind, request.payload) {
        (None, None, _) => return Err(ApiError::bad_request("kind is required")),
        (None, _, None) => return Err(ApiError::bad_request("payload is required")),
        (None, Some(kind), Some(payload)) => (kind, payload),
        // A message's kind and payload are its create's: the frames of its appends and
        // end name that kind, and its snapshot carries that payload.
        (Some(MessageOp::Create { .. }), kind, payload) => (
            kind.unwrap_or_else(|| "message".to_owned()),
            payload.unwrap_or_else(|| RawValue::from_string("null".into()).expect("JSON")),
        ),
        (Some(_), _, Some(_)) => {
            return Err(ApiError::bad_request(
                "payload goes with a message's create; its appends and end carry text only",
            ));
        }
        (Some(_), kind, None) => (
            kind.unwrap_or_else(|| MESSAGE_KIND.to_owned()),
            RawValue::from_string("null".into()).expect("JSON"),
        ),
    };
    if kind == MESSAGE_KIND
        && !matches!(
            message,
            Some(MessageOp::Append { .. } | MessageOp::End { .. })
        )
    {
        return Err(ApiError::bad_request(format!(
            "kind {MESSAGE_KIND:?} is reserved for message ops: publish a `message` instead"
        )));
    }
    let message_id = message.as_ref().map(|m| m.id().to_owned());
    for (name, value) in [
        ("user_id", Some(&request.user_id)),
        ("kind", Some(&kind)),
        ("tenant_id", request.tenant_id.as_ref()),
        ("idempotency_key", request.idempotency_key.as_ref()),
    ] {
        if value.is_some_and(|v| v.is_empty()) {
            return Err(ApiError::bad_request(format!("{name} must not be empty")));
        }
    }
    for (name, value) in [
        ("user_id", Some(&request.user_id)),
        ("tenant_id", request.tenant_id.as_ref()),
        ("kind", Some(&kind)),
        ("message.id", message_id.as_ref()),
        ("run_id", request.run_id.as_ref()),
        ("thread_id", request.thread_id.as_ref()),
        ("idempotency_key", request.idempotency_key.as_ref()),
    ] {
        if value.is_some_and(|v| v.len() > MAX_ID_BYTES) {
            return Err(ApiError::bad_request(format!(
                "{name} is longer than {MAX_ID_BYTES} bytes"
            )));
        }
    }
    let payload = String::from(payload.get());
    let shape = PayloadShape::of(&payload);
    if shape.depth > limits.max_payload_depth {
        return Err(ApiError::bad_request(format!(
            "payload nests {} levels deep; at most {} (limits.max_payload_depth)",
            shape.depth, limits.max_payload_depth
        )));
    }
    // A publisher's event must never turn into a guest fault of every connection of the
    // user: the frame carrying it, redaction markers included, must fit what a guest may
    // emit and a client takes.
    let framed = FRAME_OVERHEAD
        + escaped_len(&kind)
        + request.run_id.as_deref().map_or(0, escaped_len)
        + request.thread_id.as_deref().map_or(0, escaped_len)
        + payload.len()
        + shape.members * REDACTION_GROWTH;
    // A message's snapshot frame holds all this besides its text: the log bounds the text
    // so that the whole still fits.
    if let Some(MessageOp::Create { frame_base, .. }) = &mut message {
        *frame_base = framed;
    }
    if framed > limits.max_message_bytes {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "event_too_large",
            format!(
                "the event's frame could take {framed} bytes (payload {} bytes, {} object \
                 members that may be redacted, escaped ids); clients take at most {} \
                 (limits.max_message_bytes)",
                payload.len(),
                shape.members,
                limits.max_message_bytes
            ),
        ));
    }
    let publication = Publication {
        identity: Identity {
            tenant: request.tenant_id,
            user: request.user_id,
        },
        kind,
        payload,
        run_id: request.run_id,
        thread_id: request.thread_id,
        message,
    };
    Ok((publication, request.idempotency_key))
}

/// What the publish API needs to know of a payload, read in one pass over its (valid) JSON.
#[derive(Debug, Default, PartialEq, Eq)]
struct PayloadShape {
    /// Deepest nesting of arrays and objects.
    depth: usize,
    /// Object members (each may have its value redacted).
    members: usize,
}

impl PayloadShape {
    fn of(json: &str) -> PayloadShape {
        let mut shape = PayloadShape::default();
        let (mut depth, mut in_string, mut escaped) = (0usize, false, false);
        for b in json.bytes() {
            if in_string {
                match (escaped, b) {
                    (true, _) => escaped = false,
                    (false, b'\\') => escaped = true,
                    (false, b'"') => in_string = false,
                    _ => {}
                }
                continue;
            }
            match b {
                b'"' => in_string = true,
                b'[' | b'{' => {
                    depth += 1;
                    shape.depth = shape.depth.max(depth);
                }
                b']' | b'}' => depth = depth.saturating_sub(1),
                b':' => shape.members += 1,
                _ => {}
            }
        }
        shape
    }
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
    if let Some(trouble) = app.router.cluster().and_then(|c| c.trouble()) {
        return ApiError::unavailable(format!("event log unavailable: {trouble}")).into_response();
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payload_shape_counts_depth_and_members_outside_strings() {
        assert_eq!(PayloadShape::of("1"), PayloadShape::default());
        assert_eq!(
            PayloadShape::of(r#"{"a":[1,{"b":2}],"c":"x:{[\"]"}"#),
            PayloadShape {
                depth: 3,
                members: 3
            }
        );
        let deep = format!("{}{}", "[".repeat(200), "]".repeat(200));
        assert_eq!(PayloadShape::of(&deep).depth, 200);
    }

    #[test]
    fn escaped_length_matches_serde() {
        for s in ["", "plain", "q\"uote\\", "\n\r\t", "\u{1}\u{1f}", "ünï€"] {
            let quoted = serde_json::to_string(s).unwrap();
            assert_eq!(escaped_len(s), quoted.len() - 2, "{s:?}");
        }
    }
}

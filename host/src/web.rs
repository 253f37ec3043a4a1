//! What the gateway serves to browsers: the client library (`GET /client.js`) always, and in
//! development mode (`serve --dev`) the demo page at `/` with the two endpoints it uses.
//!
//! The dev endpoints mint tokens and publish events for anyone who can reach the port, so
//! they exist only when the process was started with `--dev`; a configuration file or the
//! environment cannot turn them on. Without an `[rpc] url`, dev mode is also its own backend
//! for client calls (`POST /dev/rpc`, reached over HTTP and signed like any backend), so the
//! page's Stop button cancels a demo run the way an application's would.

use std::collections::HashMap;
use std::sync::{Arc, LazyLock, Mutex};
use std::time::Duration;

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Deserialize;
use serde_json::json;
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

use crate::AppState;
use crate::api::{ApiError, refuse};
use crate::auth::{Audience, AuthError, Claims, Identity, bearer, mint_hs256, now_secs};
use crate::router::Publication;
use crate::streams::{MESSAGE_FRAME_OVERHEAD, MessageOp, Status};

/// The client library, kept in this repository and compiled into the binary.
pub const CLIENT_JS: &str = include_str!("../web/client.js");
const DEMO_HTML: &str = include_str!("../web/demo.html");

/// The client's `VERSION`, read from its source so the two cannot disagree.
pub static CLIENT_VERSION: LazyLock<&'static str> = LazyLock::new(|| {
    CLIENT_JS
        .split_once("export const VERSION = \"")
        .and_then(|(_, rest)| rest.split_once('"'))
        .map_or("unknown", |(version, _)| version)
});

/// Content hash for the `ETag`: a rebuilt binary with another client gets another tag.
const CLIENT_HASH: u64 = fnv1a(CLIENT_JS.as_bytes());

const fn fnv1a(bytes: &[u8]) -> u64 {
    let mut hash = 0xcbf2_9ce4_8422_2325_u64;
    let mut i = 0;
    while i < bytes.len() {
        hash ^= bytes[i] as u64;
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
        i += 1;
    }
    hash
}

/// Longest lifetime `/dev/token` mints.
const MAX_DEV_TOKEN_SECS: u64 = 24 * 3600;

/// The routes of this module for `state`'s mode.
pub fn routes(dev: bool) -> axum::Router<Arc<AppState>> {
    let router = axum::Router::new().route("/client.js", get(client_js));
    if !dev {
        return router;
    }
    router
        .route("/", get(demo_page))
        .route("/dev/token", get(dev_token))
        .route("/dev/run", post(dev_run))
        .route("/dev/rpc", post(dev_rpc))
}

/// Development mode without `[rpc] url` (and without TLS, which the call back to this
/// listener would need): client calls go to this process's `POST /dev/rpc`, signed with a
/// secret generated now.
pub(crate) fn attach_demo_backend(app: &AppState, addr: std::net::SocketAddr) {
    if app.rpc.get().is_some() || app.tls.is_some() {
        return;
    }
    let ip = match addr.ip() {
        std::net::IpAddr::V4(ip) if ip.is_unspecified() => std::net::Ipv4Addr::LOCALHOST.into(),
        std::net::IpAddr::V6(ip) if ip.is_unspecified() => std::net::Ipv6Addr::LOCALHOST.into(),
        ip => ip,
    };
    let mut config = app.config.rpc.clone();
    config.max_answer_bytes = config.max_answer_bytes.min(
        app.config
            .limits
            .max_message_bytes
            .saturating_sub(crate::config::ANSWER_FRAME_OVERHEAD)
            .max(1),
    );
    config.url = Some(format!(
        "http://{}/dev/rpc",
        std::net::SocketAddr::new(ip, addr.port())
    ));
    config.secret = Some(format!(
        "{}{}",
        uuid::Uuid::new_v4().simple(),
        uuid::Uuid::new_v4().simple()
    ));
    match crate::rpc::Backend::new(&config, app.metrics.clone()) {
        Ok(Some(backend)) => {
            let _ = app.rpc.set(Arc::new(backend));
        }
        Ok(None) => {}
        Err(err) => tracing::warn!(error = %err, "demo: no backend for client calls"),
    }
}

/// Demo runs in progress, by run id: what `cancel_run` stops.
static DEMO_RUNS: LazyLock<Mutex<HashMap<String, (Identity, CancellationToken)>>> =
    LazyLock::new(Default::default);

/// `POST /dev/rpc`: the demo's backend for client calls. It checks the signature as any
/// backend must, then serves one method, `cancel_run` `{"run_id"}`, for the caller's own
/// runs. Development mode only.
async fn dev_rpc(State(app): State<Arc<AppState>>, headers: HeaderMap, body: Bytes) -> Response {
    let signature = headers
        .get(crate::rpc::SIGNATURE_HEADER)
        .and_then(|v| v.to_str().ok());
    if !app.rpc.get().is_some_and(|b| b.signed(&body, signature)) {
        let reason = json!({"reason": "bad signature"});
        return (StatusCode::UNAUTHORIZED, Json(reason)).into_response();
    }
    let call: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
    if call["method"] != "cancel_run" {
        let reason = json!({"reason": "the demo backend knows one method: cancel_run"});
        return (StatusCode::NOT_FOUND, Json(reason)).into_response();
    }
    let caller = Identity {
        tenant: call["tenant_id"].as_str().map(str::to_owned),
        user: call["user_id"].as_str().unwrap_or_default().to_owned(),
    };
    let run_id = call["data"]["run_id"].as_str().unwrap_or_default();
    let mut runs = DEMO_RUNS.lock().unwrap_or_else(|p| p.into_inner());
    match runs.get(run_id) {
        // Another user's run is as unknown as one that never was; a cancelled one is gone.
        Some((owner, cancel)) if *owner == caller => {
            cancel.cancel();
            runs.remove(run_id);
            Json(json!({"cancelled": true, "run_id": run_id})).into_response()
        }
        _ => {
            let reason = json!({"reason": format!("no run {run_id:?} in progress for you")});
            (StatusCode::NOT_FOUND, Json(reason)).into_response()
        }
    }
}

/// `GET /client.js`: cacheable, revalidated by its content hash, importable from any origin
/// (a module script from another origin needs CORS).
async fn client_js(headers: HeaderMap) -> Response {
    let etag = format!("\"{}-{CLIENT_HASH:016x}\"", *CLIENT_VERSION);
    let fresh = headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|tags| tags.split(',').any(|t| t.trim() == etag || t.trim() == "*"));
    let mut response = if fresh {
        StatusCode::NOT_MODIFIED.into_response()
    } else {
        CLIENT_JS.into_response()
    };
    let version = HeaderValue::from_static(*CLIENT_VERSION);
    let etag = HeaderValue::from_str(&etag).expect("ascii tag");
    for (name, value) in [
        (
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/javascript; charset=utf-8"),
        ),
        (
            header::CACHE_CONTROL,
            HeaderValue::from_static("public, max-age=300"),
        ),
        (header::ETAG, etag),
        (
            header::ACCESS_CONTROL_ALLOW_ORIGIN,
            HeaderValue::from_static("*"),
        ),
        (
            header::X_CONTENT_TYPE_OPTIONS,
            HeaderValue::from_static("nosniff"),
        ),
        (HeaderName::from_static("x-gateway-client-version"), version),
    ] {
        response.headers_mut().insert(name, value);
    }
    response
}

async fn demo_page() -> Response {
    let mut response = axum::response::Html(DEMO_HTML).into_response();
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenQuery {
    user: String,
    tenant: Option<String>,
    ttl_secs: Option<u64>,
}

/// `GET /dev/token?user=alice[&tenant=acme][&ttl_secs=3600]`: a connect token signed with the
/// configured HS256 secret, for the demo page. Development mode only.
async fn dev_token(
    State(app): State<Arc<AppState>>,
    query: Result<Query<TokenQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(query) = query.map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad_request",
            format!("{e}; expected ?user=NAME[&tenant=T][&ttl_secs=N]"),
        )
    })?;
    for (name, value) in [
        ("user", Some(&query.user)),
        ("tenant", query.tenant.as_ref()),
    ] {
        if let Some(value) = value
            && (value.is_empty() || value.len() > 256)
        {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "bad_request",
                format!("{name} must be 1 to 256 bytes"),
            ));
        }
    }
    let ttl = query.ttl_secs.unwrap_or(3600);
    if ttl == 0 || ttl > MAX_DEV_TOKEN_SECS {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad_request",
            format!("ttl_secs must be 1 to {MAX_DEV_TOKEN_SECS}"),
        ));
    }
    let Some(secret) = app.config.jwt_secret.as_deref() else {
        return Err(ApiError::new(
            StatusCode::NOT_IMPLEMENTED,
            "no_dev_secret",
            "dev tokens are signed with jwt_secret (HS256), and none is configured",
        ));
    };
    let claims = Claims {
        sub: query.user,
        exp: now_secs() + ttl,
        nbf: None,
        iss: app.config.auth.issuer.clone(),
        aud: app.config.auth.audience.as_deref().map(Audience::from),
        scope: None,
        tenant: query.tenant,
        sid: None,
        iat: Some(now_secs()),
    };
    let token = mint_hs256(secret, &claims)
        .map_err(|e| ApiError::unavailable(format!("cannot sign a token: {e}")))?;
    let mut response = Json(json!({
        "token": token,
        "user_id": claims.sub,
        "tenant_id": claims.tenant,
        "expires_at": claims.exp,
    }))
    .into_response();
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Ok(response)
}

/// One step of the demo run.
enum Step {
    /// An event: its kind and payload (JSON).
    Event(&'static str, &'static str),
    /// The agent's answer, [`DEMO_ANSWER`]: streamed token by token as a message.
    Answer,
}

/// A scripted agent run: what the demo page shows, redactions included.
const DEMO_RUN: &[Step] = &[
    Step::Event(
        "agent_started",
        r#"{"goal":"Summarise the open incidents","model":"demo-1"}"#,
    ),
    Step::Event(
        "tool_executing",
        r#"{"tool":"search_tickets","args":{"query":"status:open","api_key":"sk-demo-0123456789"}}"#,
    ),
    Step::Event("tool_completed", r#"{"tool":"search_tickets","results":3}"#),
    Step::Event(
        "tool_executing",
        r#"{"tool":"http_get","args":{"url":"https://status.example.com","headers":{"Authorization":"Bearer demo"}}}"#,
    ),
    Step::Event("tool_completed", r#"{"tool":"http_get","status":200}"#),
    Step::Answer,
    Step::Event("agent_completed", r#"{"tokens":1834,"duration_ms":2100}"#),
];

/// The demo agent's answer, streamed one [`demo_tokens`] item per append.
pub const DEMO_ANSWER: &str = "Three incidents are open. The oldest, INC-2041, has been open \
     for two days: the search cluster in eu-west rejects writes since a disk filled up. \
     INC-2057 is a burst of 502s behind the status page, and INC-2060 tracks slow logins for \
     single sign-on accounts. Start with INC-2041; the other two can wait for the morning.";

/// [`DEMO_ANSWER`] cut as a model streams it: each word with the space before it.
pub fn demo_tokens() -> impl Iterator<Item = &'static str> {
    let spaces = || DEMO_ANSWER.match_indices(' ').map(|(at, _)| at);
    let starts = std::iter::once(0).chain(spaces());
    let ends = spaces().chain(std::iter::once(DEMO_ANSWER.len()));
    starts
        .zip(ends)
        .map(|(start, end)| &DEMO_ANSWER[start..end])
}

/// The kind of the demo's streamed answer.
const DEMO_ANSWER_KIND: &str = "assistant";
/// The payload of the answer's create: shown with the message.
const DEMO_ANSWER_PAYLOAD: &str = r#"{"model":"demo-1","role":"assistant"}"#;

/// Time between the demo run's events: slow enough to watch.
const DEMO_STEP: Duration = Duration::from_millis(350);
/// Time between the answer's tokens: a model's pace.
const DEMO_TOKEN_STEP: Duration = Duration::from_millis(70);

/// `POST /dev/run` with the page's connect token: publishes [`DEMO_RUN`] to that token's
/// identity, one step every [`DEMO_STEP`], the answer one token every [`DEMO_TOKEN_STEP`].
/// Development mode only.
async fn dev_run(
    State(app): State<Arc<AppState>>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let claims = bearer(&headers)
        .ok_or(AuthError::Missing)
        .and_then(|t| app.verifier.verify(t))
        .map_err(|err| refuse(&app, err.label(), None, ApiError::unauthorized(err)))?;
    let run = DemoRun {
        app: app.clone(),
        identity: claims.identity(),
        run_id: format!("run-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]),
        cancel: CancellationToken::new(),
    };
    let answer = json!({
        "run_id": run.run_id,
        "events": DEMO_RUN.len() - 1,
        "message_id": run.message_id(),
        "appends": demo_tokens().count(),
    });
    let span = tracing::info_span!("demo_run", run_id = %run.run_id);
    DEMO_RUNS.lock().unwrap_or_else(|p| p.into_inner()).insert(
        run.run_id.clone(),
        (run.identity.clone(), run.cancel.clone()),
    );
    // Made before the task, so the entry goes even if the task never runs.
    let listed = Listed(run.run_id.clone());
    let steps = async move {
        let _listed = listed;
        for step in DEMO_RUN {
            let done = match step {
                Step::Event(kind, payload) => run
                    .publish(kind, (*payload).to_owned(), None)
                    .await
                    .map(drop),
                Step::Answer => run.stream_answer().await,
            };
            let done = match done {
                Ok(()) => run.pause(DEMO_STEP).await,
                stopped => stopped,
            };
            match done {
                Ok(()) => {}
                Err(Stopped::Shutdown) => return,
                Err(Stopped::Cancelled) => {
                    let payload = r#"{"error":"cancelled by the user"}"#.to_owned();
                    let _ = run.publish("agent_error", payload, None).await;
                    return;
                }
            }
        }
    };
    tokio::spawn(steps.instrument(span));
    Ok((StatusCode::ACCEPTED, Json(answer)).into_response())
}

/// One demo run in progress.
struct DemoRun {
    app: Arc<AppState>,
    identity: Identity,
    run_id: String,
    /// Cancelled by the page's Stop button (`cancel_run` through `/dev/rpc`).
    cancel: CancellationToken,
}

/// Why a run stops before its end.
enum Stopped {
    /// The gateway is shutting down.
    Shutdown,
    /// Its user cancelled it.
    Cancelled,
}

/// Keeps a run in [`DEMO_RUNS`] while it runs.
struct Listed(String);

impl Drop for Listed {
    fn drop(&mut self) {
        DEMO_RUNS
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.0);
    }
}

impl DemoRun {
    fn message_id(&self) -> String {
        format!("answer-{}", self.run_id)
    }

    /// Publishes one event, or one op of the answer; whether it was stored (a refusal is
    /// logged).
    async fn publish(
        &self,
        kind: &str,
        payload: String,
        message: Option<MessageOp>,
    ) -> Result<bool, Stopped> {
        let publication = Publication {
            identity: self.identity.clone(),
            kind: kind.to_owned(),
            payload,
            run_id: Some(self.run_id.clone()),
            thread_id: Some("demo".to_owned()),
            message,
        };
        // Into the log every node reads: in cluster mode that is the stream, not this node's
        // (unused) embedded log.
        let stored =
            match self.app.router.cluster() {
                Some(cluster) if publication.message.is_some() => {
                    match cluster.publish_message(&publication, None).await {
                        Ok(Ok(_)) => Ok(()),
                        Ok(Err(refusal)) => {
                            tracing::warn!(reason = %refusal.reason, "demo run: an op was refused");
                            Err(())
                        }
                        Err(err) => {
                            tracing::warn!(error = %err, "demo run: an op was not stored");
                            Err(())
                        }
                    }
                }
                Some(cluster) => cluster.publish(&publication, None).await.map(drop).map_err(
                    |err| tracing::warn!(error = %err, "demo run: an event was not stored"),
                ),
                None => self
                    .app
                    .router
                    .publish(publication, None)
                    .map(drop)
                    .map_err(|refusal| {
                        tracing::warn!(reason = %refusal.reason, "demo run: an event was refused");
                    }),
            };
        if self.app.shutdown.is_cancelled() {
            return Err(Stopped::Shutdown);
        }
        Ok(stored.is_ok())
    }

    /// The answer as one message: a create, one append per token, an end.
    async fn stream_answer(&self) -> Result<(), Stopped> {
        let id = self.message_id();
        let create = MessageOp::Create {
            id: id.clone(),
            text: String::new(),
            // The snapshot frame besides its text: these ids, kind and payload, with room to
            // spare (the publish API computes it exactly; the demo's is small and fixed).
            frame_base: MESSAGE_FRAME_OVERHEAD
                + 2 * (self.run_id.len() + DEMO_ANSWER_KIND.len() + DEMO_ANSWER_PAYLOAD.len())
                + 64,
        };
        let op = |message| self.publish(DEMO_ANSWER_KIND, "null".to_owned(), Some(message));
        let created = self
            .publish(
                DEMO_ANSWER_KIND,
                DEMO_ANSWER_PAYLOAD.to_owned(),
                Some(create),
            )
            .await?;
        if !created {
            return Ok(());
        }
        let mut status = Status::Complete;
        let mut stopped = None;
        for (index, token) in (1..).zip(demo_tokens()) {
            match self.pause(DEMO_TOKEN_STEP).await {
                Ok(()) => {}
                Err(Stopped::Cancelled) => {
                    status = Status::Cancelled;
                    stopped = Some(Stopped::Cancelled);
                    break;
                }
                Err(shutdown) => return Err(shutdown),
            }
            let append = MessageOp::Append {
                id: id.clone(),
                index,
                text: token.to_owned(),
            };
            if !op(append).await? {
                // The next appends would be out of order: the answer ends here.
                status = Status::Failed;
                break;
            }
        }
        op(MessageOp::End { id, status }).await?;
        stopped.map_or(Ok(()), Err)
    }

    async fn pause(&self, step: Duration) -> Result<(), Stopped> {
        tokio::select! {
            () = self.app.shutdown.cancelled() => Err(Stopped::Shutdown),
            () = self.cancel.cancelled() => Err(Stopped::Cancelled),
            () = tokio::time::sleep(step) => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_served_version_is_the_clients_own() {
        assert!(CLIENT_JS.contains(&format!("export const VERSION = \"{}\";", *CLIENT_VERSION)));
        assert_ne!(*CLIENT_VERSION, "unknown");
    }

    #[test]
    fn every_demo_payload_is_json() {
        for step in DEMO_RUN {
            if let Step::Event(kind, payload) = step {
                serde_json::from_str::<serde_json::Value>(payload)
                    .unwrap_or_else(|e| panic!("{kind}: {e}"));
            }
        }
        serde_json::from_str::<serde_json::Value>(DEMO_ANSWER_PAYLOAD).unwrap();
    }

    #[test]
    fn the_demo_answer_streams_as_words_that_join_to_it() {
        let tokens: Vec<_> = demo_tokens().collect();
        assert!((30..=60).contains(&tokens.len()), "{}", tokens.len());
        assert_eq!(tokens.concat(), DEMO_ANSWER);
        assert_eq!(tokens[..3], ["Three", " incidents", " are"]);
        assert!(tokens.iter().all(|t| !t.ends_with(' ')), "{tokens:?}");
    }
}

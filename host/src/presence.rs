//! Presence: whether an identity has connections, asked for (`GET /v1/presence`) or told
//! (`[webhooks]`: `user.online` when its first connection opens, `user.offline` when its
//! last one closed and it stayed away `offline_after_secs`).
//!
//! The router reports the two transitions ([`Webhooks::first_opened`],
//! [`Webhooks::last_closed`]) under its shard lock, so they arrive in the order they
//! happened; this module only records them. One task ([`Webhooks::run`]) turns debounced
//! transitions into webhooks and posts them one at a time, in order, with retries: an
//! identity's `user.offline` never overtakes its `user.online`.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Json;
use axum::extract::{Query, State};
use axum::http::HeaderMap;
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::AppState;
use crate::api::{ApiError, authorize, refuse};
use crate::auth::{Identity, PRESENCE_SCOPE, now_secs};
use crate::config::{self, Invalid};
use crate::metrics::Metrics;
use crate::rpc::{SIGNATURE_HEADER, signature};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PresenceQuery {
    user_id: String,
    tenant_id: Option<String>,
}

/// `GET /v1/presence?user_id=..[&tenant_id=..]` (scope `presence:read`; a tenant-bound
/// token asks within its tenant only): `{"online": bool, "connections": n}`.
pub async fn presence(
    State(app): State<Arc<AppState>>,
    headers: HeaderMap,
    query: Result<Query<PresenceQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let asker = authorize(&app, &headers, PRESENCE_SCOPE)?;
    let Query(query) = query.map_err(|e| ApiError::bad_request(e.body_text()))?;
    for (name, value) in [
        ("user_id", Some(&query.user_id)),
        ("tenant_id", query.tenant_id.as_ref()),
    ] {
        if value.is_some_and(|v| v.is_empty() || v.len() > 256) {
            return Err(ApiError::bad_request(format!(
                "{name} must be 1 to 256 bytes"
            )));
        }
    }
    let tenant = match (&asker.tenant, query.tenant_id) {
        (Some(bound), Some(asked)) if *bound != asked => {
            return Err(refuse(
                &app,
                "tenant",
                Some(&asker.sub),
                ApiError::forbidden(format!(
                    "this token is bound to tenant {bound:?} and cannot ask about another"
                )),
            ));
        }
        (Some(bound), _) => Some(bound.clone()),
        (None, asked) => asked,
    };
    let identity = Identity {
        tenant,
        user: query.user_id,
    };
    let connections = match app.router.cluster_presence() {
        // Cluster mode: every node's connections, from the shared record.
        Some(shared) => shared.connections(&identity).await.map_err(|e| {
            ApiError::unavailable(format!("presence is unavailable ({e}); retry shortly"))
        })? as usize,
        None => app.router.connections_of(&identity),
    };
    Ok(Json(
        json!({"online": connections > 0, "connections": connections}),
    ))
}

/// The header naming a webhook, the same on every attempt: a receiver dedupes by it.
pub const WEBHOOK_ID_HEADER: &str = "x-gateway-webhook-id";

/// The webhook sender of one node.
pub struct Webhooks {
    state: Mutex<Tracker>,
    /// Woken by a new webhook or a new debounce, so the task never polls.
    wake: Notify,
    client: reqwest::Client,
    url: reqwest::Url,
    key: Box<[u8]>,
    offline_after: Duration,
    timeout: Duration,
    max_attempts: u32,
    retry_min: Duration,
    retry_max: Duration,
    max_pending: usize,
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for Webhooks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Webhooks")
            .field("url", &self.url.as_str())
            .finish_non_exhaustive()
    }
}

#[derive(Default)]
struct Tracker {
    /// Identities reported online (their `user.online` is queued or posted) and not yet
    /// reported offline.
    online: HashMap<Identity, Online>,
    /// Offlines waiting out the debounce, in the order they fall due (one delay for all).
    due: VecDeque<(Instant, Identity)>,
    /// Webhooks to post, oldest first.
    pending: VecDeque<Hook>,
}

struct Online {
    connected: bool,
    /// Set while the identity has no connection: when it is reported offline, unless one
    /// opens first.
    offline_due: Option<Instant>,
    /// When its last connection closed (what `user.offline` says), and the same on the
    /// monotonic clock for the delay metric.
    closed_at: f64,
    closed: Instant,
}

struct Hook {
    id: String,
    kind: &'static str,
    identity: Identity,
    /// When the transition happened (Unix seconds).
    at: f64,
    /// The same, for the delay metric.
    since: Instant,
}

impl Webhooks {
    /// The sender `[webhooks]` names, or `None` when it is off.
    pub fn new(config: &config::Webhooks, metrics: Arc<Metrics>) -> Result<Option<Self>, Invalid> {
        let Some(url) = config.url() else {
            return Ok(None);
        };
        let refuse = |reason: String| Invalid {
            key: "webhooks.url",
            value: url.to_owned(),
            reason,
        };
        let parsed = reqwest::Url::parse(url).map_err(|e| refuse(e.to_string()))?;
        let client = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .tcp_nodelay(true)
            .build()
            .map_err(|e| refuse(e.to_string()))?;
        Ok(Some(Webhooks {
            state: Mutex::default(),
            wake: Notify::new(),
            client,
            url: parsed,
            key: config
                .secret
                .as_deref()
                .unwrap_or_default()
                .as_bytes()
                .into(),
            offline_after: Duration::from_secs(config.offline_after_secs),
            timeout: Duration::from_millis(config.timeout_ms),
            max_attempts: config.max_attempts,
            retry_min: Duration::from_millis(config.retry_min_ms),
            retry_max: Duration::from_millis(config.retry_max_ms),
            max_pending: config.max_pending,
            metrics,
        }))
    }

    /// How long an identity stays away before `user.offline` (`offline_after_secs`).
    pub fn offline_after(&self) -> Duration {
        self.offline_after
    }

    /// Queues a webhook for a transition decided elsewhere (cluster mode decides them for
    /// the whole cluster): `at` is when it happened (Unix seconds), `since` the same on the
    /// monotonic clock.
    pub fn post(&self, kind: &'static str, identity: Identity, at: f64, since: Instant) {
        let mut tracker = self.tracker();
        self.queue(&mut tracker, kind, identity, (at, since));
    }

    fn tracker(&self) -> std::sync::MutexGuard<'_, Tracker> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The identity's first connection on this node opened.
    pub fn first_opened(&self, identity: &Identity) {
        let mut tracker = self.tracker();
        // An offline already due goes first, even if the task has not got to it yet (it may
        // be busy retrying a webhook): this return is a new `user.online`.
        self.promote_due(&mut tracker);
        match tracker.online.get_mut(identity) {
            // Back within the debounce: it never went offline.
            Some(online) => {
                online.connected = true;
                online.offline_due = None;
            }
            None => {
                tracker.online.insert(
                    identity.clone(),
                    Online {
                        connected: true,
                        offline_due: None,
                        closed_at: 0.0,
                        closed: Instant::now(),
                    },
                );
                let now = (unix_now(), Instant::now());
                self.queue(&mut tracker, "user.online", identity.clone(), now);
            }
        }
    }

    /// The identity's last connection on this node closed.
    pub fn last_closed(&self, identity: &Identity) {
        let mut tracker = self.tracker();
        // Keeps `due` to the closes of one debounce window, whatever the task is doing.
        self.promote_due(&mut tracker);
        let due = Instant::now() + self.offline_after;
        let Some(online) = tracker.online.get_mut(identity) else {
            return;
        };
        online.connected = false;
        online.offline_due = Some(due);
        online.closed_at = unix_now();
        online.closed = Instant::now();
        tracker.due.push_back((due, identity.clone()));
        drop(tracker);
        self.wake.notify_one();
    }

    fn queue(
        &self,
        tracker: &mut Tracker,
        kind: &'static str,
        identity: Identity,
        (at, since): (f64, Instant),
    ) {
        if tracker.pending.len() >= self.max_pending {
            // A receiver down for long: the oldest is given up, counted and logged, rather
            // than the gateway's memory growing without bound.
            if let Some(oldest) = tracker.pending.pop_front() {
                self.given_up(&oldest, "overflow");
            }
        }
        tracker.pending.push_back(Hook {
            id: uuid::Uuid::new_v4().simple().to_string(),
            kind,
            identity,
            at,
            since,
        });
        self.metrics
            .webhooks_pending
            .set(tracker.pending.len() as i64);
        self.wake.notify_one();
    }

    /// Offlines whose debounce has passed become webhooks; returns when the next falls due.
    fn promote_due(&self, tracker: &mut Tracker) -> Option<Instant> {
        let now = Instant::now();
        while let Some((due, _)) = tracker.due.front() {
            if *due > now {
                return Some(*due);
            }
            let (due, identity) = tracker.due.pop_front().expect("front exists");
            // A later close or a reconnect made this entry stale.
            let Some(online) = tracker.online.get(&identity) else {
                continue;
            };
            if online.connected || online.offline_due != Some(due) {
                continue;
            }
            let at = (online.closed_at, online.closed);
            tracker.online.remove(&identity);
            self.queue(tracker, "user.offline", identity, at);
        }
        None
    }

    /// Posts webhooks as transitions come, until shutdown.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        loop {
            let (next, due) = {
                let mut tracker = self.tracker();
                let due = self.promote_due(&mut tracker);
                let next = tracker.pending.pop_front();
                self.metrics
                    .webhooks_pending
                    .set(tracker.pending.len() as i64);
                (next, due)
            };
            if let Some(hook) = next {
                if self.deliver(&hook, &shutdown).await.is_err() {
                    break;
                }
                continue;
            }
            let due = due.unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
            tokio::select! {
                () = shutdown.cancelled() => break,
                () = self.wake.notified() => {}
                () = tokio::time::sleep_until(due) => {}
            }
        }
        let left = self.tracker().pending.len();
        if left > 0 {
            tracing::warn!(left, "webhooks not posted before shutdown");
        }
    }

    /// Posts one webhook, retrying what may succeed later; `Err` at shutdown.
    async fn deliver(&self, hook: &Hook, shutdown: &CancellationToken) -> Result<(), ()> {
        let body = serde_json::json!({
            "id": hook.id,
            "type": hook.kind,
            "tenant_id": hook.identity.tenant,
            "user_id": hook.identity.user,
            "at": hook.at,
        })
        .to_string();
        let signed = signature(&self.key, body.as_bytes());
        let mut wait = self.retry_min;
        for attempt in 1..=self.max_attempts {
            let post = self
                .client
                .post(self.url.clone())
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .header(SIGNATURE_HEADER, &signed)
                .header(WEBHOOK_ID_HEADER, &hook.id)
                .body(body.clone())
                .send();
            let retry = match tokio::time::timeout(self.timeout, post).await {
                Ok(Ok(answer)) if answer.status().is_success() => {
                    self.metrics.webhook_delivered(hook.kind);
                    self.metrics
                        .webhook_delay_seconds
                        .observe(hook.since.elapsed().as_secs_f64());
                    return Ok(());
                }
                Ok(Ok(answer)) => {
                    let status = answer.status();
                    status.as_u16() == 429 || status.is_server_error()
                }
                Ok(Err(_)) | Err(_) => true,
            };
            if !retry {
                self.given_up(hook, "refused");
                return Ok(());
            }
            if attempt == self.max_attempts {
                break;
            }
            self.metrics.webhook_retries.inc();
            tokio::select! {
                () = shutdown.cancelled() => return Err(()),
                () = tokio::time::sleep(wait) => {}
            }
            wait = (wait * 2).min(self.retry_max);
        }
        self.given_up(hook, "attempts");
        Ok(())
    }

    fn given_up(&self, hook: &Hook, why: &'static str) {
        self.metrics.webhook_given_up(why);
        tracing::warn!(
            target: "audit",
            id = %hook.id,
            kind = hook.kind,
            user = %hook.identity,
            why,
            "webhook given up"
        );
    }
}

pub(crate) fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(now_secs() as f64, |d| d.as_secs_f64())
}

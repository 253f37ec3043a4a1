//! The path of one connection, from HTTP request to closed socket.
//!
//! 1. [`connect`] (HTTP phase): verify the token, build the connection's [`Context`],
//!    instantiate its own guest instance, then upgrade. Any refusal is an HTTP answer.
//! 2. [`run`] (socket phase): register with the router, call the guest's `init`, then one
//!    loop owns the socket, the instance and the event queue until the connection ends.
//! 3. On the way out: `on-close`, a close frame with a documented code, and the instance is
//!    dropped with its memory. The router registration goes with it.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::rejection::QueryRejection;
use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use futures_util::SinkExt;
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::{Instant, sleep_until, timeout};
use tracing::Instrument;

use crate::AppState;
use crate::api::{ApiError, refuse};
use crate::auth::{AuthError, Claims, Identity, bearer, now_secs};
use crate::router::{Closed, Mailbox, Refused};
use crate::sandbox::{CloseReason, Context, Event, Fault, Frame, Instance};

/// Close codes the gateway sends (see the README's table).
pub mod close_code {
    pub const NORMAL: u16 = 1000;
    pub const GOING_AWAY: u16 = 1001;
    pub const INVALID_PAYLOAD: u16 = 1007;
    pub const POLICY: u16 = 1008;
    pub const TOO_BIG: u16 = 1009;
    pub const GUEST_FAULT: u16 = 1011;
    pub const SLOW_CLIENT: u16 = 4000;
}

/// Most events handed to the guest before the frames they produced are written; batching
/// them saves a flush (a syscall) per event under load.
const EVENT_BATCH: u64 = 64;

/// Turns in a row the session may serve queued events without polling its socket.
const READS_SKIPPED_MAX: u32 = 8;

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
struct Admitted {
    ctx: Context,
    /// Who this connection is; an in-band refresh must name the same identity.
    identity: Identity,
    token_exp: u64,
    instance: Instance,
    mailbox: Mailbox,
    /// The node-wide connection slot, released when the session ends.
    _permit: OwnedSemaphorePermit,
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
        .register(&identity, ctx.connection_id.as_str().into())
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
    let instance = app.sandbox.instantiate(&ctx).map_err(|err| {
        tracing::error!(user = %ctx.user_id, error = %format!("{err:#}"), "cannot instantiate guest");
        refuse(
            "instantiate",
            user,
            ApiError::unavailable("cannot create a handler instance"),
        )
    })?;
    Ok(Admitted {
        token_exp: claims.exp,
        identity,
        ctx,
        instance,
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

/// Why a session ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    /// The client sent Close or the stream ended.
    Client,
    Idle,
    TokenExpired,
    Shutdown,
    SlowClient,
    DeadPeer,
    RateLimited,
    /// An in-band refresh carried a token for another user.
    ForeignRefresh,
    TooBig,
    InvalidUtf8,
    Transport,
    Fault(Fault),
}

impl End {
    fn label(self) -> &'static str {
        match self {
            End::Client => "client",
            End::Idle => "idle",
            End::TokenExpired => "token_expired",
            End::Shutdown => "shutdown",
            End::SlowClient => "slow_client",
            End::DeadPeer => "dead_peer",
            End::RateLimited => "rate_limited",
            End::ForeignRefresh => "foreign_refresh",
            End::TooBig => "message_too_big",
            End::InvalidUtf8 => "invalid_utf8",
            End::Transport => "transport",
            End::Fault(_) => "guest_fault",
        }
    }

    /// The close frame to send, if the socket can still take one.
    fn close_frame(self) -> Option<(u16, String)> {
        use close_code::*;
        Some(match self {
            End::Client | End::Transport => return None,
            End::Idle => (NORMAL, "idle timeout".into()),
            End::TokenExpired => (POLICY, "token expired".into()),
            End::Shutdown => (GOING_AWAY, "gateway shutting down".into()),
            End::SlowClient => (SLOW_CLIENT, "slow client".into()),
            End::DeadPeer => (GOING_AWAY, "no answer to pings".into()),
            End::RateLimited => (POLICY, "message rate exceeded".into()),
            End::ForeignRefresh => (POLICY, "refresh token is for another user".into()),
            End::TooBig => (TOO_BIG, "message too big".into()),
            End::InvalidUtf8 => (INVALID_PAYLOAD, "invalid UTF-8 in text frame".into()),
            End::Fault(f) if f.is_policy() => (POLICY, format!("policy violation: {}", f.as_str())),
            End::Fault(f) => (GUEST_FAULT, format!("guest fault: {}", f.as_str())),
        })
    }

    fn guest_reason(self) -> CloseReason {
        match self {
            End::Client => CloseReason::Client,
            End::Idle => CloseReason::Idle,
            End::TokenExpired => CloseReason::TokenExpired,
            End::Shutdown => CloseReason::Shutdown,
            End::SlowClient => CloseReason::SlowClient,
            End::DeadPeer => CloseReason::Client,
            End::RateLimited
            | End::ForeignRefresh
            | End::TooBig
            | End::InvalidUtf8
            | End::Transport
            | End::Fault(_) => CloseReason::Error,
        }
    }
}

/// The socket phase of one connection. Owns the socket, the instance and the event queue.
async fn run(mut socket: WebSocket, app: Arc<AppState>, admitted: Admitted) {
    let Admitted {
        ctx,
        identity,
        token_exp,
        mut instance,
        mut mailbox,
        _permit,
    } = admitted;
    let limits = &app.config.limits;
    let metrics = &app.metrics;
    let _live = LiveSession::open(metrics);
    let opened = std::time::Instant::now();
    let leeway = app.verifier.leeway_secs();
    tracing::debug!("session open");

    let write_timeout = Duration::from_secs(limits.write_timeout_secs);
    let idle = Duration::from_secs(limits.idle_timeout_secs);
    let dead_peer = Duration::from_secs(limits.dead_peer_secs);
    let mut last_heard = Instant::now();
    let ping_every = Duration::from_secs(limits.ping_interval_secs.max(1));
    let mut ping = tokio::time::interval_at(Instant::now() + ping_every, ping_every);
    let mut rate = RateLimit::new(limits.client_messages_per_sec, limits.client_message_burst);
    // Timers are built once and polled in every turn of the loop: a timer made inside
    // `select!` would enter the timer wheel and leave it again for every event. Activity only
    // moves `last_active`; the idle timer catches up when it fires. Shutdown and overflow
    // come through the mailbox, so an event costs no lock here.
    let expiry = sleep_until(expiry_instant(token_exp, leeway));
    let mut last_active = Instant::now();
    let idle_timer = sleep_until(last_active + idle);
    tokio::pin!(expiry, idle_timer);

    let end = 'session: {
        // Events queued since registration wait until `init` has run.
        match instance.init(&ctx) {
            Ok(frames) => {
                if let Err(end) = write(&mut socket, frames, write_timeout, &app).await {
                    break 'session end;
                }
            }
            Err(fault) => break 'session End::Fault(fault),
        }
        // Reads that were passed over in favour of queued events (see `read` below).
        let mut reads_skipped = 0u32;
        loop {
            // Polling the socket costs a trip through tungstenite even when nothing came in;
            // while events are already queued (the usual reason this task woke) the socket
            // waits, a few turns at most, so a stream of events cannot starve the client.
            let read = !mailbox.is_ready() || reads_skipped >= READS_SKIPPED_MAX;
            reads_skipped = if read { 0 } else { reads_skipped + 1 };
            let produced = tokio::select! {
                biased;
                () = &mut expiry => break End::TokenExpired,
                () = &mut idle_timer => {
                    let deadline = last_active + idle;
                    if deadline <= Instant::now() {
                        break End::Idle;
                    }
                    idle_timer.as_mut().reset(deadline);
                    continue;
                }
                _ = ping.tick() => {
                    if last_heard.elapsed() > dead_peer {
                        break End::DeadPeer;
                    }
                    match timeout(write_timeout, socket.send(Message::Ping(Default::default()))).await {
                        Ok(Ok(())) => continue,
                        Ok(Err(_)) => break End::Transport,
                        Err(_) => break End::SlowClient,
                    }
                }
                msg = socket.recv(), if read => {
                    last_heard = Instant::now();
                    let frame = match msg {
                        None | Some(Ok(Message::Close(_))) => break End::Client,
                        Some(Ok(Message::Text(text))) => {
                            if let Some(refresh) = Refresh::parse(text.as_str()) {
                                match refresh.apply(&app, &ctx, &identity) {
                                    Refreshed::Renewed(exp, reply) => {
                                        expiry.as_mut().reset(expiry_instant(exp, leeway));
                                        Ok(vec![reply])
                                    }
                                    Refreshed::Refused(reply) => Ok(vec![reply]),
                                    Refreshed::ForeignUser => break End::ForeignRefresh,
                                }
                            } else {
                                Err(Frame::Text(text.as_str().to_owned()))
                            }
                        }
                        Some(Ok(Message::Binary(bytes))) => Err(Frame::Binary(bytes.to_vec())),
                        // Control frames cost a wake-up too: they count against the rate.
                        Some(Ok(Message::Ping(_) | Message::Pong(_))) => {
                            if !rate.allow() {
                                break End::RateLimited;
                            }
                            continue;
                        }
                        Some(Err(err)) => break classify(err),
                    };
                    if !rate.allow() {
                        break End::RateLimited;
                    }
                    last_active = last_heard;
                    metrics.frames_received.inc();
                    match frame {
                        // Handled by the gateway itself.
                        Ok(reply) => Ok(reply),
                        Err(frame) => instance.on_client_message(&frame),
                    }
                }
                event = mailbox.recv() => match event {
                    Ok(event) => {
                        last_active = Instant::now();
                        deliver(&mut instance, event, &mut mailbox, &app)
                    }
                    Err(Closed::Overflow) => break End::SlowClient,
                    Err(Closed::Shutdown) => break End::Shutdown,
                },
            };
            match produced {
                Ok(frames) => {
                    if let Err(end) = write(&mut socket, frames, write_timeout, &app).await {
                        break end;
                    }
                }
                Err(fault) => break End::Fault(fault),
            }
        }
    };
    // Stop routing before the goodbye: nothing more is queued for this session.
    drop(mailbox);

    if let End::Fault(fault) = end {
        metrics.guest_fault(fault.as_str());
        tracing::warn!(
            target: "audit",
            conn = %ctx.connection_id,
            user = %ctx.user_id,
            fault = fault.as_str(),
            "guest fault: connection closed"
        );
    } else if instance.fault().is_none() {
        // A faulted instance is never entered again; a healthy one gets its goodbye.
        if let Ok(frames) = instance.on_close(end.guest_reason())
            && end.close_frame().is_some()
            && end != End::SlowClient
        {
            let _ = write(&mut socket, frames, write_timeout, &app).await;
        }
    }
    drop(instance); // frees the connection's linear memory now, not when the socket closes

    match end.close_frame() {
        Some((code, reason)) => {
            let close = Message::Close(Some(CloseFrame {
                code,
                reason: reason.into(),
            }));
            let _ = timeout(write_timeout, socket.send(close)).await;
        }
        // Flushes the reply to a client's Close, if tungstenite queued one.
        None => {
            let _ = timeout(write_timeout, socket.flush()).await;
        }
    }
    metrics.session_closed(end.label());
    metrics.sessions_ended.inc();
    metrics
        .session_lifetime_seconds
        .inc_by(opened.elapsed().as_secs_f64());
    tracing::debug!(reason = end.label(), "session closed");
}

/// Counts a session as live for exactly as long as it exists: decremented on drop, so even
/// a session task that ends abnormally leaves the gauge right.
struct LiveSession<'a>(&'a crate::metrics::Metrics);

impl<'a> LiveSession<'a> {
    fn open(metrics: &'a crate::metrics::Metrics) -> Self {
        metrics.sessions_live.inc();
        LiveSession(metrics)
    }
}

impl Drop for LiveSession<'_> {
    fn drop(&mut self) {
        self.0.sessions_live.dec();
    }
}

/// Longest a timer is set ahead. A token's `exp` is the signer's input: any `u64` must give
/// an instant, never an overflow (a century is "never" for a connection).
const FAR_FUTURE: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

/// When a token with this `exp` stops being valid: `exp + leeway`, the same rule that
/// admitted it (verification allows the leeway), so a token admitted inside the leeway is
/// not closed the moment its session starts.
fn expiry_instant(exp: u64, leeway: u64) -> Instant {
    let left = exp.saturating_add(leeway).saturating_sub(now_secs());
    far_ahead(Duration::from_secs(left))
}

/// `now + d`, clamped to [`FAR_FUTURE`].
fn far_ahead(d: Duration) -> Instant {
    let now = Instant::now();
    now.checked_add(d.min(FAR_FUTURE))
        .unwrap_or(now + FAR_FUTURE)
}

/// Token bucket over client messages.
struct RateLimit {
    per_sec: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl RateLimit {
    fn new(per_sec: u32, burst: u32) -> Self {
        let burst = f64::from(burst.max(1));
        RateLimit {
            per_sec: f64::from(per_sec),
            burst,
            tokens: burst,
            last: Instant::now(),
        }
    }

    fn allow(&mut self) -> bool {
        let now = Instant::now();
        let refill = now.duration_since(self.last).as_secs_f64() * self.per_sec;
        self.tokens = (self.tokens + refill).min(self.burst);
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// The in-band token refresh, handled by the gateway, never seen by the guest:
/// `{"type":"gateway.refresh","access_token":"<jwt>"}`.
#[derive(serde::Deserialize)]
struct Refresh {
    #[serde(rename = "type")]
    kind: String,
    access_token: String,
}

impl Refresh {
    const TYPE: &'static str = "gateway.refresh";

    fn parse(text: &str) -> Option<Refresh> {
        // Cheap test first: most client frames are for the guest and are not parsed here.
        if text.len() > 16 << 10 || !text.contains(Self::TYPE) {
            return None;
        }
        serde_json::from_str::<Refresh>(text)
            .ok()
            .filter(|r| r.kind == Self::TYPE)
    }

    fn apply(&self, app: &AppState, ctx: &Context, identity: &Identity) -> Refreshed {
        let claims = match app.verifier.verify(&self.access_token) {
            Ok(claims) => claims,
            Err(err) => {
                app.metrics.refusal(err.label());
                tracing::info!(
                    target: "audit",
                    conn = %ctx.connection_id,
                    user = %ctx.user_id,
                    reason = err.label(),
                    "in-band refresh refused"
                );
                let reply = serde_json::json!({
                    "type": "gateway.refresh_failed",
                    "reason": err.to_string(),
                });
                return Refreshed::Refused(Frame::Text(reply.to_string()));
            }
        };
        // The whole identity: the same `sub` in another tenant is someone else.
        if claims.identity() != *identity {
            app.metrics.refusal("foreign_refresh");
            tracing::warn!(
                target: "audit",
                conn = %ctx.connection_id,
                user = %ctx.user_id,
                "refresh with a token for another user: connection closed"
            );
            return Refreshed::ForeignUser;
        }
        let reply = serde_json::json!({"type": "gateway.refreshed", "expires_at": claims.exp});
        Refreshed::Renewed(claims.exp, Frame::Text(reply.to_string()))
    }
}

enum Refreshed {
    /// New expiry, and the frame confirming it.
    Renewed(u64, Frame),
    /// The token was not valid; the connection lives on until its current expiry.
    Refused(Frame),
    /// A token for another user: the connection closes (policy).
    ForeignUser,
}

/// Hands `first` and whatever else is already queued (up to a batch) to the guest.
fn deliver(
    instance: &mut Instance,
    first: Arc<Event>,
    mailbox: &mut Mailbox,
    app: &AppState,
) -> Result<Vec<Frame>, Fault> {
    let mut frames = instance.on_event(&first)?;
    let mut delivered: u64 = 1;
    while delivered < EVENT_BATCH {
        let Some(event) = mailbox.try_recv() else {
            break;
        };
        frames.extend(instance.on_event(&event)?);
        delivered += 1;
    }
    app.metrics.events_delivered.inc_by(delivered);
    Ok(frames)
}

/// Writes frames with one flush. A client that does not take them within the write timeout
/// is a slow client.
async fn write(
    socket: &mut WebSocket,
    frames: Vec<Frame>,
    limit: Duration,
    app: &AppState,
) -> Result<(), End> {
    if frames.is_empty() {
        return Ok(());
    }
    let count = frames.len() as u64;
    let send = async {
        for frame in frames {
            let msg = match frame {
                Frame::Text(text) => Message::Text(text.into()),
                Frame::Binary(bytes) => Message::Binary(bytes.into()),
            };
            socket.feed(msg).await?;
        }
        socket.flush().await
    };
    match timeout(limit, send).await {
        Ok(Ok(())) => {
            app.metrics.frames_sent.inc_by(count);
            Ok(())
        }
        Ok(Err(_)) => Err(End::Transport),
        Err(_) => Err(End::SlowClient),
    }
}

/// Maps a read error to how the session ends, so that a bad frame gets its specific code.
fn classify(err: axum::Error) -> End {
    use tokio_tungstenite::tungstenite::Error as WsError;
    use tokio_tungstenite::tungstenite::error::CapacityError;
    match err.into_inner().downcast::<WsError>() {
        Ok(err) => match *err {
            WsError::Capacity(CapacityError::MessageTooLong { .. }) => End::TooBig,
            WsError::Utf8(_) => End::InvalidUtf8,
            _ => End::Transport,
        },
        Err(_) => End::Transport,
    }
}

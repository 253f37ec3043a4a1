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
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use futures_util::SinkExt;
use tokio::sync::mpsc;
use tokio::time::{Instant, sleep_until, timeout};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::AppState;
use crate::api::ApiError;
use crate::auth::{AuthError, Claims, now_secs};
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

/// `GET /ws`: the HTTP phase. Nothing is upgraded unless the token is good and the
/// connection has its own instance.
pub async fn connect(
    State(app): State<Arc<AppState>>,
    headers: HeaderMap,
    query: Result<Query<HashMap<String, String>>, QueryRejection>,
    upgrade: WebSocketUpgrade,
) -> Response {
    let token = bearer(&headers).or_else(|| {
        query
            .as_ref()
            .ok()
            .and_then(|Query(q)| q.get("access_token").cloned())
    });
    let claims = match token
        .ok_or(AuthError::Missing)
        .and_then(|t| app.verifier.verify(&t))
    {
        Ok(claims) => claims,
        Err(err) => {
            app.metrics.refusal(err.label());
            tracing::info!(target: "audit", reason = err.label(), "connection refused");
            return ApiError::unauthorized(err).into_response();
        }
    };

    let ctx = context(&claims);
    let instance = match app.sandbox.instantiate(&ctx) {
        Ok(instance) => instance,
        Err(err) => {
            app.metrics.refusal("instantiate");
            tracing::error!(user = %ctx.user_id, error = %format!("{err:#}"), "cannot instantiate guest");
            return ApiError::unavailable("cannot create a handler instance").into_response();
        }
    };

    let limits = &app.config.limits;
    let span = tracing::info_span!("session", conn = %ctx.connection_id, user = %ctx.user_id);
    let tracker = app.sessions.clone();
    upgrade
        .read_buffer_size(limits.read_buffer_bytes)
        .write_buffer_size(limits.write_buffer_bytes)
        .max_write_buffer_size(limits.write_buffer_bytes + limits.max_message_bytes * 2)
        .max_message_size(limits.max_message_bytes)
        .max_frame_size(limits.max_message_bytes)
        .on_upgrade(move |socket| {
            tracker.track_future(run(socket, app, ctx, claims.exp, instance).instrument(span))
        })
}

fn bearer(headers: &HeaderMap) -> Option<String> {
    let value = headers
        .get(axum::http::header::AUTHORIZATION)?
        .to_str()
        .ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim().to_owned())
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
            End::TooBig | End::InvalidUtf8 | End::Transport | End::Fault(_) => CloseReason::Error,
        }
    }
}

/// The socket phase of one connection. Owns the socket, the instance and the event queue.
async fn run(
    mut socket: WebSocket,
    app: Arc<AppState>,
    ctx: Context,
    token_exp: u64,
    mut instance: Instance,
) {
    let limits = &app.config.limits;
    let metrics = &app.metrics;
    metrics.sessions_live.inc();
    let (events_tx, mut events) = mpsc::channel(limits.event_queue);
    let overflow = CancellationToken::new();
    // Registered before `init` so that no event published from here on is missed; they wait
    // in the queue until `init` has run.
    let registration = app.router.register(
        &ctx.user_id,
        ctx.connection_id.as_str().into(),
        events_tx,
        overflow.clone(),
    );
    tracing::debug!("session open");

    let write_timeout = Duration::from_secs(limits.write_timeout_secs);
    let idle = Duration::from_secs(limits.idle_timeout_secs);
    let expiry = Instant::now() + Duration::from_secs(token_exp.saturating_sub(now_secs()));
    let mut idle_deadline = Instant::now() + idle;

    let end = 'session: {
        match instance.init(&ctx) {
            Ok(frames) => {
                if let Err(end) = write(&mut socket, frames, write_timeout, &app).await {
                    break 'session end;
                }
            }
            Err(fault) => break 'session End::Fault(fault),
        }
        loop {
            let produced = tokio::select! {
                biased;
                () = app.shutdown.cancelled() => break End::Shutdown,
                () = overflow.cancelled() => break End::SlowClient,
                () = sleep_until(expiry) => break End::TokenExpired,
                () = sleep_until(idle_deadline) => break End::Idle,
                msg = socket.recv() => {
                    idle_deadline = Instant::now() + idle;
                    let frame = match msg {
                        None | Some(Ok(Message::Close(_))) => break End::Client,
                        Some(Ok(Message::Text(text))) => Frame::Text(text.as_str().to_owned()),
                        Some(Ok(Message::Binary(bytes))) => Frame::Binary(bytes.to_vec()),
                        Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                        Some(Err(err)) => break classify(err),
                    };
                    metrics.frames_received.inc();
                    instance.on_client_message(&frame)
                }
                Some(event) = events.recv() => {
                    idle_deadline = Instant::now() + idle;
                    deliver(&mut instance, event, &mut events, &app)
                }
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
    drop(registration);

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
    metrics.sessions_live.dec();
    tracing::debug!(reason = end.label(), "session closed");
}

/// Hands `first` and whatever else is already queued (up to a batch) to the guest.
fn deliver(
    instance: &mut Instance,
    first: Arc<Event>,
    events: &mut mpsc::Receiver<Arc<Event>>,
    app: &AppState,
) -> Result<Vec<Frame>, Fault> {
    let mut frames = instance.on_event(&first)?;
    let mut delivered: u64 = 1;
    while delivered < EVENT_BATCH {
        let Ok(event) = events.try_recv() else { break };
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

//! The path of one connection, from HTTP request to closed socket.
//!
//! 1. [`connect`] (HTTP phase): check the origin, verify the token, take a node slot,
//!    register with the router (events queue from here on), instantiate the connection's own
//!    guest, then upgrade. Any refusal is an HTTP answer.
//! 2. `run` (socket phase): a `Session` owns the socket, the handler and the event queue.
//!    `Session::serve` calls `init`, replays what a resuming client missed
//!    (`Session::resume`), then serves one source of work at a time: the client
//!    (`Session::on_client`), events (`Session::on_events`, in bounded turns), pings
//!    and timers, until the connection ends.
//! 3. `Session::close`: `on-close`, a close frame with a documented code, and the instance
//!    is dropped with its memory. The router registration goes with it.

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
use crate::metrics::Metrics;
use crate::router::{Closed, Mailbox, Refused};
use crate::sandbox::{CloseReason, Context, Event, Fault, Frame, Handler, Sandbox};

/// Close codes the gateway sends (see the README's table).
pub mod close_code {
    pub const NORMAL: u16 = 1000;
    pub const GOING_AWAY: u16 = 1001;
    /// The client broke the WebSocket protocol (an unmasked frame, a bad opcode, a
    /// fragmented control frame, reserved bits set).
    pub const PROTOCOL: u16 = 1002;
    pub const INVALID_PAYLOAD: u16 = 1007;
    pub const POLICY: u16 = 1008;
    pub const TOO_BIG: u16 = 1009;
    pub const GUEST_FAULT: u16 = 1011;
    /// Cluster mode: the event log (NATS JetStream) did not answer in time; reconnect with
    /// `since` shortly.
    pub const TRY_AGAIN_LATER: u16 = 1013;
    pub const SLOW_CLIENT: u16 = 4000;
    /// An operator closed the session (`POST /v1/disconnect`): do not reconnect with the
    /// same token.
    pub const DISCONNECTED: u16 = 4001;
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
    /// `?since=<seq>`: resume after this position before going live.
    since: Option<u64>,
    handler: Box<dyn Handler>,
    /// The guest version that made `handler`: a hibernated handler is restored by the same
    /// one, even after a reload.
    sandbox: Arc<Sandbox>,
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
    /// An operator closed it (`POST /v1/disconnect`).
    Disconnected,
    /// Cluster mode: the event log did not answer (a feed or a resume).
    LogUnavailable,
    TooBig,
    InvalidUtf8,
    /// The client broke the WebSocket protocol.
    Protocol,
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
            End::Disconnected => "disconnected",
            End::LogUnavailable => "event_log_unavailable",
            End::TooBig => "message_too_big",
            End::InvalidUtf8 => "invalid_utf8",
            End::Protocol => "protocol_error",
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
            End::Shutdown => (
                GOING_AWAY,
                "gateway shutting down; resume with since".into(),
            ),
            End::SlowClient => (SLOW_CLIENT, "slow client".into()),
            End::DeadPeer => (GOING_AWAY, "no answer to pings".into()),
            End::RateLimited => (POLICY, "message rate exceeded".into()),
            End::ForeignRefresh => (POLICY, "refresh token is for another user".into()),
            End::Disconnected => (DISCONNECTED, "disconnected".into()),
            End::LogUnavailable => (
                TRY_AGAIN_LATER,
                "event log unavailable; reconnect with since".into(),
            ),
            End::TooBig => (TOO_BIG, "message too big".into()),
            End::InvalidUtf8 => (INVALID_PAYLOAD, "invalid UTF-8 in text frame".into()),
            End::Protocol => (PROTOCOL, "websocket protocol error".into()),
            End::Fault(f) if f.is_policy() => (POLICY, format!("policy violation: {}", f.as_str())),
            End::Fault(f) => (GUEST_FAULT, format!("guest fault: {}", f.as_str())),
        })
    }

    fn guest_reason(self) -> CloseReason {
        match self {
            End::Client => CloseReason::Client,
            End::Idle => CloseReason::Idle,
            // Its credentials no longer hold, as at expiry (the world has no other word).
            End::TokenExpired | End::Disconnected => CloseReason::TokenExpired,
            End::Shutdown | End::LogUnavailable => CloseReason::Shutdown,
            End::SlowClient => CloseReason::SlowClient,
            End::DeadPeer => CloseReason::Client,
            End::RateLimited
            | End::ForeignRefresh
            | End::TooBig
            | End::InvalidUtf8
            | End::Protocol
            | End::Transport
            | End::Fault(_) => CloseReason::Error,
        }
    }
}

/// The socket phase of one connection: the session owns the socket, the handler and the
/// event queue until the connection ends.
async fn run(socket: WebSocket, app: Arc<AppState>, admitted: Admitted) {
    let Admitted {
        ctx,
        identity,
        token_exp,
        since,
        handler,
        sandbox,
        mailbox,
        _permit,
    } = admitted;
    let metrics = app.metrics.clone();
    let _live = LiveSession::open(&metrics);
    let opened = std::time::Instant::now();
    tracing::debug!("session open");
    let limits = &app.config.limits;
    let mut session = Session {
        rate: RateLimit::new(limits.client_messages_per_sec, limits.client_message_burst),
        write_timeout: Duration::from_secs(limits.write_timeout_secs),
        turn_bytes: limits.write_buffer_bytes.max(1),
        turn_time: Duration::from_millis(limits.guest_call_ms.max(1)),
        last_heard: Instant::now(),
        last_active: Instant::now(),
        reads_skipped: 0,
        replayed_up_to: 0,
        socket,
        guest: Guest::Live(handler),
        sandbox,
        woke: false,
        mailbox,
        ctx,
        identity,
        app: app.clone(),
    };
    let end = session.serve(token_exp, since).await;
    // Boxed: the way out is the largest state this task has (its writes under timeouts),
    // and an unboxed one would size every connection's task for it, hibernated or not.
    Box::pin(session.close(end)).await;
    metrics.session_closed(end.label());
    metrics.sessions_ended.inc();
    metrics
        .session_lifetime_seconds
        .inc_by(opened.elapsed().as_secs_f64());
    tracing::debug!(reason = end.label(), "session closed");
}

/// One live connection: its socket, its own handler, its event queue.
struct Session {
    app: Arc<AppState>,
    socket: WebSocket,
    guest: Guest,
    /// What restores the handler after hibernation (see [`Admitted::sandbox`]).
    sandbox: Arc<Sandbox>,
    /// Set when a hibernated handler was woken, so that the hibernation timer restarts.
    woke: bool,
    mailbox: Mailbox,
    ctx: Context,
    /// Who this connection is; an in-band refresh must name the same identity.
    identity: Identity,
    rate: RateLimit,
    write_timeout: Duration,
    /// A turn hands events to the guest until their frames reach this many bytes...
    turn_bytes: usize,
    /// ...or the guest has had this much time, whichever comes first; the rest wait for
    /// the next turn, after other tasks had theirs.
    turn_time: Duration,
    /// Anything received, pongs included: what the dead-peer check looks at.
    last_heard: Instant,
    /// Frames either way: what the idle timeout looks at.
    last_active: Instant,
    /// Reads passed over in favour of queued events (see `Session::serve`).
    reads_skipped: u32,
    /// After a resume, the last `seq` replayed: live events up to it were queued while the
    /// replay ran and are already delivered.
    replayed_up_to: u64,
}

/// What woke the session.
enum Work {
    Expired,
    IdleCheck,
    Ping,
    Client(Option<Result<Message, axum::Error>>),
    Event(Result<Arc<Event>, Closed>),
    Hibernate,
}

/// The connection's handler: a live instance, or hibernated to the bytes its `save` returned
/// while the connection is idle (no instance, no linear memory).
enum Guest {
    Live(Box<dyn Handler>),
    Hibernated(Hibernated),
}

/// A hibernated handler's saved state, counted in the metrics (also under its guest version)
/// for exactly as long as it is kept.
struct Hibernated {
    state: Box<[u8]>,
    metrics: Arc<Metrics>,
    version: prometheus_client::metrics::gauge::Gauge,
}

impl Hibernated {
    fn new(state: Vec<u8>, metrics: Arc<Metrics>, sandbox: &Sandbox) -> Self {
        let version = sandbox.hibernated_gauge();
        metrics.sessions_hibernated.inc();
        metrics.hibernated_bytes.inc_by(state.len() as i64);
        version.inc();
        Hibernated {
            state: state.into_boxed_slice(),
            metrics,
            version,
        }
    }
}

impl Drop for Hibernated {
    fn drop(&mut self) {
        self.metrics.sessions_hibernated.dec();
        self.metrics
            .hibernated_bytes
            .dec_by(self.state.len() as i64);
        self.version.dec();
    }
}

impl Session {
    /// Runs `init`, replays what a resuming client missed, then serves the connection until
    /// it ends; returns why.
    async fn serve(&mut self, token_exp: u64, since: Option<u64>) -> End {
        let limits = &self.app.config.limits;
        let leeway = self.app.verifier.leeway_secs();
        let idle = Duration::from_secs(limits.idle_timeout_secs);
        let dead_peer = Duration::from_secs(limits.dead_peer_secs);
        let ping_every = Duration::from_secs(limits.ping_interval_secs.max(1));
        let mut ping = tokio::time::interval_at(far_ahead(ping_every), ping_every);
        // Timers are built once and polled in every turn: a timer made inside `select!`
        // would enter the timer wheel and leave it again for every event. Activity only
        // moves `last_active`; the idle timer catches up when it fires. Shutdown and
        // overflow come through the mailbox, so an event costs no lock here.
        let expiry = sleep_until(expiry_instant(token_exp, leeway));
        let idle_timer = sleep_until(far_ahead(idle));
        // Never armed for a handler that cannot hibernate (0.1.0 guests, or turned off).
        let hibernate_after = Duration::from_secs(limits.hibernate_after_secs);
        let hibernates = limits.hibernate_after_secs > 0
            && matches!(&self.guest, Guest::Live(h) if h.hibernates());
        let hibernate_timer = sleep_until(far_ahead(if hibernates {
            hibernate_after
        } else {
            FAR_FUTURE
        }));
        tokio::pin!(expiry, idle_timer, hibernate_timer);

        // Cluster mode: the welcome waits until this node receives the identity's events,
        // so every event stored after it reaches the client.
        if let Some(cluster) = self.app.router.cluster()
            && !self.mailbox.feed_ready(cluster.subscribe_timeout).await
        {
            return End::LogUnavailable;
        }
        // Events queued since registration wait until `init` has run.
        let ctx = self.ctx.clone();
        if let Err(end) = self.call(|h| h.init(&ctx)).await {
            return end;
        }
        // Boxed, as `close` is: a resume runs once, and should not size the task for its
        // whole life.
        if let Some(since) = since
            && let Err(end) = Box::pin(self.resume(since)).await
        {
            return end;
        }
        loop {
            // Polling the socket costs a trip through tungstenite even when nothing came
            // in; while events are already queued (the usual reason this task woke) the
            // socket waits, a few turns at most, so a stream of events cannot starve the
            // client.
            let read = !self.mailbox.is_ready() || self.reads_skipped >= READS_SKIPPED_MAX;
            self.reads_skipped = if read { 0 } else { self.reads_skipped + 1 };
            let work = tokio::select! {
                biased;
                () = &mut expiry => Work::Expired,
                () = &mut idle_timer => Work::IdleCheck,
                _ = ping.tick() => Work::Ping,
                msg = self.socket.recv(), if read => Work::Client(msg),
                event = self.mailbox.recv() => Work::Event(event),
                () = &mut hibernate_timer => Work::Hibernate,
            };
            let result = match work {
                Work::Expired => Err(End::TokenExpired),
                Work::IdleCheck => {
                    let deadline = self.last_active + idle;
                    if deadline <= Instant::now() {
                        Err(End::Idle)
                    } else {
                        idle_timer.as_mut().reset(deadline);
                        Ok(())
                    }
                }
                Work::Ping => self.ping(dead_peer).await,
                Work::Client(msg) => match self.on_client(msg).await {
                    Ok(Some(renewed_exp)) => {
                        expiry.as_mut().reset(expiry_instant(renewed_exp, leeway));
                        Ok(())
                    }
                    Ok(None) => Ok(()),
                    Err(end) => Err(end),
                },
                Work::Event(Ok(first)) => self.on_events(first).await,
                Work::Event(Err(Closed::Overflow)) => Err(End::SlowClient),
                Work::Event(Err(Closed::Shutdown)) => Err(End::Shutdown),
                Work::Event(Err(Closed::Disconnected)) => Err(End::Disconnected),
                Work::Event(Err(Closed::Behind)) => Err(End::LogUnavailable),
                Work::Hibernate => {
                    let due = self.last_active + hibernate_after;
                    if due > Instant::now() {
                        hibernate_timer.as_mut().reset(due);
                        Ok(())
                    } else {
                        self.hibernate().map(|hibernated| {
                            // Declined or too large: try again after another idle spell.
                            let next = if hibernated {
                                FAR_FUTURE
                            } else {
                                hibernate_after
                            };
                            hibernate_timer.as_mut().reset(far_ahead(next));
                        })
                    }
                }
            };
            if let Err(end) = result {
                return end;
            }
            if std::mem::take(&mut self.woke) {
                hibernate_timer.as_mut().reset(far_ahead(hibernate_after));
            }
        }
    }

    /// The resume protocol: the host's `gateway.resumed` frame, then every retained event
    /// after `since` through the guest, in order. The session registered with the router
    /// before reading the log, so events published meanwhile wait in its queue; those the
    /// replay already covered are skipped there. Never a partial replay: when the log cannot
    /// prove it holds everything after `since`, nothing is replayed and the frame says why.
    async fn resume(&mut self, since: u64) -> Result<(), End> {
        let replay = match self.app.router.cluster() {
            Some(cluster) => cluster.read(&self.identity, since).await.map_err(|e| {
                tracing::warn!(error = %e, "resume: cannot read the event log");
                End::LogUnavailable
            })?,
            None => self.app.router.log().read(&self.identity, since),
        };
        let metrics = &self.app.metrics;
        metrics.resume(replay.recovered);
        metrics.events_replayed.inc_by(replay.events.len() as u64);
        let resumed = serde_json::json!({
            "type": "gateway.resumed",
            "recovered": replay.recovered,
            "since": since,
            "replayed": replay.events.len(),
            "head": replay.head,
            "earliest": replay.earliest,
            "reason": replay.reason.map(|r| r.as_str()),
        });
        self.write(vec![Frame::Text(resumed.to_string())]).await?;
        if !replay.recovered {
            return Ok(());
        }
        self.replayed_up_to = since;
        // In turns, with the same bounds as live events: a resume storm must not hold the
        // workers any more than a burst of live events does.
        let mut events = replay.events.iter().peekable();
        while events.peek().is_some() {
            let started = Instant::now();
            let (mut frames, mut bytes, mut delivered) = (Vec::new(), 0usize, 0u64);
            while delivered < EVENT_BATCH
                && bytes < self.turn_bytes
                && started.elapsed() < self.turn_time
            {
                let Some(event) = events.next() else { break };
                let more = self.handler()?.on_event(event).map_err(End::Fault)?;
                bytes += more.iter().map(frame_len).sum::<usize>();
                frames.extend(more);
                self.replayed_up_to = event.seq;
                delivered += 1;
            }
            self.app.metrics.events_delivered.inc_by(delivered);
            self.write(frames).await?;
            tokio::task::yield_now().await;
        }
        Ok(())
    }

    /// A ping to the client, unless it has been silent too long already.
    async fn ping(&mut self, dead_peer: Duration) -> Result<(), End> {
        if self.last_heard.elapsed() > dead_peer {
            return Err(End::DeadPeer);
        }
        match timeout(
            self.write_timeout,
            self.socket.send(Message::Ping(Default::default())),
        )
        .await
        {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(End::Transport),
            Err(_) => Err(End::SlowClient),
        }
    }

    /// A message from the client: an in-band refresh (handled here; returns the new
    /// expiry), a control frame, or a frame for the guest.
    async fn on_client(
        &mut self,
        msg: Option<Result<Message, axum::Error>>,
    ) -> Result<Option<u64>, End> {
        self.last_heard = Instant::now();
        let frame = match msg {
            None | Some(Ok(Message::Close(_))) => return Err(End::Client),
            Some(Err(err)) => return Err(classify(err)),
            // Control frames cost a wake-up too: they count against the rate.
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => {
                return if self.rate.allow() {
                    Ok(None)
                } else {
                    Err(End::RateLimited)
                };
            }
            Some(Ok(Message::Text(text))) => match Refresh::parse(text.as_str()) {
                Some(refresh) => {
                    if !self.rate.allow() {
                        return Err(End::RateLimited);
                    }
                    self.count_received();
                    let (renewed, reply) = match refresh.apply(&self.app, &self.ctx, &self.identity)
                    {
                        Refreshed::Renewed(exp, reply) => {
                            // A handler restored after hibernation is given this context:
                            // it must carry the expiry in force, not the first token's.
                            self.ctx.expires_at = exp;
                            (Some(exp), reply)
                        }
                        Refreshed::Refused(reply) => (None, reply),
                        Refreshed::ForeignUser => return Err(End::ForeignRefresh),
                    };
                    self.write(vec![reply]).await?;
                    return Ok(renewed);
                }
                None => Frame::Text(text.as_str().to_owned()),
            },
            Some(Ok(Message::Binary(bytes))) => Frame::Binary(bytes.to_vec()),
        };
        if !self.rate.allow() {
            return Err(End::RateLimited);
        }
        self.count_received();
        self.call(|h| h.on_client_message(&frame)).await?;
        Ok(None)
    }

    fn count_received(&mut self) {
        self.last_active = self.last_heard;
        self.app.metrics.frames_received.inc();
    }

    /// Hands `first` and whatever else is already queued to the guest, in one turn bounded
    /// by count, by the bytes of the frames produced and by the guest's time, then writes
    /// the frames with one flush. A turn cut short yields, so a busy connection cannot keep
    /// a worker from the other sessions.
    async fn on_events(&mut self, first: Arc<Event>) -> Result<(), End> {
        self.last_active = Instant::now();
        let started = Instant::now();
        let mut frames = Vec::new();
        let mut delivered: u64 = 0;
        if first.seq > self.replayed_up_to {
            frames = self.handler()?.on_event(&first).map_err(End::Fault)?;
            delivered = 1;
        }
        let mut bytes: usize = frames.iter().map(frame_len).sum();
        let mut cut = false;
        while delivered < EVENT_BATCH {
            if bytes >= self.turn_bytes || started.elapsed() >= self.turn_time {
                cut = self.mailbox.is_ready();
                break;
            }
            let Some(event) = self.mailbox.try_recv() else {
                break;
            };
            if event.seq <= self.replayed_up_to {
                continue; // delivered by the replay
            }
            match self.handler()?.on_event(&event) {
                Ok(more) => {
                    bytes += more.iter().map(frame_len).sum::<usize>();
                    frames.extend(more);
                    delivered += 1;
                }
                Err(fault) => {
                    self.app.metrics.events_delivered.inc_by(delivered);
                    return Err(End::Fault(fault));
                }
            }
        }
        self.app.metrics.events_delivered.inc_by(delivered);
        self.write(frames).await?;
        if cut {
            self.app.metrics.turns_cut.inc();
            tokio::task::yield_now().await;
        }
        Ok(())
    }

    /// One guest call, then its frames written.
    async fn call(
        &mut self,
        f: impl FnOnce(&mut dyn Handler) -> Result<Vec<Frame>, Fault>,
    ) -> Result<(), End> {
        let frames = f(self.handler()?).map_err(End::Fault)?;
        self.write(frames).await
    }

    /// The live handler, woken first if it hibernated: a fresh instance restored from the
    /// saved bytes, before the frame or event that woke it, so nothing is seen out of order.
    fn handler(&mut self) -> Result<&mut dyn Handler, End> {
        if let Guest::Hibernated(saved) = &self.guest {
            let woken = self
                .sandbox
                .restore(&self.ctx, &saved.state)
                .map_err(End::Fault)?;
            self.app.metrics.wakes.inc();
            self.guest = Guest::Live(woken);
            self.woke = true;
        }
        match &mut self.guest {
            Guest::Live(handler) => Ok(handler.as_mut()),
            Guest::Hibernated(_) => unreachable!("restored above"),
        }
    }

    /// Saves an idle handler and drops its instance; whether it hibernated (a guest may
    /// decline, or save more than the bound: it stays live).
    fn hibernate(&mut self) -> Result<bool, End> {
        let Guest::Live(handler) = &mut self.guest else {
            return Ok(true);
        };
        let metrics = &self.app.metrics;
        match handler.save().map_err(End::Fault)? {
            None => {
                metrics.hibernation("declined");
                Ok(false)
            }
            Some(state) if state.len() > self.app.config.limits.hibernate_state_bytes => {
                metrics.hibernation("too_large");
                Ok(false)
            }
            Some(state) => {
                metrics.hibernation("saved");
                // Dropping the live handler here frees its instance and linear memory.
                let hibernated = Hibernated::new(state, metrics.clone(), &self.sandbox);
                self.guest = Guest::Hibernated(hibernated);
                tracing::trace!("handler hibernated");
                Ok(true)
            }
        }
    }

    async fn write(&mut self, frames: Vec<Frame>) -> Result<(), End> {
        write(
            &mut self.socket,
            frames,
            self.write_timeout,
            &self.app.metrics,
        )
        .await
    }

    /// The way out: stop routing, audit a fault or give a healthy guest its `on-close`,
    /// free the instance, and send the close frame.
    async fn close(self, end: End) {
        let Session {
            app,
            mut socket,
            mut guest,
            mailbox,
            ctx,
            write_timeout,
            ..
        } = self;
        // The operator's reason goes in the close frame (the API bounds it to fit).
        let disconnect_reason = mailbox
            .disconnect_reason()
            .map(|r| format!("disconnected: {r}"));
        // Stop routing before the goodbye: nothing more is queued for this session.
        drop(mailbox);
        if let End::Fault(fault) = end {
            app.metrics.guest_fault(fault.as_str());
            tracing::warn!(
                target: "audit",
                conn = %ctx.connection_id,
                user = %ctx.user_id,
                fault = fault.as_str(),
                "guest fault: connection closed"
            );
        } else if let Guest::Live(handler) = &mut guest
            && handler.fault().is_none()
        {
            // A faulted instance is never entered again; a healthy one gets its goodbye (a
            // hibernated one is not woken for it: see the world's `on-close`).
            if let Ok(frames) = handler.on_close(end.guest_reason())
                && end.close_frame().is_some()
                && end != End::SlowClient
            {
                let _ = write(&mut socket, frames, write_timeout, &app.metrics).await;
            }
        }
        drop(guest); // frees the connection's linear memory now, not at socket close

        match end.close_frame() {
            Some((code, reason)) => {
                let reason = match end {
                    End::Disconnected => disconnect_reason.unwrap_or(reason),
                    _ => reason,
                };
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
    }
}

/// Writes frames with one flush. A client that does not take them within the write timeout
/// is a slow client.
async fn write(
    socket: &mut WebSocket,
    frames: Vec<Frame>,
    limit: Duration,
    metrics: &crate::metrics::Metrics,
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
            metrics.frames_sent.inc_by(count);
            Ok(())
        }
        Ok(Err(_)) => Err(End::Transport),
        Err(_) => Err(End::SlowClient),
    }
}

fn frame_len(frame: &Frame) -> usize {
    match frame {
        Frame::Text(text) => text.len(),
        Frame::Binary(bytes) => bytes.len(),
    }
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
        // A token of another token session (`sid`) would outlive that session's revocation
        // on a connection opened under the revoked one.
        if claims.sid != ctx.session_id {
            app.metrics.refusal("foreign_session");
            tracing::info!(
                target: "audit",
                conn = %ctx.connection_id,
                user = %ctx.user_id,
                reason = "foreign_session",
                "in-band refresh refused"
            );
            let reply = serde_json::json!({
                "type": "gateway.refresh_failed",
                "reason": "the token is for another session (sid) than this connection's",
            });
            return Refreshed::Refused(Frame::Text(reply.to_string()));
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

/// Maps a read error to how the session ends, so that a bad frame gets its specific code.
fn classify(err: axum::Error) -> End {
    use tokio_tungstenite::tungstenite::Error as WsError;
    use tokio_tungstenite::tungstenite::error::{CapacityError, ProtocolError};
    match err.into_inner().downcast::<WsError>() {
        Ok(err) => match *err {
            WsError::Capacity(CapacityError::MessageTooLong { .. }) => End::TooBig,
            WsError::Utf8(_) => End::InvalidUtf8,
            // A peer gone without a close handshake is not a protocol breach.
            WsError::Protocol(ProtocolError::ResetWithoutClosingHandshake) => End::Transport,
            WsError::Protocol(_) => End::Protocol,
            _ => End::Transport,
        },
        Err(_) => End::Transport,
    }
}

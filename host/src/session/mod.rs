//! The path of one connection, from HTTP request to closed socket.
//!
//! 1. [`connect`] (HTTP phase, `admit.rs`): check the origin, verify the token, take a node slot,
//!    register with the router (events queue from here on), instantiate the connection's own
//!    guest, then upgrade. Any refusal is an HTTP answer.
//! 2. `run` (socket phase): a `Session` owns the socket (a WebSocket, or an SSE stream on
//!    `/sse`: `link.rs`), the handler and the event queue.
//!    `Session::start` calls `init` and replays what a resuming client missed
//!    (`Session::resume`); `Session::serve` then serves one source of work at a time: the
//!    client (`Session::on_client`), events (`Session::on_events`, in bounded turns), pings
//!    and timers, until the connection ends. While the handler is hibernated and nothing
//!    is left to do, the session waits in `Session::parked` without serve's state.
//! 3. `Session::close`: `on-close`, a close frame with a documented code (`end.rs`), and the
//!    instance is dropped with its memory. The router registration goes with it.
//!
//! Beside them: the in-band token refresh (`refresh.rs`), the client's calls to the backend
//! (`rpc.rs`) and the client rate limit (`rate.rs`).

use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::Message;
use tokio::time::{Instant, sleep_until, timeout};

use crate::AppState;
use crate::auth::{Identity, now_secs};
use crate::metrics::Metrics;
use crate::router::{Closed, Mailbox};
use crate::sandbox::{Context, Event, Fault, Frame, Handler, Sandbox};
use crate::streams::Rollup;

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

mod admit;
mod end;
mod link;
mod rate;
mod refresh;
mod rpc;

use admit::Admitted;
pub use admit::{connect, connect_sse};
use end::{End, classify};
use link::Link;
use rate::RateLimit;
use refresh::{Refresh, Refreshed};
use rpc::Calls;

/// Most events handed to the guest before the frames they produced are written; batching
/// them saves a flush (a syscall) per event under load.
const EVENT_BATCH: u64 = 64;

/// Turns in a row the session may serve queued events without polling its socket.
const READS_SKIPPED_MAX: u32 = 8;
/// The socket phase of one connection: the session owns the socket, the handler and the
/// event queue until the connection ends. Built here, outside the task's future: a future
/// keeps its arguments for its whole life, beside the session made of them.
fn run(
    link: Link,
    app: Arc<AppState>,
    admitted: Admitted,
) -> impl std::future::Future<Output = ()> + Send + 'static {
    let Admitted {
        ctx,
        identity,
        since,
        frames,
        handler,
        sandbox,
        mailbox,
        _permit: permit,
    } = admitted;
    let live = LiveSession::open(app.metrics.clone(), link.is_sse());
    let limits = &app.config.limits;
    let mut session = Session {
        next_ping: far_ahead(Duration::from_secs(limits.ping_interval_secs.max(1))),
        rate: RateLimit::new(limits.client_messages_per_sec, limits.client_message_burst),
        write_timeout: Duration::from_secs(limits.write_timeout_secs),
        turn_bytes: limits.write_buffer_bytes.max(1),
        turn_time: Duration::from_millis(limits.guest_call_ms.max(1)),
        last_heard: Instant::now(),
        last_active: Instant::now(),
        reads_skipped: 0,
        replayed_up_to: 0,
        rollup: Rollup::default(),
        rollup_after: Duration::from_millis(app.config.streams.rollup_ms),
        rollup_due: None,
        rpc: None,
        link,
        guest: Guest::Live(handler),
        sandbox,
        woke: false,
        mailbox,
        ctx,
        identity,
        app,
    };
    async move {
        // The node-wide connection slot, released when the session ends.
        let _permit = permit;
        let opened = std::time::Instant::now();
        tracing::debug!("session open");
        // The task keeps the session and, while the handler hibernates, only what waits for
        // its next work: what serves it (timers, a turn's futures, the start and the way
        // out) is boxed for as long as it runs. A task's size is fixed when it is spawned,
        // so an unboxed one would cost a hibernated connection as much as a busy one.
        // The start is the session's own work, as its turns are (see `serve`).
        session.mailbox.turn_begins();
        let started = Box::pin(session.start(since, frames)).await;
        session.mailbox.turn_ends();
        let end = match started {
            Err(end) => end,
            Ok(()) => {
                let mut first = None;
                loop {
                    match Box::pin(session.serve(first.take())).await {
                        Step::End(end) => break end,
                        Step::Park => first = Some(session.parked().await),
                    }
                }
            }
        };
        Box::pin(session.close(end)).await;
        let metrics = &live.metrics;
        metrics.session_closed(end.label());
        metrics.sessions_ended.inc();
        metrics
            .session_lifetime_seconds
            .inc_by(opened.elapsed().as_secs_f64());
        tracing::debug!(reason = end.label(), "session closed");
        drop(live);
    }
}

/// One live connection: its socket, its own handler, its event queue.
struct Session {
    app: Arc<AppState>,
    link: Link,
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
    /// When the next ping is due: kept here, not in a timer of `serve`'s, so that waking
    /// and parking again does not put it off.
    next_ping: Instant,
    /// Reads passed over in favour of queued events (see `Session::serve`).
    reads_skipped: u32,
    /// After a resume, the last `seq` replayed: live events up to it were queued while the
    /// replay ran and are already delivered.
    replayed_up_to: u64,
    /// Message appends held back for up to `rollup_after`, to reach the guest joined.
    rollup: Rollup,
    rollup_after: Duration,
    /// When the appends now held are due: set as the first is held, for `serve`'s timer.
    rollup_due: Option<Instant>,
    /// The client's calls to the backend, once it made one.
    rpc: Option<Box<Calls>>,
}

/// What woke the session.
enum Work {
    Expired,
    IdleCheck,
    Ping,
    Client(Option<Result<Message, axum::Error>>),
    Event(Result<Arc<Event>, Closed>),
    Rollup,
    Hibernate,
    Answer(Result<String, tokio::task::JoinError>),
}

/// Why [`Session::serve`] returned.
enum Step {
    End(End),
    /// The handler is hibernated and nothing is left to do: the session waits in
    /// [`Session::parked`] for its next work.
    Park,
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
    /// Runs `init`, hands the guest the frames an SSE client sent in its query, and replays
    /// what a resuming client missed.
    async fn start(&mut self, since: Option<u64>, frames: Vec<String>) -> Result<(), End> {
        // Cluster mode: the welcome waits until this node receives the identity's events,
        // so every event stored after it reaches the client.
        if let Some(cluster) = self.app.router.cluster()
            && !self.mailbox.feed_ready(cluster.subscribe_timeout).await
        {
            return Err(End::LogUnavailable);
        }
        // Events queued since registration wait until `init` has run.
        let ctx = self.ctx.clone();
        self.call(|h| h.init(&ctx)).await?;
        // Before the replay, as a WebSocket client's first frames would be if it could send
        // them before resuming: a subscription then applies to the replayed events too.
        for frame in frames {
            self.on_client(Some(Ok(Message::Text(frame.into()))))
                .await?;
        }
        if let Some(since) = since {
            self.resume(since).await?;
        }
        Ok(())
    }

    /// Serves the connection, beginning with `first` if given, until it ends or its handler
    /// is hibernated with nothing left to do ([`Step::Park`]).
    async fn serve(&mut self, mut first: Option<Work>) -> Step {
        let limits = &self.app.config.limits;
        let leeway = self.app.verifier.leeway_secs();
        let idle = Duration::from_secs(limits.idle_timeout_secs);
        let dead_peer = Duration::from_secs(limits.dead_peer_secs);
        let ping_every = Duration::from_secs(limits.ping_interval_secs.max(1));
        // Timers are built once per call (from the session's state) and polled in every
        // turn: a timer made inside `select!` would enter the timer wheel and leave it
        // again for every event. Activity only moves `last_active`; the idle timer catches
        // up when it fires. Shutdown and overflow come through the mailbox.
        let ping_timer = sleep_until(self.next_ping);
        let expiry = sleep_until(expiry_instant(self.ctx.expires_at, leeway));
        let idle_timer = sleep_until(self.last_active + idle);
        // Never armed for a handler that cannot hibernate (0.1.0 guests, or turned off), nor
        // for one already hibernated (armed again when it wakes).
        let hibernate_after = Duration::from_secs(limits.hibernate_after_secs);
        let hibernate_timer = sleep_until(far_ahead(match &self.guest {
            Guest::Live(h) if limits.hibernate_after_secs > 0 && h.hibernates() => hibernate_after,
            _ => FAR_FUTURE,
        }));
        let rollup_timer = sleep_until(far_ahead(FAR_FUTURE));
        tokio::pin!(
            expiry,
            idle_timer,
            hibernate_timer,
            rollup_timer,
            ping_timer
        );

        loop {
            if first.is_none() && self.parks() {
                return Step::Park;
            }
            let work = if let Some(work) = first.take() {
                work
            } else {
                // Polling the socket costs a trip through tungstenite even when nothing
                // came in; while events are already queued (the usual reason this task
                // woke) the socket waits, a few turns at most, so a stream of events cannot
                // starve the client.
                let read = !self.mailbox.is_ready() || self.reads_skipped >= READS_SKIPPED_MAX;
                self.reads_skipped = if read { 0 } else { self.reads_skipped + 1 };
                tokio::select! {
                biased;
                () = &mut expiry => Work::Expired,
                () = &mut idle_timer => Work::IdleCheck,
                () = &mut ping_timer => Work::Ping,
                () = &mut rollup_timer, if !self.rollup.is_empty() => Work::Rollup,
                // Before events: a call's answer ("stopped") must not wait behind the
                // stream it is about.
                answer = Calls::answered(&mut self.rpc), if Calls::waiting(&self.rpc) => {
                    Work::Answer(answer)
                }
                msg = self.link.recv(), if read => Work::Client(msg),
                event = self.mailbox.recv() => Work::Event(event),
                () = &mut hibernate_timer => Work::Hibernate,
                }
            };
            // Whatever the session does until it waits again is its own work: time its
            // queued events spend behind it is not the node's (see [`crate::pacing`]).
            self.mailbox.turn_begins();
            let mut cut = false;
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
                Work::Ping => {
                    self.next_ping = far_ahead(ping_every);
                    ping_timer.as_mut().reset(self.next_ping);
                    self.ping(dead_peer).await
                }
                Work::Client(msg) => match self.on_client(msg).await {
                    Ok(Some(renewed_exp)) => {
                        expiry.as_mut().reset(expiry_instant(renewed_exp, leeway));
                        Ok(())
                    }
                    Ok(None) => Ok(()),
                    Err(end) => Err(end),
                },
                Work::Event(Ok(first)) => {
                    let turn = self.on_events(first).await;
                    cut = matches!(turn, Ok(true));
                    turn.map(drop)
                }
                Work::Rollup => self.on_rollup().await,
                Work::Answer(answer) => self.on_rpc_answer(answer).await,
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
            self.mailbox.turn_ends();
            // A turn cut short yields, so a busy connection cannot keep a worker from the
            // other sessions; the wait for the worker again is the node's, not this
            // session's work.
            if cut {
                tokio::task::yield_now().await;
            }
            if let Err(end) = result {
                return Step::End(end);
            }
            if let Some(due) = self.rollup_due.take() {
                rollup_timer.as_mut().reset(due);
            }
            if std::mem::take(&mut self.woke) {
                hibernate_timer.as_mut().reset(far_ahead(hibernate_after));
            }
        }
    }

    /// Whether the session can wait without its serving state: the handler hibernated, and
    /// nothing queued, held back or awaited.
    fn parks(&self) -> bool {
        let parks = matches!(self.guest, Guest::Hibernated(_))
            && !self.mailbox.is_ready()
            && self.rollup.is_empty()
            && !Calls::waiting(&self.rpc);
        if parks {
            self.mailbox.shrink(0);
        }
        parks
    }

    /// A parked session's wait for its next work: a client frame, an event, or a timer (the
    /// token's expiry, the idle limit, the next ping), whichever comes first. What it holds
    /// while it waits is what a hibernated connection costs beyond its socket.
    async fn parked(&mut self) -> Work {
        let limits = &self.app.config.limits;
        let expiry = expiry_instant(self.ctx.expires_at, self.app.verifier.leeway_secs());
        let idle = self.last_active + Duration::from_secs(limits.idle_timeout_secs);
        let ping = self.next_ping;
        tokio::select! {
            msg = self.link.recv() => Work::Client(msg),
            event = self.mailbox.recv() => Work::Event(event),
            () = sleep_until(expiry.min(idle).min(ping)) => {
                let now = Instant::now();
                if now >= expiry {
                    Work::Expired
                } else if now >= idle {
                    Work::IdleCheck
                } else {
                    Work::Ping
                }
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

    /// A ping to the client, unless it has been silent too long already. An SSE client
    /// never answers: a vanished one shows as a write error or as a stream nobody reads (a
    /// slow client), so the heartbeat written is all it can be heard by.
    async fn ping(&mut self, dead_peer: Duration) -> Result<(), End> {
        if self.last_heard.elapsed() > dead_peer {
            return Err(End::DeadPeer);
        }
        match timeout(self.write_timeout, self.link.ping()).await {
            Ok(Ok(())) => {
                if self.link.is_sse() {
                    self.last_heard = Instant::now();
                }
                Ok(())
            }
            Ok(Err(_)) => Err(End::Transport),
            Err(_) => Err(End::SlowClient),
        }
    }

    /// A message from the client: an in-band refresh (handled here; returns the new
    /// expiry), a call to the backend (`rpc.rs`), a control frame, or a frame for the guest.
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
                None => match crate::rpc::Request::parse(text.as_str()) {
                    Some(request) => {
                        if !self.rate.allow() {
                            return Err(End::RateLimited);
                        }
                        self.count_received();
                        self.on_rpc(request, text.len()).await?;
                        return Ok(None);
                    }
                    None => Frame::Text(text.as_str().to_owned()),
                },
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
    /// the frames with one flush. True when the turn was cut short, with events left.
    async fn on_events(&mut self, first: Arc<Event>) -> Result<bool, End> {
        self.last_active = Instant::now();
        let started = Instant::now();
        let mut frames = Vec::new();
        let (mut bytes, mut delivered, mut taken) = (0usize, 0u64, 0u64);
        let mut cut = false;
        let mut next = Some(first);
        loop {
            let event = match next.take() {
                Some(event) => event,
                None => {
                    if taken >= EVENT_BATCH
                        || bytes >= self.turn_bytes
                        || started.elapsed() >= self.turn_time
                    {
                        cut = self.mailbox.is_ready();
                        break;
                    }
                    match self.mailbox.try_recv() {
                        Some(event) => event,
                        None => break,
                    }
                }
            };
            taken += 1;
            if event.seq <= self.replayed_up_to {
                continue; // delivered by the replay
            }
            if !self.rollup_after.is_zero() {
                let first_held = self.rollup.is_empty();
                if self.rollup.hold(&event) {
                    if first_held {
                        self.rollup_due = Some(Instant::now() + self.rollup_after);
                    }
                    continue;
                }
            }
            // Anything else goes after the appends held before it, so `seq`s stay in order.
            let mut due = self.take_rollup();
            due.push(event);
            for event in due {
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
        }
        self.app.metrics.events_delivered.inc_by(delivered);
        self.write(frames).await?;
        if cut {
            self.app.metrics.turns_cut.inc();
        }
        Ok(cut)
    }

    /// The appends held back, rolled up: one per message, in `seq` order.
    fn take_rollup(&mut self) -> Vec<Arc<Event>> {
        if self.rollup.is_empty() {
            return Vec::new();
        }
        let (events, folded) = self.rollup.take();
        self.app.metrics.appends_rolled_up.inc_by(folded as u64);
        events
    }

    /// `streams.rollup_ms` after the first append was held: the rolled-up appends go to the
    /// guest and their frames to the client.
    async fn on_rollup(&mut self) -> Result<(), End> {
        let mut frames = Vec::new();
        for event in self.take_rollup() {
            frames.extend(self.handler()?.on_event(&event).map_err(End::Fault)?);
            self.app.metrics.events_delivered.inc();
        }
        self.write(frames).await
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
            &mut self.link,
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
            mut link,
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
                let _ = write(&mut link, frames, write_timeout, &app.metrics).await;
            }
        }
        drop(guest); // frees the connection's linear memory now, not at socket close

        match end.close_frame() {
            Some((code, reason)) => {
                let reason = match end {
                    End::Disconnected => disconnect_reason.unwrap_or(reason),
                    _ => reason,
                };
                let _ = timeout(write_timeout, link.close(code, reason)).await;
            }
            // Flushes the reply to a client's Close, if tungstenite queued one.
            None => {
                let _ = timeout(write_timeout, link.flush()).await;
            }
        }
    }
}
/// Writes frames with one flush. A client that does not take them within the write timeout
/// is a slow client.
async fn write(
    link: &mut Link,
    frames: Vec<Frame>,
    limit: Duration,
    metrics: &crate::metrics::Metrics,
) -> Result<(), End> {
    if frames.is_empty() {
        return Ok(());
    }
    let count = frames.len() as u64;
    match timeout(limit, link.send(frames)).await {
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
struct LiveSession {
    metrics: Arc<Metrics>,
    sse: bool,
}

impl LiveSession {
    fn open(metrics: Arc<Metrics>, sse: bool) -> Self {
        metrics.sessions_live.inc();
        if sse {
            metrics.sse_sessions_live.inc();
        }
        LiveSession { metrics, sse }
    }
}

impl Drop for LiveSession {
    fn drop(&mut self) {
        self.metrics.sessions_live.dec();
        if self.sse {
            self.metrics.sse_sessions_live.dec();
        }
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

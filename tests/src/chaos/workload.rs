//! The workload: clients that behave like `client.js` (connect to a random node, resume with
//! `since=<last seq>` after every close, dedupe by `seq`), publishers that send singles and
//! batches with an `idempotency_key` per event and retry on 503, timeouts and dropped
//! connections with the same keys, and misbehaving clients (message floods, oversize frames).
//! Every task records what it saw; the checker judges it afterwards.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures_util::{SinkExt as _, StreamExt as _};
use gateway::auth::PUBLISH_SCOPE;
use serde::Serialize;
use serde_json::{Value, json};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

use super::topology::Nodes;
use super::{Clock, Identity, Rng};

/// A connect (TCP, upgrade) or a welcome that takes longer counts as failed.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const WELCOME_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a publisher keeps retrying one event before it gives up (left unacknowledged).
pub const PUBLISH_RETRY_FOR: Duration = Duration::from_secs(30);
/// After a client closes, how long it reads what the server still sends before its close.
const CLOSE_DRAIN: Duration = Duration::from_secs(2);

/// What every task shares.
#[derive(Debug)]
pub struct Context {
    pub clock: Clock,
    pub nodes: Arc<Nodes>,
    pub identities: Vec<Identity>,
    pub secret: String,
    pub http: reqwest::Client,
    next_connection: AtomicU64,
    /// Connects that got no upgrade (node down, 503 while NATS is away, timeouts).
    pub failed_connects: AtomicU64,
}

impl Context {
    pub fn new(clock: Clock, nodes: Arc<Nodes>, identities: Vec<Identity>, secret: &str) -> Self {
        Context {
            clock,
            nodes,
            identities,
            secret: secret.into(),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(5))
                .pool_max_idle_per_host(4)
                .build()
                .expect("an HTTP client"),
            next_connection: AtomicU64::new(0),
            failed_connects: AtomicU64::new(0),
        }
    }

    fn user_token(&self, identity: usize) -> String {
        let id = &self.identities[identity];
        let mut claims = crate::claims(&id.user);
        claims.tenant = Some(id.tenant.clone());
        gateway::auth::mint_hs256(&self.secret, &claims).expect("a token")
    }

    fn publisher_token(&self) -> String {
        let mut claims = crate::claims("chaos-publisher");
        claims.scope = Some(PUBLISH_SCOPE.into());
        gateway::auth::mint_hs256(&self.secret, &claims).expect("a token")
    }

    fn node_count(&self) -> u64 {
        self.nodes.ports.len() as u64
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// A well-behaved client's connection.
    Client,
    /// A misbehaving client that floods messages (expects 1008).
    Flood,
    /// A misbehaving client that sends a frame over the size limit (expects 1009).
    Oversize,
    /// A well-behaved client's last resume, after the faults and the publishers stopped.
    CatchUp,
    /// A `since=0` read of an identity's whole history at the end (cluster mode).
    Audit,
}

#[derive(Debug, Clone, Serialize)]
pub struct Delivery {
    pub seq: u64,
    /// The payload's unique event id and the identity it was published to.
    pub id: Option<String>,
    pub who: Option<String>,
    pub t: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Resumed {
    pub recovered: bool,
    pub reason: Option<String>,
    pub head: Option<u64>,
    pub earliest: Option<u64>,
    pub replayed: Option<u64>,
    pub t: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ClosedBy {
    Client,
    Server,
    /// The socket failed or ended without a close frame (1006).
    Transport,
}

/// One WebSocket connection, from its upgrade to its end.
#[derive(Debug, Clone, Serialize)]
pub struct Connection {
    pub id: u64,
    /// The logical client (a chain of resumes) it belongs to, for well-behaved ones.
    pub client: Option<usize>,
    pub role: Role,
    pub identity: usize,
    pub node: usize,
    /// Which start of that node served it.
    pub incarnation: u64,
    pub since: Option<u64>,
    pub t_connect: u64,
    pub t_welcome: Option<u64>,
    pub resumed: Option<Resumed>,
    pub events: Vec<Delivery>,
    /// Event frames without a usable `seq`.
    pub malformed: Vec<String>,
    pub other_frames: u64,
    pub t_close: u64,
    pub close_code: Option<u16>,
    pub close_reason: String,
    pub closed_by: ClosedBy,
}

impl Connection {
    pub fn last_seq(&self) -> Option<u64> {
        self.events.iter().map(|d| d.seq).max()
    }
}

/// When a connection's reading ends.
enum Until {
    /// A live client: at its chosen lifetime, or when the run stops.
    Live {
        at: Instant,
        stop: watch::Receiver<bool>,
    },
    /// A final read: once `want` (the highest acknowledged seq owed) has arrived, and a
    /// moment more to see any duplicate; at `give_up` at the latest.
    Complete { want: Option<u64>, give_up: Instant },
}

#[derive(Clone, Copy)]
enum Misbehave {
    Flood,
    Oversize,
}

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn open(ctx: &Context, identity: usize, node: usize, since: Option<u64>) -> Option<Socket> {
    let port = ctx.nodes.ports[node];
    let url = match since {
        Some(since) => format!("ws://127.0.0.1:{port}/ws?since={since}"),
        None => format!("ws://127.0.0.1:{port}/ws"),
    };
    let mut request = url.into_client_request().ok()?;
    let bearer = format!("Bearer {}", ctx.user_token(identity));
    request
        .headers_mut()
        .insert("authorization", bearer.parse().ok()?);
    match tokio::time::timeout(CONNECT_TIMEOUT, tokio_tungstenite::connect_async(request)).await {
        Ok(Ok((ws, _))) => Some(ws),
        _ => {
            ctx.failed_connects.fetch_add(1, Ordering::Relaxed);
            None
        }
    }
}

/// One connection: open, read the welcome (and `gateway.resumed`), misbehave if asked,
/// read until `until`, record everything. `None` when there was no upgrade.
#[allow(clippy::too_many_arguments)]
async fn connection(
    ctx: &Context,
    role: Role,
    client: Option<usize>,
    identity: usize,
    node: usize,
    since: Option<u64>,
    misbehave: Option<Misbehave>,
    mut until: Until,
) -> Option<Connection> {
    let t_connect = ctx.clock.now();
    let mut ws = open(ctx, identity, node, since).await?;
    let mut record = Connection {
        id: ctx.next_connection.fetch_add(1, Ordering::Relaxed),
        client,
        role,
        identity,
        node,
        incarnation: 0,
        since,
        t_connect,
        t_welcome: None,
        resumed: None,
        events: Vec::new(),
        malformed: Vec::new(),
        other_frames: 0,
        t_close: 0,
        close_code: None,
        close_reason: String::new(),
        closed_by: ClosedBy::Transport,
    };
    let welcome_by = Instant::now() + WELCOME_TIMEOUT;
    // Until the welcome: a close or silence ends it.
    loop {
        let frame = tokio::time::timeout_at(welcome_by, ws.next()).await;
        let Ok(frame) = frame else {
            record.close_reason = "no welcome within the wait".into();
            let _ = ws.close(None).await;
            record.closed_by = ClosedBy::Client;
            record.t_close = ctx.clock.now();
            return Some(record);
        };
        if ended(ctx, &mut record, frame) {
            return Some(record);
        }
        if record.t_welcome.is_some() {
            break;
        }
    }
    record.incarnation = ctx.nodes.incarnation(node);
    if let Some(misbehave) = misbehave {
        misbehave_now(&mut ws, misbehave).await;
    }
    let mut want_seen_at: Option<Instant> = None;
    loop {
        let deadline = match &until {
            Until::Live { at, .. } => *at,
            Until::Complete { want, give_up } => {
                let done = match (want, record.resumed.as_ref()) {
                    // Told it cannot be complete: nothing more is owed.
                    (_, Some(r)) if !r.recovered => true,
                    (None, _) => true,
                    // Live only: nothing more is coming.
                    _ if record.since.is_none() => true,
                    (Some(want), _) => record
                        .last_seq()
                        .max(record.since)
                        .is_some_and(|s| s >= *want),
                };
                if done && want_seen_at.is_none() {
                    want_seen_at = Some(Instant::now());
                }
                match want_seen_at {
                    Some(at) => (at + Duration::from_millis(500)).min(*give_up),
                    None => *give_up,
                }
            }
        };
        let stop = async {
            match &mut until {
                Until::Live { stop, .. } => {
                    let _ = stop.wait_for(|s| *s).await;
                }
                Until::Complete { .. } => std::future::pending().await,
            }
        };
        tokio::select! {
            frame = ws.next() => {
                if ended(ctx, &mut record, Some(frame).flatten()) {
                    return Some(record);
                }
            }
            _ = tokio::time::sleep_until(deadline) => break,
            _ = stop => break,
        }
    }
    // The client closes; what arrives before the server's close still counts.
    record.closed_by = ClosedBy::Client;
    let _ = ws.close(None).await;
    let drain_until = Instant::now() + CLOSE_DRAIN;
    while let Ok(frame) = tokio::time::timeout_at(drain_until, ws.next()).await {
        let before = record.closed_by;
        if ended(ctx, &mut record, frame) {
            record.closed_by = before;
            break;
        }
    }
    record.closed_by = ClosedBy::Client;
    record.t_close = ctx.clock.now();
    Some(record)
}

/// Records one frame; true when the connection ended with it.
fn ended(
    ctx: &Context,
    record: &mut Connection,
    frame: Option<Result<Message, tokio_tungstenite::tungstenite::Error>>,
) -> bool {
    let now = ctx.clock.now();
    match frame {
        Some(Ok(Message::Text(text))) => {
            let value: Value = serde_json::from_str(text.as_str()).unwrap_or(Value::Null);
            match value["type"].as_str() {
                Some("welcome") if record.t_welcome.is_none() => record.t_welcome = Some(now),
                Some("gateway.resumed") => {
                    record.resumed = Some(Resumed {
                        recovered: value["recovered"].as_bool().unwrap_or(false),
                        reason: value["reason"].as_str().map(str::to_string),
                        head: value["head"].as_u64(),
                        earliest: value["earliest"].as_u64(),
                        replayed: value["replayed"].as_u64(),
                        t: now,
                    })
                }
                Some("event") => match value["seq"].as_u64() {
                    Some(seq) => record.events.push(Delivery {
                        seq,
                        id: value["payload"]["id"].as_str().map(str::to_string),
                        who: value["payload"]["who"].as_str().map(str::to_string),
                        t: now,
                    }),
                    None => record
                        .malformed
                        .push(text.as_str().chars().take(300).collect()),
                },
                _ => record.other_frames += 1,
            }
            false
        }
        Some(Ok(Message::Close(frame))) => {
            record.closed_by = ClosedBy::Server;
            if let Some(frame) = frame {
                record.close_code = Some(u16::from(frame.code));
                record.close_reason = frame.reason.to_string();
            }
            record.t_close = now;
            true
        }
        Some(Ok(_)) => false,
        Some(Err(err)) => {
            record.closed_by = ClosedBy::Transport;
            record.close_reason = err.to_string();
            record.t_close = now;
            true
        }
        None => {
            record.closed_by = ClosedBy::Transport;
            record.close_reason = "stream ended".into();
            record.t_close = now;
            true
        }
    }
}

async fn misbehave_now(ws: &mut Socket, how: Misbehave) {
    match how {
        Misbehave::Flood => {
            // Far past the burst (100): the gateway must cut it with 1008.
            for _ in 0..400 {
                if ws.feed(Message::text(r#"{"type":"ping"}"#)).await.is_err() {
                    return;
                }
            }
            let _ = ws.flush().await;
        }
        Misbehave::Oversize => {
            // Over `max_message_bytes` (64 KiB): 1009.
            let big = format!(r#"{{"type":"ping","pad":"{}"}}"#, "x".repeat(100_000));
            let _ = ws.send(Message::text(big)).await;
        }
    }
}

/// What one well-behaved client did: its connections (a chain of resumes) and its position.
#[derive(Debug)]
pub struct ClientOutcome {
    pub client: usize,
    pub identity: usize,
    pub connections: Vec<Connection>,
    pub last_seq: Option<u64>,
    pub ever_open: bool,
}

impl ClientOutcome {
    /// The `since` of its next connection, as client.js computes it: the last seq, or 0
    /// once any connection opened, or none (live only) before that.
    pub fn since(&self) -> Option<u64> {
        self.last_seq.or(self.ever_open.then_some(0))
    }

    fn absorb(&mut self, connection: Connection) {
        if connection.t_welcome.is_some() {
            self.ever_open = true;
        }
        // client.js hands on only events past its last seq: its position only grows.
        if let Some(last) = connection.last_seq() {
            self.last_seq = Some(self.last_seq.map_or(last, |s| s.max(last)));
        }
        self.connections.push(connection);
    }
}

/// A well-behaved client until `stop`: connections of 2 to 12 seconds to random nodes, a
/// resume after every close whatever its code.
pub async fn client(
    ctx: Arc<Context>,
    client: usize,
    identity: usize,
    mut rng: Rng,
    stop: watch::Receiver<bool>,
) -> ClientOutcome {
    let mut outcome = ClientOutcome {
        client,
        identity,
        connections: Vec::new(),
        last_seq: None,
        ever_open: false,
    };
    let mut failures = 0u64;
    while !*stop.borrow() {
        let node = rng.below(ctx.node_count()) as usize;
        let until = Until::Live {
            at: Instant::now() + Duration::from_millis(rng.range(2_000, 12_000)),
            stop: stop.clone(),
        };
        let since = outcome.since();
        match connection(
            &ctx,
            Role::Client,
            Some(client),
            identity,
            node,
            since,
            None,
            until,
        )
        .await
        {
            Some(connection) => {
                failures = 0;
                outcome.absorb(connection);
                tokio::time::sleep(Duration::from_millis(rng.range(20, 200))).await;
            }
            None => {
                failures += 1;
                let backoff = rng.range(50, 250) * failures.min(8);
                tokio::time::sleep(Duration::from_millis(backoff)).await;
            }
        }
    }
    outcome
}

/// The last resume of a client once the run stopped: from its last seq (to a random node,
/// again after any failure) until it holds `want`, or it is told it cannot.
pub async fn catch_up(
    ctx: Arc<Context>,
    outcome: &mut ClientOutcome,
    want: Option<u64>,
    mut rng: Rng,
    give_up: Instant,
) {
    loop {
        let node = rng.below(ctx.node_count()) as usize;
        let since = outcome.since();
        let until = Until::Complete { want, give_up };
        if let Some(connection) = connection(
            &ctx,
            Role::CatchUp,
            Some(outcome.client),
            outcome.identity,
            node,
            since,
            None,
            until,
        )
        .await
        {
            let done = connection.closed_by == ClosedBy::Client;
            outcome.absorb(connection);
            if done {
                return;
            }
        }
        if Instant::now() >= give_up {
            return;
        }
        tokio::time::sleep(Duration::from_millis(rng.range(100, 400))).await;
    }
}

/// A `since=0` read of an identity's whole retained history (cluster mode, at the end).
pub async fn audit(
    ctx: Arc<Context>,
    identity: usize,
    want: Option<u64>,
    mut rng: Rng,
    give_up: Instant,
) -> Vec<Connection> {
    let mut connections = Vec::new();
    loop {
        let node = rng.below(ctx.node_count()) as usize;
        let until = Until::Complete { want, give_up };
        if let Some(connection) = connection(
            &ctx,
            Role::Audit,
            None,
            identity,
            node,
            Some(0),
            None,
            until,
        )
        .await
        {
            let done = connection.closed_by == ClosedBy::Client;
            connections.push(connection);
            if done {
                return connections;
            }
        }
        if Instant::now() >= give_up {
            return connections;
        }
        tokio::time::sleep(Duration::from_millis(rng.range(100, 400))).await;
    }
}

/// Misbehaving clients until `stop`: each connection floods or sends an oversize frame.
pub async fn misbehaving(
    ctx: Arc<Context>,
    mut rng: Rng,
    stop: watch::Receiver<bool>,
) -> Vec<Connection> {
    let mut connections = Vec::new();
    while !*stop.borrow() {
        let identity = rng.below(ctx.identities.len() as u64) as usize;
        let node = rng.below(ctx.node_count()) as usize;
        let (role, how) = if rng.chance(0.5) {
            (Role::Flood, Misbehave::Flood)
        } else {
            (Role::Oversize, Misbehave::Oversize)
        };
        let until = Until::Live {
            at: Instant::now() + Duration::from_secs(10),
            stop: stop.clone(),
        };
        if let Some(connection) =
            connection(&ctx, role, None, identity, node, None, Some(how), until).await
        {
            connections.push(connection);
        }
        tokio::time::sleep(Duration::from_millis(rng.range(500, 2_000))).await;
    }
    connections
}

/// A stored (acknowledged) event, as the publisher learnt it.
#[derive(Debug, Clone, Serialize)]
pub struct Ack {
    pub seq: u64,
    pub t: u64,
    pub node: usize,
    pub incarnation: u64,
    pub duplicate: bool,
}

/// One event a publisher tried to publish, with every attempt's outcome.
#[derive(Debug, Clone, Serialize)]
pub struct Publication {
    /// Unique in the run; also its `idempotency_key` and the payload's `id`.
    pub id: String,
    pub identity: usize,
    pub batch: bool,
    /// When it was first sent: an event owed to a connection whose welcome came before.
    pub t_first: u64,
    pub attempts: u32,
    pub ack: Option<Ack>,
    /// The last few failed attempts.
    pub errors: Vec<String>,
}

/// A publisher until `stop`: `rate` events per second, singles and batches of 2 to 10, each
/// event retried with its key until acknowledged or [`PUBLISH_RETRY_FOR`] passed.
pub async fn publisher(
    ctx: Arc<Context>,
    index: usize,
    rate: f64,
    mut rng: Rng,
    stop: watch::Receiver<bool>,
) -> Vec<Publication> {
    let mut publications = Vec::new();
    let token = ctx.publisher_token();
    let mut n = 0u64;
    while !*stop.borrow() {
        let started = Instant::now();
        let count = if rng.chance(0.3) { rng.range(2, 10) } else { 1 } as usize;
        let batch = count > 1;
        let first = publications.len();
        for _ in 0..count {
            let identity = rng.below(ctx.identities.len() as u64) as usize;
            publications.push(Publication {
                id: format!("p{index}-{n}"),
                identity,
                batch,
                t_first: 0,
                attempts: 0,
                ack: None,
                errors: Vec::new(),
            });
            n += 1;
        }
        publish(&ctx, &token, &mut publications[first..], &mut rng).await;
        let pace = Duration::from_secs_f64(count as f64 / rate.max(0.001));
        tokio::time::sleep_until(started + pace).await;
    }
    publications
}

fn body(ctx: &Context, publication: &Publication, n: usize) -> Value {
    let identity = &ctx.identities[publication.identity];
    json!({
        "user_id": identity.user,
        "tenant_id": identity.tenant,
        "kind": "agent_thinking",
        "run_id": format!("r{n}"),
        "idempotency_key": publication.id,
        "payload": {"who": identity.label(), "id": publication.id, "text": "thinking"},
    })
}

/// Sends these events (one request, a batch when more than one) until each is acknowledged.
async fn publish(ctx: &Context, token: &str, events: &mut [Publication], rng: &mut Rng) {
    let t_first = ctx.clock.now();
    let give_up = Instant::now() + PUBLISH_RETRY_FOR;
    for publication in events.iter_mut() {
        publication.t_first = t_first;
    }
    let batch = events.len() > 1;
    loop {
        let open: Vec<usize> = (0..events.len())
            .filter(|&i| events[i].ack.is_none())
            .collect();
        if open.is_empty() || Instant::now() >= give_up {
            return;
        }
        let node = rng.below(ctx.node_count()) as usize;
        let port = ctx.nodes.ports[node];
        let (url, payload) = if batch {
            let bodies: Vec<Value> = open.iter().map(|&i| body(ctx, &events[i], i)).collect();
            (
                format!("http://127.0.0.1:{port}/v1/publish/batch"),
                json!({ "events": bodies }),
            )
        } else {
            (
                format!("http://127.0.0.1:{port}/v1/publish"),
                body(ctx, &events[0], 0),
            )
        };
        for &i in &open {
            events[i].attempts += 1;
        }
        let answer = ctx
            .http
            .post(url)
            .bearer_auth(token)
            .json(&payload)
            .send()
            .await;
        let outcome = match answer {
            Ok(response) => {
                let status = response.status().as_u16();
                let text = response.text().await.unwrap_or_default();
                let value: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
                Ok((status, value, text))
            }
            Err(err) => Err(format!("{err}")),
        };
        let t = ctx.clock.now();
        let incarnation = ctx.nodes.incarnation(node);
        let mut fatal = false;
        let error = match outcome {
            Ok((200, value, _)) | Ok((503, value, _)) if !batch || value["results"].is_array() => {
                let receipts: Vec<&Value> = if batch {
                    value["results"].as_array().unwrap().iter().collect()
                } else {
                    vec![&value]
                };
                for (&i, receipt) in open.iter().zip(receipts) {
                    if let Some(seq) = receipt["seq"].as_u64() {
                        events[i].ack = Some(Ack {
                            seq,
                            t,
                            node,
                            incarnation,
                            duplicate: receipt["duplicate"].as_bool().unwrap_or(false),
                        });
                    }
                }
                format!(
                    "node {node}: {}",
                    value["reason"].as_str().unwrap_or("refused")
                )
            }
            Ok((status, _, text)) => {
                // 429/503/408 and the like are worth another try; other 4xx are our bug
                // or the gateway's, and retrying would not change them.
                fatal = (400..500).contains(&status) && ![408, 429].contains(&status);
                format!(
                    "node {node}: {status} {}",
                    text.chars().take(200).collect::<String>()
                )
            }
            Err(err) => format!("node {node}: {err}"),
        };
        for &i in &open {
            if events[i].ack.is_none() {
                let errors = &mut events[i].errors;
                if errors.len() >= 3 {
                    errors.remove(0);
                }
                errors.push(error.clone());
            }
        }
        if fatal {
            return;
        }
        if events.iter().any(|e| e.ack.is_none()) {
            tokio::time::sleep(Duration::from_millis(rng.range(100, 600))).await;
        }
    }
}

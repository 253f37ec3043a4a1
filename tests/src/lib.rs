//! Test harness: the real gateway (the `gateway` library's `serve`) on port 0, real guest
//! components built from source by `build.rs`, and clients over real sockets.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, bail};
use futures_util::{SinkExt, StreamExt};
use gateway::AppState;
use gateway::auth::{Claims, PUBLISH_SCOPE, mint_hs256, now_secs};
use gateway::config::Config;
use serde_json::Value;
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

pub mod backend;
pub mod browser;
pub mod chaos;
pub mod nats;
pub mod node;
pub mod sse;

/// Paths of the guest components `build.rs` built.
pub mod guests {
    include!(concat!(env!("OUT_DIR"), "/guests.rs"));
}

pub const SECRET: &str = "gateway-tests-secret-0123456789abcdef";

/// How long a test waits for something that should happen promptly.
pub const WAIT: Duration = Duration::from_secs(10);

/// How often a wait looks again at what it waits for.
const POLL: Duration = Duration::from_millis(20);

/// Waits until `check` holds, looking again every few milliseconds; fails naming `what`
/// if it does not within [`WAIT`]. For conditions no metric or frame announces.
pub async fn wait_until(what: &str, mut check: impl AsyncFnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !check().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: not within {WAIT:?}"
        );
        tokio::time::sleep(POLL).await;
    }
}

/// The value of series `name` (labels as rendered) in a `/metrics` text.
fn metric_value(text: &str, name: &str) -> Option<f64> {
    text.lines().find_map(|line| {
        let (key, value) = line.rsplit_once(' ')?;
        (key == name).then(|| value.parse().unwrap())
    })
}

/// The family a series belongs to, as the gateway registers it (with its prefix): without
/// labels, and without the suffix the text format adds to counters and histograms.
fn metric_family(name: &str) -> &str {
    let base = name.split_once('{').map_or(name, |(base, _)| base);
    ["_total", "_count", "_sum", "_bucket"]
        .iter()
        .find_map(|suffix| base.strip_suffix(suffix))
        .unwrap_or(base)
}

/// "`name` is not in /metrics", with the series that are.
fn missing_metric(text: &str, name: &str) -> String {
    let present: Vec<&str> = text
        .lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| Some(line.rsplit_once(' ')?.0))
        .collect();
    format!(
        "{name} is not in /metrics; there are: {}",
        present.join(", ")
    )
}

pub struct TestGateway {
    pub addr: SocketAddr,
    /// The ops listener (health and metrics only), when started with one.
    pub ops_addr: Option<SocketAddr>,
    pub state: Arc<AppState>,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<std::io::Result<()>>>,
}

pub fn config(guest: &str) -> Config {
    Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        guest: Some(guest.into()),
        jwt_secret: Some(SECRET.into()),
        ..Config::default()
    }
}

impl TestGateway {
    pub async fn start() -> Self {
        Self::start_with(config(guests::REFERENCE)).await
    }

    pub async fn start_with(config: Config) -> Self {
        Self::start_listening(config, false).await
    }

    /// Also opens the ops listener on another port.
    pub async fn start_with_ops(config: Config) -> Self {
        Self::start_listening(config, true).await
    }

    async fn start_listening(config: Config, with_ops: bool) -> Self {
        let listener = tokio::net::TcpListener::bind(config.listen).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let ops = if with_ops {
            Some(tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap())
        } else {
            None
        };
        let ops_addr = ops.as_ref().map(|l| l.local_addr().unwrap());
        let state = AppState::new(config).expect("gateway starts");
        // Cluster mode: joined before the first client can connect.
        state
            .join_cluster()
            .await
            .expect("gateway joins the cluster");
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(gateway::serve_with_ops(
            listener,
            ops,
            state.clone(),
            async move {
                let _ = rx.await;
            },
        ));
        TestGateway {
            addr,
            ops_addr,
            state,
            shutdown: Some(tx),
            task: Some(task),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn ws_url(&self) -> String {
        format!("ws://{}/ws", self.addr)
    }

    pub fn token(&self, user: &str) -> String {
        token(claims(user))
    }

    pub fn publisher_token(&self) -> String {
        let mut c = claims("backend");
        c.scope = Some(PUBLISH_SCOPE.into());
        token(c)
    }

    /// Connects as `user` and reads the welcome frame.
    pub async fn connect(&self, user: &str) -> Client {
        self.connect_with(claims(user)).await
    }

    pub async fn connect_with(&self, claims: Claims) -> Client {
        let mut client = self
            .try_connect(&token(claims))
            .await
            .expect("connect is accepted");
        let welcome = client.next_json().await.expect("welcome frame");
        assert_eq!(welcome["type"], "welcome", "first frame: {welcome}");
        client
    }

    /// Connects with `Authorization: Bearer <token>`.
    pub async fn try_connect(
        &self,
        token: &str,
    ) -> Result<Client, tokio_tungstenite::tungstenite::Error> {
        self.try_connect_with_query(token, "").await
    }

    /// Connects to `/ws?<query>` (e.g. `since=42`) with `Authorization: Bearer <token>`.
    pub async fn try_connect_with_query(
        &self,
        token: &str,
        query: &str,
    ) -> Result<Client, tokio_tungstenite::tungstenite::Error> {
        let url = match query {
            "" => self.ws_url(),
            query => format!("{}?{query}", self.ws_url()),
        };
        let mut request = url.into_client_request()?;
        request
            .headers_mut()
            .insert("authorization", format!("Bearer {token}").parse().unwrap());
        let (ws, _) = tokio_tungstenite::connect_async(request).await?;
        Ok(Client { ws })
    }

    /// Connects `user` with `?since=`: the client, past its `welcome`, and its
    /// `gateway.resumed` frame.
    pub async fn resume(&self, user: &str, since: u64) -> (Client, Value) {
        let mut client = self
            .try_connect_with_query(&token(claims(user)), &format!("since={since}"))
            .await
            .unwrap();
        assert_eq!(client.next_json().await.unwrap()["type"], "welcome");
        let resumed = client.next_json().await.unwrap();
        assert_eq!(resumed["type"], "gateway.resumed", "{resumed}");
        (client, resumed)
    }

    pub async fn publish(&self, token: &str, body: &Value) -> (u16, Value) {
        post(&self.url("/v1/publish"), token, body.to_string()).await
    }

    pub async fn publish_batch(&self, token: &str, events: &[Value]) -> (u16, Value) {
        let body = serde_json::json!({ "events": events });
        post(&self.url("/v1/publish/batch"), token, body.to_string()).await
    }

    /// The `/metrics` text. Read from the ops listener when there is one (the public one may
    /// speak TLS).
    pub async fn metrics_text(&self) -> String {
        let at = self.ops_addr.unwrap_or(self.addr);
        reqwest::get(format!("http://{at}/metrics"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    /// A value from `/metrics`; `name` includes labels as rendered, e.g.
    /// `gateway_sessions_live` or `gateway_guest_faults_total{kind="trap"}`. A series that is
    /// not there fails, naming the series that are: a renamed metric must not read as 0.
    pub async fn metric(&self, name: &str) -> f64 {
        let text = self.metrics_text().await;
        match metric_value(&text, name) {
            Some(value) => value,
            None => panic!("{}", missing_metric(&text, name)),
        }
    }

    /// A labelled series that appears only once it is first counted (a `Family` in the
    /// gateway: `gateway_guest_faults_total{kind="trap"}` before any trap): missing reads as 0.
    /// Only for labelled series (the others are always rendered), and only for a family the
    /// gateway registers (its name is in `host/src/metrics.rs`; an empty family is not
    /// rendered at all), so a renamed family still fails. A renamed label value cannot be
    /// told from one never counted: use this where another test counts the same series.
    pub async fn metric_or_zero(&self, name: &str) -> f64 {
        const REGISTERED: &str = include_str!("../../host/src/metrics.rs");
        let family = metric_family(name);
        let registered = family
            .strip_prefix("gateway_")
            .is_some_and(|short| REGISTERED.contains(&format!("\"{short}\"")));
        assert!(
            name.contains('{') && registered,
            "{name}: metric_or_zero is for labelled series of a registered family"
        );
        let text = self.metrics_text().await;
        metric_value(&text, name).unwrap_or(0.0)
    }

    /// Waits until a metric reaches `want`, or fails with the last value seen.
    pub async fn wait_metric(&self, name: &str, want: f64) {
        if let Err(err) = self.try_wait_metric(name, want).await {
            panic!("{err}");
        }
    }

    /// Waits until a metric reaches `want`; past [`WAIT`], says what it is instead (or that it
    /// is missing, naming those there are). For a test that collects failures rather than
    /// stopping at the first. A series still missing is waited for: a labelled one appears
    /// when first counted. Waiting for 0 on such a series: see [`Self::metric_or_zero`].
    pub async fn try_wait_metric(&self, name: &str, want: f64) -> Result<(), String> {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let text = self.metrics_text().await;
            let value = metric_value(&text, name);
            if value == Some(want) {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(match value {
                    Some(value) => format!("{name} is {value}, expected {want}"),
                    None => format!("{}, expected {want}", missing_metric(&text, name)),
                });
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Publishes a `marker` event to `user` (in `tenant`, if any) and returns its `seq`. A
    /// connection of that identity must then see the marker as its next data frame
    /// ([`Client::expect_event`]): its queue is in order, so anything that should not have
    /// reached it (another identity's event, a duplicate) and was queued before would come
    /// first. A positive proof where a silence window could only say "not yet".
    pub async fn publish_marker(&self, user: &str, tenant: Option<&str>) -> u64 {
        let mut body = serde_json::json!({"user_id": user, "kind": "marker", "payload": {}});
        if let Some(tenant) = tenant {
            body["tenant_id"] = tenant.into();
        }
        let (status, reply) = self.publish(&self.publisher_token(), &body).await;
        assert_eq!(status, 200, "marker for {user}: {reply}");
        reply["seq"].as_u64().expect("a published event has a seq")
    }

    /// The HTTP refusal of a connect with `token`: status and JSON body (`Null` if the body
    /// is not JSON). Fails if the connection is admitted or fails otherwise.
    pub async fn refusal(&self, token: &str) -> (u16, Value) {
        match self.try_connect(token).await {
            Ok(_) => panic!("the connection should have been refused"),
            Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
                let body = response.body().clone().unwrap_or_default();
                (
                    response.status().as_u16(),
                    serde_json::from_slice(&body).unwrap_or(Value::Null),
                )
            }
            Err(other) => panic!("expected an HTTP refusal, got {other}"),
        }
    }

    pub async fn stop(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            task.await.unwrap().unwrap();
        }
    }
}

impl Drop for TestGateway {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

/// A child's stderr as lines on a channel, read by a thread of their own, so that every wait
/// on them can have a bound and the child never blocks on a full pipe.
pub fn log_lines(stderr: std::process::ChildStderr) -> std::sync::mpsc::Receiver<String> {
    let (tx, lines) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in std::io::BufRead::lines(std::io::BufReader::new(stderr)).map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    lines
}

pub fn claims(user: &str) -> Claims {
    Claims {
        sub: user.into(),
        exp: now_secs() + 3600,
        nbf: None,
        iss: None,
        aud: None,
        scope: None,
        tenant: None,
        sid: None,
        iat: Some(now_secs()),
    }
}

pub fn token(claims: Claims) -> String {
    mint_hs256(SECRET, &claims).unwrap()
}

pub async fn post(url: &str, token: &str, body: String) -> (u16, Value) {
    let response = reqwest::Client::new()
        .post(url)
        .bearer_auth(token)
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    let body = response.text().await.unwrap();
    let json = serde_json::from_str(&body).unwrap_or(Value::String(body));
    (status, json)
}

pub struct Client {
    pub ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
}

/// What a client saw when it expected the connection to end.
#[derive(Debug, PartialEq, Eq)]
pub struct Closed {
    pub code: u16,
    pub reason: String,
}

impl Client {
    pub async fn send_json(&mut self, value: &Value) {
        self.send_text(&value.to_string()).await;
    }

    pub async fn send_text(&mut self, text: &str) {
        self.ws.send(Message::text(text)).await.unwrap();
    }

    /// The next text frame as JSON; fails on close, timeout or a non-JSON frame.
    pub async fn next_json(&mut self) -> anyhow::Result<Value> {
        loop {
            let msg = tokio::time::timeout(WAIT, self.ws.next())
                .await
                .context("no frame within the wait")?
                .context("stream ended")??;
            match msg {
                Message::Text(text) => return Ok(serde_json::from_str(text.as_str())?),
                Message::Ping(_) | Message::Pong(_) => continue,
                other => bail!("expected a text frame, got {other:?}"),
            }
        }
    }

    /// Reads until the server closes; returns the close code and reason. Fails on any data
    /// frame before the close: one the test did not expect reached the client. A test that
    /// expects frames first reads them, or uses [`Client::frames_until_close`].
    pub async fn closed(&mut self) -> Closed {
        let (frames, closed) = self.frames_until_close().await;
        assert!(
            frames.is_empty(),
            "frames before the close {closed:?}: {frames:?}"
        );
        closed
    }

    /// Reads until the server closes; returns every data frame before the close (text as
    /// JSON, or as a JSON string when it is not JSON; binary as a string saying so) and the
    /// close code and reason, for the caller to assert exactly what arrived.
    pub async fn frames_until_close(&mut self) -> (Vec<Value>, Closed) {
        let mut frames = Vec::new();
        loop {
            let msg = tokio::time::timeout(WAIT, self.ws.next())
                .await
                .unwrap_or_else(|_| {
                    panic!("connection should close within the wait; frames so far: {frames:?}")
                });
            let closed = match msg {
                Some(Ok(Message::Close(Some(frame)))) => Closed {
                    code: u16::from(frame.code),
                    reason: frame.reason.to_string(),
                },
                Some(Ok(Message::Close(None))) | None => Closed {
                    code: u16::from(CloseCode::Status),
                    reason: String::new(),
                },
                Some(Ok(Message::Text(text))) => {
                    frames.push(
                        serde_json::from_str(text.as_str())
                            .unwrap_or_else(|_| Value::String(text.as_str().to_owned())),
                    );
                    continue;
                }
                Some(Ok(Message::Binary(bytes))) => {
                    frames.push(Value::String(format!(
                        "binary frame of {} bytes",
                        bytes.len()
                    )));
                    continue;
                }
                Some(Ok(_)) => continue,
                Some(Err(err)) => panic!("connection failed instead of closing: {err}"),
            };
            return (frames, closed);
        }
    }

    /// Asserts that for the whole of `quiet` no data frame arrives and the connection stays
    /// open; pings and pongs are not data. Says only "not within this window": where a
    /// silence is the proof of isolation, follow it with a marker
    /// ([`TestGateway::publish_marker`], [`Client::expect_event`]).
    pub async fn expect_silence(&mut self, quiet: Duration) {
        let deadline = tokio::time::Instant::now() + quiet;
        loop {
            match tokio::time::timeout_at(deadline, self.ws.next()).await {
                Err(_) => return,
                Ok(Some(Ok(Message::Ping(_) | Message::Pong(_)))) => continue,
                Ok(Some(Ok(Message::Text(text)))) => panic!("unexpected frame: {text}"),
                Ok(other) => panic!("expected silence, got {other:?}"),
            }
        }
    }

    /// Asserts the next data frame is the event `seq` (e.g. a marker): nothing else came first.
    pub async fn expect_event(&mut self, seq: u64) -> Value {
        let frame = self.next_json().await.expect("an event frame");
        assert_eq!(
            (frame["type"].as_str(), frame["seq"].as_u64()),
            (Some("event"), Some(seq)),
            "expected event {seq} next, got {frame}"
        );
        frame
    }

    pub async fn close(mut self) {
        let _ = self.ws.close(None).await;
        // Drain until the server's close reply so the session has really ended.
        while let Ok(Some(Ok(_))) = tokio::time::timeout(WAIT, self.ws.next()).await {}
    }
}

/// A cluster-mode gateway on a NATS cluster that may still be forming: started once its
/// JetStream answers (within three waits).
pub async fn join_when_ready(cfg: Config) -> TestGateway {
    let deadline = std::time::Instant::now() + WAIT * 3;
    loop {
        let state = gateway::AppState::new(cfg.clone()).unwrap();
        match state.join_cluster().await {
            Ok(()) => return TestGateway::start_with(cfg).await,
            Err(e) => {
                assert!(
                    std::time::Instant::now() < deadline,
                    "no JetStream cluster: {e}"
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}

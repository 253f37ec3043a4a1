//! `streams_bench`: the AI output streams scenario of `make bench`. The same tokens go to
//! the same connections twice, each run against a fresh gateway: once as message appends
//! (rolled up by the gateway), once as plain events (one frame per token). Reports, per run,
//! appends accepted per second, frames and bytes per second at the clients, gateway CPU per
//! append, and the time from publish to receipt of each token (p50, p99); then a resume that
//! gets a 2,000-token message as one snapshot (time, bytes) and the history's bytes for it.
//!
//! Every token is checked: each connection must receive every token of its user's messages
//! exactly once, in order, or the run fails.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use clap::Parser;
use futures_util::StreamExt;
use gateway::auth::PUBLISH_SCOPE;
use gateway_tests::{SECRET, claims, token};
use hdrhistogram::Histogram;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

#[derive(Parser, Debug)]
struct Args {
    /// The gateway binary.
    #[arg(long, default_value = "target/release/gateway")]
    gateway: PathBuf,
    /// The guest component (default: the reference guest these tests built).
    #[arg(long, default_value = gateway_tests::guests::REFERENCE)]
    guest: PathBuf,
    #[arg(long, default_value_t = 18391)]
    port: u16,
    /// Connections in all, spread evenly over the users.
    #[arg(long, default_value_t = 2000)]
    connections: usize,
    /// Users, each streaming one message at a time.
    #[arg(long, default_value_t = 400)]
    users: usize,
    /// Appends per second per message.
    #[arg(long, default_value_t = 20)]
    rate: u64,
    /// Seconds of publishing per run.
    #[arg(long, default_value_t = 10)]
    secs: u64,
    /// Tokens in the message a resume gets as one snapshot.
    #[arg(long, default_value_t = 2000)]
    snapshot_tokens: usize,
    /// Write the JSON report here too.
    #[arg(long)]
    report: Option<PathBuf>,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Mode {
    Messages,
    Events,
}

/// What the clients saw.
#[derive(Default)]
struct Seen {
    frames: AtomicU64,
    bytes: AtomicU64,
    tokens: AtomicU64,
    /// Tokens out of order or twice (must stay 0).
    disorder: AtomicU64,
}

struct Gateway {
    child: Child,
    base: String,
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Gateway {
    async fn start(args: &Args) -> anyhow::Result<Gateway> {
        let child = Command::new(&args.gateway)
            .args(["serve", "--guest"])
            .arg(&args.guest)
            .env("GATEWAY_LISTEN", format!("127.0.0.1:{}", args.port))
            .env("GATEWAY_JWT_SECRET", SECRET)
            .env("GATEWAY_LIMITS__MAX_CONNECTIONS_PER_USER", "100")
            .env("GATEWAY_LIMITS__MAX_BATCH_EVENTS", "10000")
            .env("GATEWAY_HISTORY__MAX_REPLAY_EVENTS", "10000")
            .env("GATEWAY_HISTORY__MAX_EVENTS_PER_USER", "10000")
            .env("GATEWAY_STREAMS__MAX_APPENDS_PER_MESSAGE", "100000")
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        let gateway = Gateway {
            child,
            base: format!("127.0.0.1:{}", args.port),
        };
        let http = reqwest::Client::new();
        for _ in 0..500 {
            if http
                .get(format!("http://{}/healthz", gateway.base))
                .send()
                .await
                .is_ok()
            {
                return Ok(gateway);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        anyhow::bail!("the gateway did not answer /healthz")
    }

    /// User and system CPU seconds the gateway has used.
    fn cpu_secs(&self) -> f64 {
        let stat =
            std::fs::read_to_string(format!("/proc/{}/stat", self.child.id())).unwrap_or_default();
        let after = stat.rsplit(')').next().unwrap_or("");
        let fields: Vec<&str> = after.split_whitespace().collect();
        let ticks = |i: usize| {
            fields
                .get(i)
                .and_then(|f| f.parse::<f64>().ok())
                .unwrap_or(0.0)
        };
        // utime and stime are fields 14 and 15 of the line: 12 and 13 after the name.
        (ticks(11) + ticks(12)) / 100.0
    }

    async fn metric(&self, name: &str) -> f64 {
        let text = reqwest::get(format!("http://{}/metrics", self.base))
            .await
            .expect("metrics")
            .text()
            .await
            .expect("metrics text");
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or(f64::NAN)
    }

    async fn publish(&self, http: &reqwest::Client, publisher: &str, events: Vec<Value>) -> Value {
        let response = http
            .post(format!("http://{}/v1/publish/batch", self.base))
            .bearer_auth(publisher)
            .json(&json!({ "events": events }))
            .send()
            .await
            .expect("publish");
        let status = response.status();
        let body: Value = response.json().await.unwrap_or(Value::Null);
        assert!(status.is_success(), "publish answered {status}: {body}");
        body
    }
}

fn publisher_token() -> String {
    let mut c = claims("bench-publisher");
    c.scope = Some(PUBLISH_SCOPE.into());
    token(c)
}

/// Microseconds since `start`, the token's text: what its receiver subtracts from its own
/// clock.
fn stamp(start: Instant) -> u64 {
    start.elapsed().as_micros() as u64
}

/// One connection: reads frames, checks that tokens (`<n>:<micros> `) of its user arrive in
/// order and once, and records their latency.
async fn reader(
    url: String,
    mode: Mode,
    start: Instant,
    seen: Arc<Seen>,
    latency: Arc<std::sync::Mutex<Histogram<u64>>>,
    ready: Arc<AtomicU64>,
    handshakes: Arc<tokio::sync::Semaphore>,
) {
    // Handshakes in flight are bounded: the gateway bounds connections per address before
    // their upgrade (limits.max_http_connections_per_address).
    let permit = handshakes.acquire_owned().await.expect("open semaphore");
    let mut ws = loop {
        match tokio_tungstenite::connect_async(url.as_str()).await {
            Ok((ws, _)) => break ws,
            Err(e) => {
                eprintln!("streams_bench: connect failed ({e}); again");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    drop(permit);
    // One histogram for every reader, sized up front: one per reader (10,000 of them) grew
    // as latencies did, and zeroing their new counts took most of this process's CPU.
    let mut next_token: HashMap<String, u64> = HashMap::new();
    ready.fetch_add(1, Ordering::Relaxed);
    while let Some(Ok(msg)) = ws.next().await {
        let Message::Text(text) = msg else { continue };
        seen.frames.fetch_add(1, Ordering::Relaxed);
        seen.bytes.fetch_add(text.len() as u64, Ordering::Relaxed);
        let frame: Value = serde_json::from_str(text.as_str()).unwrap_or(Value::Null);
        let (message, tokens) = match (mode, frame["type"].as_str()) {
            (Mode::Messages, Some("message")) => (
                frame["message_id"].as_str().unwrap_or("").to_owned(),
                frame["text"].as_str().unwrap_or("").to_owned(),
            ),
            (Mode::Events, Some("event")) if frame["kind"] == "token" => (
                frame["payload"]["m"].as_str().unwrap_or("").to_owned(),
                frame["payload"]["t"].as_str().unwrap_or("").to_owned(),
            ),
            (_, Some("event")) if frame["kind"] == "bench.done" => break,
            _ => continue,
        };
        let now = stamp(start);
        let expected = next_token.entry(message).or_insert(0);
        let mut local = latency.lock().unwrap_or_else(|e| e.into_inner());
        for token in tokens.split_whitespace() {
            let Some((n, at)) = token.split_once(':') else {
                continue;
            };
            let (n, at): (u64, u64) = (n.parse().unwrap_or(u64::MAX), at.parse().unwrap_or(0));
            if n != *expected {
                seen.disorder.fetch_add(1, Ordering::Relaxed);
            }
            *expected = n + 1;
            seen.tokens.fetch_add(1, Ordering::Relaxed);
            let _ = local.record(now.saturating_sub(at).max(1));
        }
    }
}

struct RunResult {
    json: Value,
}

async fn run(args: &Args, mode: Mode) -> anyhow::Result<RunResult> {
    let gateway = Gateway::start(args).await?;
    let publisher = publisher_token();
    let http = reqwest::Client::new();
    let start = Instant::now();
    let seen = Arc::new(Seen::default());
    // Microseconds, up to ten minutes.
    let latency = Arc::new(std::sync::Mutex::new(
        Histogram::<u64>::new_with_bounds(1, 600_000_000, 3).unwrap(),
    ));
    let ready = Arc::new(AtomicU64::new(0));
    let handshakes = Arc::new(tokio::sync::Semaphore::new(128));
    let mut readers = Vec::new();
    for c in 0..args.connections {
        let user = format!("u{}", c % args.users);
        let url = format!(
            "ws://{}/ws?access_token={}",
            gateway.base,
            token(claims(&user))
        );
        readers.push(tokio::spawn(reader(
            url,
            mode,
            start,
            seen.clone(),
            latency.clone(),
            ready.clone(),
            handshakes.clone(),
        )));
        if c % 64 == 63 {
            tokio::task::yield_now().await;
        }
    }
    while ready.load(Ordering::Relaxed) < args.connections as u64 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Welcome frames are not tokens.
    seen.frames.store(0, Ordering::Relaxed);
    seen.bytes.store(0, Ordering::Relaxed);

    if mode == Mode::Messages {
        let creates = (0..args.users)
            .map(|u| {
                json!({"user_id": format!("u{u}"), "kind": "assistant",
                       "message": {"id": format!("m{u}"), "op": "create"}})
            })
            .collect();
        gateway.publish(&http, &publisher, creates).await;
    }
    let cpu_before = gateway.cpu_secs();
    let began = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / args.rate));
    let mut index = 0u64;
    while began.elapsed() < Duration::from_secs(args.secs) {
        tick.tick().await;
        index += 1;
        let events = (0..args.users)
            .map(|u| {
                let text = format!("{}:{} ", index - 1, stamp(start));
                match mode {
                    Mode::Messages => json!({"user_id": format!("u{u}"),
                        "message": {"id": format!("m{u}"), "op": "append", "index": index, "text": text}}),
                    Mode::Events => json!({"user_id": format!("u{u}"), "kind": "token",
                        "payload": {"m": format!("m{u}"), "t": text}}),
                }
            })
            .collect();
        gateway.publish(&http, &publisher, events).await;
    }
    let published_secs = began.elapsed().as_secs_f64();
    let appends = index * args.users as u64;
    let per_connection = index * (args.connections / args.users) as u64 * args.users as u64;
    // Every token at every connection, then the end marker.
    let deadline = Instant::now() + Duration::from_secs(60);
    while seen.tokens.load(Ordering::Relaxed) < per_connection && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let drained_secs = began.elapsed().as_secs_f64();
    let cpu = gateway.cpu_secs() - cpu_before;
    let done = (0..args.users)
        .map(|u| json!({"user_id": format!("u{u}"), "kind": "bench.done", "payload": {}}))
        .collect();
    gateway.publish(&http, &publisher, done).await;
    for r in readers {
        let _ = tokio::time::timeout(Duration::from_secs(10), r).await;
    }
    let tokens = seen.tokens.load(Ordering::Relaxed);
    let frames = seen.frames.load(Ordering::Relaxed);
    let bytes = seen.bytes.load(Ordering::Relaxed);
    let latency = latency.lock().unwrap_or_else(|e| e.into_inner());
    let disorder = seen.disorder.load(Ordering::Relaxed);
    anyhow::ensure!(
        tokens == per_connection && disorder == 0,
        "{mode:?}: {tokens} of {per_connection} tokens received, {disorder} out of order or twice"
    );
    let json = json!({
        "mode": format!("{mode:?}").to_lowercase(),
        "connections": args.connections,
        "users": args.users,
        "appends": appends,
        "appends_per_sec": appends as f64 / published_secs,
        "tokens_received": tokens,
        "frames": frames,
        "frames_per_sec": frames as f64 / drained_secs,
        "bytes_per_sec": bytes as f64 / drained_secs,
        "frames_per_token": frames as f64 / tokens as f64,
        "gateway_cpu_secs": cpu,
        "cpu_us_per_append": cpu * 1e6 / appends as f64,
        "latency_ms_p50": latency.value_at_quantile(0.5) as f64 / 1000.0,
        "latency_ms_p99": latency.value_at_quantile(0.99) as f64 / 1000.0,
        "latency_ms_max": latency.max() as f64 / 1000.0,
    });
    Ok(RunResult { json })
}

/// A 2,000-token message, then a resume from before it: the time to its snapshot, the
/// snapshot's bytes, and what the history holds for it.
async fn snapshot(args: &Args) -> anyhow::Result<Value> {
    let gateway = Gateway::start(args).await?;
    let publisher = publisher_token();
    let http = reqwest::Client::new();
    let bytes_before = gateway.metric("gateway_history_bytes").await;
    let created = gateway
        .publish(
            &http,
            &publisher,
            vec![json!({"user_id": "s", "kind": "assistant",
                        "message": {"id": "long", "op": "create"}})],
        )
        .await["results"][0]["seq"]
        .as_u64()
        .unwrap();
    let appends: Vec<Value> = (1..=args.snapshot_tokens)
        .map(|i| {
            json!({"user_id": "s", "message": {"id": "long", "op": "append", "index": i,
                   "text": format!("tok{i} ")}})
        })
        .collect();
    for chunk in appends.chunks(1000) {
        gateway.publish(&http, &publisher, chunk.to_vec()).await;
    }
    // The gauge is set once a second.
    let mut held = bytes_before;
    for _ in 0..200 {
        held = gateway.metric("gateway_history_bytes").await;
        if held > bytes_before {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut times = Vec::new();
    let mut frame_bytes = 0;
    for _ in 0..5 {
        let began = Instant::now();
        let url = format!(
            "ws://{}/ws?since={}&access_token={}",
            gateway.base,
            created - 1,
            token(claims("s"))
        );
        let (mut ws, _) = tokio_tungstenite::connect_async(url).await?;
        while let Some(Ok(msg)) = ws.next().await {
            let Message::Text(text) = msg else { continue };
            if text.as_str().contains("\"op\":\"snapshot\"") {
                frame_bytes = text.len();
                break;
            }
        }
        times.push(began.elapsed().as_secs_f64() * 1000.0);
    }
    times.sort_by(f64::total_cmp);
    Ok(json!({
        "tokens": args.snapshot_tokens,
        "connect_to_snapshot_ms_median": times[times.len() / 2],
        "snapshot_frame_bytes": frame_bytes,
        "history_bytes_for_message": held - bytes_before,
    }))
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    let mut report = json!({});
    for mode in [Mode::Messages, Mode::Events] {
        match run(&args, mode).await {
            Ok(r) => {
                println!("{}", r.json);
                report[format!("{mode:?}").to_lowercase()] = r.json;
            }
            Err(e) => {
                eprintln!("streams_bench: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    match snapshot(&args).await {
        Ok(s) => {
            println!("{s}");
            report["snapshot"] = s;
        }
        Err(e) => {
            eprintln!("streams_bench: snapshot: {e}");
            return ExitCode::FAILURE;
        }
    }
    if let Some(path) = &args.report {
        let _ = std::fs::write(path, serde_json::to_string_pretty(&report).unwrap());
    }
    ExitCode::SUCCESS
}

//! `control_bench`: the control path and presence of `make bench`, against the real binary
//! and a real HTTP backend on loopback.
//!
//! - RPC: the same `echo` call made `--calls` times by one connection through the gateway
//!   (`{"type":"rpc"}` frame to `rpc_result`) and POSTed as many times straight to the
//!   backend (signed the same way), one at a time; then `--connections` connections calling
//!   at once. Reports p50 and p99 of each, and the gateway's share.
//! - Webhooks: `--users` users connect and close one at a time; the delay from each close
//!   to its `user.offline` reaching the receiver, with `offline_after_secs = 0` (the
//!   gateway's own part; the configured debounce adds itself to it).
//!
//! Every answer is checked: an `rpc_result` for each call, with the caller's connection id.

use std::path::PathBuf;
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use clap::Parser;
use futures_util::{SinkExt, StreamExt};
use gateway_tests::backend::{BACKEND_SECRET, Backend};
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
    #[arg(long, default_value_t = 18392)]
    port: u16,
    /// Sequential calls, through the gateway and direct.
    #[arg(long, default_value_t = 2000)]
    calls: usize,
    /// Connections calling at once (each `--calls / 10` calls, one at a time).
    #[arg(long, default_value_t = 50)]
    connections: usize,
    /// Users whose close is timed to its `user.offline`.
    #[arg(long, default_value_t = 200)]
    users: usize,
    /// Write the JSON report here too.
    #[arg(long)]
    report: Option<PathBuf>,
}

struct Gateway(Child);

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn connect(args: &Args, user: &str) -> anyhow::Result<(Socket, String)> {
    let url = format!(
        "ws://127.0.0.1:{}/ws?access_token={}",
        args.port,
        token(claims(user))
    );
    let (mut ws, _) = tokio_tungstenite::connect_async(url).await?;
    let welcome = next_json(&mut ws).await?;
    let id = welcome["connection_id"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    Ok((ws, id))
}

async fn next_json(ws: &mut Socket) -> anyhow::Result<Value> {
    loop {
        match tokio::time::timeout(Duration::from_secs(10), ws.next()).await {
            Ok(Some(Ok(Message::Text(text)))) => return Ok(serde_json::from_str(text.as_str())?),
            Ok(Some(Ok(_))) => continue,
            other => anyhow::bail!("no frame: {other:?}"),
        }
    }
}

/// One call through the gateway; its round trip.
async fn call(ws: &mut Socket, id: usize, connection_id: &str) -> anyhow::Result<Duration> {
    let frame = json!({"type": "rpc", "id": id, "method": "echo", "data": {"n": id}});
    let started = Instant::now();
    ws.send(Message::text(frame.to_string())).await?;
    let answer = next_json(ws).await?;
    let took = started.elapsed();
    anyhow::ensure!(
        answer["type"] == "rpc_result"
            && answer["id"] == id
            && answer["data"]["connection_id"] == connection_id,
        "unexpected answer to call {id}: {answer}"
    );
    Ok(took)
}

fn micros(h: &Histogram<u64>, q: f64) -> f64 {
    h.value_at_quantile(q) as f64
}

fn summary(h: &Histogram<u64>) -> Value {
    json!({"count": h.len(), "p50_us": micros(h, 0.5), "p99_us": micros(h, 0.99), "max_us": h.max()})
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args).await {
        Ok(report) => {
            println!("{}", serde_json::to_string_pretty(&report).unwrap());
            if let Some(path) = &args.report {
                let _ = std::fs::write(path, report.to_string());
            }
            ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("control_bench: {err:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: &Args) -> anyhow::Result<Value> {
    let backend = Backend::start(0).await;
    let child = Command::new(&args.gateway)
        .args(["serve", "--guest"])
        .arg(&args.guest)
        .env("GATEWAY_LISTEN", format!("127.0.0.1:{}", args.port))
        .env("GATEWAY_JWT_SECRET", SECRET)
        .env("GATEWAY_RPC__URL", backend.url())
        .env("GATEWAY_RPC__SECRET", BACKEND_SECRET)
        .env("GATEWAY_RPC__CALLS_PER_SEC", "10000")
        .env("GATEWAY_RPC__CALL_BURST", "10000")
        .env("GATEWAY_WEBHOOKS__URL", backend.hooks_url())
        .env("GATEWAY_WEBHOOKS__SECRET", BACKEND_SECRET)
        .env("GATEWAY_WEBHOOKS__OFFLINE_AFTER_SECS", "0")
        .env("GATEWAY_LIMITS__CLIENT_MESSAGES_PER_SEC", "100000")
        .env("GATEWAY_LIMITS__CLIENT_MESSAGE_BURST", "100000")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let _gateway = Gateway(child);
    let http = reqwest::Client::new();
    let mut up = false;
    for _ in 0..500 {
        let probe = http
            .get(format!("http://127.0.0.1:{}/healthz", args.port))
            .send()
            .await;
        if probe.is_ok() {
            up = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    anyhow::ensure!(up, "the gateway did not answer /healthz");

    // Warm both paths (connection pools, first-call costs) before timing.
    let (mut ws, connection_id) = connect(args, "bench-0").await?;
    for i in 0..50 {
        call(&mut ws, i, &connection_id).await?;
    }
    let mut through = Histogram::<u64>::new(3)?;
    for i in 0..args.calls {
        through.record(call(&mut ws, i, &connection_id).await?.as_micros() as u64)?;
    }
    let mut direct = Histogram::<u64>::new(3)?;
    for i in 0..args.calls + 50 {
        let body = json!({"method": "echo", "data": {"n": i}, "tenant_id": null,
                          "user_id": "bench-0", "sid": null, "connection_id": connection_id})
        .to_string();
        let started = Instant::now();
        let answer = http
            .post(backend.url())
            .header("content-type", "application/json")
            .header(
                "x-gateway-signature",
                gateway::rpc::signature(BACKEND_SECRET.as_bytes(), body.as_bytes()),
            )
            .body(body)
            .send()
            .await?;
        anyhow::ensure!(
            answer.status().is_success(),
            "direct call: {}",
            answer.status()
        );
        answer.bytes().await?;
        if i >= 50 {
            direct.record(started.elapsed().as_micros() as u64)?;
        }
    }

    // Many connections at once.
    let per = (args.calls / 10).max(1);
    let mut tasks = Vec::new();
    // Every connection is open before any calls: the rate is of calls alone.
    let start = std::sync::Arc::new(tokio::sync::Barrier::new(args.connections + 1));
    for c in 0..args.connections {
        let (mut ws, id) = connect(args, &format!("bench-{}", c + 1)).await?;
        let start = start.clone();
        tasks.push(tokio::spawn(async move {
            start.wait().await;
            let mut h = Histogram::<u64>::new(3)?;
            for i in 0..per {
                h.record(call(&mut ws, i, &id).await?.as_micros() as u64)?;
            }
            let _ = ws.close(None).await;
            anyhow::Ok(h)
        }));
    }
    start.wait().await;
    let started = Instant::now();
    let mut concurrent = Histogram::<u64>::new(3)?;
    for task in tasks {
        concurrent.add(task.await??)?;
    }
    let concurrent_secs = started.elapsed().as_secs_f64();
    let _ = ws.close(None).await;

    // Close to user.offline, one user at a time.
    let mut offline = Histogram::<u64>::new(3)?;
    for u in 0..args.users {
        let user = format!("presence-{u}");
        let (mut ws, _) = connect(args, &user).await?;
        let closed = Instant::now();
        ws.close(None).await?;
        let deadline = closed + Duration::from_secs(10);
        let arrived = loop {
            let hooks = backend.hooks();
            if let Some(h) = hooks
                .iter()
                .find(|h| h.body["type"] == "user.offline" && h.body["user_id"] == user.as_str())
            {
                break h.at;
            }
            anyhow::ensure!(Instant::now() < deadline, "no user.offline for {user}");
            tokio::time::sleep(Duration::from_micros(200)).await;
        };
        offline.record(arrived.saturating_duration_since(closed).as_micros() as u64)?;
    }

    Ok(json!({
        "rpc_through_gateway": summary(&through),
        "rpc_direct": summary(&direct),
        "rpc_added_p50_us": micros(&through, 0.5) - micros(&direct, 0.5),
        "rpc_concurrent": {
            "connections": args.connections,
            "calls": concurrent.len(),
            "calls_per_sec": concurrent.len() as f64 / concurrent_secs,
            "latency": summary(&concurrent),
        },
        "webhook_close_to_offline": summary(&offline),
    }))
}

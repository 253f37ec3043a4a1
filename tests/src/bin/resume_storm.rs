//! `resume_storm`: every client reconnects at once with `?since=` after missing a burst.
//!
//! 1. `--clients` connections over `--users` users, each reads one marker event (its `since`).
//! 2. All disconnect; `--missed` events per user are published while they are away.
//! 3. All reconnect at once (at most `--max-inflight` handshakes in flight) with `?since=`;
//!    each is done when it has `gateway.resumed` (`recovered: true`) and every missed event,
//!    in order, exactly once.
//!
//! Reports time to all recovered, per-client time to recovered (p50/p99/max), failures, and
//! the log's bytes per retained event (`gateway_history_bytes` over the events retained).
//! (The server's RSS says nothing here: the burst lands in memory the closed connections
//! just freed.) Exit 1 on any failure.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use clap::Parser;
use futures_util::StreamExt;
use gateway::auth::{Claims, PUBLISH_SCOPE, mint_hs256};
use gateway_tests::claims;
use serde_json::{Value, json};
use tokio::net::TcpSocket;
use tokio::sync::Semaphore;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

#[derive(Debug, Parser)]
#[command(about = "Reconnect every client at once with ?since= after a missed burst")]
struct Args {
    /// Gateway address, e.g. 127.0.0.1:8080.
    #[arg(long)]
    addr: SocketAddr,
    /// HS256 secret of the gateway (read from GATEWAY_JWT_SECRET if not given).
    #[arg(long, env = "GATEWAY_JWT_SECRET", hide_env_values = true)]
    secret: String,
    #[arg(long, default_value_t = 10_000)]
    clients: usize,
    #[arg(long, default_value_t = 2_000)]
    users: usize,
    /// Events per user published while the clients are away.
    #[arg(long, default_value_t = 20)]
    missed: usize,
    #[arg(long, default_value_t = 512)]
    max_inflight: usize,
    /// Source addresses to spread client sockets over (127.0.0.2 on).
    #[arg(long, default_value_t = 4)]
    source_ips: u32,
    /// Skip this many source addresses (consecutive runs must not share ports in TIME_WAIT).
    #[arg(long, default_value_t = 0)]
    source_ip_offset: u32,
    /// Give up after this many seconds.
    #[arg(long, default_value_t = 120)]
    max_secs: u64,
    #[arg(long)]
    json: Option<std::path::PathBuf>,
}

type Ws = tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>;

struct Plan {
    addr: SocketAddr,
    secret: String,
    sources: Vec<IpAddr>,
}

impl Plan {
    fn token(&self, claims: Claims) -> String {
        mint_hs256(&self.secret, &claims).expect("HS256 signs")
    }

    fn user_token(&self, user: usize) -> String {
        self.token(claims(&format!("storm-{user}")))
    }

    async fn open(&self, i: usize, user: usize, since: Option<u64>) -> anyhow::Result<Ws> {
        let source = self.sources[i % self.sources.len()];
        let socket = TcpSocket::new_v4()?;
        socket.bind(SocketAddr::new(source, 0))?;
        let stream = socket.connect(self.addr).await?;
        let _ = stream.set_nodelay(true);
        let query = since.map_or(String::new(), |s| format!("?since={s}"));
        let mut request = format!("ws://{}/ws{query}", self.addr).into_client_request()?;
        request.headers_mut().insert(
            "authorization",
            format!("Bearer {}", self.user_token(user)).parse()?,
        );
        let config = WebSocketConfig::default()
            .read_buffer_size(8 << 10)
            .write_buffer_size(0);
        let (ws, _) =
            tokio_tungstenite::client_async_with_config(request, stream, Some(config)).await?;
        Ok(ws)
    }
}

async fn next_json(ws: &mut Ws) -> anyhow::Result<Value> {
    loop {
        match ws.next().await.context("closed")?? {
            Message::Text(text) => return Ok(serde_json::from_str(text.as_str())?),
            Message::Close(frame) => bail!("closed: {frame:?}"),
            _ => {}
        }
    }
}

/// Publishes `events` in batches of 1000; returns each event's seq.
async fn publish(
    http: &reqwest::Client,
    plan: &Plan,
    events: Vec<Value>,
) -> anyhow::Result<Vec<u64>> {
    let mut publisher = claims("storm-publisher");
    publisher.scope = Some(PUBLISH_SCOPE.into());
    let publisher = plan.token(publisher);
    let mut seqs = Vec::with_capacity(events.len());
    for chunk in events.chunks(1000) {
        let reply: Value = http
            .post(format!("http://{}/v1/publish/batch", plan.addr))
            .bearer_auth(&publisher)
            .json(&json!({ "events": chunk }))
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        for result in reply["results"].as_array().context("results")? {
            seqs.push(result["seq"].as_u64().context("seq")?);
        }
    }
    Ok(seqs)
}

fn event(user: usize, n: usize) -> Value {
    json!({"user_id": format!("storm-{user}"), "kind": "agent_thinking", "payload": {"n": n, "text": "thinking about the next step"}})
}

async fn metric(http: &reqwest::Client, addr: SocketAddr, name: &str) -> anyhow::Result<f64> {
    let text = http
        .get(format!("http://{addr}/metrics"))
        .send()
        .await?
        .text()
        .await?;
    Ok(text
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0.0))
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    // One socket per client, twice over: use every file descriptor the process may have.
    let _ = rlimit::increase_nofile_limit(u64::MAX);
    let first = u32::from(Ipv4Addr::new(127, 0, 0, 2)) + args.source_ip_offset;
    let plan = Arc::new(Plan {
        addr: args.addr,
        secret: args.secret.clone(),
        sources: (0..args.source_ips.max(1))
            .map(|k| IpAddr::V4(Ipv4Addr::from(first + k)))
            .collect(),
    });
    let http = reqwest::Client::new();
    let users = args.users.max(1).min(args.clients);
    let deadline = Instant::now() + Duration::from_secs(args.max_secs);

    // 1. Connect everyone; each reads its user's marker event.
    let gate = Arc::new(Semaphore::new(args.max_inflight.max(1)));
    let mut tasks = Vec::with_capacity(args.clients);
    for i in 0..args.clients {
        let (plan, gate) = (plan.clone(), gate.clone());
        tasks.push(tokio::spawn(async move {
            let permit = gate.acquire_owned().await?;
            let mut ws = plan.open(i, i % users, None).await?;
            drop(permit);
            let welcome = next_json(&mut ws).await?;
            anyhow::ensure!(welcome["type"] == "welcome", "{welcome}");
            Ok::<_, anyhow::Error>(ws)
        }));
    }
    let mut sockets = Vec::with_capacity(args.clients);
    for task in tasks {
        sockets.push(task.await??);
    }
    let markers = publish(&http, &plan, (0..users).map(|u| event(u, 0)).collect()).await?;
    let mut since = vec![0u64; args.clients];
    for (i, ws) in sockets.iter_mut().enumerate() {
        let frame = next_json(ws).await?;
        anyhow::ensure!(frame["seq"].as_u64() == Some(markers[i % users]), "{frame}");
        since[i] = markers[i % users];
    }
    // 2. Everyone leaves; the burst is published while they are away.
    for mut ws in sockets {
        let _ = ws.close(None).await;
    }
    let bytes_before = metric(&http, args.addr, "gateway_history_bytes").await?;
    let mut burst = Vec::with_capacity(users * args.missed);
    for n in 1..=args.missed {
        burst.extend((0..users).map(|u| event(u, n)));
    }
    let seqs = publish(&http, &plan, burst).await?;
    let mut expected = vec![Vec::with_capacity(args.missed); users];
    for (k, seq) in seqs.into_iter().enumerate() {
        expected[k % users].push(seq);
    }
    // The log's gauge is refreshed once a second: a full period after the last publish was
    // answered, it counts the whole burst.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let bytes_after = metric(&http, args.addr, "gateway_history_bytes").await?;
    let retained = (users * args.missed) as f64;

    // 3. The storm: everyone reconnects with `since` at once.
    let expected = Arc::new(expected);
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(args.clients);
    for (i, since) in since.into_iter().enumerate() {
        let (plan, gate, expected) = (plan.clone(), gate.clone(), expected.clone());
        tasks.push(tokio::spawn(async move {
            let permit = gate.acquire_owned().await?;
            let mut ws = plan.open(i, i % users, Some(since)).await?;
            drop(permit);
            let welcome = next_json(&mut ws).await?;
            anyhow::ensure!(welcome["type"] == "welcome", "{welcome}");
            let resumed = next_json(&mut ws).await?;
            anyhow::ensure!(
                resumed["type"] == "gateway.resumed" && resumed["recovered"] == true,
                "{resumed}"
            );
            for want in &expected[i % users] {
                let frame = next_json(&mut ws).await?;
                anyhow::ensure!(frame["seq"].as_u64() == Some(*want), "{frame}");
            }
            let took = started.elapsed();
            let _ = ws.close(None).await;
            Ok::<_, anyhow::Error>(took)
        }));
    }
    let mut times = Vec::with_capacity(tasks.len());
    let mut failures = Vec::new();
    for task in tasks {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, task).await {
            Ok(Ok(Ok(took))) => times.push(took.as_secs_f64() * 1e3),
            Ok(Ok(Err(err))) => failures.push(err.to_string()),
            Ok(Err(err)) => failures.push(err.to_string()),
            Err(_) => failures.push("timed out".into()),
        }
    }
    let all = started.elapsed().as_secs_f64();
    times.sort_by(f64::total_cmp);
    let report = json!({
        "clients": args.clients,
        "users": users,
        "missed_per_user": args.missed,
        "recovered": times.len(),
        "failures": failures.len(),
        "failure_samples": failures.iter().take(5).collect::<Vec<_>>(),
        "storm_secs": all,
        "resumes_per_sec": times.len() as f64 / all.max(1e-9),
        "recover_ms": {
            "p50": percentile(&times, 0.5),
            "p99": percentile(&times, 0.99),
            "max": times.last().copied().unwrap_or(0.0),
        },
        "history_bytes_per_event": (bytes_after - bytes_before) / retained,
    });
    println!("{report}");
    if let Some(path) = &args.json {
        std::fs::write(path, report.to_string())?;
    }
    if !failures.is_empty() {
        std::process::exit(1);
    }
    Ok(())
}

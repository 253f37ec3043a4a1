//! One chaos run: start the topology, run the workload and the nemesis for `--secs`, heal,
//! let the publishers finish their retries, stop the clients, have every client catch up
//! (and, in cluster mode, read every identity's whole history), then check and report.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, bail};
use serde_json::json;
use tokio::sync::{Mutex, Semaphore, watch};
use tokio::task::JoinSet;

use super::checker::{self, History, Kind, Verdict};
use super::nemesis::{self, Fault, NemesisLog};
use super::topology::{GatewaySettings, Topology, tracing_note};
use super::workload::{self, ClientOutcome, Connection, Context, PUBLISH_RETRY_FOR};
use super::{Clock, Identity, Mode, Rng};

#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "chaos",
    about = "Runs gateway nodes (and NATS servers) under faults with a resuming workload, then \
             checks the history: nothing misdelivered, lost, duplicated or falsely recovered"
)]
pub struct Options {
    /// How long the workload and the faults run (the catch-up and the check come after).
    #[arg(long, default_value_t = 60)]
    pub secs: u64,
    /// Seeds the fault schedule and every task's choices.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    #[arg(long, value_enum, default_value_t = Mode::Cluster)]
    pub mode: Mode,
    /// Gateway nodes (embedded mode: 1).
    #[arg(long)]
    pub nodes: Option<usize>,
    /// Users per tenant (two tenants with the same user names).
    #[arg(long, default_value_t = 8)]
    pub users: usize,
    /// Well-behaved clients per identity, each on a random node per connection.
    #[arg(long, default_value_t = 2)]
    pub clients_per_user: usize,
    #[arg(long, default_value_t = 3)]
    pub publishers: usize,
    /// Events per second over all publishers.
    #[arg(long, default_value_t = 60.0)]
    pub rate: f64,
    /// Misbehaving client tasks (floods, oversize frames).
    #[arg(long, default_value_t = 2)]
    pub misbehaving: usize,
    /// Mean seconds between faults (each drawn between half and one and a half of it).
    #[arg(long, default_value_t = 6.0)]
    pub fault_every_secs: f64,
    /// JetStream streams the identities spread over (cluster mode).
    #[arg(long, default_value_t = 2)]
    pub streams: usize,
    /// Where the JSON report goes (node logs beside it, under logs/).
    #[arg(long, default_value = "target/chaos/report.json")]
    pub report: PathBuf,
    /// The gateway binary (default: `gateway` beside this binary).
    #[arg(long)]
    pub gateway: Option<PathBuf>,
    /// The guest component (default: the reference guest the tests crate built).
    #[arg(long)]
    pub guest: Option<PathBuf>,
}

/// What a finished run found.
#[derive(Debug)]
pub struct Outcome {
    pub verdict: Verdict,
    pub summary: String,
    /// Further lines to print (violations, other kinds).
    pub details: Vec<String>,
    pub nemesis_errors: Vec<String>,
    /// Nodes still holding sessions or subscriptions after every client left.
    pub leaks: Vec<String>,
}

impl Outcome {
    pub fn clean(&self) -> bool {
        self.verdict.clean() && self.nemesis_errors.is_empty() && self.leaks.is_empty()
    }
}

fn defaults(options: &Options) -> anyhow::Result<GatewaySettings> {
    let binary = match &options.gateway {
        Some(path) => path.clone(),
        None => std::env::current_exe()?
            .parent()
            .context("the binary's folder")?
            .join("gateway"),
    };
    if !binary.is_file() {
        bail!(
            "no gateway binary at {} (cargo build --release --locked -p gateway, or --gateway)",
            binary.display()
        );
    }
    let guest = options
        .guest
        .clone()
        .unwrap_or_else(|| crate::guests::REFERENCE.into());
    Ok(GatewaySettings {
        binary,
        guest,
        secret: crate::SECRET.into(),
        // Cluster mode reads a resume in one batch of at most 4000.
        max_replay_events: 4000,
        streams: options.streams,
    })
}

pub async fn run(options: Options) -> anyhow::Result<Outcome> {
    let nodes = match (options.mode, options.nodes) {
        (Mode::Embedded, None | Some(1)) => 1,
        (Mode::Embedded, Some(n)) => bail!("embedded mode runs one node, not {n}"),
        (Mode::Cluster, None) => 3,
        (Mode::Cluster, Some(n)) if n >= 1 => n,
        (Mode::Cluster, Some(_)) => bail!("--nodes must be at least 1"),
    };
    if options.users == 0 || options.clients_per_user == 0 || options.publishers == 0 {
        bail!("--users, --clients-per-user and --publishers must be at least 1");
    }
    let settings = defaults(&options)?;
    let report_dir = options
        .report
        .parent()
        .map(PathBuf::from)
        .unwrap_or_default();
    let logs = report_dir.join(format!("logs-{}", mode_name(options.mode)));
    let _ = std::fs::remove_dir_all(&logs);
    let clock = Clock::start();
    tracing_note(&format!(
        "{} mode, {nodes} node(s), seed {}, {} s; logs in {}",
        mode_name(options.mode),
        options.seed,
        options.secs,
        logs.display()
    ));
    let topology = Topology::start(options.mode, nodes, &settings, &logs).await?;
    let node_table = topology.nodes.clone();
    let topology = Arc::new(Mutex::new(topology));
    let identities = Identity::all(options.users);
    let ctx = Arc::new(Context::new(
        clock,
        node_table,
        identities.clone(),
        &settings.secret,
    ));

    let (stop_faults, faults_stopped) = watch::channel(false);
    let (stop_publishers, publishers_stopped) = watch::channel(false);
    let (stop_clients, clients_stopped) = watch::channel(false);
    let nemesis = tokio::spawn(nemesis::run(
        topology.clone(),
        clock,
        Duration::from_secs_f64(options.fault_every_secs.max(0.5)),
        Rng::fork(options.seed, 1),
        faults_stopped,
    ));
    let mut clients = JoinSet::new();
    for identity in 0..identities.len() {
        for j in 0..options.clients_per_user {
            let client = identity * options.clients_per_user + j;
            clients.spawn(workload::client(
                ctx.clone(),
                client,
                identity,
                Rng::fork(options.seed, 10_000 + client as u64),
                clients_stopped.clone(),
            ));
        }
    }
    let mut publishers = JoinSet::new();
    for index in 0..options.publishers {
        publishers.spawn(workload::publisher(
            ctx.clone(),
            index,
            options.rate / options.publishers as f64,
            Rng::fork(options.seed, 100 + index as u64),
            publishers_stopped.clone(),
        ));
    }
    let mut misbehaving = JoinSet::new();
    for index in 0..options.misbehaving {
        misbehaving.spawn(workload::misbehaving(
            ctx.clone(),
            Rng::fork(options.seed, 1_000 + index as u64),
            clients_stopped.clone(),
        ));
    }

    tokio::time::sleep(Duration::from_secs(options.secs)).await;
    tracing_note("faults stop; healing");
    stop_faults.send_replace(true);
    let nemesis_log: NemesisLog = nemesis.await.context("the nemesis task")?;
    nemesis::heal(&mut *topology.lock().await)
        .await
        .context("healing the topology")?;
    tracing_note("publishers stop (their retries finish)");
    stop_publishers.send_replace(true);
    let mut publications = Vec::new();
    while let Some(done) = publishers.join_next().await {
        publications.extend(done.context("a publisher task")?);
    }
    // Live delivery gets a moment before the clients let go.
    tokio::time::sleep(Duration::from_secs(1)).await;
    tracing_note("clients stop; every client catches up");
    stop_clients.send_replace(true);
    let mut outcomes: Vec<ClientOutcome> = Vec::new();
    while let Some(done) = clients.join_next().await {
        outcomes.push(done.context("a client task")?);
    }
    let mut connections: Vec<Connection> = Vec::new();
    while let Some(done) = misbehaving.join_next().await {
        connections.extend(done.context("a misbehaving task")?);
    }
    topology.lock().await.wait_all_ready().await?;

    // The highest acknowledged seq of each identity: what a catch-up waits for.
    let mut want: Vec<Option<u64>> = vec![None; identities.len()];
    for p in &publications {
        if let Some(ack) = &p.ack {
            want[p.identity] = want[p.identity].max(Some(ack.seq));
        }
    }
    let give_up = tokio::time::Instant::now() + Duration::from_secs(60);
    let slots = Arc::new(Semaphore::new(8));
    let mut catching_up = JoinSet::new();
    for mut outcome in outcomes {
        let ctx = ctx.clone();
        let slots = slots.clone();
        let want = want[outcome.identity];
        let rng = Rng::fork(options.seed, 20_000 + outcome.client as u64);
        catching_up.spawn(async move {
            let _slot = slots.acquire_owned().await;
            workload::catch_up(ctx, &mut outcome, want, rng, give_up).await;
            outcome
        });
    }
    while let Some(done) = catching_up.join_next().await {
        connections.extend(done.context("a catch-up task")?.connections);
    }
    if options.mode == Mode::Cluster {
        tracing_note("every identity's history is read from since=0");
        let mut audits = JoinSet::new();
        for (identity, want) in want.iter().enumerate() {
            let ctx = ctx.clone();
            let slots = slots.clone();
            let want = *want;
            let rng = Rng::fork(options.seed, 30_000 + identity as u64);
            let give_up = tokio::time::Instant::now() + Duration::from_secs(60);
            audits.spawn(async move {
                let _slot = slots.acquire_owned().await;
                workload::audit(ctx, identity, want, rng, give_up).await
            });
        }
        while let Some(done) = audits.join_next().await {
            connections.extend(done.context("an audit task")?);
        }
    }
    connections.sort_by_key(|c| c.id);
    tracing_note("every node must hold no session (and no subscription) now");
    let leaks = leaks(&ctx, options.mode).await;

    let verdict = checker::check(&History {
        mode: options.mode,
        identities: &identities,
        connections: &connections,
        publications: &publications,
        faults: &nemesis_log.faults,
        max_replay_events: settings.max_replay_events,
    });
    let kills = nemesis_log.count(Fault::KillGateway)
        + nemesis_log.count(Fault::DrainGateway)
        + nemesis_log.count(Fault::KillNats);
    let pauses = nemesis_log.count(Fault::PauseNats);
    let cuts = nemesis_log.count(Fault::CutNatsLink);
    let reloads = nemesis_log.count(Fault::ReloadGuest);
    let summary = format!(
        "chaos: {} deliveries, {} connections, {kills} kills, {pauses} pauses, {cuts} link cuts, \
         {reloads} reloads, {} misdelivered, {} lost, {} duplicated, {} false recovered",
        verdict.deliveries,
        verdict.connections,
        verdict.count(Kind::Misdelivered),
        verdict.count(Kind::Lost),
        verdict.count(Kind::Duplicated),
        verdict.count(Kind::FalseRecovered),
    );
    let mut details = Vec::new();
    if verdict.count(Kind::Order) + verdict.count(Kind::Affected) > 0 {
        details.push(format!(
            "chaos: also {} out of order, {} well-behaved connections closed as misbehaving",
            verdict.count(Kind::Order),
            verdict.count(Kind::Affected)
        ));
    }
    for leak in &leaks {
        details.push(format!("chaos: LEAK {leak}"));
    }
    for error in &nemesis_log.errors {
        details.push(format!("chaos: fault not healed: {error}"));
    }
    for v in verdict.violations.iter().take(5) {
        details.push(format!(
            "chaos: VIOLATION {:?} for {}: {}",
            v.kind, v.identity, v.what
        ));
        details.extend(v.excerpt.iter().map(|line| format!("    {line}")));
    }
    if verdict.violations.len() > 5 {
        details.push(format!(
            "chaos: ... {} more in the report",
            verdict.violations.len() - 5
        ));
    }
    let report = json!({
        "summary": summary,
        "clean": verdict.clean() && nemesis_log.errors.is_empty() && leaks.is_empty(),
        "options": {
            "mode": options.mode,
            "seed": options.seed,
            "secs": options.secs,
            "nodes": nodes,
            "users_per_tenant": options.users,
            "clients_per_user": options.clients_per_user,
            "publishers": options.publishers,
            "rate": options.rate,
            "misbehaving": options.misbehaving,
            "fault_every_secs": options.fault_every_secs,
            "streams": options.streams,
            "publish_retry_secs": PUBLISH_RETRY_FOR.as_secs(),
        },
        "counts": {
            "deliveries": verdict.deliveries,
            "connections": verdict.connections,
            "kills": kills,
            "gateway_kills": nemesis_log.count(Fault::KillGateway),
            "gateway_drains": nemesis_log.count(Fault::DrainGateway),
            "nats_kills": nemesis_log.count(Fault::KillNats),
            "nats_pauses": pauses,
            "nats_link_cuts": cuts,
            "guest_reloads": reloads,
            "failed_connects": ctx.failed_connects.load(std::sync::atomic::Ordering::Relaxed),
            "violations": verdict.counts,
        },
        "publications": {
            "published": verdict.published,
            "acknowledged": verdict.acknowledged,
            "unacknowledged": verdict.unacknowledged,
            "duplicate_receipts": verdict.duplicate_receipts,
            "attempts": verdict.publish_attempts,
        },
        "resumes": verdict.resumes,
        "justified_not_recovered": verdict.justified_not_recovered,
        "closes": verdict.closes,
        "faults": nemesis_log.faults,
        "nemesis_errors": nemesis_log.errors,
        "leaks": leaks,
        "violations": verdict.violations,
        "logs": logs,
        "elapsed_secs": clock.now() as f64 / 1e6,
    });
    if !report_dir.as_os_str().is_empty() {
        std::fs::create_dir_all(&report_dir)?;
    }
    std::fs::write(&options.report, serde_json::to_string_pretty(&report)?)
        .with_context(|| format!("writing {}", options.report.display()))?;
    tracing_note(&format!("report in {}", options.report.display()));
    // Every child process goes with the topology.
    drop(topology);
    Ok(Outcome {
        verdict,
        summary,
        details,
        nemesis_errors: nemesis_log.errors,
        leaks,
    })
}

/// After every client left, each node must drop to no live session (and, in cluster mode,
/// no subscription) within a bound: what is left is a leak.
async fn leaks(ctx: &Context, mode: Mode) -> Vec<String> {
    let mut gauges = vec!["gateway_sessions_live"];
    if mode == Mode::Cluster {
        gauges.push("gateway_cluster_feeds");
    }
    let mut leaks = Vec::new();
    for (node, port) in ctx.nodes.ports.iter().enumerate() {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
        loop {
            let text = match ctx
                .http
                .get(format!("http://127.0.0.1:{port}/metrics"))
                .send()
                .await
            {
                Ok(response) => response.text().await.unwrap_or_default(),
                Err(err) => format!("unreachable: {err}"),
            };
            let held: Vec<String> = gauges
                .iter()
                .filter_map(|gauge| {
                    let value = text.lines().find_map(|line| {
                        let (key, value) = line.rsplit_once(' ')?;
                        (key == *gauge).then(|| value.parse::<f64>().ok())?
                    });
                    match value {
                        Some(0.0) => None,
                        Some(v) => Some(format!("{gauge} {v}")),
                        None => Some(format!("{gauge} missing")),
                    }
                })
                .collect();
            if held.is_empty() {
                break;
            }
            if tokio::time::Instant::now() >= deadline {
                leaks.push(format!(
                    "node {node}: {} 15 s after the last client left",
                    held.join(", ")
                ));
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    leaks
}

fn mode_name(mode: Mode) -> &'static str {
    match mode {
        Mode::Embedded => "embedded",
        Mode::Cluster => "cluster",
    }
}

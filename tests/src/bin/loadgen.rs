//! Load generator for the WebSocket gateway (or any server speaking the same interface).
//!
//! ```text
//! loadgen --url ws://127.0.0.1:8080 --secret S --connections N --users U \
//!     [--user-offset O] [--connect-rate R] [--source-ips K] [--source-ip-offset S] \
//!     [--hold-secs H] [--release-file F] [--wait-metric NAME=VALUE] \
//!     [--publish-rate E | --publish-max] [--publish-secs P] [--batch B] [--publishers T] \
//!     [--active-users K] \
//!     [--server-pid PID] [--json FILE] [--max-secs M]
//! ```
//!
//! 1. Opens N WebSocket connections (`GET /ws`, `Authorization: Bearer <jwt>`), connection `i`
//!    belonging to user `u{O + i % U}`, each client socket bound to one of K source addresses
//!    127.0.0.(2+S), 127.0.0.(3+S), ... so that N can exceed one address's ephemeral ports. A
//!    connection counts as established when the server's `welcome` frame arrives; the connect
//!    time runs from the TCP connect to that frame. Several loadgen processes cooperate
//!    without overlapping by giving each its own `--user-offset` and `--source-ip-offset`.
//!    With `--sse`, each connection is a server-sent event stream (`GET /sse`, HTTP/1.1,
//!    read and de-chunked here) instead of a WebSocket.
//! 2. Optionally publishes `kind: "bench"` events for E events/s (or, with `--publish-max`,
//!    as fast as the server answers) over P seconds through `POST /v1/publish/batch`
//!    (T publisher tasks, B events a batch, users round robin). The
//!    `queued` counts in the answers give the receives to expect; every connection checks
//!    that each event it gets is for its own user (`misdeliveries`, must be 0), that its
//!    `seq` is above the previous one (`seq_regressions`) and new to the connection
//!    (`duplicates`: a seq it already had), and records the publish-to-receive latency from
//!    the `ts_us` the event carries. `losses` are the receives expected and not had, counted
//!    by distinct seq per connection (`events_distinct`), so a duplicate never hides a loss.
//! 3. With `--server-pid`, samples the server's VmRSS before connecting and once all
//!    connections have been idle for a second (or, with `--wait-metric`, once the server's
//!    `/metrics` shows that value, e.g. every session hibernated), and reports RSS per
//!    connection; also halfway through publishing (`rss_kib_per_connection_publishing`).
//! 4. Prints a table on stdout (progress and errors go to stderr) and, with `--json FILE`,
//!    writes the same numbers as JSON.
//!
//! Tokens are minted here from `--secret` (or `GATEWAY_JWT_SECRET`) and never printed.
//! Only loopback targets are accepted. Exit status: 0 on a complete run, 1 if any event was
//! misdelivered, duplicated or out of order, or the run hit `--max-secs`, 2 if it could not
//! start. Lost events (fewer distinct receives than the server reported queuing) are
//! reported, not treated as a failure: an overloaded server may close slow clients.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, bail};
use clap::Parser;
use futures_util::StreamExt;
use hdrhistogram::Histogram;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::net::TcpSocket;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, watch};
use tokio::task::JoinSet;
use tokio::time::{sleep, sleep_until, timeout};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};

/// File descriptors kept free beyond one per connection: publishers' HTTP connections,
/// stdio, the runtime's epoll and wakeup fds, files under /proc.
const FD_SLACK: u64 = 64;
/// Latency and connect-time histograms hold microseconds up to this (a minute).
const HIST_MAX_US: u64 = 60_000_000;
/// Readers record latency into one of this many histograms (connection `i` into `i % SHARDS`):
/// a histogram per connection would cost ~100 KiB each, a single one would be contended.
const SHARDS: usize = 16;
/// How many kinds of error are printed (the first message of each, also kept for the JSON);
/// every error is counted.
const MAX_ERROR_SAMPLES: usize = 8;
/// Time to close politely at the end: send Close, wait for the server's reply.
const CLOSE_WAIT: Duration = Duration::from_secs(2);
/// The clock tick of utime/stime in /proc/<pid>/stat (USER_HZ, 100 on every mainstream
/// Linux architecture; reading it properly needs sysconf, i.e. libc).
const CLOCK_TICKS_PER_SEC: f64 = 100.0;

#[derive(Parser)]
#[command(
    name = "loadgen",
    about = "Open many WebSocket connections to a local gateway, publish events to them, \
             and report connect times, delivery latency, losses and server memory."
)]
struct Args {
    /// Gateway URL, loopback only (127.x.x.x, localhost or ::1); `/ws` is used when the path
    /// is empty. `wss://` needs `--ca` and cannot publish (connect-only runs).
    #[arg(long, default_value = "ws://127.0.0.1:8080")]
    url: String,
    /// PEM certificate(s) to trust for `wss://`; the server name checked is the URL's host.
    #[arg(long)]
    ca: Option<PathBuf>,
    /// HS256 secret the gateway verifies tokens with.
    #[arg(long, env = "GATEWAY_JWT_SECRET", hide_env_values = true)]
    secret: String,
    /// Connections to open.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..))]
    connections: u64,
    /// Distinct users; connection i belongs to user u{i % users}.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u64).range(1..))]
    users: u64,
    /// User numbers start here: connection i belongs to user u{user_offset + i % users}, so
    /// cooperating loadgen processes can use disjoint users.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u64).range(0..1 << 40))]
    user_offset: u64,
    /// Connection attempts started per second; 0 starts them as fast as --max-inflight allows.
    #[arg(long, default_value_t = 0.0)]
    connect_rate: f64,
    /// Most connection attempts (TCP connect to welcome frame) under way at once.
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u64).range(1..=65536))]
    max_inflight: u64,
    /// Number of source addresses 127.0.0.2, 127.0.0.3, ... to spread client sockets over
    /// [default: ceil(connections / 20000) + 1].
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=65536))]
    source_ips: Option<u32>,
    /// Skip this many addresses: the first source address is 127.0.0.2 + this. Cooperating
    /// processes (or consecutive runs, while old sockets sit in TIME_WAIT) use disjoint ranges.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u32).range(0..1 << 23))]
    source_ip_offset: u32,
    /// A connection attempt that has not seen its welcome frame after this long fails.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..))]
    connect_timeout_secs: u64,
    /// Seconds to hold the connections idle after they are all up, before publishing.
    #[arg(long, default_value_t = 0)]
    hold_secs: u64,
    /// End the hold early as soon as this file exists (a driver running several loadgen
    /// processes releases them all at once).
    #[arg(long)]
    release_file: Option<PathBuf>,
    /// Before sampling the idle server's memory, wait until its `/metrics` has this metric
    /// at or above this value (`NAME=VALUE`, e.g. `gateway_sessions_hibernated=10000`).
    #[arg(long, value_parser = parse_wait_metric)]
    wait_metric: Option<(String, f64)>,
    /// Connect over server-sent events (`GET /sse` at the URL's host; `/ws` in its path
    /// becomes `/sse`) instead of WebSocket.
    #[arg(long)]
    sse: bool,
    /// Publish to the first K users only (0: all): the others stay idle, e.g. for a run
    /// where 10 % of the connections are active.
    #[arg(long, default_value_t = 0)]
    active_users: u64,
    /// Publish to this node (`ws://host:port`, as --url) instead of the one connected to:
    /// in cluster mode, events then cross from one node to another through the stream.
    #[arg(long)]
    publish_to: Option<String>,
    /// Events per second to publish in total; 0 publishes nothing.
    #[arg(long, default_value_t = 0)]
    publish_rate: u64,
    /// Publish as fast as the server takes the events: each publisher sends its next batch
    /// as soon as the previous one is answered (--publish-rate is then ignored).
    #[arg(long)]
    publish_max: bool,
    /// Seconds to publish for.
    #[arg(long, default_value_t = 10)]
    publish_secs: u64,
    /// Events per publish request.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u64).range(1..=100_000))]
    batch: u64,
    /// Concurrent publisher tasks (each has at most one request in flight).
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u64).range(1..=1024))]
    publishers: u64,
    /// After publishing stops, wait up to this long for the receives to catch up.
    #[arg(long, default_value_t = 5)]
    drain_secs: u64,
    /// Gateway process to sample VmRSS/VmHWM and CPU time of (from /proc/<pid>).
    #[arg(long)]
    server_pid: Option<u32>,
    /// With --server-pid: copy the server's /proc/<pid>/smaps and status here when memory
    /// is sampled before connecting and once idle (`before.*`, `idle.*`), for a breakdown of
    /// where a connection's memory goes.
    #[arg(long)]
    smaps_dir: Option<PathBuf>,
    /// Also write the report as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Bound on the whole run; on expiry the report covers what was measured and the exit
    /// status is 1.
    #[arg(long, default_value_t = 300, value_parser = clap::value_parser!(u64).range(1..))]
    max_secs: u64,
}

/// Everything the run needs, checked and derived from [`Args`] before the runtime starts.
struct Plan {
    args: Args,
    target: SocketAddr,
    /// For `wss://`: the client TLS configuration and the name the certificate must carry.
    tls: Option<(
        tokio_rustls::TlsConnector,
        rustls::pki_types::ServerName<'static>,
    )>,
    ws_url: String,
    publish_url: String,
    sources: Vec<IpAddr>,
    /// `Authorization` header values, one per user (index = user number).
    user_auth: Vec<String>,
    publisher_auth: String,
}

#[derive(Serialize)]
struct Claims<'a> {
    sub: &'a str,
    exp: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    scope: Option<&'a str>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let plan = match prepare(args) {
        Ok(plan) => plan,
        Err(err) => {
            eprintln!("loadgen: {err:#}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(err) => {
            eprintln!("loadgen: cannot start the runtime: {err}");
            return ExitCode::from(2);
        }
    };
    let code = runtime.block_on(drive(Arc::new(plan)));
    // Tasks left over after a timeout are not worth waiting for.
    runtime.shutdown_timeout(Duration::from_secs(1));
    code
}

/// Validates the arguments, raises the fd limit and mints the tokens.
fn prepare(args: Args) -> anyhow::Result<Plan> {
    if !args.connect_rate.is_finite() || args.connect_rate < 0.0 {
        bail!("--connect-rate must be a non-negative number");
    }
    if args.secret.len() < 32 {
        eprintln!("note: the secret is shorter than 32 bytes; the gateway refuses such secrets");
    }
    let (target, ws_url, mut publish_url) = parse_url(&args.url)?;
    if let Some(other) = &args.publish_to {
        publish_url = parse_url(other)?.2;
    }
    let tls = tls_for(&args)?;
    if tls.is_some() && (args.publish_max || args.publish_rate > 0) {
        bail!("a wss:// run only connects: publishing over TLS is not supported by loadgen");
    }
    if args.user_offset.checked_add(args.users).is_none() {
        bail!("--user-offset plus --users is too large");
    }

    let n = args.connections;
    let needed = n + FD_SLACK + 2 * args.publishers;
    let limit = raise_nofile_limit().context("cannot read or raise RLIMIT_NOFILE")?;
    if needed > limit {
        bail!(
            "{n} connections need about {needed} file descriptors but this process may open \
             {limit} (the hard RLIMIT_NOFILE); use --connections {} or fewer, or raise the \
             hard limit (ulimit -Hn)",
            limit.saturating_sub(FD_SLACK + 2 * args.publishers)
        );
    }

    let sources: Vec<IpAddr> = match target {
        // Every 127/8 address is local on Linux, and each has its own ephemeral port range.
        SocketAddr::V4(_) => {
            let k = args
                .source_ips
                .unwrap_or_else(|| (n.div_ceil(20_000) + 1) as u32);
            let first = u32::from(Ipv4Addr::new(127, 0, 0, 2)) + args.source_ip_offset;
            let end = u32::from(Ipv4Addr::new(127, 255, 255, 255));
            if u64::from(first) + u64::from(k) > u64::from(end) {
                bail!("--source-ips plus --source-ip-offset run past 127.255.255.254");
            }
            (0..k)
                .map(|j| IpAddr::V4(Ipv4Addr::from(first + j)))
                .collect()
        }
        SocketAddr::V6(_) => {
            if args.source_ips.is_some_and(|k| k > 1) {
                eprintln!("note: an IPv6 target has one loopback address; --source-ips ignored");
            }
            vec![IpAddr::V6(Ipv6Addr::LOCALHOST)]
        }
    };

    // Valid for the whole run and then some; the gateway closes a connection at `exp`.
    let exp = unix_micros() / 1_000_000 + args.max_secs + 3600;
    let key = EncodingKey::from_secret(args.secret.as_bytes());
    let header = Header::new(Algorithm::HS256);
    let mint = |sub: &str, scope: Option<&str>| -> anyhow::Result<String> {
        let token = jsonwebtoken::encode(&header, &Claims { sub, exp, scope }, &key)
            .context("cannot sign a token")?;
        Ok(format!("Bearer {token}"))
    };
    let users_with_connections = args.users.min(n);
    let user_auth = (0..users_with_connections)
        .map(|u| mint(&format!("u{}", args.user_offset + u), None))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let publisher_auth = mint("loadgen", Some("events:publish"))?;

    Ok(Plan {
        args,
        target,
        tls,
        ws_url,
        publish_url,
        sources,
        user_auth,
        publisher_auth,
    })
}

/// Returns the WebSocket target address, the WebSocket URL and the publish URL, refusing any
/// host that is not loopback: this tool must not be pointed at someone else's server.
fn parse_url(url: &str) -> anyhow::Result<(SocketAddr, String, String)> {
    let parsed = reqwest::Url::parse(url).with_context(|| format!("--url {url:?} is not a URL"))?;
    let scheme = parsed.scheme();
    if scheme != "ws" && scheme != "wss" {
        bail!("--url must start with ws:// or wss://");
    }
    let host = parsed.host_str().context("--url has no host")?;
    let ip: IpAddr = if host.eq_ignore_ascii_case("localhost") {
        Ipv4Addr::LOCALHOST.into()
    } else {
        host.trim_start_matches('[')
            .trim_end_matches(']')
            .parse()
            .with_context(|| format!("--url host {host:?} is not an IP address or localhost"))?
    };
    let loopback = match ip {
        IpAddr::V4(v4) => v4.octets()[0] == 127,
        IpAddr::V6(v6) => v6 == Ipv6Addr::LOCALHOST,
    };
    if !loopback {
        bail!("refusing --url host {host}: only loopback targets (127.x.x.x, localhost, ::1)");
    }
    let addr = SocketAddr::new(ip, parsed.port_or_known_default().unwrap_or(80));
    let path = match parsed.path() {
        "" | "/" => "/ws",
        path => path,
    };
    let host = parsed.host_str().unwrap_or_default();
    let port = addr.port();
    Ok((
        addr,
        format!("{scheme}://{host}:{port}{path}"),
        format!("http://{addr}/v1/publish/batch"),
    ))
}

/// Raises the soft RLIMIT_NOFILE to the hard limit and returns it.
fn raise_nofile_limit() -> std::io::Result<u64> {
    let (soft, hard) = rlimit::Resource::NOFILE.get()?;
    if soft < hard {
        rlimit::Resource::NOFILE.set(hard, hard)?;
    }
    Ok(hard)
}

/// Counters and histograms shared by all tasks. Kept outside the run's future so that a run
/// cut short by `--max-secs` can still report what it measured.
struct Stats {
    established: AtomicU64,
    /// Established connections per user (by index within this run's users), for the
    /// events each publish is owed when the gateway does not say (cluster mode).
    per_user: Vec<AtomicU64>,
    connect_failures: AtomicU64,
    /// Established + failed; the connect phase ends when it reaches N.
    settled: AtomicU64,
    settled_changed: Notify,
    failure_reasons: Mutex<BTreeMap<String, u64>>,
    /// Microseconds from TCP connect to welcome frame.
    connect_us: Mutex<Histogram<u64>>,

    /// Bench events for the connection's own user, duplicates included.
    received: AtomicU64,
    /// Of those, the first receive of each seq on its connection: what `losses` is counted
    /// against.
    distinct: AtomicU64,
    /// Receives of a seq the connection already had.
    duplicates: AtomicU64,
    misdeliveries: AtomicU64,
    /// Bench events without a usable `seq` / `payload.user` / `payload.ts_us`, or unparsable.
    malformed: AtomicU64,
    /// Bench events whose `seq` was not above the previous one on the same connection.
    seq_regressions: AtomicU64,
    /// Microseconds since the epoch of the latest bench event received.
    last_receive_us: AtomicU64,
    /// Publish-to-receive microseconds, sharded (see [`SHARDS`]).
    latency_us: Vec<Mutex<Histogram<u64>>>,
    /// Connections the server ended (or that broke) before loadgen closed them.
    closed_early: AtomicU64,
    closed_reasons: Mutex<BTreeMap<String, u64>>,

    published: AtomicU64,
    expected: AtomicU64,
    publish_errors: AtomicU64,
    /// Next event counter (`payload.n`); also picks the user round robin.
    next_event: AtomicU64,

    /// The first message of each kind of error: (kind, message).
    error_samples: Mutex<Vec<(String, String)>>,
    phases: Mutex<Phases>,
}

/// When each phase ran and what was sampled, filled in as the run goes.
#[derive(Default)]
struct Phases {
    connect_start: Option<Instant>,
    connect_end: Option<Instant>,
    publish_start: Option<Instant>,
    publish_start_us: u64,
    publish_end: Option<Instant>,
    rss_before: Option<Memory>,
    rss_after: Option<Memory>,
    rss_end: Option<Memory>,
    /// Halfway through the publish phase.
    rss_publishing: Option<Memory>,
    /// How long `--wait-metric` waited.
    wait_metric_secs: Option<f64>,
    /// CPU time at the start and end of the connect phase and of publish + drain.
    connect_cpu: [Option<CpuMark>; 2],
    publish_cpu: [Option<CpuMark>; 2],
}

/// Loadgen's and the server's CPU seconds at one moment.
#[derive(Clone, Copy)]
struct CpuMark {
    at: Instant,
    own: Option<f64>,
    server: Option<f64>,
}

impl CpuMark {
    fn now(server_pid: Option<u32>) -> Self {
        CpuMark {
            at: Instant::now(),
            own: cpu_seconds("self"),
            server: server_pid.and_then(|p| cpu_seconds(&p.to_string())),
        }
    }

    /// Percent of one core used by (loadgen, server) between two marks.
    fn percent(marks: &[Option<CpuMark>; 2]) -> (Option<f64>, Option<f64>) {
        let [Some(a), Some(b)] = marks else {
            return (None, None);
        };
        let wall = b.at.duration_since(a.at).as_secs_f64();
        if wall <= 0.0 {
            return (None, None);
        }
        let pct = |x: Option<f64>, y: Option<f64>| Some((y? - x?) / wall * 100.0);
        (pct(a.own, b.own), pct(a.server, b.server))
    }
}

#[derive(Clone, Copy)]
struct Memory {
    rss_kib: u64,
    hwm_kib: u64,
    /// Proportional set size: a page mapped N times counts 1/N each time. The guest's
    /// read-only data pages, mapped once per instance, count once in all rather than once per
    /// instance as in RSS.
    pss_kib: Option<u64>,
}

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, HIST_MAX_US, 3).expect("valid histogram bounds")
}

impl Stats {
    fn new(users_with_connections: u64) -> Self {
        Stats {
            established: AtomicU64::new(0),
            per_user: (0..users_with_connections)
                .map(|_| AtomicU64::new(0))
                .collect(),
            connect_failures: AtomicU64::new(0),
            settled: AtomicU64::new(0),
            settled_changed: Notify::new(),
            failure_reasons: Mutex::default(),
            connect_us: Mutex::new(histogram()),
            received: AtomicU64::new(0),
            distinct: AtomicU64::new(0),
            duplicates: AtomicU64::new(0),
            misdeliveries: AtomicU64::new(0),
            malformed: AtomicU64::new(0),
            seq_regressions: AtomicU64::new(0),
            last_receive_us: AtomicU64::new(0),
            latency_us: (0..SHARDS).map(|_| Mutex::new(histogram())).collect(),
            closed_early: AtomicU64::new(0),
            closed_reasons: Mutex::default(),
            published: AtomicU64::new(0),
            expected: AtomicU64::new(0),
            publish_errors: AtomicU64::new(0),
            next_event: AtomicU64::new(0),
            error_samples: Mutex::default(),
            phases: Mutex::default(),
        }
    }

    /// Prints the first error of each kind as it happens; a thousand identical refusals
    /// would only hide a different one.
    fn sample_error(&self, kind: &str, message: String) {
        let mut samples = self.error_samples.lock().unwrap();
        if samples.len() < MAX_ERROR_SAMPLES && samples.iter().all(|(k, _)| k != kind) {
            eprintln!("error: {message}");
            samples.push((kind.to_owned(), message));
        }
    }

    fn settle(&self) {
        self.settled.fetch_add(1, Relaxed);
        // notify_one keeps a permit when nobody waits, so no wakeup is lost.
        self.settled_changed.notify_one();
    }

    fn connect_failed(&self, err: ConnectError) {
        self.connect_failures.fetch_add(1, Relaxed);
        self.sample_error(&err.reason, err.message);
        *self
            .failure_reasons
            .lock()
            .unwrap()
            .entry(err.reason)
            .or_default() += 1;
        self.settle();
    }

    fn closed_early(&self, reason: String) {
        self.closed_early.fetch_add(1, Relaxed);
        let mut reasons = self.closed_reasons.lock().unwrap();
        if !reasons.contains_key(&reason) {
            eprintln!("connection ended by the server or the network: {reason}");
        }
        *reasons.entry(reason).or_default() += 1;
    }
}

fn unix_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// Runs the load under `--max-secs`, then reports. Returns the exit status.
async fn drive(plan: Arc<Plan>) -> ExitCode {
    let stats = Arc::new(Stats::new(plan.args.users.min(plan.args.connections)));
    let wall = Instant::now();
    let own_cpu = cpu_seconds("self");
    let server_cpu = plan
        .args
        .server_pid
        .and_then(|p| cpu_seconds(&p.to_string()));
    let progress = tokio::spawn(print_progress(stats.clone(), plan.clone()));

    let limit = Duration::from_secs(plan.args.max_secs);
    // Dropping the run's future on expiry aborts its tasks, which closes their sockets.
    let outcome = timeout(limit, run(&plan, &stats)).await;
    progress.abort();
    let timed_out = outcome.is_err();
    if timed_out {
        eprintln!(
            "loadgen: --max-secs {} reached; reporting what was measured",
            plan.args.max_secs
        );
    }
    if let Ok(Err(err)) = &outcome {
        eprintln!("loadgen: {err:#}");
    }

    let duration = wall.elapsed().as_secs_f64();
    let cpu_percent = |before: Option<f64>, pid: &str| {
        let used = cpu_seconds(pid)? - before?;
        Some(used / duration * 100.0)
    };
    let own_cpu = cpu_percent(own_cpu, "self");
    let server_cpu = plan
        .args
        .server_pid
        .and_then(|p| cpu_percent(server_cpu, &p.to_string()));
    let report = build_report(&plan, &stats, duration, own_cpu, server_cpu, timed_out);
    print_table(&report);
    if let Some(path) = &plan.args.json {
        let text = serde_json::to_string_pretty(&report).expect("a JSON value serializes");
        if let Err(err) = std::fs::write(path, text + "\n") {
            eprintln!("loadgen: cannot write {}: {err}", path.display());
            return ExitCode::from(2);
        }
    }

    let misdelivered = stats.misdeliveries.load(Relaxed) > 0;
    if misdelivered {
        eprintln!("loadgen: FAILED: events were delivered to the wrong user's connections");
    }
    let disordered = stats.duplicates.load(Relaxed) > 0 || stats.seq_regressions.load(Relaxed) > 0;
    if disordered {
        eprintln!("loadgen: FAILED: a connection got an event twice or out of order");
    }
    if misdelivered || disordered || timed_out || matches!(outcome, Ok(Err(_))) {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    }
}

/// The phases: connect, idle (sample RSS), hold, publish, drain, close.
async fn run(plan: &Arc<Plan>, stats: &Arc<Stats>) -> anyhow::Result<()> {
    let args = &plan.args;
    let n = args.connections;
    let pid = args.server_pid;
    if let Some(pid) = pid {
        let before = read_memory(pid)
            .with_context(|| format!("cannot read /proc/{pid}/status (--server-pid)"))?;
        copy_smaps(args.smaps_dir.as_deref(), pid, "before")?;
        stats.phases.lock().unwrap().rss_before = Some(before);
    }

    // Connect phase.
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let mut connections = JoinSet::new();
    let inflight = Arc::new(Semaphore::new(args.max_inflight as usize));
    let start = tokio::time::Instant::now();
    {
        let mut phases = stats.phases.lock().unwrap();
        phases.connect_start = Some(start.into_std());
        phases.connect_cpu[0] = Some(CpuMark::now(pid));
    }
    for i in 0..n {
        if args.connect_rate > 0.0 {
            sleep_until(start + Duration::from_secs_f64(i as f64 / args.connect_rate)).await;
        }
        let permit = inflight
            .clone()
            .acquire_owned()
            .await
            .expect("the semaphore is never closed");
        connections.spawn(connection(
            i,
            plan.clone(),
            stats.clone(),
            permit,
            shutdown_rx.clone(),
        ));
    }
    while stats.settled.load(Relaxed) < n {
        stats.settled_changed.notified().await;
    }
    {
        let mut phases = stats.phases.lock().unwrap();
        phases.connect_end = Some(Instant::now());
        phases.connect_cpu[1] = Some(CpuMark::now(pid));
    }
    let established = stats.established.load(Relaxed);
    eprintln!(
        "connected: {established} of {n} in {:.2} s",
        start.elapsed().as_secs_f64()
    );

    // Idle: let the server settle before sampling its memory, then hold.
    let idle_start = tokio::time::Instant::now();
    if let Some((name, value)) = &args.wait_metric {
        let waited = wait_metric(plan, name, *value).await?;
        stats.phases.lock().unwrap().wait_metric_secs = Some(waited);
    }
    if let Some(pid) = pid {
        sleep(Duration::from_secs(1)).await;
        stats.phases.lock().unwrap().rss_after = read_memory(pid);
        copy_smaps(args.smaps_dir.as_deref(), pid, "idle")?;
    }
    hold(
        idle_start + Duration::from_secs(args.hold_secs),
        args.release_file.as_deref(),
    )
    .await;

    if args.publish_max || args.publish_rate > 0 {
        stats.phases.lock().unwrap().publish_cpu[0] = Some(CpuMark::now(pid));
        publish(plan, stats).await?;
        drain(stats, Duration::from_secs(args.drain_secs)).await;
        stats.phases.lock().unwrap().publish_cpu[1] = Some(CpuMark::now(pid));
    }
    if let Some(pid) = pid {
        stats.phases.lock().unwrap().rss_end = read_memory(pid);
    }

    // Close: every connection sends Close and waits briefly for the server's reply.
    let _ = shutdown_tx.send(true);
    let _ = timeout(CLOSE_WAIT + Duration::from_secs(3), async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    Ok(())
}

fn parse_wait_metric(text: &str) -> Result<(String, f64), String> {
    let (name, value) = text
        .split_once('=')
        .ok_or("expected NAME=VALUE, e.g. gateway_sessions_hibernated=10000")?;
    let value = value
        .parse()
        .map_err(|_| format!("{value} is not a number"))?;
    Ok((name.to_owned(), value))
}

/// Polls the server's `/metrics` until `name` is at least `value`; returns the seconds it
/// took. Gives up (an error) after `--max-secs`.
async fn wait_metric(plan: &Plan, name: &str, value: f64) -> anyhow::Result<f64> {
    let url = plan.publish_url.replace("/v1/publish/batch", "/metrics");
    let client = reqwest::Client::builder().no_proxy().build()?;
    let start = Instant::now();
    let mut last = None;
    while start.elapsed() < Duration::from_secs(plan.args.max_secs) {
        if let Ok(response) = client.get(&url).send().await
            && let Ok(text) = response.text().await
        {
            last = text.lines().find_map(|line| {
                let (key, v) = line.rsplit_once(' ')?;
                (key == name).then(|| v.parse::<f64>().ok())?
            });
            if last.is_some_and(|v| v >= value) {
                let waited = start.elapsed().as_secs_f64();
                eprintln!("{name} reached {value} after {waited:.1} s");
                return Ok(waited);
            }
        }
        sleep(Duration::from_millis(200)).await;
    }
    bail!("{name} did not reach {value} at {url} (last seen: {last:?})")
}

/// Sleeps until `until`, or until `release` exists if that comes first.
async fn hold(until: tokio::time::Instant, release: Option<&std::path::Path>) {
    let Some(release) = release else {
        return sleep_until(until).await;
    };
    while tokio::time::Instant::now() < until && !release.exists() {
        sleep(Duration::from_millis(100).min(until - tokio::time::Instant::now())).await;
    }
}

/// Why a connection attempt failed: a short label to count by and a message to print.
struct ConnectError {
    reason: String,
    message: String,
}

impl ConnectError {
    fn io(stage: &str, err: &std::io::Error) -> Self {
        ConnectError {
            reason: format!("{stage}: {:?}", err.kind()),
            message: format!("{stage}: {err}"),
        }
    }

    fn ws(stage: &str, err: &WsError) -> Self {
        let reason = match err {
            WsError::Http(response) => format!("{stage}: HTTP {}", response.status().as_u16()),
            WsError::Io(io) => format!("{stage}: {:?}", io.kind()),
            WsError::ConnectionClosed | WsError::AlreadyClosed => format!("{stage}: closed"),
            WsError::Protocol(_) => format!("{stage}: protocol error"),
            _ => format!("{stage}: other"),
        };
        let mut message = format!("{stage}: {err}");
        // The gateway explains a refusal in the body (`{"error", "reason"}`).
        if let WsError::Http(response) = err
            && let Some(body) = response.body()
        {
            let body = String::from_utf8_lossy(&body[..body.len().min(300)]);
            let _ = write!(message, ": {body}");
        }
        ConnectError { reason, message }
    }

    fn other(reason: &str, message: String) -> Self {
        ConnectError {
            reason: reason.to_owned(),
            message,
        }
    }
}

/// A connection's byte stream: plain TCP, or TLS over it.
trait Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Io for T {}

type Ws = WebSocketStream<Box<dyn Io>>;

/// One client connection: a WebSocket or an SSE stream.
enum Conn {
    Ws(Ws),
    Sse(SseStream),
}

/// The request for `/sse`, then the welcome, as [`open`] does for a WebSocket.
async fn open_sse(
    plan: &Plan,
    i: u64,
    user: u64,
    mut stream: Box<dyn Io>,
) -> Result<(Conn, Vec<String>), ConnectError> {
    use tokio::io::AsyncWriteExt as _;
    let url = reqwest::Url::parse(&plan.ws_url).expect("checked by parse_url");
    let path = match url.path().strip_suffix("/ws") {
        Some(base) => format!("{base}/sse"),
        None => url.path().to_owned(),
    };
    let request = format!(
        "GET {path} HTTP/1.1\r\nhost: {}\r\nauthorization: {}\r\naccept: text/event-stream\r\n\r\n",
        plan.target, plan.user_auth[user as usize]
    );
    stream
        .write_all(request.as_bytes())
        .await
        .map_err(|e| ConnectError::io("request", &e))?;
    let mut sse = SseStream {
        io: tokio::io::BufReader::with_capacity(8 << 10, stream),
        body: Vec::new(),
        ended: false,
    };
    let status = sse
        .head()
        .await
        .map_err(|e| ConnectError::io("response", &e))?;
    if status != 200 {
        return Err(ConnectError::other(
            &format!("handshake: HTTP {status}"),
            format!("connection {i}: /sse answered {status}"),
        ));
    }
    let mut early = Vec::new();
    loop {
        match sse.next_event().await {
            Ok(Some((kind, data))) if kind.is_empty() => {
                let frame = serde_json::from_str::<FrameType>(&data).map(|f| f.kind);
                if frame.as_deref().is_ok_and(|k| k == "welcome") {
                    return Ok((Conn::Sse(sse), early));
                }
                early.push(data);
            }
            Ok(Some(_)) => {}
            Ok(None) => {
                return Err(ConnectError::other(
                    "closed before welcome",
                    format!("connection {i}: stream ended before welcome"),
                ));
            }
            Err(err) => return Err(ConnectError::io("before welcome", &err)),
        }
    }
}

/// A server-sent event stream over HTTP/1.1 with chunked transfer encoding (what the gateway
/// sends), read without an HTTP client so that each connection costs little here.
struct SseStream {
    io: tokio::io::BufReader<Box<dyn Io>>,
    /// De-chunked body bytes not yet parsed into events.
    body: Vec<u8>,
    ended: bool,
}

impl SseStream {
    /// Reads the status line and headers; returns the status.
    async fn head(&mut self) -> std::io::Result<u16> {
        use tokio::io::AsyncBufReadExt as _;
        let mut line = String::new();
        self.io.read_line(&mut line).await?;
        let status = line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| std::io::Error::other(format!("bad status line {line:?}")))?;
        loop {
            line.clear();
            if self.io.read_line(&mut line).await? == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            if line == "\r\n" {
                return Ok(status);
            }
        }
    }

    /// The next event as (event name, empty for plain messages; data); `None` at the end.
    async fn next_event(&mut self) -> std::io::Result<Option<(String, String)>> {
        loop {
            if let Some(end) = self.body.windows(2).position(|w| w == b"\n\n") {
                let block: Vec<u8> = self.body.drain(..end + 2).collect();
                let block = String::from_utf8_lossy(&block);
                let (mut kind, mut data) = (String::new(), Vec::new());
                for line in block.lines() {
                    if let Some(value) = line.strip_prefix("data: ") {
                        data.push(value);
                    } else if let Some(value) = line.strip_prefix("event: ") {
                        kind = value.to_owned();
                    }
                }
                if data.is_empty() && kind.is_empty() {
                    continue; // a comment (heartbeat) or an id alone
                }
                return Ok(Some((kind, data.join("\n"))));
            }
            if self.ended || !self.chunk().await? {
                return Ok(None);
            }
        }
    }

    /// One chunk of the body onto `body`; false at the last chunk.
    async fn chunk(&mut self) -> std::io::Result<bool> {
        use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _};
        let mut line = String::new();
        if self.io.read_line(&mut line).await? == 0 {
            self.ended = true;
            return Ok(false);
        }
        let size = line.trim_end().split(';').next().unwrap_or("");
        let size = usize::from_str_radix(size, 16)
            .map_err(|_| std::io::Error::other(format!("bad chunk size {line:?}")))?;
        if size == 0 {
            self.ended = true;
            return Ok(false);
        }
        let start = self.body.len();
        self.body.resize(start + size + 2, 0);
        self.io.read_exact(&mut self.body[start..]).await?;
        self.body.truncate(start + size); // the chunk's CRLF
        Ok(true)
    }
}

/// The client TLS of a `wss://` run: trusting exactly `--ca`.
fn tls_for(
    args: &Args,
) -> anyhow::Result<
    Option<(
        tokio_rustls::TlsConnector,
        rustls::pki_types::ServerName<'static>,
    )>,
> {
    use rustls::pki_types::pem::PemObject as _;
    if !args.url.starts_with("wss://") {
        return Ok(None);
    }
    let ca = args
        .ca
        .as_ref()
        .context("--url wss://... needs --ca FILE")?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls::pki_types::CertificateDer::pem_file_iter(ca)
        .with_context(|| format!("cannot read --ca {}", ca.display()))?
    {
        roots.add(cert.with_context(|| format!("--ca {}", ca.display()))?)?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let host = reqwest::Url::parse(&args.url)?
        .host_str()
        .context("--url has no host")?
        .to_owned();
    let name = rustls::pki_types::ServerName::try_from(host)?;
    Ok(Some((
        tokio_rustls::TlsConnector::from(Arc::new(config)),
        name,
    )))
}

/// One connection: open it (holding an in-flight permit), then read until shutdown.
async fn connection(
    i: u64,
    plan: Arc<Plan>,
    stats: Arc<Stats>,
    permit: OwnedSemaphorePermit,
    mut shutdown: watch::Receiver<bool>,
) {
    let user = i % plan.args.users;
    let user_name = format!("u{}", plan.args.user_offset + user);
    let started = Instant::now();
    let opened = timeout(
        Duration::from_secs(plan.args.connect_timeout_secs),
        open(&plan, i, user),
    )
    .await;
    drop(permit);
    let mut reader = Reader {
        user: user_name,
        shard: &stats.latency_us[i as usize % SHARDS],
        stats: &stats,
        last_seq: 0,
        seen: SeqSet::default(),
    };
    let conn = match opened {
        Ok(Ok((conn, early))) => {
            let us = started.elapsed().as_micros() as u64;
            stats.connect_us.lock().unwrap().saturating_record(us);
            stats.established.fetch_add(1, Relaxed);
            stats.per_user[user as usize].fetch_add(1, Relaxed);
            stats.settle();
            for text in early {
                reader.on_text(&text);
            }
            conn
        }
        Ok(Err(err)) => return stats.connect_failed(err),
        Err(_) => {
            return stats.connect_failed(ConnectError::other(
                "timeout",
                format!(
                    "connection {i}: no welcome frame within {} s",
                    plan.args.connect_timeout_secs
                ),
            ));
        }
    };

    // Made once: a `changed()` made in every turn would join and leave the watch's waiter
    // list for every frame, which is loadgen CPU taken from the server it measures.
    let stop = shutdown.changed();
    tokio::pin!(stop);
    let mut ws = match conn {
        Conn::Ws(ws) => ws,
        Conn::Sse(mut sse) => loop {
            tokio::select! {
                event = sse.next_event() => match event {
                    Ok(Some((kind, data))) if kind.is_empty() => reader.on_text(&data),
                    Ok(Some((kind, data))) if kind == "close" => {
                        return stats.closed_early(format!("close {data}"));
                    }
                    Ok(Some(_)) => {}
                    Ok(None) => return stats.closed_early("stream ended".to_owned()),
                    Err(err) => return stats.closed_early(format!("read error: {err}")),
                },
                _ = &mut stop => return,
            }
        },
    };
    loop {
        tokio::select! {
            msg = ws.next() => match msg {
                Some(Ok(Message::Text(text))) => reader.on_text(&text),
                Some(Ok(Message::Close(frame))) => {
                    let reason = match frame {
                        Some(f) => format!("close {} {}", u16::from(f.code), f.reason),
                        None => "close without code".to_owned(),
                    };
                    return stats.closed_early(reason);
                }
                // Pings are answered by tungstenite itself on the next read.
                Some(Ok(_)) => {}
                Some(Err(err)) => return stats.closed_early(format!("read error: {err}")),
                None => return stats.closed_early("stream ended".to_owned()),
            },
            // Err means the sender is gone, which also means stop.
            _ = &mut stop => break,
        }
    }
    let _ = timeout(CLOSE_WAIT, async {
        let _ = ws.close(None).await;
        // Read until the server's Close reply ends the stream.
        while let Some(Ok(_)) = ws.next().await {}
    })
    .await;
}

/// TCP connect from this connection's source address, WebSocket handshake (or SSE request),
/// welcome frame. Returns the connection and any text frames that came before the welcome.
async fn open(plan: &Plan, i: u64, user: u64) -> Result<(Conn, Vec<String>), ConnectError> {
    let source = plan.sources[i as usize % plan.sources.len()];
    let socket = match source {
        IpAddr::V4(_) => TcpSocket::new_v4(),
        IpAddr::V6(_) => TcpSocket::new_v6(),
    }
    .map_err(|e| ConnectError::io("socket", &e))?;
    socket
        .bind(SocketAddr::new(source, 0))
        .map_err(|e| ConnectError::io(&format!("bind {source}"), &e))?;
    let stream = socket
        .connect(plan.target)
        .await
        .map_err(|e| ConnectError::io("tcp connect", &e))?;
    let _ = stream.set_nodelay(true);
    let stream: Box<dyn Io> = match &plan.tls {
        None => Box::new(stream),
        Some((connector, name)) => Box::new(
            connector
                .connect(name.clone(), stream)
                .await
                .map_err(|e| ConnectError::io("tls handshake", &e))?,
        ),
    };

    if plan.args.sse {
        return open_sse(plan, i, user, stream).await;
    }
    let mut request = plan
        .ws_url
        .as_str()
        .into_client_request()
        .map_err(|e| ConnectError::ws("request", &e))?;
    let auth = plan.user_auth[user as usize]
        .parse()
        .map_err(|_| ConnectError::other("request", "token is not a header value".into()))?;
    request.headers_mut().insert("authorization", auth);
    // Small buffers: tungstenite's 128 KiB defaults would cost gigabytes at 20k connections.
    let config = WebSocketConfig::default()
        .read_buffer_size(8 << 10)
        .write_buffer_size(0);
    let (mut ws, _) = tokio_tungstenite::client_async_with_config(request, stream, Some(config))
        .await
        .map_err(|e| ConnectError::ws("handshake", &e))?;

    let mut early = Vec::new();
    loop {
        match ws.next().await {
            Some(Ok(Message::Text(text))) => {
                let kind = serde_json::from_str::<FrameType>(&text).map(|f| f.kind);
                if kind.as_deref().is_ok_and(|k| k == "welcome") {
                    return Ok((Conn::Ws(ws), early));
                }
                early.push(text.as_str().to_owned());
            }
            Some(Ok(Message::Close(frame))) => {
                let why = frame.map(|f| format!("{} {}", u16::from(f.code), f.reason));
                return Err(ConnectError::other(
                    "closed before welcome",
                    format!("connection {i}: closed before welcome: {why:?}"),
                ));
            }
            Some(Ok(_)) => {}
            Some(Err(err)) => return Err(ConnectError::ws("before welcome", &err)),
            None => {
                return Err(ConnectError::other(
                    "closed before welcome",
                    format!("connection {i}: stream ended before welcome"),
                ));
            }
        }
    }
}

#[derive(Deserialize)]
struct FrameType<'a> {
    #[serde(rename = "type", borrow)]
    kind: Cow<'a, str>,
}

/// The parts of a server frame loadgen looks at; borrowed from the frame text where possible
/// so a frame costs one parse and no allocation.
#[derive(Deserialize)]
struct Incoming<'a> {
    #[serde(rename = "type", borrow)]
    frame_type: Cow<'a, str>,
    #[serde(default)]
    seq: Option<u64>,
    #[serde(default, borrow)]
    kind: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    payload: Option<BenchPayload<'a>>,
}

#[derive(Deserialize)]
struct BenchPayload<'a> {
    #[serde(default, borrow)]
    user: Option<Cow<'a, str>>,
    #[serde(default)]
    ts_us: Option<u64>,
}

/// Per-connection receive state.
struct Reader<'a> {
    user: String,
    shard: &'a Mutex<Histogram<u64>>,
    stats: &'a Stats,
    last_seq: u64,
    /// Every seq this connection received, to tell a duplicate from a new event.
    seen: SeqSet,
}

/// A set of seqs as sorted, disjoint, non-adjacent inclusive ranges. A user's seqs run on by
/// one (embedded mode), so a connection's set is one range however many events it gets; in
/// cluster mode other users' events leave gaps, and it costs 16 bytes an event. Adding at the
/// end, the order a correct server delivers in, is O(1).
#[derive(Default)]
struct SeqSet {
    ranges: Vec<(u64, u64)>,
}

impl SeqSet {
    /// Adds `seq`; false if it was already there.
    fn insert(&mut self, seq: u64) -> bool {
        match self.ranges.last_mut() {
            None => {
                self.ranges.push((seq, seq));
                return true;
            }
            Some(last) if seq > last.1 => {
                if seq == last.1 + 1 {
                    last.1 = seq;
                } else {
                    self.ranges.push((seq, seq));
                }
                return true;
            }
            Some(_) => {}
        }
        // Out of order: the first range ending at or after seq exists (the last one does).
        let i = self.ranges.partition_point(|r| r.1 < seq);
        if self.ranges[i].0 <= seq {
            return false;
        }
        // seq < ranges[i].0 <= u64::MAX, so seq + 1 does not overflow.
        let joins_previous = i > 0 && self.ranges[i - 1].1 + 1 == seq;
        let joins_next = self.ranges[i].0 == seq + 1;
        match (joins_previous, joins_next) {
            (true, true) => {
                self.ranges[i - 1].1 = self.ranges[i].1;
                self.ranges.remove(i);
            }
            (true, false) => self.ranges[i - 1].1 = seq,
            (false, true) => self.ranges[i].0 = seq,
            (false, false) => self.ranges.insert(i, (seq, seq)),
        }
        true
    }
}

impl Reader<'_> {
    fn on_text(&mut self, text: &str) {
        let frame = match serde_json::from_str::<Incoming>(text) {
            Ok(frame) => frame,
            // A payload that is not an object fails the fast parse; only a bench event
            // matters, and a bench event always has an object payload.
            Err(_) => {
                let value: Value = serde_json::from_str(text).unwrap_or(Value::Null);
                if value["type"] == "event" && value["kind"] == "bench" {
                    self.stats.malformed.fetch_add(1, Relaxed);
                }
                return;
            }
        };
        if frame.frame_type != "event" || frame.kind.as_deref() != Some("bench") {
            return;
        }
        let now = unix_micros();
        let Some(BenchPayload {
            user: Some(user),
            ts_us: Some(sent),
        }) = frame.payload
        else {
            self.stats.malformed.fetch_add(1, Relaxed);
            return;
        };
        if user != self.user {
            // The one result that must never happen: isolation between users is broken.
            if self.stats.misdeliveries.fetch_add(1, Relaxed) < MAX_ERROR_SAMPLES as u64 {
                eprintln!(
                    "MISDELIVERY: a connection of {} received seq {:?} meant for {user}",
                    self.user, frame.seq
                );
            }
            return;
        }
        let Some(seq) = frame.seq else {
            self.stats.malformed.fetch_add(1, Relaxed);
            return;
        };
        if seq <= self.last_seq {
            self.stats.seq_regressions.fetch_add(1, Relaxed);
        }
        self.last_seq = seq;
        self.stats.received.fetch_add(1, Relaxed);
        if !self.seen.insert(seq) {
            self.stats.duplicates.fetch_add(1, Relaxed);
            return;
        }
        self.stats.distinct.fetch_add(1, Relaxed);
        self.stats.last_receive_us.fetch_max(now, Relaxed);
        self.shard
            .lock()
            .unwrap()
            .saturating_record(now.saturating_sub(sent));
    }
}

#[derive(Deserialize)]
struct BatchResponse {
    results: Vec<Receipt>,
}

#[derive(Deserialize)]
struct Receipt {
    /// Null in cluster mode: every node takes the event from the stream.
    queued: Option<u64>,
}

/// Publish phase: `--publishers` tasks sharing the total rate, for `--publish-secs`.
async fn publish(plan: &Arc<Plan>, stats: &Arc<Stats>) -> anyhow::Result<()> {
    let args = &plan.args;
    let client = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(10))
        .pool_max_idle_per_host(args.publishers as usize)
        .build()
        .context("cannot build the HTTP client")?;
    let start = tokio::time::Instant::now();
    {
        let mut phases = stats.phases.lock().unwrap();
        phases.publish_start = Some(start.into_std());
        phases.publish_start_us = unix_micros();
    }
    let end = start + Duration::from_secs(args.publish_secs);
    let mut publishers = JoinSet::new();
    if let Some(pid) = args.server_pid {
        let (stats, half) = (stats.clone(), Duration::from_secs(args.publish_secs) / 2);
        publishers.spawn(async move {
            sleep(half).await;
            stats.phases.lock().unwrap().rss_publishing = read_memory(pid);
        });
    }
    for id in 0..args.publishers {
        publishers.spawn(publisher(
            id,
            plan.clone(),
            stats.clone(),
            client.clone(),
            start,
            end,
        ));
    }
    while publishers.join_next().await.is_some() {}
    stats.phases.lock().unwrap().publish_end = Some(Instant::now());
    Ok(())
}

/// Sends its share of batches on a fixed schedule: batch k of publisher `id` is due at
/// `(k * publishers + id) * batch / rate` seconds, so the publishers interleave evenly. A
/// publisher that falls behind sends back to back; nothing is sent after `end`. With
/// `--publish-max` every batch is due at once: the next goes as soon as one is answered.
async fn publisher(
    id: u64,
    plan: Arc<Plan>,
    stats: Arc<Stats>,
    client: reqwest::Client,
    start: tokio::time::Instant,
    end: tokio::time::Instant,
) {
    let args = &plan.args;
    let interval = if args.publish_max {
        0.0
    } else {
        args.batch as f64 / args.publish_rate as f64
    };
    for k in 0.. {
        let due = start + Duration::from_secs_f64((k * args.publishers + id) as f64 * interval);
        if due >= end || tokio::time::Instant::now() >= end {
            break;
        }
        sleep_until(due).await;
        let first = stats.next_event.fetch_add(args.batch, Relaxed);
        let users = match args.active_users {
            0 => args.users,
            active => active.min(args.users),
        };
        let body = batch_body(first, args.batch, users, args.user_offset, unix_micros());
        let sent = client
            .post(&plan.publish_url)
            .header(reqwest::header::AUTHORIZATION, &plan.publisher_auth)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body)
            .send()
            .await;
        let response = match sent {
            Ok(r) if r.status().is_success() => r,
            Ok(r) => {
                let status = r.status();
                let body = r.text().await.unwrap_or_default();
                let body = &body[..body.floor_char_boundary(300)];
                let kind = format!("publish: HTTP {}", status.as_u16());
                publish_failed(&stats, &kind, format!("{kind}: {body}"));
                continue;
            }
            Err(err) => {
                publish_failed(&stats, "publish: request", format!("publish: {err}"));
                continue;
            }
        };
        match response.json::<BatchResponse>().await {
            Ok(answer) => {
                let queued: u64 = answer
                    .results
                    .iter()
                    .zip(first..)
                    .map(|(r, n)| {
                        r.queued.unwrap_or_else(|| {
                            // Owed to every connection of the event's user this run holds.
                            stats
                                .per_user
                                .get((n % users) as usize)
                                .map_or(0, |c| c.load(Relaxed))
                        })
                    })
                    .sum();
                stats
                    .published
                    .fetch_add(answer.results.len() as u64, Relaxed);
                stats.expected.fetch_add(queued, Relaxed);
            }
            Err(err) => publish_failed(
                &stats,
                "publish: answer",
                format!("publish: unreadable answer: {err}"),
            ),
        }
    }
}

fn publish_failed(stats: &Stats, kind: &str, message: String) {
    stats.publish_errors.fetch_add(1, Relaxed);
    stats.sample_error(kind, message);
}

/// `{"events":[...]}` for events `first..first + count`, built by hand: it is the hot path
/// of the publishers and the shape is fixed.
fn batch_body(first: u64, count: u64, users: u64, user_offset: u64, ts_us: u64) -> String {
    let mut body = String::with_capacity(16 + count as usize * 112);
    body.push_str(r#"{"events":["#);
    for n in first..first + count {
        if n > first {
            body.push(',');
        }
        let user = user_offset + n % users;
        let _ = write!(
            body,
            r#"{{"user_id":"u{user}","kind":"bench","payload":{{"user":"u{user}","ts_us":{ts_us},"n":{n}}}}}"#
        );
    }
    body.push_str("]}");
    body
}

/// Waits until every expected event has arrived, or `limit` has passed.
async fn drain(stats: &Stats, limit: Duration) {
    let deadline = tokio::time::Instant::now() + limit;
    while stats.distinct.load(Relaxed) < stats.expected.load(Relaxed)
        && tokio::time::Instant::now() < deadline
    {
        sleep(Duration::from_millis(20)).await;
    }
}

/// A status line on stderr every two seconds, so a long run shows where it is.
async fn print_progress(stats: Arc<Stats>, plan: Arc<Plan>) {
    let start = Instant::now();
    loop {
        sleep(Duration::from_secs(2)).await;
        eprintln!(
            "[{:>5.1}s] established {}/{} failed {} | published {} expected {} received {}",
            start.elapsed().as_secs_f64(),
            stats.established.load(Relaxed),
            plan.args.connections,
            stats.connect_failures.load(Relaxed),
            stats.published.load(Relaxed),
            stats.expected.load(Relaxed),
            stats.received.load(Relaxed),
        );
    }
}

/// VmRSS, VmHWM and PSS of a process, in KiB.
/// `/proc/<pid>/smaps` and `status` to `dir/<name>.smaps` and `dir/<name>.status`.
fn copy_smaps(dir: Option<&std::path::Path>, pid: u32, name: &str) -> anyhow::Result<()> {
    let Some(dir) = dir else { return Ok(()) };
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    for what in ["smaps", "status"] {
        let to = dir.join(format!("{name}.{what}"));
        std::fs::copy(format!("/proc/{pid}/{what}"), &to)
            .with_context(|| format!("cannot copy /proc/{pid}/{what} to {}", to.display()))?;
    }
    Ok(())
}

fn read_memory(pid: u32) -> Option<Memory> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| -> Option<u64> {
        let line = status.lines().find(|l| l.starts_with(name))?;
        line[name.len()..]
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()
            .ok()
    };
    let pss_kib = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
        .ok()
        .and_then(|rollup| {
            let line = rollup.lines().find(|l| l.starts_with("Pss:"))?;
            line["Pss:".len()..]
                .trim()
                .trim_end_matches("kB")
                .trim()
                .parse()
                .ok()
        });
    Some(Memory {
        rss_kib: field("VmRSS:")?,
        hwm_kib: field("VmHWM:")?,
        pss_kib,
    })
}

/// User plus system CPU seconds of a process (all its threads), `pid` = "self" or a number.
fn cpu_seconds(pid: &str) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces; the fields after it are plain numbers,
    // starting with field 3 (state). utime and stime are fields 14 and 15.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) as f64 / CLOCK_TICKS_PER_SEC)
}

/// Milliseconds at the given quantiles (plus max) of a microsecond histogram; null if empty.
fn quantiles_ms(h: &Histogram<u64>, quantiles: &[(&str, f64)]) -> Value {
    if h.is_empty() {
        let mut out = serde_json::Map::new();
        for (name, _) in quantiles {
            out.insert((*name).into(), Value::Null);
        }
        out.insert("max".into(), Value::Null);
        return Value::Object(out);
    }
    let ms = |us: u64| Value::from(us as f64 / 1000.0);
    let mut out = serde_json::Map::new();
    for (name, q) in quantiles {
        out.insert((*name).into(), ms(h.value_at_quantile(*q)));
    }
    out.insert("max".into(), ms(h.max()));
    Value::Object(out)
}

fn build_report(
    plan: &Plan,
    stats: &Stats,
    duration: f64,
    own_cpu: Option<f64>,
    server_cpu: Option<f64>,
    timed_out: bool,
) -> Value {
    let args = &plan.args;
    let phases = stats.phases.lock().unwrap();
    let established = stats.established.load(Relaxed);
    let now = Instant::now();
    // A phase cut short by the time limit is measured up to now.
    let connect_secs = phases.connect_start.map(|s| {
        phases
            .connect_end
            .unwrap_or(now)
            .duration_since(s)
            .as_secs_f64()
    });
    let connect_rate = connect_secs
        .filter(|s| *s > 0.0)
        .map(|s| established as f64 / s);

    let mut latency = histogram();
    for shard in &stats.latency_us {
        latency.add(&*shard.lock().unwrap()).expect("same bounds");
    }
    let connect = stats.connect_us.lock().unwrap().clone();

    let published = stats.published.load(Relaxed);
    let expected = stats.expected.load(Relaxed);
    let received = stats.received.load(Relaxed);
    let distinct = stats.distinct.load(Relaxed);
    // Receive rate over the publish phase: from its start to the last event received.
    let last_rx = stats.last_receive_us.load(Relaxed);
    let receive_secs = (phases.publish_start.is_some() && last_rx > phases.publish_start_us)
        .then(|| (last_rx - phases.publish_start_us) as f64 / 1e6);
    let send_secs = phases.publish_start.map(|s| {
        phases
            .publish_end
            .unwrap_or(now)
            .duration_since(s)
            .as_secs_f64()
    });

    let rss = |m: Option<Memory>| m.map(|m| m.rss_kib);
    let per_connection = match (phases.rss_before, phases.rss_after) {
        (Some(before), Some(after)) if established > 0 => {
            Some((after.rss_kib as f64 - before.rss_kib as f64) / established as f64)
        }
        _ => None,
    };
    let pss_per_connection = match (phases.rss_before, phases.rss_after) {
        (Some(before), Some(after)) if established > 0 => before
            .pss_kib
            .zip(after.pss_kib)
            .map(|(b, a)| (a as f64 - b as f64) / established as f64),
        _ => None,
    };
    let publishing_per_connection = match (phases.rss_before, phases.rss_publishing) {
        (Some(before), Some(during)) if established > 0 => {
            Some((during.rss_kib as f64 - before.rss_kib as f64) / established as f64)
        }
        _ => None,
    };
    let round2 = |x: f64| (x * 100.0).round() / 100.0;
    let rate =
        |count: u64, secs: Option<f64>| secs.filter(|s| *s > 0.0).map(|s| round2(count as f64 / s));

    let mut report = json!({
        "target": plan.ws_url,
        "connections_requested": args.connections,
        "connections_established": established,
        "connect_failures": stats.connect_failures.load(Relaxed),
        "connect_failure_reasons": *stats.failure_reasons.lock().unwrap(),
        "source_ips": plan.sources.len(),
        "connect_secs": connect_secs.map(|s| (s * 1000.0).round() / 1000.0),
        "connect_rate_per_sec": connect_rate.map(round2),
        "connect_ms": quantiles_ms(&connect, &[("p50", 0.5), ("p99", 0.99)]),
        "closed_by_server": stats.closed_early.load(Relaxed),
        "closed_reasons": *stats.closed_reasons.lock().unwrap(),
        "publish_rate_target": if args.publish_max { Value::from("max") } else { Value::from(args.publish_rate) },
        "events_published": published,
        "events_published_per_sec": rate(published, send_secs),
        "publish_errors": stats.publish_errors.load(Relaxed),
        "events_expected": expected,
        "events_received": received,
        "events_distinct": distinct,
        "events_per_sec": rate(distinct, receive_secs),
        "latency_ms": quantiles_ms(&latency, &[("p50", 0.5), ("p99", 0.99), ("p999", 0.999)]),
        "misdeliveries": stats.misdeliveries.load(Relaxed),
        "losses": expected.saturating_sub(distinct),
        "duplicates": stats.duplicates.load(Relaxed),
        "malformed_events": stats.malformed.load(Relaxed),
        "seq_regressions": stats.seq_regressions.load(Relaxed),
        "server_rss_kib_before": rss(phases.rss_before),
        "server_rss_kib_after": rss(phases.rss_after),
        "server_rss_kib_end": rss(phases.rss_end),
        "server_hwm_kib_end": phases.rss_end.map(|m| m.hwm_kib),
        "rss_kib_per_connection": per_connection.map(round2),
        "server_pss_kib_after": phases.rss_after.and_then(|m| m.pss_kib),
        "pss_kib_per_connection": pss_per_connection.map(round2),
        "rss_kib_per_connection_publishing": publishing_per_connection.map(round2),
        "server_cpu_percent": server_cpu.map(round2),
        "loadgen_cpu_percent": own_cpu.map(round2),
        "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        "duration_secs": round2(duration),
        "timed_out": timed_out,
        "error_samples": stats
            .error_samples
            .lock()
            .unwrap()
            .iter()
            .map(|(_, message)| message.clone())
            .collect::<Vec<_>>(),
    });
    // CPU use per phase (100 = one core; the totals above cover the whole run) and the run's
    // settings, so that a JSON file describes itself (a separate object: one json! call this
    // large would exceed the macro recursion limit).
    let (own_connect_cpu, server_connect_cpu) = CpuMark::percent(&phases.connect_cpu);
    let (own_publish_cpu, server_publish_cpu) = CpuMark::percent(&phases.publish_cpu);
    let settings = json!({
        "loadgen_cpu_percent_connect": own_connect_cpu.map(round2),
        "server_cpu_percent_connect": server_connect_cpu.map(round2),
        "loadgen_cpu_percent_publish": own_publish_cpu.map(round2),
        "server_cpu_percent_publish": server_publish_cpu.map(round2),
        "users": args.users,
        "user_offset": args.user_offset,
        "source_ip_first": plan.sources.first().map(|ip| ip.to_string()),
        "max_inflight": args.max_inflight,
        "connect_rate_target": args.connect_rate,
        "publish_max": args.publish_max,
        "publish_secs": args.publish_secs,
        "batch": args.batch,
        "publishers": args.publishers,
        "active_users": args.active_users,
        "wait_metric_secs": phases.wait_metric_secs.map(round2),
    });
    if let (Some(report), Value::Object(settings)) = (report.as_object_mut(), settings) {
        report.extend(settings);
    }
    report
}

/// The report as a table in reading order (the JSON object's keys are sorted by name).
fn print_table(report: &Value) {
    const ROWS: &[(&str, &str)] = &[
        ("target", "target"),
        ("connections requested", "connections_requested"),
        ("connections established", "connections_established"),
        ("connect failures", "connect_failures"),
        ("source addresses", "source_ips"),
        ("connect phase secs", "connect_secs"),
        ("connect rate /s", "connect_rate_per_sec"),
        ("connect ms", "connect_ms"),
        ("closed by server early", "closed_by_server"),
        ("publish rate target /s", "publish_rate_target"),
        ("events published", "events_published"),
        ("published /s", "events_published_per_sec"),
        ("publish errors", "publish_errors"),
        ("events expected", "events_expected"),
        ("events received", "events_received"),
        ("distinct received", "events_distinct"),
        ("received /s", "events_per_sec"),
        ("latency ms", "latency_ms"),
        ("losses", "losses"),
        ("DUPLICATES", "duplicates"),
        ("MISDELIVERIES", "misdeliveries"),
        ("malformed events", "malformed_events"),
        ("seq regressions", "seq_regressions"),
        ("server RSS KiB before", "server_rss_kib_before"),
        ("server RSS KiB after", "server_rss_kib_after"),
        ("server RSS KiB at end", "server_rss_kib_end"),
        ("server peak RSS KiB", "server_hwm_kib_end"),
        ("RSS KiB per connection", "rss_kib_per_connection"),
        ("PSS KiB per connection", "pss_kib_per_connection"),
        ("server CPU %", "server_cpu_percent"),
        ("loadgen CPU %", "loadgen_cpu_percent"),
        ("server CPU % connecting", "server_cpu_percent_connect"),
        ("loadgen CPU % connecting", "loadgen_cpu_percent_connect"),
        ("server CPU % publishing", "server_cpu_percent_publish"),
        ("loadgen CPU % publishing", "loadgen_cpu_percent_publish"),
        ("CPUs", "cpus"),
        ("duration secs", "duration_secs"),
        ("timed out", "timed_out"),
    ];
    let show = |value: &Value| match value {
        Value::Null => "-".to_owned(),
        Value::String(s) => s.clone(),
        // Quantiles in rising order, then any other entries (reason -> count).
        Value::Object(map) if map.is_empty() => "-".to_owned(),
        Value::Object(map) => {
            let order = ["p50", "p99", "p999", "max"];
            let known = order.iter().filter_map(|k| Some((*k, map.get(*k)?)));
            let rest = map
                .iter()
                .filter(|(k, _)| !order.contains(&k.as_str()))
                .map(|(k, v)| (k.as_str(), v));
            known
                .chain(rest)
                .map(|(k, v)| match v {
                    Value::Null => format!("{k} -"),
                    v => format!("{k} {v}"),
                })
                .collect::<Vec<_>>()
                .join("  ")
        }
        other => other.to_string(),
    };
    println!("{:-<64}", "loadgen report ");
    for (label, key) in ROWS {
        println!("{label:<26}{}", show(&report[*key]));
    }
    for (label, key) in [
        ("connect failures by reason", "connect_failure_reasons"),
        ("connections closed early", "closed_reasons"),
    ] {
        if let Some(map) = report[key].as_object().filter(|m| !m.is_empty()) {
            println!("{label}:");
            for (reason, count) in map {
                println!("  {count:>8}  {reason}");
            }
        }
    }
    if let Some(samples) = report["error_samples"].as_array().filter(|a| !a.is_empty()) {
        println!("first error of each kind:");
        for sample in samples {
            println!("  {}", sample.as_str().unwrap_or_default());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::SeqSet;

    #[test]
    fn a_seq_set_tells_new_seqs_from_repeats_in_any_order() {
        let mut set = SeqSet::default();
        for seq in [10, 11, 12, 20, 15, 14, 16, 13, 5, 21, 30] {
            assert!(set.insert(seq), "{seq} is new");
        }
        assert_eq!(set.ranges, [(5, 5), (10, 16), (20, 21), (30, 30)]);
        for seq in [5, 10, 13, 16, 20, 21, 30] {
            assert!(!set.insert(seq), "{seq} was there");
        }
        assert!(set.insert(17) && set.insert(19) && set.insert(18));
        assert_eq!(set.ranges, [(5, 5), (10, 21), (30, 30)]);
    }
}

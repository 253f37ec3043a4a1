//! A gateway node as its own process (the release binary beside the test executable), so a
//! test can kill it with SIGKILL.

use std::time::Instant;

use crate::{WAIT, guests};

/// A gateway node as its own process, so it can be killed with SIGKILL.
pub struct Node {
    pub addr: std::net::SocketAddr,
    child: std::process::Child,
}

impl Node {
    pub fn spawn(nats_url: &str) -> Node {
        Node::spawn_with(nats_url, &[])
    }

    /// With more of the gateway's environment (`GATEWAY_...` settings).
    pub fn spawn_with(nats_url: &str, env: &[(&str, &str)]) -> Node {
        let exe = std::env::current_exe().unwrap();
        let binary = exe.parent().unwrap().parent().unwrap().join("gateway");
        let mut child = std::process::Command::new(&binary)
            .args(["serve", "--listen", "127.0.0.1:0"])
            .env("GATEWAY_JWT_SECRET", crate::SECRET)
            .env("GATEWAY_GUEST", guests::REFERENCE)
            .env("GATEWAY_CLUSTER__NATS_URL", nats_url)
            .env("GATEWAY_LOG", "info")
            .envs(env.iter().copied())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let rx = crate::log_lines(child.stderr.take().unwrap());
        let deadline = Instant::now() + WAIT * 3;
        let addr = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = rx.recv_timeout(left).expect("the node starts listening");
            let line = strip_ansi(&line);
            if line.contains("gateway listening") {
                let at = line.split("addr=").nth(1).expect("an address");
                break at
                    .split_whitespace()
                    .next()
                    .unwrap()
                    .parse()
                    .expect("a socket address");
            }
        };
        // Keep draining its log so it never blocks on a full pipe.
        std::thread::spawn(move || while rx.recv().is_ok() {});
        Node { child, addr }
    }

    pub fn ws_url(&self) -> String {
        format!("ws://{}/ws", self.addr)
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A log line without its colour codes.
fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

//! The chaos checker (issue 20): real gateway nodes (one on its embedded log, or several
//! sharing a 3-server NATS JetStream cluster) under a seeded schedule of faults, with
//! clients that resume like `client.js`, retrying publishers and misbehaving clients; then a
//! check of the recorded history.
//!
//! ```text
//! chaos [--mode cluster|embedded] [--secs 60] [--seed 1] [--nodes 3] [--users 8]
//!       [--clients-per-user 2] [--publishers 3] [--rate 60] [--misbehaving 2]
//!       [--fault-every-secs 6] [--streams 2] [--report target/chaos/report.json]
//!       [--gateway target/release/gateway] [--guest FILE]
//! ```
//!
//! Prints one summary line on stdout,
//! `chaos: N deliveries, C connections, K kills, P pauses, L link cuts, R reloads, 0 misdelivered, 0 lost, 0 duplicated, 0 false recovered`,
//! and, for a violation, the history that shows it; the JSON report holds everything.
//! Exit status: 0 clean, 1 a violation, 2 the run itself failed (a node that would not
//! start or come back). Every child process is killed on the way out, and by a watchdog
//! if this process is killed with SIGKILL (see `chaos::topology`).

use std::process::ExitCode;
use std::time::Duration;

use clap::Parser as _;
use gateway_tests::chaos::{self, Options};

/// SIGTERM (a `timeout`, a CI runner): the run ends like on Ctrl-C, its processes with it.
async fn terminated() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            term.recv().await;
        }
        Err(_) => std::future::pending().await,
    }
}

fn main() -> ExitCode {
    let options = Options::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("chaos: {err}");
            return ExitCode::from(2);
        }
    };
    // Bounded: the workload, then at most the retries, the catch-up and the audit.
    let limit = Duration::from_secs(options.secs + 300);
    let outcome = runtime.block_on(async {
        tokio::select! {
            outcome = tokio::time::timeout(limit, chaos::run(options)) => match outcome {
                Ok(outcome) => outcome,
                Err(_) => Err(anyhow::anyhow!("the run did not finish within {limit:?}")),
            },
            _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted")),
            _ = terminated() => Err(anyhow::anyhow!("terminated")),
        }
    });
    // Whatever is left (tasks holding sockets) goes now; the processes went with the run.
    runtime.shutdown_timeout(Duration::from_secs(1));
    match outcome {
        Ok(outcome) => {
            println!("{}", outcome.summary);
            for line in &outcome.details {
                println!("{line}");
            }
            if !outcome.nemesis_errors.is_empty() {
                ExitCode::from(2)
            } else if outcome.clean() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            }
        }
        Err(err) => {
            eprintln!("chaos: {err:#}");
            ExitCode::from(2)
        }
    }
}

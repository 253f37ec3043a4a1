//! The nemesis: one fault at a time, on a schedule drawn from the run's seed, each healed
//! before the next: a gateway node killed with SIGKILL and started again, a node drained
//! with SIGTERM and started again, a node's guest reloaded under its live sessions
//! (`POST /v1/guest/reload` or SIGHUP), and in cluster mode a NATS server stopped with
//! SIGSTOP (then SIGCONT) or killed with SIGKILL (then started again on its store), and a
//! node's link to NATS cut (every connection through its proxies dropped, new ones refused)
//! and restored.

use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use tokio::sync::{Mutex, watch};

use super::topology::{Topology, tracing_note};
use super::{Clock, Mode, Rng};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Fault {
    KillGateway,
    DrainGateway,
    PauseNats,
    KillNats,
    /// A gateway node's link to NATS cut for a few seconds, then restored.
    CutNatsLink,
    /// The same guest component copied over a node's guest file and reloaded.
    ReloadGuest,
}

/// One fault as it happened.
#[derive(Debug, Clone, Serialize)]
pub struct FaultRecord {
    pub fault: Fault,
    pub target: usize,
    /// When it was applied and when it was healed (the target back and ready).
    pub t_start: u64,
    pub t_healed: u64,
    pub detail: String,
}

#[derive(Debug, Default, Serialize)]
pub struct NemesisLog {
    pub faults: Vec<FaultRecord>,
    /// Heals that failed (a node that did not come back): the run is not trustworthy.
    pub errors: Vec<String>,
}

impl NemesisLog {
    pub fn count(&self, fault: Fault) -> usize {
        self.faults.iter().filter(|f| f.fault == fault).count()
    }
}

/// The faults of a mode, each as often as it is drawn (a kill of a node twice as often).
pub fn weights(mode: Mode) -> &'static [Fault] {
    match mode {
        Mode::Embedded => &[
            Fault::KillGateway,
            Fault::KillGateway,
            Fault::DrainGateway,
            Fault::ReloadGuest,
        ],
        Mode::Cluster => &[
            Fault::KillGateway,
            Fault::KillGateway,
            Fault::DrainGateway,
            Fault::PauseNats,
            Fault::PauseNats,
            Fault::KillNats,
            Fault::CutNatsLink,
            Fault::ReloadGuest,
        ],
    }
}

/// Every kind of fault of a mode once.
pub fn kinds(mode: Mode) -> Vec<Fault> {
    let mut kinds: Vec<Fault> = Vec::new();
    for fault in weights(mode) {
        if !kinds.contains(fault) {
            kinds.push(*fault);
        }
    }
    kinds
}

/// Applies faults every `every` (0.5x to 1.5x, seeded) until `stop`: first every kind of
/// fault once, in a seeded order (so that a short run meets each), then drawn by weight.
pub async fn run(
    topology: Arc<Mutex<Topology>>,
    clock: Clock,
    every: Duration,
    mut rng: Rng,
    mut stop: watch::Receiver<bool>,
) -> NemesisLog {
    let mut log = NemesisLog::default();
    let mut first = kinds(topology.lock().await.mode);
    for i in (1..first.len()).rev() {
        first.swap(i, rng.below(i as u64 + 1) as usize);
    }
    first.reverse();
    loop {
        let wait = every.mul_f64(0.5 + rng.below(1001) as f64 / 1000.0);
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = stop.wait_for(|s| *s) => return log,
        }
        let mut topology = topology.lock().await;
        let fault = match first.pop() {
            Some(fault) => fault,
            None => {
                let faults = weights(topology.mode);
                faults[rng.below(faults.len() as u64) as usize]
            }
        };
        let targets = match fault {
            Fault::KillGateway | Fault::DrainGateway | Fault::CutNatsLink | Fault::ReloadGuest => {
                topology.gateways.len()
            }
            Fault::PauseNats | Fault::KillNats => topology.nats.len(),
        };
        let target = rng.below(targets as u64) as usize;
        let down = Duration::from_millis(rng.range(300, 3_000));
        // Drawn for every fault, so the schedule stays one sequence of draws.
        let sighup = rng.chance(0.5);
        let t_start = clock.now();
        let detail = match apply(&mut topology, fault, target, down, sighup).await {
            Ok(detail) => detail,
            Err(err) => {
                let err = format!("{fault:?} {target}: {err:#}");
                tracing_note(&err);
                log.errors.push(err.clone());
                err
            }
        };
        let record = FaultRecord {
            fault,
            target,
            t_start,
            t_healed: clock.now(),
            detail,
        };
        tracing_note(&format!(
            "t={:.1}s {:?} {} ({})",
            t_start as f64 / 1e6,
            record.fault,
            record.target,
            record.detail
        ));
        log.faults.push(record);
    }
}

async fn apply(
    topology: &mut Topology,
    fault: Fault,
    target: usize,
    down: Duration,
    sighup: bool,
) -> anyhow::Result<String> {
    match fault {
        Fault::KillGateway => {
            topology.gateways[target].kill();
            tokio::time::sleep(down).await;
            topology.start_gateway(target).await?;
            Ok(format!("down {down:?}"))
        }
        Fault::DrainGateway => {
            let how = topology.gateways[target]
                .drain(Duration::from_secs(20))
                .await?;
            tokio::time::sleep(down / 2).await;
            topology.start_gateway(target).await?;
            Ok(how)
        }
        Fault::PauseNats => {
            let server = &mut topology.nats[target];
            server.pause()?;
            // Long enough to make a follower lag or a leader lose its term.
            let stopped = down * 2;
            tokio::time::sleep(stopped).await;
            topology.nats[target].resume()?;
            Ok(format!("stopped {stopped:?}"))
        }
        Fault::KillNats => {
            let server = &mut topology.nats[target];
            server.kill();
            tokio::time::sleep(down).await;
            server.spawn()?;
            server.wait_listening().await?;
            Ok(format!("down {down:?}"))
        }
        Fault::CutNatsLink => {
            topology.cut_link(target)?;
            // Long enough for the node to notice: its pings go unanswered, publishes 503.
            let cut = down * 2;
            tokio::time::sleep(cut).await;
            let how = topology.restore_link(target).await?;
            Ok(format!("cut {cut:?}, {how}"))
        }
        Fault::ReloadGuest => topology.reload_guest(target, sighup).await,
    }
}

/// Undoes whatever is still broken (a paused or dead server, a dead node).
pub async fn heal(topology: &mut Topology) -> anyhow::Result<()> {
    for proxy in topology.links.iter().flatten() {
        proxy.restore();
    }
    for server in &mut topology.nats {
        server.resume()?;
        if !server.running() {
            server.spawn()?;
            server.wait_listening().await?;
        }
    }
    for index in 0..topology.gateways.len() {
        if topology.gateways[index].pid().is_none() {
            topology.start_gateway(index).await?;
        }
    }
    topology.wait_all_ready().await
}

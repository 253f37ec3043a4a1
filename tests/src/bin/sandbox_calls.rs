//! What one guest call costs: the reference handler's `on-event` called in a loop on one
//! instance, through the sandbox and, for comparison, the same handler logic linked natively.
//! Single-threaded and free of sockets, so the numbers are repeatable (and `valgrind
//! --tool=callgrind` counts the same instructions run after run).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use clap::Parser;
use gateway::config::Config;
use gateway::metrics::Metrics;
use gateway::sandbox::{Context, Event, Sandbox};
use gateway_guest::handler::{EventIn, State};

#[derive(Parser)]
#[command(about = "Time the reference handler's on-event through the sandbox and natively")]
struct Args {
    /// The guest component (`make guest` writes target/components/handler.wasm).
    #[arg(long, default_value = "target/components/handler.wasm")]
    guest: PathBuf,
    /// Calls per measurement.
    #[arg(long, default_value_t = 200_000)]
    calls: u64,
    /// Measurements; the median is reported.
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// Instances the sandbox is sized for, as the gateway sizes it for its connection
    /// capacity: up to ~24,000 the memories get full reservations (no bounds checks), above
    /// that compact ones.
    #[arg(long, default_value_t = 1)]
    instances: usize,
    /// Also write the result as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Write /tmp/perf-<pid>.map so `perf report` names the guest's functions.
    #[arg(long)]
    perf_map: bool,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let config = Config {
        guest: Some(args.guest.clone()),
        guest_perf_map: args.perf_map,
        ..Config::default()
    };
    let sandbox = Sandbox::load(
        &args.guest,
        &config,
        args.instances,
        Arc::new(Metrics::new()),
    )?;
    let ctx = Context {
        connection_id: "c1".into(),
        user_id: "u1".into(),
        tenant_id: None,
        session_id: None,
        scopes: Vec::new(),
        expires_at: u64::MAX,
    };
    let mut instance = sandbox.instantiate(&ctx)?;
    instance
        .init(&ctx)
        .map_err(|f| anyhow::anyhow!("init: {}", f.as_str()))?;
    // The shape loadgen publishes: a small JSON payload, no run or thread.
    let event = |seq: u64| Event {
        seq,
        kind: "bench".into(),
        payload: format!(r#"{{"user":"u1","ts_us":1763790000000000,"n":{seq}}}"#),
        run_id: None,
        thread_id: None,
    };

    let mut wasm = Vec::new();
    let mut native = Vec::new();
    let mut state = State::default();
    state.init("c1".into(), "u1".into(), u64::MAX);
    let mut seq = 0;
    for _ in 0..args.rounds {
        let started = Instant::now();
        for _ in 0..args.calls {
            seq += 1;
            let frames = instance
                .on_event(&event(seq))
                .map_err(|f| anyhow::anyhow!("on-event: {}", f.as_str()))?;
            std::hint::black_box(frames);
        }
        wasm.push(started.elapsed().as_nanos() as f64 / args.calls as f64);

        let started = Instant::now();
        for _ in 0..args.calls {
            seq += 1;
            // The same owned copies the sandbox makes when it lowers the event.
            let e = event(seq);
            // A new frame per event, as the host needs an owned frame to send.
            let mut frame = String::new();
            state.event(
                EventIn {
                    seq: e.seq,
                    kind: e.kind,
                    payload: e.payload,
                    run_id: e.run_id,
                    thread_id: e.thread_id,
                },
                &mut frame,
            );
            std::hint::black_box(frame);
        }
        native.push(started.elapsed().as_nanos() as f64 / args.calls as f64);
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (w, n) = (median(&mut wasm), median(&mut native));
    println!("guest memory reservation: {}", sandbox.reservation.as_str());
    println!(
        "on-event, median of {} rounds of {} calls: sandbox {w:.0} ns/call, native {n:.0} ns/call, sandbox overhead {:.0} ns/call",
        args.rounds,
        args.calls,
        w - n
    );
    if let Some(path) = &args.json {
        let report = serde_json::json!({
            "reservation": sandbox.reservation.as_str(),
            "calls": args.calls,
            "rounds": args.rounds,
            "sandbox_ns_per_call": w,
            "native_ns_per_call": n,
            "sandbox_rounds_ns": wasm,
            "native_rounds_ns": native,
        });
        std::fs::write(path, serde_json::to_vec_pretty(&report)?)?;
    }
    Ok(())
}

//! A short run of the load generator against the real gateway: it connects, publishes, and
//! its own checks (recipient, order, duplicates, losses, publish errors) come back clean.
//! Timings are not asserted here; `make bench` measures them.

use gateway_tests::{SECRET, TestGateway};
use serde_json::Value;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loadgen_smoke_run_sees_every_event_at_its_user() {
    let gw = TestGateway::start().await;
    let report = std::env::temp_dir().join(format!("loadgen-smoke-{}.json", std::process::id()));
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_loadgen"));
    command
        .args(["--url", &gw.ws_url()])
        .args(["--connections", "50", "--users", "10"])
        .args(["--publish-rate", "500", "--publish-secs", "1"])
        .args(["--batch", "20"])
        .args(["--max-secs", "60"])
        .arg("--json")
        .arg(&report)
        .env("GATEWAY_JWT_SECRET", SECRET);
    // The gateway runs on this test's runtime; wait for loadgen off it.
    let output = tokio::task::spawn_blocking(move || command.output())
        .await
        .unwrap()
        .unwrap();
    assert!(
        output.status.success(),
        "loadgen failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let report: Value = serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
    assert_eq!(report["connections_established"], 50, "{report}");
    assert_eq!(report["closed_by_server"], 0, "{report}");
    assert_eq!(report["timed_out"], false, "{report}");
    // Nothing to another user, nothing unreadable, nothing out of order or twice, no
    // publish refused: each of these is its own count, so none can offset another.
    for zero in [
        "misdeliveries",
        "malformed_events",
        "seq_regressions",
        "duplicates",
        "losses",
        "publish_errors",
    ] {
        assert_eq!(report[zero], 0, "{zero}: {report}");
    }
    // Every event reached all 5 connections of its user, each once: counted by distinct
    // seq per connection, and as frames.
    let published = report["events_published"].as_u64().unwrap();
    assert!(published > 0, "{report}");
    assert_eq!(report["events_expected"], published * 5, "{report}");
    assert_eq!(report["events_distinct"], published * 5, "{report}");
    assert_eq!(report["events_received"], published * 5, "{report}");
    gw.wait_metric("gateway_sessions_live", 0.0).await;
}

/// A short resume storm: every client reconnects at once with `?since=` after missing a
/// burst, and each gets `recovered: true` and exactly the events it missed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_storm_smoke_run_recovers_every_client() {
    let gw = TestGateway::start().await;
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_resume_storm"));
    command
        .args(["--addr", &gw.addr.to_string()])
        .args(["--clients", "60", "--users", "12", "--missed", "5"])
        .args(["--max-secs", "60"])
        .env("GATEWAY_JWT_SECRET", SECRET);
    let output = tokio::task::spawn_blocking(move || command.output())
        .await
        .unwrap()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "resume_storm failed: {stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let report: Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(report["recovered"], 60, "{report}");
    assert_eq!(report["failures"], 0, "{report}");
    assert!(
        report["history_bytes_per_event"].as_f64().unwrap() > 0.0,
        "{report}"
    );
}

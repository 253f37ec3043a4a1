//! The reference handler written in JavaScript (componentize-js) and in Python
//! (componentize-py), built from `guest/js` and `guest/python` by `make guests`, served over
//! real sockets: the same frames and rules as the Rust one, each connection in its own
//! instance, hibernated between steps and woken with its state.

use std::path::PathBuf;

use gateway::config::Config;
use gateway_tests::{TestGateway, config};
use serde_json::{Value, json};

/// A component `make guests` built (as `make test` does first).
fn built(name: &str) -> String {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../target/components")
        .join(name);
    assert!(
        path.is_file(),
        "{} is missing: `make guests` builds it (`make test` does that first)",
        path.display()
    );
    path.to_string_lossy().into_owned()
}

/// What these guests need: a JavaScript engine's or a Python interpreter's memory at start,
/// and componentize-py's 38 core instances. Compiled code is cached between runs.
fn guest_config(guest: &str) -> Config {
    let mut cfg = config(guest);
    cfg.limits.guest_memory_bytes = 32 << 20;
    cfg.limits.guest_max_instances = 64;
    // Hibernated between the steps below: state must survive a fresh instance.
    cfg.limits.hibernate_after_secs = 1;
    cfg.guest_cache_dir =
        Some(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/guest-cache-tests"));
    cfg
}

async fn publish(gw: &TestGateway, user: &str, kind: &str, thread: &str, payload: Value) -> Value {
    let (status, receipt) = gw
        .publish(
            &gw.publisher_token(),
            &json!({ "user_id": user, "kind": kind, "payload": payload, "run_id": "r1", "thread_id": thread }),
        )
        .await;
    assert_eq!(status, 200, "{receipt}");
    receipt["seq"].clone()
}

/// Waits until the gateway's handlers have all hibernated: no instance left.
async fn hibernated(gw: &TestGateway, sessions: f64) {
    gw.wait_metric("gateway_sessions_hibernated", sessions)
        .await;
    gw.wait_metric("gateway_instances_live", 0.0).await;
}

async fn behaves_like_the_reference_handler(guest: &str, label_prefix: &str) {
    let gw = TestGateway::start_with(guest_config(&built(guest))).await;
    let mut alice = gw.connect("alice").await; // `connect` checks the welcome
    let mut bob = gw.connect("bob").await;

    alice
        .send_json(&json!({ "type": "subscribe", "thread_id": "t1" }))
        .await;
    let subscribed = alice.next_json().await.unwrap();
    assert_eq!(subscribed["type"], "subscribed", "{subscribed}");
    assert_eq!(subscribed["threads"], json!(["t1"]));
    hibernated(&gw, 2.0).await;

    let first = publish(
        &gw,
        "alice",
        "agent_started",
        "t1",
        json!({ "step": 1, "api_key": "sk-1" }),
    )
    .await;
    let event = alice.next_json().await.unwrap();
    assert_eq!(event["seq"], first);
    assert_eq!(
        event["payload"],
        json!({ "step": 1, "api_key": "[redacted]" })
    );
    assert_eq!(event["run_state"], "started");
    hibernated(&gw, 2.0).await;

    publish(
        &gw,
        "alice",
        "tool_executing",
        "t2",
        json!({ "tool": "search" }),
    )
    .await;
    let last = publish(
        &gw,
        "alice",
        "agent_completed",
        "t1",
        json!({ "result": { "items": [{ "Pass-Word": "p" }], "ok": true } }),
    )
    .await;
    publish(
        &gw,
        "bob",
        "agent_started",
        "t9",
        json!({ "client_secret": "s" }),
    )
    .await;

    let event = alice.next_json().await.unwrap();
    assert_eq!(event["seq"], last, "the t2 event is filtered out: {event}");
    assert_eq!(
        event["payload"],
        json!({ "result": { "items": [{ "Pass-Word": "[redacted]" }], "ok": true } })
    );
    assert_eq!(event["run_state"], "completed");

    alice.send_json(&json!({ "type": "ping" })).await;
    let pong = alice.next_json().await.unwrap();
    assert_eq!(pong["type"], "pong", "{pong}");
    for (counter, want) in [
        ("events_in", 3),
        ("events_out", 2),
        ("events_filtered", 1),
        ("redactions", 2),
        ("frames_in", 2),
    ] {
        assert_eq!(pong[counter], json!(want), "{counter}: {pong}");
    }
    assert_eq!(pong["runs"]["r1"]["state"], "completed", "{pong}");
    alice.send_text("not json").await;
    assert_eq!(alice.next_json().await.unwrap()["type"], "error");

    // Bob's instance is his own: no subscriptions, his event only, his counters.
    let event = bob.next_json().await.unwrap();
    assert_eq!(event["payload"], json!({ "client_secret": "[redacted]" }));
    bob.send_json(&json!({ "type": "ping" })).await;
    let pong = bob.next_json().await.unwrap();
    assert_eq!(
        (pong["events_in"].clone(), pong["frames_in"].clone()),
        (json!(1), json!(1))
    );

    assert!(gw.metric("gateway_wakes_total").await >= 3.0);
    assert_eq!(
        gw.metric_or_zero("gateway_guest_faults_total{kind=\"restore\"}")
            .await,
        0.0
    );

    let version = gw.state.sandbox().version.label();
    assert!(version.starts_with(label_prefix), "{version}");
    gw.wait_metric(
        &format!(r#"gateway_guest_instances{{guest="{version}"}}"#),
        2.0,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_javascript_handler_behaves_like_the_reference() {
    behaves_like_the_reference_handler("handler-js.wasm", "handler-js@").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_handler_behaves_like_the_reference() {
    behaves_like_the_reference_handler("handler-py.wasm", "handler-py@").await;
}

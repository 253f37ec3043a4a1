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

/// Publishes `body` (a message op or an event) for alice and returns its `seq`.
async fn publish_for_alice(gw: &TestGateway, mut body: Value) -> u64 {
    body["user_id"] = json!("alice");
    let (status, receipt) = gw.publish(&gw.publisher_token(), &body).await;
    assert_eq!(status, 200, "{receipt}");
    receipt["seq"].as_u64().unwrap()
}

/// What `guest` sends for one message scenario (AI output streams): frames live to a client
/// subscribed to `t1`, then frames on a resume, then each connection's counters. Every `seq`
/// is replaced by the name of the publish it belongs to (each gateway numbers its own).
async fn message_frames(guest: &str) -> Vec<Value> {
    let mut cfg = guest_config(guest);
    // Each append handed over at once: the frames do not depend on timing.
    cfg.streams.rollup_ms = 0;
    let gw = TestGateway::start_with(cfg).await;
    let mut live = gw.connect("alice").await;
    live.send_json(&json!({ "type": "subscribe", "thread_id": "t1" }))
        .await;
    assert_eq!(live.next_json().await.unwrap()["type"], "subscribed");

    let mut names = std::collections::HashMap::new();
    let create = |id: &str, thread: &str, text: &str, payload: Value| {
        json!({ "kind": "assistant", "run_id": "r1", "thread_id": thread, "payload": payload,
                "message": { "id": id, "op": "create", "text": text } })
    };
    let append = |index: u64, text: &str| json!({ "message": { "id": "m1", "op": "append", "index": index, "text": text } });
    let ops = [
        (
            "create m1",
            // Digits past 2^53 go out as they came, in every language.
            create(
                "m1",
                "t1",
                "The ",
                json!({ "model": "m", "api_key": "sk-1", "n": 12345678901234567890u64 }),
            ),
        ),
        ("create m2", create("m2", "t2", "", json!({ "model": "m" }))),
        // The text goes as published: a secret split over appends could not be found anyway.
        ("append 1", append(1, "password: hunter2, ")),
        ("append 2", append(2, "é \"👋\"\n")),
        (
            "end m1",
            json!({ "message": { "id": "m1", "op": "end", "status": "complete" } }),
        ),
        (
            "event",
            json!({ "kind": "agent_completed", "run_id": "r1", "thread_id": "t1", "payload": { "ok": true } }),
        ),
    ];
    let mut first = None;
    for (name, body) in ops {
        let seq = publish_for_alice(&gw, body).await;
        first.get_or_insert(seq);
        names.insert(seq, name);
    }
    let name_seq = |mut frame: Value| {
        if let Some(seq) = frame["seq"].as_u64() {
            frame["seq"] = json!(names[&seq]);
        }
        frame
    };
    let mut frames = Vec::new();
    for _ in 0..5 {
        frames.push(name_seq(live.next_json().await.unwrap()));
    }

    // A resume from before the first op: each message once, as a snapshot.
    let since = first.unwrap() - 1;
    let mut resumed = gw
        .try_connect_with_query(&gw.token("alice"), &format!("since={since}"))
        .await
        .unwrap();
    assert_eq!(resumed.next_json().await.unwrap()["type"], "welcome");
    let resume = resumed.next_json().await.unwrap();
    assert_eq!(
        (&resume["recovered"], &resume["replayed"]),
        (&json!(true), &json!(3)),
        "{resume}"
    );
    for _ in 0..3 {
        frames.push(name_seq(resumed.next_json().await.unwrap()));
    }
    for client in [&mut live, &mut resumed] {
        client.send_json(&json!({ "type": "ping" })).await;
        let pong = client.next_json().await.unwrap();
        let counters = [
            "events_in",
            "events_out",
            "events_filtered",
            "redactions",
            "payloads_withheld",
            "runs",
        ];
        frames.push(
            counters
                .iter()
                .map(|c| (c.to_string(), pong[c].clone()))
                .collect(),
        );
    }
    frames
}

/// The frames every reference handler sends for [`message_frames`]' scenario.
fn reference_message_frames() -> Vec<Value> {
    let payload = json!({ "model": "m", "api_key": "[redacted]", "n": 12345678901234567890u64 });
    let m1 = |op: &str, seq: &str, text: &str, status: &str| {
        json!({ "type": "message", "op": op, "message_id": "m1", "text": text, "status": status,
                "seq": seq, "kind": "assistant", "run_id": "r1", "thread_id": "t1" })
    };
    let with_payload = |mut frame: Value, payload: &Value| {
        frame["payload"] = payload.clone();
        frame
    };
    let event = json!({ "type": "event", "seq": "event", "kind": "agent_completed",
                        "payload": { "ok": true }, "run_id": "r1", "thread_id": "t1",
                        "run_state": "completed" });
    let counters = |events: u64, filtered: u64| {
        json!({ "events_in": events + filtered, "events_out": events, "events_filtered": filtered,
                "redactions": 1, "payloads_withheld": 0,
                "runs": { "r1": { "state": "completed", "tools_running": 0, "events": 1 } } })
    };
    vec![
        with_payload(m1("create", "create m1", "The ", "streaming"), &payload),
        m1("append", "append 1", "password: hunter2, ", "streaming"),
        m1("append", "append 2", "é \"👋\"\n", "streaming"),
        m1("end", "end m1", "", "complete"),
        event.clone(),
        json!({ "type": "message", "op": "snapshot", "message_id": "m2", "text": "",
                "status": "streaming", "seq": "create m2", "kind": "assistant", "run_id": "r1",
                "thread_id": "t2", "payload": { "model": "m" } }),
        with_payload(
            m1(
                "snapshot",
                "end m1",
                "The password: hunter2, é \"👋\"\n",
                "complete",
            ),
            &payload,
        ),
        event,
        counters(5, 1),
        counters(3, 0),
    ]
}

async fn sends_the_reference_message_frames(guest: &str) {
    let frames = message_frames(guest).await;
    let want = reference_message_frames();
    for (i, (got, want)) in frames.iter().zip(&want).enumerate() {
        assert_eq!(got, want, "frame {i}");
    }
    assert_eq!(frames.len(), want.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rust_handler_sends_the_reference_message_frames() {
    sends_the_reference_message_frames(gateway_tests::guests::REFERENCE).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_javascript_handler_sends_the_reference_message_frames() {
    sends_the_reference_message_frames(&built("handler-js.wasm")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_handler_sends_the_reference_message_frames() {
    sends_the_reference_message_frames(&built("handler-py.wasm")).await;
}

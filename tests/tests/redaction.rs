//! Item 11 of issue 19: redaction as the README states it, the same in every reference
//! handler. Each payload of the shared corpus (`tests/fixtures/redaction-corpus.json`) is
//! published, exactly as written there, through the real gateway to a client of the Rust,
//! the JavaScript and the Python handler, and checked in the frame the client receives over
//! a real WebSocket: no secret of the case in it, everything else the case names still there,
//! and the handler's own counters grown by the case's redactions (or one payload withheld).
//! The JavaScript and Python components come from `make guests` (as in `languages.rs`).

use std::path::PathBuf;

use futures_util::StreamExt;
use gateway::config::Config;
use gateway_tests::{Client, TestGateway, WAIT, config, guests};
use serde::Deserialize;
use serde_json::Value;
use serde_json::value::RawValue;
use tokio_tungstenite::tungstenite::Message;

const CORPUS: &str = include_str!("../fixtures/redaction-corpus.json");

#[derive(Deserialize)]
struct Corpus {
    cases: Vec<Case>,
}

#[derive(Deserialize)]
struct Case {
    name: String,
    /// Published as it is written in the corpus: escapes and digits untouched.
    payload: Box<RawValue>,
    /// Text that must not be in the frame (each is in the payload).
    absent: Vec<String>,
    /// Text that must still be in the frame.
    present: Vec<String>,
    /// JSON pointers (into the payload) to strings that must still hold JSON.
    #[serde(default)]
    embedded: Vec<String>,
    /// How much the handler's `redactions` counter grows.
    redactions: u64,
    /// Whether the payload is withheld whole (and `payloads_withheld` grows by one).
    #[serde(default)]
    withheld: bool,
}

const WITHHELD: &str = "[redacted: payload could not be inspected]";

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

/// What the JavaScript and Python handlers need (see `languages.rs`).
fn interpreted(guest: &str) -> Config {
    let mut cfg = config(&built(guest));
    cfg.limits.guest_memory_bytes = 32 << 20;
    cfg.limits.guest_max_instances = 64;
    cfg.guest_cache_dir =
        Some(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/guest-cache-tests"));
    cfg
}

/// The next text frame exactly as it came over the socket.
async fn next_text(client: &mut Client) -> String {
    loop {
        let msg = tokio::time::timeout(WAIT, client.ws.next())
            .await
            .expect("a frame within the wait")
            .expect("the connection stays open")
            .expect("a readable frame");
        match msg {
            Message::Text(text) => return text.as_str().to_owned(),
            Message::Ping(_) | Message::Pong(_) => continue,
            other => panic!("expected a text frame, got {other:?}"),
        }
    }
}

async fn counters(client: &mut Client) -> Value {
    client.send_json(&serde_json::json!({"type": "ping"})).await;
    let pong: Value = serde_json::from_str(&next_text(client).await).unwrap();
    assert_eq!(pong["type"], "pong", "{pong}");
    pong
}

async fn passes_the_corpus(cfg: Config) {
    let corpus: Corpus = serde_json::from_str(CORPUS).expect("the corpus parses");
    assert!(corpus.cases.len() >= 10, "the corpus lost its cases");
    let gw = TestGateway::start_with(cfg).await;
    let publisher = gw.publisher_token();
    let mut client = gw.connect("alice").await;
    let mut failures = Vec::new();

    for case in &corpus.cases {
        let name = &case.name;
        let payload = case.payload.get();
        for secret in &case.absent {
            assert!(
                payload.contains(secret.as_str()),
                "{name}: {secret} is not in the payload"
            );
        }
        let before = counters(&mut client).await;
        let body = format!(r#"{{"user_id":"alice","kind":"redaction_case","payload":{payload}}}"#);
        let (status, receipt) = gateway_tests::post(&gw.url("/v1/publish"), &publisher, body).await;
        assert_eq!(status, 200, "{name}: {receipt}");
        let frame = next_text(&mut client).await;
        let event: Value = serde_json::from_str(&frame).expect("the frame is JSON");
        assert_eq!(event["type"], "event", "{name}: {frame}");
        assert_eq!(event["seq"], receipt["seq"], "{name}: {frame}");
        let after = counters(&mut client).await;
        let grew =
            |counter: &str| after[counter].as_u64().unwrap() - before[counter].as_u64().unwrap();

        // Every problem of every case, so that one run shows all a handler gets wrong.
        let mut problems = Vec::new();
        for secret in &case.absent {
            if frame.contains(secret.as_str()) {
                problems.push(format!("{secret} reached the client"));
            }
        }
        for kept in &case.present {
            if !frame.contains(kept.as_str()) {
                problems.push(format!("{kept} is missing"));
            }
        }
        for pointer in &case.embedded {
            let inner = event["payload"].pointer(pointer).and_then(Value::as_str);
            if inner.is_none_or(|text| serde_json::from_str::<Value>(text).is_err()) {
                problems.push(format!("{pointer} is no longer a string holding JSON"));
            }
        }
        if grew("redactions") != case.redactions {
            problems.push(format!(
                "{} redactions, not {}",
                grew("redactions"),
                case.redactions
            ));
        }
        if grew("payloads_withheld") != u64::from(case.withheld)
            || (event["payload"] == WITHHELD) != case.withheld
        {
            problems.push(format!("withheld should be {}", case.withheld));
        }
        if !problems.is_empty() {
            failures.push(format!("{name}: {}\n  frame: {frame}", problems.join("; ")));
        }
    }
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));
    client.close().await;
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rust_handler_redacts_the_shared_corpus() {
    passes_the_corpus(config(guests::REFERENCE)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_javascript_handler_redacts_the_shared_corpus() {
    passes_the_corpus(interpreted("handler-js.wasm")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_handler_redacts_the_shared_corpus() {
    passes_the_corpus(interpreted("handler-py.wasm")).await;
}

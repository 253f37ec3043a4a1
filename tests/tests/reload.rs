//! Hot reload of the guest under load: 1,000 connections carrying traffic, a reload through
//! the admin endpoint and one by replacing the file; no connection dropped, no event lost,
//! new connections on the new version, versions visible in metrics and `/v1/stats`.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use gateway::auth::{GUEST_RELOAD_SCOPE, STATS_SCOPE};
use gateway_tests::{Client, TestGateway, claims, config, guests, post, token, wait_until};
use serde_json::{Value, json};

const USERS: usize = 250;
const PER_USER: usize = 4;

fn scoped(scope: &str) -> String {
    let mut c = claims("ops");
    c.scope = Some(scope.into());
    token(c)
}

async fn stats(gw: &TestGateway) -> Value {
    reqwest::Client::new()
        .get(gw.url("/v1/stats"))
        .bearer_auth(scoped(STATS_SCOPE))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// Replaces the file the way an operator should: written beside it, then renamed.
fn replace(path: &std::path::Path, with: &str) {
    let tmp = path.with_extension("new");
    std::fs::copy(with, &tmp).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_under_traffic_drops_no_connection_and_loses_no_event() {
    let dir = std::env::temp_dir().join(format!("gateway-reload-load-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("handler.wasm");
    std::fs::copy(guests::REFERENCE, &path).unwrap();
    let mut cfg = config(path.to_str().unwrap());
    cfg.guest_poll_secs = 1;
    let gw = Arc::new(TestGateway::start_with(cfg).await);
    let first = stats(&gw).await["guest"].clone();

    let mut clients: Vec<(usize, Client)> = Vec::new();
    for chunk in 0..(USERS * PER_USER / 100) {
        let batch = (0..100).map(|i| {
            let user = (chunk * 100 + i) % USERS;
            let gw = gw.clone();
            async move { (user, gw.connect(&format!("user-{user}")).await) }
        });
        clients.extend(futures_util::future::join_all(batch).await);
    }
    let old_label = format!(
        "{}@{}",
        first["name"].as_str().unwrap(),
        &first["sha256"].as_str().unwrap()[..12]
    );
    gw.wait_metric(
        &format!(r#"gateway_guest_instances{{guest="{old_label}"}}"#),
        (USERS * PER_USER) as f64,
    )
    .await;

    // Traffic: one event for every user per round, until told to stop.
    let stop = Arc::new(AtomicBool::new(false));
    let rounds = Arc::new(AtomicU64::new(0));
    let publisher = tokio::spawn({
        let (gw, stop, rounds) = (gw.clone(), stop.clone(), rounds.clone());
        async move {
            let token = gw.publisher_token();
            while !stop.load(Ordering::SeqCst) {
                let events: Vec<Value> = (0..USERS)
                    .map(|u| json!({ "user_id": format!("user-{u}"), "kind": "tool_executing", "payload": { "round": rounds.load(Ordering::SeqCst) } }))
                    .collect();
                let (status, answer) = gw.publish_batch(&token, &events).await;
                assert_eq!(status, 200, "{answer}");
                rounds.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    });
    let at_least = |n: u64| {
        let rounds = rounds.clone();
        async move {
            wait_until("publishing rounds", async || {
                rounds.load(Ordering::SeqCst) >= n
            })
            .await;
        }
    };
    at_least(3).await;

    // Only an operator may reload; a guest that cannot run is refused and the old one stays.
    let reload = |token: String| {
        let url = gw.url("/v1/guest/reload");
        async move { post(&url, &token, String::new()).await }
    };
    let (status, _) = reload(gw.publisher_token()).await;
    assert_eq!(status, 403);
    replace(&path, guests::WASI_IMPORT);
    let (status, refused) = reload(scoped(GUEST_RELOAD_SCOPE)).await;
    assert_eq!(status, 422, "{refused}");
    assert_eq!(refused["error"], "guest_refused");
    assert!(
        refused["reason"].as_str().unwrap().contains("wasi:"),
        "{refused}"
    );
    assert_eq!(stats(&gw).await["guest"]["sha256"], first["sha256"]);

    // A good one, through the endpoint, while events flow.
    replace(&path, guests::ECHO);
    let (status, reloaded) = reload(scoped(GUEST_RELOAD_SCOPE)).await;
    assert_eq!(status, 200, "{reloaded}");
    assert_eq!(reloaded["previous"], json!(old_label));
    assert_ne!(reloaded["guest"]["sha256"], first["sha256"]);
    let done = rounds.load(Ordering::SeqCst);
    at_least(done + 3).await;

    // New connections get the new guest (the echo guest sends no welcome).
    let mut newcomer = gw.try_connect(&gw.token("newcomer")).await.unwrap();
    newcomer.send_text("which guest?").await;
    let echoed = tokio::time::timeout(
        gateway_tests::WAIT,
        futures_util::StreamExt::next(&mut newcomer.ws),
    )
    .await
    .unwrap()
    .unwrap()
    .unwrap();
    assert_eq!(echoed.to_text().unwrap(), "which guest?");
    let versions = stats(&gw).await["guest_versions"].clone();
    let count = |sha: &Value| {
        versions
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["sha256"] == *sha)
            .map(|v| v["instances"].clone())
    };
    assert_eq!(
        count(&first["sha256"]),
        Some(json!(USERS * PER_USER)),
        "{versions}"
    );
    assert_eq!(
        count(&reloaded["guest"]["sha256"]),
        Some(json!(1)),
        "{versions}"
    );

    // Replacing the file is enough too: the poll picks it up.
    replace(&path, guests::REFERENCE);
    gw.wait_metric(r#"gateway_guest_reloads_total{result="ok"}"#, 2.0)
        .await;
    let back = stats(&gw).await["guest"].clone();
    assert_eq!(back["sha256"], first["sha256"]);
    let done = rounds.load(Ordering::SeqCst);
    at_least(done + 3).await;
    stop.store(true, Ordering::SeqCst);
    publisher.await.unwrap();

    // Every old connection is still open and got every round's event, in order.
    let total = rounds.load(Ordering::SeqCst);
    for (user, client) in &mut clients {
        let mut last = 0;
        for round in 0..total {
            let frame = client
                .next_json()
                .await
                .unwrap_or_else(|e| panic!("user-{user}: event of round {round}: {e}"));
            assert_eq!(frame["type"], "event", "user-{user}: {frame}");
            assert_eq!(frame["payload"]["round"], json!(round), "user-{user}");
            let seq = frame["seq"].as_u64().unwrap();
            assert!(seq > last);
            last = seq;
        }
    }
    assert_eq!(
        gw.metric("gateway_sessions_live").await,
        (USERS * PER_USER + 1) as f64,
        "no connection was dropped"
    );
}

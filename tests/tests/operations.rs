//! What operators see and do: the stats endpoint, readiness, reloading the guest.

use futures_util::StreamExt;
use gateway::auth::STATS_SCOPE;
use gateway_tests::{TestGateway, claims, config, guests, token};
use serde_json::Value;

async fn stats(gw: &TestGateway, token: &str) -> (u16, Value) {
    let response = reqwest::Client::new()
        .get(gw.url("/v1/stats"))
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stats_show_instances_sessions_and_users_to_operators_only() {
    let gw = TestGateway::start().await;
    let mut operator = claims("ops");
    operator.scope = Some(STATS_SCOPE.into());
    let operator = token(operator);

    let (status, body) = stats(&gw, &gw.token("alice")).await;
    assert_eq!(status, 403, "{body}");
    let (status, _) = stats(&gw, &gw.publisher_token()).await;
    assert_eq!(status, 403, "a publisher is not an operator");

    let _a1 = gw.connect("alice").await;
    let _a2 = gw.connect("alice").await;
    let b1 = gw.connect("bob").await;
    b1.close().await;
    gw.wait_metric("gateway_instances_live", 2.0).await;

    let (status, body) = stats(&gw, &operator).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["instances"]["created"], 3, "{body}");
    assert_eq!(body["instances"]["active"], 2, "{body}");
    assert_eq!(body["instances"]["cleaned_up"], 1, "{body}");
    assert_eq!(body["sessions"]["live"], 2);
    assert_eq!(body["sessions"]["ended"], 1);
    assert!(body["sessions"]["average_lifetime_secs"].as_f64().unwrap() > 0.0);
    assert_eq!(body["users_connected"], 1);
    assert_eq!(body["busiest_users"][0]["user_id"], "alice");
    assert_eq!(body["busiest_users"][0]["connections"], 2);
    assert!(body["capacity"]["connections"].as_u64().unwrap() > 0);

    let ready: Value = reqwest::get(gw.url("/readyz"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(ready["status"], "ready");
    assert_eq!(ready["connections"], 2);
}

/// Hot reload: a new guest serves new connections, live ones keep theirs, and a guest that
/// cannot run is refused while the one in use stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reloaded_guest_serves_new_connections_only() {
    let dir = std::env::temp_dir().join(format!("gateway-reload-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("handler.wasm");
    std::fs::copy(guests::REFERENCE, &path).unwrap();
    let mut cfg = config(path.to_str().unwrap());
    cfg.guest_poll_secs = 0; // reloads here are the test's own calls only
    let gw = TestGateway::start_with(cfg).await;
    let mut before = gw.connect("alice").await; // the reference guest: a welcome first

    std::fs::copy(guests::ECHO, &path).unwrap();
    gw.state.reload_guest().expect("the echo guest loads");
    let mut after = gw.try_connect(&gw.token("alice")).await.unwrap();
    after.send_text("hello").await;
    // The echo guest sends no welcome: the first frame back is the echo.
    let echoed = tokio::time::timeout(gateway_tests::WAIT, after.ws.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(echoed.to_text().unwrap(), "hello");
    before.send_json(&serde_json::json!({"type": "ping"})).await;
    assert_eq!(before.next_json().await.unwrap()["type"], "pong");

    // A guest importing WASI is refused by name; new connections still get the echo guest.
    std::fs::copy(guests::WASI_IMPORT, &path).unwrap();
    let err = gw.state.reload_guest().expect_err("refused").to_string();
    assert!(err.contains("wasi:clocks"), "{err}");
    let mut third = gw.try_connect(&gw.token("bob")).await.unwrap();
    third.send_text("still echo").await;
    let echoed = tokio::time::timeout(gateway_tests::WAIT, third.ws.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(echoed.to_text().unwrap(), "still echo");
    assert_eq!(
        gw.metric(r#"gateway_guest_reloads_total{result="ok"}"#)
            .await,
        1.0
    );
    assert_eq!(
        gw.metric(r#"gateway_guest_reloads_total{result="refused"}"#)
            .await,
        1.0
    );
    let _ = std::fs::remove_dir_all(&dir);
}

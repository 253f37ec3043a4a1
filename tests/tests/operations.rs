//! What operators see: the stats endpoint and readiness.

use gateway::auth::STATS_SCOPE;
use gateway_tests::{TestGateway, claims, token};
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

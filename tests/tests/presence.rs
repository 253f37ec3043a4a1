//! Presence: `GET /v1/presence` with its scope and tenant binding, and the `user.online` /
//! `user.offline` webhooks posted to a real HTTP receiver: signed, once per transition, not
//! flapping on a reconnect within the debounce, retried while the receiver is down, given up
//! (and counted) when it refuses or stays down. The real gateway on port 0, real sockets.

use gateway::auth::PRESENCE_SCOPE;
use gateway_tests::backend::{BACKEND_SECRET, Backend, Received};
use gateway_tests::{Client, TestGateway, claims, config, guests, token, wait_until};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;

fn presence_token(tenant: Option<&str>) -> String {
    let mut c = claims("backend");
    c.scope = Some(PRESENCE_SCOPE.into());
    c.tenant = tenant.map(str::to_owned);
    token(c)
}

async fn ask(gw: &TestGateway, token: Option<&str>, query: &str) -> (u16, Value) {
    let mut request = reqwest::Client::new().get(gw.url(&format!("/v1/presence?{query}")));
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let answer = request.send().await.unwrap();
    let status = answer.status().as_u16();
    (status, answer.json().await.unwrap_or(Value::Null))
}

async fn connect(gw: &TestGateway, user: &str) -> Client {
    let mut client = gw.try_connect(&gw.token(user)).await.unwrap();
    assert_eq!(client.next_json().await.unwrap()["type"], "welcome");
    client
}

#[tokio::test]
async fn presence_is_answered_with_its_scope_within_the_tokens_tenant() {
    let gw = TestGateway::start().await;
    let asker = presence_token(None);
    assert_eq!(ask(&gw, None, "user_id=alice").await.0, 401);
    assert_eq!(
        ask(&gw, Some(&gw.publisher_token()), "user_id=alice")
            .await
            .0,
        403
    );
    let (status, body) = ask(&gw, Some(&asker), "tenant_id=acme").await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(
        ask(&gw, Some(&asker), "user_id=alice").await,
        (200, json!({"online": false, "connections": 0}))
    );
    let first = connect(&gw, "alice").await;
    let second = connect(&gw, "alice").await;
    assert_eq!(
        ask(&gw, Some(&asker), "user_id=alice").await,
        (200, json!({"online": true, "connections": 2}))
    );
    // A tenant-bound token asks within its tenant: acme's alice is not the alice above, and
    // another tenant is refused.
    let acme = presence_token(Some("acme"));
    assert_eq!(
        ask(&gw, Some(&acme), "user_id=alice").await,
        (200, json!({"online": false, "connections": 0}))
    );
    let (status, body) = ask(&gw, Some(&acme), "user_id=alice&tenant_id=globex").await;
    assert_eq!(
        (status, &body["error"]),
        (403, &json!("forbidden")),
        "{body}"
    );
    first.close().await;
    gw.wait_metric("gateway_sessions_live", 1.0).await;
    assert_eq!(
        ask(&gw, Some(&asker), "user_id=alice").await,
        (200, json!({"online": true, "connections": 1}))
    );
    second.close().await;
    gw.wait_metric("gateway_sessions_live", 0.0).await;
    assert_eq!(
        ask(&gw, Some(&asker), "user_id=alice").await,
        (200, json!({"online": false, "connections": 0}))
    );
}

fn hooks_config(receiver: &Backend, offline_after_secs: u64) -> gateway::config::Config {
    let mut config = config(guests::REFERENCE);
    config.webhooks.url = Some(receiver.hooks_url());
    config.webhooks.secret = Some(BACKEND_SECRET.into());
    config.webhooks.offline_after_secs = offline_after_secs;
    config.webhooks.retry_min_ms = 100;
    config
}

/// The webhooks the receiver accepted or not, as `(type, user_id)`.
fn kinds(hooks: &[Received]) -> Vec<(String, String)> {
    hooks
        .iter()
        .map(|h| {
            (
                h.body["type"].as_str().unwrap_or_default().to_owned(),
                h.body["user_id"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect()
}

async fn wait_for_hooks(receiver: &Backend, n: usize) -> Vec<Received> {
    wait_until(&format!("{n} webhook attempts"), async || {
        receiver.hooks().len() >= n
    })
    .await;
    receiver.hooks()
}

#[tokio::test]
async fn webhooks_report_each_transition_once_signed_and_without_flapping() {
    let receiver = Backend::start(0).await;
    let gw = TestGateway::start_with(hooks_config(&receiver, 2)).await;
    let mut c = claims("alice");
    c.tenant = Some("acme".into());
    let alice = token(c);

    let mut first = gw.try_connect(&alice).await.unwrap();
    first.next_json().await.unwrap();
    let hooks = wait_for_hooks(&receiver, 1).await;
    let online = &hooks[0];
    assert!(online.signed, "{:?}", online.signature);
    assert_eq!(
        (
            &online.body["type"],
            &online.body["user_id"],
            &online.body["tenant_id"]
        ),
        (&json!("user.online"), &json!("alice"), &json!("acme"))
    );
    assert_eq!(online.webhook_id.as_deref(), online.body["id"].as_str());
    assert!(online.body["at"].as_f64().unwrap() > 1.7e9);

    // A second connection, and one of the two closed: no transition.
    let mut second = gw.try_connect(&alice).await.unwrap();
    second.next_json().await.unwrap();
    second.close().await;
    gw.wait_metric("gateway_sessions_live", 1.0).await;
    // The last one closed and a new one open within the debounce (a page reload): no
    // user.offline, no second user.online.
    first.close().await;
    gw.wait_metric("gateway_sessions_live", 0.0).await;
    let mut back = gw.try_connect(&alice).await.unwrap();
    back.next_json().await.unwrap();
    // Then gone for good: one user.offline, at the close, posted after the debounce.
    let closed_at = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    back.close().await;
    let hooks = wait_for_hooks(&receiver, 2).await;
    let posted_after = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert_eq!(
        kinds(&hooks),
        [("user.online", "alice"), ("user.offline", "alice")].map(|(k, u)| (k.into(), u.into()))
    );
    let offline = &hooks[1];
    assert!(offline.signed);
    let at = offline.body["at"].as_f64().unwrap();
    assert!(
        at >= closed_at - 0.01,
        "offline at {at}, closed at {closed_at}"
    );
    assert!(
        posted_after - at >= 2.0,
        "posted {}s after the close",
        posted_after - at
    );
    assert_ne!(offline.body["id"], online.body["id"]);
    assert_eq!(
        gw.metric("gateway_webhooks_delivered_total{type=\"user.offline\"}")
            .await,
        1.0
    );
    assert_eq!(gw.metric("gateway_webhooks_pending").await, 0.0);
    // Still exactly two: nothing came late.
    let marker = connect(&gw, "zed").await;
    let hooks = wait_for_hooks(&receiver, 3).await;
    assert_eq!(kinds(&hooks)[2], ("user.online".into(), "zed".into()));
    assert_eq!(hooks.len(), 3, "{:?}", kinds(&hooks));
    marker.close().await;
}

#[tokio::test]
async fn a_receiver_that_is_down_gets_the_webhook_when_back_and_a_refusal_is_given_up() {
    let receiver = Backend::start(0).await;
    let mut config = hooks_config(&receiver, 0);
    config.webhooks.max_attempts = 4;
    let gw = TestGateway::start_with(config).await;

    // Down for three attempts, then back: delivered on the fourth, the same webhook each time.
    receiver.fail_hooks(3, 503);
    let alice = connect(&gw, "alice").await;
    let hooks = wait_for_hooks(&receiver, 4).await;
    assert_eq!(hooks.len(), 4);
    assert!(hooks.iter().all(|h| h.body == hooks[0].body && h.signed));
    gw.wait_metric(
        "gateway_webhooks_delivered_total{type=\"user.online\"}",
        1.0,
    )
    .await;
    assert_eq!(gw.metric("gateway_webhook_retries_total").await, 3.0);

    // Down for longer than the attempts: given up, counted, and the next one still goes.
    receiver.fail_hooks(4, 502);
    alice.close().await;
    gw.wait_metric("gateway_webhooks_given_up_total{why=\"attempts\"}", 1.0)
        .await;
    // A refusal (a 4xx other than 429) is not retried.
    receiver.fail_hooks(1, 400);
    let bob = connect(&gw, "bob").await;
    gw.wait_metric("gateway_webhooks_given_up_total{why=\"refused\"}", 1.0)
        .await;
    let carol = connect(&gw, "carol").await;
    gw.wait_metric(
        "gateway_webhooks_delivered_total{type=\"user.online\"}",
        2.0,
    )
    .await;
    let hooks = receiver.hooks();
    let tail: Vec<_> = kinds(&hooks)[4..].to_vec();
    assert_eq!(
        tail,
        [
            ("user.offline", "alice"),
            ("user.offline", "alice"),
            ("user.offline", "alice"),
            ("user.offline", "alice"),
            ("user.online", "bob"),
            ("user.online", "carol"),
        ]
        .map(|(k, u)| (k.into(), u.into()))
    );
    drop((bob, carol));
}

/// Cluster mode: presence is the cluster's, and each transition is posted once for the
/// whole cluster. Two nodes; an identity online on one, then both, then neither; a reconnect
/// on the other node within the debounce does not flap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_cluster_mode_presence_and_webhooks_are_the_clusters() {
    let nats = gateway_tests::nats::NatsServer::start();
    let receiver = Backend::start(0).await;
    let mut cfg = hooks_config(&receiver, 2);
    cfg.cluster.nats_url = Some(nats.url());
    let a = TestGateway::start_with(cfg.clone()).await;
    let b = TestGateway::start_with(cfg).await;
    let asker = presence_token(None);
    let presence_is = async |gw: &TestGateway, want: Value| {
        wait_until(&format!("presence {want}"), async || {
            ask(gw, Some(&asker), "user_id=alice").await == (200, want.clone())
        })
        .await;
    };

    let on_a = connect(&a, "alice").await;
    let hooks = wait_for_hooks(&receiver, 1).await;
    assert_eq!(kinds(&hooks), [("user.online".into(), "alice".into())]);
    assert!(hooks[0].signed);
    presence_is(&b, json!({"online": true, "connections": 1})).await;
    let on_b = connect(&b, "alice").await;
    presence_is(&a, json!({"online": true, "connections": 2})).await;
    on_a.close().await;
    presence_is(&b, json!({"online": true, "connections": 1})).await;
    on_b.close().await;
    let hooks = wait_for_hooks(&receiver, 2).await;
    assert_eq!(
        kinds(&hooks),
        [
            ("user.online".into(), "alice".into()),
            ("user.offline".into(), "alice".into())
        ]
    );
    presence_is(&a, json!({"online": false, "connections": 0})).await;

    // Away from A and back on B within the debounce: no webhook. The window is the debounce
    // and a second more; B's own close is then the marker that ends it.
    let on_a = connect(&a, "alice").await;
    wait_for_hooks(&receiver, 3).await;
    on_a.close().await;
    let on_b = connect(&b, "alice").await;
    tokio::time::sleep(std::time::Duration::from_secs(3)).await;
    assert_eq!(receiver.hooks().len(), 3, "{:?}", kinds(&receiver.hooks()));
    on_b.close().await;
    let hooks = wait_for_hooks(&receiver, 4).await;
    assert_eq!(
        kinds(&hooks)[2..],
        [
            ("user.online".into(), "alice".into()),
            ("user.offline".into(), "alice".into())
        ]
    );
    assert!(hooks.iter().all(|h| h.signed));
}

/// A node killed with SIGKILL closes nothing: the other node notices its heartbeat gone,
/// counts its connections out, and the identities it held go offline once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_nodes_identities_go_offline_once() {
    use gateway_tests::node::Node;
    let nats = gateway_tests::nats::NatsServer::start();
    let receiver = Backend::start(0).await;
    let url = receiver.hooks_url();
    let env = [
        ("GATEWAY_WEBHOOKS__URL", url.as_str()),
        ("GATEWAY_WEBHOOKS__SECRET", BACKEND_SECRET),
        ("GATEWAY_WEBHOOKS__OFFLINE_AFTER_SECS", "1"),
    ];
    let mut doomed = Node::spawn_with(&nats.url(), &env);
    let survivor = Node::spawn_with(&nats.url(), &env);
    let metrics = format!("http://{}/metrics", survivor.addr);
    // The survivor has seen the doomed node heartbeat (it sweeps only nodes it saw alive).
    wait_until("the survivor to see two nodes", async || {
        let text = reqwest::get(&metrics).await.unwrap().text().await.unwrap();
        text.lines().any(|l| l == "gateway_cluster_nodes 2")
    })
    .await;
    let mut request = doomed.ws_url().into_client_request().unwrap();
    request.headers_mut().insert(
        "authorization",
        format!("Bearer {}", token(claims("alice")))
            .parse()
            .unwrap(),
    );
    let (ws, _) = tokio_tungstenite::connect_async(request).await.unwrap();
    let mut alice = Client { ws };
    assert_eq!(alice.next_json().await.unwrap()["type"], "welcome");
    wait_for_hooks(&receiver, 1).await;

    doomed.kill();
    // Its heartbeat expires (15 s), the survivor's next look sees it gone (2 s), then the
    // debounce (1 s).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(45);
    while receiver.hooks().len() < 2 {
        assert!(
            std::time::Instant::now() < deadline,
            "no user.offline after the node was killed: {:?}",
            kinds(&receiver.hooks())
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let hooks = receiver.hooks();
    assert_eq!(
        kinds(&hooks),
        [
            ("user.online".into(), "alice".into()),
            ("user.offline".into(), "alice".into())
        ]
    );
    let survivor_url = format!("http://{}/v1/presence?user_id=alice", survivor.addr);
    let answer: Value = reqwest::Client::new()
        .get(survivor_url)
        .bearer_auth(presence_token(None))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(answer, json!({"online": false, "connections": 0}));
}

/// An operator's disconnect ends the identity's last connections too: its `user.offline`
/// follows like any other close.
#[tokio::test]
async fn a_disconnected_user_goes_offline() {
    let receiver = Backend::start(0).await;
    let gw = TestGateway::start_with(hooks_config(&receiver, 0)).await;
    let mut alice = connect(&gw, "alice").await;
    wait_for_hooks(&receiver, 1).await;
    let mut operator = claims("ops");
    operator.scope = Some(gateway::auth::DISCONNECT_SCOPE.into());
    let (status, body) = gateway_tests::post(
        &gw.url("/v1/disconnect"),
        &token(operator),
        json!({"user_id": "alice", "reason": "suspended"}).to_string(),
    )
    .await;
    assert_eq!((status, &body["disconnected"]), (200, &json!(1)), "{body}");
    assert_eq!(alice.closed().await.code, 4001);
    let hooks = wait_for_hooks(&receiver, 2).await;
    assert_eq!(
        kinds(&hooks),
        [("user.online", "alice"), ("user.offline", "alice")].map(|(k, u)| (k.into(), u.into()))
    );
}

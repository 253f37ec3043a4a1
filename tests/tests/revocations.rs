//! Cluster mode against a real `nats-server`: what operators record for every node holds.
//! A revocation survives later plain disconnects and shorter revocations of the same target
//! and is in force on nodes started afterwards; a batch the stream could not take answers
//! per event; the dev demo run goes through the stream every node reads. A node that cannot
//! load the revocations does not serve, and a watch of them started again closes no session
//! a second time.

use std::time::Duration;

use gateway::AppState;
use gateway::auth::{Claims, DISCONNECT_SCOPE, now_secs};
use gateway::config::{ClusterStorage, Config};
use gateway_tests::nats::{NatsServer, Proxy};
use gateway_tests::{TestGateway, WAIT, claims, config, guests, post, token, wait_until};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn cluster_config(nats_url: &str) -> Config {
    let mut cfg = config(guests::REFERENCE);
    cfg.cluster.nats_url = Some(nats_url.into());
    cfg.cluster.storage = ClusterStorage::File;
    cfg
}

fn operator() -> String {
    let mut c = claims("ops-console");
    c.scope = Some(DISCONNECT_SCOPE.into());
    token(c)
}

async fn disconnect(gw: &TestGateway, body: Value) -> Value {
    let (status, answer) = post(&gw.url("/v1/disconnect"), &operator(), body.to_string()).await;
    assert_eq!(status, 200, "{answer}");
    answer
}

/// A token issued before the revocations below.
fn issued_before(user: &str, sid: Option<&str>) -> Claims {
    Claims {
        iat: Some(now_secs() - 5),
        sid: sid.map(Into::into),
        ..claims(user)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revocation_survives_later_disconnects_and_shorter_revocations() {
    let nats = NatsServer::start();
    let cfg = cluster_config(&nats.url());
    let a = TestGateway::start_with(cfg.clone()).await;

    // ivy: revoked for an hour, then a plain disconnect of the same identity.
    let ivy = issued_before("ivy", None);
    disconnect(&a, json!({"user_id": "ivy", "revoke_secs": 3600})).await;
    disconnect(&a, json!({"user_id": "ivy", "reason": "maintenance"})).await;
    // jay's laptop session: revoked for an hour, then again for one second.
    let laptop = issued_before("jay", Some("laptop"));
    disconnect(
        &a,
        json!({"user_id": "jay", "sid": "laptop", "revoke_secs": 3600}),
    )
    .await;
    let short = disconnect(
        &a,
        json!({"user_id": "jay", "sid": "laptop", "revoke_secs": 1}),
    )
    .await;
    let short_until = short["revoked_until"].as_u64().unwrap();
    wait_until("the short revocation has run out", async || {
        now_secs() > short_until
    })
    .await;

    // A node started afterwards (a restart, a rolling deploy) still refuses both, and so
    // does the node that recorded them.
    let b = TestGateway::start_with(cfg).await;
    for node in [&a, &b] {
        for claims in [&ivy, &laptop] {
            // Refused as revoked, not for any other reason a token could have.
            assert_eq!(
                node.refusal(&token(claims.clone())).await,
                (
                    401,
                    json!({"error": "unauthorized", "reason": "token has been revoked"})
                ),
                "{}",
                claims.sub
            );
        }
    }
    // A token issued after the identity-wide revocation is fine.
    let fresh = Claims {
        iat: Some(now_secs() + 1),
        ..claims("ivy")
    };
    wait_until("a token issued after the revocation", async || {
        now_secs() > fresh.iat.unwrap()
    })
    .await;
    b.try_connect(&token(fresh))
        .await
        .expect("a token issued later is admitted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_the_stream_cannot_take_answers_each_event() {
    let mut nats = NatsServer::start();
    let gw = TestGateway::start_with(cluster_config(&nats.url())).await;
    // Serving (it serves once the revocations in force are loaded) before NATS goes.
    let (status, answer) = gw
        .publish(
            &gw.publisher_token(),
            &json!({"user_id": "kim", "kind": "k", "payload": {}}),
        )
        .await;
    assert_eq!(status, 200, "{answer}");
    nats.kill();
    gw.wait_metric("gateway_nats_connected", 0.0).await;
    let events: Vec<Value> = (0..3)
        .map(|n| json!({"user_id": "kim", "kind": "k", "payload": {"n": n}}))
        .collect();
    let (status, answer) = gw.publish_batch(&gw.publisher_token(), &events).await;
    assert_eq!(status, 503, "{answer}");
    assert_eq!(answer["error"], "event_log_unavailable", "{answer}");
    let results = answer["results"].as_array().expect("per-event results");
    assert_eq!(results.len(), 3, "{answer}");
    for result in results {
        assert_eq!(result["error"], "event_log_unavailable", "{answer}");
        assert!(result["seq"].is_null(), "{answer}");
    }
}

/// `/dev/run` in cluster mode stores the demo events in the stream, so a connection on
/// another node sees them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dev_demo_run_goes_through_the_stream() {
    let nats = NatsServer::start();
    let cfg = cluster_config(&nats.url());
    let a = TestGateway::start_with(Config {
        dev: true,
        ..cfg.clone()
    })
    .await;
    let b = TestGateway::start_with(cfg).await;
    let mut on_b = b.connect("lee").await;
    let answer = reqwest::Client::new()
        .post(a.url("/dev/run"))
        .bearer_auth(a.token("lee"))
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 202);
    let frame = on_b.next_json().await.unwrap();
    assert_eq!(frame["type"], "event", "{frame}");
    assert_eq!(frame["kind"], "agent_started", "{frame}");
}

/// A node whose revocations cannot be loaded (its NATS link is cut after it joined) gives up
/// after `cluster.revocations_load_timeout_secs`, saying why, and never answers a client
/// meanwhile: it would admit revoked tokens.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_cannot_load_the_revocations_does_not_serve() {
    let nats = NatsServer::start();
    let proxy = Proxy::start(nats.port).await;
    let mut cfg = cluster_config(&proxy.url());
    cfg.cluster.revocations_load_timeout_secs = 1;
    cfg.cluster.request_timeout_ms = 200;
    let state = AppState::new(cfg).expect("gateway starts");
    state
        .join_cluster()
        .await
        .expect("gateway joins the cluster");
    proxy.cut();

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let serving = tokio::spawn(gateway::serve_with_ops(
        listener,
        None,
        state,
        std::future::pending(),
    ));
    // A client already waiting on the listener while the node loads.
    let mut client = tokio::net::TcpStream::connect(addr).await.unwrap();
    client
        .write_all(b"GET /healthz HTTP/1.1\r\nhost: gateway\r\n\r\n")
        .await
        .unwrap();

    let served = tokio::time::timeout(WAIT, serving)
        .await
        .expect("the node gives up within the bound, instead of serving")
        .unwrap();
    let err = served.expect_err("a node without its revocations must not serve");
    let err = err.to_string();
    assert!(
        err.contains("revocations") && err.contains("within 1 s"),
        "{err}"
    );
    // The listener went with the node: the waiting client was never answered.
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(WAIT, client.read_to_end(&mut answer))
        .await
        .expect("the connection ends with the node");
    assert!(
        answer.is_empty(),
        "answered: {}",
        String::from_utf8_lossy(&answer)
    );
}

/// Waits, up to `bound`, until the metric is at least `want`.
async fn wait_metric_at_least(gw: &TestGateway, name: &str, want: f64, bound: Duration) {
    let deadline = tokio::time::Instant::now() + bound;
    loop {
        let value = gw.metric(name).await;
        if value >= want {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{name} is {value}, expected at least {want} within {bound:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A node's watch of the disconnects that ends and starts again replays every record; the
/// ones it applied before close nothing again, so a user who reconnected after being
/// disconnected stays connected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_watch_does_not_close_sessions_again() {
    let nats = NatsServer::start();
    let cfg = cluster_config(&nats.url());
    let a = TestGateway::start_with(cfg.clone()).await;
    let b = TestGateway::start_with(cfg).await;
    let restarts = "gateway_disconnect_watch_restarts_total";

    // xan is disconnected from node B; node A closes xan's session there.
    let mut xan = a.connect("xan").await;
    disconnect(&b, json!({"user_id": "xan", "reason": "logout"})).await;
    assert_eq!(xan.closed().await.code, 4001);
    // xan comes back to node A (a fresh token, after the disconnect).
    let mut xan = a.connect("xan").await;
    let mut yui = a.connect("yui").await;

    // The server stops answering; after missing its heartbeats (10 s) node A's watch ends,
    // and it is started again once the server is back.
    assert_eq!(a.metric(restarts).await, 0.0);
    nats.pause();
    wait_metric_at_least(&a, restarts, 1.0, 3 * WAIT).await;
    nats.resume();

    // A record made after the restart reaches node A through the new watch, after the replay
    // of the older ones (the watch delivers in order).
    disconnect(&b, json!({"user_id": "yui", "reason": "logout"})).await;
    assert_eq!(yui.closed().await.code, 4001);
    // The replayed record of xan's disconnect closed nothing.
    xan.send_json(&json!({"type": "ping"})).await;
    let pong = xan.next_json().await.expect("xan's session is still open");
    assert_eq!(pong["type"], "pong", "{pong}");
}

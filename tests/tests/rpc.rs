//! The control path: a client's `{"type":"rpc"}` frames taken by the host (never the
//! guest), POSTed signed and with the verified identity to a real HTTP backend, and answered
//! to that connection only; every failure and every bound answered with its code. The real
//! gateway on port 0, the reference guest built from source, real sockets.

use std::collections::BTreeSet;

use gateway_tests::backend::{BACKEND_SECRET, Backend};
use gateway_tests::{Client, TestGateway, claims, config, guests, token};
use serde_json::{Value, json};

fn rpc_config(backend: &Backend) -> gateway::config::Config {
    let mut config = config(guests::REFERENCE);
    config.rpc.url = Some(backend.url());
    config.rpc.secret = Some(BACKEND_SECRET.into());
    config
}

fn call(id: &str, method: &str, data: Value) -> Value {
    json!({"type": "rpc", "id": id, "method": method, "data": data})
}

/// Connects as `user`; returns the client and the connection id its welcome names.
async fn connect(gw: &TestGateway, user: &str) -> (Client, String) {
    let mut client = gw.try_connect(&gw.token(user)).await.unwrap();
    let welcome = client.next_json().await.unwrap();
    assert_eq!(welcome["type"], "welcome");
    (
        client,
        welcome["connection_id"].as_str().unwrap().to_owned(),
    )
}

/// The guest's answer to a ping is the next frame: nothing else (an RPC frame passed to
/// the guest would have been answered with its error frame) came before it.
async fn nothing_else_before_pong(client: &mut Client) {
    client.send_json(&json!({"type": "ping"})).await;
    let next = client.next_json().await.unwrap();
    assert_eq!(
        next["type"], "pong",
        "expected the guest's pong next: {next}"
    );
}

async fn next_answer(client: &mut Client) -> Value {
    let frame = client.next_json().await.unwrap();
    assert!(
        matches!(frame["type"].as_str(), Some("rpc_result" | "rpc_error")),
        "expected an rpc answer, got {frame}"
    );
    frame
}

#[tokio::test]
async fn a_call_reaches_the_backend_signed_with_the_verified_identity() {
    let backend = Backend::start(0).await;
    let gw = TestGateway::start_with(rpc_config(&backend)).await;
    let mut c = claims("alice");
    c.tenant = Some("acme".into());
    c.sid = Some("s-1".into());
    let mut alice = gw.try_connect(&token(c)).await.unwrap();
    let welcome = alice.next_json().await.unwrap();
    // Fields in `data` that claim another identity are only data.
    let data = json!({"run_id": "r-7", "user_id": "mallory", "tenant_id": "evil"});
    alice.send_json(&call("1", "echo", data.clone())).await;
    let answer = next_answer(&mut alice).await;
    assert_eq!(answer["type"], "rpc_result", "{answer}");
    assert_eq!(answer["id"], "1");
    let seen = &answer["data"];
    assert_eq!(seen["method"], "echo");
    assert_eq!(seen["data"], data);
    assert_eq!(seen["user_id"], "alice");
    assert_eq!(seen["tenant_id"], "acme");
    assert_eq!(seen["sid"], "s-1");
    assert_eq!(seen["connection_id"], welcome["connection_id"]);
    let received = backend.received();
    assert_eq!(received.len(), 1);
    assert!(received[0].signed, "signature: {:?}", received[0].signature);
    // Numeric ids come back as numbers.
    alice.send_json(&call("x", "echo", Value::Null)).await;
    let mut numeric = call("x", "echo", Value::Null);
    numeric["id"] = json!(42);
    alice.send_json(&numeric).await;
    assert_eq!(next_answer(&mut alice).await["id"], "x");
    assert_eq!(next_answer(&mut alice).await["id"], 42);
    nothing_else_before_pong(&mut alice).await;
    assert_eq!(
        gw.metric("gateway_rpc_calls_total{outcome=\"ok\"}").await,
        3.0
    );
}

#[tokio::test]
async fn backend_failures_are_answered_with_their_code() {
    let backend = Backend::start(40 << 10).await;
    let mut config = rpc_config(&backend);
    config.rpc.timeout_ms = 300;
    config.rpc.max_answer_bytes = 32 << 10;
    config.rpc.call_burst = 20;
    let gw = TestGateway::start_with(config).await;
    let (mut alice, _) = connect(&gw, "alice").await;

    alice
        .send_json(&call("f", "fail", json!({"run_id": "r-1"})))
        .await;
    let answer = next_answer(&mut alice).await;
    assert_eq!(
        (
            &answer["type"],
            &answer["code"],
            &answer["status"],
            &answer["reason"]
        ),
        (
            &json!("rpc_error"),
            &json!("backend_error"),
            &json!(409),
            &json!("run already finished")
        ),
        "{answer}"
    );
    assert_eq!(answer["data"]["run_id"], "r-1");

    for (method, code) in [
        ("html", "bad_answer"),
        ("big", "answer_too_large"),
        ("hold", "timeout"),
        ("no_such", "backend_error"),
    ] {
        alice.send_json(&call(method, method, json!({}))).await;
        let answer = next_answer(&mut alice).await;
        assert_eq!(
            (answer["id"].as_str(), answer["code"].as_str()),
            (Some(method), Some(code)),
            "{answer}"
        );
    }
    nothing_else_before_pong(&mut alice).await;
    for outcome in ["backend_error", "bad_answer", "answer_too_large", "timeout"] {
        let want = if outcome == "backend_error" { 2.0 } else { 1.0 };
        assert_eq!(
            gw.metric(&format!("gateway_rpc_calls_total{{outcome=\"{outcome}\"}}"))
                .await,
            want,
            "{outcome}"
        );
    }
}

#[tokio::test]
async fn a_backend_that_is_down_or_absent_is_answered_not_waited_for() {
    // A port nothing listens on any more.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/rpc", closed.local_addr().unwrap());
    drop(closed);
    let mut config = config(guests::REFERENCE);
    config.rpc.url = Some(url);
    config.rpc.secret = Some(BACKEND_SECRET.into());
    let gw = TestGateway::start_with(config).await;
    let (mut alice, _) = connect(&gw, "alice").await;
    alice.send_json(&call("1", "echo", json!({}))).await;
    let answer = next_answer(&mut alice).await;
    assert_eq!(
        (&answer["id"], &answer["code"]),
        (&json!("1"), &json!("unavailable"))
    );
    nothing_else_before_pong(&mut alice).await;

    // No backend configured: refused as such, and still not the guest's.
    let gw = TestGateway::start().await;
    let (mut bob, _) = connect(&gw, "bob").await;
    bob.send_json(&call("2", "cancel_run", json!({}))).await;
    let answer = next_answer(&mut bob).await;
    assert_eq!(
        (&answer["id"], &answer["code"]),
        (&json!("2"), &json!("rpc_disabled"))
    );
    nothing_else_before_pong(&mut bob).await;
}

#[tokio::test]
async fn every_bound_on_calls_is_answered_with_its_code() {
    let backend = Backend::start(0).await;
    let mut config = rpc_config(&backend);
    config.rpc.max_in_flight_per_connection = 2;
    config.rpc.max_request_bytes = 512;
    let gw = TestGateway::start_with(config).await;
    let (mut alice, _) = connect(&gw, "alice").await;

    // Malformed calls: no usable id, then a bad method.
    alice.send_text(r#"{"type":"rpc","method":"echo"}"#).await;
    let answer = next_answer(&mut alice).await;
    assert_eq!(
        (&answer["id"], &answer["code"]),
        (&Value::Null, &json!("invalid_rpc"))
    );
    alice
        .send_text(r#"{"type":"rpc","id":"m","method":"drop table"}"#)
        .await;
    let answer = next_answer(&mut alice).await;
    assert_eq!(
        (&answer["id"], &answer["code"]),
        (&json!("m"), &json!("invalid_rpc"))
    );
    alice
        .send_json(&call("big", "echo", json!({"pad": "p".repeat(600)})))
        .await;
    let answer = next_answer(&mut alice).await;
    assert_eq!(
        (&answer["id"], &answer["code"]),
        (&json!("big"), &json!("too_large"))
    );

    // Two in flight; the third is refused at once, while the two still wait.
    alice.send_json(&call("h1", "hold", json!({}))).await;
    alice.send_json(&call("h2", "hold", json!({}))).await;
    alice.send_json(&call("h3", "hold", json!({}))).await;
    let answer = next_answer(&mut alice).await;
    assert_eq!(
        (&answer["id"], &answer["code"]),
        (&json!("h3"), &json!("too_many_calls"))
    );
    backend.open_gate();
    let ids: BTreeSet<String> = [next_answer(&mut alice).await, next_answer(&mut alice).await]
        .iter()
        .map(|a| {
            assert_eq!(a["type"], "rpc_result", "{a}");
            a["id"].as_str().unwrap().to_owned()
        })
        .collect();
    assert_eq!(ids, BTreeSet::from(["h1".to_owned(), "h2".to_owned()]));
    // Slots are free again.
    alice.send_json(&call("after", "echo", json!({}))).await;
    assert_eq!(next_answer(&mut alice).await["type"], "rpc_result");

    nothing_else_before_pong(&mut alice).await;
    assert_eq!(
        gw.metric("gateway_rpc_calls_total{outcome=\"too_many_calls\"}")
            .await,
        1.0
    );
}

#[tokio::test]
async fn calls_past_the_rate_are_refused_not_queued() {
    let backend = Backend::start(0).await;
    let mut config = rpc_config(&backend);
    config.rpc.calls_per_sec = 1;
    config.rpc.call_burst = 3;
    let gw = TestGateway::start_with(config).await;
    let (mut alice, _) = connect(&gw, "alice").await;
    // Held calls stay in flight, so only the rate can refuse these (4 may be in flight).
    for i in 0..4 {
        alice
            .send_json(&call(&format!("r{i}"), "hold", json!({})))
            .await;
    }
    let first = next_answer(&mut alice).await;
    assert_eq!(
        (&first["id"], &first["code"]),
        (&json!("r3"), &json!("rate_limited"))
    );
    backend.open_gate();
    let mut answered = BTreeSet::new();
    for _ in 0..3 {
        let answer = next_answer(&mut alice).await;
        assert_eq!(answer["type"], "rpc_result", "{answer}");
        answered.insert(answer["id"].as_str().unwrap().to_owned());
    }
    assert_eq!(
        answered,
        BTreeSet::from(["r0", "r1", "r2"].map(String::from))
    );
    nothing_else_before_pong(&mut alice).await;
}

#[tokio::test]
async fn the_node_bound_is_shared_and_a_closed_connection_frees_its_calls() {
    let backend = Backend::start(0).await;
    let mut config = rpc_config(&backend);
    config.rpc.max_in_flight = 1;
    let gw = TestGateway::start_with(config).await;
    let (mut alice, _) = connect(&gw, "alice").await;
    let (mut bob, _) = connect(&gw, "bob").await;
    alice.send_json(&call("a", "hold", json!({}))).await;
    gateway_tests::wait_until("alice's call reached the backend", async || {
        !backend.received().is_empty()
    })
    .await;
    bob.send_json(&call("b", "echo", json!({}))).await;
    let answer = next_answer(&mut bob).await;
    assert_eq!(
        (&answer["id"], &answer["code"]),
        (&json!("b"), &json!("busy"))
    );
    // Alice leaves with her call in flight: it is abandoned and its slot freed.
    alice.close().await;
    gw.wait_metric("gateway_rpc_calls_in_flight", 0.0).await;
    bob.send_json(&call("b2", "echo", json!({}))).await;
    let answer = next_answer(&mut bob).await;
    assert_eq!(
        (&answer["id"], &answer["type"]),
        (&json!("b2"), &json!("rpc_result"))
    );
    assert_eq!(
        backend.received().len(),
        2,
        "the busy call never left the gateway"
    );
}

/// Answers go to the connection that asked, whoever else calls at the same time: two
/// connections of one user and one of another, calls interleaved by the backend's delays.
#[tokio::test]
async fn an_answer_reaches_only_the_connection_that_asked() {
    let backend = Backend::start(0).await;
    let mut config = rpc_config(&backend);
    config.rpc.max_in_flight_per_connection = 8;
    let gw = TestGateway::start_with(config).await;
    let mut clients = Vec::new();
    for user in ["alice", "alice", "bob"] {
        clients.push(connect(&gw, user).await);
    }
    for (n, (client, _)) in clients.iter_mut().enumerate() {
        for i in 0..6u64 {
            // Later calls answered sooner, and the connections' calls overlap.
            let ms = (6 - i) * 40 + n as u64 * 15;
            let data = json!({"ms": ms, "nonce": format!("{n}-{i}")});
            client
                .send_json(&call(&format!("{n}-{i}"), "delay", data))
                .await;
        }
    }
    for (n, (client, connection_id)) in clients.iter_mut().enumerate() {
        let mut ids = BTreeSet::new();
        for _ in 0..6 {
            let answer = next_answer(client).await;
            assert_eq!(answer["type"], "rpc_result", "{answer}");
            let id = answer["id"].as_str().unwrap().to_owned();
            assert_eq!(answer["data"]["data"]["nonce"], id.as_str());
            assert_eq!(answer["data"]["connection_id"], connection_id.as_str());
            assert!(id.starts_with(&format!("{n}-")), "connection {n} got {id}");
            ids.insert(id);
        }
        assert_eq!(ids.len(), 6);
        nothing_else_before_pong(client).await;
    }
}

/// Cluster mode: a call leaves from the node holding the connection and comes back to it;
/// two nodes, one user on each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_in_cluster_mode_answer_the_connection_on_its_own_node() {
    let nats = gateway_tests::nats::NatsServer::start();
    let backend = Backend::start(0).await;
    let mut cfg = rpc_config(&backend);
    cfg.cluster.nats_url = Some(nats.url());
    let a = TestGateway::start_with(cfg.clone()).await;
    let b = TestGateway::start_with(cfg).await;
    let (mut on_a, id_a) = connect(&a, "alice").await;
    let (mut on_b, id_b) = connect(&b, "alice").await;
    on_a.send_json(&call("1", "echo", json!({"node": "a"})))
        .await;
    on_b.send_json(&call("1", "echo", json!({"node": "b"})))
        .await;
    for (client, id, node) in [(&mut on_a, &id_a, "a"), (&mut on_b, &id_b, "b")] {
        let answer = next_answer(client).await;
        assert_eq!(answer["type"], "rpc_result", "{answer}");
        assert_eq!(answer["data"]["connection_id"], id.as_str());
        assert_eq!(answer["data"]["data"]["node"], node);
        nothing_else_before_pong(client).await;
    }
    assert_eq!(backend.received().len(), 2);
}

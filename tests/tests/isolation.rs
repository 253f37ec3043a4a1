//! Routing and isolation: each connection gets exactly its own user's events, in order, and
//! each keeps its own handler state.

use gateway_tests::{Client, TestGateway};
use serde_json::{Value, json};

fn event(user: &str, n: usize) -> Value {
    json!({
        "user_id": user,
        "kind": "agent_thinking",
        "payload": {"for": user, "n": n},
        "run_id": format!("run-{user}"),
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_connection_gets_exactly_its_users_events_in_order() {
    let gw = TestGateway::start().await;
    let users = ["alice", "bob", "carol"];
    let mut clients: Vec<(&str, Client)> = Vec::new();
    for user in users {
        for _ in 0..3 {
            clients.push((user, gw.connect(user).await));
        }
    }
    // A fourth user with a connection but no events must receive nothing.
    let mut idle = gw.connect("dave").await;

    let publisher = gw.publisher_token();
    let per_user = 30;
    let mut expected_seq = std::collections::HashMap::new();
    for n in 0..per_user {
        // Interleave users, alternating single and batch publishes.
        if n % 2 == 0 {
            for user in users {
                let (status, body) = gw.publish(&publisher, &event(user, n)).await;
                assert_eq!(status, 200, "{body}");
                assert_eq!(body["queued"], 3, "{body}");
                expected_seq.insert((user, n), body["seq"].as_u64().unwrap());
            }
        } else {
            let batch: Vec<Value> = users.iter().map(|u| event(u, n)).collect();
            let (status, body) = gw.publish_batch(&publisher, &batch).await;
            assert_eq!(status, 200, "{body}");
            for (user, result) in users.iter().zip(body["results"].as_array().unwrap()) {
                assert_eq!(result["user_id"], *user);
                expected_seq.insert((*user, n), result["seq"].as_u64().unwrap());
            }
        }
    }

    for (user, client) in &mut clients {
        for n in 0..per_user {
            let frame = client.next_json().await.unwrap();
            assert_eq!(frame["type"], "event", "{frame}");
            assert_eq!(frame["payload"]["for"], *user, "misdelivered: {frame}");
            assert_eq!(frame["payload"]["n"], n, "out of order: {frame}");
            assert_eq!(frame["seq"], expected_seq[&(*user, n)], "{frame}");
            assert_eq!(frame["run_id"], format!("run-{user}"));
            assert_eq!(frame["kind"], "agent_thinking");
        }
    }
    // Nothing extra anywhere: a marker published to each user now is the next frame of each
    // of its connections, so no duplicate and no other user's event is queued before it; dave,
    // who was sent nothing, gets his marker first.
    let mut markers = std::collections::HashMap::new();
    for user in users.into_iter().chain(["dave"]) {
        markers.insert(user, gw.publish_marker(user, None).await);
    }
    for (user, client) in &mut clients {
        client.expect_event(markers[user]).await;
    }
    idle.expect_event(markers["dave"]).await;
    // Per-user sequence numbers run on by one from each user's first.
    for user in users {
        let first = expected_seq[&(user, 0)];
        for n in 0..per_user {
            assert_eq!(expected_seq[&(user, n)], first + n as u64, "{user}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handler_state_lives_in_each_connections_own_instance() {
    let gw = TestGateway::start().await;
    let mut a = gw.connect("alice").await;
    let mut b = gw.connect("alice").await;

    a.send_json(&json!({"type": "subscribe", "thread_id": "t-a"}))
        .await;
    assert_eq!(a.next_json().await.unwrap()["threads"], json!(["t-a"]));
    b.send_json(&json!({"type": "subscribe", "thread_id": "t-b"}))
        .await;
    assert_eq!(b.next_json().await.unwrap()["threads"], json!(["t-b"]));
    b.send_json(&json!({"type": "ping"})).await;
    b.next_json().await.unwrap();

    let publisher = gw.publisher_token();
    for thread in ["t-a", "t-b", "t-other"] {
        let body = json!({"user_id": "alice", "kind": "agent_started",
                          "payload": {"thread": thread}, "thread_id": thread});
        assert_eq!(gw.publish(&publisher, &body).await.0, 200);
    }
    let got_a = a.next_json().await.unwrap();
    assert_eq!(got_a["thread_id"], "t-a", "{got_a}");
    let got_b = b.next_json().await.unwrap();
    assert_eq!(got_b["thread_id"], "t-b", "{got_b}");

    a.send_json(&json!({"type": "ping"})).await;
    let pong_a = a.next_json().await.unwrap();
    b.send_json(&json!({"type": "ping"})).await;
    let pong_b = b.next_json().await.unwrap();

    assert_eq!(pong_a["type"], "pong");
    assert_ne!(pong_a["connection_id"], pong_b["connection_id"]);
    assert_eq!(pong_a["user_id"], "alice");
    assert_eq!(pong_a["subscriptions"], json!(["t-a"]));
    assert_eq!(pong_b["subscriptions"], json!(["t-b"]));
    // a: subscribe + ping; b: subscribe + ping + ping.
    assert_eq!(pong_a["frames_in"], 2, "{pong_a}");
    assert_eq!(pong_b["frames_in"], 3, "{pong_b}");
    // Both saw all three events; each forwarded only its own thread's.
    for pong in [&pong_a, &pong_b] {
        assert_eq!(pong["events_in"], 3, "{pong}");
        assert_eq!(pong["events_out"], 1, "{pong}");
        assert_eq!(pong["events_filtered"], 2, "{pong}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_lifecycle_and_redaction_happen_in_the_guest() {
    let gw = TestGateway::start().await;
    let mut client = gw.connect("erin").await;
    let publisher = gw.publisher_token();
    let steps = [
        ("agent_started", "started"),
        ("tool_executing", "tools_running"),
        ("tool_completed", "started"),
        ("agent_completed", "completed"),
    ];
    for (kind, _) in steps {
        let body = json!({"user_id": "erin", "kind": kind, "run_id": "r1",
        "payload": {
            "tool": "search",
            "max_tokens": 512,
            "config": {"api_key": "sk-live-123", "nested": [{"Password": "hunter2"}]},
            "Authorization": "Bearer abc",
        }});
        assert_eq!(gw.publish(&publisher, &body).await.0, 200);
    }
    for (kind, state) in steps {
        let frame = client.next_json().await.unwrap();
        assert_eq!(frame["kind"], kind);
        assert_eq!(frame["run_state"], state, "{frame}");
        let payload = &frame["payload"];
        assert_eq!(payload["tool"], "search");
        assert_eq!(payload["max_tokens"], 512, "not a secret: {payload}");
        assert_eq!(payload["config"]["api_key"], "[redacted]", "{payload}");
        assert_eq!(payload["config"]["nested"][0]["Password"], "[redacted]");
        assert_eq!(payload["Authorization"], "[redacted]");
        assert!(!frame.to_string().contains("hunter2"));
        assert!(!frame.to_string().contains("sk-live"));
    }
    client.send_json(&json!({"type": "ping"})).await;
    let pong = client.next_json().await.unwrap();
    assert_eq!(pong["runs"]["r1"]["state"], "completed", "{pong}");
    assert_eq!(pong["runs"]["r1"]["events"], 4);
    assert_eq!(pong["redactions"], 12, "{pong}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instances_are_dropped_when_clients_disconnect() {
    let gw = TestGateway::start().await;
    let mut clients = Vec::new();
    for i in 0..20 {
        clients.push(gw.connect(&format!("user-{}", i % 4)).await);
    }
    gw.wait_metric("gateway_instances_live", 20.0).await;
    gw.wait_metric("gateway_sessions_live", 20.0).await;
    assert_eq!(gw.metric("gateway_instantiations_total").await, 20.0);

    // Half close cleanly, half just drop their sockets.
    for (i, client) in clients.into_iter().enumerate() {
        if i % 2 == 0 {
            client.close().await;
        } else {
            drop(client);
        }
    }
    gw.wait_metric("gateway_instances_live", 0.0).await;
    gw.wait_metric("gateway_sessions_live", 0.0).await;
    // Nothing is routed to a closed session: a publish now reaches no one.
    let (status, body) = gw.publish(&gw.publisher_token(), &event("user-1", 0)).await;
    assert_eq!(status, 200);
    assert_eq!(body["queued"], 0);
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_closes_sessions_with_going_away() {
    let gw = TestGateway::start().await;
    let mut client = gw.connect("frank").await;
    let state = gw.state.clone();
    let stop = tokio::spawn(gw.stop());
    let closed = client.closed().await;
    assert_eq!(
        (closed.code, closed.reason.as_str()),
        (1001, "gateway shutting down; resume with since")
    );
    stop.await.unwrap();
    assert_eq!(state.metrics.instances_live.get(), 0);
}

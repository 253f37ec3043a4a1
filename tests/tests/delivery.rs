//! Delivery guarantees: resume with `?since=` (no gap, no duplicate, never a partial replay
//! presented as complete), idempotent publish, and backpressure on publishers.

use gateway_tests::{Client, TestGateway, claims, config, guests, token};
use serde_json::{Value, json};

async fn connect_since(gw: &TestGateway, user: &str, since: Option<u64>) -> Client {
    let query = since.map_or(String::new(), |s| format!("since={s}"));
    let mut client = gw
        .try_connect_with_query(&token(claims(user)), &query)
        .await
        .unwrap();
    assert_eq!(client.next_json().await.unwrap()["type"], "welcome");
    client
}

fn event(user: &str, n: u64) -> Value {
    json!({"user_id": user, "kind": "agent_thinking", "payload": {"n": n}})
}

async fn publish(gw: &TestGateway, body: &Value) -> Value {
    let (status, reply) = gw.publish(&gw.publisher_token(), body).await;
    assert_eq!(status, 200, "{reply}");
    reply
}

/// Reads as many events as `expected` holds and asserts their payload `n`s are exactly
/// those, in order; then proves nothing follows them: a marker published to `user` now must
/// be the very next frame, so a trailing duplicate or an extra event (queued before the
/// marker) fails here instead of going unread.
async fn read_exactly(gw: &TestGateway, client: &mut Client, user: &str, expected: &[u64]) {
    let mut seen = Vec::new();
    for _ in expected {
        let frame = client.next_json().await.unwrap();
        assert_eq!(frame["type"], "event", "{frame}");
        assert_eq!(frame["kind"], "agent_thinking", "{frame}");
        seen.push(frame["payload"]["n"].as_u64().unwrap());
    }
    assert_eq!(seen, expected, "gap, duplicate or reorder");
    let marker = gw.publish_marker(user, None).await;
    client.expect_event(marker).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_resuming_with_since_gets_exactly_what_it_missed_then_live_events() {
    let gw = TestGateway::start().await;
    let mut client = connect_since(&gw, "alice", None).await;
    let first = publish(&gw, &event("alice", 1)).await;
    assert_eq!(client.next_json().await.unwrap()["seq"], first["seq"]);
    client.close().await;

    // Published while away.
    for n in 2..=4 {
        publish(&gw, &event("alice", n)).await;
    }
    let since = first["seq"].as_u64().unwrap();
    let mut client = connect_since(&gw, "alice", Some(since)).await;
    let resumed = client.next_json().await.unwrap();
    assert_eq!(resumed["type"], "gateway.resumed", "{resumed}");
    assert_eq!(resumed["recovered"], true, "{resumed}");
    assert_eq!(resumed["replayed"], 3, "{resumed}");
    publish(&gw, &event("alice", 5)).await;
    read_exactly(&gw, &mut client, "alice", &[2, 3, 4, 5]).await;
    assert_eq!(
        gw.metric(r#"gateway_resumes_total{result="recovered"}"#)
            .await,
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_racing_the_replay_leaves_no_gap_and_no_duplicate() {
    let gw = TestGateway::start().await;
    let first = publish(&gw, &event("alice", 0)).await;
    let since = first["seq"].as_u64().unwrap();
    for n in 1..=200 {
        publish(&gw, &event("alice", n)).await;
    }
    // Publish 200 more while the client connects and replays.
    let burst = {
        let url = gw.url("/v1/publish/batch");
        let publisher = gw.publisher_token();
        tokio::spawn(async move {
            for chunk in 0..10u64 {
                let events: Vec<Value> = (1..=20)
                    .map(|i| event("alice", 200 + chunk * 20 + i))
                    .collect();
                let body = json!({ "events": events }).to_string();
                let (status, _) = gateway_tests::post(&url, &publisher, body).await;
                assert_eq!(status, 200);
            }
        })
    };
    let mut client = connect_since(&gw, "alice", Some(since)).await;
    let resumed = client.next_json().await.unwrap();
    assert_eq!(resumed["recovered"], true, "{resumed}");
    burst.await.unwrap();
    let all: Vec<u64> = (1..=400).collect();
    read_exactly(&gw, &mut client, "alice", &all).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn positions_the_log_cannot_prove_are_not_recovered() {
    let mut cfg = config(guests::REFERENCE);
    cfg.history.max_events_per_user = 3;
    let gw = TestGateway::start_with(cfg).await;
    let seqs: Vec<u64> = {
        let mut seqs = Vec::new();
        for n in 1..=5 {
            seqs.push(
                publish(&gw, &event("alice", n)).await["seq"]
                    .as_u64()
                    .unwrap(),
            );
        }
        seqs
    };
    // Evicted: only the last three are held.
    let mut client = connect_since(&gw, "alice", Some(seqs[0])).await;
    let resumed = client.next_json().await.unwrap();
    assert_eq!(resumed["recovered"], false, "{resumed}");
    assert_eq!(resumed["reason"], "evicted");
    assert_eq!(resumed["earliest"], seqs[2]);
    assert_eq!(resumed["replayed"], 0);
    // Live events still flow after a failed resume.
    publish(&gw, &event("alice", 6)).await;
    read_exactly(&gw, &mut client, "alice", &[6]).await;
    client.close().await;

    // A position from before a restart: a new gateway numbers above it.
    gw.stop().await;
    let gw = TestGateway::start().await;
    publish(&gw, &event("alice", 7)).await;
    let mut client = connect_since(&gw, "alice", Some(seqs[4])).await;
    let resumed = client.next_json().await.unwrap();
    assert_eq!(resumed["recovered"], false, "{resumed}");
    assert_eq!(resumed["reason"], "unknown_position");
    assert!(
        resumed["head"].as_u64().unwrap() > seqs[4],
        "seq grows across restarts"
    );
    assert_eq!(
        gw.metric(r#"gateway_resumes_total{result="not_recovered"}"#)
            .await,
        1.0
    );

    // Not a number: refused before the upgrade.
    let url = format!("{}?since=yesterday", gw.ws_url());
    let mut request =
        tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(url)
            .unwrap();
    request.headers_mut().insert(
        "authorization",
        format!("Bearer {}", token(claims("alice")))
            .parse()
            .unwrap(),
    );
    let err = tokio_tungstenite::connect_async(request).await.unwrap_err();
    assert!(err.to_string().contains("400"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idempotent_publish_is_delivered_once_with_one_seq() {
    let gw = TestGateway::start().await;
    let mut client = connect_since(&gw, "alice", None).await;
    let mut body = event("alice", 1);
    body["idempotency_key"] = json!("run-1/step-1");
    let first = publish(&gw, &body).await;
    let again = publish(&gw, &body).await;
    assert_eq!(again["seq"], first["seq"]);
    assert_eq!(again["duplicate"], true, "{again}");
    assert_eq!(again["queued"], 0);
    assert!(first.get("duplicate").is_none(), "{first}");
    // In a batch too, and against the single publish before it.
    let (status, reply) = gw
        .publish_batch(&gw.publisher_token(), &[body.clone(), event("alice", 2)])
        .await;
    assert_eq!(status, 200);
    assert_eq!(reply["results"][0]["seq"], first["seq"]);
    assert_eq!(reply["results"][0]["duplicate"], true);
    read_exactly(&gw, &mut client, "alice", &[1, 2]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_client_closed_for_overflow_resumes_without_loss() {
    let mut cfg = config(guests::REFERENCE);
    cfg.limits.event_queue = 4;
    let gw = TestGateway::start_with(cfg).await;
    let mut client = connect_since(&gw, "alice", None).await;
    let first = publish(&gw, &event("alice", 0)).await;
    let since = first["seq"].as_u64().unwrap();
    assert_eq!(client.next_json().await.unwrap()["seq"], first["seq"]);
    // The client stops reading; a burst overflows its queue and the gateway closes it.
    let events: Vec<Value> = (1..=50).map(|n| event("alice", n)).collect();
    let (status, _) = gw.publish_batch(&gw.publisher_token(), &events).await;
    assert_eq!(status, 200);
    // What was written before the close is the burst's start, in order, and no more.
    let (frames, closed) = client.frames_until_close().await;
    assert_eq!(closed.code, 4000, "{closed:?}");
    let got: Vec<u64> = frames
        .iter()
        .map(|f| f["payload"]["n"].as_u64().unwrap_or_else(|| panic!("{f}")))
        .collect();
    assert_eq!(
        got,
        (1..=got.len() as u64).collect::<Vec<_>>(),
        "{frames:?}"
    );
    assert!(
        got.len() < 50,
        "closed for overflow after all 50 arrived: {got:?}"
    );
    let mut client = connect_since(&gw, "alice", Some(since)).await;
    let resumed = client.next_json().await.unwrap();
    assert_eq!(resumed["recovered"], true, "{resumed}");
    assert_eq!(resumed["replayed"], 50, "{resumed}");
    let all: Vec<u64> = (1..=50).collect();
    read_exactly(&gw, &mut client, "alice", &all).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishers_are_pushed_back_when_the_nodes_queues_are_full() {
    let mut cfg = config(guests::REFERENCE);
    cfg.limits.max_queued_bytes = 64 << 10;
    cfg.limits.write_timeout_secs = 120;
    let gw = TestGateway::start_with(cfg).await;
    // A client that never reads: once the socket buffers are full its session cannot write,
    // and what is published for it stays queued (below its own 1 MiB bound).
    let _stalled = connect_since(&gw, "alice", None).await;
    let big = "x".repeat(30 << 10);
    let mut refused = None;
    for n in 0..2000 {
        let body = json!({"user_id": "alice", "kind": "k", "payload": {"n": n, "text": big}});
        let (status, reply) = gw.publish(&gw.publisher_token(), &body).await;
        if status != 200 {
            refused = Some((status, reply));
            break;
        }
    }
    let (status, reply) = refused.expect("publishes refused once the backlog is full");
    assert_eq!(status, 503, "{reply}");
    assert_eq!(reply["error"], "overloaded");
    assert_eq!(
        gw.metric(r#"gateway_refusals_total{reason="overloaded"}"#)
            .await,
        1.0
    );
}

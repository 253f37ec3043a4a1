//! Every limit a client can push against gets a specific, documented answer.

use std::time::{Duration, Instant};

use futures_util::SinkExt;
use gateway::auth::now_secs;
use gateway_tests::{Client, TestGateway, claims, config, guests, post, token};
use serde_json::{Value, json};
use tokio::sync::oneshot;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::frame::Frame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};

async fn start(tweak: impl FnOnce(&mut gateway::config::Limits)) -> TestGateway {
    let mut cfg = config(guests::REFERENCE);
    tweak(&mut cfg.limits);
    TestGateway::start_with(cfg).await
}

async fn http_refusal(gw: &TestGateway, user: &str) -> (u16, Value) {
    gw.refusal(&gw.token(user)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_user_and_node_connection_limits_refuse_before_the_upgrade() {
    let gw = start(|l| {
        l.max_connections_per_user = 2;
        l.max_connections = 3;
    })
    .await;
    let a1 = gw.connect("alice").await;
    let _a2 = gw.connect("alice").await;
    let (status, body) = http_refusal(&gw, "alice").await;
    assert_eq!(status, 429, "{body}");
    assert_eq!(body["error"], "too_many_connections");

    // Another user is unaffected by alice's limit, up to the node's.
    let _b1 = gw.connect("bob").await;
    let ready = reqwest::get(gw.url("/readyz")).await.unwrap();
    assert_eq!(ready.status().as_u16(), 503, "a full node is not ready");
    let (status, body) = http_refusal(&gw, "carol").await;
    assert_eq!(status, 503, "{body}");
    assert!(
        body["reason"]
            .as_str()
            .unwrap()
            .contains("connection limit")
    );

    // Closing one frees both its user's slot and the node's.
    a1.close().await;
    gw.wait_metric("gateway_sessions_live", 2.0).await;
    let ready = reqwest::get(gw.url("/readyz")).await.unwrap();
    assert_eq!(ready.status().as_u16(), 200);
    let _a3 = gw.connect("alice").await;
    assert!(
        gw.metric(r#"gateway_refusals_total{reason="user_limit"}"#)
            .await
            >= 1.0
    );
    assert!(
        gw.metric(r#"gateway_refusals_total{reason="node_full"}"#)
            .await
            >= 1.0
    );
    // Refused connections never got an instance.
    assert_eq!(gw.metric("gateway_instantiations_total").await, 4.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_and_invalid_frames_close_with_their_codes() {
    let gw = start(|l| l.max_message_bytes = 4096).await;

    let mut big = gw.connect("alice").await;
    big.send_text(&"x".repeat(8192)).await;
    assert_eq!(big.closed().await.code, 1009);

    let mut bad_utf8 = gw.connect("alice").await;
    let frame = Frame::message(vec![0xff, 0xfe, 0xfd], OpCode::Data(Data::Text), true);
    bad_utf8.ws.send(Message::Frame(frame)).await.unwrap();
    assert_eq!(bad_utf8.closed().await.code, 1007);

    // Within the limit is fine.
    let mut ok = gw.connect("alice").await;
    ok.send_json(&json!({"type": "ping", "pad": "y".repeat(2000)}))
        .await;
    assert_eq!(ok.next_json().await.unwrap()["type"], "pong");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_flooding_messages_is_closed_for_rate() {
    let gw = start(|l| {
        l.client_messages_per_sec = 5;
        l.client_message_burst = 10;
    })
    .await;
    let mut calm = gw.connect("alice").await;
    let mut flood = gw.connect("alice").await;
    for _ in 0..50 {
        if flood
            .ws
            .send(Message::text(r#"{"type":"ping"}"#))
            .await
            .is_err()
        {
            break;
        }
    }
    // Before the close, the pings the rate let through were answered, each once and in
    // order (the guest counts the frames it was given), and not all 50 were.
    let (frames, closed) = flood.frames_until_close().await;
    assert_eq!(closed.code, 1008, "{closed:?}");
    assert!(closed.reason.contains("rate"), "{closed:?}");
    for (n, frame) in frames.iter().enumerate() {
        assert_eq!(frame["type"], "pong", "{frames:?}");
        assert_eq!(frame["frames_in"], n + 1, "{frames:?}");
    }
    assert!(frames.len() < 50, "{} pongs: not cut", frames.len());
    calm.send_json(&json!({"type": "ping"})).await;
    assert_eq!(calm.next_json().await.unwrap()["type"], "pong");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_client_is_closed_and_its_neighbours_lose_nothing() {
    // Default queue bound (1 MiB): a client that reads keeps up with 200 KB batches, one
    // that does not read fills its socket buffers, then its queue or the write timeout.
    let gw = start(|l| l.write_timeout_secs = 2).await;
    let mut slow = gw.connect("alice").await;
    let mut fast = gw.connect("alice").await;
    let publisher = gw.publisher_token();
    let pad = "p".repeat(2000);
    let total = 6000;
    // The fast client reads everything; the publisher waits for it after each batch, so
    // only the client that does not read can fall behind.
    let (progress_tx, mut progress) = tokio::sync::watch::channel(0usize);
    let reader = tokio::spawn(async move {
        for n in 0..total {
            let frame = fast.next_json().await.unwrap();
            assert_eq!(frame["payload"]["n"], n, "{frame}");
            progress_tx.send_replace(n + 1);
        }
        fast
    });
    for chunk in 0..total / 100 {
        let events: Vec<Value> = (0..100)
            .map(|i| {
                json!({"user_id": "alice", "kind": "tool_executing",
                       "payload": {"n": chunk * 100 + i, "pad": pad}})
            })
            .collect();
        let (status, body) = gw.publish_batch(&publisher, &events).await;
        assert_eq!(status, 200, "{body}");
        let caught_up = (chunk + 1) * 100;
        tokio::time::timeout(gateway_tests::WAIT, progress.wait_for(|n| *n >= caught_up))
            .await
            .expect("the reading client keeps up")
            .unwrap();
    }
    // The slow client never read; it is closed with the slow-client code, not buffered. What
    // reached its socket before is the stream's start, in order, and not all of it.
    let (frames, closed) = slow.frames_until_close().await;
    assert_eq!(closed.code, 4000, "{closed:?}");
    for (n, frame) in frames.iter().enumerate() {
        assert_eq!(frame["payload"]["n"], n, "{frame}");
    }
    assert!(frames.len() < total, "{} frames: never slow", frames.len());
    reader.await.unwrap();
    assert!(
        gw.metric(r#"gateway_session_closes_total{reason="slow_client"}"#)
            .await
            >= 1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_past_the_queue_bound_closes_a_waiting_session_at_once() {
    // The session is idle (waiting for its next event) when its queue overflows: the
    // router must wake it, and it must close as a slow client, not sit on a dead queue.
    // Nothing else would wake it within the wait: no ping, idle or dead-peer timer is due
    // for an hour.
    let gw = start(|l| {
        l.outbound_queue_bytes = 4096;
        l.ping_interval_secs = 3600;
        l.dead_peer_secs = 3600;
        l.idle_timeout_secs = 3600;
    })
    .await;
    let mut alice = gw.connect("alice").await;
    let mut bob = gw.connect("bob").await;
    let publisher = gw.publisher_token();
    let big = json!({"user_id": "alice", "kind": "big", "payload": {"pad": "x".repeat(8000)}});
    let (status, body) = gw.publish(&publisher, &big).await;
    assert_eq!((status, &body["queued"]), (200, &json!(0)), "{body}");
    let closed = alice.closed().await;
    assert_eq!((closed.code, closed.reason.as_str()), (4000, "slow client"));
    assert_eq!(gw.metric("gateway_queue_overflows_total").await, 1.0);

    let small = json!({"user_id": "bob", "kind": "small", "payload": {"n": 1}});
    assert_eq!(gw.publish(&publisher, &small).await.0, 200);
    let frame = bob.next_json().await.unwrap();
    assert_eq!(frame["payload"]["n"], 1, "{frame}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_expiry_closes_live_connections_unless_refreshed() {
    // A live token ends at `exp` plus the leeway, as at connect: 2 s + 1 s here (whole
    // seconds: 2 s to 3 s from now). Only the two connects and the refresh race that; the
    // rest of the test waits for the close.
    let mut cfg = config(guests::REFERENCE);
    cfg.auth.leeway_secs = 1;
    let gw = TestGateway::start_with(cfg).await;
    let mut short = claims("alice");
    short.exp = now_secs() + 2;
    let mut refreshed = gw.connect_with(short.clone()).await;
    refreshed
        .send_json(&json!({"type": "gateway.refresh", "access_token": gw.token("alice")}))
        .await;
    let reply = refreshed.next_json().await.unwrap();
    assert_eq!(reply["type"], "gateway.refreshed", "{reply}");
    assert!(reply["expires_at"].as_u64().unwrap() > now_secs() + 600);
    let mut expiring = gw.connect_with(short).await;
    let mut hijacker = gw.connect("alice").await;

    // A refresh with a bad token is refused but does not end the connection by itself.
    refreshed
        .send_json(&json!({"type": "gateway.refresh", "access_token": "garbage"}))
        .await;
    let reply = refreshed.next_json().await.unwrap();
    assert_eq!(reply["type"], "gateway.refresh_failed", "{reply}");

    // A token for another user is a policy violation.
    hijacker
        .send_json(&json!({"type": "gateway.refresh", "access_token": gw.token("bob")}))
        .await;
    let closed = hijacker.closed().await;
    assert_eq!(closed.code, 1008, "{closed:?}");
    assert!(closed.reason.contains("another user"));

    let closed = expiring.closed().await;
    assert_eq!(closed.code, 1008, "{closed:?}");
    assert_eq!(closed.reason, "token expired");

    // The refreshed one outlived the expiry.
    refreshed.send_json(&json!({"type": "ping"})).await;
    assert_eq!(refreshed.next_json().await.unwrap()["type"], "pong");
    assert_eq!(
        gw.metric(r#"gateway_refusals_total{reason="foreign_refresh"}"#)
            .await,
        1.0
    );
}

/// Keeps `client` (bob's) busy until `stop`: every 100 ms a frame from the client or an
/// event to it, alternately, each of which must be answered.
async fn keep_busy(
    mut client: Client,
    publish_url: String,
    publisher: String,
    mut stop: oneshot::Receiver<()>,
) -> Client {
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    for n in 0u64.. {
        tokio::select! {
            _ = &mut stop => break,
            _ = tick.tick() => {}
        }
        if n % 2 == 0 {
            client.send_json(&json!({"type": "ping"})).await;
            let frame = client
                .next_json()
                .await
                .expect("the busy connection is open");
            assert_eq!(frame["type"], "pong", "{frame}");
        } else {
            let event = json!({"user_id": "bob", "kind": "tick", "payload": {"n": n}});
            let (status, body) = post(&publish_url, &publisher, event.to_string()).await;
            assert_eq!(status, 200, "{body}");
            let frame = client
                .next_json()
                .await
                .expect("the busy connection is open");
            assert_eq!(frame["payload"]["n"], n, "{frame}");
        }
    }
    client
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_and_dead_peers_are_closed() {
    // The gateway's pings (every second) and their pongs are not activity.
    let gw = start(|l| {
        l.idle_timeout_secs = 1;
        l.ping_interval_secs = 1;
        l.dead_peer_secs = 2;
    })
    .await;
    let idle_closes = r#"gateway_session_closes_total{reason="idle"}"#;

    // Traffic keeps a connection open...
    let (stop, stopped) = oneshot::channel();
    let busy = tokio::spawn(keep_busy(
        gw.connect("bob").await,
        gw.url("/v1/publish"),
        gw.publisher_token(),
        stopped,
    ));
    // ...while one silent connection after another is closed for idleness, each no sooner
    // than its timeout: the busy one outlives two idle timeouts.
    for round in 1..=2 {
        let connecting = Instant::now();
        let mut idle = gw.connect("alice").await;
        let closed = idle.closed().await;
        assert_eq!(
            (closed.code, closed.reason.as_str()),
            (1000, "idle timeout")
        );
        assert!(
            connecting.elapsed() >= Duration::from_secs(1),
            "closed before its idle timeout"
        );
        gw.wait_metric(idle_closes, f64::from(round)).await;
    }
    assert!(!busy.is_finished(), "the busy connection ended early");

    // Silence then closes it too.
    stop.send(()).unwrap();
    let mut busy = busy.await.unwrap();
    let closed = busy.closed().await;
    assert_eq!(
        (closed.code, closed.reason.as_str()),
        (1000, "idle timeout")
    );
    gw.wait_metric(idle_closes, 3.0).await;

    let gw = start(|l| {
        l.ping_interval_secs = 1;
        l.dead_peer_secs = 2;
    })
    .await;
    // Not reading means not answering pings. The client reads nothing until the gateway
    // has given up on it (reading would answer the pings), then finds the close frame.
    let mut deaf = gw.connect("alice").await;
    gw.wait_metric(r#"gateway_session_closes_total{reason="dead_peer"}"#, 1.0)
        .await;
    let closed = deaf.closed().await;
    assert_eq!(closed.code, 1001, "{closed:?}");
    assert!(closed.reason.contains("ping"), "{closed:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn browser_origins_are_checked_against_the_allow_list() {
    let mut cfg = config(guests::REFERENCE);
    cfg.auth.allowed_origins = vec!["https://app.example".into()];
    let gw = TestGateway::start_with(cfg).await;
    let connect = |origin: Option<&'static str>| {
        let url = format!("{}?access_token={}", gw.ws_url(), token(claims("alice")));
        async move {
            use tokio_tungstenite::tungstenite::client::IntoClientRequest;
            let mut request = url.into_client_request().unwrap();
            if let Some(origin) = origin {
                request
                    .headers_mut()
                    .insert("origin", origin.parse().unwrap());
            }
            tokio_tungstenite::connect_async(request).await
        }
    };
    assert!(connect(Some("https://app.example")).await.is_ok());
    assert!(
        connect(None).await.is_ok(),
        "non-browser clients send no Origin"
    );
    match connect(Some("https://evil.example")).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            assert_eq!(response.status().as_u16(), 403);
        }
        other => panic!("expected 403, got {other:?}"),
    }
}

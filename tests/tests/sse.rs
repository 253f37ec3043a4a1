//! `GET /sse`: the server-sent event transport, read by a plain HTTP client. Admission as on
//! `/ws`, one guest instance per stream, frames as events with their `seq` as the id, resume
//! with `Last-Event-ID`, the handler's frames from the query, closes as `close` events, and
//! streams that hold no HTTP slot. The real gateway on port 0, the reference guest built from
//! source, real sockets.

use gateway::auth::DISCONNECT_SCOPE;
use gateway_tests::sse::{Open, SseClient};
use gateway_tests::{TestGateway, claims, config, guests, post, token};
use serde_json::{Value, json};

fn sse_url(gw: &TestGateway) -> String {
    gw.url("/sse")
}

/// Opens a stream as `user` with `open`'s options and reads the welcome.
async fn open(gw: &TestGateway, open: Open<'_>) -> SseClient {
    let mut stream = SseClient::open(&sse_url(gw), open)
        .await
        .unwrap_or_else(|refusal| panic!("the stream is refused: {refusal:?}"));
    let welcome = stream.next_json().await.unwrap();
    assert_eq!(welcome["type"], "welcome", "{welcome}");
    stream
}

async fn publish(gw: &TestGateway, user: &str, kind: &str) -> u64 {
    publish_in(gw, user, kind, None).await
}

async fn publish_in(gw: &TestGateway, user: &str, kind: &str, thread: Option<&str>) -> u64 {
    let (status, receipt) = gw
        .publish(
            &gw.publisher_token(),
            &json!({ "user_id": user, "kind": kind, "payload": {"n": kind}, "thread_id": thread }),
        )
        .await;
    assert_eq!(status, 200, "{receipt}");
    receipt["seq"].as_u64().unwrap()
}

/// The next event must be the handler's frame for event `seq`, with `seq` as its id.
async fn expect_event(stream: &mut SseClient, seq: u64) -> Value {
    let event = stream.next_event().await.unwrap();
    assert_eq!(event.event, "message", "{event:?}");
    assert_eq!(event.id, Some(seq.to_string()), "{event:?}");
    let frame = event.json();
    assert_eq!(
        (frame["type"].as_str(), frame["seq"].as_u64()),
        (Some("event"), Some(seq)),
        "{frame}"
    );
    frame
}

#[tokio::test]
async fn events_arrive_as_sse_events_and_last_event_id_resumes_after_the_last_one_read() {
    let gw = TestGateway::start().await;
    let alice = gw.token("alice");
    let mut stream = open(&gw, Open::bearer(&alice)).await;
    // Readable by an EventSource on another origin (no allowed_origins list here).
    assert_eq!(stream.allow_origin.as_deref(), Some("*"));
    let mut seqs = Vec::new();
    for kind in ["agent_started", "tool_executing", "agent_completed"] {
        // Another identity's events in between: none may reach alice's stream.
        publish(&gw, "bob", kind).await;
        let seq = publish(&gw, "alice", kind).await;
        let frame = expect_event(&mut stream, seq).await;
        assert_eq!(frame["kind"], kind);
        seqs.push(seq);
    }
    drop(stream);
    gw.wait_metric("gateway_sse_sessions_live", 0.0).await;

    // Missed while away.
    let later = [
        publish(&gw, "alice", "tool_completed").await,
        publish(&gw, "alice", "agent_completed").await,
    ];
    // `Last-Event-ID` (what a reconnecting EventSource sends) wins over the query's since.
    let id = seqs[1].to_string();
    let mut resumed = open(
        &gw,
        Open {
            token: &alice,
            token_in_query: true,
            query: "since=0",
            last_event_id: Some(&id),
        },
    )
    .await;
    let frame = resumed.next_json().await.unwrap();
    assert_eq!(frame["type"], "gateway.resumed", "{frame}");
    assert_eq!(
        (&frame["recovered"], &frame["since"], &frame["replayed"]),
        (&json!(true), &json!(seqs[1]), &json!(3)),
        "{frame}"
    );
    for seq in [seqs[2], later[0], later[1]] {
        expect_event(&mut resumed, seq).await;
    }
    // Nothing twice, nothing of bob's: the next event is a marker published now.
    let marker = gw.publish_marker("alice", None).await;
    expect_event(&mut resumed, marker).await;
}

#[tokio::test]
async fn query_frames_reach_the_handler_before_the_replay_and_bad_ones_are_refused() {
    let gw = TestGateway::start().await;
    let alice = gw.token("alice");
    let first = publish_in(&gw, "alice", "agent_started", Some("t0")).await;
    let in_t1 = publish_in(&gw, "alice", "agent_started", Some("t1")).await;
    let subscribe = r#"frame=%7B%22type%22%3A%22subscribe%22%2C%22thread_id%22%3A%22t1%22%7D"#;
    let ping = r#"frame=%7B%22type%22%3A%22ping%22%7D"#;
    // From the position just before alice's first event (`since=0` would not be provably
    // complete on a log that just started).
    let query = format!("{subscribe}&{ping}&since={}", first - 1);
    let mut stream = open(
        &gw,
        Open {
            query: &query,
            ..Open::bearer(&alice)
        },
    )
    .await;
    let subscribed = stream.next_json().await.unwrap();
    assert_eq!(
        (&subscribed["type"], &subscribed["threads"]),
        (&json!("subscribed"), &json!(["t1"])),
        "{subscribed}"
    );
    assert_eq!(stream.next_json().await.unwrap()["type"], "pong");
    let resumed = stream.next_json().await.unwrap();
    assert_eq!(
        (&resumed["type"], &resumed["recovered"]),
        (&json!("gateway.resumed"), &json!(true)),
        "{resumed}"
    );
    assert_eq!(resumed["replayed"], 2, "{resumed}");
    // The subscription was in force for the replay: the handler passed over thread t0's.
    expect_event(&mut stream, in_t1).await;
    let live = publish_in(&gw, "alice", "tool_executing", Some("t1")).await;
    expect_event(&mut stream, live).await;

    // More frames than a client's burst, or a bad position: refused before anything runs.
    let mut limits = config(guests::REFERENCE);
    limits.limits.client_message_burst = 2;
    let small = TestGateway::start_with(limits).await;
    let three = format!("{ping}&{ping}&{ping}");
    let cases = [
        (
            Open {
                query: &three,
                ..Open::bearer(&alice)
            },
            (400, "limits.client_message_burst"),
        ),
        (
            Open {
                last_event_id: Some("not-a-seq"),
                ..Open::bearer(&alice)
            },
            (400, "Last-Event-ID"),
        ),
        // And a bad token: the same 401 as on /ws.
        (
            Open {
                token: "not-a-token",
                ..Open::bearer(&alice)
            },
            (401, "token"),
        ),
    ];
    for (open, (status, reason)) in cases {
        let query = open.query.to_owned();
        let refused = SseClient::open(&sse_url(&small), open)
            .await
            .err()
            .unwrap_or_else(|| panic!("{query:?} is refused"));
        assert_eq!(refused.0, status, "{refused:?}");
        assert!(
            refused.1["reason"].as_str().unwrap().contains(reason),
            "{refused:?}"
        );
    }
    assert_eq!(small.metric("gateway_sse_sessions_live").await, 0.0);
}

#[tokio::test]
async fn an_operators_disconnect_ends_the_stream_with_a_close_event() {
    let gw = TestGateway::start().await;
    let mut stream = open(&gw, Open::bearer(&gw.token("alice"))).await;
    let mut operator = claims("ops");
    operator.scope = Some(DISCONNECT_SCOPE.into());
    let (status, answer) = post(
        &gw.url("/v1/disconnect"),
        &token(operator),
        json!({"user_id": "alice", "reason": "logged out"}).to_string(),
    )
    .await;
    assert_eq!(
        (status, &answer["disconnected"]),
        (200, &json!(1)),
        "{answer}"
    );
    let events = stream.until_end().await;
    assert_eq!(events.len(), 1, "only the close event: {events:?}");
    assert_eq!(events[0].event, "close");
    assert_eq!(
        events[0].json(),
        json!({"code": 4001, "reason": "disconnected: logged out"})
    );
    assert_eq!(gw.state.metrics.closes_for("disconnected"), 1);
}

#[tokio::test]
async fn streams_hold_no_http_slot_and_get_heartbeats() {
    let mut config = config(guests::REFERENCE);
    config.limits.max_http_connections = 2;
    config.limits.max_http_connections_per_address = 2;
    config.limits.ping_interval_secs = 1;
    let gw = TestGateway::start_with(config).await;
    let alice = gw.token("alice");
    // Four streams from one address, past both HTTP bounds: each one's slot went back when
    // its stream started, as an upgraded WebSocket's does.
    let mut streams = Vec::new();
    for _ in 0..4 {
        streams.push(open(&gw, Open::bearer(&alice)).await);
    }
    assert_eq!(gw.metric("gateway_sse_sessions_live").await, 4.0);
    // Only the connection that scrapes is still speaking HTTP.
    gw.wait_metric("gateway_http_connections", 1.0).await;
    let seq = publish(&gw, "alice", "agent_started").await;
    for stream in &mut streams {
        expect_event(stream, seq).await;
    }
    // A heartbeat comment every ping interval keeps an idle stream from proxies' timeouts.
    streams[0].wait_comments(2).await;
    drop(streams);
    gw.wait_metric("gateway_sse_sessions_live", 0.0).await;
    gw.wait_metric("gateway_sessions_live", 0.0).await;
    // A stream's end is seen by the session as the client going away, or as a failed write
    // when a heartbeat got there first.
    let metrics = &gw.state.metrics;
    assert_eq!(
        metrics.closes_for("client") + metrics.closes_for("transport"),
        4
    );
}

/// Cluster mode: events published on one node reach a stream on the other, and a stream
/// resumed with `Last-Event-ID` on the first node replays from the shared log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_cluster_mode_a_stream_gets_events_from_any_node_and_resumes_on_another() {
    let nats = gateway_tests::nats::NatsServer::start();
    let mut cfg = config(guests::REFERENCE);
    cfg.cluster.nats_url = Some(nats.url());
    let a = TestGateway::start_with(cfg.clone()).await;
    let b = TestGateway::start_with(cfg).await;
    let alice = a.token("alice");
    let mut on_b = open(&b, Open::bearer(&alice)).await;
    let mut seqs = Vec::new();
    for kind in ["agent_started", "tool_executing"] {
        publish(&a, "bob", kind).await;
        let seq = publish(&a, "alice", kind).await;
        expect_event(&mut on_b, seq).await;
        seqs.push(seq);
    }
    drop(on_b);
    let missed = publish(&b, "alice", "agent_completed").await;
    let id = seqs[0].to_string();
    let mut on_a = open(
        &a,
        Open {
            last_event_id: Some(&id),
            ..Open::bearer(&alice)
        },
    )
    .await;
    let resumed = on_a.next_json().await.unwrap();
    assert_eq!(
        (
            &resumed["type"],
            &resumed["recovered"],
            &resumed["replayed"]
        ),
        (&json!("gateway.resumed"), &json!(true), &json!(2)),
        "{resumed}"
    );
    expect_event(&mut on_a, seqs[1]).await;
    expect_event(&mut on_a, missed).await;
    let marker = b.publish_marker("alice", None).await;
    expect_event(&mut on_a, marker).await;
}

/// A drain tells a stream what it tells a WebSocket: 1001, resume with since.
#[tokio::test]
async fn a_drain_ends_the_stream_with_a_close_event_that_says_to_resume() {
    let gw = TestGateway::start().await;
    let mut stream = open(&gw, Open::bearer(&gw.token("alice"))).await;
    let url = sse_url(&gw);
    let reader = tokio::spawn(async move { stream.until_end().await });
    gw.stop().await;
    let events = reader.await.unwrap();
    assert_eq!(events.len(), 1, "only the close event: {events:?}");
    assert_eq!(
        (events[0].event.as_str(), events[0].json()),
        (
            "close",
            json!({"code": 1001, "reason": "gateway shutting down; resume with since"})
        )
    );
    // And the node takes no new stream.
    assert!(
        reqwest::Client::new().get(url).send().await.is_err(),
        "a stopped node is not listening"
    );
}

//! Hibernation of idle handlers: after `limits.hibernate_after_secs` with no frame and no
//! event, the guest's state is saved to bytes and its instance dropped; the next frame or
//! event wakes it into a fresh instance, transparently and in order. A guest that fails to
//! save or restore loses its own connection only; one that declines, or saves too much,
//! stays live. Guests of the first world (0.1.0) run as before and never hibernate.

use futures_util::{SinkExt, StreamExt};
use gateway::auth::{Claims, now_secs};
use gateway::sandbox::{Context, WORLD_0_1};
use gateway_tests::{Client, TestGateway, claims, config, guests, token, wait_until};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

async fn gateway(guest: &str) -> TestGateway {
    let mut cfg = config(guest);
    cfg.limits.hibernate_after_secs = 1;
    TestGateway::start_with(cfg).await
}

fn event(user: &str, kind: &str, thread: &str) -> Value {
    json!({"user_id": user, "kind": kind, "run_id": "r1", "thread_id": thread,
           "payload": {"step": 1}})
}

/// Waits until every live handler of the gateway has hibernated.
async fn all_hibernated(gw: &TestGateway, sessions: f64) {
    gw.wait_metric("gateway_sessions_hibernated", sessions)
        .await;
    gw.wait_metric("gateway_instances_live", 0.0).await;
}

async fn next_of_type(client: &mut Client, kind: &str) -> Value {
    loop {
        let frame = client.next_json().await.unwrap();
        if frame["type"] == kind {
            return frame;
        }
    }
}

#[tokio::test]
async fn an_idle_handler_hibernates_and_wakes_with_its_state_in_order() {
    let gw = gateway(guests::REFERENCE).await;
    let publisher = gw.publisher_token();
    let mut alice = gw.connect("alice").await;
    alice.send_json(&json!({"type": "ping"})).await;
    let before = next_of_type(&mut alice, "pong").await;
    alice
        .send_json(&json!({"type": "subscribe", "thread_id": "t1"}))
        .await;
    next_of_type(&mut alice, "subscribed").await;
    gw.publish(&publisher, &event("alice", "agent_started", "t1"))
        .await;
    assert_eq!(
        next_of_type(&mut alice, "event").await["run_state"],
        "started"
    );

    all_hibernated(&gw, 1.0).await;
    assert_eq!(
        gw.metric("gateway_hibernations_total{result=\"saved\"}")
            .await,
        1.0
    );
    assert!(gw.metric("gateway_hibernated_bytes").await > 0.0);

    // An event wakes it: the subscription filters t2 out, the run goes on where it was.
    gw.publish(&publisher, &event("alice", "tool_executing", "t2"))
        .await;
    let mut seqs = Vec::new();
    for _ in 0..20 {
        let (status, receipt) = gw
            .publish(&publisher, &event("alice", "tool_executing", "t1"))
            .await;
        assert_eq!(status, 200, "{receipt}");
        seqs.push(receipt["seq"].as_u64().unwrap());
    }
    let first = next_of_type(&mut alice, "event").await;
    assert_eq!(first["thread_id"], "t1");
    assert_eq!(first["run_state"], "tools_running");
    let mut got = vec![first["seq"].as_u64().unwrap()];
    while got.len() < seqs.len() {
        got.push(
            next_of_type(&mut alice, "event").await["seq"]
                .as_u64()
                .unwrap(),
        );
    }
    assert_eq!(
        got, seqs,
        "every event once, in publish order, across the wake"
    );
    assert!(gw.metric("gateway_wakes_total").await >= 1.0);
    assert_eq!(
        gw.metric("gateway_wake_seconds_count").await,
        gw.metric("gateway_wakes_total").await
    );

    // Hibernate again; a client frame wakes it too, and the counters are the same instance's.
    all_hibernated(&gw, 1.0).await;
    alice.send_json(&json!({"type": "ping"})).await;
    let pong = next_of_type(&mut alice, "pong").await;
    assert_eq!(pong["connection_id"], before["connection_id"]);
    assert_eq!(pong["user_id"], "alice");
    assert_eq!(pong["subscriptions"], json!(["t1"]));
    assert_eq!(pong["events_in"], 22);
    assert_eq!(pong["events_out"], 21);
    assert_eq!(pong["events_filtered"], 1);
    assert_eq!(pong["frames_in"], 3);
    assert_eq!(pong["runs"]["r1"]["events"], 21);
    assert_eq!(
        gw.metric_or_zero("gateway_guest_faults_total{kind=\"restore\"}")
            .await,
        0.0
    );
    alice.close().await;
    gw.wait_metric("gateway_sessions_hibernated", 0.0).await;
    gw.wait_metric("gateway_hibernated_bytes", 0.0).await;
}

/// A token refreshed in-band while the handler sleeps is the one its restored instance is
/// given: the guest sees the renewed expiry, and the connection outlives the first token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_woken_after_a_refresh_is_given_the_renewed_expiry() {
    let mut cfg = config(guests::CHAOS);
    cfg.limits.hibernate_after_secs = 1;
    // The first token ends at exp + 1 s: 5 s to 6 s from now, time for the connect, one
    // hibernation and the refresh.
    cfg.auth.leeway_secs = 1;
    let gw = TestGateway::start_with(cfg).await;
    let first = Claims {
        exp: now_secs() + 5,
        ..claims("dana")
    };
    let mut dana = gw.connect_with(first.clone()).await;
    dana.send_text("expiry").await;
    assert_eq!(
        next_of_type(&mut dana, "expiry").await["expires_at"],
        first.exp
    );
    all_hibernated(&gw, 1.0).await;

    let renewed = Claims {
        exp: first.exp + 3600,
        ..first.clone()
    };
    dana.send_json(&json!({"type": "gateway.refresh", "access_token": token(renewed.clone())}))
        .await;
    let reply = next_of_type(&mut dana, "gateway.refreshed").await;
    assert_eq!(reply["expires_at"], renewed.exp, "{reply}");
    // The refresh is the gateway's business: the handler slept through it.
    assert_eq!(gw.metric("gateway_wakes_total").await, 0.0);

    dana.send_text("expiry").await;
    let seen = next_of_type(&mut dana, "expiry").await;
    assert_eq!(
        seen["expires_at"], renewed.exp,
        "the restored handler's context: {seen}"
    );
    assert_eq!(gw.metric("gateway_wakes_total").await, 1.0);

    // Past the first token's end (its timer has fired by then), the connection still serves.
    wait_until("the first token has run out", async || {
        now_secs() > first.exp + 1
    })
    .await;
    dana.send_text("expiry").await;
    let seen = next_of_type(&mut dana, "expiry").await;
    assert_eq!(seen["expires_at"], renewed.exp, "{seen}");
    assert_eq!(
        gw.metric_or_zero("gateway_session_closes_total{reason=\"token_expired\"}")
            .await,
        0.0
    );
}

#[tokio::test]
async fn pings_are_answered_without_waking_the_handler() {
    let gw = gateway(guests::REFERENCE).await;
    let mut bob = gw.connect("bob").await;
    all_hibernated(&gw, 1.0).await;
    for i in 0..3u8 {
        bob.ws.send(Message::Ping(vec![i].into())).await.unwrap();
        loop {
            match bob.ws.next().await.unwrap().unwrap() {
                Message::Pong(data) if data.as_ref() == [i] => break,
                Message::Ping(_) => continue,
                other => panic!("expected the pong, got {other:?}"),
            }
        }
    }
    assert_eq!(gw.metric("gateway_wakes_total").await, 0.0);
    assert_eq!(gw.metric("gateway_instances_live").await, 0.0);
}

/// Reads until the server closes; the pings it sent before (answered: tungstenite queues
/// the pong and sends it with the next read).
async fn pings_until_close(mut client: Client) -> usize {
    let mut pings = 0;
    loop {
        match client.ws.next().await {
            Some(Ok(Message::Ping(_))) => pings += 1,
            Some(Ok(Message::Pong(_))) => {}
            Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return pings,
            Some(Ok(other)) => panic!("a hibernated connection got {other:?}"),
        }
    }
}

/// A hibernated connection waits without its serving state (the task keeps only the
/// session); its timers go on: the gateway pings it, and closes it when its client stops
/// answering, when its token runs out and when it has been idle too long, each with its own
/// reason and none of them waking the handler.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hibernated_connection_is_pinged_and_closed_on_time_without_waking() {
    let mut cfg = config(guests::REFERENCE);
    cfg.limits.hibernate_after_secs = 1;
    cfg.limits.ping_interval_secs = 1;
    cfg.limits.dead_peer_secs = 4;
    // Pings and pongs are not activity: carol, who answers them, idles out.
    cfg.limits.idle_timeout_secs = 8;
    cfg.auth.leeway_secs = 0;
    let gw = TestGateway::start_with(cfg).await;
    let carol = gw.connect("carol").await;
    // Dave's client never reads, so it never answers a ping.
    let dave = gw.connect("dave").await;
    let erin = gw
        .connect_with(Claims {
            exp: now_secs() + 6,
            ..claims("erin")
        })
        .await;
    // The counter, not the gauge: a slow machine may see dave closed before the last save.
    gw.wait_metric("gateway_hibernations_total{result=\"saved\"}", 3.0)
        .await;
    let carol = tokio::spawn(pings_until_close(carol));
    let erin = tokio::spawn(pings_until_close(erin));

    for reason in ["dead_peer", "token_expired", "idle"] {
        gw.wait_metric(
            &format!("gateway_session_closes_total{{reason=\"{reason}\"}}"),
            1.0,
        )
        .await;
    }
    let carol_pings = carol.await.unwrap();
    assert!(
        carol_pings >= 4,
        "pinged every second until idle after 8 s: {carol_pings}"
    );
    assert!(erin.await.unwrap() >= 1);
    drop(dave);
    assert_eq!(gw.metric("gateway_wakes_total").await, 0.0);
    assert_eq!(gw.metric("gateway_sessions_live").await, 0.0);
    assert_eq!(gw.metric("gateway_sessions_hibernated").await, 0.0);
}

/// Waking and hibernating again does not put the next ping off: a connection that an event
/// wakes more often than it is pinged still gets its pings on time (else a dead peer would
/// go unnoticed while events keep it busy, and a live one would be closed as dead once they
/// stop, its pongs never asked for).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pings_keep_their_interval_across_wakes() {
    let mut cfg = config(guests::REFERENCE);
    cfg.limits.hibernate_after_secs = 1;
    cfg.limits.ping_interval_secs = 3;
    cfg.limits.dead_peer_secs = 6;
    let gw = TestGateway::start_with(cfg).await;
    let publisher = gw.publisher_token();
    let mut frank = gw.connect("frank").await;
    let started = tokio::time::Instant::now();
    let (mut pings, mut events) = (0, 0);
    // An event every 2 s: the handler wakes, hibernates a second later, and parks again
    // before the 3-s ping would be due if each wake started it over.
    let mut every = tokio::time::interval(std::time::Duration::from_secs(2));
    while pings < 2 {
        assert!(
            started.elapsed() < std::time::Duration::from_secs(20),
            "{pings} pings in 20 s of wakes every 2 s; the interval is 3 s"
        );
        tokio::select! {
            _ = every.tick() => {
                gw.publish(&publisher, &event("frank", "agent_started", "t1")).await;
            }
            frame = frank.ws.next() => match frame.unwrap().unwrap() {
                Message::Ping(_) => pings += 1,
                Message::Text(_) => events += 1,
                other => panic!("unexpected {other:?}"),
            },
        }
    }
    assert!(events >= 2, "{events} events");
    assert!(gw.metric("gateway_wakes_total").await >= 2.0);
    assert_eq!(
        gw.metric_or_zero("gateway_session_closes_total{reason=\"dead_peer\"}")
            .await,
        0.0
    );
}

#[tokio::test]
async fn a_guest_that_fails_to_save_or_restore_loses_only_its_own_connection() {
    let gw = gateway(guests::CHAOS).await;
    let publisher = gw.publisher_token();
    let connect = |user: &str, mode: &str| {
        let (gw, user, mode) = (&gw, user.to_owned(), mode.to_owned());
        async move {
            let mut client = gw.connect(&user).await;
            if !mode.is_empty() {
                client.send_text(&mode).await;
            }
            client
        }
    };
    let mut healthy = connect("healthy", "").await;
    let mut save_trap = connect("save-trap", "save-trap").await;
    let mut refuse = connect("refuse", "restore-refuse").await;
    let mut no_ack = connect("no-ack", "restore-no-ack").await;
    let mut declines = connect("declines", "save-none").await;
    let mut too_big = connect("too-big", "save-big").await;

    let closed = save_trap.closed().await;
    assert_eq!(
        (closed.code, closed.reason.as_str()),
        (1011, "guest fault: trap")
    );
    // Refused hibernations are tried again after each idle spell: at least once each.
    for result in ["declined", "too_large"] {
        let name = format!("gateway_hibernations_total{{result=\"{result}\"}}");
        wait_until(&name, async || gw.metric_or_zero(&name).await >= 1.0).await;
    }
    // healthy, refuse and no-ack hibernated; declines and too-big stay live.
    gw.wait_metric("gateway_sessions_hibernated", 3.0).await;
    gw.wait_metric("gateway_instances_live", 2.0).await;

    for user in ["healthy", "refuse", "no-ack", "declines", "too-big"] {
        let (status, _) = gw
            .publish(&publisher, &event(user, "agent_started", "t"))
            .await;
        assert_eq!(status, 200);
    }
    let closed = refuse.closed().await;
    assert_eq!(
        (closed.code, closed.reason.as_str()),
        (1011, "guest fault: restore")
    );
    let closed = no_ack.closed().await;
    assert_eq!(
        (closed.code, closed.reason.as_str()),
        (1008, "policy violation: unacknowledged")
    );
    // The others get their event, counted by the same handler state as before.
    for client in [&mut healthy, &mut declines, &mut too_big] {
        let frame = next_of_type(client, "event").await;
        assert_eq!(frame["count"], 1, "{frame}");
    }
    assert_eq!(
        gw.metric("gateway_guest_faults_total{kind=\"trap\"}").await,
        1.0
    );
    assert_eq!(
        gw.metric("gateway_guest_faults_total{kind=\"restore\"}")
            .await,
        1.0
    );
    assert_eq!(
        gw.metric("gateway_guest_faults_total{kind=\"unacknowledged\"}")
            .await,
        1.0
    );
}

#[tokio::test]
async fn a_guest_of_the_first_world_runs_and_never_hibernates() {
    let gw = gateway(guests::ECHO).await;
    let sandbox = gw.state.sandbox();
    assert_eq!(sandbox.world(), WORLD_0_1);
    let ctx = Context {
        connection_id: "c".into(),
        user_id: "u".into(),
        tenant_id: None,
        session_id: None,
        scopes: Vec::new(),
        expires_at: 0,
    };
    let mut handler = sandbox.instantiate(&ctx).unwrap();
    handler.init(&ctx).unwrap();
    assert!(!handler.hibernates());
    drop(handler);

    // The echo guest sends no welcome frame.
    let mut client = gw.try_connect(&gw.token("carol")).await.unwrap();
    client.send_text("hello").await;
    match client.ws.next().await.unwrap().unwrap() {
        Message::Text(text) => assert_eq!(text.as_str(), "hello"),
        other => panic!("expected the echo, got {other:?}"),
    }
}

#[tokio::test]
async fn a_hibernated_connection_wakes_into_the_guest_version_that_saved_it() {
    let dir = std::env::temp_dir().join(format!("gateway-hibernate-reload-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("handler.wasm");
    std::fs::copy(guests::REFERENCE, &path).unwrap();
    let gw = gateway(path.to_str().unwrap()).await;
    let publisher = gw.publisher_token();
    let mut alice = gw.connect("alice").await;
    all_hibernated(&gw, 1.0).await;
    let first = gw.state.sandbox().version.label();

    // The chaos guest replaces the reference one; the hibernated connection stays with its
    // version, counted there as hibernated.
    std::fs::copy(guests::CHAOS, dir.join("next.wasm")).unwrap();
    std::fs::rename(dir.join("next.wasm"), &path).unwrap();
    gw.state.reload_guest().unwrap();
    assert_ne!(gw.state.sandbox().version.label(), first);
    let versions = gw.state.guest_versions();
    let old = versions
        .iter()
        .find(|(v, _, _)| v.label() == first)
        .expect("the hibernated connection's version is still listed");
    assert_eq!(
        (old.1, old.2),
        (0, 1),
        "no instance, one hibernated connection"
    );
    gw.wait_metric(
        &format!("gateway_guest_hibernated{{guest=\"{first}\"}}"),
        1.0,
    )
    .await;

    gw.publish(&publisher, &event("alice", "agent_started", "t1"))
        .await;
    let frame = next_of_type(&mut alice, "event").await;
    assert_eq!(
        frame["run_state"], "started",
        "the reference guest woke: {frame}"
    );
    gw.wait_metric(
        &format!("gateway_guest_instances{{guest=\"{first}\"}}"),
        1.0,
    )
    .await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// Many users, two connections each, through several rounds of hibernating and waking: each
/// connection gets exactly its own user's events, every one, in order, with its handler's
/// count going on from where the previous instance left it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wake_cycles_deliver_each_users_events_to_its_own_connections_only() {
    const USERS: usize = 40;
    const ROUNDS: usize = 4;
    let gw = gateway(guests::CHAOS).await;
    let publisher = gw.publisher_token();
    let mut clients = Vec::new();
    for user in 0..USERS {
        for _ in 0..2 {
            clients.push((user, gw.connect(&format!("user-{user}")).await));
        }
    }
    let mut expected: Vec<Vec<u64>> = vec![Vec::new(); USERS];
    for round in 0..ROUNDS {
        all_hibernated(&gw, (USERS * 2) as f64).await;
        // Every user gets one event a round, some users a few more.
        let mut events = Vec::new();
        for user in 0..USERS {
            for _ in 0..events_this_round(user, round) {
                events.push(event(&format!("user-{user}"), "tool_executing", "t"));
            }
        }
        let (status, receipts) = gw.publish_batch(&publisher, &events).await;
        assert_eq!(status, 200, "{receipts}");
        for (event, receipt) in events.iter().zip(receipts["results"].as_array().unwrap()) {
            let user: usize = event["user_id"].as_str().unwrap()[5..].parse().unwrap();
            expected[user].push(receipt["seq"].as_u64().unwrap());
        }
        for (user, client) in &mut clients {
            let want = &expected[*user];
            let fresh = events_this_round(*user, round);
            for (i, seq) in want[want.len() - fresh..].iter().enumerate() {
                let frame = next_of_type(client, "event").await;
                assert_eq!(frame["seq"].as_u64(), Some(*seq), "user-{user}: {frame}");
                // The chaos guest counts the events its handler saw, across instances.
                let count = want.len() - fresh + i + 1;
                assert_eq!(frame["count"], count, "user-{user}: {frame}");
            }
        }
    }
    assert!(gw.metric("gateway_wakes_total").await >= (USERS * 2 * ROUNDS) as f64);
    assert_eq!(
        gw.metric_or_zero("gateway_guest_faults_total{kind=\"restore\"}")
            .await,
        0.0
    );
}

/// Events user `user` gets in round `round` of the test above.
fn events_this_round(user: usize, round: usize) -> usize {
    1 + (user * 7 + round * 3) % 3
}
